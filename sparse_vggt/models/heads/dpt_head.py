"""DPT head (dense prediction from 4 aggregator layers): VGGT's depth and point heads, and the feature
extractor of its track head (``feature_only``).

Per level: patch tokens -> shared LayerNorm -> 1x1 projection -> (+ sin/cos position grid x 0.1) ->
resize (x4 transposed conv, x2 transposed conv, identity, stride-2 conv) -> 3x3 ``layer*_rn`` -> RefineNet
fusion (coarse to fine, bilinear align_corners=True) -> ``output_conv1`` -> resize to the input size
(/down_ratio) -> (+ position grid) -> ``output_conv2`` -> activation. Frames are processed in chunks of
``frames_chunk_size`` (pure memory saving: every operation is per frame).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .activations import activate_head


def uv_grid(width: int, height: int, aspect_ratio: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(height, width, 2) normalised (x, y) grid whose diagonal has length ~2 for the given aspect ratio."""
    diag = (aspect_ratio ** 2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    x = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, steps=width, dtype=dtype,
                       device=device)
    y = torch.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, steps=height, dtype=dtype,
                       device=device)
    uu, vv = torch.meshgrid(x, y, indexing="xy")
    return torch.stack((uu, vv), dim=-1)


def _sincos(dim: int, pos: torch.Tensor, omega_0: float) -> torch.Tensor:
    # float64 like the reference (MPS has no float64: float32 there)
    wide = torch.float32 if pos.device.type == "mps" else torch.float64
    omega = torch.arange(dim // 2, dtype=wide, device=pos.device) / (dim / 2.0)
    omega = 1.0 / omega_0 ** omega
    angles = pos.reshape(-1).to(wide)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def grid_embedding(grid: torch.Tensor, dim: int, omega_0: float = 100.0) -> torch.Tensor:
    """(H, W, 2) grid -> (H, W, dim): first half encodes x, second half y, each [sin, cos]."""
    h, w, _ = grid.shape
    flat = grid.reshape(-1, 2)
    emb = torch.cat([_sincos(dim // 2, flat[:, 0], omega_0), _sincos(dim // 2, flat[:, 1], omega_0)], dim=-1)
    return emb.view(h, w, dim)


def add_position_embedding(x: torch.Tensor, width: int, height: int, ratio: float = 0.1) -> torch.Tensor:
    """x (N, C, h, w) + 0.1 * sin/cos embedding of the h x w grid with the input image's aspect ratio."""
    grid = uv_grid(x.shape[-1], x.shape[-2], width / height, x.dtype, x.device)
    emb = grid_embedding(grid, x.shape[1]) * ratio
    return x + emb.permute(2, 0, 1)[None].to(x.dtype)


_MAX_ELEMENTS = 1 << 30  # split huge bilinear resizes (some backends index with 32-bit ints)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear, align_corners=True resize; split over the batch when the output would be huge."""
    size = (int(size[0]), int(size[1]))
    n = x.shape[0] * x.shape[1] * size[0] * size[1]
    if n <= _MAX_ELEMENTS or x.shape[0] == 1:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    parts = x.chunk(n // _MAX_ELEMENTS + 1, dim=0)
    return torch.cat([F.interpolate(p, size=size, mode="bilinear", align_corners=True) for p in parts], dim=0)


class ResidualConvUnit(nn.Module):
    """relu(x) + conv2(relu(conv1(relu(x)))): the skip carries relu(x), as the reference's in-place ReLU does."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    """RefineNet fusion: (x0 [+ RCU1(x1)]) -> RCU2 -> bilinear resize (to ``size`` or x2) -> 1x1 ``out_conv``."""

    def __init__(self, features: int, has_residual: bool = True):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1, bias=True)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.has_residual = has_residual
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor | None = None,
                size: Sequence[int] | None = None) -> torch.Tensor:
        if x1 is not None:
            x0 = x0 + self.resConfUnit1(x1)
        x0 = self.resConfUnit2(x0)
        if size is None:
            size = (int(x0.shape[-2] * 2), int(x0.shape[-1] * 2))
        x0 = _resize(x0, size)
        return self.out_conv(x0)


class DPTHead(nn.Module):
    def __init__(self, dim_in: int, patch_size: int = 14, output_dim: int = 4, activation: str = "inv_log",
                 conf_activation: str = "expp1", features: int = 256,
                 out_channels: Sequence[int] = (256, 512, 1024, 1024),
                 intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23), pos_embed: bool = True,
                 feature_only: bool = False, down_ratio: int = 1):
        super().__init__()
        if len(out_channels) != 4 or len(intermediate_layer_idx) != 4:
            raise ValueError("DPTHead needs exactly 4 levels (out_channels and intermediate_layer_idx)")
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self.intermediate_layer_idx = tuple(intermediate_layer_idx)
        oc = list(out_channels)
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, c, 1) for c in oc)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = nn.Module()
        for j, c in enumerate(oc, start=1):
            setattr(self.scratch, f"layer{j}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        if feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, 3, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(32, output_dim, 1))

    def forward(self, tokens: list[torch.Tensor | None], images: torch.Tensor, patch_start_idx: int,
                frames_chunk_size: int | None = 8):
        """tokens: aggregator outputs (B, S, P, 2C); images (B, S, 3, H, W) (only the shape is used).

        Returns (values (B, S, H, W, C-1), conf (B, S, H, W)), or features (B, S, F, H/r, W/r) if feature_only.
        """
        s = images.shape[1]
        missing = [i for i in self.intermediate_layer_idx if tokens[i] is None]
        if missing:
            raise ValueError(f"aggregator layers {missing} were not kept but the DPT head needs them")
        if not frames_chunk_size or frames_chunk_size >= s:
            return self._forward_frames(tokens, images.shape, patch_start_idx, 0, s)
        # Chunks are written into outputs allocated once (no list of parts + concatenated copy at the end).
        outs: tuple[torch.Tensor, ...] | None = None
        for a in range(0, s, frames_chunk_size):
            stop = min(a + frames_chunk_size, s)
            part = self._forward_frames(tokens, images.shape, patch_start_idx, a, stop)
            part = (part,) if self.feature_only else part
            if outs is None:
                outs = tuple(p.new_empty(p.shape[0], s, *p.shape[2:]) for p in part)
            for o, p in zip(outs, part):
                o[:, a:stop] = p
            del part
        return outs[0] if self.feature_only else outs

    def _forward_frames(self, tokens: list, shape: torch.Size, patch_start_idx: int, start: int, stop: int):
        b, _, _, h, w = shape
        s = stop - start
        ph, pw = h // self.patch_size, w // self.patch_size
        levels = []
        for j, layer in enumerate(self.intermediate_layer_idx):
            x = tokens[layer][:, start:stop, patch_start_idx:]
            x = x.to(self.norm.weight.dtype)  # kept layers are in the compute dtype; cast one chunk at a time
            x = self.norm(x.reshape(b * s, -1, x.shape[-1]))
            x = x.permute(0, 2, 1).reshape(b * s, x.shape[-1], ph, pw)
            x = self.projects[j](x)
            if self.pos_embed:
                x = add_position_embedding(x, w, h)
            levels.append(self.resize_layers[j](x))
        out = self._fuse(levels)
        del levels
        size = (int(ph * self.patch_size / self.down_ratio), int(pw * self.patch_size / self.down_ratio))
        out = _resize(out, size)
        if self.pos_embed:
            out = add_position_embedding(out, w, h)
        if self.feature_only:
            return out.view(b, s, *out.shape[1:])
        out = self.scratch.output_conv2(out)
        values, conf = activate_head(out, self.activation, self.conf_activation)
        return values.view(b, s, *values.shape[1:]), conf.view(b, s, *conf.shape[1:])

    def _fuse(self, levels: list[torch.Tensor]) -> torch.Tensor:
        sc = self.scratch
        l1, l2, l3, l4 = (getattr(sc, f"layer{j}_rn")(x) for j, x in enumerate(levels, start=1))
        out = sc.refinenet4(l4, size=l3.shape[2:])
        out = sc.refinenet3(out, l3, size=l2.shape[2:])
        out = sc.refinenet2(out, l2, size=l1.shape[2:])
        out = sc.refinenet1(out, l1)
        return sc.output_conv1(out)
