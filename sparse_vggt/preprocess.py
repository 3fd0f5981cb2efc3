"""Images -> VGGT input, like the reference ``load_and_preprocess_images``, plus the inverse transform.
(Size and filter: `sparse_vggt.models.inputs.VGGT_INPUT`.)

"crop": width := image_size, height := round(h * image_size / w / 14) * 14 (Python round: half to even),
bicubic (PIL), then centre-crop rows to image_size if taller. "pad": the longer side := image_size, the other
rounded the same way, then centred white padding to image_size x image_size (top/left get the floor half).
If the results differ in size, all are padded (white, centred) to the largest height and width.

Every image also gets a 2x3 affine ``A`` with ``[x, y] = A @ [u, v, 1]`` mapping model-input coordinates to
original (upright) image coordinates. Both use the continuous convention in which pixel (i, j) covers
[i, i+1) x [j, j+1) (its centre is at i + 0.5), the convention in which VGGT's principal point (W/2, H/2) is
the image centre; so intrinsics map exactly as ``K_orig = [A; 0 0 1] @ K_model`` (`intrinsics_to_original`).
Model pixels whose mapped centre falls outside [0, width) x [0, height) are padding.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .scan import load_image, to_rgb
from .models.inputs import VGGT_INPUT

log = logging.getLogger(__name__)

PATCH = 14
MODES = ("crop", "pad")


def _round14(x: float) -> int:
    return round(x / PATCH) * PATCH


def _load(item: Image.Image | str | Path) -> Image.Image:
    """A path is read by the project's single image reader (EXIF orientation, colour modes); images pass through."""
    return item if isinstance(item, Image.Image) else load_image(Path(item))


def _resize_one(img: Image.Image, size: int, mode: str) -> tuple[torch.Tensor, np.ndarray]:
    """One image -> (3, h, w) tensor in [0, 1] and its 2x3 model->original affine."""
    img = to_rgb(img)
    w0, h0 = img.size
    if mode == "pad" and h0 > w0:
        new_h, new_w = size, _round14(w0 * (size / h0))
    else:
        new_w, new_h = size, _round14(h0 * (size / w0))
    if new_w < PATCH or new_h < PATCH:
        raise ValueError(f"image of {w0}x{h0} px is too elongated for {mode} preprocessing at {size} px")
    resized = img.resize((new_w, new_h), getattr(Image.Resampling, VGGT_INPUT.resample.upper()))
    t = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    sx, sy = w0 / new_w, h0 / new_h
    A = np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0]])
    if mode == "crop" and new_h > size:
        top = (new_h - size) // 2
        t = t[:, top:top + size]
        A[1, 2] += top * sy
    if mode == "pad":
        t, A = _pad(t, A, size, size)
    return t, A


def _pad(t: torch.Tensor, A: np.ndarray, height: int, width: int) -> tuple[torch.Tensor, np.ndarray]:
    """Centre ``t`` on a white height x width canvas (floor half on top/left); shift the affine to match."""
    dh, dw = height - t.shape[1], width - t.shape[2]
    if dh <= 0 and dw <= 0:
        return t, A
    top, left = dh // 2, dw // 2
    t = F.pad(t, (left, dw - left, top, dh - top), mode="constant", value=1.0)
    A = A.copy()
    A[0, 2] -= left * A[0, 0]
    A[1, 2] -= top * A[1, 1]
    return t, A


def preprocess_images(images: Sequence[Image.Image | str | Path], image_size: int = VGGT_INPUT.size,
                      mode: str = "crop") -> tuple[torch.Tensor, np.ndarray]:
    """PIL images (or paths, read with ``sparse_vggt.scan.load_image``) -> ((N, 3, H, W) float in [0, 1],
    (N, 2, 3) float64 affines mapping model-input coordinates to original coordinates)."""
    if len(images) == 0:
        raise ValueError("preprocess_images needs at least one image")
    if mode not in MODES:
        raise ValueError(f"preprocess mode must be one of {MODES}, got {mode!r}")
    if image_size % PATCH or image_size <= 0:
        raise ValueError(f"image_size must be a positive multiple of {PATCH}, got {image_size}")
    tensors, affines = zip(*(_resize_one(_load(im), image_size, mode) for im in images))
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) > 1:
        height, width = max(s[0] for s in shapes), max(s[1] for s in shapes)
        log.warning("images have different shapes after resizing %s; padding all to %dx%d (white)",
                    sorted(shapes), width, height)
        tensors, affines = zip(*(_pad(t, A, height, width) for t, A in zip(tensors, affines)))
    return torch.stack(tensors), np.stack(affines)


def affine3(transform: np.ndarray) -> np.ndarray:
    """(..., 2, 3) affines -> (..., 3, 3) homogeneous matrices."""
    transform = np.asarray(transform, dtype=np.float64)
    out = np.zeros(transform.shape[:-2] + (3, 3))
    out[..., :2, :] = transform
    out[..., 2, 2] = 1.0
    return out


def intrinsics_to_original(K: np.ndarray | torch.Tensor, transform: np.ndarray) -> np.ndarray:
    """(..., 3, 3) intrinsics in model-input pixels -> intrinsics in original pixels (``A @ K``)."""
    K = K.detach().cpu().double().numpy() if isinstance(K, torch.Tensor) else np.asarray(K, dtype=np.float64)
    return affine3(transform) @ K


def model_to_original(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """(..., N, 2) continuous model-input coordinates -> original coordinates, per image ``transform`` (..., 2, 3)."""
    points = np.asarray(points, dtype=np.float64)
    T = np.asarray(transform, dtype=np.float64)
    return points @ np.swapaxes(T[..., :, :2], -1, -2) + T[..., None, :, 2]


def valid_mask(transform: np.ndarray, model_hw: tuple[int, int], original_wh: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: model pixels whose centre maps inside the original image (False = padding)."""
    h, w = model_hw
    v, u = np.mgrid[0:h, 0:w]
    xy = model_to_original(np.stack([u + 0.5, v + 0.5], axis=-1).reshape(-1, 2), transform).reshape(h, w, 2)
    return (xy[..., 0] >= 0) & (xy[..., 0] < original_wh[0]) & (xy[..., 1] >= 0) & (xy[..., 1] < original_wh[1])
