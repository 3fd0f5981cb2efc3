"""What each model expects as input: side, normalisation and resize method, defined once.

VGGT normalises inside its aggregator and takes [0, 1] images resized by `sparse_vggt.preprocess` (PIL
bicubic, width 518, heights rounded to multiples of 14). MegaLoc takes ImageNet-normalised square images,
resized with PIL bilinear from the 8-bit RGB image (the describe stage's path, which feeds every pipeline
output); `megaloc_batch` is that path, used by describe and by neighbour retrieval on tensors alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """A model's input convention. ``size``: default side (square for retrieval; width for VGGT);
    ``resample``: the PIL filter of the resize; ``mean``/``std``: per-channel normalisation of [0, 1] RGB."""

    size: int
    resample: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def normalize(self, x: "torch.Tensor") -> "torch.Tensor":
        """(B, 3, H, W) in [0, 1] -> normalised, in x's dtype and device."""
        import torch

        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


VGGT_INPUT = InputSpec(size=518, resample="bicubic")  # normalised inside the aggregator
MEGALOC_INPUT = InputSpec(size=322, resample="bilinear")


def resize_square(img: "Image.Image", side: int, resample: str = MEGALOC_INPUT.resample) -> np.ndarray:
    """RGB PIL image -> (side, side, 3) uint8, resized with the named PIL filter (aspect ratio not kept)."""
    from PIL import Image

    filt = getattr(Image.Resampling, resample.upper())
    return np.asarray(img.resize((side, side), filt), dtype=np.uint8)


def megaloc_batch(images: Sequence[np.ndarray], spec: InputSpec = MEGALOC_INPUT) -> "torch.Tensor":
    """(side, side, 3) uint8 arrays from `resize_square` -> (B, 3, side, side) float32, normalised."""
    import torch

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x - mean) / std


def tensor_to_pil(frame: "torch.Tensor") -> "Image.Image":
    """(3, H, W) float in [0, 1] -> 8-bit RGB PIL image (rounded), so tensors take the same resize as files."""
    import torch
    from PIL import Image

    arr = (frame.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
