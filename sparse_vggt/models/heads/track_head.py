"""VGGT track head: a feature-only DPT (stride 2, 128 channels) + the iterative point tracker."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .dpt_head import DPTHead
from .tracker import BaseTrackerPredictor


class TrackHead(nn.Module):
    def __init__(self, dim_in: int, patch_size: int = 14, features: int = 128, iters: int = 4,
                 predict_conf: bool = True, stride: int = 2, corr_levels: int = 7, corr_radius: int = 4,
                 hidden_size: int = 384, depth: int = 6, num_heads: int = 8, num_virtual_tracks: int = 64,
                 out_channels: Sequence[int] = (256, 512, 1024, 1024),
                 intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23), max_scale: int = 518):
        super().__init__()
        self.patch_size = patch_size
        self.feature_extractor = DPTHead(dim_in, patch_size, features=features, out_channels=out_channels,
                                         intermediate_layer_idx=intermediate_layer_idx, pos_embed=False,
                                         feature_only=True, down_ratio=2)
        self.tracker = BaseTrackerPredictor(stride=stride, corr_levels=corr_levels, corr_radius=corr_radius,
                                            latent_dim=features, hidden_size=hidden_size, depth=depth,
                                            max_scale=max_scale, predict_conf=predict_conf, num_heads=num_heads,
                                            num_virtual_tracks=num_virtual_tracks)
        self.iters = iters

    def forward(self, tokens: list, images: torch.Tensor, patch_start_idx: int, query_points: torch.Tensor,
                iters: int | None = None, frames_chunk_size: int | None = 8):
        """query_points (B, N, 2) pixel (x, y) in frame 0 of ``images`` (B, S, 3, H, W).

        Returns (list of (B, S, N, 2) tracks per iteration, vis (B, S, N), conf (B, S, N) or None).
        """
        fmaps = self.feature_extractor(tokens, images, patch_start_idx, frames_chunk_size=frames_chunk_size)
        return self.tracker(query_points, fmaps, iters=self.iters if iters is None else iters)
