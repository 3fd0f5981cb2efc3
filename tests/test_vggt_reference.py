"""Equivalence with the reference implementation (facebookresearch/vggt), when it is importable.

Not part of this repository: point ``VGGT_REFERENCE_PATH`` at a checkout (os.pathsep-separated entries are
added to sys.path; it needs ``einops``). Otherwise the test is skipped with that reason. Same random weights,
same input, fp32: every output must match to float rounding.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

for entry in filter(None, os.environ.get("VGGT_REFERENCE_PATH", "").split(os.pathsep)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

ref_aggregator = pytest.importorskip(
    "vggt.models.aggregator", reason="reference VGGT not importable; set VGGT_REFERENCE_PATH to a checkout")
pytest.importorskip("einops", reason="the reference track head needs einops")

from vggt.heads.camera_head import CameraHead as RefCameraHead  # noqa: E402
from vggt.heads.dpt_head import DPTHead as RefDPTHead  # noqa: E402
from vggt.heads.track_head import TrackHead as RefTrackHead  # noqa: E402
from vggt.heads.track_modules.base_track_predictor import BaseTrackerPredictor as RefTracker  # noqa: E402
from vggt.layers.vision_transformer import DinoVisionTransformer as RefDino  # noqa: E402
from vggt.models.vggt import VGGT as RefVGGT  # noqa: E402

from sparse_vggt.models.vggt import VGGT  # noqa: E402


def reference_tiny() -> nn.Module:
    """The reference modules configured like our "tiny" preset."""
    ref = RefVGGT.__new__(RefVGGT)
    nn.Module.__init__(ref)
    agg = ref_aggregator.Aggregator(img_size=224, patch_size=14, embed_dim=64, depth=4, num_heads=4, patch_embed="conv")
    agg.patch_embed = RefDino(img_size=224, patch_size=14, embed_dim=64, depth=2, num_heads=4, num_register_tokens=4,
                              interpolate_antialias=True, interpolate_offset=0.0, block_chunks=0, init_values=1.0)
    ref.aggregator = agg
    ref.camera_head = RefCameraHead(dim_in=128, trunk_depth=1, num_heads=4)
    dpt = dict(features=32, out_channels=[16, 32, 64, 64], intermediate_layer_idx=[0, 1, 2, 3])
    ref.point_head = RefDPTHead(dim_in=128, output_dim=4, activation="inv_log", conf_activation="expp1", **dpt)
    ref.depth_head = RefDPTHead(dim_in=128, output_dim=2, activation="exp", conf_activation="expp1", **dpt)
    track = RefTrackHead(dim_in=128, features=16, hidden_size=32, corr_levels=3)
    track.feature_extractor = RefDPTHead(dim_in=128, features=16, feature_only=True, down_ratio=2, pos_embed=False,
                                         out_channels=[16, 32, 64, 64], intermediate_layer_idx=[0, 1, 2, 3])
    track.tracker = RefTracker(latent_dim=16, stride=2, corr_levels=3, corr_radius=4, hidden_size=32, depth=2)
    ref.track_head = track
    return ref.eval()


def test_tiny_matches_reference_implementation():
    torch.manual_seed(0)
    ours = VGGT.from_preset("tiny").eval()
    g = torch.Generator().manual_seed(1)
    state = ours.state_dict()
    with torch.no_grad():  # leave the near-zero inits so every branch contributes
        for k, v in state.items():
            if k.endswith("gamma"):
                v.uniform_(0.2, 1.0, generator=g)
            elif k.endswith(("camera_token", "register_token", "cls_token", "empty_pose_tokens")):
                v.normal_(0, 1, generator=g)
    ours.load_state_dict(state)
    ref = reference_tiny()
    ref.load_state_dict(state, strict=True)
    images = torch.rand(2, 3, 3, 98, 126, generator=g)
    query = torch.rand(2, 5, 2, generator=g) * torch.tensor([125.0, 97.0])
    with torch.no_grad():
        a = ref(images, query_points=query)
        b = ours(images, query_points=query)
        ta, _ = ref.aggregator(images)
        tb, _ = ours.aggregator(images)
    for i, t in enumerate(tb):
        torch.testing.assert_close(t, ta[i], rtol=0, atol=1e-6, msg=f"aggregator layer {i}")
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf", "track", "vis", "conf"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=key)
