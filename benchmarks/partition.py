"""Partition benchmark: METIS-based bounded overlapping clusters on a synthetic city-like k-NN graph.

Measures `sparse_vggt.partition.partition_graph` on a 1,000,000-frame k=10 graph (time, peak RSS, cut ratio,
size balance, overlap), the same on a 100,000-frame graph, and networkx Louvain on that 100,000-frame graph as
a baseline (Louvain has no size bound, so its community sizes are reported against max_cluster_frames).

Each variant runs in its own child process so that its peak RSS (VmHWM) is its own: the child loads the
saved graph (as the partition stage loads it from Zarr) and runs one method. Graph generation is timed apart.

    python benchmarks/partition.py                    # table
    python benchmarks/partition.py --json             # one JSON object per line
    python benchmarks/partition.py --frames 200000 --louvain-frames 20000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import peak_rss_bytes  # noqa: E402  (benchmarks/ is on sys.path when run as a script)




def _child(variant: str, path: str, args: argparse.Namespace) -> dict:
    from sparse_vggt.config import PartitionConfig

    data = np.load(path)
    indptr, indices, weights, comp = data["indptr"], data["indices"], data["weights"], data["component"]
    n = comp.size
    base = {"bench": "partition", "variant": variant, "frames": int(n), "k": args.k, "edges": int(indices.size // 2),
            "components": int(comp.max()) + 1, "largest_component": int(np.bincount(comp[comp >= 0]).max()),
            "max_cluster_frames": args.max_cluster_frames, "min_overlap_frames": args.min_overlap_frames,
            "cores": os.cpu_count()}
    cfg = PartitionConfig(max_cluster_frames=args.max_cluster_frames, min_overlap_frames=args.min_overlap_frames,
                          attention_neighbors=args.k)
    if variant == "metis":
        from sparse_vggt.partition import partition_graph

        t0 = time.perf_counter()
        clusters, rep = partition_graph(indptr, indices, weights, comp, cfg)
        secs = time.perf_counter() - t0
        big = rep["balance"][0] if rep["balance"] else {}
        return {**base, "seconds": round(secs, 2), "peak_bytes": peak_rss_bytes(),
                "metis_seconds": rep["metis_seconds"], "clusters": rep["clusters"], "cut_ratio": rep["cut_ratio"],
                "cluster_frames_max": rep["cluster_frames"]["max"], "cluster_frames_mean": rep["cluster_frames"]["mean"],
                "core_frames_min": rep["core_frames"]["min"], "core_frames_max": rep["core_frames"]["max"],
                "max_core_over_ideal": big.get("max_over_ideal"), "balance_tolerance": rep["balance_tolerance"],
                "parts_below_1_minus_tol": big.get("parts_below_1_minus_tol"),
                "overlap_median": rep["overlap_per_edge"]["median"], "overlap_min": rep["overlap_per_edge"]["min"],
                "touching_pairs": rep["overlap_per_edge"]["touching_pairs"],
                "pairs_below_min_boundary_limited": rep["overlap_per_edge"]["below_min_boundary_limited"],
                "pairs_below_min_capacity_limited": rep["overlap_per_edge"]["below_min_capacity_limited"],
                "bridged_pairs": rep["repair"]["bridged_pairs"], "cluster_graph_connected": rep["cluster_graph_connected"],
                "overlap_rows": rep["overlap_rows"], "singletons": rep["singletons"]}
    if variant == "stage":  # the full stage: read store.zarr/graph, partition, write tables/clusters.parquet
        from sparse_vggt.config import PipelineConfig
        from sparse_vggt.partition import run as partition_stage
        from sparse_vggt.store import RunStore

        pc = PipelineConfig()
        pc.partition = cfg
        with tempfile.TemporaryDirectory(prefix="partition_stage_") as tmp:
            store = RunStore.create_or_open(Path(tmp) / "run", pc)
            grp = store.group("graph")
            for name, arr in (("indptr", indptr), ("indices", indices), ("weights", weights), ("component", comp)):
                store.write_array(grp, name, arr, chunks=(min(1 << 20, max(1, arr.size)),))
            store.mark_unit_complete("graph")
            store.stage_finished("graph", {})
            del data, indptr, indices, weights, comp
            t0 = time.perf_counter()
            man = partition_stage(store.root, pc)
            secs = time.perf_counter() - t0
            size = store.table_path("clusters").stat().st_size
        return {**base, "seconds": round(secs, 2), "peak_bytes": peak_rss_bytes(), "clusters": man["clusters"],
                "cut_ratio": man["cut_ratio"], "cluster_frames_max": man["cluster_frames"]["max"],
                "max_core_over_ideal": man["balance"][0]["max_over_ideal"] if man["balance"] else None,
                "table_bytes": size}
    if variant == "louvain":
        import networkx as nx

        rows = np.repeat(np.arange(n), np.diff(indptr))
        up = rows < indices
        t0 = time.perf_counter()
        G = nx.Graph()
        G.add_nodes_from(np.flatnonzero(comp >= 0).tolist())
        G.add_weighted_edges_from(zip(rows[up].tolist(), indices[up].tolist(), weights[up].astype(float).tolist()))
        t_build = time.perf_counter() - t0
        comms = nx.community.louvain_communities(G, weight="weight", seed=args.seed)
        secs = time.perf_counter() - t0
        label = np.full(n, -1, np.int64)
        for i, c in enumerate(comms):
            label[list(c)] = i
        cross = label[rows] != label[indices]
        sizes = np.array([len(c) for c in comms])
        non_single = sizes[sizes > 1]
        return {**base, "seconds": round(secs, 2), "build_seconds": round(t_build, 2), "peak_bytes": peak_rss_bytes(),
                "clusters": int(len(comms)), "cut_ratio": round(float(weights[cross].sum() / weights.sum()), 6),
                "cluster_frames_max": int(sizes.max()), "cluster_frames_mean": round(float(non_single.mean()), 2),
                "communities_over_max_cluster_frames": int((sizes > args.max_cluster_frames).sum()),
                "max_over_mean": round(float(sizes.max() / non_single.mean()), 3)}
    raise SystemExit(f"unknown variant {variant}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--louvain-frames", type=int, default=100_000, help="0 = skip the Louvain baseline")
    ap.add_argument("--k", type=int, default=10, help="graph.retrieval_neighbors and partition.attention_neighbors")
    ap.add_argument("--max-cluster-frames", type=int, default=128)
    ap.add_argument("--min-overlap-frames", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--_child", nargs=2, metavar=("VARIANT", "NPZ"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(_child(args._child[0], args._child[1], args)))
        return

    from sparse_vggt.synthetic import synthetic_city_graph

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="partition_bench_") as tmp:
        jobs = [("metis", args.frames), ("stage", args.frames)]
        if args.louvain_frames:
            jobs += [("metis", args.louvain_frames), ("louvain", args.louvain_frames)]
        graphs: dict[int, tuple[str, float]] = {}
        for _, frames in jobs:
            if frames in graphs:
                continue
            t0 = time.perf_counter()
            g = synthetic_city_graph(frames, k=args.k, seed=args.seed)
            gen = time.perf_counter() - t0
            path = str(Path(tmp) / f"g{frames}.npz")
            np.savez(path, indptr=g[0], indices=g[1], weights=g[2], component=g[3])
            graphs[frames] = (path, gen)
            del g
        for variant, frames in jobs:
            path, gen = graphs[frames]
            cmd = [sys.executable, __file__, "--_child", variant, path, "--k", str(args.k), "--seed", str(args.seed),
                   "--max-cluster-frames", str(args.max_cluster_frames),
                   "--min-overlap-frames", str(args.min_overlap_frames)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["graph_gen_seconds"] = round(gen, 2)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if args.json:
        return
    ref = {r["frames"]: r for r in rows if r["variant"] == "metis"}
    for r in rows:
        r.setdefault("edges", 0)
    print(f"{'variant':8} {'frames':>9} {'edges':>9} {'seconds':>8} {'peak GB':>8} {'clusters':>8} {'cut ratio':>9} "
          f"{'max size':>8} {'balance':>8} {'vs metis':>8}")
    for r in rows:
        bal = r.get("max_core_over_ideal") or r.get("max_over_mean")
        rel = r["seconds"] / ref[r["frames"]]["seconds"] if r["frames"] in ref else float("nan")
        print(f"{r['variant']:8} {r['frames']:>9} {r['edges']:>9} {r['seconds']:>8.2f} {r['peak_bytes'] / 2**30:>8.2f} "
              f"{r['clusters']:>8} {r['cut_ratio']:>9.4f} {r['cluster_frames_max']:>8} {bal:>8} {rel:>7.1f}x")
    print("balance: metis = max core / ideal core of the largest component (bound 1 + balance_tolerance); "
          "louvain = largest community / mean community size (no bound).")


if __name__ == "__main__":
    main()
