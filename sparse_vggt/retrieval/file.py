"""Bring-your-own retrieval descriptors: a file of vectors keyed by image path, instead of a model.

Formats: .npy (+ ``<stem>.txt`` names, one per line), .npz with ``names`` and ``descriptors`` arrays, or
Parquet with a name column (name|path|image) and a list-of-float column (descriptor|vector|embedding). Names
are paths relative to the photos root, as in images.parquet's ``path`` column (a duplicate's path matches
too). Vectors are checked (finite, non-zero) and unit-normalised.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import DescribeError, DescribeInputs, Retrieval

log = logging.getLogger(__name__)


def load_descriptor_file(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(names, vectors float32 (n, D)) from .npy (+ ``<stem>.txt`` names), .npz or .parquet."""
    path = Path(path)
    if not path.is_file():
        raise DescribeError(f"descriptor file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        names_file = path.with_suffix(".txt")
        if not names_file.is_file():
            raise DescribeError(f"{path}: a .npy file needs its image names, one per line, in {names_file}")
        vectors = np.load(path, allow_pickle=False)
        names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "names" not in data:
                raise DescribeError(f"{path}: an .npz needs a 'names' array (image paths) and a 'descriptors' array")
            key = "descriptors" if "descriptors" in data else next(
                (k for k in data.files if k != "names" and data[k].ndim == 2), None)
            if key is None:
                raise DescribeError(f"{path}: no 2-D descriptor array found (expected key 'descriptors')")
            names = [str(n) for n in data["names"].tolist()]
            vectors = data[key]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        name_col = next((c for c in ("name", "path", "image") if c in table.column_names), None)
        vec_col = next((c for c in ("descriptor", "vector", "embedding") if c in table.column_names), None)
        if name_col is None or vec_col is None:
            raise DescribeError(f"{path}: Parquet needs a name column (name|path|image) and a list-of-float "
                                f"column (descriptor|vector|embedding); found {table.column_names}")
        names = [str(n) for n in table.column(name_col).to_pylist()]
        col = table.column(vec_col).combine_chunks()
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
                or pa.types.is_fixed_size_list(col.type)):
            raise DescribeError(f"{path}: column {vec_col!r} must be a list of numbers, got {col.type}")
        if col.null_count:
            raise DescribeError(f"{path}: {col.null_count} image(s) have a null descriptor in {vec_col!r}")
        import pyarrow.compute as pc

        lengths = np.unique(np.asarray(pc.list_value_length(col))) if len(col) else np.array([0])
        if lengths.size != 1:
            raise DescribeError(f"{path}: descriptors in {vec_col!r} have different lengths {lengths[:5].tolist()}; "
                                "every image needs a vector of the same dimension")
        vectors = np.asarray(col.flatten(), dtype=np.float32).reshape(len(col), int(lengths[0]))
    else:
        raise DescribeError(f"{path}: unsupported descriptor file type {suffix!r}; use .npy (+ .txt names), "
                            ".npz or .parquet")
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.number):
        raise DescribeError(f"{path}: descriptors must be a 2-D numeric array (n_images, dim), got shape "
                            f"{vectors.shape} dtype {vectors.dtype}")
    if len(names) != vectors.shape[0]:
        raise DescribeError(f"{path}: {len(names)} names but {vectors.shape[0]} descriptor rows")
    if len(set(names)) != len(names):
        raise DescribeError(f"{path}: image names are not unique")
    return [n.strip().lstrip("./") if n.startswith("./") else n.strip() for n in names], vectors.astype(np.float32)


def match_rows(table: pa.Table, rows: np.ndarray, names: list[str], vectors: np.ndarray, source: str
                ) -> np.ndarray:
    """Vectors for the given ok rows, matched by path (or a duplicate's path), unit-normalised."""
    paths = table.column("path").to_pylist()
    dups = table.column("duplicates").to_pylist() if "duplicates" in table.column_names else [None] * len(paths)
    index = {n: i for i, n in enumerate(names)}
    out = np.empty((rows.size, vectors.shape[1]), np.float32)
    missing = []
    for o, r in enumerate(rows):
        hit = index.get(paths[r])
        if hit is None:
            hit = next((index[d] for d in (dups[r] or []) if d in index), None)
        if hit is None:
            missing.append(paths[r])
            continue
        out[o] = vectors[hit]
    if missing:
        raise DescribeError(f"{source} has no descriptor for {len(missing)} kept image(s), e.g. "
                            f"{', '.join(missing[:5])}. Names must be paths relative to the photos root, as in "
                            "images.parquet's path column.")
    bad = ~np.isfinite(out).all(1)
    if bad.any():
        raise DescribeError(f"{source}: NaN/Inf descriptors for {int(bad.sum())} image(s), e.g. "
                            f"{', '.join(paths[r] for r in rows[bad][:5])}")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    if np.any(norms <= 1e-12):
        raise DescribeError(f"{source}: all-zero descriptors for "
                            f"{', '.join(paths[r] for r in rows[(norms[:, 0] <= 1e-12)][:5])}")
    return out / norms  # cosine only needs directions; unit norm keeps fp16 storage in range


class FileDescriptors:
    """Descriptors of ``describe.descriptors_file``, matched to the kept rows once, at build time."""

    def __init__(self, inputs: DescribeInputs):
        path = inputs.config.describe.descriptors_file
        if not path:
            raise DescribeError("describe.descriptor='file' needs describe.descriptors_file (a .npy, .npz or "
                                ".parquet of vectors keyed by image path)")
        names, vectors = load_descriptor_file(path)
        vec = match_rows(inputs.table, inputs.rows, names, vectors, path)
        extra = len(names) - inputs.rows.size
        if extra > 0:
            log.info("%s: %d names do not match a kept image and are ignored", path, extra)
        self._pos = {int(r): i for i, r in enumerate(inputs.rows)}
        self._vectors = vec
        self.dim = int(vectors.shape[1])
        self.model_id = f"file:{Path(path).name}"
        self.weights: dict[str, Any] = {"weights": "file", "file": str(path)}

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return self._vectors[[self._pos[int(r)] for r in rows]]

    def manifest(self, images: int, seconds: float) -> dict[str, Any]:
        return {}


ENTRY = Retrieval("file", FileDescriptors, eager=True)
