"""report.md: the one human-readable summary of a run (checks, plots, every stage's numbers, merge edges, export).

Written last by the export stage from run.json and the export manifest, so it reflects exactly what was written.
"""

from __future__ import annotations

import json
from typing import Any

from ..provenance import weights_markdown
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
    return "\n".join(lines) + "\n"
