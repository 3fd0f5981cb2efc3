"""The partition's result type and errors: one row per (cluster, frame), as stored in clusters.parquet.

:class:`Clusters` holds the rows column-wise (numpy) with the neighbour lists as CSR, so every other module of
the partitioner can build, select and concatenate rows without going through pyarrow; ``to_table`` and
``from_table`` are the only places that know the parquet schema. The two small index helpers live here because
the row selection needs them and so do the vectorised overlap and ordering steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import ConfigError


class PartitionError(ValueError):
    """The graph or the config cannot be partitioned; the message says what to fix."""


class PartitionConfigError(PartitionError, ConfigError):
    """A partition setting that can never give bounded, overlapping clusters: a usage error (CLI exit code 2)."""


@dataclass
class Clusters:
    """Rows of clusters.parquet, sorted by (cluster_id, position); neighbours as CSR (offsets, values)."""

    cluster_id: np.ndarray
    image_id: np.ndarray
    core: np.ndarray  # bool: role == "core"
    component_id: np.ndarray
    position: np.ndarray
    nbr_offsets: np.ndarray  # (rows + 1,)
    nbr_values: np.ndarray  # image ids

    def __len__(self) -> int:
        return int(self.cluster_id.size)

    @property
    def n_clusters(self) -> int:
        return int(np.unique(self.cluster_id).size)

    def neighbors(self, row: int) -> np.ndarray:
        return self.nbr_values[self.nbr_offsets[row]:self.nbr_offsets[row + 1]]

    def to_table(self, metadata: dict[str, Any] | None = None) -> pa.Table:
        if self.nbr_values.size >= 2**31:
            raise PartitionError("too many neighbour entries for one table; lower partition.attention_neighbors")
        nbrs = pa.ListArray.from_arrays(pa.array(self.nbr_offsets.astype(np.int32)),
                                        pa.array(self.nbr_values.astype(np.int64), type=pa.int64()))
        role = pa.DictionaryArray.from_arrays(pa.array(np.where(self.core, 0, 1).astype(np.int8)),
                                              pa.array(["core", "overlap"])).cast(pa.string())
        table = pa.table({
            "cluster_id": pa.array(self.cluster_id.astype(np.int64)),
            "image_id": pa.array(self.image_id.astype(np.int64)),
            "role": role,
            "component_id": pa.array(self.component_id.astype(np.int64)),
            "position": pa.array(self.position.astype(np.int64)),
            "neighbors": nbrs,
        })
        if metadata:
            table = table.replace_schema_metadata({b"partition": json.dumps(metadata).encode()})
        return table

    @classmethod
    def from_table(cls, table: pa.Table) -> "Clusters":
        need = {"cluster_id", "image_id", "role", "component_id", "position", "neighbors"}
        missing = need - set(table.column_names)
        if missing:
            raise PartitionError(f"clusters table lacks columns {sorted(missing)}; re-run `sparse-vggt partition`")
        nb = table.column("neighbors").combine_chunks()
        if isinstance(nb, pa.ChunkedArray):  # pragma: no cover - pyarrow versions differ
            nb = nb.chunk(0)
        offsets = np.asarray(nb.offsets.to_numpy(), dtype=np.int64)
        values = np.asarray(nb.values.to_numpy(), dtype=np.int64)
        values = values[offsets[0]:offsets[-1]]
        offsets = offsets - offsets[0]
        return cls(
            cluster_id=table.column("cluster_id").to_numpy().astype(np.int64),
            image_id=table.column("image_id").to_numpy().astype(np.int64),
            core=np.asarray(table.column("role").to_numpy(zero_copy_only=False) == "core"),
            component_id=table.column("component_id").to_numpy().astype(np.int64),
            position=table.column("position").to_numpy().astype(np.int64),
            nbr_offsets=offsets, nbr_values=values,
        )

    def select(self, rows: np.ndarray) -> "Clusters":
        """The given rows (in that order), neighbour lists carried along."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = np.diff(self.nbr_offsets)[rows]
        offsets = np.zeros(rows.size + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        values = self.nbr_values[ranges(self.nbr_offsets[rows], lens)]
        return Clusters(self.cluster_id[rows], self.image_id[rows], self.core[rows], self.component_id[rows],
                        self.position[rows], offsets, values)

    @staticmethod
    def concat(parts: list["Clusters"]) -> "Clusters":
        offs, base = [np.zeros(1, np.int64)], 0
        for p in parts:
            offs.append(p.nbr_offsets[1:] + base)
            base += int(p.nbr_offsets[-1])
        return Clusters(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                          ("cluster_id", "image_id", "core", "component_id", "position")),
                        np.concatenate(offs), np.concatenate([p.nbr_values for p in parts]))


# ---------------------------------------------------------------------------------------------------------------
# small vectorised helpers
# ---------------------------------------------------------------------------------------------------------------
def ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for each (s, l), without a Python loop."""
    lens = np.asarray(lens, dtype=np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(lens)
    offs = np.arange(total, dtype=np.int64) - np.repeat(ends - lens, lens)
    return np.repeat(np.asarray(starts, dtype=np.int64), lens) + offs


def group_rank(keys_sorted: np.ndarray) -> np.ndarray:
    """Rank of each element within its run of equal keys (keys already sorted)."""
    n = keys_sorted.size
    if n == 0:
        return np.zeros(0, np.int64)
    start = np.flatnonzero(np.r_[True, keys_sorted[1:] != keys_sorted[:-1]])
    return np.arange(n, dtype=np.int64) - np.repeat(start, np.diff(np.r_[start, n]))
