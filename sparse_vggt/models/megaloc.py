"""MegaLoc: DINOv2 ViT-B/14 + SALAD aggregation -> 8448-d L2-normalised place descriptors.

Reproduces the published architecture (gmberton/MegaLoc) so that the ``gberton/MegaLoc`` checkpoint loads with
``strict=True``; parameter names follow ``sparse_vggt/model_facts/megaloc_state_dict.tsv``. The ViT is the
project's shared DINOv2 implementation (``sparse_vggt.layers.vision_transformer``), configured as MegaLoc's
plain variant (no registers, no mask token, pos-embed resampled by scale factor with the +0.1 offset).

Like the reference, the model does not normalise: callers pass images prepared as `models.inputs.MEGALOC_INPUT`
says (the describe stage does). Inputs whose sides are not multiples of 14 are resized inside, as the reference
does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MegaLocPreset:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    img_size: int = 518  # pos-embed native size: 37 x 37 patches
    num_clusters: int = 64
    cluster_dim: int = 256
    token_dim: int = 256
    mlp_dim: int = 512
    feat_dim: int = 8448


PRESETS = {
    "megaloc": MegaLocPreset(),
    # same code path, small enough for unit tests: 2 blocks, 64-d, 8 clusters (needs > 8 patches: >= 42 px)
    "tiny": MegaLocPreset(embed_dim=64, depth=2, num_heads=4, img_size=98, num_clusters=8, cluster_dim=16,
                          token_dim=16, mlp_dim=32, feat_dim=96),
}


def sinkhorn_log(scores: torch.Tensor, dustbin: torch.Tensor, iters: int = 3, reg: float = 1.0,
                 keep_dustbin: bool = False) -> torch.Tensor:
    """Soft assignment of N patches to m clusters + a dustbin, by log-domain Sinkhorn (SALAD).

    scores: (B, m, N). Returns P (B, m, N) without the dustbin row. Marginals: every row and column gets
    1/(N+m), the dustbin row (N-m)/(N+m), so the dustbin absorbs the patches the clusters do not want.
    """
    b, m, n = scores.shape
    if n <= m:
        raise ValueError(f"SALAD needs more patches ({n}) than clusters ({m}); use a larger image")
    aug = torch.cat([scores, dustbin.to(scores.dtype).expand(b, 1, n)], dim=1) / reg
    norm = -math.log(n + m)
    log_a = torch.full((b, m + 1), norm, dtype=scores.dtype, device=scores.device)
    log_a[:, -1] += math.log(n - m)
    log_b = torch.full((b, n), norm, dtype=scores.dtype, device=scores.device)
    u = torch.zeros_like(log_a)
    v = torch.zeros_like(log_b)
    for _ in range(iters):
        u = log_a - torch.logsumexp(aug + v[:, None, :], dim=2)
        v = log_b - torch.logsumexp(aug + u[:, :, None], dim=1)
    log_p = aug + u[:, :, None] + v[:, None, :] - norm
    p = log_p.exp()
    return p if keep_dustbin else p[:, :-1, :]


class SALAD(nn.Module):
    """SALAD aggregator; submodule names/indices match the checkpoint (``aggregator.agg.*``)."""

    def __init__(self, in_dim: int, num_clusters: int, cluster_dim: int, token_dim: int, mlp_dim: int,
                 dropout: float = 0.3):
        super().__init__()
        self.num_clusters, self.cluster_dim = num_clusters, cluster_dim
        self.token_features = nn.Sequential(nn.Linear(in_dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, token_dim))
        self.cluster_features = nn.Sequential(nn.Conv2d(in_dim, mlp_dim, 1), nn.Dropout(dropout), nn.ReLU(),
                                              nn.Conv2d(mlp_dim, cluster_dim, 1))
        self.score = nn.Sequential(nn.Conv2d(in_dim, mlp_dim, 1), nn.Dropout(dropout), nn.ReLU(),
                                   nn.Conv2d(mlp_dim, num_clusters, 1))
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    def forward(self, features: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        f = self.cluster_features(features).flatten(2)  # (B, c, N)
        p = sinkhorn_log(self.score(features).flatten(2), self.dust_bin)  # (B, m, N)
        v = torch.einsum("bcn,bkn->bck", f, p)  # (B, c, m): same sums as the reference's repeat-multiply-sum
        v = F.normalize(v, p=2, dim=1).flatten(1)  # per-cluster L2, channel-major flatten (index c*m + k)
        t = F.normalize(self.token_features(token), p=2, dim=-1)
        return F.normalize(torch.cat([t, v], dim=-1), p=2, dim=-1)


class _Head(nn.Module):
    def __init__(self, p: MegaLocPreset):
        super().__init__()
        self.agg = SALAD(p.embed_dim, p.num_clusters, p.cluster_dim, p.token_dim, p.mlp_dim)
        self.linear = nn.Linear(p.num_clusters * p.cluster_dim + p.token_dim, p.feat_dim)


def _backbone(p: MegaLocPreset) -> nn.Module:
    from ..layers.vision_transformer import DinoVisionTransformer

    return DinoVisionTransformer(
        img_size=p.img_size, patch_size=14, embed_dim=p.embed_dim, depth=p.depth, num_heads=p.num_heads,
        mlp_ratio=4.0, qkv_bias=True, init_values=1e-5, num_register_tokens=0, mask_token=False,
        interpolate_offset=0.1, interpolate_antialias=False,
    )


class MegaLoc(nn.Module):
    """``MegaLoc()(images)`` -> (B, feat_dim) unit-norm descriptors; images (B,3,H,W) ImageNet-normalised."""

    def __init__(self, preset: str | MegaLocPreset = "megaloc"):
        super().__init__()
        p = PRESETS[preset] if isinstance(preset, str) else preset
        if isinstance(preset, str) and preset not in PRESETS:
            raise ValueError(f"unknown MegaLoc preset {preset!r}; known: {', '.join(PRESETS)}")
        self.preset = p
        self.feat_dim = p.feat_dim
        self.backbone = _backbone(p)
        self.aggregator = _Head(p)

    @classmethod
    def from_preset(cls, name: str) -> "MegaLoc":
        if name not in PRESETS:
            raise ValueError(f"unknown MegaLoc preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(name)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        if h % 14 or w % 14:  # as the reference: resize the batch to the nearest multiples (round half even)
            h, w = round(h / 14) * 14, round(w / 14) * 14
            images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out = self.backbone.forward_features(images)  # last layer, after the final LayerNorm
        cls, patches = out["x_norm_clstoken"], out["x_norm_patchtokens"]
        feat = patches.reshape(b, h // 14, w // 14, -1).permute(0, 3, 1, 2)
        desc = self.aggregator.linear(self.aggregator.agg(feat, cls))
        return F.normalize(desc, p=2, dim=1)

    @classmethod
    def from_pretrained(cls, source: str | Path = "gberton/MegaLoc", preset: str = "megaloc",
                        filename: str = "model.safetensors", revision: str | None = None) -> "MegaLoc":
        """Hub repo id (``model.safetensors`` from the cache or a download), a local directory or a checkpoint
        file, through the project's one loader (`sparse_vggt.weights`).

        Loads strictly: missing, unexpected or mis-shaped keys raise `CheckpointMismatchError` naming them,
        never a partial model. Built on the meta device, so peak memory is one copy of the weights.
        """
        from ..weights import load_checkpoint_into, resolve_checkpoint

        path = resolve_checkpoint(source, (filename,), revision=revision, stage="describe")
        with torch.device("meta"):
            model = cls(preset)
        load_checkpoint_into(model, path)
        log.info("loaded MegaLoc weights from %s", path)
        return model.eval()
