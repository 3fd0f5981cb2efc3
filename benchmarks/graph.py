"""Graph-stage benchmark: kNN graph over N synthetic fp16 descriptors stored in Zarr, as `sparse-vggt graph` runs it.

Each variant runs the graph stage (`sparse_vggt.graph.run`) in a fresh child process, so its peak RSS is its
own. Recall@k is measured against exact search on a sample of queries (``--recall-sample``), by the stage itself.

Distributions:
  random     isotropic Gaussian, L2-normalised: no low-dimensional structure at all. The worst case for any
             reduced projection: true neighbours differ from the rest by ~1/sqrt(D) noise.
  clustered  a crude model of real retrieval descriptors: "places" with k+1..60 views each; a view is
             A (z_place + 0.5 z_view) + isotropic noise (norm ratio 0.5), A a random 512-d subspace of R^D.
  longtail   as clustered, but place sizes follow a Zipf law (exponent 1.8, capped at 2,000 views): most places
             have 1-3 views and a few landmarks have hundreds, as in tourist photo collections. A query whose
             place has fewer than k+1 views has true neighbours in *other* places, which a reduced projection
             ranks poorly: the hard case for approximate search on realistic data.

    python benchmarks/graph.py --n 100000 --dim 8448 --dist random clustered --method pca --json
    python benchmarks/graph.py --n 20000 --dim 8448 --dist longtail --method exact pca auto --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(root: Path, n: int, dim: int, dist: str, k: int, seed: int = 0) -> None:
    """Write images.parquet + store.zarr/descriptors block by block (never n x dim float32 in memory)."""
    import pyarrow as pa

    from sparse_vggt.config import PipelineConfig
    from sparse_vggt.store import RunStore

    rng = np.random.default_rng(seed)
    store = RunStore.create_or_open(root, PipelineConfig())
    store.write_table("images", pa.table({
        "image_id": pa.array(np.arange(n), pa.int64()), "path": [f"{i:07d}.jpg" for i in range(n)],
        "status": ["ok"] * n, "chunk_id": pa.array(np.arange(n) // 256, pa.int64()),
    }).replace_schema_metadata({b"photos_root": b"/nonexistent"}))
    store.stage_finished("scan", {})
    arr = store.zarr.create_array("descriptors", shape=(n, dim), dtype="float16", chunks=(256, dim))
    if dist in ("clustered", "longtail"):
        latent = 512
        basis = np.linalg.qr(rng.standard_normal((dim, latent)).astype(np.float32))[0]  # (dim, latent)
        sizes = []
        while sum(sizes) < n:
            if dist == "clustered":
                sizes.append(int(rng.integers(k + 1, 61)))
            else:
                sizes.append(int(min(rng.zipf(1.8), 2000)))
        labels = np.repeat(np.arange(len(sizes)), sizes)[:n]
        labels = labels[rng.permutation(n)]
        places = rng.standard_normal((len(sizes), latent)).astype(np.float32)
    block = 4096
    for s in range(0, n, block):
        e = min(n, s + block)
        if dist == "random":
            x = rng.standard_normal((e - s, dim), dtype=np.float32)
        elif dist in ("clustered", "longtail"):
            z = places[labels[s:e]] + 0.5 * rng.standard_normal((e - s, latent), dtype=np.float32)
            sig = z @ basis.T
            noise = rng.standard_normal((e - s, dim), dtype=np.float32)
            noise *= 0.5 * np.linalg.norm(sig, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True)
            x = sig + noise
        else:
            raise SystemExit(f"unknown distribution {dist}")
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        arr[s:e] = x.astype(np.float16)
    store.stage_finished("describe", {})


def child(args: argparse.Namespace) -> None:
    import torch

    from sparse_vggt.config import PipelineConfig
    from sparse_vggt.graph import run

    torch.set_num_threads(args.threads)
    cfg = PipelineConfig()
    cfg.graph.retrieval_neighbors, cfg.graph.method, cfg.graph.min_similarity = args.k, args.method, -1.0
    cfg.graph.pca_dim, cfg.graph.candidates = args.pca_dim, args.candidates
    cfg.graph.recall_sample, cfg.graph.memory_mb = args.recall_sample, args.memory_mb
    t0 = time.perf_counter()
    manifest = run(Path(args.run), cfg, force=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "manifest": manifest}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=8448)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--dist", nargs="+", default=["random", "clustered"])
    ap.add_argument("--method", nargs="+", default=["pca"], help="exact | pca | faiss | auto (several: one run each)")
    ap.add_argument("--pca-dim", type=int, default=256)
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--recall-sample", type=int, default=1000)
    ap.add_argument("--memory-mb", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the synthetic run directories go (default: temp)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child-run", dest="run", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        args.method = args.method[0]
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for dist in args.dist:
            run = Path(tmp) / dist
            t0 = time.perf_counter()
            generate(run, args.n, args.dim, dist, args.k)
            gen_s = time.perf_counter() - t0
            for method in args.method:
                cmd = [sys.executable, __file__, "--child-run", str(run), "--method", method, "--k", str(args.k),
                       "--pca-dim", str(args.pca_dim), "--candidates", str(args.candidates),
                       "--recall-sample", str(args.recall_sample), "--memory-mb", str(args.memory_mb),
                       "--threads", str(args.threads)]
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                res = json.loads(out.strip().splitlines()[-1])
                m = res["manifest"]
                row = {"bench": "graph_build", "variant": f"{dist}/{method}->{m['method']}", "seconds": round(res["seconds"], 1),
                       "peak_bytes": res["peak_bytes"], "n": args.n, "dim": args.dim, "k": args.k,
                       "distribution": dist, "method": m["method"], "requested": method, "pca_dim": args.pca_dim,
                       "candidates": args.candidates, "recall_at_k": m["recall_at_k"],
                       "recall_sample": m["recall_sample"], "edges": m["edges"], "components": m["components"],
                       "threads": args.threads, "memory_mb": args.memory_mb, "generate_seconds": round(gen_s, 1),
                       "timings": m.get("timings")}
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
    if not args.json:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"graph build, N={args.n}, D={args.dim}, k={args.k}, {args.threads} threads")
        for col in ("variant", "seconds", "peak GB", "recall@k", "edges", "components"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["variant"], str(r["seconds"]), f"{r['peak_bytes'] / 1e9:.2f}", str(r["recall_at_k"]),
                      str(r["edges"]), str(r["components"]))
        Console().print(t)


if __name__ == "__main__":
    main()
