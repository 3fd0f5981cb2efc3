"""The run directory: the only contract between pipeline stages (see DESIGN.md).

Layout::

    <run>/run.json               config, versions, per-stage started/finished + manifest
    <run>/tables/*.parquet       images, clusters, ... (written atomically: temp file + rename)
    <run>/store.zarr             Zarr 3 group: descriptors, graph/, clusters/<id>/, merge/
    <run>/export/                COLMAP, PLY, GLB, report

Completion markers are always written last: a unit (a Zarr group such as ``clusters/3``) is complete when its
attributes hold ``"complete": true`` *and* the manifest written with that marker (per array: shape, dtype, stored
file count, byte count and CRC-32 of the stored bytes) still matches the files on disk; a stage is complete when
``run.json["stages"][stage]["finished"]`` is set. A killed run therefore resumes from the last complete unit,
re-running a complete unit is a no-op, and a unit whose files were truncated, deleted or altered is redone (and
recorded in ``orchestration/events.jsonl``) instead of being read as zeros.

Durability: every metadata file (run.json, tables, markers) is written to a temp file, fsynced, renamed over the
target and the directory fsynced, so a marker never counts before the data it covers is on disk. Files are created
with the process umask (group/world-readable like the rest of a shared run), never mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import shutil
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from .config import PipelineConfig
from .durable import append_event, atomic_replace, atomic_write_bytes, fsync_tree, now as _now
from .integrity import UnitCheck, array_manifest as _array_manifest
from .pipeline import NAMES as STAGES  # the stage order (run.json markers, status, invalidation) is the pipeline's

log = logging.getLogger(__name__)

# config section -> the stage whose results its result-affecting fields change
SECTION_STAGE = {"scan": "scan", "describe": "describe", "graph": "graph", "partition": "partition",
                 "reconstruct": "reconstruct", "merge": "merge", "export": "export"}
_STAGE_UNIT = {"graph": "graph", "merge": "merge"}  # stages whose output is one verified unit
_STAGE_TABLE = {"scan": "images", "partition": "clusters"}
_STAGE_ARRAY = {"describe": "descriptors"}  # stages whose output is one array shared by their units
_STAGE_ARRAY_UNITS = {"describe": ("describe_chunks",)}


def _clear_stages(meta: dict[str, Any], names: Sequence[str], reason: str) -> list[str]:
    """Drop the markers of ``names`` from run.json's ``meta`` (held under its lock); record it in the history."""
    stages = meta.setdefault("stages", {})
    cleared = [s for s in names if s in stages]
    for s in cleared:
        stages.pop(s)
    if cleared:
        meta.setdefault("history", []).append({"time": _now(), "event": "invalidated", "stages": cleared,
                                               "reason": reason})
    return cleared


def _allowed_before_create(p: Path) -> bool:
    """What may be in a run directory before its run.json: the writer lock (taken first), file-system probes
    and what a create killed before writing run.json leaves (tables/, an empty store.zarr, temp files)."""
    if p.name in (".writer.lock", "writer.json"):
        return True
    if p.name == "tables":
        return p.is_dir() and not any(p.iterdir())
    if p.name == "store.zarr":
        return p.is_dir() and {c.name for c in p.iterdir()} <= {"zarr.json"}
    return p.name.startswith((".fscheck-", ".run.json.", ".writer.json."))
RUN_FORMAT_VERSION = 1


class RunStoreError(RuntimeError):
    """The run directory is missing, malformed or incompatible; the message says what to do."""


