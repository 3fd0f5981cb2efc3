"""VGGT's alternating-attention aggregator.

Per frame: DINOv2 patch tokens, prefixed by one camera token and ``num_register_tokens`` register tokens
(the first frame of every sequence uses learned token set 0, all other frames set 1, which is how the model
knows the reference frame). Then ``depth`` rounds of a frame block (attention inside each frame, tokens
(B*S, P, C)) followed by a global block (attention over all frames, tokens (B, S*P, C)); both use 2-D RoPE
on (row+1, col+1) patch positions, special tokens at (0, 0). The output of round i is
cat([frame-block output, global-block output], channel) -> (B, S, P, 2C).

Memory: only the rounds listed in ``keep_layers`` are stored (None elsewhere; the heads read 4 of 24), in
the compute dtype. One token tensor is updated in place: frame blocks and the patch embedder run over chunks
of ``chunk_tokens // P`` frames, global blocks compute keys/values of all frames and then queries, residuals
and MLP per chunk (`Block.forward_global`), so temporaries are bounded by the chunk and memory grows with S
only through tokens, keys/values and kept layers (see sparse_vggt.memory).

Sparse global attention: ``Aggregator(sparse=SparseContext(...))`` builds the global blocks with
`SparseGlobalAttention` (or the subclass ``sparse_attn_class``; same parameters and state-dict keys);
``forward(images, neighbors=...)`` then runs
with those per-frame neighbour lists (or inside an already active ``sparse.use(sets)``, as `VGGT` does).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..layers.attention import Attention, compute_dtype
from ..layers.block import Block
from ..layers.neighbor_sets import NeighborSets
from ..layers.patch_embed import PatchEmbed
from ..layers.rope import RotaryPositionEmbedding2D, patch_positions
from ..layers.sparse_attention import SparseContext, sparse_attention_class
from ..layers.vision_transformer import DINO_CONFIGS, DinoVisionTransformer
from .inputs import VGGT_INPUT


def build_patch_embed(spec: str | dict[str, Any], img_size: int, patch_size: int, embed_dim: int,
                      num_register_tokens: int) -> nn.Module:
    """The patch embedder: a DINOv2 ViT by name (``dinov2_vit{s,b,l}14_reg``), a dict of
    `DinoVisionTransformer` overrides (small test backbones), or ``"conv"`` (a bare patchifier).

    DINO variants are configured as VGGT's: registers = the aggregator's count, LayerScale, eps 1e-6,
    pos-embed resampled to the exact grid size with bicubic + antialias.
    """
    if spec == "conv":
        return PatchEmbed(patch_size, 3, embed_dim)
    kwargs: dict[str, Any] = dict(img_size=img_size, patch_size=patch_size, num_register_tokens=num_register_tokens,
                                  init_values=1.0, mask_token=True, interpolate_mode="size", interpolate_offset=0.0,
                                  interpolate_antialias=True)
    if isinstance(spec, str):
        key = spec.removeprefix("dinov2_").removesuffix("_reg")
        if key not in DINO_CONFIGS:
            raise ValueError(f"unknown patch_embed {spec!r}; use dinov2_vits14_reg, dinov2_vitb14_reg, "
                             "dinov2_vitl14_reg, 'conv' or a dict of DinoVisionTransformer arguments")
        kwargs.update(DINO_CONFIGS[key])
    else:
        kwargs.update(spec)
    if kwargs["embed_dim"] != embed_dim:
        raise ValueError(f"patch_embed width {kwargs['embed_dim']} != aggregator embed_dim {embed_dim}")
    return DinoVisionTransformer(**kwargs)


def _first_and_rest(token: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """(1, 2, X, C) learned tokens -> (B*S, X, C): set 0 for frame 0 of each sequence, set 1 for the others."""
    first = token[:, :1].expand(batch, 1, *token.shape[2:])
    rest = token[:, 1:].expand(batch, frames - 1, *token.shape[2:])
    return torch.cat([first, rest], dim=1).reshape(batch * frames, *token.shape[2:])


class Aggregator(nn.Module):
    def __init__(self, img_size: int = 518, patch_size: int = 14, embed_dim: int = 1024, depth: int = 24,
                 num_heads: int = 16, mlp_ratio: float = 4.0, num_register_tokens: int = 4, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, patch_embed: str | dict = "dinov2_vitl14_reg",
                 aa_order: Sequence[str] = ("frame", "global"), aa_block_size: int = 1, qk_norm: bool = True,
                 rope_freq: float = 100.0, init_values: float = 0.01,
                 keep_layers: Sequence[int] | None = None, chunk_tokens: int | None = 8192,
                 sparse: SparseContext | None = None, sparse_attn_class: type | None = None):
        super().__init__()
        if depth % aa_block_size:
            raise ValueError(f"depth {depth} is not a multiple of aa_block_size {aa_block_size}")
        bad = [t for t in aa_order if t not in ("frame", "global")]
        if bad:
            raise ValueError(f"aa_order entries must be 'frame' or 'global', got {bad}")
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, embed_dim) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, num_register_tokens, embed_dim) * 1e-6)
        self.patch_embed = build_patch_embed(patch_embed, img_size, patch_size, embed_dim, num_register_tokens)
        self.rope = RotaryPositionEmbedding2D(rope_freq) if rope_freq > 0 else None

        def block(attn_class: Callable[..., nn.Module] = Attention) -> Block:
            return Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias, ffn_bias=ffn_bias,
                         init_values=init_values, norm_eps=1e-5, qk_norm=qk_norm, rope=self.rope,
                         attn_class=attn_class)

        self.sparse = sparse  # shared by every global attention module when sparse (not a submodule)
        global_attn = Attention if sparse is None else sparse_attention_class(sparse, 1 + num_register_tokens,
                                                                                 sparse_attn_class)
        self.frame_blocks = nn.ModuleList(block() for _ in range(depth))
        self.global_blocks = nn.ModuleList(block(global_attn) for _ in range(depth))
        self.depth = depth
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.aa_order = tuple(aa_order)
        self.aa_block_size = aa_block_size
        self.patch_start_idx = 1 + num_register_tokens
        self.keep_layers = None if keep_layers is None else sorted({i % depth for i in keep_layers})
        self.chunk_tokens = chunk_tokens  # tokens per chunk (whole frames); None/0: all at once
        # observers of a long forward, called as f(steps_done, steps_total) after each patch-embedding chunk and
        # each frame/global layer (sparse_vggt.progress.layer_progress); they must not touch the tensors
        self.progress_listeners: list[Callable[[int, int], None]] = []

    def _patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.patch_embed, DinoVisionTransformer):
            return self.patch_embed.forward_patch_tokens(images)
        return self.patch_embed(images)

    def positions(self, n: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """(n, P, 2) RoPE positions: specials at (0, 0), patches at (row + 1, col + 1)."""
        pos = patch_positions(n, rows, cols, device) + 1
        special = torch.zeros(n, self.patch_start_idx, 2, dtype=pos.dtype, device=device)
        return torch.cat([special, pos], dim=1)

    def frames_per_chunk(self, tokens_per_frame: int) -> int:
        """Frames per chunk of the frame blocks, the patch embedder and the global blocks' query/MLP chunks."""
        if not self.chunk_tokens:
            return 1 << 30
        return max(1, int(self.chunk_tokens) // max(1, tokens_per_frame))

    def forward(self, images: torch.Tensor, keep_layers: Sequence[int] | None = None, neighbors: Any = None
                ) -> tuple[list[torch.Tensor | None], int]:
        """images (B, S, 3, H, W) in [0, 1] -> (list of ``depth`` entries (B, S, P, 2C) or None, patch_start_idx).

        Kept entries are in the compute dtype (the autocast dtype under autocast, else the weights' dtype).
        ``neighbors``: per-frame neighbour lists for sparse global attention (see `NeighborSets.build`).
        """
        if images.dim() != 5:
            raise ValueError(f"aggregator input must be (B, S, 3, H, W), got {tuple(images.shape)}")
        if neighbors is not None:
            if self.sparse is None:
                raise ValueError("neighbors= given, but this aggregator has dense global attention "
                                 "(build it with sparse=SparseContext(...))")
            with self.sparse.use(NeighborSets.build(neighbors, images.shape[1])):
                return self.forward(images, keep_layers)
        b, s, c, h, w = images.shape
        if c != 3:
            raise ValueError(f"expected 3 input channels (RGB), got {c}")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {self.patch_size}; "
                             "use sparse_vggt.preprocess")
        keep = self.keep_layers if keep_layers is None else sorted({i % self.depth for i in keep_layers})
        keep_set = set(range(self.depth)) if keep is None else set(keep)
        rows, cols = h // self.patch_size, w // self.patch_size
        p = self.patch_start_idx + rows * cols
        chunk = self.frames_per_chunk(p)
        steps = {"done": 0, "total": -(-(b * s) // chunk) + len(self.aa_order) * self.depth}
        tokens = self._embed(images, chunk, steps)  # (B*S, P, C)
        dim = tokens.shape[2]
        if self.rope is not None:
            self.rope.reserve(max(rows, cols) + 2)  # positions are at most max(rows, cols) + 1: no device sync
        pos = self.positions(b * s, rows, cols, images.device)
        global_pos = pos.reshape(b, s * p, 2)
        kept_dtype = compute_dtype(tokens)

        outputs: list[torch.Tensor | None] = []
        frame_idx = global_idx = 0
        for _ in range(self.depth // self.aa_block_size):
            # kept[j]: output j of this round, (B, S, P, 2C); halves are written as soon as the block has run,
            # because the next block updates the token tensor in place.
            base = len(outputs)
            kept = {j: None for j in range(self.aa_block_size) if base + j in keep_set}
            for kind in self.aa_order:
                for j in range(self.aa_block_size):
                    if kind == "frame":
                        tokens = self.frame_blocks[frame_idx].forward_frames(tokens.view(b * s, p, dim), pos, chunk)
                        frame_idx += 1
                        half = slice(0, dim)
                    else:
                        tokens = self.global_blocks[global_idx].forward_global(tokens.view(b, s * p, dim),
                                                                               global_pos, chunk * p)
                        global_idx += 1
                        half = slice(dim, 2 * dim)
                    self._step(steps)
                    if j in kept:
                        if kept[j] is None:
                            kept[j] = tokens.new_empty(b, s, p, 2 * dim, dtype=kept_dtype)
                        kept[j][..., half] = tokens.view(b, s, p, dim)
            outputs.extend(kept.get(j) for j in range(self.aa_block_size))
        return outputs, self.patch_start_idx

    def _step(self, steps: dict[str, int]) -> None:
        steps["done"] += 1
        for listener in self.progress_listeners:
            listener(steps["done"], steps["total"])

    def _embed(self, images: torch.Tensor, chunk: int, steps: dict[str, int]) -> torch.Tensor:
        """(B, S, 3, H, W) -> (B*S, P, C) tokens [camera, registers, patches]; the patch embedder runs over
        ``chunk`` frames at a time (its activations are bounded by the chunk)."""
        b, s, c, h, w = images.shape
        flat = images.reshape(b * s, c, h, w)
        mean = torch.tensor(VGGT_INPUT.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(VGGT_INPUT.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        weight_dtype = self.camera_token.dtype
        specials = torch.cat([_first_and_rest(self.camera_token, b, s), _first_and_rest(self.register_token, b, s)],
                             dim=1)
        tokens = None
        for a in range(0, b * s, chunk):
            x = (flat[a:a + chunk] - mean) / std
            if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
                x = x.to(weight_dtype)  # half-precision weights without autocast
            patches = self._patch_tokens(x)
            del x
            if tokens is None:
                dtype = torch.promote_types(patches.dtype, specials.dtype)
                tokens = patches.new_empty(b * s, specials.shape[1] + patches.shape[1], patches.shape[2], dtype=dtype)
                tokens[:, :specials.shape[1]] = specials
            tokens[a:a + chunk, specials.shape[1]:] = patches
            del patches
            self._step(steps)
        return tokens
