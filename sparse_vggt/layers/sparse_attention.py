"""Sparse global attention: each frame's queries see only the keys of its covisible frames.

VGGT's global attention runs over all S·P tokens of a sequence, so its cost grows with S². Here the
query tokens of frame i attend to the key tokens of N(i) = {i} ∪ neighbours(i) ∪ {0} (frame 0 is the
reference frame that fixes the world coordinate system), optionally plus the camera/register tokens of
every frame. Work and memory grow with S·|N| instead of S².

`SparseGlobalAttention` wraps an existing attention module (ours or the reference implementation's) and
reuses its ``qkv``, ``q_norm``, ``k_norm``, ``rope`` and ``proj`` submodules under the same names, so the
state dict of a sparse model is identical to the dense one (checkpoints load either way).

The frame count and neighbour sets are not arguments of ``forward`` (blocks call ``attn(x, pos=pos)``);
they come from a shared `SparseContext` that the sparse model's forward fills in for the duration of a call.

Two kernels:
- ``sdpa`` (every device): query frames are grouped by neighbour-set size and processed in chunks; for
  a chunk the keys/values of its neighbour frames are gathered and passed, unmasked, to
  ``F.scaled_dot_product_attention`` (so its fused kernels apply). The chunk size comes from a memory
  budget. With global special tokens, each chunk also gathers the special tokens of the frames outside
  its sets (|outside| is the same for every frame of a chunk, so still no mask).
- ``flex`` (CUDA): one ``flex_attention`` call with a block mask built directly from the neighbour sets
  (frames padded to the block size, so each block belongs to exactly one frame), q, k, v in one dtype,
  compiled once with dynamic shapes. No dense mask is ever built. On CPU eager FlexAttention materialises
  the full score matrix, so there it serves the tests of the block mask unless ``compile_cpu_flex`` is set
  (compiled CPU flex needs the key-block index as wide as the sequence; `build_block_mask` does that).

``auto`` times both kernels once per device and shape bucket on CUDA (`SparseContext.choose_backend`, result
in ``backend_choices``) and means ``sdpa`` elsewhere. Neither path allocates an S×S×P×P or (S·P)² tensor
(flex only when compiled). The chunk planner charges what the kernel allocates: gathered K/V in the compute
dtype, plus fp32 scores only where SDPA has no fused kernel (not on CPU or CUDA).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import compute_dtype

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "flex")
FLEX_BLOCK = 128


# ---- neighbour sets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeighborSets:
    """The key-frame set N(i) of every query frame i (sorted, unique, always containing i and 0)."""

    sets: tuple[tuple[int, ...], ...]

    @property
    def num_frames(self) -> int:
        return len(self.sets)

    @property
    def sizes(self) -> list[int]:
        return [len(s) for s in self.sets]

    @classmethod
    def build(
        cls, neighbors: Any, num_frames: int, include_self: bool = True, include_reference: bool = True
    ) -> "NeighborSets":
        """Normalise per-frame neighbour lists (lists, arrays or an (S, k) tensor; negatives = padding).

        Raises ValueError with the offending frame when lists are missing or out of range.
        """
        if isinstance(neighbors, NeighborSets):
            if neighbors.num_frames != num_frames:
                raise ValueError(f"neighbour sets are for {neighbors.num_frames} frames, input has {num_frames}")
            return neighbors
        if hasattr(neighbors, "tolist"):
            neighbors = neighbors.tolist()
        neighbors = list(neighbors)
        if len(neighbors) != num_frames:
            raise ValueError(
                f"got neighbour lists for {len(neighbors)} frames but the input has {num_frames} frames; "
                "pass one list of frame indices per frame (in input order)"
            )
        sets = []
        for i, row in enumerate(neighbors):
            if hasattr(row, "tolist"):
                row = row.tolist()
            if isinstance(row, int):
                row = [row]
            members = {int(j) for j in row if int(j) >= 0}
            bad = [j for j in members if j >= num_frames]
            if bad:
                raise ValueError(f"frame {i} lists neighbour(s) {sorted(bad)} but there are only {num_frames} frames")
            if include_self:
                members.add(i)
            if include_reference:
                members.add(0)
            sets.append(tuple(sorted(members)))
        return cls(tuple(sets))

    @classmethod
    def full(cls, num_frames: int) -> "NeighborSets":
        """Every frame attends to every frame: equals dense global attention."""
        everything = tuple(range(num_frames))
        return cls(tuple(everything for _ in range(num_frames)))

    def membership(self, device: torch.device | str = "cpu") -> Tensor:
        """(S, S) bool: member[i, j] is True iff frame j is in N(i). S² booleans, never S²P²."""
        S = self.num_frames
        rows = torch.tensor([i for i, s in enumerate(self.sets) for _ in s], dtype=torch.long)
        cols = torch.tensor([j for s in self.sets for j in s], dtype=torch.long)
        member = torch.zeros(S, S, dtype=torch.bool)
        member[rows, cols] = True
        return member.to(device)


@dataclass
class _Chunk:
    queries: Tensor  # (c,) query frame indices
    keys: Tensor  # (c, K) key frame indices: N(i) for each query frame i (all of size K)
    complement: Tensor | None = None  # (c, S-K) frames outside N(i), for global special tokens
    local: Tensor | None = None  # (c,) query positions inside the caller's query chunk (None: = queries)


def plan_chunks(
    sets: NeighborSets, frame_bytes_per_key: int, budget_bytes: int, device: torch.device, special_frame_bytes: int = 0,
    frames: Sequence[int] | None = None, query_bytes: int = 0,
) -> list[_Chunk]:
    """Group query frames into chunks of equal set size whose gathered keys/values fit ``budget_bytes``.

    Grouping by size means no padding and no attention mask, so SDPA can use its fused kernels; the
    number of extra chunks is at most the number of distinct set sizes (a handful for kNN sets).
    ``frame_bytes_per_key`` is the memory one (query frame, key frame) pair costs; with
    ``special_frame_bytes`` > 0 every frame outside N(i) costs that much too (its special tokens are added)
    and each chunk carries its complement frames. ``frames``: plan only these query frames (default all);
    ``query_bytes``: what one query frame costs besides its keys (its gathered queries and output).
    Index tensors are built here, once per plan, directly on ``device``.
    """
    by_size: dict[int, list[int]] = {}
    for i in range(sets.num_frames) if frames is None else frames:
        by_size.setdefault(len(sets.sets[i]), []).append(i)
    chunks: list[_Chunk] = []
    for K in sorted(by_size):
        frames = by_size[K]
        per_frame = K * frame_bytes_per_key + (sets.num_frames - K) * special_frame_bytes + query_bytes
        per_chunk = max(1, budget_bytes // max(1, per_frame))
        for start in range(0, len(frames), per_chunk):
            members = frames[start : start + per_chunk]
            keys = torch.tensor([sets.sets[i] for i in members], dtype=torch.long, device=device)
            comp = None
            if special_frame_bytes:
                rows = [sorted(set(range(sets.num_frames)) - set(sets.sets[i])) for i in members]
                comp = torch.tensor(rows, dtype=torch.long, device=device).reshape(len(members), -1)
            chunks.append(_Chunk(torch.tensor(members, dtype=torch.long, device=device), keys, comp))
    return chunks


# ---- shared context -------------------------------------------------------------------------------


@dataclass
class SparseContext:
    """State shared by every sparse attention module of one model, set per forward call."""

    memory_budget_mb: float = 1024.0  # gathered K/V + scores of one query chunk
    backend: str = "auto"  # auto | sdpa | flex
    neighbors: NeighborSets | None = None
    num_special: int = 0  # camera + register tokens at the start of each frame (patch_start_idx)
    special_tokens_global: bool = False  # every frame's special tokens join every key set
    probe_devices: tuple[str, ...] = ("cuda",)  # where ``auto`` times both kernels (CPU flex is unfused)
    compile_cpu_flex: bool = False  # compile flex on CPU too (slow first call; eager CPU flex is unfused)
    backend_choices: dict[str, Any] = field(default_factory=dict)  # auto's probe results (for manifests)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown sparse attention backend {self.backend!r}; use one of {BACKENDS}")

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
        `choose_backend` may probe flex against it on the devices in ``probe_devices``."""
        if self.backend != "auto":
            if self.backend == "flex" and not _flex_available():
                raise RuntimeError("backend='flex' needs torch.nn.attention.flex_attention (PyTorch >= 2.5)")
            return self.backend
        return "sdpa"

    def choose_backend(self, q: Tensor, k: Tensor, v: Tensor, sets: NeighborSets, P: int, num_special: int,
                       scale: float) -> str:
        """The kernel for these inputs. ``auto`` on a device in ``probe_devices`` times both kernels once per
        device and shape bucket (frame count rounded up to a power of two) and keeps the faster one for the
        process; the result is recorded in ``backend_choices``. Elsewhere as `resolve_backend`."""
        if self.backend != "auto" or q.device.type not in self.probe_devices or not _flex_available():
            return self.resolve_backend(q.device)
        key = _probe_key(q, sets, P, num_special)
        if key not in _PROBED:
            _PROBED[key] = _probe(q, k, v, sets, P, num_special, scale, self)
        choice, seconds = _PROBED[key]
        self.backend_choices[key] = {"backend": choice, "seconds": seconds}
        return choice


