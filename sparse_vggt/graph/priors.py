"""Priors: pairs that metadata suggests, whatever the descriptors say.

Sequence neighbours (capture time, else file order) link photos taken one after another; GPS neighbours link
photos taken close together; the GPS distance of a pair also lets the stage drop pairs that look alike but are
too far apart. Indices are local (0..n-1 of the kept images).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_EARTH_RADIUS_M = 6_371_008.8


def sequence_order(table: pa.Table, ok_rows: np.ndarray) -> tuple[np.ndarray, str]:
    """Kept images in capture order when every one has a timestamp, else in file order; returns (order, basis)."""
    names = table.column("path").to_pylist()
    ts = table.column("timestamp") if "timestamp" in table.column_names else None
    if ts is not None:
        vals = ts.to_pylist()
        sub = [vals[r] for r in ok_rows]
        if sub and all(v is not None for v in sub):
            keys = [(v, names[r]) for v, r in zip(sub, ok_rows)]
            return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64), "capture_time"
    keys = [names[r] for r in ok_rows]
    return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64), "file_order"


def float_col(table: pa.Table, name: str, rows: np.ndarray) -> np.ndarray:
    """A float column at ``rows``, NaN where missing (all NaN when the table has no such column)."""
    if name not in table.column_names:
        return np.full(rows.size, np.nan)
    col = table.column(name).to_numpy(zero_copy_only=False)
    return np.asarray(col, dtype=np.float64)[rows]


def sequence_pairs(order: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image linked to the next ``window`` images of ``order`` (local indices)."""
    if window <= 0 or order.size < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a, b = [], []
    for w in range(1, window + 1):
        a.append(order[:-w])
        b.append(order[w:])
    a_, b_ = np.concatenate(a), np.concatenate(b)
    return np.minimum(a_, b_), np.maximum(a_, b_)


def _ecef(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return _EARTH_RADIUS_M * np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], 1)


def gps_pairs(lat: np.ndarray, lon: np.ndarray, radius_m: float, max_neighbors: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of images with GPS within ``radius_m`` (chord distance; at most ``max_neighbors`` per image)."""
    from scipy.spatial import cKDTree

    has = np.flatnonzero(np.isfinite(lat) & np.isfinite(lon))
    if radius_m <= 0 or has.size < 2 or max_neighbors <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    xyz = _ecef(lat[has], lon[has])
    tree = cKDTree(xyz)
    kq = min(max_neighbors + 1, has.size)
    dist, nb = tree.query(xyz, k=kq, distance_upper_bound=radius_m)
    dist, nb = dist.reshape(has.size, kq), nb.reshape(has.size, kq)
    rows = np.repeat(np.arange(has.size), kq)
    ok = np.isfinite(dist.reshape(-1)) & (nb.reshape(-1) != rows) & (nb.reshape(-1) < has.size)
    a = has[rows[ok]]
    b = has[nb.reshape(-1)[ok]]
    return np.minimum(a, b), np.maximum(a, b)


def gps_distance(lat: np.ndarray, lon: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Great-circle-ish (chord) distance in metres; NaN where either image has no GPS."""
    pa_, pb_ = _ecef(lat[a], lon[a]), _ecef(lat[b], lon[b])
    return np.linalg.norm(pa_ - pb_, axis=1)


