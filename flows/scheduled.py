"""The scheduled flow for a growing photo folder: a new dated run directory per run, reusing the last run's work.

``scheduled_reconstruct(photos, runs_root, config)`` scans ``photos`` into ``<runs_root>/<YYYY-MM-DD_HHMMSS>/``;
if the newest finished run under ``runs_root`` scanned exactly the same photos, the new directory is removed and
the run reports that the previous run is current; otherwise the previous run's descriptors are reused by content
hash (sparse_vggt/grow.py says what is and is not reused, and why) and the normal pipeline runs. The
"reused" section goes into ``orchestration/report.json`` and a Prefect markdown artifact. The deployment has a
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
from sparse_vggt.grow import clusters_with_unchanged_inputs, dated_run_dir, previous_runs, reuse_descriptors, same_photo_set
from sparse_vggt.lock import writer_lock
from sparse_vggt.store import atomic_write_bytes
from tasks.stages import artifact_key, scan_task


def _reuse_markdown(run_dir: str, reused: dict[str, Any]) -> str:
    lines = ["# Reused from the previous run", "", f"- new run: `{run_dir}`", f"- previous run: `{reused.get('from')}`"]
    if reused.get("unchanged"):
        lines.append("- the photo set did not change: the previous run is current, nothing was recomputed")
        return "\n".join(lines)
    d = reused.get("descriptors") or {}
    lines += [f"- descriptors: {d.get('images_reused', 0)} images reused in {d.get('chunks_reused', 0)} of "
              f"{d.get('chunks_total', 0)} chunks; {d.get('images_new', 0)} new photos described"
              + (f"; {d.get('images_recomputed_known')} known photos recomputed (they share a chunk with new ones)"
                 if d.get("images_recomputed_known") else "")
              + (f" (not reused: {d['reason']})" if d.get("reason") else ""),
              f"- recomputed: {', '.join(reused.get('recomputed', []))} ({reused.get('why_recomputed')})"]
    c = reused.get("clusters")
    if c:
        lines.append(f"- clusters whose inputs (photos, order, neighbours, settings) equal a previous cluster's: "
                     f"{c['same_inputs_as_a_previous_cluster']} of {c['clusters']} (recomputed all the same)")
    return "\n".join(lines)


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
        if prev is not None and same_photo_set(prev, run_dir):
            reused["unchanged"] = True
            logger.info("photos unchanged since %s: nothing to do", prev)
        elif prev is not None:
            reused["descriptors"] = reuse_descriptors(prev, run_dir, cfg)
            reused["recomputed"] = ["graph", "partition", "clusters", "merge", "export"]
            reused["why_recomputed"] = ("the photo set changed: the kNN covisibility graph over all photos, and so "
                                        "the partition and every cluster's input, may change")
            record_event(str(run_dir), "reused_from_previous_run", **{k: v for k, v in reused.items()
                                                                       if k != "from"}, previous=str(prev))
        t0 = time.perf_counter()
        if reused.get("unchanged"):
            report: dict[str, Any] = {"run_dir": str(prev), "unchanged": True}
        else:
            report = _reconstruct(photos, str(run_dir), cfgd, False)
            report["seconds_with_reuse"] = round(time.perf_counter() - t0, 3)
            if prev is not None:
                reused["clusters"] = clusters_with_unchanged_inputs(prev, run_dir, cfg)
    if reused.get("unchanged"):
        shutil.rmtree(run_dir)  # only a scan of the same photos: the previous run stays the current one
    report["reused"] = reused
    if not reused.get("unchanged"):
        atomic_write_bytes(run_dir / "orchestration" / "report.json", json.dumps(report, indent=2, default=str).encode())
    with contextlib.suppress(Exception):
        create_markdown_artifact(key=artifact_key(str(root), "reused"), markdown=_reuse_markdown(str(run_dir), reused),
                                 description="what this scheduled run reused from the previous one")
    return report
