"""Describe stage: one global retrieval descriptor per kept image, in ``store.zarr/descriptors`` (N_rows, D) fp16.

Why per ingest chunk: a chunk (``images.parquet`` column chunk_id) is the unit of work and of resumption. Its rows
are written first, then ``describe_chunks/<chunk_id>`` gets ``complete: true``; a killed run redoes only chunks
without that marker. The Zarr row-chunking equals the ingest chunk size, so without skipped images a unit owns
whole Zarr chunks; with skipped rows interleaved, neighbouring units may share a Zarr chunk, which is safe because
units are written one after another and Zarr's local store replaces chunk files atomically.

What computes the descriptors is a `sparse_vggt.retrieval` entry chosen by ``describe.descriptor`` (MegaLoc by
default; a file the user brings whenever ``describe.descriptors_file`` is set). Rows of skipped images stay zero
and are never used.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from . import retrieval
from .config import PipelineConfig
from .progress import track
from .retrieval import DescribeError, DescribeInputs
from .durable import file_identity
from .store import RunStore

log = logging.getLogger(__name__)

__all__ = ["DescribeError", "run", "describe_units"]

# Set to a dict by a resident farm process (sparse_vggt.resident): describers are then kept across run() calls
# (one model load per process and settings). None elsewhere: local runs free the model when the stage ends.
RESIDENT: dict[str, Any] | None = None


def _describer(config: PipelineConfig, inputs: DescribeInputs) -> Any:
    """The describer of these settings; kept across calls in a resident process (cheap eager ones never are:
    a descriptor file is re-read, so an edited file is seen)."""
    entry = retrieval.for_config(config.describe)
    if RESIDENT is None or entry.eager:
        return entry.build(inputs)
    key = json.dumps({"describe": config.describe.__dict__, "root": str(inputs.photos_root()), "run": inputs.run},
                     sort_keys=True, default=str)
    if key not in RESIDENT:
        RESIDENT[key] = entry.build(inputs)
    return RESIDENT[key]


def _chunks(table: pa.Table) -> tuple[dict[int, np.ndarray], np.ndarray]:
    status = np.array(table.column("status").to_pylist(), dtype=object)
    chunk = np.asarray(table.column("chunk_id").to_numpy(zero_copy_only=False), dtype=np.int64)
    ok = np.flatnonzero(status == "ok")
    if np.any(chunk[ok] < 0):
        raise DescribeError("images.parquet has kept images with chunk_id -1; re-run `sparse-vggt scan`")
    order = np.argsort(chunk[ok], kind="stable")
    ids, starts = np.unique(chunk[ok][order], return_index=True)
    groups = np.split(ok[order], starts[1:])
    return {int(c): np.sort(g) for c, g in zip(ids, groups)}, ok


def _settings(config: PipelineConfig) -> dict[str, Any]:
    s = dict(config.result_affecting()["describe"])
    f = s.get("descriptors_file")
    if f:
        p = Path(f)
        s["descriptors_file_stat"] = list(file_identity(p)) if p.exists() else None
    return s


def _write_rows(arr: Any, rows: np.ndarray, values: np.ndarray) -> None:
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo == rows.size:
        arr[lo:hi] = values
    else:
        arr.oindex[rows, :] = values


def run(run_dir: Path, config: PipelineConfig | None = None, *, force: bool = False,
        units: Iterable[int] | None = None, finish: bool = True, load_model: bool = True) -> dict[str, Any]:
    """The describe stage -> store.zarr/descriptors; resumable per ingest chunk.

    ``units`` (ingest chunk ids) restricts the work to those chunks (the orchestrator maps one task per chunk; an
    empty list only prepares the array / finishes the stage); None = every pending chunk. The stage is marked
    finished only once every chunk is complete; a partial call returns a manifest with ``"pending"`` > 0.
    ``force`` recomputes every chunk. ``finish=False`` (farm workers) never finishes the stage, even after the
    last chunk: the head finishes it once, after every worker. ``load_model=False`` (the farm head's plan)
    creates the array from the configuration (`Retrieval.plan`) without loading a model: the head needs no
    weights, only the workers do.
    """
    t0 = time.perf_counter()
    store = RunStore.open(run_dir)
    config = config or store.config()
    cfg = config.describe
    store.require_stage("scan", "describe")
    table = store.read_table("images")
    n_rows = table.num_rows
    chunks, ok = _chunks(table)
    if ok.size == 0:
        raise DescribeError(f"{store.root}: zero kept images (all {n_rows} were skipped at scan); nothing to "
                            "describe. Check the photos folder and images.parquet's status column.")
    settings = _settings(config)
    arr = store.zarr["descriptors"] if "descriptors" in store.zarr else None
    if (not force and arr is not None and store.is_stage_complete("describe")
            and arr.attrs.get("settings") == settings and arr.shape[0] == n_rows):
        log.info("describe stage already finished in %s with the same settings; nothing to do", store.root)
        return store.stage_manifest("describe")

    store.stage_started("describe")
    entry = retrieval.for_config(cfg)
    inputs = DescribeInputs(config, table, ok, str(store.root))
    describer = None
    weights = None
    if entry.eager:
        describer = _describer(config, inputs)
        dim, model_id = describer.dim, describer.model_id
    elif (arr is not None and not force and arr.attrs.get("settings") == settings and arr.shape[0] == n_rows):
        # an earlier call made the array with these settings: load the model only if a chunk is pending
        dim, model_id = int(arr.shape[1]), str(arr.attrs.get("model"))
    elif load_model or entry.plan is None:
        describer = _describer(config, inputs)
        dim, model_id = describer.dim, describer.model_id
    else:
        dim, model_id, weights = entry.plan(cfg)

    chunk_rows = max(1, config.scan.chunk_size)
    if arr is not None and (force or arr.shape != (n_rows, dim) or arr.attrs.get("settings") != settings):
        if arr.shape[1] != dim and not force:
            log.warning("replacing descriptors of dimension %d (%s) by dimension %d (%s)",
                        arr.shape[1], arr.attrs.get("model"), dim, model_id)
        store.remove_group("describe_chunks")
        del store.zarr["descriptors"]
        arr = None
    if arr is None:
        store.remove_group("describe_chunks")
        arr = store.zarr.create_array("descriptors", shape=(n_rows, dim), dtype="float16",
                                      chunks=(min(chunk_rows, max(n_rows, 1)), dim), fill_value=0)
        arr.attrs.update({"model": model_id, "dim": int(dim), "settings": settings, "complete": False,
                          "weights": describer.weights if describer is not None else weights})
    done = set(store.complete_units("describe_chunks"))
    pending = [c for c in chunks if str(c) not in done]
    if units is not None:  # orchestrated: only these chunks
        wanted = {int(c) for c in units}
        if wanted - set(chunks):
            raise DescribeError(f"chunks {sorted(wanted - set(chunks))} do not exist (chunk ids {min(chunks)}.."
                                f"{max(chunks)} in images.parquet)")
        later = [c for c in pending if c not in wanted]
        pending = [c for c in pending if c in wanted]
    else:
        later = []
    t_model = 0.0
    for cid in track(pending, total=len(pending), description="describing"):
        rows = chunks[cid]
        t1 = time.perf_counter()
        if describer is None:
            describer = _describer(config, inputs)
        try:
            vec = describer(rows)
        except DescribeError as exc:
            raise DescribeError(f"chunk {cid}: {exc}") from exc
        t_model += time.perf_counter() - t1
        _write_rows(arr, rows, vec.astype(np.float16))
        store.mark_unit_complete(f"describe_chunks/{cid}", images=int(rows.size), model=model_id)
    computed = int(sum(chunks[c].size for c in pending))
    manifest = {"images": int(ok.size), "rows": int(n_rows), "dim": int(dim), "model": model_id,
                "chunks": len(chunks), "chunks_computed": len(pending),
                "images_computed": computed,
                "chunks_resumed": len(chunks) - len(pending) - len(later), "pending": len(later),
                "seconds": round(time.perf_counter() - t0, 2),
                "weights": arr.attrs.get("weights") or (describer.weights if describer is not None else None)}
    if describer is not None:
        manifest.update(describer.manifest(computed, t_model))
    if later or not finish:
        manifest["pending"] = len(later)
        manifest["pending_chunks"] = later  # what an orchestrator still has to run (`scheduler.describe_plan`)
        return manifest
    version = _dt.datetime.now(_dt.timezone.utc).isoformat()
    arr.attrs.update({"complete": True, "version": version})
    from .durable import fsync_tree

    fsync_tree(store.zarr_path / "descriptors")
    manifest["integrity"] = store.array_integrity("descriptors")  # verified by RunStore.stage_intact
    store.stage_finished("describe", manifest)
    return manifest


def describe_units(run_dir: Path, chunk_ids: Iterable[int], per_unit: int = 1) -> list[list[int]]:
    """Group ingest chunks into farm units whose rows touch disjoint Zarr chunks of ``descriptors``.

    Skipped images shift rows, so one ingest chunk can straddle two Zarr chunks; two workers writing into the
    same Zarr chunk would overwrite each other's rows. Chunks sharing a Zarr chunk are kept in one unit (a
    union-find over shared Zarr chunks), then whole groups are packed, in order, into units of about
    ``per_unit`` ingest chunks. Call after the array exists (`run(..., units=[])`).
    """
    store = RunStore.open(run_dir)
    chunks, _ = _chunks(store.read_table("images", columns=["status", "chunk_id"]))
    wanted = sorted({int(c) for c in chunk_ids})
    if "descriptors" not in store.zarr:
        raise DescribeError(f"{run_dir}: no descriptor array yet; plan the describe stage first")
    rows_per = int(store.zarr["descriptors"].chunks[0])
    parent = {c: c for c in wanted}

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    owner: dict[int, int] = {}
    for c in wanted:
        for z in np.unique(chunks[c] // rows_per).tolist():
            if z in owner:
                parent[find(c)] = find(owner[z])
            else:
                owner[z] = c
    groups: dict[int, list[int]] = {}
    for c in wanted:
        groups.setdefault(find(c), []).append(c)
    units: list[list[int]] = []
    for g in sorted(groups.values()):
        if units and len(units[-1]) + len(g) <= max(1, per_unit):
            units[-1].extend(g)
        else:
            units.append(list(g))
    return units
