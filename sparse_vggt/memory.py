"""Peak memory of one VGGT forward, predicted from the architecture (no model is run).

Why: the cluster size a worker can take is set by memory, not time (`partition.max_cluster_frames = "auto"`).
The prediction follows what the lean forward keeps alive (sparse_vggt.models.aggregator):

- weights: parameters of the configuration, the aggregator's in the weights dtype, the heads' in fp32;
- per frame, for the whole forward: the input images (fp32), positions, the token tensor, the kept layers
  (compute dtype, 2C wide) and, inside a global block, keys and values of all frames (compute dtype);
- per chunk (bounded, not growing with S): the activations of one chunk of ``chunk_tokens`` tokens in a
  transformer block (about 10 C-wide rows per token: MLP hidden before and after GELU, residual, norm),
  the sparse kernel's gather workspace, and the DPT heads' full-resolution tail for ``head_chunk_frames``
  frames (two F/2-channel full-resolution maps plus the position embedding);
- the heads' outputs (depth + confidence, points + confidence, fp32; chunks are written into them).

The peak is the larger of the aggregator phase (last global block) and the head phase. The estimate covers
tensors only: on CPU the process also holds the Python/PyTorch runtime (a few hundred MB, not modelled), on
CUDA the allocator's peak is what is predicted. `benchmarks/memory.py` compares it with measured peaks.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

MB = 2**20
GB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one forward. ``peak`` = ``weights`` + ``activations``; ``per_frame`` grows with S,
    ``fixed`` does not (chunk workspaces)."""

    frames: int
    weights: int
    activations: int
    per_frame: int
    fixed: int
    phase: str  # "aggregator" or "heads": where the peak is

    @property
    def peak(self) -> int:
        return self.weights + self.activations

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak": self.peak}


def _dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if str(value).lower() not in names:
        raise ValueError(f"unknown dtype {value!r}; use float32, bfloat16 or float16")
    return names[str(value).lower()]


_COUNTS: dict[str, tuple[int, int]] = {}


def _param_counts(config: dict[str, Any]) -> tuple[int, int]:
    """(aggregator parameters, other parameters) of ``VGGT(**config)``, counted on the meta device (cached:
    `max_frames` asks many times)."""
    from .models.vggt import VGGT

    key = repr(sorted(config.items()))
    if key not in _COUNTS:
        with torch.device("meta"):
            model = VGGT(**config)
        agg = sum(p.numel() for p in model.aggregator.parameters())
        _COUNTS[key] = (agg, sum(p.numel() for p in model.parameters()) - agg)
    return _COUNTS[key]


