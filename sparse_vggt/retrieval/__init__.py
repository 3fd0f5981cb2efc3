"""Registry of retrieval descriptors (``describe.descriptor``): what the describe stage runs per image.

An entry builds a *describer* for one describe call: an object with ``dim``, ``model_id``, ``weights``
(provenance for the array's attributes), ``__call__(rows) -> (len(rows), dim)`` float32 for rows of
images.parquet, and ``manifest(images, seconds) -> dict`` (extra manifest fields). ``plan(cfg)`` gives
(dim, model id, weights) without loading anything, for a planner that needs no weights (the farm head).

Built in: ``megaloc`` (the default) and ``file`` (bring your own descriptors, ``describe.descriptors_file``;
also chosen whenever that file is set, so the existing key keeps working).

Adding a descriptor: one module in this package with an ``ENTRY = Retrieval(...)``, plus its line in
``_BUILTIN`` (or, from outside the library, one `register` call). Modules are imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..registry import LazyRegistry

if TYPE_CHECKING:
    import pyarrow as pa

    from ..config import DescribeConfig, PipelineConfig


class DescribeError(ValueError):
    """Descriptors cannot be produced from this input; the message says what to fix."""


@dataclass
class DescribeInputs:
    """What a describer is built from: the config, images.parquet, its kept rows, and the run directory."""

    config: "PipelineConfig"
    table: "pa.Table"
    rows: np.ndarray  # kept (status ok) rows
    run: str = ""

    def photos_root(self) -> Path:
        meta = self.table.schema.metadata or {}
        if b"photos_root" not in meta:
            raise DescribeError("images.parquet has no photos_root metadata; re-run `sparse-vggt scan`")
        return Path(meta[b"photos_root"].decode())


@dataclass(frozen=True)
class Retrieval:
    name: str
    build: Callable[[DescribeInputs], Any]  # -> describer (may load weights)
    plan: Callable[["DescribeConfig"], tuple[int, str, dict[str, Any]]] | None = None  # None: build to plan
    eager: bool = False  # build at stage start even when no chunk is pending (cheap, validates inputs early)
    checkpoint_files: tuple[str, ...] = ()  # files ``describe.model`` must provide (checked before long runs)


# name -> module of this package that defines ENTRY
_BUILTIN: dict[str, str] = {
    "megaloc": "megaloc",
    "file": "file",
}
_ENTRIES = LazyRegistry(__name__, _BUILTIN, "ENTRY")
_LOADED = _ENTRIES.loaded  # name -> Retrieval, once imported or registered


def register(entry: Retrieval) -> Retrieval:
    """Make ``entry`` selectable as ``describe.descriptor = entry.name``."""
    return _ENTRIES.register(entry.name, entry)


def names() -> tuple[str, ...]:
    return _ENTRIES.names()


def get(name: str) -> Retrieval:
    try:
        return _ENTRIES.get(name)
    except KeyError:
        raise DescribeError(f"unknown describe.descriptor {name!r}; registered: {', '.join(names())}") from None


def for_config(cfg: "DescribeConfig") -> Retrieval:
    """The entry the describe settings select: ``file`` whenever ``descriptors_file`` is set."""
    return get("file" if cfg.descriptors_file else cfg.descriptor)
