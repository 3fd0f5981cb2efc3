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
