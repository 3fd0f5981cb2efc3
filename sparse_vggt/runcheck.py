"""Is a run already finished? The CLI asks before it imports Prefect, so re-running a finished run is instant.

A run is finished for a photo folder and a config when every stage's completion marker is set in ``run.json``,
the scan was of the same folder with the same listing (names, sizes, mtimes), the recorded config equals the
requested one in every result-affecting field, and every unit passes the quick check (markers, chunk listing and
sizes: ``RunStore.quick_damage``). Anything else (a stage left, changed photos, changed settings,
``--force``) goes through the flow, which resumes or refuses with its own message.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .config import PipelineConfig
from .store import STAGES, RunStore

log = logging.getLogger(__name__)


def finished_run(run_dir: str | Path, photos: str | Path, config: PipelineConfig | None = None) -> dict[str, Any] | None:
    """A summary of ``run_dir`` if it is finished for ``photos`` (and ``config``: None = the recorded one), else
    None. Reads run.json, lists the photo folder and stats its files; never imports Prefect."""
    from .scan import _listing_fingerprint, find_photos

    run_dir, photos = Path(run_dir).expanduser(), Path(photos).expanduser()
    if not (run_dir / "run.json").is_file() or not photos.is_dir():
        return None
    store = RunStore(run_dir)
    try:
        meta = store.meta()
        recorded = PipelineConfig.from_dict(meta.get("config", {}))
    except Exception as exc:  # noqa: BLE001 - a broken run.json is the flow's to report
        log.debug("fast path skipped: %s", exc)
        return None
    stages = meta.get("stages", {})
    if not all(stages.get(s, {}).get("finished") for s in STAGES):
        return None
    if config is not None and recorded.diff(config):
        return None
    scan = stages["scan"].get("manifest", {})
    root = photos.resolve()
    if scan.get("photos_root") != str(root):
        return None
    cfg = config or recorded
    paths = find_photos(root, cfg.scan.extensions, cfg.scan.follow_symlinks)
    if _listing_fingerprint(root, paths) != scan.get("listing_sha256"):
        return None
    damage = store.quick_damage()
    if damage:  # the flow verifies in full, records and redoes it
        log.info("not finished after all: %s", damage)
        return None
    return summary(store, stages, recorded)


def summary(store: RunStore, stages: dict[str, Any], recorded: PipelineConfig) -> dict[str, Any]:
    """What a finished run produced, from its markers, manifests and the last flow report (if any)."""
    report_path = store.root / "orchestration" / "report.json"
    report: dict[str, Any] = {}
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except json.JSONDecodeError:
            report = {}
    scan, rec = stages["scan"].get("manifest", {}), stages["reconstruct"].get("manifest", {})
    export_dir = store.export_dir.resolve()
    files = sorted(str(p.relative_to(export_dir)) for p in export_dir.rglob("*") if p.is_file()) \
        if export_dir.exists() else []
    return {
        "run_dir": str(store.root.resolve()),
        "state": "already complete: nothing to do",
        "finished": stages["export"].get("finished"),
        "images_kept": scan.get("kept"),
        "images_skipped": scan.get("skipped"),
        "clusters": rec.get("clusters"),
        "clusters_reconstructed": rec.get("reconstructed"),
        "frames_reconstructed": rec.get("frames"),
        "random_weights": [s for s in ("describe", "reconstruct") if getattr(recorded, s).model == "random"],
        "failures": report.get("failures", []),
        "export_dir": str(export_dir),
        "outputs": files,
    }
