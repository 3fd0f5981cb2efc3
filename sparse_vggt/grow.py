"""Growing collections: each scheduled run gets a new dated run directory that reuses the previous run's work.

Why: a nightly run on a folder that keeps gaining photos must neither refuse the changed folder (a finished scan
refuses it, on purpose: the run directory describes one photo set) nor recompute 50,000 descriptors for 200 new
photos. So every scheduled run is a fresh ``<runs_root>/<YYYY-MM-DD_HHMMSS>/`` and, before its describe stage,
the descriptor rows of photos the newest earlier run already described (same sha256, same describe settings)
are copied across.

What is reused:

* descriptors: a per-photo function of the photo's bytes and the describe settings, so they carry over by
  content hash (:func:`reuse_descriptors`);
* graph and partition: only when the scan lists the same photos in the same rows (image ids are row numbers)
  and the settings of those stages and every earlier one are unchanged (:func:`reuse_upstream`); the graph is
  a k-nearest-neighbour graph over *all* photos, so an added photo can enter any old photo's neighbour list
  and the partition of a grown folder is recomputed;
* clusters: after the new run's partition, every cluster whose inputs (the photos by content hash, their
  order, their neighbours, the reconstruct settings) equal a finished cluster of the previous run is copied
  with a new, verified marker instead of recomputed (:func:`reuse_clusters`); on a grown folder this is the
  clusters the re-partition left untouched, on an unchanged one all of them.

When neither the photos nor the result-affecting settings changed, nothing is recomputed: the run reports that
the previous run is still current.

Reuse is per ingest chunk (the describe stage's unit of work and completion marker): a chunk whose photos were
all described before is copied and marked complete; a chunk holding a new photo is computed whole.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .config import PipelineConfig
from .durable import atomic_write_bytes, fsync_tree
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
    chunk_rows = max(1, config.scan.chunk_size)
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


def _cluster_content_keys(store: RunStore, config: PipelineConfig
                          ) -> dict[str, tuple[int, np.ndarray, list[list[int]]]]:
    """Per cluster, a key of what its VGGT output depends on, in content terms: the ordered sha256 of its frames,
    their neighbour positions and the result-affecting reconstruct settings (`reconstruct.cluster_inputs_key`
    with sha256 instead of run-specific image ids, which are row numbers). Key -> (cluster id, image ids,
    neighbours)."""
    from .reconstruct import cluster_frames, cluster_inputs_key

    if not store.has_table("clusters"):
        return {}
    sha = store.read_table("images", ["sha256"]).column("sha256").to_pylist()
    table = store.read_table("clusters")
    out = {}
    for cid in sorted({int(c) for c in table.column("cluster_id").to_pylist()}):
        ids, neighbors = cluster_frames(table, cid)
        out[cluster_inputs_key(config, ids, neighbors, frames=[sha[int(i)] for i in ids])] = (cid, ids, neighbors)
    return out


def _copy_unit(prev: RunStore, src: str, new: RunStore, dst: str) -> Path:
    """Copy a Zarr group from ``prev`` to ``new`` (replacing what is there); returns the new group's folder."""
    new.remove_group(dst)
    parent = dst.rpartition("/")[0]
    if parent:
        new.group(parent)  # Zarr v3 needs each parent group's metadata
    target = new.zarr_path / dst
    shutil.copytree(prev.zarr_path / src, target)
    fsync_tree(target)
    new._zarr = None
    return target


