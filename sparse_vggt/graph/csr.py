"""The graph as stored: undirected pairs -> symmetric CSR over all image rows, components, and the Zarr layout.

``store.zarr/graph`` holds ``indptr`` (N_rows + 1), ``indices``, ``weights`` (cosine or RANSAC inliers),
``edge_source`` (bit set of the ``SRC_*`` flags below, per directed entry) and ``component`` (per row; 0 = the
largest, -1 = not a kept image). Rows are image ids, so skipped images are rows without edges. Partition and
export read these arrays; their names and dtypes are the on-disk contract.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from ..store import RunStore

# bits of graph/edge_source
SRC_RETRIEVAL, SRC_SEQUENCE, SRC_GPS, SRC_VERIFIED = 1, 2, 4, 8


def knn_pairs(idx: np.ndarray, sim: np.ndarray, min_similarity: float, mutual: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected (i < j) retrieval pairs with their cosine; union symmetrisation unless ``mutual``."""
    n, k = idx.shape
    qi = np.repeat(np.arange(n, dtype=np.int64), k)
    qj = idx.reshape(-1).astype(np.int64)
    qs = sim.reshape(-1)
    keep = np.isfinite(qs) & (qs >= min_similarity) & (qj != qi)
    qi, qj, qs = qi[keep], qj[keep], qs[keep]
    a, b = np.minimum(qi, qj), np.maximum(qi, qj)
    key = a * n + b
    uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
    if mutual:
        sel = counts >= 2  # found from both ends
        uniq, first = uniq[sel], first[sel]
    return a[first], b[first], qs[first].astype(np.float32)


def to_csr(n_rows: int, a: np.ndarray, b: np.ndarray, w: np.ndarray, src_bits: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric CSR (indptr, indices, weights, edge_source) over all rows from undirected pairs a < b."""
    rows = np.concatenate([a, b])
    cols = np.concatenate([b, a])
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    ww = np.concatenate([w, w])[order].astype(np.float32)
    ss = np.concatenate([src_bits, src_bits])[order].astype(np.uint8)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(indptr, rows + 1, 1)
    return np.cumsum(indptr), cols.astype(np.int64), ww, ss


def components(n_rows: int, ok_rows: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Connected-component id per row (0 = largest), -1 for rows that are not ok."""
    mat = sp.csr_matrix((np.ones(indices.size, np.int8), indices, indptr), shape=(n_rows, n_rows))
    sub = mat[ok_rows][:, ok_rows]
    ncomp, lab = connected_components(sub, directed=False)
    sizes = np.bincount(lab, minlength=ncomp)
    rank = np.empty(ncomp, dtype=np.int64)
    # largest first; ties by smallest member for determinism
    first = np.full(ncomp, np.iinfo(np.int64).max)
    np.minimum.at(first, lab, np.arange(lab.size))
    rank[np.lexsort((first, -sizes))] = np.arange(ncomp)
    out = np.full(n_rows, -1, dtype=np.int64)
    out[ok_rows] = rank[lab]
    return out


def degree_stats(indptr: np.ndarray, ok_rows: np.ndarray) -> dict[str, float]:
    """Degree summary of the kept images, for the manifest."""
    deg = np.diff(indptr)[ok_rows]
    if deg.size == 0:
        return {"min": 0, "mean": 0.0, "median": 0.0, "max": 0, "isolated": 0}
    return {"min": int(deg.min()), "mean": round(float(deg.mean()), 3), "median": float(np.median(deg)),
            "max": int(deg.max()), "isolated": int((deg == 0).sum())}


def write_graph(store: RunStore, indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray,
                edge_source: np.ndarray, component: np.ndarray) -> None:
    """Replace ``store.zarr/graph`` with these arrays (chunks of at most 2^20 entries).

    The caller marks the group complete afterwards, with the attributes that say how the graph was built.
    """
    store.remove_group("graph")
    grp = store.group("graph")
    chunk = max(1, min(1 << 20, max(indices.size, 1)))
    store.write_array(grp, "indptr", indptr, chunks=(min(1 << 20, indptr.size),))
    store.write_array(grp, "indices", indices, chunks=(chunk,))
    store.write_array(grp, "weights", weights, chunks=(chunk,))
    store.write_array(grp, "edge_source", edge_source, chunks=(chunk,))
    store.write_array(grp, "component", component, chunks=(min(1 << 20, component.size),))
