"""The demo's settings and photos: `sparse-vggt demo` runs the whole pipeline on the bundled sample photos.

The settings live in ``data/demo.toml`` (tiny random-weight models, small images, small clusters) so that the
demo, the tests that reuse it and the docs read one file. Nothing here runs a flow: the CLI hands the config to
the executor it loads lazily.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .config import PipelineConfig

DATA = Path(__file__).parent / "data"
DEMO_PHOTOS = DATA / "sacre_coeur" / "images"
DEMO_TOML = DATA / "demo.toml"

RANDOM_BANNER = (
    "\n" + "!" * 74 + "\n"
    "!!  DEMO WITH RANDOM WEIGHTS: the models are randomly initialised, so every\n"
    "!!  pose, depth map and point of this run is MEANINGLESS. It shows the\n"
    "!!  pipeline end to end; for real results load checkpoints (describe.model,\n"
    "!!  reconstruct.model) and run `sparse-vggt run PHOTOS RUN`.\n" + "!" * 74 + "\n"
)


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def demo_settings() -> dict[str, Any]:
    """``data/demo.toml`` as dotted ``section.field`` -> value (the form of ``--set``)."""
    with DEMO_TOML.open("rb") as fh:
        return _flatten(tomllib.load(fh))


DEMO_SETTINGS: dict[str, Any] = demo_settings()


def demo_config(overrides: list[str] | None = None) -> PipelineConfig:
    """The defaults, then the demo's settings, then ``overrides`` (``section.field=value`` strings)."""
    cfg = PipelineConfig()
    for key, value in DEMO_SETTINGS.items():
        cfg.set(key, value)
    return cfg.apply_overrides(overrides)


def random_stages(cfg: PipelineConfig) -> list[str]:
    """The model stages that run with random weights (their geometry is meaningless)."""
    return [s for s in ("describe", "reconstruct") if getattr(cfg, s).model == "random"]
