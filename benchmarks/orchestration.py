"""Orchestration benchmark: what the Prefect flow costs on top of the library stages.

Runs the main flow (local dispatch, Prefect ephemeral server) on the bundled photos with random tiny weights:

* ``overhead_per_cluster``: (wall time of the cluster stage - time spent inside
  ``sparse_vggt.reconstruct.reconstruct_cluster``) / clusters. Covers task submission, the accelerator tag
  concurrency slot, cache-key computation, result persistence in the run directory, state updates and
  progress artifacts. Target <= 1 s.
* ``rerun_fraction``: wall time of a second run of the finished run directory / the first run (same process,
  so the ephemeral server is already up; its start is measured separately as ``ephemeral_start``). Target <= 5%.

    python benchmarks/orchestration.py                       # table
    python benchmarks/orchestration.py --json                # one JSON object per line
    python benchmarks/orchestration.py --max-cluster-frames 4 --image-size 112
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import peak_rss_bytes  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--max-cluster-frames", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=112)
    args = ap.parse_args()

    t0 = time.perf_counter()
    from prefect import flow

    @flow
    def _noop() -> int:
        return 1

    _noop()  # starts the ephemeral server (unless PREFECT_API_URL points at one)
    ephemeral_start = time.perf_counter() - t0

    import flows.reconstruct as fr
    import sparse_vggt.scheduler as sch
    from sparse_vggt.demo import DEMO_PHOTOS, demo_config
    import sparse_vggt.reconstruct as recon

    lib_seconds: list[float] = []
    lock = threading.Lock()
    real = recon.reconstruct_cluster

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            with lock:
                lib_seconds.append(time.perf_counter() - t)

    recon.reconstruct_cluster = timed
    stage: dict[str, float] = {}
    real_run_clusters = sch.run_clusters

    def timed_clusters(*a, **k):
        t = time.perf_counter()
        try:
            return real_run_clusters(*a, **k)
        finally:
            stage["seconds"] = time.perf_counter() - t

    sch.run_clusters = timed_clusters
    cfg = demo_config([f"partition.max_cluster_frames={args.max_cluster_frames}",
                          "partition.min_overlap_frames=2", f"reconstruct.image_size={args.image_size}",
                          f"describe.image_size={args.image_size}"])
    # the library time is measured in this process, so clusters run here (orchestration.cluster_process=false);
    # the child-process mode adds one process start + one model load per run, not per cluster
    cfg.orchestration.cluster_process = False
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        t = time.perf_counter()
        first = fr.run_pipeline(DEMO_PHOTOS, run, cfg)
        first_s = time.perf_counter() - t
        n = first["clusters"]
        overhead = (stage["seconds"] - sum(lib_seconds)) / max(1, n)
        cluster_stage = stage["seconds"]
        t = time.perf_counter()
        again = fr.run_pipeline(DEMO_PHOTOS, run, cfg)
        rerun_s = time.perf_counter() - t
    base = {"bench": "orchestration", "device": "cpu", "dispatch": "local", "photos": first["images_kept"],
            "clusters": n, "max_cluster_frames": args.max_cluster_frames, "image_size": args.image_size,
            "cpus": os.cpu_count(), "peak_bytes": peak_rss_bytes()}
    rows = [
        {**base, "variant": "ephemeral_start", "seconds": round(ephemeral_start, 3)},
        {**base, "variant": "first_run", "seconds": round(first_s, 3), "cluster_stage_seconds": round(cluster_stage, 3),
         "library_cluster_seconds": round(sum(lib_seconds), 3)},
        {**base, "variant": "overhead_per_cluster", "seconds": round(overhead, 3), "target_seconds": 1.0},
        {**base, "variant": "rerun", "seconds": round(rerun_s, 3), "rerun_fraction": round(rerun_s / first_s, 4),
         "target_fraction": 0.05, "stages_executed": again["stages_executed"]},
    ]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'variant':<22}{'seconds':>10}  notes")
    for r in rows:
        note = {k: v for k, v in r.items() if k not in base and k not in ("variant", "seconds", "bench")}
        print(f"{r['variant']:<22}{r['seconds']:>10.3f}  {note}")


if __name__ == "__main__":
    main()
