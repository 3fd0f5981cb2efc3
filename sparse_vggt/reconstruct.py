"""Reconstruct stage: one sparse-VGGT forward per cluster, written to ``store.zarr/clusters/<id>/``.

For each cluster of ``tables/clusters.parquet`` the frames are loaded in the partitioner's order (position 0
is the reference frame), preprocessed at the model resolution, and run through VGGT whose global attention
spans only each frame's listed neighbours (`sparse_vggt.layers.sparse_attention`). Cameras are decoded from the
pose encoding and intrinsics mapped back to original upright pixels; depth and confidence stay at model resolution with
``depth_to_image`` mapping their pixel grid to the original image.

A cluster's group gets its completion marker last; a complete cluster is skipped, an incomplete one is
deleted and redone. "Complete" means the marker verifies (every array's bytes match the manifest written with it,
`sparse_vggt.store`) and was written for the same inputs: the cluster's frames, order and neighbours and the
result-affecting reconstruct settings (``inputs`` attribute), so a re-partition or a forced config change redoes
exactly the clusters it changes. Out-of-memory on CUDA/MPS and on the CPU (allocator failures, MemoryError)
becomes `ClusterOutOfMemory` so the orchestrator can split the cluster (`sparse_vggt.partition.split_cluster`) and
retry. The model is built once per process and reused across clusters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from .config import PipelineConfig, ReconstructConfig
from .device import autocast, is_out_of_memory, select_device, select_dtype
from .progress import layer_progress, track
from .store import RunStore
from .provenance import provenance

log = logging.getLogger(__name__)

STAGE = "reconstruct"
MIN_FOV = 1e-3  # radians; smaller predicted fields of view are clamped (see decode_cameras)
_MODELS: dict[tuple[Any, ...], nn.Module] = {}


class ClusterOutOfMemory(RuntimeError):
    """The accelerator ran out of memory on this cluster; split it and retry."""

    def __init__(self, cluster_id: int, message: str):
        super().__init__(
            f"cluster {cluster_id} does not fit in accelerator memory ({message}). Split it "
            "(orchestration.oom_split, or sparse_vggt.partition.split_cluster) or lower partition.max_cluster_frames."
        )
        self.cluster_id = int(cluster_id)
        self.message = message


class ReconstructError(RuntimeError):
    """Input of the reconstruct stage is inconsistent; the message says what to fix."""


_CPU_OOM_MARKS = ("can't allocate memory", "cannot allocate memory", "defaultcpuallocator", "not enough memory")


def is_oom(exc: BaseException) -> bool:
    """Accelerator OOM (device.is_out_of_memory) and host OOM: MemoryError and CPU allocator failures."""
    if is_out_of_memory(exc) or isinstance(exc, MemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, (RuntimeError, OSError)) and any(m in msg for m in _CPU_OOM_MARKS)


def cluster_inputs_key(config: PipelineConfig, image_ids: np.ndarray, neighbors: list[list[int]],
                       frames: list[str] | None = None) -> str:
    """What a cluster's result depends on: its frames in order, their neighbours and the result-affecting
    reconstruct settings. Stored on the unit; a mismatch means the unit is stale and is redone. ``frames``: the
    frames' content hashes instead of this run's image ids (row numbers), to compare clusters across runs."""
    who = {"frames": frames} if frames is not None else {"image_ids": [int(i) for i in image_ids]}
    payload = {**who, "neighbors": neighbors,
               "reconstruct": config.result_affecting()["reconstruct"], "k": int(config.partition.attention_neighbors)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def check_cluster(store: RunStore, cluster_id: int, key: str | None, full: bool = True) -> tuple[bool, str]:
    """(done, why not): the unit's marker verifies and matches ``key`` (when given)."""
    path = _group(cluster_id)
    check = store.verify_unit(path, full=full)
    if not check:
        return False, check.reason if check.marked else ""
    recorded = store.unit_attrs(path).get("inputs")
    if key is not None and recorded is not None and recorded != key:
        return False, "stale: its frames, neighbours or reconstruct settings changed since it was computed"
    return True, ""


