"""The graph stage (`sparse-vggt graph`): which photos probably see the same place.

Reads ``store.zarr/descriptors`` (N_rows, D) for the ``ok`` rows of ``images.parquet`` and writes a symmetric CSR
graph to ``store.zarr/graph`` (indptr, indices, weights, edge_source, component; see ``csr.py``).

Why this shape: at city scale N is 10^5-10^6, so an N x N similarity matrix (10^10-10^12 entries) can never exist.
Candidate search runs on a reduced projection (PCA fitted on a sample; or faiss HNSW over the same projection),
block by block, keeping only the best ``candidates`` per query; those candidates are then re-ranked by the exact
cosine on the full descriptors. Descriptors are cached in RAM as fp16 when they fit ``graph.memory_mb``,
otherwise streamed from Zarr in super-blocks. ``graph.method=auto`` takes the exact search wherever a cost model
fitted to benchmarks/graph.py predicts it is not slower (~13k images at D=8448). Recall against exact search is
measured on a sample of queries for every method and recorded; below ``graph.min_recall`` it is a WARNING in the
log, the manifest and report.md, so an approximate search never silently degrades the graph.

Edges come from retrieval (kNN by cosine, optional similarity threshold and mutual-kNN, union symmetrisation),
plus priors where metadata exists: sequence neighbours (capture time, else file order) and GPS neighbours within
a radius. Pairs whose GPS positions are farther apart than ``gps_max_distance_m`` are dropped whatever their
similarity. Optional geometric verification (SIFT/ORB + RANSAC fundamental matrix, a process pool over pairs)
removes failed pairs and weights verified ones by their inlier count. Components are reported, never joined.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import PipelineConfig
from ..store import RunStore
from .csr import (
    SRC_GPS, SRC_RETRIEVAL, SRC_SEQUENCE, SRC_VERIFIED, components, degree_stats, knn_pairs, to_csr, write_graph,
)
from .knn import knn
from .priors import float_col, gps_distance, gps_pairs, sequence_order, sequence_pairs
from .recall import measure_recall
from .source import DescriptorSource, GraphError, pair_similarity
from .verify import verify_pairs

log = logging.getLogger(__name__)


def _descriptors_version(store: RunStore) -> str | None:
    """Changes whenever describe rewrites the descriptors, so a stale graph is never reused."""
    return store.zarr["descriptors"].attrs.get("version") if "descriptors" in store.zarr else None


def run(run_dir: Path, config: PipelineConfig | None = None, *, force: bool = False,
        units: Sequence[Any] | None = None) -> dict[str, Any]:
    """The graph stage: kNN + priors (+ verification) -> symmetric CSR and components in store.zarr/graph.

    ``config`` defaults to the run's recorded config; ``force`` rebuilds even a complete graph with the same
    settings. The graph is one unit (it is built over all images at once), so ``units`` must be None.
    """
    if units is not None:
        raise ValueError(f"the graph stage has no units to select (got units={units!r}): it is built over all "
                         "images at once; pass units=None")
    t0 = time.perf_counter()
    store = RunStore.open(run_dir)
    config = config or store.config()
    cfg = config.graph
    settings = config.result_affecting()["graph"]
    if (not force and store.is_stage_complete("graph") and store.is_unit_complete("graph")
            and store.zarr["graph"].attrs.get("config") == settings
            and store.zarr["graph"].attrs.get("descriptors_version") == _descriptors_version(store)):
        log.info("graph stage already finished in %s with the same settings; nothing to do", store.root)
        return store.stage_manifest("graph")
    store.require_stage("describe", "graph")
    if cfg.retrieval_neighbors < 0:
        raise GraphError(f"graph.retrieval_neighbors={cfg.retrieval_neighbors} must be >= 0")
    table = store.read_table("images")
    status = np.array(table.column("status").to_pylist(), dtype=object)
    n_rows = len(status)
    ok_rows = np.flatnonzero(status == "ok").astype(np.int64)
    if ok_rows.size == 0:
        raise GraphError(f"{store.root}: zero kept images (all {n_rows} were skipped at scan); nothing to "
                         "connect. Check `sparse-vggt status` / images.parquet status column.")
    if "descriptors" not in store.zarr:
        raise GraphError(f"{store.root}: store.zarr/descriptors is missing; run `sparse-vggt describe` first.")
    arr = store.zarr["descriptors"]
    if arr.shape[0] != n_rows:
        raise GraphError(f"store.zarr/descriptors has {arr.shape[0]} rows but images.parquet has {n_rows}; "
                         "re-run `sparse-vggt describe --force`.")
    names = table.column("path").to_pylist()
    store.stage_started("graph")
    ok_names = [names[r] for r in ok_rows]
    timings: dict[str, float] = {}
    t_read = time.perf_counter()
    src = DescriptorSource(arr, ok_rows, memory_bytes=cfg.memory_mb << 20, names=ok_names,
                           read_rows=max(cfg.block_size, 1))
    timings["read_check"] = round(time.perf_counter() - t_read, 2)
    n = src.n
    k = cfg.retrieval_neighbors
    warnings: list[str] = []
    if k >= n:
        msg = (f"graph.retrieval_neighbors={cfg.retrieval_neighbors} >= number of kept images {n}: clamped to "
               f"k={n - 1} (every image links to all)")
        log.warning(msg)
        warnings.append(msg)
        k = n - 1
    priors: list[str] = []

    # retrieval
    recall = float("nan")
    method = "none"
    if k > 0:
        idx, sim, method = knn(src, k, cfg, timings)
        # every method is checked (exact too: a cheap self-check) so a degraded graph never goes unnoticed
        t_rec = time.perf_counter()
        recall = measure_recall(src, idx, k, cfg.recall_sample, cfg.block_size, cfg.seed)
        timings["recall_check"] = round(time.perf_counter() - t_rec, 2)
        if not math.isnan(recall) and recall < cfg.min_recall:
            msg = (f"{method} kNN recall@{k} = {recall:.3f} on {min(cfg.recall_sample, n)} sampled queries is below "
                   f"graph.min_recall = {cfg.min_recall}: covisible pairs are missing from the graph. Use "
                   "graph.method=exact (O(n^2 D) time) or raise graph.candidates / graph.pca_dim.")
            log.warning(msg)
            warnings.append(msg)
        else:
            log.info("%s kNN recall@%d vs exact on %d queries: %.4f", method, k, min(cfg.recall_sample, n), recall)
        ra, rb, rs = knn_pairs(idx, sim, cfg.min_similarity, cfg.mutual)
    else:
        ra = rb = np.zeros(0, np.int64)
        rs = np.zeros(0, np.float32)
    parts_a, parts_b, parts_src = [ra], [rb], [np.full(ra.size, SRC_RETRIEVAL, np.uint8)]

    # priors
    lat = float_col(table, "gps_lat", ok_rows)
    lon = float_col(table, "gps_lon", ok_rows)
    seq_basis = None
    if cfg.sequence_neighbors > 0:
        order, seq_basis = sequence_order(table, ok_rows)
        sa, sb = sequence_pairs(order, cfg.sequence_neighbors)
        parts_a.append(sa), parts_b.append(sb), parts_src.append(np.full(sa.size, SRC_SEQUENCE, np.uint8))
        priors.append(f"sequence:{cfg.sequence_neighbors}:{seq_basis}")
    n_gps = int((np.isfinite(lat) & np.isfinite(lon)).sum())
    if cfg.gps_radius_m > 0:
        ga, gb = gps_pairs(lat, lon, cfg.gps_radius_m, cfg.gps_neighbors)
        parts_a.append(ga), parts_b.append(gb), parts_src.append(np.full(ga.size, SRC_GPS, np.uint8))
        priors.append(f"gps_radius:{cfg.gps_radius_m}m")
    a = np.concatenate(parts_a)
    b = np.concatenate(parts_b)
    bits = np.concatenate(parts_src)
    key = a * n + b
    uniq, inv = np.unique(key, return_inverse=True)
    merged_bits = np.zeros(uniq.size, np.uint8)
    np.bitwise_or.at(merged_bits, inv, bits)
    a, b, bits = uniq // n, uniq % n, merged_bits
    # cosine weight for every pair (retrieval pairs already have it; priors get it computed exactly)
    w = np.empty(a.size, np.float32)
    rkey = ra * n + rb
    pos = np.searchsorted(uniq, rkey)
    w[pos] = rs
    need = (bits & SRC_RETRIEVAL) == 0
    if need.any():
        w[need] = pair_similarity(src, a[need], b[need])
    dropped_gps = 0
    if cfg.gps_max_distance_m > 0:
        d = gps_distance(lat, lon, a, b)
        far = np.isfinite(d) & (d > cfg.gps_max_distance_m)
        dropped_gps = int(far.sum())
        a, b, w, bits = a[~far], b[~far], w[~far], bits[~far]
        priors.append(f"gps_max_distance:{cfg.gps_max_distance_m}m")
    candidates_pairs = int(a.size)

    verify_info: dict[str, Any] = {}
    weight_kind = "cosine"
    if cfg.verify and a.size:
        root = table.schema.metadata.get(b"photos_root") if table.schema.metadata else None
        if root is None:
            raise GraphError("images.parquet has no photos_root metadata; graph.verify needs the photos. "
                             "Re-run `sparse-vggt scan`, or set graph.verify=false.")
        inl = verify_pairs(Path(root.decode()), ok_names, a, b, cfg)
        ok = inl >= cfg.verify_min_inliers
        verify_info = {"pairs_checked": int(a.size), "pairs_verified": int(ok.sum()),
                       "pairs_unreadable": int((inl < 0).sum()),
                       "median_inliers_verified": float(np.median(inl[ok])) if ok.any() else 0.0}
        a, b, w, bits = a[ok], b[ok], inl[ok].astype(np.float32), bits[ok] | SRC_VERIFIED
        weight_kind = "inliers"
        priors.append(f"verified:{cfg.verify_features}>={cfg.verify_min_inliers}")

    ga_, gb_ = ok_rows[a], ok_rows[b]
    indptr, indices, weights, edge_src = to_csr(n_rows, ga_, gb_, w, bits)
    comp = components(n_rows, ok_rows, indptr, indices)
    sizes = np.bincount(comp[ok_rows]) if n else np.zeros(0, np.int64)

    write_graph(store, indptr, indices, weights, edge_src, comp)
    manifest: dict[str, Any] = {
        "images": int(n), "rows": int(n_rows), "method": method, "k": int(k),
        "k_requested": int(cfg.retrieval_neighbors),
        "mutual": bool(cfg.mutual), "min_similarity": float(cfg.min_similarity),
        "recall_at_k": None if math.isnan(recall) else round(recall, 4),
        "recall_sample": int(min(cfg.recall_sample, n)) if method != "none" and not math.isnan(recall) else 0,
        "min_recall": float(cfg.min_recall),
        "recall_ok": None if math.isnan(recall) else bool(recall >= cfg.min_recall),
        "candidate_pairs": candidates_pairs, "edges": int(indices.size // 2), "weights": weight_kind,
        "priors": priors, "images_with_gps": n_gps, "pairs_dropped_by_gps": dropped_gps,
        "degree": degree_stats(indptr, ok_rows), "components": int(sizes.size),
        "largest_component": int(sizes.max()) if sizes.size else 0,
        "singleton_components": int((sizes == 1).sum()),
        "component_sizes_top": [int(s) for s in sizes[:10]],
        "seconds": round(time.perf_counter() - t0, 2), "timings": timings, "warnings": warnings,
    }
    if verify_info:
        manifest["verification"] = verify_info
    store.mark_unit_complete("graph", config=settings, descriptors_version=_descriptors_version(store),
                             method=method, k=int(k), priors=priors, weights=weight_kind,
                             mutual=bool(cfg.mutual), min_similarity=float(cfg.min_similarity),
                             recall_at_k=manifest["recall_at_k"], recall_ok=manifest["recall_ok"],
                             edge_source_bits={"retrieval": SRC_RETRIEVAL, "sequence": SRC_SEQUENCE,
                                               "gps": SRC_GPS, "verified": SRC_VERIFIED})
    store.stage_finished("graph", manifest)
    log.info("graph: %d images, %d edges, %d components (largest %d)", n, manifest["edges"],
             manifest["components"], manifest["largest_component"])
    return manifest
