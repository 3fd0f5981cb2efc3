"""The pipeline, in order: one row per stage, read by the CLI, the Prefect tasks, `status` and the docs.

Each stage's module is named after its CLI verb and exposes one entry point,
``run(run_dir, config=None, *, force=False, units=None) -> manifest``: ``config`` None = the run's recorded
config, ``force`` = redo even what is complete, ``units`` = the stage's unit ids to (re)do (None = every pending
one; ``[]`` = none, only check and finish the stage). A stage without units rejects a non-None ``units`` with a
ValueError. The scan stage alone also takes ``photos=`` (default: the folder its finished scan recorded).

Modules are named by string and imported only when a stage's ``run`` is asked for, so reading the table (for
``--help``, ``status``, the docs) never imports torch or a model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: ``name`` is its CLI verb and its marker in run.json; ``unit`` names its resumable
    units (None: all or nothing); ``inputs`` and ``outputs`` are run-directory paths (the data plane)."""

    name: str
    module: str
    help: str
    unit: str | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def run(self) -> Callable[..., dict[str, Any]]:
        """The stage's ``run(run_dir, config=None, *, force=False, units=None)``, imported now."""
        return importlib.import_module(self.module).run


STAGES: tuple[Stage, ...] = (
    Stage("scan", "sparse_vggt.scan", "find, validate and index photos into a run directory", None,
          ("<photos>",), ("tables/images.parquet",)),
    Stage("describe", "sparse_vggt.describe", "global descriptors (MegaLoc) for every kept image",
          "ingest chunk", ("tables/images.parquet", "<photos>"), ("store.zarr/descriptors",)),
    Stage("graph", "sparse_vggt.graph",
          "covisibility graph from descriptors and priors", None,
          ("store.zarr/descriptors", "tables/images.parquet"), ("store.zarr/graph",)),
    Stage("partition", "sparse_vggt.partition", "cut the graph into connected, overlapping, bounded clusters", None,
          ("store.zarr/graph",), ("tables/clusters.parquet",)),
    Stage("reconstruct", "sparse_vggt.reconstruct", "run (sparse) VGGT on clusters", "cluster",
          ("tables/clusters.parquet", "<photos>"), ("store.zarr/clusters/<id>",)),
    Stage("merge", "sparse_vggt.merge", "align cluster reconstructions into one frame", None,
          ("store.zarr/clusters",), ("store.zarr/merge",)),
    Stage("export", "sparse_vggt.export", "COLMAP, PLY, GLB and report", None,
          ("store.zarr/merge",), ("export/",)),
)

NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    """The stage called ``name`` (its CLI verb)."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages: {', '.join(NAMES)}")
