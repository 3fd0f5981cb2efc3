"""The run report: what a pipeline run did, skipped, split and produced (``<run>/orchestration/report.json``).

Built by the scheduler at the end of every run (also a failed one) from the run directory alone (manifests,
events, unit records), so any executor produces the same report. Its human-readable form is the "Last pipeline run"
section of export/report.md (`sparse_vggt.export.report`), also what an executor shows in its UI. Farm runs add who did the work (per-worker throughput and model loads) from the workers' unit records.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from .config import PipelineConfig
from .durable import atomic_write_bytes, read_events
from .store import RunStore


def unit_records(run_dir: str, kind: str) -> list[dict[str, Any]]:
    out = []
    for p in sorted((Path(run_dir) / "orchestration" / kind).glob("*.json")):
        with contextlib.suppress(ValueError, OSError):
            out.append(json.loads(p.read_text()))
    return out


def worker_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per worker: units, frames, frames/s of model work, and model loads per resident process (host/pid)."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        w = rows.setdefault(r.get("worker") or "?", {"worker": r.get("worker") or "?", "units": 0, "frames": 0,
                                                     "work_s": 0.0, "flow_s": 0.0, "loads": {}})
        w["units"] += 1
        w["frames"] += int(r.get("frames") or r.get("images") or 0)
        w["work_s"] += float(r.get("work_seconds") or 0)
        w["flow_s"] += float(r.get("seconds") or 0)
        key = f"{r.get('host')}/{r.get('pid')}"
        for model, n in (r.get("loads") or {}).items():
            w["loads"].setdefault(key, {})[model] = max(n, w["loads"].get(key, {}).get(model, 0))
    for w in rows.values():
        w["frames_per_s"] = round(w["frames"] / w["work_s"], 2) if w["work_s"] else None
        w["work_s"], w["flow_s"] = round(w["work_s"], 2), round(w["flow_s"], 2)
    return sorted(rows.values(), key=lambda w: w["worker"])


def _cluster_ids(run_dir: str) -> list[int]:
    store = RunStore.open(run_dir)
    return sorted({int(c) for c in store.read_table("clusters", columns=["cluster_id"]).column(0).to_pylist()})


def _outputs(run_dir: str) -> dict[str, Any]:
    export_dir = RunStore(run_dir).export_dir
    files = sorted(str(p.relative_to(export_dir)) for p in export_dir.rglob("*") if p.is_file()
                   and p.relative_to(export_dir).parts[0] != "images") if export_dir.exists() else []
    if (export_dir / "images").is_dir():  # one entry per photo (symlinks / upright copies): named once, not listed
        files.insert(0, "images/")
    return {"export_dir": str(export_dir.resolve()), "files": files}


def _read_json(path: Path) -> Any:
    with contextlib.suppress(ValueError, OSError):
        return json.loads(path.read_text())
    return None


def build_report(run_dir: str, manifests: dict[str, dict[str, Any]], work: Any, seconds: float,
                 cluster_info: dict[str, Any], cfg: PipelineConfig, run_name: str | None = None) -> dict[str, Any]:
    """The report of one run; ``work`` is the executor's `scheduler.Work` (what ran)."""
    from .provenance import run_weights

    store = RunStore.open(run_dir)
    scan = store.stage_manifest("scan")
    part = store.stage_manifest("partition")
    random_weights = [s for s in ("describe", "reconstruct") if getattr(cfg, s).model == "random"]
    report: dict[str, Any] = {
        "run_dir": str(Path(run_dir).resolve()),
        "flow_run": run_name,
        "dispatch": cfg.orchestration.dispatch,
        "seconds": round(seconds, 2),
        "images_kept": scan.get("kept"),
        "images_skipped": scan.get("skipped"),
        "skipped_images": scan.get("skipped_files", []),
        "components_skipped": part.get("small_components_skipped"),
        "singletons_skipped": (part.get("singletons", 0) or 0) - (part.get("singletons_reconstructed", 0) or 0),
        "frames_not_clustered": part.get("frames_skipped"),
        "clusters": len(_cluster_ids(run_dir)),
        "oom_splits": part.get("splits", []),
        "failures": cluster_info.get("failures", []),  # this run's; earlier ones stay in "events"
        "events": read_events(run_dir),
        "stages_executed": dict(work.executed),
        "stages_cached": dict(work.cached),
        "stages_already_complete": sorted(work.complete),
        "merge": {k: v for k, v in manifests.get("merge", {}).items() if isinstance(v, (int, float, str, bool))},
        "outputs": _outputs(run_dir),
        "random_weights": random_weights,
        "weights": run_weights(store.meta()),  # per model stage: random, or checkpoint file + revision
    }
    if cfg.orchestration.dispatch == "pool":  # who did the work, model loads per worker (host/pid)
        report["farm"] = {kind: {"workers": worker_rows(unit_records(run_dir, kind)),
                                 "dispatch": _read_json(Path(run_dir) / "orchestration" / f"dispatch-{kind}.json")}
                          for kind in ("describe", "clusters")}
    return report


def publish_report(run_dir: str, report: dict[str, Any]) -> None:
    """Write ``<run>/orchestration/report.json`` atomically, then bring export/report.md (the one human-readable
    report, which renders this file's run section) up to date."""
    path = Path(run_dir) / "orchestration" / "report.json"
    atomic_write_bytes(path, json.dumps(report, indent=2, default=str).encode())
    if any(step != "scan" for step in report.get("stages_executed") or {}):  # a re-run that did nothing leaves
        from .export.report import refresh_report  # the outputs untouched (scan only re-lists the folder)

        refresh_report(RunStore.open(run_dir))
