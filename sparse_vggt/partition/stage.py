"""The partition stage: ``store.zarr/graph`` -> ``tables/clusters.parquet`` (+ the manifest with the report).

Only run-directory I/O and the skip/redo decision live here; the algorithm is
:func:`sparse_vggt.partition.algorithm.partition_graph`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterable

from ..config import PartitionConfig, PipelineConfig
from ..store import RunStore
from .algorithm import partition_graph
from .limits import resolve_max_cluster_frames, validate_config
from .load import read_graph

log = logging.getLogger(__name__)


def _table_metadata(cfg: PartitionConfig) -> dict[str, Any]:
    return {"config": dataclasses.asdict(cfg), "reference_frame": "max in-cluster weighted degree (core)"}


def run(run_dir: Path, config: PipelineConfig | None = None, *, force: bool = False,
        units: Iterable[Any] | None = None) -> dict[str, Any]:
    """The partition stage: store.zarr/graph -> tables/clusters.parquet (+ manifest with the report).

    A finished stage with the same partition settings is a no-op unless ``force``. The graph is cut as a whole,
    so the stage has no units: ``units`` must be None.
    """
    if units is not None:
        raise ValueError("the partition stage has no units (it cuts the whole graph at once); pass units=None "
                         "and force=True to redo it")
    store = RunStore.open(run_dir)
    config = config or store.config()
    requested = config.partition
    cfg = resolve_max_cluster_frames(config)
    validate_config(cfg)
    if store.is_stage_complete("partition") and store.has_table("clusters") and not force:
        manifest = store.stage_manifest("partition")
        if manifest.get("config") == dataclasses.asdict(requested):
            log.info("partition stage already finished in %s; nothing to do", store.root)
            return manifest
        log.warning("partition config changed since the last run; re-partitioning %s", store.root)
    store.require_stage("graph", "partition")
    indptr, indices, weights, component = read_graph(store)
    store.stage_started("partition")
    clusters, report = partition_graph(indptr, indices, weights, component, cfg)
    path = store.write_table("clusters", clusters.to_table(_table_metadata(cfg)))
    manifest = {**report, "table": str(path.relative_to(store.root)), "config": dataclasses.asdict(requested),
                "max_cluster_frames_resolved": cfg.max_cluster_frames, "splits": []}
    store.stage_finished("partition", manifest)
    log.info("partition: %d clusters over %d frames (%d components, %d singletons)", report["clusters"],
             report["frames_clustered"], report["components"], report["singletons"])
    return manifest
