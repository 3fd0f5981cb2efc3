"""The run directory: the only contract between pipeline stages (see DESIGN.md).

Layout::

    <run>/run.json               config, versions, per-stage started/finished + manifest
    <run>/tables/*.parquet       images, clusters, ... (written atomically: temp file + rename)
    <run>/store.zarr             Zarr 3 group: descriptors, graph/, clusters/<id>/, merge/
    <run>/export/                COLMAP, PLY, GLB, report

Completion markers are always written last: a unit (a Zarr group such as ``clusters/3``) is complete when its
attributes hold ``"complete": true``; a stage is complete when ``run.json["stages"][stage]["finished"]`` is set.
A killed run therefore resumes from the last complete unit, and re-running a complete unit is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from .config import PipelineConfig

log = logging.getLogger(__name__)

STAGES = ("scan", "describe", "graph", "partition", "reconstruct", "merge", "export")
RUN_FORMAT_VERSION = 1


class RunStoreError(RuntimeError):
    """The run directory is missing, malformed or incompatible; the message says what to do."""


class ConfigMismatchError(RunStoreError):
    """An existing run was opened with a config that would change its results."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("sparse-vggt", "torch", "numpy", "zarr", "pyarrow"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class RunStore:
    """A handle on one run directory. Cheap to create; safe to use from several processes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.run_json = self.root / "run.json"
        self.tables_dir = self.root / "tables"
        self.zarr_path = self.root / "store.zarr"
        self.export_dir = self.root / "export"
        self._zarr: zarr.Group | None = None

    # ---- create / open -----------------------------------------------------------------------------
    @classmethod
    def create_or_open(
        cls, root: str | Path, config: PipelineConfig | None = None, force: bool = False
    ) -> "RunStore":
        """Open ``root`` if it is a run directory, else create it.

        With a ``config`` whose result-affecting fields differ from the recorded one, this fails unless
        ``force`` is true, in which case the new config is recorded (earlier stage outputs are kept; stages
        decide themselves whether they are still valid).
        """
        store = cls(root)
        if store.run_json.exists():
            recorded = store.config()
            if config is not None:
                changes = recorded.diff(config)
                if changes and not force:
                    raise ConfigMismatchError(
                        f"{store.root} was created with a different config:\n  "
                        + "\n  ".join(changes)
                        + "\nUse a new run directory, drop the conflicting --set/--config, or pass --force "
                        "to record the new config (completed stages are not recomputed automatically)."
                    )
                if changes or recorded.to_dict() != config.to_dict():
                    with store._locked_meta() as meta:
                        meta["config"] = config.to_dict()
                        if changes:
                            meta.setdefault("history", []).append(
                                {"time": _now(), "event": "config forced", "changes": changes}
                            )
            return store
        if store.root.exists() and any(store.root.iterdir()):
            raise RunStoreError(
                f"{store.root} exists, is not empty and has no run.json: refusing to turn it into a run "
                "directory. Pick an empty or new path."
            )
        store.root.mkdir(parents=True, exist_ok=True)
        store.tables_dir.mkdir(exist_ok=True)
        meta = {
            "format_version": RUN_FORMAT_VERSION,
            "created": _now(),
            "versions": _versions(),
            "config": (config or PipelineConfig()).to_dict(),
            "stages": {},
        }
        atomic_write_bytes(store.run_json, json.dumps(meta, indent=2).encode())
        zarr.open_group(store.zarr_path, mode="a")
        log.info("created run directory %s", store.root)
        return store

    @classmethod
    def open(cls, root: str | Path) -> "RunStore":
        store = cls(root)
        if not store.run_json.exists():
            raise RunStoreError(
                f"{store.root} is not a run directory (no run.json). Create one with "
                "`sparse-vggt scan PHOTOS RUN` or `sparse-vggt run PHOTOS RUN`."
            )
        return store

    # ---- run.json ----------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_json.read_text())
        except FileNotFoundError as exc:
            raise RunStoreError(f"{self.root} is not a run directory (no run.json)") from exc
        except json.JSONDecodeError as exc:
            raise RunStoreError(f"{self.run_json} is corrupt: {exc}") from exc

    def config(self) -> PipelineConfig:
        return PipelineConfig.from_dict(self.meta().get("config", {}))

    @contextlib.contextmanager
    def _locked_meta(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write run.json under an exclusive lock (several workers may finish at once)."""
        lock_path = self.root / ".run.lock"
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                meta = self.meta()
                yield meta
                atomic_write_bytes(self.run_json, json.dumps(meta, indent=2, default=_json_default).encode())
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ---- stage markers -----------------------------------------------------------------------------
    def stage_started(self, stage: str) -> None:
        with self._locked_meta() as meta:
            entry = meta.setdefault("stages", {}).setdefault(stage, {})
            entry["started"] = _now()
            entry.pop("finished", None)

    def stage_finished(self, stage: str, manifest: dict[str, Any] | None = None) -> None:
        """Mark a stage complete. Call only after every byte of its output is written."""
        with self._locked_meta() as meta:
            entry = meta.setdefault("stages", {}).setdefault(stage, {})
            entry.setdefault("started", _now())
            entry["manifest"] = manifest or {}
            entry["finished"] = _now()

    def stage_invalidate(self, stage: str) -> None:
        with self._locked_meta() as meta:
            meta.setdefault("stages", {}).pop(stage, None)

    def is_stage_complete(self, stage: str) -> bool:
        return bool(self.meta().get("stages", {}).get(stage, {}).get("finished"))

    def stage_manifest(self, stage: str) -> dict[str, Any]:
        return self.meta().get("stages", {}).get(stage, {}).get("manifest", {})

    def require_stage(self, stage: str, needed_by: str) -> None:
        if not self.is_stage_complete(stage):
            raise RunStoreError(
                f"`{needed_by}` needs the `{stage}` stage, which has not finished in {self.root}. "
                f"Run `sparse-vggt {stage} {self.root}` first (or `sparse-vggt run`)."
            )

    # ---- tables ------------------------------------------------------------------------------------
    def table_path(self, name: str) -> Path:
        return self.tables_dir / f"{name}.parquet"

    def has_table(self, name: str) -> bool:
        return self.table_path(name).exists()

    def write_table(self, name: str, table: pa.Table) -> Path:
        path = self.table_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return path

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        path = self.table_path(name)
        if not path.exists():
            raise RunStoreError(f"table {name!r} missing in {self.root} ({path})")
        return pq.read_table(path, columns=columns)

    # ---- zarr ----------------------------------------------------------------------------------------
    @property
    def zarr(self) -> zarr.Group:
        if self._zarr is None:
            self._zarr = zarr.open_group(self.zarr_path, mode="a")
        return self._zarr

    def group(self, path: str, create: bool = True) -> zarr.Group:
        """The Zarr group at ``path`` (e.g. ``clusters/3``), created if missing and ``create``."""
        root = self.zarr
        if not path:
            return root
        if path in root:
            node = root[path]
            if not isinstance(node, zarr.Group):
                raise RunStoreError(f"{path} in {self.zarr_path} is an array, expected a group")
            return node
        if not create:
            raise RunStoreError(f"group {path!r} missing in {self.zarr_path}")
        return root.require_group(path)

    def write_array(
        self, group: zarr.Group, name: str, data: np.ndarray, chunks: tuple[int, ...] | None = None
    ) -> zarr.Array:
        """Write a whole array (overwriting any partial one from a killed run)."""
        data = np.asarray(data)
        arr = group.create_array(
            name, shape=data.shape, dtype=data.dtype, chunks=chunks or "auto", overwrite=True
        )
        if data.size:
            arr[...] = data
        return arr

    def remove_group(self, path: str) -> None:
        """Delete a group and everything below it (used to redo an incomplete unit from scratch)."""
        target = self.zarr_path / path
        if target.exists():
            shutil.rmtree(target)
        self._zarr = None

    # ---- unit markers ------------------------------------------------------------------------------
    def is_unit_complete(self, path: str) -> bool:
        root = self.zarr
        if path not in root:
            return False
        return bool(root[path].attrs.get("complete", False))

    def mark_unit_complete(self, path: str, **attrs: Any) -> None:
        """Write ``complete: true`` (plus ``attrs``) on a group. Call only after its arrays are written."""
        grp = self.group(path)
        if attrs:
            grp.attrs.update(_jsonable(attrs))
        grp.attrs.update({"complete": True, "completed_at": _now()})

    def complete_units(self, parent: str) -> list[str]:
        """Names of the complete child groups under ``parent`` (e.g. finished clusters)."""
        if parent not in self.zarr:
            return []
        grp = self.zarr[parent]
        return sorted(
            name
            for name, child in grp.groups()
            if child.attrs.get("complete", False)
        )

    # ---- status ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Each stage's state and manifest, plus unit progress for chunked stages."""
        meta = self.meta()
        stages = meta.get("stages", {})
        rows = []
        for stage in STAGES:
            entry = stages.get(stage, {})
            state = "finished" if entry.get("finished") else ("started" if entry.get("started") else "pending")
            rows.append(
                {
                    "stage": stage,
                    "state": state,
                    "started": entry.get("started"),
                    "finished": entry.get("finished"),
                    "manifest": entry.get("manifest", {}),
                }
            )
        units = {}
        if "describe_chunks" in self.zarr:
            units["describe_chunks_complete"] = len(self.complete_units("describe_chunks"))
        if "clusters" in self.zarr:
            units["clusters_complete"] = len(self.complete_units("clusters"))
        return {"root": str(self.root), "created": meta.get("created"), "stages": rows, "units": units}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
