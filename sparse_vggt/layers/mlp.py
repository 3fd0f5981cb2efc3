"""Two-layer perceptron with exact (erf) GELU, named ``fc1``/``fc2`` as in the DINOv2 and VGGT checkpoints."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``; ``out_features`` defaults to ``in_features``."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 bias: bool = True, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
