"""VGGT camera head: iterative refinement of a 9-d pose encoding from each frame's camera token.

The camera token of the last aggregator layer is normalised once (c). Each of 4 iterations embeds the
current raw encoding (a learned "empty" encoding first), turns it into (shift, scale, gate) for an adaLN
modulation of c, runs a 4-block transformer trunk across the frames, and adds the predicted delta to the raw
encoding. Outputs are the activated encodings (FoV through ReLU) of every iteration; the raw sum is fed back.
"""

from __future__ import annotations

import torch
from torch import nn

from typing import Callable

from ...layers.attention import Attention
from ...layers.block import Block
from ...layers.mlp import Mlp
from .activations import activate_pose

POSE_ENCODING_DIMS = {"absT_quaR_FoV": 9}


class CameraHead(nn.Module):
    def __init__(self, dim_in: int = 2048, trunk_depth: int = 4, pose_encoding_type: str = "absT_quaR_FoV",
                 num_heads: int = 16, mlp_ratio: float = 4.0, init_values: float = 0.01,
                 trans_act: str = "linear", quat_act: str = "linear", fl_act: str = "relu",
                 attn_class: Callable[..., nn.Module] = Attention):
        super().__init__()
        if pose_encoding_type not in POSE_ENCODING_DIMS:
            raise ValueError(f"unsupported pose encoding {pose_encoding_type!r}")
        self.target_dim = POSE_ENCODING_DIMS[pose_encoding_type]
        self.trans_act, self.quat_act, self.fl_act = trans_act, quat_act, fl_act
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.trunk = nn.Sequential(*[Block(dim_in, num_heads, mlp_ratio, init_values=init_values, norm_eps=1e-5,
                                           attn_class=attn_class)
                                     for _ in range(trunk_depth)])
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.embed_pose = nn.Linear(self.target_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in, bias=True))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, self.target_dim)

    def forward(self, tokens: list[torch.Tensor | None], num_iterations: int = 4) -> list[torch.Tensor]:
        """tokens: aggregator outputs; uses the camera token (index 0) of the last one. -> list of (B, S, 9)."""
        if tokens[-1] is None:
            raise ValueError("the camera head needs the last aggregator layer")
        cam = self.token_norm(tokens[-1][:, :, 0])
        b, s, _ = cam.shape
        raw = None
        outputs = []
        normed = self.adaln_norm(cam)
        for _ in range(num_iterations):
            if raw is None:
                cond = self.embed_pose(self.empty_pose_tokens.expand(b, s, -1))
            else:
                cond = self.embed_pose(raw.detach())
            shift, scale, gate = self.poseLN_modulation(cond).chunk(3, dim=-1)
            z = gate * (normed * (1 + scale) + shift) + cam
            for blk in self.trunk:
                z = blk(z)
            delta = self.pose_branch(self.trunk_norm(z))
            raw = delta if raw is None else raw + delta
            outputs.append(activate_pose(raw, self.trans_act, self.quat_act, self.fl_act))
        return outputs
