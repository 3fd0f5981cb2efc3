"""Shared fixtures. Stage-specific fixtures live in their own test modules, not here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SAMPLE_PHOTOS = REPO / "sparse_vggt" / "data" / "sacre_coeur" / "images"
FOX = FIXTURES / "fox"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def sample_photos() -> Path:
    """The 10 bundled Sacre-Coeur photos (sizes differ, mixed portrait/landscape, no EXIF)."""
    return SAMPLE_PHOTOS


@pytest.fixture(scope="session")
def fox_dir() -> Path:
    """50 fox photos (450x800) with a reference COLMAP text model in sparse/0 (non-commercial licence)."""
    return FOX


@pytest.fixture(scope="session", autouse=True)
def _resident_processes(tmp_path_factory: pytest.TempPathFactory):
    """Farm flows run in-process by tests start resident model processes (sparse_vggt.resident) that outlive the
    flow run until idle: keep their sockets in this session's temp folder and stop them when the session ends."""
    folder = tmp_path_factory.mktemp("resident")
    old = os.environ.get("SPARSE_VGGT_RESIDENT_DIR")
    os.environ["SPARSE_VGGT_RESIDENT_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("SPARSE_VGGT_RESIDENT_DIR", None)
    else:
        os.environ["SPARSE_VGGT_RESIDENT_DIR"] = old
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "sparse_vggt.resident" in cmd and any(str(folder) in c for c in cmd):
            try:
                proc.kill()
            except psutil.Error:
                pass
