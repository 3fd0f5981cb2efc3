"""Cost of running clusters in the persistent child process (``orchestration.cluster_process``) vs in process.

Needs a finished run directory (e.g. ``sparse-vggt demo RUN``). It is copied to a temp dir, every cluster marker
is dropped, and the clusters are reconstructed once through ``sparse_vggt.cluster_worker`` (child process, started
for the first cluster) and once through ``sparse_vggt.reconstruct.reconstruct_cluster`` (this process), ``--repeat``
times, alternating.

    python benchmarks/cluster_process.py --run demo_run            # table
    python benchmarks/cluster_process.py --run demo_run --json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import peak_rss_bytes  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished run directory (copied, not modified)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from sparse_vggt import reconstruct as recon
    from sparse_vggt.cluster_worker import shutdown, worker
    from sparse_vggt.store import RunStore

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(args.run, run)
        store = RunStore.open(run)
        cfg = store.config()
        ids = sorted({int(c) for c in store.read_table("clusters", columns=["cluster_id"]).column(0).to_pylist()})

        def drop(c: int) -> None:
            p = run / "store.zarr" / "clusters" / str(c) / "zarr.json"
            meta = json.loads(p.read_text())
            meta["attributes"].pop("complete", None)
            p.write_text(json.dumps(meta))

        for rep in range(args.repeat):
            for variant in ("child_process", "in_process"):
                times = []
                for c in ids:
                    drop(c)
                    t = time.perf_counter()
                    if variant == "child_process":
                        worker().run(run, c, cfg)
                    else:
                        recon.reconstruct_cluster(run, c, cfg)
                    times.append(time.perf_counter() - t)
                shutdown()
                rows.append({"bench": "cluster_process", "variant": variant, "repeat": rep, "clusters": len(ids),
                             "seconds": round(sum(times), 3), "first_cluster_s": round(times[0], 3),
                             "other_clusters_s": round(sum(times[1:]), 3), "peak_bytes": peak_rss_bytes()})
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'variant':14} {'rep':>3} {'clusters':>8} {'first s':>8} {'others s':>9} {'total s':>8}")
    for r in rows:
        print(f"{r['variant']:14} {r['repeat']:>3} {r['clusters']:>8} {r['first_cluster_s']:8.2f} "
              f"{r['other_clusters_s']:9.2f} {r['seconds']:8.2f}")


if __name__ == "__main__":
    main()
