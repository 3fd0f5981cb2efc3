"""VGGT: aggregator + camera, depth, point and track heads (facebook/VGGT-1B layout).

``VGGT()`` is the 1B configuration; its state dict has exactly the names and shapes of the public checkpoint.
``VGGT(**config)`` or ``VGGT.from_preset("tiny")`` build smaller models for tests and benchmarks.
``VGGT.from_pretrained(name_or_path)`` loads a checkpoint (hub repo id, directory or file; strict).

Forward: ``model(images, query_points=None)``, images (S, 3, H, W) or (B, S, 3, H, W) in [0, 1], H and W
multiples of 14. Returns the reference's keys: pose_enc (B, S, 9), pose_enc_list, depth (B, S, H, W, 1),
depth_conf (B, S, H, W), world_points (B, S, H, W, 3), world_points_conf, images (eval mode) and, with
query points (N, 2) / (B, N, 2) in frame-0 pixels, track (B, S, N, 2), vis and conf (B, S, N).

Sparse global attention: ``VGGT(sparse=SparseContext(...))`` (or ``from_preset``/``from_pretrained`` with
``sparse=``) builds the aggregator's global blocks, and with ``sparse_camera_head=True`` the camera trunk, with
`SparseGlobalAttention` (or its subclass ``sparse_attn_class``); the state dict is the dense model's. Such a
model takes ``neighbors=``: one list of frame indices per input frame, or a callable images -> lists (e.g.
`sparse_vggt.neighbors.Retriever`). `VGGT.with_sparse_attention` builds the sparse twin of a loaded model.

Note on the camera head: its trunk attends across frames, one camera token per frame (S tokens, so cost
S², negligible next to the aggregator's (S·P)²). It stays dense by default, as in the trained model;
``sparse_camera_head=True`` restricts it to the same neighbour sets, which makes a cluster's poses, not
only its tokens and depth maps, independent of frames it does not list.

Camera/depth/point heads run in fp32 with autocast disabled (as the reference); the track head under the
caller's autocast. ``predict`` wraps inference (inference_mode, device autocast dtype, half-precision
aggregator weights on CUDA/MPS, frame-chunked heads). Memory: see sparse_vggt.memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
import contextlib
from typing import Any, Sequence

import torch
from torch import nn

from ..layers.attention import Attention
from ..layers.neighbor_sets import NeighborSets
from ..layers.sparse_attention import SparseContext, sparse_attention_class
from .aggregator import Aggregator
from .heads.camera_head import CameraHead
from .heads.dpt_head import DPTHead
from .heads.track_head import TrackHead

log = logging.getLogger(__name__)

# Small configurations running the same code paths. "tiny": seconds on a CPU (tests, demo smoke runs);
# "small": DINOv2-S patch embed + 384-wide aggregator (oracle comparisons, benchmarks without the 1B weights).
PRESETS: dict[str, dict[str, Any]] = {
    "vggt-1b": {},
    "tiny": dict(img_size=224, embed_dim=64, depth=4, num_heads=4,
                 patch_embed=dict(embed_dim=64, depth=2, num_heads=4), intermediate_layer_idx=(0, 1, 2, 3),
                 camera_trunk_depth=1, camera_num_heads=4, dpt_features=32, dpt_out_channels=(16, 32, 64, 64),
                 track_features=16, track_hidden_size=32, track_depth=2, track_corr_levels=3),
    "small": dict(embed_dim=384, depth=24, num_heads=6, patch_embed="dinov2_vits14_reg", camera_num_heads=8,
                  dpt_features=128, dpt_out_channels=(96, 192, 384, 384)),
}


class VGGT(nn.Module):
    def __init__(self, img_size: int = 518, patch_size: int = 14, embed_dim: int = 1024,
                 enable_camera: bool = True, enable_point: bool = True, enable_depth: bool = True,
                 enable_track: bool = True, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 num_register_tokens: int = 4, patch_embed: str | dict = "dinov2_vitl14_reg", qk_norm: bool = True,
                 rope_freq: float = 100.0, init_values: float = 0.01,
                 intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23), camera_trunk_depth: int = 4,
                 camera_num_heads: int = 16, dpt_features: int = 256,
                 dpt_out_channels: Sequence[int] = (256, 512, 1024, 1024), track_features: int = 128,
                 track_hidden_size: int = 384, track_depth: int = 6, track_num_heads: int = 8,
                 track_num_virtual_tracks: int = 64, track_iters: int = 4, track_corr_levels: int = 7,
                 head_chunk_frames: int | None = 8, sparse: SparseContext | None = None,
                 sparse_camera_head: bool = False, sparse_attn_class: type | None = None):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if sparse_camera_head and sparse is None:
            raise ValueError("sparse_camera_head=True needs sparse=SparseContext(...)")
        self.sparse = sparse  # the neighbour-set context of every sparse attention module (not a submodule)
        dim = 2 * embed_dim
        idx = tuple(intermediate_layer_idx)
        self.aggregator = Aggregator(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                     num_heads=num_heads, mlp_ratio=mlp_ratio,
                                     num_register_tokens=num_register_tokens, patch_embed=patch_embed,
                                     qk_norm=qk_norm, rope_freq=rope_freq, init_values=init_values,
                                     sparse=sparse, sparse_attn_class=sparse_attn_class)
        trunk_attn = sparse_attention_class(sparse, 0, sparse_attn_class) if sparse_camera_head else Attention
        self.camera_head = (CameraHead(dim, trunk_depth=camera_trunk_depth, num_heads=camera_num_heads,
                                       attn_class=trunk_attn)
                            if enable_camera else None)
        dpt = dict(patch_size=patch_size, features=dpt_features, out_channels=dpt_out_channels,
                   intermediate_layer_idx=idx)
        self.point_head = (DPTHead(dim, output_dim=4, activation="inv_log", conf_activation="expp1", **dpt)
                           if enable_point else None)
        self.depth_head = (DPTHead(dim, output_dim=2, activation="exp", conf_activation="expp1", **dpt)
                           if enable_depth else None)
        self.track_head = (TrackHead(dim, patch_size, features=track_features, iters=track_iters,
                                     hidden_size=track_hidden_size, depth=track_depth, num_heads=track_num_heads,
                                     num_virtual_tracks=track_num_virtual_tracks, out_channels=dpt_out_channels,
                                     intermediate_layer_idx=idx, corr_levels=track_corr_levels)
                           if enable_track else None)
        self.head_chunk_frames = head_chunk_frames
        needed = set(idx) if (enable_point or enable_depth or enable_track) else set()
        self.aggregator.keep_layers = sorted({i % depth for i in needed} | {depth - 1})

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "VGGT":
        if name not in PRESETS:
            raise ValueError(f"unknown VGGT preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "facebook/VGGT-1B", preset: str | None = None,
                        revision: str | None = None, map_location: str | torch.device = "cpu",
                        **config: Any) -> "VGGT":
        """Load weights strictly from a hub repo id (``model.safetensors`` or ``model.pt``), a directory or a file.

        The model is built on the meta device and the checkpoint tensors are assigned, so peak memory is one
        copy of the weights. ``preset``/``config`` select the architecture (default: VGGT-1B).
        """
        from ..weights import load_checkpoint_into, resolve_checkpoint

        path = resolve_checkpoint(name_or_path, ("model.safetensors", "model.pt"), revision=revision)
        kwargs = {**(PRESETS[preset] if preset else {}), **config}
        with torch.device("meta"):
            model = cls(**kwargs)
        load_checkpoint_into(model, path, map_location=map_location)
        log.info("loaded VGGT weights from %s", path)
        return model.eval()

    def with_sparse_attention(self, sparse: SparseContext | None, sparse_camera_head: bool = False) -> "VGGT":
        """A new model of this configuration with sparse global attention (``sparse=None``: dense), sharing this
        model's parameter tensors (no copy): for comparing dense and sparse on one set of weights."""
        with torch.device("meta"):
            twin = type(self)(**{**self.config, "sparse": sparse, "sparse_camera_head": sparse_camera_head})
        twin.load_state_dict(self.state_dict(), assign=True)
        return twin.train(self.training)

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, query_points: torch.Tensor | None = None,
                head_chunk_frames: int | None = -1, neighbors: Any = None) -> dict[str, Any]:
        """See the module docstring. ``head_chunk_frames``: frames per DPT-head chunk (-1: the model default,
        None: all frames at once). ``neighbors``: required by (and only accepted by) a sparse model."""
        if images.dim() not in (4, 5):
            raise ValueError(f"images must be (S, 3, H, W) or (B, S, 3, H, W), got {tuple(images.shape)}")
        with self._neighbors(images, neighbors):
            return self._forward(images.unsqueeze(0) if images.dim() == 4 else images, query_points,
                                 head_chunk_frames)

    def _neighbors(self, images: torch.Tensor, neighbors: Any) -> contextlib.AbstractContextManager:
        """Activate the neighbour sets of this call on the sparse attention modules (nothing when dense)."""
        if self.sparse is None:
            if neighbors is not None:
                raise ValueError("neighbors= given, but this VGGT has dense global attention "
                                 "(build it with sparse=SparseContext(...))")
            return contextlib.nullcontext()
        if neighbors is None:
            raise ValueError("a VGGT with sparse global attention needs neighbors=: one list of frame indices per "
                             "frame, or a callable images -> lists such as sparse_vggt.neighbors.Retriever(k)")
        if callable(neighbors):
            if images.dim() == 5 and images.shape[0] > 1:
                # One neighbour structure serves every sequence of the batch; retrieval on one sequence would
                # silently impose its covisibility on the others.
                raise ValueError(
                    f"neighbors computed from the images with a batch of {images.shape[0]} sequences: neighbour "
                    "sets are shared by the whole batch, so pass neighbors= explicitly or run the sequences one "
                    "at a time")
            neighbors = neighbors(images)
        return self.sparse.use(NeighborSets.build(neighbors, images.shape[-4]))

    def _forward(self, images: torch.Tensor, query_points: torch.Tensor | None,
                 head_chunk_frames: int | None) -> dict[str, Any]:
        if query_points is not None and query_points.dim() == 2:
            query_points = query_points.unsqueeze(0)
        chunk = self.head_chunk_frames if head_chunk_frames == -1 else head_chunk_frames
        tokens, patch_start_idx = self.aggregator(images)
        out: dict[str, Any] = {}
        with torch.autocast(device_type=images.device.type, enabled=False):
            # fp32 heads: the camera head reads one token per frame (cast here), the DPT heads cast each chunk
            # of frames as they read it, so no fp32 copy of the kept layers is ever made.
            if self.camera_head is not None:
                cam = [None] * (len(tokens) - 1) + [tokens[-1][:, :, :1].to(self._head_dtype(self.camera_head))]
                poses = self.camera_head(cam)
                del cam
                out["pose_enc"] = poses[-1]
                out["pose_enc_list"] = poses
            if self.depth_head is not None:
                out["depth"], out["depth_conf"] = self.depth_head(tokens, images, patch_start_idx, chunk)
            if self.point_head is not None:
                out["world_points"], out["world_points_conf"] = self.point_head(tokens, images, patch_start_idx,
                                                                                chunk)
        if self.track_head is not None and query_points is not None:
            tracks, vis, conf = self.track_head(tokens, images, patch_start_idx, query_points,
                                                frames_chunk_size=chunk)
            out["track"], out["vis"], out["conf"] = tracks[-1], vis, conf
        if not self.training:
            out["images"] = images
        return out

    @staticmethod
    def _head_dtype(head: nn.Module) -> torch.dtype:
        return next(head.parameters()).dtype

    def set_weights_dtype(self, dtype: torch.dtype, device: torch.device | str | None = None) -> "VGGT":
        """Store the aggregator's weights (patch embedder, frame and global blocks: ~72% of the 1B parameters)
        in ``dtype``, converting tensor by tensor on ``device`` (no second full-precision copy there). The
        camera/depth/point heads keep fp32 weights: they run in fp32, as the reference does; so does the track
        head (its tracker has ops autocast does not cover)."""
        self.aggregator.to(device=device, dtype=dtype)
        if device is not None:
            self.to(device)
        return self

    def predict(self, images: torch.Tensor, query_points: torch.Tensor | None = None, device: str = "auto",
                dtype: str = "auto", head_chunk_frames: int | None = -1, weights: str = "auto",
                **forward_kwargs: Any) -> dict[str, Any]:
        """Inference on ``device`` (moving the model there) under ``torch.inference_mode`` and the device's
        autocast dtype (bf16 CUDA, fp16 MPS, fp32 CPU; see sparse_vggt.device). ``weights``: dtype of the
        aggregator's weights; ``auto`` = the compute dtype on CUDA/MPS (half the memory), fp32 on CPU;
        ``float32`` keeps full-precision weights. ``forward_kwargs`` go to the forward call, e.g.
        ``neighbors=`` of a model built with ``sparse=``."""
        from ..device import autocast, select_device, select_dtype, select_weights_dtype

        dev = select_device(device)
        dt = select_dtype(dev, dtype)
        self.set_weights_dtype(select_weights_dtype(dev, dt, weights), dev)
        self.eval()
        with torch.inference_mode(), autocast(dev, dt):
            return self(images.to(dev), None if query_points is None else query_points.to(dev),
                        head_chunk_frames=head_chunk_frames, **forward_kwargs)
