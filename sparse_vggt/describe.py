"""Describe stage: one global retrieval descriptor per kept image, in ``store.zarr/descriptors`` (N_rows, D) fp16.

Why per ingest chunk: a chunk (``images.parquet`` column chunk_id) is the unit of work and of resumption. Its rows
are written first, then ``describe_chunks/<chunk_id>`` gets ``complete: true``; a killed run redoes only chunks
without that marker. The Zarr row-chunking equals the ingest chunk size, so without skipped images a unit owns
whole Zarr chunks; with skipped rows interleaved, neighbouring units may share a Zarr chunk, which is safe because
units are written one after another and Zarr's local store replaces chunk files atomically.

Descriptors come from MegaLoc (the caller side of the reference: square resize, ImageNet normalisation) or from
a file the user brings (.npy + names .txt, .npz with ``names``/``descriptors``, or Parquet with a name and a
vector column), keyed by image path relative to the photos root (the ``path`` column; duplicates' paths work too).
Rows of skipped images stay zero and are never used.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from .config import PipelineConfig
from .progress import track
from .store import RunStore, file_identity

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DescribeError(ValueError):
    """Descriptors cannot be produced from this input; the message says what to fix."""


# ----------------------------------------------------------------------------------------------------------
# bring-your-own descriptors


def load_descriptor_file(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(names, vectors float32 (n, D)) from .npy (+ ``<stem>.txt`` names), .npz or .parquet."""
    path = Path(path)
    if not path.is_file():
        raise DescribeError(f"descriptor file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        names_file = path.with_suffix(".txt")
        if not names_file.is_file():
            raise DescribeError(f"{path}: a .npy file needs its image names, one per line, in {names_file}")
        vectors = np.load(path, allow_pickle=False)
        names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "names" not in data:
                raise DescribeError(f"{path}: an .npz needs a 'names' array (image paths) and a 'descriptors' array")
            key = "descriptors" if "descriptors" in data else next(
                (k for k in data.files if k != "names" and data[k].ndim == 2), None)
            if key is None:
                raise DescribeError(f"{path}: no 2-D descriptor array found (expected key 'descriptors')")
            names = [str(n) for n in data["names"].tolist()]
            vectors = data[key]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        name_col = next((c for c in ("name", "path", "image") if c in table.column_names), None)
        vec_col = next((c for c in ("descriptor", "vector", "embedding") if c in table.column_names), None)
        if name_col is None or vec_col is None:
            raise DescribeError(f"{path}: Parquet needs a name column (name|path|image) and a list-of-float "
                                f"column (descriptor|vector|embedding); found {table.column_names}")
        names = [str(n) for n in table.column(name_col).to_pylist()]
        col = table.column(vec_col).combine_chunks()
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
                or pa.types.is_fixed_size_list(col.type)):
            raise DescribeError(f"{path}: column {vec_col!r} must be a list of numbers, got {col.type}")
        if col.null_count:
            raise DescribeError(f"{path}: {col.null_count} image(s) have a null descriptor in {vec_col!r}")
        import pyarrow.compute as pc

        lengths = np.unique(np.asarray(pc.list_value_length(col))) if len(col) else np.array([0])
        if lengths.size != 1:
            raise DescribeError(f"{path}: descriptors in {vec_col!r} have different lengths {lengths[:5].tolist()}; "
                                "every image needs a vector of the same dimension")
        vectors = np.asarray(col.flatten(), dtype=np.float32).reshape(len(col), int(lengths[0]))
    else:
        raise DescribeError(f"{path}: unsupported descriptor file type {suffix!r}; use .npy (+ .txt names), "
                            ".npz or .parquet")
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.number):
        raise DescribeError(f"{path}: descriptors must be a 2-D numeric array (n_images, dim), got shape "
                            f"{vectors.shape} dtype {vectors.dtype}")
    if len(names) != vectors.shape[0]:
        raise DescribeError(f"{path}: {len(names)} names but {vectors.shape[0]} descriptor rows")
    if len(set(names)) != len(names):
        raise DescribeError(f"{path}: image names are not unique")
    return [n.strip().lstrip("./") if n.startswith("./") else n.strip() for n in names], vectors.astype(np.float32)