def cluster_status(run_dir: str | Path, config: PipelineConfig, full: bool = True) -> tuple[list[int], list[int]]:
    """(all cluster ids, those to (re)compute). A marked cluster that fails verification or is stale is recorded
    as redone in events.jsonl, and a finished reconstruct stage is invalidated (with merge and export)."""
    store = RunStore.open(run_dir)
    table = store.read_table("clusters")
    all_ids = sorted({int(c) for c in table.column("cluster_id").to_pylist()})
    pending: list[int] = []
    bad: list[str] = []
    for cid in all_ids:
        image_ids, neighbors = cluster_frames(table, cid)
        done, why = check_cluster(store, cid, cluster_inputs_key(config, image_ids, neighbors), full=full)
        if not done:
            pending.append(cid)
            if why:
                store.redo_unit(_group(cid), why)
                bad.append(f"cluster {cid}: {why}")
    if pending and store.is_stage_complete(STAGE):
        store.invalidate_from(STAGE, "; ".join(bad) or f"{len(pending)} cluster(s) not complete")
    return all_ids, pending


# ---- cluster table ---------------------------------------------------------------------------------


def cluster_frames(clusters: pa.Table, cluster_id: int) -> tuple[np.ndarray, list[list[int]]]:
    """Image ids of one cluster in position order, and each frame's neighbours as positions."""
    ids = np.asarray(clusters.column("cluster_id").to_numpy())
    rows = np.nonzero(ids == cluster_id)[0]
    if rows.size == 0:
        raise ReconstructError(f"cluster {cluster_id} is not in clusters.parquet")
    sub = clusters.take(pa.array(rows))
    positions = np.asarray(sub.column("position").to_numpy(), dtype=np.int64)
    order = np.argsort(positions, kind="stable")
    if not np.array_equal(positions[order], np.arange(len(rows))):
        raise ReconstructError(
            f"cluster {cluster_id}: positions must be 0..{len(rows) - 1} exactly once, got {sorted(positions.tolist())}"
        )
    image_ids = np.asarray(sub.column("image_id").to_numpy(), dtype=np.int64)[order]
    pos_of = {int(img): p for p, img in enumerate(image_ids)}
    neighbor_lists = sub.column("neighbors").to_pylist()
    neighbors: list[list[int]] = []
    for r in order:
        listed = neighbor_lists[r] or []
        missing = [int(j) for j in listed if int(j) not in pos_of]
        if missing:
            raise ReconstructError(
                f"cluster {cluster_id}: image {int(sub.column('image_id')[r].as_py())} lists neighbours {missing} "
                "that are not in the cluster; re-run `sparse-vggt partition`"
            )
        neighbors.append([pos_of[int(j)] for j in listed])
    return image_ids, neighbors


# ---- model -----------------------------------------------------------------------------------------


