"""Multi-head self-attention with optional per-head q/k LayerNorm and 2-D RoPE (VGGT's aggregator and the
DINOv2 backbone use the same module; the backbone has neither).

Attribute names are the reference's (``qkv``, ``q_norm``, ``k_norm``, ``proj``, ``rope``, ``num_heads``,
``head_dim``, ``scale``): checkpoints load unchanged, and ``sparse_vggt.layers.sparse_attention`` can wrap a
global block's ``attn`` by reusing these submodules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """``forward(x, pos=None)``: x (B, N, C); pos (B, N, 2) integer positions, needed only when ``rope`` is set."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False, norm_eps: float = 1e-5, rope: nn.Module | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if pos is None:
                raise ValueError("this attention uses RoPE: pass token positions (B, N, 2)")
            q, k = self.rope(q, pos), self.rope(k, pos)
        out = F.scaled_dot_product_attention(q, k, v)  # default scale == self.scale
        return self.proj(out.transpose(1, 2).reshape(b, n, c))
