"""The scheduled flow for a growing photo folder: a new dated run directory per run, reusing the last run's work.

``scheduled_reconstruct(photos, runs_root, config)`` scans ``photos`` into ``<runs_root>/<YYYY-MM-DD_HHMMSS>/``;
if the newest finished run under ``runs_root`` scanned exactly the same photos with the same result-affecting
settings, the new directory is removed and the run reports that the previous run is current. Otherwise the normal
pipeline runs, reusing the previous run's work (sparse_vggt/grow.py says what and why): descriptors by content
hash, describe/graph/partition whole when the photos are the same, and, right after the partition, every
cluster whose inputs equal a finished previous cluster's. The "reused" section goes into
``orchestration/report.json``, the run's events (``reused_from_previous_run``, ``clusters_reused``) and a Prefect
markdown artifact. The deployment has a
concurrency limit of 1 (flows/deploy.py), so two nightly runs never overlap.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.reconstruct import _reconstruct, record_event, validate_parameters
from sparse_vggt.grow import (dated_run_dir, previous_runs, reuse_clusters, reuse_descriptors, reuse_upstream,
                              same_photo_set)
from sparse_vggt.lock import writer_lock
from sparse_vggt.durable import atomic_write_bytes
from sparse_vggt.store import RunStore
from tasks.stages import artifact_key, scan_task


def _reuse_markdown(run_dir: str, reused: dict[str, Any]) -> str:
    lines = ["# Reused from the previous run", "", f"- new run: `{run_dir}`", f"- previous run: `{reused.get('from')}`"]
    if reused.get("unchanged"):
        lines.append("- neither the photos nor the settings changed: the previous run is current, nothing was "
                     "recomputed")
        return "\n".join(lines)
    if reused.get("settings_changed"):
        lines.append(f"- same photos, settings changed: {'; '.join(reused['settings_changed'])}")
    u = reused.get("upstream") or {}
    if u.get("stages"):
        lines.append(f"- copied whole: {', '.join(u['stages'])}" + (f" (not further: {u['reason']})" if u.get("reason")
                                                                    else ""))
    d = reused.get("descriptors") or {}
    if d:
        lines.append(f"- descriptors: {d.get('images_reused', 0)} images reused in {d.get('chunks_reused', 0)} of "
                     f"{d.get('chunks_total', 0)} chunks; {d.get('images_new', 0)} new photos described"
                     + (f"; {d.get('images_recomputed_known')} known photos recomputed (they share a chunk with new "
                        "ones)" if d.get("images_recomputed_known") else "")
                     + (f" (not reused: {d['reason']})" if d.get("reason") else ""))
    c = reused.get("clusters")
    if c:
        pairs = ", ".join(f"{k}<-{v}" for k, v in list(c["map"].items())[:40])
        lines.append(f"- clusters copied (same photos by content hash, order, neighbours and settings as a finished "
                     f"cluster of the previous run): {c['reused']} of {c['clusters']}"
                     + (f" (new<-previous id: {pairs}{' ...' if len(c['map']) > 40 else ''})" if pairs else "")
                     + (f" (none: {c['reason']})" if c.get("reason") else ""))
    if reused.get("recomputed"):
        lines.append(f"- recomputed: {', '.join(reused['recomputed'])}")
    return "\n".join(lines)


def _recomputed(reused: dict[str, Any]) -> list[str]:
    copied = set((reused.get("upstream") or {}).get("stages", []))
    out = [s for s in ("describe", "graph", "partition") if s not in copied]
    c = reused.get("clusters") or {}
    if c.get("clusters", 0) - c.get("reused", 0) > 0:
        out.append(f"{c['clusters'] - c['reused']} cluster(s)")
    return out + ["merge", "export"]


@flow(name="reconstruct-scheduled", log_prints=True, persist_result=False)
def scheduled_reconstruct(photos: str, runs_root: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """One scheduled run: new dated run directory under ``runs_root``, reusing the newest finished run."""
    logger = get_run_logger()
    photos = str(Path(photos).expanduser().resolve())
    root = Path(runs_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    run_dir = dated_run_dir(root)
    prev = next(iter(previous_runs(root, exclude=run_dir)), None)
    with writer_lock(str(run_dir), f"flow reconstruct-scheduled {photos} {run_dir}"):
        cfg, cfgd = validate_parameters(photos, run_dir, config)
        scan_task(photos, str(run_dir), cfgd)
        reused: dict[str, Any] = {"from": str(prev) if prev else None}
        same_photos = prev is not None and same_photo_set(prev, run_dir)
        changed = RunStore.open(prev).config().diff(cfg) if prev is not None else []
        if same_photos and not changed:
            reused["unchanged"] = True
            logger.info("photos and settings unchanged since %s: nothing to do", prev)
        elif prev is not None:
            if same_photos:
                reused["settings_changed"] = changed
                reused["upstream"] = reuse_upstream(prev, run_dir, cfg)
            if "describe" not in (reused.get("upstream") or {}).get("stages", []):
                reused["descriptors"] = reuse_descriptors(prev, run_dir, cfg)
            record_event(str(run_dir), "reused_from_previous_run", **{k: v for k, v in reused.items()
                                                                       if k != "from"}, previous=str(prev))

        def copy_clusters() -> None:
            reused["clusters"] = c = reuse_clusters(prev, run_dir, cfg)
            record_event(str(run_dir), "clusters_reused", previous=str(prev), reused=c["reused"],
                         clusters=c["clusters"], map=c["map"], reason=c["reason"])
            logger.info("clusters copied from %s: %d of %d", prev, c["reused"], c["clusters"])

        t0 = time.perf_counter()
        if reused.get("unchanged"):
            report: dict[str, Any] = {"run_dir": str(prev), "unchanged": True}
        else:
            report = _reconstruct(photos, str(run_dir), cfgd, False,
                                  after_partition=copy_clusters if prev is not None else None)
            report["seconds_with_reuse"] = round(time.perf_counter() - t0, 3)
            if prev is not None:
                reused["recomputed"] = _recomputed(reused)
    if reused.get("unchanged"):
        shutil.rmtree(run_dir)  # only a scan of the same photos: the previous run stays the current one
    report["reused"] = reused
    if not reused.get("unchanged"):
        atomic_write_bytes(run_dir / "orchestration" / "report.json", json.dumps(report, indent=2, default=str).encode())
    with contextlib.suppress(Exception):
        create_markdown_artifact(key=artifact_key(str(root), "reused"), markdown=_reuse_markdown(str(run_dir), reused),
                                 description="what this scheduled run reused from the previous one")
    return report