class ConfigMismatchError(RunStoreError):
    """An existing run was opened with a config that would change its results."""


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("sparse-vggt", "torch", "numpy", "zarr", "pyarrow"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


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

        A changed result-affecting field of a stage that has run (started or finished) needs ``force``; with
        ``force`` that stage and every later one are invalidated (markers cleared, recorded in run.json history
        and events.jsonl) so they are recomputed. A changed field of a stage that has not run yet is recorded
        without ``force``: nothing computed depends on it.
        """
        store = cls(root)
        if store.run_json.exists():
            recorded = store.config()
            if config is not None:
                blocking, free = store._config_changes(recorded, config)
                if blocking and not force:
                    raise ConfigMismatchError(
                        f"{store.root} was created with a different config:\n  "
                        + "\n  ".join(line for _, line in blocking)
                        + "\nThese fields change results of stages that already ran. Use a new run directory, drop "
                        "the conflicting --set/--config, or pass --force to record the new config: --force "
                        "invalidates the first affected stage and every later one, which are then recomputed."
                    )
                if blocking or free or recorded.to_dict() != config.to_dict():
                    first = min((STAGES.index(st) for st, _ in blocking), default=None)
                    with store._locked_meta() as meta:
                        meta["config"] = config.to_dict()
                        if blocking or free:
                            meta.setdefault("history", []).append(
                                {"time": _now(), "event": "config forced" if blocking else "config changed",
                                 "changes": [line for _, line in blocking + free]}
                            )
                    if first is not None:
                        store.invalidate_from(
                            STAGES[first], "config forced: " + "; ".join(line for _, line in blocking))
            return store
        if store.root.exists() and not all(_allowed_before_create(p) for p in store.root.iterdir()):
            raise RunStoreError(
                f"{store.root} exists, is not empty and has no run.json: refusing to turn it into a run "
                "directory. Pick an empty or new path."
            )
        store.root.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": RUN_FORMAT_VERSION,
            "created": _now(),
            "versions": _versions(),
            "config": (config or PipelineConfig()).to_dict(),
            "stages": {},
        }
        store.tables_dir.mkdir(exist_ok=True)
        zarr.open_group(store.zarr_path, mode="a")
        atomic_write_bytes(store.run_json, json.dumps(meta, indent=2).encode())  # last: a killed create is redone
        log.info("created run directory %s", store.root)
        return store

    def _config_changes(self, old: PipelineConfig, new: PipelineConfig
                        ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Changed result-affecting fields as (stage, line): (of stages that ran, of stages that did not)."""
        a, b = old.result_affecting(), new.result_affecting()
        stages = self.meta().get("stages", {})
        blocking: list[tuple[str, str]] = []
        free: list[tuple[str, str]] = []
        for section in a:
            stage = SECTION_STAGE.get(section)
            for name in a[section]:
                if a[section][name] == b[section].get(name):
                    continue
                line = f"{section}.{name}: {a[section][name]!r} -> {b[section].get(name)!r}"
                entry = stages.get(stage, {}) if stage is not None else {}
                ran = bool(entry.get("started") or entry.get("finished"))
                (blocking if ran else free).append((stage or section, line))
        return blocking, free

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
        """Record that ``stage`` is (re)computing; every later stage depends on it, so its markers are cleared."""
        later = STAGES[STAGES.index(stage) + 1:] if stage in STAGES else ()
        with self._locked_meta() as meta:
            entry = meta.setdefault("stages", {}).setdefault(stage, {})
            entry["started"] = _now()
            entry.pop("finished", None)
            cleared = _clear_stages(meta, later, f"{stage} recomputed")
        if cleared:
            append_event(self.root, {"kind": "stages_invalidated", "stages": cleared,
                                     "reason": f"{stage} is being recomputed"})

    def invalidate_from(self, stage: str, reason: str) -> list[str]:
        """Clear the markers of ``stage`` and every later stage (recorded); returns the stages cleared."""
        with self._locked_meta() as meta:
            cleared = _clear_stages(meta, STAGES[STAGES.index(stage):], reason)
        if cleared:
            append_event(self.root, {"kind": "stages_invalidated", "stages": cleared, "reason": reason})
            log.warning("invalidated stage(s) %s of %s: %s", ", ".join(cleared), self.root, reason)
        return cleared

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

    def stage_intact(self, stage: str, strict: bool = True) -> bool:
        """Stage marker set *and* its outputs verify (the unit of graph/merge checksummed, its table present).
        A finished stage whose outputs fail is invalidated with every later stage (recorded) and reported False.
        ``strict=False`` accepts a stage unit that exists without a marker of its own (run directories written by
        other tools, e.g. synthetic runs); damaged marked data and missing outputs still fail."""
        if not self.is_stage_complete(stage):
            return False
        problem = ""
        unit = _STAGE_UNIT.get(stage)
        if unit is not None:
            check = self.verify_unit(unit, full=True)
            if not check and not strict and not check.marked and check.reason == "no completion marker":
                check = UnitCheck(True)
            if not check:
                problem = f"store.zarr/{unit}: {check.reason or 'missing'}"
                if check.marked:
                    self.redo_unit(unit, check.reason)
        array = _STAGE_ARRAY.get(stage)
        recorded = self.stage_manifest(stage).get("integrity") if array else None
        if recorded:
            actual = self.array_integrity(array)
            if actual != recorded:
                problem = f"store.zarr/{array} differs from its manifest (truncated, deleted or altered chunk)"
                append_event(self.root, {"kind": "unit_redone", "unit": array, "reason": problem})
                for unit in _STAGE_ARRAY_UNITS.get(stage, ()):
                    self.remove_group(unit)  # its per-chunk markers covered the damaged bytes too
        table = _STAGE_TABLE.get(stage)
        if not problem and table is not None and not self.has_table(table):
            problem = f"tables/{table}.parquet is missing"
        if problem:
            self.invalidate_from(stage, f"{stage} output failed verification: {problem}")
            return False
        return True

    def array_integrity(self, name: str, checksum: bool = True) -> dict[str, Any]:
        """Files, bytes and (``checksum``) CRC-32 of one stored array (e.g. ``descriptors``), for a stage manifest."""
        adir = self.zarr_path / name
        stored = sorted(p for p in adir.rglob("*") if p.is_file() and not p.name.endswith(".partial"))
        found: dict[str, Any] = {"files": len(stored), "nbytes": sum(p.stat().st_size for p in stored)}
        if checksum:
            crc = 0
            for p in stored:
                crc = zlib.crc32(p.read_bytes(), crc)
            found["crc32"] = crc
        return found

    def quick_damage(self) -> str | None:
        """The first output of a finished run that fails the quick check (listing + stats: a deleted marker, a
        truncated or deleted chunk, a missing table), or None. Cheap enough to run before deciding that a run
        needs no work; the flow then does the full (CRC) verification and redoes what failed."""
        stages = self.meta().get("stages", {})
        for stage, unit in _STAGE_UNIT.items():
            check = self.verify_unit(unit)
            if stage in stages and not check:
                return f"store.zarr/{unit}: {check.reason}"
        for stage, table in _STAGE_TABLE.items():
            if stage in stages and not self.has_table(table):
                return f"tables/{table}.parquet is missing"
        for stage, array in _STAGE_ARRAY.items():
            recorded = stages.get(stage, {}).get("manifest", {}).get("integrity")
            if recorded:
                found = self.array_integrity(array, checksum=False)
                if (found["files"], found["nbytes"]) != (recorded["files"], recorded["nbytes"]):
                    return f"store.zarr/{array} differs from its manifest"
        if self.has_table("clusters"):
            ids = sorted({int(c) for c in self.read_table("clusters", columns=["cluster_id"]).column(0).to_pylist()})
            for cid in ids:
                check = self.verify_unit(f"clusters/{cid}")
                if not check:
                    return f"store.zarr/clusters/{cid}: {check.reason}"
        return None

    def is_stage_complete(self, stage: str) -> bool:
        return bool(self.meta().get("stages", {}).get(stage, {}).get("finished"))

    def stage_manifest(self, stage: str) -> dict[str, Any]:
        return self.meta().get("stages", {}).get(stage, {}).get("manifest", {})

    def require_stage(self, stage: str, needed_by: str) -> None:
        """The stage must be finished and its outputs intact (a damaged output is recorded and reopens it)."""
        was_complete = self.is_stage_complete(stage)
        if was_complete and not self.stage_intact(stage, strict=False):
            raise RunStoreError(
                f"`{needed_by}` needs the `{stage}` stage, whose output in {self.root} failed verification (recorded "
                f"in orchestration/events.jsonl; the stage was reopened). Run `sparse-vggt {stage} {self.root}` "
                "(or `sparse-vggt run`) to recompute it."
            )
        if not was_complete:
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
        atomic_replace(path, lambda _fd, tmp: pq.write_table(table, tmp))
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
    def _group_meta_path(self, path: str) -> Path:
        return self.zarr_path / path / "zarr.json"

    def unit_attrs(self, path: str) -> dict[str, Any]:
        """A unit's attributes read straight from its zarr.json ({} if missing or unreadable)."""
        try:
            meta = json.loads(self._group_meta_path(path).read_text())
        except (OSError, ValueError):
            return {}
        attrs = meta.get("attributes") if isinstance(meta, dict) else None
        return attrs if isinstance(attrs, dict) else {}

    def verify_unit(self, path: str, full: bool = False) -> UnitCheck:
        """Is the unit complete and intact? Quick: marker + every array's shape, dtype, file count and byte count
        (a listing and stats); ``full`` also checks the CRC-32 of every stored byte (memoised per marker)."""
        meta_path = self._group_meta_path(path)
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            return UnitCheck(False, "missing")
        except (OSError, ValueError) as exc:
            return UnitCheck(False, f"group metadata unreadable ({exc})", marked=True)
        attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
        if not attrs.get("complete", False):
            return UnitCheck(False, "no completion marker")
        recorded = attrs.get("arrays")
        if recorded is None:  # written before markers carried a manifest: nothing more to check
            return UnitCheck(True)
        gdir = self.zarr_path / path
        key = (str(gdir.resolve()), attrs.get("completed_at"), meta_path.stat().st_mtime_ns)
        if full and _FULLY_VERIFIED.get(key[0]) == key:
            full = False
        try:
            actual = _array_manifest(gdir, checksum=full)
        except OSError as exc:
            return UnitCheck(False, f"unreadable ({exc})", marked=True)
        for name, want in recorded.items():
            got = actual.get(name)
            if got is None:
                return UnitCheck(False, f"array {name} missing", marked=True)
            for field in ("shape", "dtype", "files", "nbytes") + (("crc32",) if full else ()):
                if got.get(field) != want.get(field):
                    return UnitCheck(False, f"array {name}: {field} is {got.get(field)} on disk, marker says "
                                            f"{want.get(field)} (truncated, deleted or altered chunk)", marked=True)
        if full:
            _FULLY_VERIFIED[key[0]] = key
        return UnitCheck(True)

    def is_unit_complete(self, path: str, full: bool = False) -> bool:
        """Marker present and the unit verifies (see verify_unit); a failing unit is logged and counts as not done."""
        check = self.verify_unit(path, full=full)
        if not check and check.marked:
            log.warning("%s in %s fails verification and will be redone: %s", path, self.zarr_path, check.reason)
        return bool(check)

    def mark_unit_complete(self, path: str, **attrs: Any) -> None:
        """Write ``complete: true`` (plus ``attrs`` and the integrity manifest of every array) on a group.

        Call only after its arrays are written: the data is fsynced first, then the marker is written atomically
        (temp + fsync + rename + directory fsync), so a marker never covers data that is not on disk.
        """
        self.group(path)
        gdir = self.zarr_path / path
        fsync_tree(gdir)
        manifest = _array_manifest(gdir, checksum=True)
        meta_path = gdir / "zarr.json"
        meta = json.loads(meta_path.read_text())
        out = meta.setdefault("attributes", {})
        if attrs:
            out.update(_jsonable(attrs))
        out.update({"complete": True, "completed_at": _now(), "arrays": manifest})
        atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
        self._zarr = None  # cached group objects would hold the old attributes

    def redo_unit(self, path: str, reason: str) -> None:
        """Record that a unit is recomputed (it failed verification or decoding) and delete what is left of it."""
        append_event(self.root, {"kind": "unit_redone", "unit": path, "reason": reason})
        log.warning("redoing %s: %s", path, reason)
        self.remove_group(path)

    def record_event(self, kind: str, **info: Any) -> dict[str, Any]:
        return append_event(self.root, {"kind": kind, **info})

    def complete_units(self, parent: str, full: bool = False) -> list[str]:
        """Names of the complete, intact child groups under ``parent`` (e.g. finished clusters)."""
        pdir = self.zarr_path / parent
        if not pdir.is_dir():
            return []
        return sorted(p.name for p in pdir.iterdir() if p.is_dir() and (p / "zarr.json").exists()
                      and self.is_unit_complete(f"{parent}/{p.name}", full))

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
        try:  # who holds the writer lock now (sparse_vggt.lock), if anyone
            writer = json.loads((self.root / "writer.json").read_text())
        except (OSError, ValueError):
            writer = None
        return {"root": str(self.root), "created": meta.get("created"), "stages": rows, "units": units,
                "writer": writer}


_FULLY_VERIFIED: dict[str, tuple[Any, ...]] = {}  # unit dir -> (dir, completed_at, marker mtime) checksummed OK


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
