"""One writer per run directory: an exclusive lock with owner host, pid and a heartbeat.

``run`` and every stage command hold :class:`RunLock` for their whole duration. Two mechanisms together:

* ``<run>/.writer.lock`` is ``flock``-ed exclusively. The kernel (or the NFS lock manager) drops it when the
  process dies, so on one host a dead owner never blocks anyone, and a second writer is refused at once.
* ``<run>/writer.json`` names the owner (host, pid, start time) and carries a heartbeat refreshed every
  ``heartbeat_s`` by a daemon thread. Shares whose ``flock`` is not seen across hosts (some SMB set-ups) still
  keep one writer: a live heartbeat of another host refuses the run; a heartbeat older than ``stale_s`` (a dead
  host) is taken over, and so is an owner on this host whose pid is gone.

Pool workers never take this lock: the main flow holds it while the per-cluster flow runs on the farm write only
their own ``store.zarr/clusters/<id>`` group and ``orchestration/clusters/<id>.json`` (docs/DESIGN.md).
The lock is re-entrant within one process (the CLI takes it, then the flow it starts takes it again).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from .durable import FILE_MODE, atomic_write_bytes
from .store import RunStoreError

log = logging.getLogger(__name__)

LOCK_NAME = ".writer.lock"
OWNER_NAME = "writer.json"
HEARTBEAT_S = float(os.environ.get("SPARSE_VGGT_LOCK_HEARTBEAT_S", "10"))
STALE_S = float(os.environ.get("SPARSE_VGGT_LOCK_STALE_S", "120"))


class RunLockedError(RunStoreError):
    """Another process is writing this run directory; the message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_owner(run_dir: str | Path) -> dict[str, Any] | None:
    """The recorded writer of a run directory, or None."""
    try:
        data = json.loads((Path(run_dir) / OWNER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process (no owner record yet)"
    age = time.time() - float(owner.get("heartbeat", 0) or 0)
    return (f"pid {owner.get('pid')} on host {owner.get('host')} (`{owner.get('command', '?')}`, started "
            f"{owner.get('started')}, last heartbeat {age:.0f} s ago)")


class RunLock:
    """Exclusive writer lock on a run directory (see the module docstring). Use as a context manager."""

    _held: dict[str, "RunLock"] = {}
    _guard = threading.Lock()

    def __init__(self, run_dir: str | Path, command: str = "", heartbeat_s: float | None = None,
                 stale_s: float | None = None):
        self.root = Path(run_dir).expanduser().resolve()
        self.command = command
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.stale_s = STALE_S if stale_s is None else stale_s
        self._fh: Any = None
        self._depth = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.owner: dict[str, Any] = {}
        self.heartbeats = 0

    # ---- acquire / release ---------------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        with RunLock._guard:
            held = RunLock._held.get(str(self.root))
            if held is not None and held._fh is not None:  # re-entrant within this process
                held._depth += 1
                return held
            self._acquire()
            RunLock._held[str(self.root)] = self
            self._depth = 1
            return self

    def _acquire(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        fh = os.fdopen(fd, "r+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RunLockedError(f"{self.root} is being written by {_describe(read_owner(self.root))}. Only one "
                                 "`sparse-vggt` command may write a run directory at a time: wait for it to end "
                                 "(or stop it), then re-run.") from None
        except OSError as exc:
            fh.close()
            raise RunStoreError(f"cannot lock {path}: {exc}. The run directory's file system must support "
                                "flock (NFSv4, or SMB with byte-range locks); see docs/DESIGN.md.") from exc
        me = socket.gethostname()
        owner = read_owner(self.root)
        if owner and not (owner.get("host") == me and owner.get("pid") == os.getpid()):
            age = time.time() - float(owner.get("heartbeat", 0) or 0)
            if owner.get("host") == me:
                reason = "its process is gone" if not _pid_alive(int(owner.get("pid", -1))) else \
                    "its process no longer holds the lock (pid reused)"
            elif age > self.stale_s:
                reason = f"its heartbeat is {age:.0f} s old (> {self.stale_s:.0f} s)"
            else:  # flock not shared across hosts on this share: the heartbeat decides
                fh.close()
                raise RunLockedError(f"{self.root} is being written by {_describe(owner)}. Only one `sparse-vggt` "
                                     "command may write a run directory at a time; if that host is dead, wait "
                                     f"{self.stale_s:.0f} s for its heartbeat to go stale, then re-run.")
            log.warning("taking over the stale writer lock of %s: %s", _describe(owner), reason)
            with contextlib.suppress(Exception):
                from .durable import append_event

                if (self.root / "run.json").exists():
                    append_event(self.root, {"kind": "stale_lock_taken_over", "owner": owner, "reason": reason})
        self._fh = fh
        now = time.time()
        self.owner = {"host": me, "pid": os.getpid(), "command": self.command,
                      "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      "heartbeat": now}
        self._write_owner()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"run-lock-heartbeat:{self.root.name}", daemon=True)
        self._thread.start()

    def _write_owner(self) -> None:
        self.owner["heartbeat"] = time.time()
        atomic_write_bytes(self.root / OWNER_NAME, json.dumps(self.owner).encode())
        self.heartbeats += 1

    def heartbeat(self) -> None:
        """Refresh the heartbeat now (the daemon thread calls this every ``heartbeat_s``)."""
        self._write_owner()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write_owner()
            except OSError as exc:  # a flaky share must not kill the run; the next beat retries
                log.warning("could not refresh the writer heartbeat of %s: %s", self.root, exc)

    def release(self) -> None:
        with RunLock._guard:
            self._depth -= 1
            if self._depth > 0:
                return
            RunLock._held.pop(str(self.root), None)
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
            with contextlib.suppress(OSError):
                if (read_owner(self.root) or {}).get("pid") == os.getpid():
                    (self.root / OWNER_NAME).unlink()
            if self._fh is not None:
                fcntl.flock(self._fh, fcntl.LOCK_UN)
                self._fh.close()
                self._fh = None

    def __enter__(self) -> "RunLock":
        held = self.acquire()
        self._outer = held
        return held

    def __exit__(self, *exc: Any) -> None:
        self._outer.release()


@contextlib.contextmanager
def writer_lock(run_dir: str | Path, command: str = "") -> Iterator[RunLock]:
    """Hold the run directory's writer lock for the block (after checking its file system can host a run)."""
    check_filesystem(run_dir)
    lock = RunLock(run_dir, command).acquire()
    try:
        yield lock
    finally:
        lock.release()


_FS_CHECKED: set[str] = set()


def check_filesystem(run_dir: str | Path) -> None:
    """Fail early where the run directory's file system lacks what the store needs: atomic rename over an
    existing file (markers, tables), flock (writer lock, run.json updates) and hard links (Zarr's exclusive
    creates use os.link)."""
    root = Path(run_dir).expanduser().resolve()
    if str(root) in _FS_CHECKED:
        return
    root.mkdir(parents=True, exist_ok=True)
    base = root / f".fscheck-{socket.gethostname()}-{os.getpid()}"
    a, b, c = (Path(f"{base}.{x}") for x in "abc")
    step = "create a file"
    try:
        a.write_bytes(b"a")
        b.write_bytes(b"b")
        step = "rename a file over an existing one (atomic replace)"
        os.replace(a, b)
        if b.read_bytes() != b"a":
            raise OSError("content after rename is wrong")
        step = "flock a file"
        with open(b, "rb") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
        step = "create a hard link (Zarr uses os.link for exclusive creates)"
        os.link(b, c)
    except OSError as exc:
        raise RunStoreError(f"the file system of {root} cannot {step}: {exc}. sparse-vggt needs rename, flock "
                            "and hard links there (see docs/DESIGN.md, 'Shared storage'); use a local disk or an "
                            "NFSv4 / SMB3 share with those features.") from exc
    finally:
        for p in (a, b, c):
            with contextlib.suppress(OSError):
                p.unlink()
    _FS_CHECKED.add(str(root))
