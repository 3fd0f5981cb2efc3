"""Neighbour sets of sparse global attention: N(i), the key frames each query frame i attends to.

Kept apart from the attention module and the kernels because both use it (and the kernels must not
import the module that dispatches to them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class NeighborSets:
    """The key-frame set N(i) of every query frame i (sorted, unique, always containing i and 0)."""

    sets: tuple[tuple[int, ...], ...]

    @property
    def num_frames(self) -> int:
        return len(self.sets)

    @property
    def sizes(self) -> list[int]:
        return [len(s) for s in self.sets]

    @classmethod
    def build(
        cls, neighbors: Any, num_frames: int, include_self: bool = True, include_reference: bool = True
    ) -> "NeighborSets":
        """Normalise per-frame neighbour lists (lists, arrays or an (S, k) tensor; negatives = padding).

        Raises ValueError with the offending frame when lists are missing or out of range.
        """
        if isinstance(neighbors, NeighborSets):
            if neighbors.num_frames != num_frames:
                raise ValueError(f"neighbour sets are for {neighbors.num_frames} frames, input has {num_frames}")
            return neighbors
        if hasattr(neighbors, "tolist"):
            neighbors = neighbors.tolist()
        neighbors = list(neighbors)
        if len(neighbors) != num_frames:
            raise ValueError(
                f"got neighbour lists for {len(neighbors)} frames but the input has {num_frames} frames; "
                "pass one list of frame indices per frame (in input order)"
            )
        sets = []
        for i, row in enumerate(neighbors):
            if hasattr(row, "tolist"):
                row = row.tolist()
            if isinstance(row, int):
                row = [row]
            members = {int(j) for j in row if int(j) >= 0}
            bad = [j for j in members if j >= num_frames]
            if bad:
                raise ValueError(f"frame {i} lists neighbour(s) {sorted(bad)} but there are only {num_frames} frames")
            if include_self:
                members.add(i)
            if include_reference:
                members.add(0)
            sets.append(tuple(sorted(members)))
        return cls(tuple(sets))

    @classmethod
    def full(cls, num_frames: int) -> "NeighborSets":
        """Every frame attends to every frame: equals dense global attention."""
        everything = tuple(range(num_frames))
        return cls(tuple(everything for _ in range(num_frames)))

    def membership(self, device: torch.device | str = "cpu") -> Tensor:
        """(S, S) bool: member[i, j] is True iff frame j is in N(i). S² booleans, never S²P²."""
        S = self.num_frames
        rows = torch.tensor([i for i, s in enumerate(self.sets) for _ in s], dtype=torch.long)
        cols = torch.tensor([j for s in self.sets for j in s], dtype=torch.long)
        member = torch.zeros(S, S, dtype=torch.bool)
        member[rows, cols] = True
        return member.to(device)
