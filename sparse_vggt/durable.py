"""Durable files on local disks and shares: atomic replace, fsync, append-only event log, file identity.

Every metadata file of a run (run.json, tables, markers, owner records) is written to a temp file, fsynced,
renamed over the target and the directory fsynced, so a crash never leaves half a file and a marker never counts
before the data it covers is on disk. Files get the process umask (a shared run stays readable by the group),
never mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def now() -> str:
    """UTC timestamp to the second, ISO 8601 (what run.json and events record)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is process-global)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


FILE_MODE = 0o666 & ~_read_umask()  # what open() would give: shared runs stay readable by the group/others


def fsync_dir(path: Path) -> None:
    """Make a rename/creation in ``path`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_file(path: Path) -> tuple[int, str]:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, FILE_MODE)  # mkstemp creates 0600: other users of a shared run could not read it
    return fd, tmp


def atomic_replace(path: Path, write: Callable[[int, str], None]) -> None:
    """Make ``path``'s new content with ``write(fd, temp_path)`` in a temp file of the same directory, then fsync,
    rename over ``path`` and fsync the directory: readers never see half a file, and after return the new content
    survives a crash or power loss. ``write`` may write through ``fd`` or reopen ``temp_path`` (same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path)
    try:
        try:
            write(fd, tmp)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`atomic_replace` with ``data`` as the new content."""

    def write(fd: int, _tmp: str) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    atomic_replace(path, write)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (unit data before its completion marker)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(dirpath))


def file_identity(path: str | Path) -> tuple[int, int]:
    """(size, mtime_ns) of the file, or of the link itself when its target is missing; (0, 0) when neither.

    How the run recognises an input file outside the run directory (photos, a descriptors file) as unchanged;
    nanoseconds, so a rewrite within the same second is still seen."""
    for fn in (os.stat, os.lstat):
        try:
            st = fn(path)
            return int(st.st_size), int(st.st_mtime_ns)
        except OSError:
            continue
    return 0, 0


def append_event(run_dir: str | Path, event: dict[str, Any]) -> dict[str, Any]:
    """Append one event (skip, split, redo, failure...) to <run>/orchestration/events.jsonl under a lock."""
    path = Path(run_dir) / "orchestration" / "events.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    event = {"time": now(), **event}
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    with os.fdopen(fd, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.write(json.dumps(event, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return event


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every event of <run>/orchestration/events.jsonl, oldest first (a torn last line is skipped)."""
    path = Path(run_dir) / "orchestration" / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out