def load_model(cfg: ReconstructConfig, device: torch.device, k: int = 10) -> nn.Module:
    """The configured VGGT (sparse or dense global attention), cached for the life of the process."""
    key = (cfg.model, cfg.preset, cfg.seed, cfg.attention, cfg.special_tokens_global, cfg.attention_memory_mb,
           cfg.attention_backend, k, str(device))
    model = _MODELS.get(key)
    if model is not None:
        return model
    if cfg.model == "random" and not cfg.allow_random_weights:
        raise ReconstructError(
            "reconstruct.model='random' gives meaningless reconstructions; set "
            "reconstruct.allow_random_weights=true if that is really what you want (tests, demos)"
        )
    from .models import VGGT

    if cfg.attention not in ("sparse", "dense"):
        raise ReconstructError(f"reconstruct.attention must be 'sparse' or 'dense', got {cfg.attention!r}")
    sparse = None
    if cfg.attention == "sparse":
        from .layers.sparse_attention import SparseContext

        sparse = SparseContext(memory_budget_mb=cfg.attention_memory_mb, backend=cfg.attention_backend,
                               special_tokens_global=cfg.special_tokens_global)
    if cfg.model == "random":
        log.warning("RECONSTRUCT USES RANDOM WEIGHTS (preset %s, seed %d): poses and depths are meaningless.\n"
                    "For real results point reconstruct.model at a checkpoint (default facebook/VGGT-1B).",
                    cfg.preset, cfg.seed)
        torch.manual_seed(cfg.seed)
        model = VGGT.from_preset(cfg.preset, sparse=sparse)
    else:
        model = VGGT.from_pretrained(cfg.model, preset=cfg.preset, sparse=sparse)
    _lean_weights(model, cfg, device)  # before the move: no full-precision copy of the aggregator on the GPU
    model = model.to(device).eval()
    _MODELS.clear()  # one model per process: a different config replaces it
    _MODELS[key] = model
    return model


def _lean_weights(model: nn.Module, cfg: ReconstructConfig, device: torch.device) -> None:
    """Half-precision aggregator weights on CUDA/MPS (the memory budget of large clusters); on MPS also cap the allocator at
    ``reconstruct.memory_gb`` so a cluster sized for that budget fails fast instead of swapping."""
    from .device import select_weights_dtype

    if hasattr(model, "set_weights_dtype"):
        model.set_weights_dtype(select_weights_dtype(device, select_dtype(device, cfg.dtype),
                                                     getattr(cfg, "weights_dtype", "auto")), device)
    if device.type == "mps" and getattr(cfg, "memory_gb", 0) and hasattr(torch, "mps"):
        total = torch.mps.recommended_max_memory() if hasattr(torch.mps, "recommended_max_memory") else 0
        if total:
            torch.mps.set_per_process_memory_fraction(min(2.0, cfg.memory_gb * 2**30 / total))
        if os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK"):
            log.warning("PYTORCH_ENABLE_MPS_FALLBACK is set: MPS ops without a kernel run on the CPU (slow)")


def attention_record(model: nn.Module) -> dict[str, Any]:
    """What the sparse attention kernel choice was (``attention_backend=auto`` probes), for manifests."""
    choices = getattr(getattr(model, "sparse", None), "backend_choices", None)
    return {"attention_backend_choices": dict(choices)} if choices else {}


# ---- images ----------------------------------------------------------------------------------------


def _load_frames(store: RunStore, image_ids: np.ndarray, cfg: ReconstructConfig) -> tuple[torch.Tensor, np.ndarray]:
    """(S, 3, h, w) in [0, 1] at model resolution and (S, 2, 3) affine maps model pixel -> original pixel."""
    from .preprocess import preprocess_images  # reads files with sparse_vggt.scan.load_image

    images = store.read_table("images")
    root = Path((images.schema.metadata or {}).get(b"photos_root", b"").decode())
    paths = images.column("path").to_pylist()
    status = images.column("status").to_pylist()
    files = []
    for img in image_ids.tolist():
        if img < 0 or img >= len(paths):
            raise ReconstructError(f"image id {img} is not a row of images.parquet")
        if status[img] != "ok":
            raise ReconstructError(f"image {paths[img]} (id {img}) was skipped by scan ({status[img]}) but is in a cluster")
        files.append(root / paths[img])
    tensor, to_image = preprocess_images(files, image_size=cfg.image_size, mode=cfg.preprocess_mode)
    return tensor, np.asarray(to_image, dtype=np.float32)


# ---- cameras ---------------------------------------------------------------------------------------


