"""Registry of sparse-attention kernels (``reconstruct.attention_backend``) and the ``auto`` probe.

A kernel computes, for queries of whole frames, attention restricted to each query frame's neighbour set:
``attend(q, k, v, sets, P, num_special, scale, ctx[, query_frames=(first, stop)]) -> out`` with q (B, H, n·P, D)
and k, v (B, H, S·P, D) of all S frames; ``ctx`` is the model's `SparseContext` (memory budget, a per-forward
cache in ``ctx._cache``). A kernel that can only take every query in one call sets ``all_queries=True``.

Adding a kernel: one module in this package defining ``KERNEL = Kernel(name, attend, ...)`` plus its line in
``_BUILTIN`` below (or, from outside the library, one `register_kernel` call). Modules are imported lazily:
a kernel's imports (e.g. FlexAttention) cost nothing until it is chosen.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from ...registry import LazyRegistry

if TYPE_CHECKING:
    from ..neighbor_sets import NeighborSets
    from ..sparse_attention import SparseContext

log = logging.getLogger(__name__)

AUTO = "auto"  # not a kernel: the faster registered kernel by a timed probe (CUDA), else DEFAULT
DEFAULT = "sdpa"  # what ``auto`` means without a probe


@dataclass(frozen=True)
class Kernel:
    name: str
    attend: Callable[..., Tensor]
    all_queries: bool = False  # True: only whole sequences of queries (no ``query_frames`` chunks)
    available: Callable[[], bool] = lambda: True  # whether this PyTorch build can run it
    requirement: str = ""  # what it needs when it is not available (error message)


# name -> module of this package that defines KERNEL; registry order = probe order.
_BUILTIN: dict[str, str] = {
    "sdpa": "sdpa",
    "flex": "flex",
}
_KERNELS = LazyRegistry(__name__, _BUILTIN, "KERNEL")
_LOADED = _KERNELS.loaded  # name -> Kernel, once imported or registered


def register_kernel(kernel: Kernel) -> Kernel:
    """Make ``kernel`` selectable as ``attention_backend=kernel.name`` (and a candidate of ``auto``)."""
    if kernel.name == AUTO:
        raise ValueError(f"{AUTO!r} is reserved for the probe")
    return _KERNELS.register(kernel.name, kernel)


def kernel_names() -> tuple[str, ...]:
    """Registered kernel names in probe order (built-ins first)."""
    return _KERNELS.names()


def backend_names() -> tuple[str, ...]:
    """Valid ``attention_backend`` values: ``auto`` and every kernel."""
    return (AUTO, *kernel_names())


def get_kernel(name: str) -> Kernel:
    try:
        return _KERNELS.get(name)
    except KeyError:
        raise ValueError(f"unknown sparse attention backend {name!r}; use one of {backend_names()}") from None


# ---- auto: time the kernels once per device and shape bucket ----------------------------------------

_PROBED: dict[str, tuple[str, dict[str, float]]] = {}  # process-wide: one probe per device and shape bucket


def probe_candidates() -> list[Kernel]:
    """Kernels ``auto`` may choose from here (those this PyTorch build can run)."""
    return [k for k in map(get_kernel, kernel_names()) if k.available()]


def probe_key(q: Tensor, sets: "NeighborSets", P: int, num_special: int) -> str:
    dev = q.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    bucket = 1 << max(0, (sets.num_frames - 1).bit_length())
    B, H, _, D = q.shape
    return f"{name}|{str(q.dtype).replace('torch.', '')}|B{B}H{H}D{D}|P{P}|S<={bucket}|special{int(num_special > 0)}"


def probed_choice(q: Tensor, k: Tensor, v: Tensor, sets: "NeighborSets", P: int, num_special: int, scale: float,
                  ctx: "SparseContext") -> tuple[str, str, dict[str, float]]:
    """(shape-bucket key, chosen kernel, probe seconds): the probe runs once per key and process."""
    key = probe_key(q, sets, P, num_special)
    if key not in _PROBED:
        _PROBED[key] = probe(q, k, v, sets, P, num_special, scale, ctx)
    choice, seconds = _PROBED[key]
    return key, choice, seconds


def probe(q: Tensor, k: Tensor, v: Tensor, sets: "NeighborSets", P: int, num_special: int, scale: float,
          ctx: "SparseContext") -> tuple[str, dict[str, float]]:
    """Time one call of each kernel (after one untimed call that compiles/warms it); the faster one wins."""

    def sync() -> None:
        if q.device.type == "cuda":
            torch.cuda.synchronize(q.device)

    seconds: dict[str, float] = {}
    for kernel in probe_candidates():
        def fn(kernel: Kernel = kernel) -> Any:
            return kernel.attend(q, k, v, sets, P, num_special, scale, ctx)

        try:
            fn()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            seconds[kernel.name] = time.perf_counter() - t0
        except Exception as exc:  # a kernel that cannot run here simply loses (reported)
            log.warning("attention_backend=auto: %s kernel failed in the probe (%s); not used", kernel.name, exc)
    if not seconds:
        raise RuntimeError("attention_backend=auto: no sparse attention kernel ran on this device")
    choice = min(seconds, key=seconds.get)
    log.info("attention_backend=auto: %s (%s)", choice,
             ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in seconds.items()))
    return choice, seconds
