"""DINOv2 vision transformer shared by VGGT (its patch embedder) and MegaLoc (its backbone).

Constructor (all keyword arguments):
    img_size, patch_size          native input size; ``pos_embed`` holds 1 + (img_size/patch_size)^2 rows
    embed_dim, depth, num_heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias
    init_values                   LayerScale init (None: no LayerScale); values are overwritten by checkpoints
    num_register_tokens           0 (MegaLoc) or 4 (VGGT)
    mask_token                    create the (training-only) ``mask_token`` parameter (VGGT: True, MegaLoc: False)
    norm_eps                      LayerNorm eps of every norm (DINOv2: 1e-6)
    interpolate_mode              how ``pos_embed`` is resampled for inputs other than the native square size:
                                  "scale_factor": bicubic with scale ((H/p + offset)/M, (W/p + offset)/M) (MegaLoc,
                                  offset 0.1, no antialias); "size": bicubic to exactly (H/p, W/p) (VGGT, antialias).
                                  None picks "size" when ``interpolate_offset`` is 0, else "scale_factor" (DINOv2).
    interpolate_offset, interpolate_antialias

Outputs:
    ``forward_features(x)`` -> dict with ``x_norm_clstoken`` (B, C), ``x_norm_regtokens`` (B, R, C),
    ``x_norm_patchtokens`` (B, N, C) (all after the final ``norm``, patches row-major) and ``x_prenorm``
    (B, 1+R+N, C). ``forward_normed(x)`` -> all normed tokens (B, 1+R+N, C) in the order [cls, registers, patches].
    ``forward(x)`` -> ``x_norm_clstoken``.

Parameter names follow the DINOv2 checkpoints (``cls_token``, ``pos_embed``, ``register_tokens``, ``mask_token``,
``patch_embed.proj``, ``blocks.<i>.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``,
``norm``), so both published state dicts (``aggregator.patch_embed.*`` of VGGT-1B, ``backbone.*`` of MegaLoc)
load strictly. The two resampling modes give different values for the same grid size, so each model must use
the one it was trained with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .block import Block
from .layer_scale import LayerScale
from .mlp import Mlp
from .patch_embed import PatchEmbed

__all__ = ["DinoVisionTransformer", "DINO_CONFIGS", "dinov2", "Attention", "Block", "LayerScale", "Mlp",
           "PatchEmbed"]

# Published DINOv2 sizes (embed_dim, depth, num_heads); "_reg" variants add 4 register tokens.
DINO_CONFIGS: dict[str, dict] = {
    "vits14": dict(embed_dim=384, depth=12, num_heads=6),
    "vitb14": dict(embed_dim=768, depth=12, num_heads=12),
    "vitl14": dict(embed_dim=1024, depth=24, num_heads=16),
}

INTERPOLATE_MODES = ("scale_factor", "size")


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT (see the module docstring for the constructor options and outputs)."""

    def __init__(self, img_size: int = 518, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, init_values: float | None = 1e-5,
                 num_register_tokens: int = 0, mask_token: bool = True, norm_eps: float = 1e-6,
                 interpolate_mode: str | None = None, interpolate_offset: float = 0.1,
                 interpolate_antialias: bool = False):
        super().__init__()
        if interpolate_mode is None:
            interpolate_mode = "scale_factor" if interpolate_offset else "size"
        if interpolate_mode not in INTERPOLATE_MODES:
            raise ValueError(f"interpolate_mode must be one of {INTERPOLATE_MODES}, got {interpolate_mode!r}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_register_tokens = num_register_tokens
        self.interpolate_mode = interpolate_mode
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None  # training only
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias, ffn_bias=ffn_bias,
                  init_values=init_values, norm_eps=norm_eps)
            for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init in the DINOv2 style (checkpoints overwrite it); skipped on the meta device."""
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, n_patches: int, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """Position embeddings (1, 1 + n_patches, C) for an h x w pixel input (computed in fp32)."""
        n = self.pos_embed.shape[1] - 1
        if n_patches == n and h == w:
            return self.pos_embed.to(dtype)
        pos = self.pos_embed.float()
        m = int(math.sqrt(n))
        h0, w0 = h // self.patch_size, w // self.patch_size
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.interpolate_mode == "size":
            grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=self.interpolate_antialias)
        else:
            scale = ((h0 + self.interpolate_offset) / m, (w0 + self.interpolate_offset) / m)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias)
        if grid.shape[-2:] != (h0, w0):
            raise RuntimeError(f"pos-embed resampling gave {tuple(grid.shape[-2:])}, expected {(h0, w0)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(dtype)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens + cls, plus position embeddings, then registers (which get no position)."""
        b, _, h, w = x.shape
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(b, -1, -1).to(t.dtype), t], dim=1)
        t = t + self.interpolate_pos_encoding(t.shape[1] - 1, h, w, t.dtype)
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(b, -1, -1).to(t.dtype), t[:, 1:]], dim=1)
        return t

    def forward_prenorm(self, x: torch.Tensor) -> torch.Tensor:
        t = self.prepare_tokens(x)
        for blk in self.blocks:
            t = blk(t)
        return t

    def forward_normed(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final LayerNorm: (B, 1 + R + N, C), order [cls, registers, patches]."""
        return self.norm(self.forward_prenorm(x))

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.forward_prenorm(x)
        normed = self.norm(t)
        r = 1 + self.num_register_tokens
        return {"x_norm_clstoken": normed[:, 0], "x_norm_regtokens": normed[:, 1:r],
                "x_norm_patchtokens": normed[:, r:], "x_prenorm": t}

    def forward_patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normed patch tokens only (B, N, C); the final norm is applied to those tokens alone (saves memory)."""
        t = self.forward_prenorm(x)
        return self.norm(t[:, 1 + self.num_register_tokens:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["x_norm_clstoken"]


def dinov2(name: str, **overrides) -> DinoVisionTransformer:
    """Build a DINOv2 size by name (``vits14``, ``vitb14``, ``vitl14``, optionally ``dinov2_`` prefix and ``_reg``
    suffix for 4 registers); ``overrides`` are constructor arguments (e.g. ``depth=2`` for tests)."""
    key = name.removeprefix("dinov2_")
    registers = 4 if key.endswith("_reg") else 0
    key = key.removesuffix("_reg")
    if key not in DINO_CONFIGS:
        raise ValueError(f"unknown DINOv2 size {name!r}; known: {', '.join(DINO_CONFIGS)} (+ '_reg')")
    kwargs = dict(DINO_CONFIGS[key], num_register_tokens=registers)
    kwargs.update(overrides)
    return DinoVisionTransformer(**kwargs)
