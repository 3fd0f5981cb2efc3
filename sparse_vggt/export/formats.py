"""The export format registry: which files the export stage writes, in which order, behind which switch.

Adding a format is one new module with a writer plus one entry in ``FORMATS``. A writer takes a context
(:class:`~.context.ComponentContext` for a per-component format, :class:`~.context.ExportContext` otherwise),
writes its files under ``ctx.out`` (``ctx.run.out`` per component) and returns the keys it adds to the export
manifest (per component: to that component's entry). The stage calls the enabled per-component formats for each
merge component, then the enabled run-wide formats, all in the order of ``FORMATS``, and writes report.md last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import ExportConfig
from . import colmap, glb, plots, ply, rerun_log


def _always(cfg: ExportConfig) -> bool:
    return True


@dataclass(frozen=True)
class ExportFormat:
    """One output format: its writer, when it runs, and the paths it owns under ``export/``."""

    write: Callable[[Any], dict[str, Any]]  # context -> manifest keys
    enabled: Callable[[ExportConfig], bool] = _always  # the config switch
    per_component: bool = False  # called once per merge component (else once per export)
    stale: tuple[str, ...] = ()  # paths under export/ removed before every export, enabled or not, so a format
    # switched off leaves no stale files behind


FORMATS: dict[str, ExportFormat] = {
    "colmap": ExportFormat(colmap.write_model, per_component=True, stale=("colmap", "sparse")),
    "ply": ExportFormat(ply.write, lambda cfg: cfg.ply, per_component=True),
    "glb": ExportFormat(glb.write, lambda cfg: cfg.glb, per_component=True),
    "pairs": ExportFormat(colmap.write_pairs_file, lambda cfg: cfg.pairs, stale=("pairs.txt",)),
    "plots": ExportFormat(plots.write, lambda cfg: cfg.plots, stale=("plots",)),
    "rerun": ExportFormat(rerun_log.write, lambda cfg: cfg.rerun, stale=("recording.rrd",)),
}


def enabled_formats(cfg: ExportConfig, per_component: bool) -> list[tuple[str, ExportFormat]]:
    """The formats ``cfg`` switches on, of one kind, in registry order."""
    return [(name, f) for name, f in FORMATS.items() if f.per_component == per_component and f.enabled(cfg)]


def stale_paths() -> list[str]:
    """Every registered format's paths under export/ (removed before each export, whether enabled or not)."""
    return [p for f in FORMATS.values() for p in f.stale]
