"""Weights provisioning: fetch VGGT-1B and MegaLoc at a pinned hub revision, record and verify their sha256.

Why: farm workers run with ``HF_HUB_OFFLINE=1`` (no hub round trip per cluster, no surprise upgrade of the
weights between two Macs), so the checkpoints must be put on each machine beforehand, at one known commit, and
a corrupted or half-copied file must be caught before a 28-hour run, not inside it.

``sparse-vggt weights fetch [--dir DIR]`` downloads each pinned file (into the Hugging Face cache, or into
``DIR/<org>--<name>/``), computes its sha256, compares it with the pinned checksum (or, where none is pinned, with
the sha256 the hub publishes for the LFS object at that revision) and writes ``sparse-vggt-weights.json`` (the
lock) next to the files. ``sparse-vggt weights verify`` re-hashes the files and compares them with the lock.
The loaders use the pinned revision for the pinned repo ids, so the default config works offline after a fetch.
No torch import here.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

LOCK_NAME = "sparse-vggt-weights.json"


@dataclass(frozen=True)
class Pin:
    """One checkpoint at one hub commit. ``sha256`` None: take the hub's published LFS sha256 at fetch time
    (recorded in the lock; `verify` then checks against the lock)."""

    stage: str
    repo: str
    filename: str
    revision: str
    sha256: str | None = None


# The revisions are the hub commits of the public repos as found in public code that pins them (not
# re-checked against the hub from this network-less machine); `fetch` fails loudly if the hub no longer has them.
# To move to a newer commit, change the revision here (and sha256 if you pin it) and run `sparse-vggt weights
# fetch` on every machine.
PINS: dict[str, Pin] = {
    "reconstruct": Pin("reconstruct", "facebook/VGGT-1B", "model.pt", "860abec7937da0a4c03c41d3c269c366e82abdf9"),
    "describe": Pin("describe", "gberton/MegaLoc", "model.safetensors", "7cb9f7970d366fdf059963d04d372e503e8e9df9"),
}


class ChecksumMismatchError(RuntimeError):
    """A checkpoint's sha256 differs from the pinned/recorded one (corrupt or different file)."""


class WeightsFetchError(RuntimeError):
    """A pinned checkpoint could not be downloaded (no network, revision gone); says what to do instead."""


def pinned_revision(repo: str) -> str | None:
    """The pinned commit for a pinned hub repo id (the loaders' default revision), else None."""
    return next((p.revision for p in PINS.values() if p.repo == str(repo)), None)


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _slug(repo: str) -> str:
    return repo.replace("/", "--")


def _download(pin: Pin, dest: Path | None) -> Path:
    """hf_hub_download at the pinned revision into the cache (dest None) or ``dest/<org>--<name>/``."""
    from huggingface_hub import hf_hub_download

    if dest is None:
        return Path(hf_hub_download(repo_id=pin.repo, filename=pin.filename, revision=pin.revision,
                                    cache_dir=str(hub_cache_dir())))
    return Path(hf_hub_download(repo_id=pin.repo, filename=pin.filename, revision=pin.revision,
                                local_dir=str(dest / _slug(pin.repo))))


def _hub_sha256(pin: Pin) -> str | None:
    """The sha256 the hub publishes for the file's LFS object at the pinned revision (None: not an LFS file)."""
    from huggingface_hub import HfApi

    infos = HfApi().get_paths_info(pin.repo, [pin.filename], revision=pin.revision)
    lfs = getattr(infos[0], "lfs", None) if infos else None
    return getattr(lfs, "sha256", None)


def local_file(pin: Pin, dest: Path | None) -> Path | None:
    """Where a fetched file is (no network): ``dest/<org>--<name>/<file>`` or the cache snapshot of the pin."""
    if dest is not None:
        path = dest / _slug(pin.repo) / pin.filename
        return path if path.is_file() else None
    path = hub_cache_dir() / f"models--{_slug(pin.repo)}" / "snapshots" / pin.revision / pin.filename
    return path if path.is_file() else None


def lock_path(dest: Path | None) -> Path:
    return (dest if dest is not None else hub_cache_dir()) / LOCK_NAME


def read_lock(dest: Path | None) -> dict[str, Any]:
    path = lock_path(dest)
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_lock(dest: Path | None, lock: dict[str, Any]) -> None:
    path = lock_path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(lock, indent=2, sort_keys=True))
    os.replace(tmp, path)