def reuse_clusters(prev_dir: str | Path, new_dir: str | Path, config: PipelineConfig | None = None
                   ) -> dict[str, Any]:
    """Copy every finished cluster of the previous run whose inputs equal one of the new run's clusters (by
    content: see `_cluster_content_keys`) into the new run, so the cluster stage finds it complete.

    A previous cluster qualifies only if its unit verifies in full (CRC of every byte) and its recorded
    ``inputs`` key equals the one the new settings give for it (so it was computed with these reconstruct
    settings), and the scan settings of both runs agree. The copy gets the new run's image ids and inputs key and
    a fresh marker (written last, so an interrupted copy is simply redone). Returns ``{"clusters", "reused",
    "map": {new id: previous id}, "reason"}``.
    """
    from .reconstruct import _group, check_cluster, cluster_inputs_key

    prev, new = RunStore.open(prev_dir), RunStore.open(new_dir)
    config = config or new.config()
    new_keys = _cluster_content_keys(new, config)
    out: dict[str, Any] = {"from": str(prev.root), "clusters": len(new_keys), "reused": 0, "map": {},
                           "reason": None}
    if prev.config().result_affecting()["scan"] != config.result_affecting()["scan"]:
        out["reason"] = "scan settings differ from the previous run's"
        return out
    prev_keys = _cluster_content_keys(prev, config)
    for key, (cid, ids, neighbors) in new_keys.items():
        if key not in prev_keys:
            continue
        if check_cluster(new, cid, cluster_inputs_key(config, ids, neighbors), full=False)[0]:
            continue  # already there (a resumed scheduled run)
        pcid, pids, pneighbors = prev_keys[key]
        done, _ = check_cluster(prev, pcid, cluster_inputs_key(config, pids, pneighbors), full=True)
        if not done or prev.unit_attrs(_group(pcid)).get("inputs") is None:
            continue
        target = _copy_unit(prev, _group(pcid), new, _group(cid))
        meta_path = target / "zarr.json"
        meta = json.loads(meta_path.read_text())
        attrs = {k: v for k, v in meta.get("attributes", {}).items()
                 if k not in ("complete", "completed_at", "arrays", "inputs", "reused_from")}
        meta["attributes"] = {}  # no marker until the copy is adapted
        atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
        new._zarr = None
        new.write_array(new.group(_group(cid)), "image_ids", np.asarray(ids, np.int64), chunks=(len(ids),))
        new.mark_unit_complete(_group(cid), **attrs, inputs=cluster_inputs_key(config, ids, neighbors),
                               reused_from={"run": str(prev.root), "cluster_id": int(pcid)})
        out["map"][str(cid)] = int(pcid)
        out["reused"] += 1
    if out["reused"]:
        log.info("reused %d of %d clusters from %s", out["reused"], len(new_keys), prev.root)
    return out


def _same_rows(prev: RunStore, new: RunStore) -> bool:
    cols = ["path", "sha256", "status"]
    a, b = prev.read_table("images", cols), new.read_table("images", cols)
    return all(a.column(c).to_pylist() == b.column(c).to_pylist() for c in cols)


def reuse_upstream(prev_dir: str | Path, new_dir: str | Path, config: PipelineConfig | None = None
                   ) -> dict[str, Any]:
    """Same photos (same rows in the same order) but other settings: copy the previous run's finished describe,
    graph and partition outputs, each as long as its own and every earlier stage's result-affecting settings are
    unchanged and its output verifies. Returns ``{"stages": [...copied], "reason": why the next one was not}``.

    The copies are byte-for-byte (descriptors with their version attribute, which the graph unit records), with
    the previous run's stage manifests, so the flow treats those stages as finished and intact."""
    prev, new = RunStore.open(prev_dir), RunStore.open(new_dir)
    config = config or new.config()
    out: dict[str, Any] = {"from": str(prev.root), "stages": [], "reason": None}
    if not _same_rows(prev, new):
        out["reason"] = "the scans differ (photos or their order)"
        return out
    if any(new.is_stage_complete(s) or (new.zarr_path / g).exists()
           for s, g in (("describe", "descriptors"), ("graph", "graph"), ("partition", "clusters"))):
        out["reason"] = "the new run already has descriptors, a graph or a partition"
        return out
    old, now = prev.config().result_affecting(), config.result_affecting()
    what = {"describe": (["descriptors", "describe_chunks"], None), "graph": (["graph"], None),
            "partition": ([], "clusters")}
    for stage, sections in (("describe", ("scan", "describe")), ("graph", ("graph",)),
                            ("partition", ("partition",))):
        if any(old[s] != now[s] for s in sections):
            out["reason"] = f"{stage} settings differ from the previous run's"
            break
        if not prev.stage_intact(stage):
            out["reason"] = f"the previous run's {stage} output is not finished or fails verification"
            break
        groups, table = what[stage]
        for g in groups:
            if (prev.zarr_path / g).exists():
                _copy_unit(prev, g, new, g)
        if table:
            atomic_write_bytes(new.table_path(table), prev.table_path(table).read_bytes())
        new.stage_finished(stage, {**prev.stage_manifest(stage), "reused_from": str(prev.root)})
        out["stages"].append(stage)
    if out["stages"]:
        log.info("reused the %s stage(s) of %s", ", ".join(out["stages"]), prev.root)
    return out
