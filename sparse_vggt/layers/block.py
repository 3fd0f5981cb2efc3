"""Pre-norm transformer block: ``x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x)))``.

Shared by the DINOv2 backbone (LayerNorm eps 1e-6, LayerScale init 1e-5/1.0) and VGGT's frame/global
blocks and camera trunk (eps 1e-5, qk-norm + RoPE in the aggregator). Inference only: no drop-path.

The attention module is built by ``attn_class`` (as the official VGGT's ``Block(..., attn_class=Attention)``):
the aggregator passes a sparse attention class for its global blocks, so no module is swapped after
construction. Any class with `Attention`'s constructor and submodule names works (same state-dict keys).

Memory: `forward_frames` and `forward_global` update the aggregator's token tensor in place, one chunk of
rows at a time, so attention and MLP temporaries are bounded by the chunk, not by the frame count. Every
operation is per token (or per frame, for frame attention), so the numbers equal those of `forward` exactly.
Under autograd they fall back to `forward` (in-place updates would break the graph).
"""

from __future__ import annotations

import torch
from torch import nn

from typing import Callable

from .attention import Attention, project
from .layer_scale import LayerScale
from .mlp import Mlp


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, init_values: float | None = None,
                 norm_eps: float = 1e-5, qk_norm: bool = False, rope: nn.Module | None = None,
                 attn_class: Callable[..., nn.Module] = Attention):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn_class(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm,
                              norm_eps=1e-5, rope=rope)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward_frames(self, x: torch.Tensor, pos: torch.Tensor | None, chunk: int) -> torch.Tensor:
        """Frame attention: x (F, P, C), each row an independent frame; ``chunk`` frames at a time, in place."""
        if _needs_graph(self, x):
            return self.forward(x, pos=pos)
        for a in range(0, x.shape[0], max(1, chunk)):
            b = a + max(1, chunk)
            x[a:b] = self.forward(x[a:b], pos=None if pos is None else pos[a:b])
        return x

    def forward_global(self, x: torch.Tensor, pos: torch.Tensor | None, chunk: int) -> torch.Tensor:
        """Attention over all N tokens of x (B, N, C) with queries, residuals and MLP over ``chunk`` tokens at a
        time, in place. Keys/values of all tokens are computed first (chunked too), then each query chunk is
        attended, projected and pushed through the MLP. ``attn.attend`` may restrict the keys (sparse)."""
        if _needs_graph(self, x):
            return self.forward(x, pos=pos)
        n = x.shape[1]
        chunk = max(1, chunk)
        k = v = None
        for a in range(0, n, chunk):
            kc, vc = project(self.attn, self.norm1(x[:, a:a + chunk]), None if pos is None else pos[:, a:a + chunk],
                             "kv")
            if k is None:
                b_, h, _, d = kc.shape
                k = kc.new_empty(b_, h, n, d)
                v = vc.new_empty(b_, h, n, d)
            k[:, :, a:a + kc.shape[2]] = kc
            v[:, :, a:a + vc.shape[2]] = vc
            del kc, vc
        every = None
        wants_all = getattr(self.attn, "wants_all_queries", None)
        if wants_all is not None and wants_all(k, v):  # kernel wants one call: queries of all tokens
            q = torch.cat([project(self.attn, self.norm1(x[:, a:a + chunk]),
                                   None if pos is None else pos[:, a:a + chunk], "q")[0]
                           for a in range(0, n, chunk)], dim=2)
            every = self.attn.attend(q, k, v, 0)
            del q
        for a in range(0, n, chunk):
            xa = x[:, a:a + chunk]
            if every is None:
                (q,) = project(self.attn, self.norm1(xa), None if pos is None else pos[:, a:a + chunk], "q")
                o = self.attn.attend(q, k, v, a)
                del q
            else:
                o = every[:, :, a:a + chunk]
            o = self.attn.proj(o.transpose(1, 2).reshape(xa.shape[0], xa.shape[1], -1))
            xa = xa + self.ls1(o)
            del o
            x[:, a:a + chunk] = xa + self.ls2(self.mlp(self.norm2(xa)))
        del k, v, every
        return x


def _needs_graph(block: nn.Module, x: torch.Tensor) -> bool:
    """True when autograd records this call (then the plain, out-of-place forward runs)."""
    return torch.is_grad_enabled() and (x.requires_grad or block.norm1.weight.requires_grad)
