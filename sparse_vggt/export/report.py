"""report.md: the one human-readable report of a run (checks, plots, every stage's numbers, merge edges, export,
and how the last pipeline run went).

Written last by the export stage from run.json and the export manifest, so it reflects exactly what was written;
re-rendered when a pipeline run writes orchestration/report.json (its machine-readable twin), whose run section
(`run_markdown`) is also the report an executor shows in its UI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..provenance import weights_markdown
from ..durable import atomic_write_bytes
from ..store import STAGES, RunStore
from .context import STAGE


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        text = json.dumps(v, default=str)
        return text if len(text) <= 200 else text[:197] + "..."
    return str(v)


def _checks(store: RunStore) -> list[str]:
    """Things a user must not miss, from the stage manifests (one bullet each)."""
    stages = store.meta().get("stages", {})
    out = []
    graph = stages.get("graph", {}).get("manifest") or {}
    if graph.get("recall_ok") is False:
        out.append(f"graph recall@{graph.get('k')} = {graph.get('recall_at_k')} ({graph.get('method')} search, "
                   f"{graph.get('recall_sample')} sampled queries) is below graph.min_recall = "
                   f"{graph.get('min_recall')}: some covisible pairs are missing from the graph. Use "
                   "graph.method=exact or raise graph.candidates / graph.pca_dim.")
    return out


def make_report(store: RunStore, export_manifest: dict[str, Any]) -> str:
    """Markdown with checks, plots, every stage's state and numbers (from run.json) and merge diagnostics."""
    meta = store.meta()
    stages = meta.get("stages", {})
    lines = [f"# sparse-vggt report: {store.root.name}", "", f"Run created {meta.get('created')}; "
             f"versions: {', '.join(f'{k} {v}' for k, v in meta.get('versions', {}).items())}", ""]
    lines += [weights_markdown(meta)]  # real or random weights, checkpoint file and revision
    checks = _checks(store)
    lines += ["## Checks", ""] + ([f"- **WARNING**: {c}" for c in checks] or ["- no warnings"]) + [""]
    plots = export_manifest.get("plots", {})
    if plots.get("files"):
        lines += ["## Plots", ""]
        for title, rel in plots["files"].items():
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    lines += ["## Stages", "", "| stage | state | finished |", "|---|---|---|"]
    for s in STAGES:
        e = stages.get(s, {})
        state = "finished" if e.get("finished") else ("started" if e.get("started") else "pending")
        if s == STAGE:
            state = "finished (this report)"
        lines.append(f"| {s} | {state} | {e.get('finished', '')} |")
    for s in STAGES:
        man = export_manifest if s == STAGE else stages.get(s, {}).get("manifest")
        if not man:
            continue
        lines += ["", f"### {s}", "", "| key | value |", "|---|---|"]
        for k, v in man.items():
            if k in ("pose_graph", "components", "config") and isinstance(v, (list, dict)):
                continue
            lines.append(f"| {k} | {_fmt(v)} |")
    skipped = ((stages.get("scan") or {}).get("manifest") or {}).get("skipped_files") or []
    if skipped:  # every photo the scan skipped, with its reason (the scan table above truncates the list)
        lines += ["", f"## Skipped photos ({len(skipped)})", "", "| file | reason |", "|---|---|"]
        lines += ["| {} | {} |".format(*(str(v).replace("|", "\\|").replace("\n", "\\n")
                                         for v in (s["path"], s["reason"]))) for s in skipped]
    if store.is_unit_complete("merge"):
        attrs = dict(store.group("merge", create=False).attrs)
        edges = attrs.get("residuals", [])
        lines += ["", "## Merge: cluster edges", "",
                  f"{sum(e['accepted'] for e in edges)} of {len(edges)} edges accepted.", "",
                  "| clusters | shared | corr. | inlier ratio | rel. RMSE | scale | camera rot (deg) | loop rot (deg) "
                  "| status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for e in edges:
            lines.append("| {}-{} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                e["clusters"][0], e["clusters"][1], e.get("shared_frames", ""), e.get("correspondences", ""),
                _fmt(e.get("inlier_ratio", "")), _fmt(e.get("rmse_rel", "")), _fmt(e.get("scale", "")),
                _fmt(e.get("camera_rot_deg", "")), _fmt(e.get("global_rot_deg", "")),
                "accepted" if e["accepted"] else "rejected: " + e["reason"]))
        excl = attrs.get("excluded_clusters", {})
        if excl:
            lines += ["", "## Merge: excluded clusters", ""] + [f"- cluster {k}: {v}" for k, v in excl.items()]
        lines += ["", "## Merge: components and pose graph", ""]
        for c in attrs.get("components", []):
            lines.append(f"- component {c['component']}: {len(c['clusters'])} clusters, {c['images']} images")
        for p in attrs.get("pose_graph", []):
            lines.append(f"- pose graph component {p.get('component')}: {p.get('nodes')} clusters, {p.get('edges')} "
                         f"edges, cost {_fmt(p.get('cost_initial', ''))} -> {_fmt(p.get('cost_final', ''))} in "
                         f"{p.get('iterations')} iterations {p.get('note', '')}")
    lines += ["", "## Export", ""]
    if export_manifest.get("layout", {}).get("images"):
        lines.append("COLMAP workspace: `images/` (image root) + `sparse/<component>/`, e.g. "
                     "`colmap gui --import_path sparse/0 --image_path images` from the export folder; "
                     "nerfstudio/gsplat take the export folder as the data directory.")
    for c in export_manifest.get("components", []):
        ba = c.get("bundle_adjustment", {})
        ba_text = (f", bundle adjustment {ba['reprojection_error_before_px']} -> "
                   f"{ba['reprojection_error_after_px']} px" if "reprojection_error_after_px" in ba else "")
        exif = (f", predicted/EXIF focal median {c['predicted_over_exif_focal_median']} over "
                f"{c['images_with_exif_focal']} images" if "predicted_over_exif_focal_median" in c else "")
        lines.append(f"- component {c['component']}: {c['images']} images, {c['cameras']} cameras, {c['points3D']} "
                     f"points3D ({c['observations']} observations) in `{c['colmap']}`"
                     + (f", `{c['ply']}`" if "ply" in c else "") + (f", `{c['glb']}`" if "glb" in c else "")
                     + ba_text + exif)
    if "pairs" in export_manifest:
        lines.append(f"- `pairs.txt`: {export_manifest['pairs'].get('pairs', 0)} covisibility pairs")
    run_report = store.root / "orchestration" / "report.json"
    if run_report.exists():  # how the last pipeline run went: skips, splits, failures, redone units, farm workers
        try:
            run = json.loads(run_report.read_text())
        except ValueError:
            run = None
        if run:
            lines += ["", run_markdown(run, level=2).replace("## sparse-vggt run report",
                                                             "## Last pipeline run (orchestration/report.json)", 1)]
    return "\n".join(lines) + "\n"


