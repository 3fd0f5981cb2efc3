"""What cluster size a config allows: ``max_cluster_frames = "auto"`` from the memory model, and the checks.

Both run before any data is read, so a setting that can never give bounded, overlapping clusters fails fast
(a usage error), and "auto" is resolved against the machine the reconstruct workers are assumed to have.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ..config import PartitionConfig, PipelineConfig
from .clusters import PartitionConfigError, PartitionError

log = logging.getLogger(__name__)


def resolve_max_cluster_frames(config: PipelineConfig) -> PartitionConfig:
    """``partition.max_cluster_frames = "auto"`` -> the largest cluster whose predicted VGGT forward peak
    (sparse_vggt.memory, worst-case square images of ``reconstruct.image_size``) fits ``reconstruct.memory_gb``
    on the reconstruct device; an explicit number is returned unchanged (it always wins)."""
    cfg = config.partition
    value = cfg.max_cluster_frames
    if not isinstance(value, str):
        return cfg
    if value.strip().lower() != "auto":
        raise PartitionError(f"partition.max_cluster_frames={value!r}: use a number of frames or 'auto'")
    from .. import memory

    rc = config.reconstruct
    device, dtype, gb = _reconstruct_device(rc)
    side = int(rc.image_size)
    neighbors = cfg.attention_neighbors if rc.attention == "sparse" else None
    try:
        frames = memory.max_frames(gb, side, side, neighbors, dtype, device,
                                   config=_preset_config(rc.preset), head_chunk_frames=rc.head_chunk_frames or 8,
                                   attention_memory_mb=rc.attention_memory_mb)
    except ValueError as exc:
        raise PartitionError(str(exc)) from exc
    log.info("partition.max_cluster_frames=auto -> %d frames (%.1f GB on %s, %s, %dx%d, %s)", frames, gb, device,
             dtype, side, side, "dense" if neighbors is None else f"k={neighbors}")
    return dataclasses.replace(cfg, max_cluster_frames=frames)


def _preset_config(preset: str) -> dict[str, Any]:
    from ..models.vggt import PRESETS

    return dict(PRESETS.get(preset, {}))


def _reconstruct_device(rc: Any) -> tuple[str, str, float]:
    """(device type, compute dtype, memory in GB) the reconstruct workers are assumed to have. An explicit
    ``reconstruct.device`` is taken as given (partition may run on another machine); ``auto`` means this one."""
    import torch

    device = (rc.device or "auto").lower()
    if device == "auto":
        from ..device import select_device

        device = select_device("auto").type
    device = device.split(":")[0]
    if rc.dtype and rc.dtype != "auto":
        dtype = rc.dtype
    else:
        dtype = {"cuda": "bfloat16", "mps": "float16"}.get(device, "float32")
    gb = float(rc.memory_gb or 0.0)
    if gb <= 0:
        if device == "cuda" and torch.cuda.is_available():
            gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        else:
            import psutil

            gb = psutil.virtual_memory().total / 2**30
        log.info("reconstruct.memory_gb=0: using this machine's %.1f GB", gb)
    return device, dtype, gb


def validate_config(cfg: PartitionConfig) -> None:
    """Reject configs that cannot give bounded, overlapping clusters (before touching any data)."""
    if isinstance(cfg.max_cluster_frames, str):
        raise PartitionConfigError("partition.max_cluster_frames='auto' must be resolved first "
                             "(sparse_vggt.partition.resolve_max_cluster_frames)")
    problems = cfg.problems()
    if problems:
        raise PartitionConfigError(problems[0])