_PROBED: dict[str, tuple[str, dict[str, float]]] = {}  # process-wide: one probe per device and shape bucket


def _probe_key(q: Tensor, sets: NeighborSets, P: int, num_special: int) -> str:
    dev = q.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    bucket = 1 << max(0, (sets.num_frames - 1).bit_length())
    B, H, _, D = q.shape
    return f"{name}|{str(q.dtype).replace('torch.', '')}|B{B}H{H}D{D}|P{P}|S<={bucket}|special{int(num_special > 0)}"


def _probe(q: Tensor, k: Tensor, v: Tensor, sets: NeighborSets, P: int, num_special: int, scale: float,
           ctx: "SparseContext") -> tuple[str, dict[str, float]]:
    """Time one call of each kernel (after one untimed call that compiles/warms it); the faster one wins."""
    import time

    def sync() -> None:
        if q.device.type == "cuda":
            torch.cuda.synchronize(q.device)

    kernels = {"sdpa": lambda: _chunked_sparse(q, k, v, sets, P, num_special, scale, ctx),
               "flex": lambda: _flex_sparse(q, k, v, sets, P, num_special, scale, ctx)}
    seconds: dict[str, float] = {}
    for name, fn in kernels.items():
        try:
            fn()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            seconds[name] = time.perf_counter() - t0
        except Exception as exc:  # a kernel that cannot run here simply loses (reported)
            log.warning("attention_backend=auto: %s kernel failed in the probe (%s); not used", name, exc)
    if not seconds:
        raise RuntimeError("attention_backend=auto: no sparse attention kernel ran on this device")
    choice = min(seconds, key=seconds.get)
    log.info("attention_backend=auto: %s (%s)", choice,
             ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in seconds.items()))
    return choice, seconds


