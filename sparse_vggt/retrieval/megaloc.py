"""MegaLoc retrieval descriptors: images -> 8448-d unit vectors (or the tiny preset's, for tests).

Images are read by the scan's image reader, resized and normalised as `models.inputs.MEGALOC_INPUT` says
(square PIL bilinear at ``describe.image_size``), decoded on 4 threads, and run in batches of
``describe.batch_size`` that halve on out-of-memory errors.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..config import DescribeConfig
from ..models.inputs import megaloc_batch, resize_square
from . import DescribeError, DescribeInputs, Retrieval

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "gberton/MegaLoc"
CHECKPOINT_FILES = ("model.safetensors",)

_WARNED_RANDOM: set[tuple[str, str]] = set()


def _warn_random_once(preset: str, run: str) -> None:
    """One warning block per run directory and process (a flow builds the describer once per chunk)."""
    if (preset, run) in _WARNED_RANDOM:
        return
    _WARNED_RANDOM.add((preset, run))
    log.warning("describe: MegaLoc (preset %s) runs with RANDOM WEIGHTS: the descriptors and the covisibility "
                "graph are noise.\nFor real results point describe.model at a checkpoint (default gberton/MegaLoc).",
                preset)


def provenance_of(cfg: DescribeConfig) -> dict[str, Any]:
    from ..provenance import provenance

    return provenance(cfg.model, CHECKPOINT_FILES, preset=cfg.preset, seed=0 if cfg.model == "random" else None)


def plan(cfg: DescribeConfig) -> tuple[int, str, dict[str, Any]]:
    """(dim, model id, weights provenance) from the configuration alone: no weights are loaded."""
    from ..models.megaloc import PRESETS

    if cfg.preset not in PRESETS:
        raise DescribeError(f"unknown describe.preset {cfg.preset!r}; known: {', '.join(PRESETS)}")
    model_id = f"random:{cfg.preset}" if cfg.model == "random" else cfg.model
    return PRESETS[cfg.preset].feat_dim, model_id, provenance_of(cfg)


class MegaLocDescriber:
    """Runs MegaLoc over rows of images.parquet with threaded decoding and OOM back-off."""

    def __init__(self, inputs: DescribeInputs):
        import torch

        from ..device import select_device, select_dtype
        from ..models.megaloc import MegaLoc

        cfg = inputs.config.describe
        self.cfg = cfg
        self.root = inputs.photos_root()
        self.paths = inputs.table.column("path").to_pylist()
        self.device = select_device(cfg.device)
        self.dtype = select_dtype(self.device, cfg.dtype)
        if cfg.image_size % 14:
            raise DescribeError(f"describe.image_size={cfg.image_size} must be a multiple of 14 (e.g. 322)")
        if cfg.model == "random":
            if not cfg.allow_random_weights:
                raise DescribeError("describe.model='random' builds MegaLoc with random weights, whose "
                                    "descriptors are meaningless for retrieval. Set "
                                    "describe.allow_random_weights=true to do it anyway (tests, demos).")
            _warn_random_once(cfg.preset, inputs.run)
            torch.manual_seed(0)
            self.model = MegaLoc.from_preset(cfg.preset)
            self.model_id = f"random:{cfg.preset}"
        else:
            self.model = MegaLoc.from_pretrained(cfg.model, preset=cfg.preset)
            self.model_id = cfg.model
        self.weights = provenance_of(cfg)
        self.model.to(self.device).eval()
        self.dim = self.model.feat_dim
        self.batch = max(1, cfg.batch_size)
        self.pool = ThreadPoolExecutor(max_workers=4)

    def _load(self, rel: str) -> np.ndarray:
        from ..scan import load_image

        try:
            img = load_image(self.root / rel)
        except Exception as exc:
            raise DescribeError(f"cannot read {self.root / rel} ({exc}); it was readable at scan time. "
                                "Restore it or re-run `sparse-vggt scan`.") from exc
        return resize_square(img, self.cfg.image_size)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        import torch

        from ..device import autocast, is_out_of_memory

        images = list(self.pool.map(self._load, [self.paths[r] for r in rows]))
        out = np.empty((len(images), self.dim), np.float32)
        s = 0
        while s < len(images):
            e = min(len(images), s + self.batch)
            x = megaloc_batch(images[s:e]).to(self.device)
            try:
                with torch.inference_mode(), autocast(self.device, self.dtype):
                    out[s:e] = self.model(x).float().cpu().numpy()
            except Exception as exc:
                if is_out_of_memory(exc) and self.batch > 1:
                    self.batch = max(1, self.batch // 2)
                    log.warning("out of memory on %s; describe batch size -> %d", self.device, self.batch)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                raise
            s = e
        if not np.isfinite(out).all():
            raise DescribeError(f"the model produced NaN/Inf descriptors (dtype {self.dtype}); try "
                                "--set describe.dtype=float32")
        return out

    def manifest(self, images: int, seconds: float) -> dict[str, Any]:
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "image_size": self.cfg.image_size, "images_per_s": round(images / seconds, 2) if seconds else None}


ENTRY = Retrieval("megaloc", lambda inputs: MegaLocDescriber(inputs), plan=plan, checkpoint_files=CHECKPOINT_FILES)
