"""Multi-head self-attention with optional per-head q/k LayerNorm and 2-D RoPE (VGGT's aggregator and the
DINOv2 backbone use the same module; the backbone has neither).

Attribute names are the reference's (``qkv``, ``q_norm``, ``k_norm``, ``proj``, ``rope``, ``num_heads``,
``head_dim``, ``scale``): checkpoints load unchanged, and ``sparse_vggt.layers.sparse_attention`` subclasses it
with the same constructor and submodules (blocks pick either through ``attn_class``).

Besides ``forward`` (all tokens at once) there is a split interface used by `Block.forward_global`, which
runs global attention over chunks of query tokens: `project` computes q, k or v for some rows only (weight
slices of ``qkv``: the same numbers as slicing the full product), and `attend` attends one query chunk to
the keys/values of all tokens. Keys and values are stored in the compute dtype (the autocast dtype when
autocast is on), which is what SDPA would cast them to anyway.
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_start: int) -> torch.Tensor:
        """q (B, H, n, D) of tokens ``query_start:query_start+n``; k, v (B, H, N, D) of all tokens."""
        return F.scaled_dot_product_attention(q, k, v)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in for ``x``: the autocast dtype when autocast is on for its device."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def project(attn: nn.Module, x: torch.Tensor, pos: torch.Tensor | None, parts: str) -> list[torch.Tensor]:
    """q/k/v (``parts`` from "qkv") of rows ``x`` (B, n, C) -> (B, H, n, D) each, normed and rotated like
    ``forward`` does, cast to the compute dtype. Works on `Attention` and on modules wrapping its children."""
    b, n, c = x.shape
    heads = int(attn.num_heads)
    dt = compute_dtype(x)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    out = []
    for name in parts:
        i = "qkv".index(name)
        t = F.linear(x, weight[i * c:(i + 1) * c], None if bias is None else bias[i * c:(i + 1) * c])
        t = t.reshape(b, n, heads, c // heads).transpose(1, 2)
        if name != "v":
            norm = attn._modules.get(f"{name}_norm")
            if norm is not None:
                t = norm(t)
            rope = attn._modules.get("rope")
            if rope is not None:
                if pos is None:
                    raise ValueError("this attention uses RoPE: pass token positions (B, N, 2)")
                t = rope(t, pos)
        out.append(t.to(dt))
    return out