def estimate(frames: int, height: int = 336, width: int = 518, neighbors: int | None = None,
             dtype: Any = "float32", device: str | torch.device = "cpu", config: dict[str, Any] | None = None,
             weights_dtype: Any = None, chunk_tokens: int = 8192, head_chunk_frames: int = 8,
             attention_memory_mb: float = 1024.0) -> MemoryEstimate:
    """Predicted peak bytes of ``VGGT(**config)`` (default VGGT-1B) on ``frames`` images of height x width.

    ``neighbors``: k of sparse global attention (None = dense); ``dtype``: compute dtype (autocast);
    ``weights_dtype``: the aggregator's weights (default: ``dtype`` on CUDA/MPS, fp32 on CPU, as
    `VGGT.predict` does). ``device`` only selects that default and the kernels' behaviour.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    cfg = dict(config or {})
    patch = int(cfg.get("patch_size", 14))
    if height % patch or width % patch:
        raise ValueError(f"image size {height}x{width} must be a multiple of the patch size {patch}")
    dev = torch.device(device)
    compute = _dtype(dtype)
    if weights_dtype is None:
        weights = compute if dev.type in ("cuda", "mps") else torch.float32
    else:
        weights = _dtype(weights_dtype)
    ec = torch.tensor([], dtype=compute).element_size()
    ew = torch.tensor([], dtype=weights).element_size()
    mixed = compute != torch.float32  # autocast: norms and residual adds come out in fp32
    et = 4 if weights == torch.float32 else ew  # residual stream (token tensor) dtype
    eln = 4 if mixed else ec

    C = int(cfg.get("embed_dim", 1024))
    registers = int(cfg.get("num_register_tokens", 4))
    idx = tuple(cfg.get("intermediate_layer_idx", (4, 11, 17, 23)))
    depth = int(cfg.get("depth", 24))
    kept_layers = len({i % depth for i in idx} | {depth - 1})
    features = int(cfg.get("dpt_features", 256))
    S, H, W = int(frames), int(height), int(width)
    P = 1 + registers + (H // patch) * (W // patch)
    HW = H * W

    agg_params, other_params = _param_counts(cfg)
    weight_bytes = agg_params * ew + other_params * 4

    # ---- grows with S -------------------------------------------------------------------------------
    images = 3 * HW * 4
    positions = P * 2 * 8  # int64 (row, col) per token
    tokens = P * C * et
    kept = P * 2 * C * ec
    kv = 2 * P * C * ec
    depth_out = HW * 2 * 4  # depth + confidence
    point_out = HW * 4 * 4  # xyz + confidence
    base = images + positions + tokens

    # ---- bounded by chunks --------------------------------------------------------------------------
    f = max(1, min(S, chunk_tokens // P if chunk_tokens else S))
    T = f * P
    block_tmp = T * C * (8 * ec + 2 * eln)  # MLP hidden (fc1 + GELU) + residual + norm of one chunk
    gather = 0
    if neighbors is not None:
        keys = min(S, int(neighbors) + 2)  # neighbours + self + frame 0
        per_query = P * C * ec * (2 * keys + 2)  # gathered K, V (+ gathered q and output)
        gather = min(f * per_query, max(per_query, int(attention_memory_mb * MB)))
    h = max(1, min(S, head_chunk_frames or S))
    half = max(1, features // 2)
    grid = HW * half * 4  # the fp32 position embedding added to the full-resolution map
    head_tail = h * 2 * HW * half * 4 + grid  # two F/2-channel full-resolution maps of one chunk

    # Aggregator phase (last global block): all but the last kept layer complete, its frame half written,
    # keys/values of all frames, one chunk of block activations and the gather workspace.
    agg_frame = base + (kept_layers - 1) * kept + kept // 2 + kv
    agg_peak = S * agg_frame + block_tmp + gather
    # Head phase: kept layers + both heads' outputs + the last chunk's full-resolution tail.
    head_frame = images + kept_layers * kept + depth_out + point_out
    head_peak = S * head_frame + head_tail + (gather if dev.type == "cpu" else 0)  # CPU keeps its workspace
    if agg_peak >= head_peak:
        per_frame, fixed, phase = agg_frame, block_tmp + gather, "aggregator"
    else:
        per_frame, fixed, phase = head_frame, head_peak - S * head_frame, "heads"
    activations = max(agg_peak, head_peak)
    return MemoryEstimate(S, weight_bytes, activations, per_frame, activations - S * per_frame, phase)


def max_frames(memory_gb: float, height: int = 336, width: int = 518, neighbors: int | None = 10,
               dtype: Any = "float32", device: str | torch.device = "cpu", config: dict[str, Any] | None = None,
               headroom: float = 0.15, limit: int = 100_000, **kwargs: Any) -> int:
    """Largest frame count whose predicted peak fits ``memory_gb`` with ``headroom`` (fraction kept free for
    the runtime, allocator fragmentation and the rest of the process). Raises ValueError if not even 2 fit."""
    budget = memory_gb * GB * (1.0 - headroom)

    def fits(s: int) -> bool:
        return estimate(s, height, width, neighbors, dtype, device, config, **kwargs).peak <= budget

    if not fits(2):
        need = estimate(2, height, width, neighbors, dtype, device, config, **kwargs).peak / GB / (1 - headroom)
        raise ValueError(f"memory_gb={memory_gb} does not fit the model and 2 frames at {height}x{width} "
                         f"(needs about {need:.1f} GB); raise reconstruct.memory_gb or set "
                         "partition.max_cluster_frames explicitly")
    lo, hi = 2, 4
    while hi < limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit)
    if fits(hi):
        return hi
    while hi - lo > 1:  # the peak grows monotonically with S
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