def decode_cameras(pose_enc: torch.Tensor, hw: tuple[int, int], to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S, 9) pose encodings -> world->camera (S,3,4) extrinsics and (S,3,3) intrinsics in original pixels."""
    from .geometry import pose_encoding_to_extri_intri
    from .preprocess import intrinsics_to_original

    pose_enc = pose_enc.float().clone()
    tiny = pose_enc[:, 7:9] < MIN_FOV
    if bool(tiny.any()):
        # The FoV head ends in a ReLU: 0 means an infinite focal length. Real checkpoints do not get here;
        # random weights do. Keep the number finite and say so.
        log.warning("%d frame(s) have a predicted field of view below %.0e rad; clamped (random weights?)",
                    int(tiny.any(dim=1).sum()), MIN_FOV)
        pose_enc[:, 7:9] = pose_enc[:, 7:9].clamp(min=MIN_FOV)
    extri, intri = pose_encoding_to_extri_intri(pose_enc[None], hw)
    extri = extri[0].cpu().numpy().astype(np.float32)
    return extri, intrinsics_to_original(intri[0], to_image).astype(np.float32)


# ---- stage -----------------------------------------------------------------------------------------


def _group(cluster_id: int) -> str:
    return f"clusters/{int(cluster_id)}"


def reconstruct_cluster(run_dir: str | Path, cluster_id: int, config: PipelineConfig) -> dict[str, Any]:
    """Reconstruct one cluster (no-op if complete). Raises ClusterOutOfMemory on CUDA/MPS OOM."""
    store = RunStore.open(run_dir)
    store.require_stage("partition", "reconstruct")
    path = _group(cluster_id)
    cfg = config.reconstruct
    image_ids, neighbors = cluster_frames(store.read_table("clusters"), int(cluster_id))
    key = cluster_inputs_key(config, image_ids, neighbors)
    done, why = check_cluster(store, int(cluster_id), key)
    if done:
        return {"cluster_id": int(cluster_id), "skipped": True}
    if why:  # a marker that does not verify: record the redo (the partial group is replaced below)
        store.redo_unit(path, why)
    device = select_device(cfg.device)
    dtype = select_dtype(device, cfg.dtype)
    try:
        images, to_image = _load_frames(store, image_ids, cfg)
        model = load_model(cfg, device, k=config.partition.attention_neighbors)
        if hasattr(model, "head_chunk_frames"):  # DPT heads in frame chunks: bounded activation memory
            model.head_chunk_frames = cfg.head_chunk_frames or None
        log.info("cluster %d: %d frames through VGGT on %s (%s)", cluster_id, len(image_ids), device.type,
                 str(dtype).replace("torch.", ""))
        with torch.inference_mode(), autocast(device, dtype), layer_progress(model, f"cluster {cluster_id}"):
            kwargs = {"neighbors": neighbors} if cfg.attention == "sparse" else {}
            out = model(images.to(device), **kwargs)
        h, w = images.shape[-2:]
        extri, intri = decode_cameras(out["pose_enc"][0], (h, w), to_image)
        depth = out["depth"][0, ..., 0].float().cpu().numpy()
        conf = out["depth_conf"][0].float().cpu().numpy()
    except Exception as exc:
        if is_oom(exc):
            _free(device)
            raise ClusterOutOfMemory(int(cluster_id), str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        raise
    if not (np.isfinite(extri).all() and np.isfinite(intri).all()):
        raise ReconstructError(f"cluster {cluster_id}: the model produced non-finite cameras (dtype {dtype})")
    store.remove_group(path)  # a killed earlier attempt may have left partial arrays
    grp = store.group(path)
    n = len(image_ids)
    depth_dtype = np.dtype(cfg.depth_dtype)
    store.write_array(grp, "extrinsics", extri, chunks=(n, 3, 4))
    store.write_array(grp, "intrinsics", intri, chunks=(n, 3, 3))
    store.write_array(grp, "depth", depth.astype(depth_dtype), chunks=(1, h, w))
    store.write_array(grp, "depth_conf", conf.astype(depth_dtype), chunks=(1, h, w))
    store.write_array(grp, "image_ids", image_ids.astype(np.int64), chunks=(n,))
    store.write_array(grp, "depth_to_image", to_image.astype(np.float32), chunks=(n, 2, 3))
    k = max((len(nb) for nb in neighbors), default=0)
    store.mark_unit_complete(
        path, model=cfg.model, preset=cfg.preset, k=k, dtype=str(dtype).replace("torch.", ""), device=device.type,
        attention=cfg.attention, special_tokens_global=cfg.special_tokens_global, image_size=cfg.image_size,
        preprocess_mode=cfg.preprocess_mode, frames=n, inputs=key,
        **attention_record(model),
    )
    log.info("cluster %d: %d frames reconstructed (%s, %s)", cluster_id, n, device.type, dtype)
    return {"cluster_id": int(cluster_id), "skipped": False, "frames": n, "depth_shape": [n, int(h), int(w)]}


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def run(run_dir: str | Path, config: PipelineConfig | None = None, *, force: bool = False,
        units: Iterable[int] | None = None) -> dict[str, Any]:
    """The reconstruct stage: clusters ``units`` (default: all; complete ones are no-ops) through the model; the
    stage finishes once every cluster is complete. ``units=[]`` only checks and finishes the stage; ``force``
    recomputes the given clusters even when complete. ``config`` defaults to the run's recorded one."""
    store = RunStore.open(run_dir)
    config = config or store.config()
    store.require_stage("partition", "reconstruct")
    all_ids = sorted({int(c) for c in store.read_table("clusters", columns=["cluster_id"]).column(0).to_pylist()})
    todo = all_ids if units is None else sorted({int(c) for c in units})
    unknown = sorted(set(todo) - set(all_ids))
    if unknown:
        raise ReconstructError(f"clusters {unknown} are not in clusters.parquet (known: {len(all_ids)} clusters)")
    if force and todo:
        store.invalidate_from(STAGE, f"forced: clusters {todo} recomputed")
        for cid in todo:
            store.remove_group(_group(cid))
    cluster_status(run_dir, config)  # verifies every marker; a damaged or stale cluster reopens the stage
    if not store.is_stage_complete(STAGE):
        store.stage_started(STAGE)
    done = skipped = frames = 0
    for cid in track(todo, total=len(todo), description="reconstruct"):
        result = reconstruct_cluster(run_dir, cid, config)
        skipped += bool(result["skipped"])
        done += not result["skipped"]
        frames += int(result.get("frames", 0))
    pending = cluster_status(run_dir, config)[1]
    manifest = {"clusters": len(all_ids), "reconstructed": done, "skipped_complete": skipped,
                "frames": frames, "pending": len(pending)}
    manifest = with_totals(store, all_ids, manifest, config.reconstruct)
    if not pending:
        store.stage_finished(STAGE, manifest)
    return manifest


# ---- manifest --------------------------------------------------------------------------------------


def model_weights(cfg: ReconstructConfig) -> dict[str, Any]:
    """Provenance of the configured weights (random, or checkpoint file + hub revision); no network access."""
    return provenance(cfg.model, ("model.safetensors", "model.pt"), preset=cfg.preset, seed=cfg.seed)


def with_totals(store: RunStore, all_ids: list[int], manifest: dict[str, Any], cfg: ReconstructConfig
                ) -> dict[str, Any]:
    """The stage manifest states totals over every complete cluster (what `status` and the reports show, also
    when each cluster ran in its own task and this call only checks); this call's work moves to ``*_now``."""
    done = [c for c in all_ids if store.is_unit_complete(_group(c))]
    frames = sum(int(store.zarr[_group(c)].attrs.get("frames", 0)) for c in done)
    out = {"clusters": manifest["clusters"], "reconstructed": len(done), "frames": frames,
           "pending": manifest["pending"], "reconstructed_now": manifest["reconstructed"],
           "frames_now": manifest["frames"], "skipped_complete": manifest["skipped_complete"]}
    out.update({k: v for k, v in manifest.items() if k not in out})
    out["weights"] = model_weights(cfg)
    return out
