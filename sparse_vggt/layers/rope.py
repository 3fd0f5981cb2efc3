"""2-D rotary position embedding (RoPE) as used by VGGT's aggregator.

The head dimension is split in two halves: the first is rotated by the token's row (y) position, the second
by its column (x) position. Each half uses the "rotate-half" pairing (channel c with c + d/4) and
frequencies ``base ** (-2k / (d/2))``. Angles are computed in fp32 and cast to the q/k dtype before cos/sin,
which is what the published weights were trained with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def patch_positions(batch: int, rows: int, cols: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(batch, rows*cols, 2) integer (y, x) grid positions in row-major token order."""
    y = torch.arange(rows, device=device)
    x = torch.arange(cols, device=device)
    grid = torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).reshape(1, rows * cols, 2)
    return grid.expand(batch, -1, -1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.chunk(2, dim=-1)
    return torch.cat((-hi, lo), dim=-1)


class RotaryPositionEmbedding2D(nn.Module):
    """``rope(x, pos)``: x (B, heads, N, head_dim), pos (B, N, 2) integer (y, x) -> rotated x.

    No parameters (so it never appears in a state dict); cos/sin tables are cached per (length, device, dtype).
    """

    def __init__(self, frequency: float = 100.0):
        super().__init__()
        self.base_frequency = float(frequency)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.max_length: int | None = None  # set by `reserve`: no device sync per call

    def reserve(self, length: int) -> None:
        """Promise that positions stay below ``length`` (the aggregator knows its grid). Without it every call
        reads ``pos.max()``, which waits for the device."""
        self.max_length = max(int(length), self.max_length or 0)

    def _table(self, dim: int, length: int, device: torch.device, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dim, length, device, dtype)
        if key not in self._tables:
            inv_freq = 1.0 / (self.base_frequency ** (torch.arange(0, dim, 2, device=device).float() / dim))
            steps = torch.arange(length, device=device, dtype=inv_freq.dtype)
            angles = torch.outer(steps, inv_freq).to(dtype)
            angles = torch.cat((angles, angles), dim=-1)
            self._tables[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
        return self._tables[key]

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {x.shape[-1]}")
        if pos.shape[-1] != 2 or pos.shape[-2] != x.shape[-2]:
            raise ValueError(f"positions {tuple(pos.shape)} do not match tokens {tuple(x.shape)}")
        half = x.shape[-1] // 2
        length = self.max_length if self.max_length is not None else int(pos.max()) + 1
        cos, sin = self._table(half, length, x.device, x.dtype)
        pos = pos.long()
        out = []
        for axis, part in enumerate(x.chunk(2, dim=-1)):
            c = F.embedding(pos[..., axis], cos)[:, None]
            s = F.embedding(pos[..., axis], sin)[:, None]
            out.append(part * c + _rotate_half(part) * s)
        return torch.cat(out, dim=-1)