def _match_file(table: pa.Table, rows: np.ndarray, names: list[str], vectors: np.ndarray, source: str
                ) -> np.ndarray:
    """Vectors for the given ok rows, matched by path (or a duplicate's path), unit-normalised."""
    paths = table.column("path").to_pylist()
    dups = table.column("duplicates").to_pylist() if "duplicates" in table.column_names else [None] * len(paths)
    index = {n: i for i, n in enumerate(names)}
    out = np.empty((rows.size, vectors.shape[1]), np.float32)
    missing = []
    for o, r in enumerate(rows):
        hit = index.get(paths[r])
        if hit is None:
            hit = next((index[d] for d in (dups[r] or []) if d in index), None)
        if hit is None:
            missing.append(paths[r])
            continue
        out[o] = vectors[hit]
    if missing:
        raise DescribeError(f"{source} has no descriptor for {len(missing)} kept image(s), e.g. "
                            f"{', '.join(missing[:5])}. Names must be paths relative to the photos root, as in "
                            "images.parquet's path column.")
    bad = ~np.isfinite(out).all(1)
    if bad.any():
        raise DescribeError(f"{source}: NaN/Inf descriptors for {int(bad.sum())} image(s), e.g. "
                            f"{', '.join(paths[r] for r in rows[bad][:5])}")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    if np.any(norms <= 1e-12):
        raise DescribeError(f"{source}: all-zero descriptors for "
                            f"{', '.join(paths[r] for r in rows[(norms[:, 0] <= 1e-12)][:5])}")
    return out / norms  # cosine only needs directions; unit norm keeps fp16 storage in range


# ----------------------------------------------------------------------------------------------------------
# MegaLoc


_WARNED_RANDOM: set[tuple[str, str]] = set()


def _warn_random_once(preset: str, run: str) -> None:
    """One warning block per run directory and process (a flow builds the describer once per chunk)."""
    if (preset, run) in _WARNED_RANDOM:
        return
    _WARNED_RANDOM.add((preset, run))
    log.warning("describe: MegaLoc (preset %s) runs with RANDOM WEIGHTS: the descriptors and the covisibility "
                "graph are noise.\nFor real results point describe.model at a checkpoint (default gberton/MegaLoc).",
                preset)


# Set to a dict by a resident farm process (sparse_vggt.resident): describers are then kept across describe() calls
# (one MegaLoc load per process and settings). None elsewhere: local runs free the model when the stage ends.
RESIDENT: dict[str, Any] | None = None


def _describer(config: PipelineConfig, photos_root: Path, run: str) -> "_ModelDescriber":
    if RESIDENT is None:
        return _ModelDescriber(config, photos_root, run)
    key = json.dumps({"describe": config.describe.__dict__, "root": str(photos_root), "run": run},
                     sort_keys=True, default=str)
    if key not in RESIDENT:
        RESIDENT[key] = _ModelDescriber(config, photos_root, run)
    return RESIDENT[key]


def _plan_provenance(cfg: Any) -> dict[str, Any]:
    from .provenance import provenance

    return provenance(cfg.model, ("model.safetensors",), preset=cfg.preset, seed=0 if cfg.model == "random" else None)


