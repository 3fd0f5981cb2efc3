"""What a completion marker records and checks: per array its shape, dtype, stored files, bytes and CRC-32.

A unit counts as done only if its marker exists *and* this manifest still matches the files on disk, so a
truncated, deleted or altered chunk is redone instead of being read as zeros.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any


class UnitCheck:
    """Outcome of verifying one unit: ``ok`` or the reason it must be redone."""

    __slots__ = ("ok", "reason", "marked")

    def __init__(self, ok: bool, reason: str = "", marked: bool = False):
        self.ok, self.reason, self.marked = ok, reason, marked  # marked: a marker said complete, the data disagrees

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return f"UnitCheck(ok={self.ok}, reason={self.reason!r})"


def array_manifest(gdir: Path, checksum: bool) -> dict[str, dict[str, Any]]:
    """Per array below ``gdir`` (key: path relative to it): shape, dtype, stored file count and bytes, CRC-32."""
    out: dict[str, dict[str, Any]] = {}
    for dirpath, dirs, files in os.walk(gdir):
        dirs.sort()
        here = Path(dirpath)
        if here == gdir or "zarr.json" not in files:
            continue
        try:
            meta = json.loads((here / "zarr.json").read_text())
        except ValueError:
            meta = {}
        if meta.get("node_type") != "array":
            continue
        dirs[:] = []  # an array's chunks are below it; no nested nodes
        stored = sorted(p for p in here.rglob("*") if p.is_file() and not p.name.endswith(".partial"))
        entry: dict[str, Any] = {"shape": list(meta.get("shape", [])), "dtype": str(meta.get("data_type")),
                                 "files": len(stored), "nbytes": sum(p.stat().st_size for p in stored)}
        if checksum:
            crc = 0
            for p in stored:
                crc = zlib.crc32(p.read_bytes(), crc)
            entry["crc32"] = crc
        out[str(here.relative_to(gdir))] = entry
    return out