def _flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the module -----------------------------------------------------------------------------------


class SparseGlobalAttention(nn.Module):
    """Drop-in replacement for a global attention module, restricted to covisible frames.

    ``num_special`` is the count of per-frame special tokens this module sees (the aggregator's
    ``patch_start_idx``; 0 for modules whose "frames" are single tokens, e.g. the camera-head trunk).
    """

    def __init__(self, attn: nn.Module, context: SparseContext, num_special: int | None = None):
        super().__init__()
        for attr in ("qkv", "proj", "num_heads"):
            if not hasattr(attn, attr):
                raise TypeError(
                    f"{type(attn).__name__} has no `{attr}`: sparse attention wraps attention modules with "
                    "qkv/q_norm/k_norm/rope/proj like VGGT's"
                )
        # Same child names as the wrapped module -> identical state_dict keys.
        for name, child in attn.named_children():
            self.add_module(name, child)
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(getattr(attn, "head_dim", attn.qkv.in_features // self.num_heads))
        self.scale = float(getattr(attn, "scale", self.head_dim**-0.5))
        self.context = context
        self.num_special = num_special
        self._dense = (attn,)  # tuple: not registered as a submodule; make_dense restores it

    @property
    def dense(self) -> nn.Module:
        """The original attention module (shares all parameters with this one)."""
        return self._dense[0]

    def _sub(self, name: str) -> nn.Module | None:
        return self._modules.get(name)

    def forward(self, x: Tensor, pos: Tensor | None = None, **kwargs: Any) -> Tensor:
        ctx = self.context
        sets = ctx.neighbors
        if sets is None:
            raise RuntimeError(
                "sparse global attention called without neighbour sets: call the sparse model as "
                "model(images, neighbors=...) (or neighbors=None to compute them), not its blocks directly"
            )
        B, N, C = x.shape
        S = sets.num_frames
        if N % S:
            raise ValueError(f"{N} tokens cannot be split into {S} frames")
        P = N // S
        H, D = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q_norm, k_norm, rope = self._sub("q_norm"), self._sub("k_norm"), self._sub("rope")
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        if rope is not None:
            if pos is None:
                raise ValueError("this attention uses RoPE: pass token positions (B, N, 2)")
            q = rope(q, pos)
            k = rope(k, pos)
        dt = compute_dtype(x)  # one dtype for q, k, v (flex's fast paths reject mixed ones)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        num_special = self.num_special if self.num_special is not None else ctx.num_special
        num_special = min(num_special, P) if ctx.special_tokens_global else 0
        out = self._attend(q, k, v, sets, P, num_special)
        out = out.transpose(1, 2).reshape(B, N, C)
        out = self.proj(out)
        proj_drop = self._sub("proj_drop")
        return proj_drop(out) if proj_drop is not None else out

    def wants_all_queries(self, k: Tensor, v: Tensor) -> bool:
        """True when the kernel for these keys/values needs every query at once (flex: one call, one block
        mask). Called by `Block.forward_global` once keys and values exist (``auto`` may probe with them)."""
        sets = self.context.neighbors
        if sets is None or k.shape[2] % sets.num_frames:
            return False
        if type(self)._attend is not SparseGlobalAttention._attend:
            return True  # a subclass (e.g. a test oracle) replaced the all-queries kernel: route through it
        return self._backend(k, k, v) == "flex"

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
                "model(images, neighbors=...) (or neighbors=None to compute them), not its blocks directly"
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
        if self._backend(k, k, v) == "flex":
            raise ValueError("the flex kernel attends all queries at once (Block.forward_global asks it)")
        first = query_start // P
        return _chunked_sparse(q, k, v, sets, P, num_special, self.scale, self.context,
                               query_frames=(first, first + q.shape[2] // P))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, sets: NeighborSets, P: int, num_special: int) -> Tensor:
        """(B, H, S·P, D) queries/keys/values -> attention output restricted to N(i) per query frame."""
        if self.context.choose_backend(q, k, v, sets, P, num_special, self.scale) == "flex":
            return _flex_sparse(q, k, v, sets, P, num_special, self.scale, self.context)
        return _chunked_sparse(q, k, v, sets, P, num_special, self.scale, self.context)


# ---- portable kernel: chunked gather + SDPA ---------------------------------------------------------


def sdpa_materialises_scores(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``F.scaled_dot_product_attention`` on ``device`` builds the full score matrix.

    CPU (flash kernel for fp32/bf16/fp16) and CUDA (flash / memory-efficient kernels, fp32 included via the
    memory-efficient one) work on tiles; other devices (MPS) may take the math path, so scores are charged."""
    return device.type not in ("cpu", "cuda")


def pair_bytes(B: int, H: int, P: int, D: int, elt: int, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes one (query frame, key frame) pair costs the chunked kernel: gathered K and V in the compute
    dtype, plus fp32 scores and probabilities only where SDPA materialises them."""
    scores = 2 * P * 4 if sdpa_materialises_scores(device, dtype) else 0
    return B * H * P * (2 * D * elt + scores)


def _chunked_sparse(
    q: Tensor, k: Tensor, v: Tensor, sets: NeighborSets, P: int, num_special: int, scale: float, ctx: SparseContext,
    query_frames: tuple[int, int] | None = None,
) -> Tensor:
    """q (B, H, n·P, D) of query frames ``query_frames`` (default all), k, v (B, H, S·P, D) -> (B, H, n·P, D),
    each query frame attending to its neighbour frames."""
    B, H, _, D = q.shape
    S = sets.num_frames
    N = S * P
    first, stop = query_frames if query_frames is not None else (0, S)
    if k.dtype != q.dtype or v.dtype != q.dtype:  # gather in the compute dtype, once per layer
        k, v = k.to(q.dtype), v.to(q.dtype)
    elt = q.element_size()
    pair = pair_bytes(B, H, P, D, elt, q.device, q.dtype)
    key = ("plan", P, pair, num_special, str(q.device), first, stop)
    chunks = ctx._cache.get(key)
    if chunks is None:  # built once per forward (every layer has the same plan)
        budget = int(ctx.memory_budget_mb * 2**20)
        scores = 2 * P * 4 if sdpa_materialises_scores(q.device, q.dtype) else 0
        special_bytes = B * H * num_special * (2 * D * elt + scores) if num_special else 0
        chunks = plan_chunks(sets, pair, budget, q.device, special_bytes, frames=range(first, stop),
                             query_bytes=2 * B * H * P * D * elt)
        if first:
            chunks = [_Chunk(c.queries, c.keys, c.complement, c.queries - first) for c in chunks]
        ctx._cache[key] = chunks
    q5 = q.reshape(B, H, stop - first, P, D)
    k5, v5 = (t.reshape(B, H, S, P, D) for t in (k, v))
    out = torch.empty_like(q5)
    # On CPU, gathers write into buffers reused across chunks and layers: fresh multi-MB allocations are
    # fresh pages, and page faults cost several times the copy itself. On GPUs the caching allocator reuses
    # blocks anyway, and a kept workspace would stay allocated through the heads. (Autograd needs fresh tensors.)
    reuse = q.device.type == "cpu" and not (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))

    def gather(name: str, src: Tensor, index: Tensor, shape: tuple[int, ...]) -> Tensor:
        if not reuse:
            return src.index_select(2, index).reshape(shape)
        buf = _workspace(ctx, name, (B, H, index.numel()) + tuple(src.shape[3:]), src)
        torch.index_select(src, 2, index, out=buf)
        return buf.view(shape)

    if num_special:
        k_sp = k5[:, :, :, :num_special]  # (B, H, S, ns, D): views, gathered per chunk below
        v_sp = v5[:, :, :, :num_special]
    for ch in chunks:
        c, K = ch.keys.shape
        local = ch.local if ch.local is not None else ch.queries
        qc = gather("q", q5, local, (B, H * c, P, D))
        flat = ch.keys.reshape(-1)
        kc = gather("k", k5, flat, (B, H, c, K * P, D))
        vc = gather("v", v5, flat, (B, H, c, K * P, D))
        comp = ch.complement
        if num_special and comp is not None and comp.shape[1]:
            # Special tokens of frames outside N(i) (those inside are already there, once).
            n_extra = comp.shape[1] * num_special
            ks = gather("ks", k_sp, comp.reshape(-1), (B, H, c, n_extra, D))
            vs = gather("vs", v_sp, comp.reshape(-1), (B, H, c, n_extra, D))
            kc = torch.cat([kc, ks], dim=3)
            vc = torch.cat([vc, vs], dim=3)
        # 4-D (B, H·c, L, D): the fused CPU/CUDA kernels take 4-D inputs only (5-D falls back to math).
        L = kc.shape[3]
        oc = F.scaled_dot_product_attention(qc, kc.reshape(B, H * c, L, D), vc.reshape(B, H * c, L, D), scale=scale)
        out.index_copy_(2, local, oc.reshape(B, H, c, P, D))
    return out.reshape(B, H, (stop - first) * P, D)


def _workspace(ctx: SparseContext, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A contiguous tensor of ``shape`` backed by a buffer kept for the current forward call."""
    numel = math.prod(shape)
    key = ("workspace", name, like.dtype, str(like.device))
    buf = ctx._cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        ctx._cache[key] = buf
    return buf[:numel].view(shape)


# ---- CUDA kernel: FlexAttention with a block mask built from the neighbour sets ----------------------

_COMPILED_FLEX: Any = None


def _flex_fn(device: torch.device, compile_cpu: bool = False) -> Any:
    """Compiled flex on CUDA (and on CPU when asked), else the eager reference path (small inputs, tests).

    Compiled with dynamic shapes: clusters differ in frame count, and a static compile would recompile for
    each one and, past torch.compile's recompile limit, fall back to the eager path that materialises all
    scores. (On CPU, one dynamic compile served 4, 6 and 9 frames without recompiling: tests/test_sparse.py.)
    """
    from torch.nn.attention.flex_attention import flex_attention

    global _COMPILED_FLEX
    if device.type != "cuda" and not compile_cpu:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


def build_block_mask(
    sets: NeighborSets, P: int, num_special: int, device: torch.device, block: int = FLEX_BLOCK
) -> Any:
    """A FlexAttention BlockMask for frames padded to ``Pp`` = ceil(P / block)·block tokens.

    Built from per-block key lists (size S·nb × |N|·nb), so no dense token mask is ever formed.
    Blocks entirely made of real tokens of a neighbour frame are "full"; blocks that hold padding (the
    last block of a frame when P is not a multiple of ``block``) or special tokens of a non-neighbour
    frame are "partial" and resolved by ``mask_mod``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    S = sets.num_frames
    nb = math.ceil(P / block)
    Pp = nb * block
    last_partial = P % block != 0
    member = sets.membership(device)
    full_rows: list[list[int]] = []
    part_rows: list[list[int]] = []
    for i, s in enumerate(sets.sets):
        full_blocks: list[int] = []
        part_blocks: list[int] = []
        for j in s:
            for b in range(nb):
                (part_blocks if (last_partial and b == nb - 1) else full_blocks).append(j * nb + b)
        if num_special:
            part_blocks += [j * nb for j in range(S) if j not in s]
        for _ in range(nb):  # every query block of frame i has the same key blocks
            full_rows.append(full_blocks)
            part_rows.append(part_blocks)

    # Compiled CPU flex checks that the key-block index spans every key block of the sequence; GPU kernels
    # read only the first ``count`` entries per row, so there the index stays as narrow as the widest set.
    full_width = S * nb if device.type == "cpu" else 0

    def pack(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        width = max(1, full_width, max(len(r) for r in rows))
        idx = torch.zeros(len(rows), width, dtype=torch.int32)
        for r, row in enumerate(rows):
            if row:
                idx[r, : len(row)] = torch.tensor(sorted(row), dtype=torch.int32)
        counts = torch.tensor([len(r) for r in rows], dtype=torch.int32)
        return counts[None, None].to(device), idx[None, None].to(device)

    full_n, full_i = pack(full_rows)
    part_n, part_i = pack(part_rows)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        fq = q_idx // Pp
        fk = kv_idx // Pp
        tk = kv_idx % Pp
        allowed = member[fq, fk] & (tk < P)
        if num_special:
            allowed = allowed | (tk < num_special)
        return allowed

    # compute_q_blocks=False: the transposed (query-block) index is only needed for backward, and
    # building it goes through a dense (S·nb)² block matrix.
    return BlockMask.from_kv_blocks(part_n, part_i, full_n, full_i, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(S * Pp, S * Pp), compute_q_blocks=False)


def _flex_sparse(
    q: Tensor, k: Tensor, v: Tensor, sets: NeighborSets, P: int, num_special: int, scale: float, ctx: SparseContext
) -> Tensor:
    B, H, N, D = q.shape
    S = sets.num_frames
    nb = math.ceil(P / FLEX_BLOCK)
    Pp = nb * FLEX_BLOCK
    key = ("block_mask", P, num_special, str(q.device))
    block_mask = ctx._cache.get(key)
    if block_mask is None:
        block_mask = build_block_mask(sets, P, num_special, q.device)
        ctx._cache[key] = block_mask

    def pad(t: Tensor) -> Tensor:
        t = t.reshape(B, H, S, P, D)
        if Pp != P:
            t = F.pad(t, (0, 0, 0, Pp - P))
        return t.reshape(B, H, S * Pp, D)

    out = _flex_fn(q.device, ctx.compile_cpu_flex)(pad(q), pad(k), pad(v), block_mask=block_mask, scale=scale)
    return out.reshape(B, H, S, Pp, D)[:, :, :, :P].reshape(B, H, N, D)
