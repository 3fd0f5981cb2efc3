"""Sparse global attention: each frame's queries see only the keys of its covisible frames.

VGGT's global attention runs over all S·P tokens of a sequence, so its cost grows with S². Here the
query tokens of frame i attend to the key tokens of N(i) = {i} ∪ neighbours(i) ∪ {0} (frame 0 is the
reference frame that fixes the world coordinate system), optionally plus the camera/register tokens of
every frame. Work and memory grow with S·|N| instead of S².

`SparseGlobalAttention` is an `Attention` (same constructor, same submodules ``qkv``, ``q_norm``, ``k_norm``,
``rope``, ``proj``), so a model built with it has the dense model's state dict and loads the same checkpoints.
Models choose it at construction: ``Block(..., attn_class=sparse_attention_class(context))``.

Blocks call ``attn(x, pos=pos)``, so the frame count and neighbour sets are not arguments of ``forward``:
every sparse module of a model holds the same `SparseContext`, and the model's forward activates the
neighbour sets for one call with ``context.use(sets)`` (``VGGT.forward(images, neighbors=...)`` does it).

The kernels live in `sparse_vggt.layers.kernels` (a registry: ``sdpa`` on every device, ``flex`` on CUDA);
``auto`` times the registered kernels once per device and shape bucket on CUDA (`SparseContext.choose_backend`,
result in ``backend_choices``) and means ``sdpa`` elsewhere. No kernel allocates an S×S×P×P or (S·P)² tensor
(flex only when compiled).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from . import kernels
from .attention import Attention, compute_dtype
from .neighbor_sets import NeighborSets

log = logging.getLogger(__name__)

__all__ = ["NeighborSets", "SparseContext", "SparseGlobalAttention", "sparse_attention_class"]


# ---- shared context -------------------------------------------------------------------------------


@dataclass
class SparseContext:
    """State shared by every sparse attention module of one model, set per forward call."""

    memory_budget_mb: float = 1024.0  # gathered K/V + scores of one query chunk
    backend: str = "auto"  # auto or a registered kernel (sparse_vggt.layers.kernels)
    neighbors: NeighborSets | None = None
    num_special: int = 0  # camera + register tokens at the start of each frame (patch_start_idx)
    special_tokens_global: bool = False  # every frame's special tokens join every key set
    probe_devices: tuple[str, ...] = ("cuda",)  # where ``auto`` times the kernels (CPU flex is unfused)
    compile_cpu_flex: bool = False  # compile flex on CPU too (slow first call; eager CPU flex is unfused)
    backend_choices: dict[str, Any] = field(default_factory=dict)  # auto's probe results (for manifests)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.backend != kernels.AUTO:
            kernels.get_kernel(self.backend)  # ValueError listing the registered ones

    @contextlib.contextmanager
    def use(self, neighbors: NeighborSets) -> Iterator["SparseContext"]:
        """Activate ``neighbors`` for one forward pass (plans are cached for the duration only)."""
        previous = self.neighbors
        self.neighbors = neighbors
        self._cache.clear()
        try:
            yield self
        finally:
            self.neighbors = previous
            self._cache.clear()

    def resolve_backend(self, device: torch.device) -> str:
        """The kernel without looking at inputs: ``auto`` is the chunked-SDPA kernel here; with inputs,
        `choose_backend` may probe the other kernels against it on the devices in ``probe_devices``."""
        if self.backend != kernels.AUTO:
            kernel = kernels.get_kernel(self.backend)
            if not kernel.available():
                raise RuntimeError(f"backend={self.backend!r} needs {kernel.requirement}")
            return self.backend
        return kernels.DEFAULT

    def choose_backend(self, q: Tensor, k: Tensor, v: Tensor, sets: NeighborSets, P: int, num_special: int,
                       scale: float) -> str:
        """The kernel for these inputs. ``auto`` on a device in ``probe_devices`` times the kernels once per
        device and shape bucket (frame count rounded up to a power of two) and keeps the faster one for the
        process; the result is recorded in ``backend_choices``. Elsewhere as `resolve_backend`."""
        if (self.backend != kernels.AUTO or q.device.type not in self.probe_devices
                or len(kernels.probe_candidates()) < 2):
            return self.resolve_backend(q.device)
        key, choice, seconds = kernels.probed_choice(q, k, v, sets, P, num_special, scale, self)
        self.backend_choices[key] = {"backend": choice, "seconds": seconds}
        return choice


# ---- the module -----------------------------------------------------------------------------------


class SparseGlobalAttention(Attention):
    """`Attention` whose queries of frame i attend only to the frames in N(i) of the active neighbour sets.

    ``context``: shared by every sparse module of a model; holds the neighbour sets of the current forward.
    ``num_special``: per-frame special tokens this module sees (the aggregator's ``patch_start_idx``; 0 for
    modules whose "frames" are single tokens, e.g. the camera-head trunk); None = ``context.num_special``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False, norm_eps: float = 1e-5, rope: nn.Module | None = None, *,
                 context: SparseContext, num_special: int | None = None):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm,
                         norm_eps=norm_eps, rope=rope)
        self.context = context
        self.num_special = num_special

    def forward(self, x: Tensor, pos: Tensor | None = None, **kwargs: Any) -> Tensor:
        ctx = self.context
        sets = ctx.neighbors
        if sets is None:
            raise RuntimeError(
                "sparse global attention called without neighbour sets: call the sparse model as "
                "model(images, neighbors=...), or activate them with context.use(sets), not its blocks directly"
            )
        B, N, C = x.shape
        S = sets.num_frames
        if N % S:
            raise ValueError(f"{N} tokens cannot be split into {S} frames")
        P = N // S
        H, D = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if pos is None:
                raise ValueError("this attention uses RoPE: pass token positions (B, N, 2)")
            q = self.rope(q, pos)
            k = self.rope(k, pos)
        dt = compute_dtype(x)  # one dtype for q, k, v (flex's fast paths reject mixed ones)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        out = self._attend(q, k, v, sets, P, self._num_special(P))
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out)

    def wants_all_queries(self, k: Tensor, v: Tensor) -> bool:
        """True when the kernel for these keys/values needs every query at once (flex: one call, one block
        mask). Called by `Block.forward_global` once keys and values exist (``auto`` may probe with them)."""
        sets = self.context.neighbors
        if sets is None or k.shape[2] % sets.num_frames:
            return False
        if type(self)._attend is not SparseGlobalAttention._attend:
            return True  # a subclass (e.g. a test oracle) replaced the all-queries kernel: route through it
        return kernels.get_kernel(self._backend(k, k, v)).all_queries

    def _num_special(self, P: int) -> int:
        num_special = self.num_special if self.num_special is not None else self.context.num_special
        return min(num_special, P) if self.context.special_tokens_global else 0

    def _backend(self, q: Tensor, k: Tensor, v: Tensor) -> str:
        sets = self.context.neighbors
        P = k.shape[2] // sets.num_frames
        return self.context.choose_backend(q, k, v, sets, P, self._num_special(P), self.scale)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, query_start: int) -> Tensor:
        """Split interface of `Block.forward_global`: q (B, H, n, D) of tokens ``query_start:+n`` (whole
        frames), k, v (B, H, S·P, D) of all frames -> (B, H, n, D), each query frame attending to N(i)."""
        sets = self.context.neighbors
        if sets is None:
            raise RuntimeError(
                "sparse global attention called without neighbour sets: call the sparse model as "
                "model(images, neighbors=...), or activate them with context.use(sets), not its blocks directly"
            )
        S, N = sets.num_frames, k.shape[2]
        if N % S:
            raise ValueError(f"{N} tokens cannot be split into {S} frames")
        P = N // S
        if query_start % P or q.shape[2] % P:
            raise ValueError(f"query chunk {query_start}:+{q.shape[2]} does not hold whole frames of {P} tokens")
        num_special = self._num_special(P)
        if q.shape[2] == N:
            return self._attend(q, k, v, sets, P, num_special)
        kernel = kernels.get_kernel(self._backend(k, k, v))
        if kernel.all_queries:
            raise ValueError(f"the {kernel.name} kernel attends all queries at once (Block.forward_global asks it)")
        first = query_start // P
        return kernel.attend(q, k, v, sets, P, num_special, self.scale, self.context,
                             query_frames=(first, first + q.shape[2] // P))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, sets: NeighborSets, P: int, num_special: int) -> Tensor:
        """(B, H, S·P, D) queries/keys/values -> attention output restricted to N(i) per query frame."""
        name = self.context.choose_backend(q, k, v, sets, P, num_special, self.scale)
        return kernels.get_kernel(name).attend(q, k, v, sets, P, num_special, self.scale, self.context)


def sparse_attention_class(context: SparseContext, num_special: int | None = None,
                           cls: type[SparseGlobalAttention] | None = None) -> Callable[..., nn.Module]:
    """An ``attn_class`` for `Block`: ``cls`` (default `SparseGlobalAttention`) bound to ``context`` and
    ``num_special``."""
    return functools.partial(cls or SparseGlobalAttention, context=context, num_special=num_special)
