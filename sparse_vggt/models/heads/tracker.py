"""Point tracker of VGGT's track head (VGGSfM/CoTracker-style iterative refinement).

Query points in frame 0 are followed through all frames: each iteration samples a 7-level correlation
pyramid around the current estimates, embeds the flow relative to frame 0, and an "EfficientUpdateFormer"
(attention over time per track, and over tracks per frame via 64 virtual tracks) predicts coordinate and
feature updates. Submodule names and the ``virual_tracks`` spelling follow the published checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.mlp import Mlp


def bilinear_sample(x: torch.Tensor, coords: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """grid_sample with pixel coordinates (x, y) in the align_corners=True convention.

    x (N, C, H, W), coords (N, h, w, 2) -> (N, C, h, w).
    """
    h, w = x.shape[-2:]
    scale = torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)], device=coords.device, dtype=x.dtype)
    grid = coords.to(x.dtype) * scale - 1
    return F.grid_sample(x, grid, align_corners=True, padding_mode=padding_mode)


def sample_points(fmap: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """fmap (B, C, H, W), points (B, N, 2) pixel (x, y) -> features (B, N, C) (bilinear, border padding)."""
    b = fmap.shape[0]
    out = bilinear_sample(fmap, points.unsqueeze(2))  # (B, C, N, 1)
    return out.permute(0, 2, 1, 3).reshape(b, -1, out.shape[1] * out.shape[3])


def sincos_grid_embedding(dim: int, height: int, width: int) -> torch.Tensor:
    """(1, dim, H, W) fixed 2-D sin/cos embedding (base 10000): first half from x, second half from y."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float), torch.arange(width, dtype=torch.float),
                            indexing="ij")

    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = torch.arange(d // 2, dtype=torch.double) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        angles = pos.reshape(-1).double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([one_axis(xs, dim // 2), one_axis(ys, dim // 2)], dim=1).float()
    return emb.reshape(1, height, width, dim).permute(0, 3, 1, 2)


def flow_embedding(flows: torch.Tensor, channels: int) -> torch.Tensor:
    """(..., 2) flows -> (..., 2*channels): interleaved sin/cos with linear frequencies k * 1000/channels."""
    freq = torch.arange(0, channels, 2, device=flows.device, dtype=torch.float32) * (1000.0 / channels)
    parts = []
    for axis in range(2):
        a = flows[..., axis:axis + 1] * freq
        parts.append(torch.stack([a.sin(), a.cos()], dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)


class CorrelationPyramid:
    """Feature maps averaged down ``levels - 1`` times; ``sample`` returns (B, S, N, levels*(2r+1)^2)
    correlations of per-track features with windows around the current coordinates."""

    def __init__(self, fmaps: torch.Tensor, levels: int, radius: int):
        self.radius = radius
        self.pyramid = [fmaps]
        for _ in range(levels - 1):
            b, s, c, h, w = fmaps.shape
            fmaps = F.avg_pool2d(fmaps.reshape(b * s, c, h, w), kernel_size=2, stride=2)
            fmaps = fmaps.reshape(b, s, c, *fmaps.shape[-2:])
            self.pyramid.append(fmaps)
        steps = torch.linspace(-radius, radius, 2 * radius + 1, device=fmaps.device, dtype=fmaps.dtype)
        # window element [a, b] sits at (x + steps[a], y + steps[b]): the x offset is the slow index
        self.offsets = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), dim=-1)

    def sample(self, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        b, s, n, c = feats.shape
        k = 2 * self.radius + 1
        out = []
        for i, fmaps in enumerate(self.pyramid):
            h, w = fmaps.shape[-2:]
            corr = torch.matmul(feats, fmaps.reshape(b, s, c, h * w)) / math.sqrt(c)
            centre = coords.reshape(b * s * n, 1, 1, 2) / (2 ** i)
            window = centre + self.offsets.to(coords.device, coords.dtype).view(1, k, k, 2)
            sampled = bilinear_sample(corr.reshape(b * s * n, 1, h, w), window, padding_mode="zeros")
            out.append(sampled.view(b, s, n, -1))
        return torch.cat(out, dim=-1)


class AttnBlock(nn.Module):
    """x = norm1(x); x = x + MHA(x); x = x + mlp(norm2(x)) (the residual stream is the normalised x)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, num_heads, batch_first=True)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # need_weights=True keeps nn.MultiheadAttention on its explicit-softmax path, as the reference calls it;
        # the fused path differs by rounding, which the 4 tracker iterations amplify (measured ~1e-2 px).
        x = self.norm1(x)
        x = x + self.attn(x, x, x, need_weights=True)[0]
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.norm_context = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.cross_attn = nn.MultiheadAttention(hidden, num_heads, batch_first=True)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        context = self.norm_context(context)
        x = x + self.cross_attn(x, context, context, need_weights=True)[0]
        return x + self.mlp(self.norm2(x))


class EfficientUpdateFormer(nn.Module):
    """Tokens (B, N, T, input_dim) -> updates (B, N, T, output_dim)."""

    def __init__(self, space_depth: int = 6, time_depth: int = 6, input_dim: int = 388, hidden_size: int = 384,
                 num_heads: int = 8, output_dim: int = 130, mlp_ratio: float = 4.0, num_virtual_tracks: int = 64):
        super().__init__()
        if space_depth < 1 or time_depth < space_depth:
            raise ValueError("need 1 <= space_depth <= time_depth")
        self.num_virtual_tracks = num_virtual_tracks
        self.virual_tracks = nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size))
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim)
        self.time_blocks = nn.ModuleList(AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(time_depth))
        self.space_virtual_blocks = nn.ModuleList(AttnBlock(hidden_size, num_heads, mlp_ratio)
                                                  for _ in range(space_depth))
        self.space_point2virtual_blocks = nn.ModuleList(CrossAttnBlock(hidden_size, num_heads, mlp_ratio)
                                                        for _ in range(space_depth))
        self.space_virtual2point_blocks = nn.ModuleList(CrossAttnBlock(hidden_size, num_heads, mlp_ratio)
                                                        for _ in range(space_depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.input_transform(self.input_norm(x))
        init = tokens
        b, _, t, _ = tokens.shape
        tokens = torch.cat([tokens, self.virual_tracks.repeat(b, 1, t, 1)], dim=1)
        n = tokens.shape[1]
        nv = self.num_virtual_tracks
        every = len(self.time_blocks) // len(self.space_virtual_blocks)
        j = 0
        for i, time_block in enumerate(self.time_blocks):
            tokens = time_block(tokens.reshape(b * n, t, -1)).view(b, n, t, -1)
            if i % every == 0 and j < len(self.space_virtual_blocks):
                space = tokens.permute(0, 2, 1, 3).reshape(b * t, n, -1)
                points, virtual = space[:, :n - nv], space[:, n - nv:]
                virtual = self.space_virtual2point_blocks[j](virtual, points)
                virtual = self.space_virtual_blocks[j](virtual)
                points = self.space_point2virtual_blocks[j](points, virtual)
                tokens = torch.cat([points, virtual], dim=1).view(b, t, n, -1).permute(0, 2, 1, 3)
                j += 1
        tokens = tokens[:, :n - nv] + init
        return self.flow_head(self.output_norm(tokens))


class BaseTrackerPredictor(nn.Module):
    def __init__(self, stride: int = 2, corr_levels: int = 7, corr_radius: int = 4, latent_dim: int = 128,
                 hidden_size: int = 384, depth: int = 6, max_scale: int = 518, predict_conf: bool = True,
                 num_heads: int = 8, num_virtual_tracks: int = 64):
        super().__init__()
        self.stride = stride
        self.latent_dim = latent_dim
        self.corr_levels = corr_levels
        self.corr_radius = corr_radius
        self.max_scale = max_scale
        self.predict_conf = predict_conf
        self.flows_emb_dim = latent_dim // 2
        self.transformer_dim = 3 * latent_dim + 4
        self.corr_mlp = Mlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden_size, latent_dim)
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, self.transformer_dim))
        self.updateformer = EfficientUpdateFormer(depth, depth, self.transformer_dim, hidden_size, num_heads,
                                                  latent_dim + 2, 4.0, num_virtual_tracks)
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        if predict_conf:
            self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def _pos_embed(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (h, w, device)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_grid_embedding(self.transformer_dim, h, w).to(device)
        return self._pos_cache[key]

    def forward(self, query_points: torch.Tensor, fmaps: torch.Tensor, iters: int = 4):
        """query_points (B, N, 2) pixels of the feature maps' source image (x, y); fmaps (B, S, C, h, w).

        Returns (list of (B, S, N, 2) coordinates per iteration, vis (B, S, N), conf (B, S, N) or None).
        """
        b, n, _ = query_points.shape
        _, s, c, hh, ww = fmaps.shape
        if min(hh, ww) < 2 ** (self.corr_levels - 1):
            raise ValueError(f"tracking needs feature maps of at least {2 ** (self.corr_levels - 1)} px per side for "
                             f"{self.corr_levels} correlation levels, got {hh}x{ww}; use larger images "
                             f"(>= {2 ** (self.corr_levels - 1) * self.stride} px per side) or fewer levels")
        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        query = query_points / float(self.stride)
        coords = query.reshape(b, 1, n, 2).repeat(1, s, 1, 1)
        first = coords[:, 0].clone()
        feats = sample_points(fmaps[:, 0], first).unsqueeze(1).repeat(1, s, 1, 1)  # (B, S, N, C)
        pyramid = CorrelationPyramid(fmaps, self.corr_levels, self.corr_radius)
        pos = sample_points(self._pos_embed(hh, ww, fmaps.device).expand(b, -1, -1, -1), first)
        pos = pos.reshape(b * n, 1, -1)
        ref = torch.cat([self.query_ref_token[:, :1], self.query_ref_token[:, 1:2].expand(-1, s - 1, -1)], dim=1)
        preds = []
        for _ in range(iters):
            coords = coords.detach()
            corr = self.corr_mlp(pyramid.sample(feats, coords).permute(0, 2, 1, 3).reshape(b * n, s, -1))
            flows = (coords - coords[:, :1]).permute(0, 2, 1, 3).reshape(b * n, s, 2)
            flow_emb = torch.cat([flow_embedding(flows, self.flows_emb_dim), flows / self.max_scale,
                                  flows / self.max_scale], dim=-1)
            feats_bn = feats.permute(0, 2, 1, 3).reshape(b * n, s, self.latent_dim)
            x = torch.cat([flow_emb, corr, feats_bn], dim=2) + pos
            x = x + ref.to(x.dtype)
            delta = self.updateformer(x.reshape(b, n, s, -1)).reshape(b * n, s, -1)
            d_feat = delta[..., 2:].reshape(b * n * s, self.latent_dim)
            feats_bn = self.ffeat_updater(self.ffeat_norm(d_feat)) + feats_bn.reshape(b * n * s, self.latent_dim)
            feats = feats_bn.reshape(b, n, s, self.latent_dim).permute(0, 2, 1, 3)
            coords = coords + delta[..., :2].reshape(b, n, s, 2).permute(0, 2, 1, 3)
            coords[:, 0] = first
            preds.append(coords * self.stride)
        flat = feats.reshape(b * s * n, self.latent_dim)
        vis = torch.sigmoid(self.vis_predictor(flat).reshape(b, s, n))
        conf = torch.sigmoid(self.conf_predictor(flat).reshape(b, s, n)) if self.predict_conf else None
        return preds, vis, conf
