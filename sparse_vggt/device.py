"""Device and dtype selection shared by every model-running stage.

CUDA gets bf16 autocast where the GPU supports it (fp16 otherwise), MPS gets fp16 (bf16 only where the
installed PyTorch reports support), CPU stays fp32: CPU autocast is slower than fp32 on most machines.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def select_device(name: str = "auto") -> torch.device:
    """Resolve ``auto | cuda[:i] | mps | cpu`` to an available device, with a clear error if unavailable."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available; use --set <stage>.device=auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("device 'mps' requested but MPS is not available; use --set <stage>.device=auto")
    return dev


def select_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """Compute dtype for autocast on ``device``; ``auto`` picks what the device runs well."""
    name = (name or "auto").lower()
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(sorted(_DTYPES))}")
        dtype = _DTYPES[name]
        if device.type == "cpu" and dtype == torch.float16:
            raise ValueError("float16 is not supported for CPU inference; use float32 or bfloat16")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def select_weights_dtype(device: torch.device, compute: torch.dtype, name: str = "auto") -> torch.dtype:
    """dtype of the aggregator's weights: ``auto`` = the compute dtype on CUDA/MPS (no fp32 copy of ~0.9 B
    parameters), fp32 on CPU (CPU half-precision matmuls are slow); ``float32``/``bfloat16``/``float16``
    ask for one explicitly."""
    name = (name or "auto").lower()
    if name == "auto":
        return compute if device.type in ("cuda", "mps") else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown weights dtype {name!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device``; a no-op for fp32."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA and MPS out-of-memory errors (their types and messages differ)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "mps backend out of memory" in msg)
