"""The partitioner's input: the covisibility graph read from ``store.zarr/graph`` and checked.

The graph stage writes a symmetric CSR plus component ids; a stale or hand-edited store must fail with a message
that says which array is wrong and how to rebuild it, not with a METIS crash. Self loops and edges to excluded
images are dropped with a warning that ends up in the partition report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from ..store import RunStore
from .clusters import PartitionError


@dataclass
class Graph:
    n: int
    A: sp.csr_matrix  # symmetric, float64, no self loops, only kept rows have edges
    component: np.ndarray  # int64, -1 = excluded
    warnings: list[str] = field(default_factory=list)


def load_graph(indptr: Any, indices: Any, weights: Any, component: Any) -> Graph:
    component = np.asarray(component)
    if component.ndim != 1:
        raise PartitionError(f"graph/component must be 1-D, got shape {component.shape}")
    if component.size and not np.issubdtype(component.dtype, np.integer):
        raise PartitionError(f"graph/component must be integers, got {component.dtype}")
    component = component.astype(np.int64)
    n = component.size
    indptr = np.asarray(indptr).astype(np.int64)
    indices = np.asarray(indices).astype(np.int64)
    weights = np.asarray(weights).astype(np.float64)
    rerun = "Re-run `sparse-vggt graph RUN --force`."
    if indptr.shape != (n + 1,):
        raise PartitionError(f"graph/indptr has {indptr.size} entries, expected {n + 1} (component has {n} rows). "
                             + rerun)
    if indptr[0] != 0 or (n and np.any(np.diff(indptr) < 0)) or indptr[-1] != indices.size:
        raise PartitionError("graph/indptr is not a valid CSR row pointer (must start at 0, never decrease and "
                             f"end at len(indices)={indices.size}). " + rerun)
    if weights.shape != indices.shape:
        raise PartitionError(f"graph/weights has {weights.size} entries but indices has {indices.size}. " + rerun)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise PartitionError(f"graph/indices out of range [0, {n}). " + rerun)
    if not np.all(np.isfinite(weights)):
        raise PartitionError(f"graph/weights has {int((~np.isfinite(weights)).sum())} non-finite values. " + rerun)
    warnings: list[str] = []
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    keep = rows != indices
    if not keep.all():
        warnings.append(f"dropped {int((~keep).sum())} self-loop entries")
    excl = (component[rows] < 0) | (component[indices] < 0)
    if (excl & keep).any():
        warnings.append(f"dropped {int((excl & keep).sum())} edge entries touching excluded images (component -1)")
    keep &= ~excl
    rows, cols, w = rows[keep], indices[keep], weights[keep]
    del keep, excl
    if (component[rows] != component[cols]).any():
        bad = int((component[rows] != component[cols]).sum())
        raise PartitionError(f"{bad} graph edges join different components: graph/component is inconsistent with "
                             "the edges. " + rerun)
    key = rows * n + cols
    order = np.argsort(key, kind="stable")
    key_s = key[order]
    if key_s.size and (np.diff(key_s) == 0).any():
        raise PartitionError("graph has duplicate (row, column) entries. " + rerun)
    key_t = np.sort(cols * n + rows)
    if not np.array_equal(key_s, key_t):
        raise PartitionError("graph is not symmetric (some edge i->j has no j->i): the covisibility graph must be "
                             "undirected. " + rerun)
    del key, key_s, key_t
    A = sp.csr_matrix((w, (rows, cols)), shape=(n, n))
    A.sort_indices()
    asym = abs(A - A.T)
    if asym.nnz and asym.max() > 1e-6 * max(1.0, float(np.abs(A.data).max(initial=0.0))):
        warnings.append("edge weights were not symmetric; used the mean of both directions")
        A = ((A + A.T) * 0.5).tocsr()
        A.sort_indices()
    # every labelled component must be connected by the edges
    kept = np.flatnonzero(component >= 0)
    if kept.size:
        sub = A[kept][:, kept]
        ncomp, lab = connected_components(sub, directed=False)
        pairs = np.unique(component[kept] * (ncomp + 1) + lab)
        if pairs.size != np.unique(component[kept]).size:
            raise PartitionError("a graph/component label covers frames that the edges do not connect "
                                 "(component ids are stale). " + rerun)
    return Graph(n=n, A=A, component=component, warnings=warnings)


def read_graph(store: RunStore) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if "graph" not in store.zarr:
        raise PartitionError(f"{store.root}: store.zarr/graph is missing; run `sparse-vggt graph {store.root}`.")
    grp = store.zarr["graph"]
    missing = [a for a in ("indptr", "indices", "weights", "component") if a not in grp]
    if missing:
        raise PartitionError(f"store.zarr/graph lacks {missing}; re-run `sparse-vggt graph {store.root} --force`.")
    return tuple(np.asarray(grp[a][...]) for a in ("indptr", "indices", "weights", "component"))  # type: ignore
