"""Partition the covisibility graph into connected, overlapping, bounded clusters (`sparse-vggt partition`).

One idea per module: ``clusters`` (the result rows and errors), ``limits`` (auto cluster size, config checks),
``load`` (reading and checking the graph), ``cut`` (METIS, repair, core cap), ``overlap`` (shared frames and
bridging), ``order`` (reference frame, frame order, attention neighbours), ``report``, ``algorithm`` (the steps
end to end), ``stage`` (run directory in, clusters.parquet out) and ``split`` (the out-of-memory fallback).
"""

from .algorithm import partition_graph
from .clusters import Clusters, PartitionConfigError, PartitionError
from .limits import resolve_max_cluster_frames, validate_config
from .split import split_cluster, split_clusters_in_memory, split_depths
from .stage import run

__all__ = [
    "Clusters", "PartitionConfigError", "PartitionError", "partition_graph",
    "resolve_max_cluster_frames", "run", "split_cluster", "split_clusters_in_memory", "split_depths",
    "validate_config",
]