def fetch(dest: str | Path | None = None, stages: tuple[str, ...] = ("describe", "reconstruct"),
          download: Callable[[Pin, Path | None], Path] | None = None,
          hub_sha256: Callable[[Pin], str | None] | None = None) -> dict[str, Any]:
    """Download each pinned checkpoint, check its sha256, record it in the lock; returns the lock entries.

    Raises `ChecksumMismatchError` (and records nothing for that file) when the file's sha256 differs from the
    pinned one, or from the hub's published LFS sha256 where none is pinned."""
    download = download or _download
    hub_sha256 = hub_sha256 or _hub_sha256
    root = Path(dest).expanduser().resolve() if dest is not None else None
    lock = read_lock(root)
    out: dict[str, Any] = {}
    for stage in stages:
        pin = PINS[stage]
        try:
            path = Path(download(pin, root))
        except Exception as exc:  # offline, revision gone, auth: say what to do instead
            raise WeightsFetchError(
                f"could not download {pin.repo}/{pin.filename} at the pinned revision {pin.revision} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). `sparse-vggt weights "
                "fetch` needs access to huggingface.co; on a machine without it, copy the Hugging Face cache (or the "
                "--dir folder) from a machine that fetched, then run `sparse-vggt weights verify`.") from exc
        digest = sha256_file(path)
        expected, source = pin.sha256, "pinned in sparse_vggt/provision.py"
        if expected is None:
            expected, source = hub_sha256(pin), f"published by the hub for {pin.repo}@{pin.revision}"
        if expected is not None and digest != expected:
            raise ChecksumMismatchError(
                f"{pin.repo}/{pin.filename}@{pin.revision}: sha256 {digest} of {path} differs from {expected} "
                f"({source}). The download is corrupt or the file changed: delete {path} and run "
                "`sparse-vggt weights fetch` again.")
        entry = {**asdict(pin), "sha256": digest, "checked_against": source if expected else "nothing (not an LFS "
                 "file: recorded as fetched)", "file": str(path), "bytes": path.stat().st_size,
                 "fetched_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        lock[stage] = entry
        out[stage] = entry
        log.info("fetched %s/%s@%s sha256 %s", pin.repo, pin.filename, pin.revision, digest)
    _write_lock(root, lock)
    return {"lock": str(lock_path(root)), "weights": out}


def verify(dest: str | Path | None = None, stages: tuple[str, ...] = ("describe", "reconstruct")) -> dict[str, Any]:
    """Re-hash each fetched file and compare it with the lock (and the pin). Returns per stage
    ``{"ok", "sha256", "file", "problem"}``; raises nothing (the CLI turns problems into an exit code)."""
    root = Path(dest).expanduser().resolve() if dest is not None else None
    lock = read_lock(root)
    out: dict[str, Any] = {}
    for stage in stages:
        pin = PINS[stage]
        entry = lock.get(stage)
        path = local_file(pin, root)
        row: dict[str, Any] = {"repo": pin.repo, "revision": pin.revision, "file": str(path) if path else None}
        if path is None or entry is None:
            row.update(ok=False, problem=f"not fetched ({'no file' if path is None else 'not in the lock ' + str(lock_path(root))}): "
                                         f"run `sparse-vggt weights fetch{' --dir ' + str(root) if root else ''}`")
        elif entry.get("revision") != pin.revision:
            row.update(ok=False, problem=f"the lock records revision {entry.get('revision')}, the pin is "
                                         f"{pin.revision}: run `sparse-vggt weights fetch`")
        else:
            digest = sha256_file(path)
            row["sha256"] = digest
            want = pin.sha256 or entry.get("sha256")
            row.update(ok=digest == want, problem=None if digest == want else
                       f"sha256 {digest} differs from {want} (recorded at fetch): the file is corrupt or was "
                       f"replaced; delete it and run `sparse-vggt weights fetch`")
        out[stage] = row
    return out


def lock_entry_for(path: str | Path) -> dict[str, Any] | None:
    """The lock entry of a fetched checkpoint file (no hashing): used by provenance to record the checksum that
    `fetch` verified. Looks in the lock of the file's ``--dir`` and in the hub cache's lock."""
    path = Path(path)
    candidates = [hub_cache_dir() / LOCK_NAME, path.parent.parent / LOCK_NAME]
    for lock_file in candidates:
        try:
            lock = json.loads(lock_file.read_text())
        except (OSError, ValueError):
            continue
        for entry in lock.values():
            if isinstance(entry, dict) and entry.get("file") and Path(entry["file"]).resolve() == path.resolve() \
                    and entry.get("bytes") == path.stat().st_size:
                return entry
    return None
