"""Merge (`sparse-vggt merge`): cluster reconstructions -> one Sim(3)-aligned frame per connected component.

Files, in pipeline order: ``clusters`` (load and validate), ``correspondences`` (shared pixels between clusters),
``sim3`` (robust pairwise Sim(3) and its accept test), ``pose_graph`` (global solve), ``fuse`` (fused points),
``stage`` (the entry: reads the store, writes ``store.zarr/merge``).
"""

from .stage import MergeError, run

__all__ = ["MergeError", "run"]