def refresh_report(store: RunStore) -> Path | None:
    """Re-render export/report.md after the pipeline run's report.json was written (nothing before an export)."""
    path = store.export_dir / "report.md"
    if not store.is_stage_complete(STAGE) or not path.exists():
        return None
    atomic_write_bytes(path, make_report(store, store.stage_manifest(STAGE)).encode())
    return path


def _run_weights_markdown(report: dict[str, Any]) -> str:
    return weights_markdown({"stages": {s: {"manifest": {"weights": w}} for s, w in report.get("weights", {}).items()}})


def run_markdown(report: dict[str, Any], level: int = 1) -> str:
    """orchestration/report.json as markdown: the run section of report.md (``level`` 2) and the Prefect report
    artifact (``level`` 1)."""
    h = "#" * level
    lines = [f"{h} sparse-vggt run report", ""]
    if report["random_weights"]:
        lines += [f"**WARNING: {', '.join(report['random_weights'])} ran with RANDOM weights: the geometry is "
                  "meaningless.**", ""]
    lines += [_run_weights_markdown(report), ""]
    for key in ("run_dir", "flow_run", "dispatch", "seconds", "images_kept", "images_skipped", "clusters",
                "components_skipped", "singletons_skipped", "frames_not_clustered"):
        lines.append(f"- **{key}**: {report.get(key)}")
    lines.append(f"- **stage tasks executed**: {report['stages_executed'] or 'none'}; cached: {report['stages_cached'] or 'none'}")
    if report["skipped_images"]:
        lines += ["", f"{h}# Skipped images", "", "| path | reason |", "|---|---|"]
        lines += [f"| {s['path']} | {s['reason']} |" for s in report["skipped_images"][:200]]
    if report["oom_splits"]:
        lines += ["", f"{h}# Out-of-memory splits", ""] + [f"- cluster {s['cluster']} -> {s['into']}" for s in report["oom_splits"]]
    if report["failures"]:
        lines += ["", f"{h}# Failures", ""] + [f"- cluster {f.get('cluster_id')}: {f.get('reason')} ({f.get('time')})"
                                            for f in report["failures"]]
    integrity = [e for e in report["events"] if e.get("kind") in ("unit_redone", "stages_invalidated",
                                                                   "stale_lock_taken_over")]
    if integrity:  # damaged units redone, stages invalidated, stale locks taken over (all runs)
        lines += ["", f"{h}# Redone, invalidated, taken over", ""]
        lines += [f"- {e.get('time')} {e['kind']}: {e.get('unit') or e.get('stages') or e.get('owner')}: "
                  f"{e.get('reason')}" for e in integrity[-200:]]
    for kind, farm in (report.get("farm") or {}).items():  # who did the work, model loads per worker
        d = farm.get("dispatch") or {}
        lines += ["", f"{h}# Farm: {kind}", "", f"- flow runs: {d.get('submitted')} for {d.get('units')} unit(s); "
                  f"in-flight limit {d.get('limit')}, max observed {d.get('max_in_flight')}", "",
                  "| worker | units | frames | frames/s | model loads (host/pid) |", "|---|---|---|---|---|"]
        lines += [f"| {w['worker']} | {w['units']} | {w['frames']} | {w['frames_per_s']} | {json.dumps(w['loads'])} |"
                  for w in farm.get("workers", [])]
    if report["merge"]:
        lines += ["", f"{h}# Merge", ""] + [f"- {k}: {v}" for k, v in report["merge"].items()]
    out = report["outputs"]
    lines += ["", f"{h}# Outputs", "", f"`{out['export_dir']}`", ""] + [f"- `{f}`" for f in out["files"]]
    return "\n".join(lines)