class _ModelDescriber:
    """Runs MegaLoc over lists of image paths with threaded decoding and OOM back-off."""

    def __init__(self, config: PipelineConfig, photos_root: Path, run: str = ""):
        import torch

        from .device import select_device, select_dtype
        from .models.megaloc import MegaLoc

        cfg = config.describe
        self.cfg = cfg
        self.root = photos_root
        self.device = select_device(cfg.device)
        self.dtype = select_dtype(self.device, cfg.dtype)
        if cfg.image_size % 14:
            raise DescribeError(f"describe.image_size={cfg.image_size} must be a multiple of 14 (e.g. 322)")
        if cfg.model == "random":
            if not cfg.allow_random_weights:
                raise DescribeError("describe.model='random' builds MegaLoc with random weights, whose "
                                    "descriptors are meaningless for retrieval. Set "
                                    "describe.allow_random_weights=true to do it anyway (tests, demos).")
            _warn_random_once(cfg.preset, run)
            torch.manual_seed(0)
            self.model = MegaLoc.from_preset(cfg.preset)
            self.model_id = f"random:{cfg.preset}"
        else:
            self.model = MegaLoc.from_pretrained(cfg.model, preset=cfg.preset)
            self.model_id = cfg.model
        from .provenance import provenance

        self.weights = provenance(cfg.model, ("model.safetensors",), preset=cfg.preset,
                                  seed=0 if cfg.model == "random" else None)
        self.model.to(self.device).eval()
        self.dim = self.model.feat_dim
        self.batch = max(1, cfg.batch_size)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.pool = ThreadPoolExecutor(max_workers=4)

    def _load(self, rel: str) -> np.ndarray:
        from PIL import Image

        from .ingest import load_image

        try:
            img = load_image(self.root / rel)
        except Exception as exc:
            raise DescribeError(f"cannot read {self.root / rel} ({exc}); it was readable at scan time. "
                                "Restore it or re-run `sparse-vggt scan`.") from exc
        side = self.cfg.image_size
        img = img.resize((side, side), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)

    def __call__(self, paths: list[str]) -> np.ndarray:
        import torch

        from .device import autocast, is_out_of_memory

        images = list(self.pool.map(self._load, paths))
        out = np.empty((len(paths), self.dim), np.float32)
        s = 0
        while s < len(paths):
            e = min(len(paths), s + self.batch)
            x = torch.from_numpy(np.stack(images[s:e])).permute(0, 3, 1, 2).float().div_(255)
            x = ((x - self.mean) / self.std).to(self.device)
            try:
                with torch.inference_mode(), autocast(self.device, self.dtype):
                    out[s:e] = self.model(x).float().cpu().numpy()
            except Exception as exc:
                if is_out_of_memory(exc) and self.batch > 1:
                    self.batch = max(1, self.batch // 2)
                    log.warning("out of memory on %s; describe batch size -> %d", self.device, self.batch)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                raise
            s = e
        return out


# ----------------------------------------------------------------------------------------------------------
# stage


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


def describe(run_dir: Path, config: PipelineConfig | None = None, force: bool = False,
             chunk_ids: Iterable[int] | None = None, finish: bool = True, load_model: bool = True
             ) -> dict[str, Any]:
    """The describe stage (MegaLoc or a descriptor file) -> store.zarr/descriptors; resumable per chunk.

    ``chunk_ids`` restricts the work to those ingest chunks (the orchestrator maps one task per chunk; an
    empty list only prepares the array / finishes the stage). The stage is marked finished only once every
    chunk is complete; a partial call returns a manifest with ``"pending"`` > 0. ``finish=False`` (farm
    workers) never finishes the stage, even after the last chunk: the head finishes it once, after every worker.
    ``load_model=False`` (the farm head's plan) creates the array from the preset's dimension without loading
    MegaLoc: the head needs no weights, only the workers do.
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
    file_vectors = None
    if cfg.descriptors_file:
        names, vectors = load_descriptor_file(cfg.descriptors_file)
        file_vectors = _match_file(table, ok, names, vectors, cfg.descriptors_file)
        extra = len(names) - ok.size
        if extra > 0:
            log.info("%s: %d names do not match a kept image and are ignored", cfg.descriptors_file, extra)
        dim, model_id, describer = vectors.shape[1], f"file:{Path(cfg.descriptors_file).name}", None
        row_pos = {int(r): i for i, r in enumerate(ok)}
    else:
        meta = table.schema.metadata or {}
        if b"photos_root" not in meta:
            raise DescribeError("images.parquet has no photos_root metadata; re-run `sparse-vggt scan`")
        photos_root = Path(meta[b"photos_root"].decode())
        if (arr is not None and not force and arr.attrs.get("settings") == settings and arr.shape[0] == n_rows):
            # an earlier call made the array with these settings: load the model only if a chunk is pending
            dim, model_id, describer = int(arr.shape[1]), str(arr.attrs.get("model")), None
        elif load_model:
            describer = _describer(config, photos_root, str(store.root))
            dim, model_id = describer.dim, describer.model_id
        else:
            from .models.megaloc import PRESETS

            if cfg.preset not in PRESETS:
                raise DescribeError(f"unknown describe.preset {cfg.preset!r}; known: {', '.join(PRESETS)}")
            dim, describer = PRESETS[cfg.preset].feat_dim, None
            model_id = f"random:{cfg.preset}" if cfg.model == "random" else cfg.model

    chunk_rows = max(1, config.ingest.chunk_size)
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
        weights = (describer.weights if describer is not None else
                   {"weights": "file", "file": str(cfg.descriptors_file)} if cfg.descriptors_file else
                   _plan_provenance(cfg))
        arr.attrs.update({"model": model_id, "dim": int(dim), "settings": settings, "complete": False,
                          "weights": weights})
    done = set(store.complete_units("describe_chunks"))
    pending = [c for c in chunks if str(c) not in done]
    if chunk_ids is not None:  # orchestrated: only these chunks (added for the Prefect flow, issue 10)
        wanted = {int(c) for c in chunk_ids}
        if wanted - set(chunks):
            raise DescribeError(f"chunks {sorted(wanted - set(chunks))} do not exist (chunk ids {min(chunks)}.."
                                f"{max(chunks)} in images.parquet)")
        later = [c for c in pending if c not in wanted]
        pending = [c for c in pending if c in wanted]
    else:
        later = []
    paths = table.column("path").to_pylist()
    t_model = 0.0
    for cid in track(pending, total=len(pending), description="describing"):
        rows = chunks[cid]
        t1 = time.perf_counter()
        if file_vectors is not None:
            vec = file_vectors[[row_pos[int(r)] for r in rows]]
        else:
            if describer is None:
                describer = _describer(config, photos_root, str(store.root))
            vec = describer([paths[r] for r in rows])
            if not np.isfinite(vec).all():
                raise DescribeError(f"chunk {cid}: the model produced NaN/Inf descriptors (dtype "
                                    f"{describer.dtype}); try --set describe.dtype=float32")
        t_model += time.perf_counter() - t1
        _write_rows(arr, rows, vec.astype(np.float16))
        store.mark_unit_complete(f"describe_chunks/{cid}", images=int(rows.size), model=model_id)
    manifest = {"images": int(ok.size), "rows": int(n_rows), "dim": int(dim), "model": model_id,
                "chunks": len(chunks), "chunks_computed": len(pending),
                "images_computed": int(sum(chunks[c].size for c in pending)),
                "chunks_resumed": len(chunks) - len(pending) - len(later), "pending": len(later),
                "seconds": round(time.perf_counter() - t0, 2),
                "weights": arr.attrs.get("weights") or (describer.weights if describer is not None else None)}
    if describer is not None:
        manifest.update(device=str(describer.device), dtype=str(describer.dtype).replace("torch.", ""),
                        image_size=cfg.image_size,
                        images_per_s=round(sum(chunks[c].size for c in pending) / t_model, 2) if t_model else None)
    if later or not finish:
        manifest["pending"] = len(later)
        return manifest
    version = _dt.datetime.now(_dt.timezone.utc).isoformat()
    arr.attrs.update({"complete": True, "version": version})
    from .store import fsync_tree

    fsync_tree(store.zarr_path / "descriptors")
    manifest["integrity"] = store.array_integrity("descriptors")  # verified by RunStore.stage_intact (issue 15)
    store.stage_finished("describe", manifest)
    return manifest


def iter_descriptor_rows(store: RunStore, block: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, fp16 block) over store.zarr/descriptors, for tools that need to scan them."""
    arr = store.zarr["descriptors"]
    for s in range(0, arr.shape[0], block):
        yield s, np.asarray(arr[s:s + block])


def describe_units(run_dir: Path, chunk_ids: Iterable[int], per_unit: int = 1) -> list[list[int]]:
    """Group ingest chunks into farm units whose rows touch disjoint Zarr chunks of ``descriptors``.

    Skipped images shift rows, so one ingest chunk can straddle two Zarr chunks; two workers writing into the
    same Zarr chunk would overwrite each other's rows. Chunks sharing a Zarr chunk are kept in one unit (a
    union-find over shared Zarr chunks), then whole groups are packed, in order, into units of about
    ``per_unit`` ingest chunks. Call after the array exists (`describe(..., chunk_ids=[])`).
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
run = lambda run_dir, config=None, *, force=False, units=None: describe(run_dir, config, force=force, chunk_ids=units)  # noqa: E731  # TEMP r18-sched
