"""Growing collections: each scheduled run gets a new dated run directory that reuses the previous run's work.

Why: a nightly run on a folder that keeps gaining photos must neither refuse the changed folder (a finished scan
refuses it, on purpose: the run directory describes one photo set) nor recompute 50,000 descriptors for 200 new
photos. So every scheduled run is a fresh ``<runs_root>/<YYYY-MM-DD_HHMMSS>/`` and, before its describe stage,
the descriptor rows of photos the newest earlier run already described (same sha256, same describe settings)
are copied across.

What is reused, and why no more: descriptors are a per-photo function of the photo's bytes and the describe
settings, so they carry over by content hash. The covisibility graph is a k-nearest-neighbour graph over *all*
photos: an added photo can enter the neighbour list of any old photo, which changes the partition, so cluster
membership, the sparse attention masks and hence every cluster's VGGT output may change; the graph, partition,
clusters and merge are therefore recomputed when the photo set changed. When it did not change at all, nothing
is recomputed: the run reports that the previous run is still current.

Reuse is per ingest chunk (the describe stage's unit of work and completion marker): a chunk whose photos were
all described before is copied and marked complete; a chunk holding a new photo is computed whole.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from .config import PipelineConfig
from .store import RunStore

log = logging.getLogger(__name__)

DATED_FORMAT = "%Y-%m-%d_%H%M%S"


def dated_run_dir(runs_root: str | Path, now: _dt.datetime | None = None) -> Path:
    """A new ``<runs_root>/<YYYY-MM-DD_HHMMSS>`` (UTC); a suffix ``-2``, ``-3`` ... if that second is taken."""
    root = Path(runs_root).expanduser().resolve()
    stamp = (now or _dt.datetime.now(_dt.timezone.utc)).strftime(DATED_FORMAT)
    path, n = root / stamp, 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    return path


def _is_dated(name: str) -> bool:
    return re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{6}(-\d+)?", name) is not None


def previous_runs(runs_root: str | Path, exclude: Path | None = None) -> list[Path]:
    """Dated run directories under ``runs_root`` (newest first) whose export stage finished."""
    root = Path(runs_root).expanduser()
    if not root.is_dir():
        return []
    out = []
    for d in sorted((p for p in root.iterdir() if p.is_dir() and _is_dated(p.name)), key=lambda p: p.name,
                    reverse=True):
        if exclude is not None and d.resolve() == exclude.resolve():
            continue
        if (d / "run.json").is_file() and RunStore.open(d).is_stage_complete("export"):
            out.append(d)
    return out


def _photo_rows(store: RunStore) -> list[tuple[str, str, str]]:
    t = store.read_table("images", ["path", "sha256", "status"])
    return sorted(zip(t.column("path").to_pylist(), t.column("sha256").to_pylist(), t.column("status").to_pylist()))


def same_photo_set(prev: str | Path, new: str | Path) -> bool:
    """Both scans list the same files with the same content and the same kept/skipped verdicts."""
    return _photo_rows(RunStore.open(prev)) == _photo_rows(RunStore.open(new))


def reuse_descriptors(prev_dir: str | Path, new_dir: str | Path, config: PipelineConfig | None = None
                      ) -> dict[str, Any]:
    """Copy the previous run's descriptor rows into the new run's (scanned, not yet described) store.

    Returns what was reused: ``{"from", "chunks_reused", "chunks_total", "images_reused", "images_new",
    "reason"}``. Nothing is copied (``reason`` says why) when the previous run's descriptors are not intact or
    were made with other describe settings, or the new run already has descriptors.
    """
    from .describe import _chunks, _settings

    prev, new = RunStore.open(prev_dir), RunStore.open(new_dir)
    config = config or new.config()
    new.require_stage("scan", "reuse of descriptors")
    table = new.read_table("images")
    chunks, ok = _chunks(table)
    out: dict[str, Any] = {"from": str(prev.root), "chunks_total": len(chunks), "chunks_reused": 0,
                           "images_reused": 0, "images_new": int(ok.size), "reason": None}
    if "descriptors" in new.zarr:
        out["reason"] = "the new run already has descriptors"
        return out
    if not prev.stage_intact("describe"):
        out["reason"] = "the previous run's descriptors are not finished or failed verification"
        return out
    parr = prev.zarr["descriptors"]
    settings = _settings(config)
    if parr.attrs.get("settings") != settings:
        out["reason"] = "describe settings differ from the previous run's"
        return out
    ptab = prev.read_table("images", ["sha256", "status"])
    prev_row = {sha: i for i, (sha, st) in enumerate(zip(ptab.column("sha256").to_pylist(),
                                                         ptab.column("status").to_pylist()))
                if st == "ok" and sha}
    sha = table.column("sha256").to_pylist()
    known = {int(r) for r in ok if sha[r] in prev_row}
    n_rows, dim = table.num_rows, int(parr.shape[1])
    chunk_rows = max(1, config.ingest.chunk_size)
    arr = new.zarr.create_array("descriptors", shape=(n_rows, dim), dtype="float16",
                                chunks=(min(chunk_rows, max(n_rows, 1)), dim), fill_value=0)
    arr.attrs.update({"model": parr.attrs.get("model"), "dim": dim, "settings": settings, "complete": False,
                      "weights": parr.attrs.get("weights"), "reused_from": str(prev.root)})
    for cid, rows in chunks.items():
        if not all(int(r) in known for r in rows):
            continue
        src = np.array([prev_row[sha[r]] for r in rows])
        order = np.argsort(src, kind="stable")
        values = np.empty((rows.size, dim), np.float16)
        values[order] = parr.oindex[src[order], :]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo == rows.size:
            arr[lo:hi] = values
        else:
            arr.oindex[rows, :] = values
        new.mark_unit_complete(f"describe_chunks/{cid}", images=int(rows.size), model=parr.attrs.get("model"),
                               reused_from=str(prev.root))
        out["chunks_reused"] += 1
        out["images_reused"] += int(rows.size)
    out["images_new"] = int(ok.size) - len(known)
    out["images_recomputed_known"] = len(known) - out["images_reused"]  # old photos sharing a chunk with new ones
    log.info("reused %d of %d descriptor chunks (%d images) from %s", out["chunks_reused"], len(chunks),
             out["images_reused"], prev.root)
    return out


def _cluster_content_keys(store: RunStore, config: PipelineConfig) -> dict[str, int]:
    """Per cluster, a key of what its VGGT output depends on, in content terms: the ordered sha256 of its frames,
    their neighbour positions and the result-affecting reconstruct settings (`reconstruct.cluster_inputs_key`
    with sha256 instead of run-specific image ids)."""
    import hashlib
    import json

    from .reconstruct import cluster_frames

    if not store.has_table("clusters"):
        return {}
    sha = store.read_table("images", ["sha256"]).column("sha256").to_pylist()
    table = store.read_table("clusters")
    out = {}
    for cid in sorted({int(c) for c in table.column("cluster_id").to_pylist()}):
        ids, neighbors = cluster_frames(table, cid)
        payload = {"frames": [sha[int(i)] for i in ids], "neighbors": neighbors,
                   "reconstruct": config.result_affecting()["reconstruct"], "k": int(config.partition.k)}
        out[hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()] = cid
    return out


def clusters_with_unchanged_inputs(prev_dir: str | Path, new_dir: str | Path,
                                   config: PipelineConfig | None = None) -> dict[str, Any]:
    """How many of the new run's clusters have exactly the inputs of a previous cluster (same photos in the same
    order, same neighbour sets, same settings): what reusing clusters could save after a re-partition. Reported,
    not reused: the partition of the grown graph is recomputed globally, so on a grown folder this is usually
    small (see the module docstring)."""
    prev, new = RunStore.open(prev_dir), RunStore.open(new_dir)
    config = config or new.config()
    a, b = _cluster_content_keys(prev, config), _cluster_content_keys(new, config)
    return {"clusters": len(b), "same_inputs_as_a_previous_cluster": len(set(a) & set(b))}
