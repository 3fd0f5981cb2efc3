"""Partition the covisibility graph into connected, overlapping, bounded clusters (`sparse-vggt partition`)."""

from .stage import *  # noqa: F401,F403  (transitional: the module becomes a package)
from .stage import (  # noqa: F401
    Clusters, PartitionConfigError, PartitionError, cluster_pairs, partition, partition_graph,
    resolve_max_cluster_frames, split_cluster, split_clusters_in_memory, split_depths, symmetric_csr_with_components,
    synthetic_city_graph, validate_config,
)
