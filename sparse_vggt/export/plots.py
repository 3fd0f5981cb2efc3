"""Plots of a finished run for report.md and the Prefect artifacts (matplotlib, PNG).

Why these four: they answer the first questions after a run without opening a 3D viewer: where are the cameras
and how were they split (top-down view coloured by cluster), how the clusters hang together (cluster graph with
accepted/rejected merge edges), whether the merge was tight (per-edge residuals against the thresholds), and
where the photos went (image status). Only the object-oriented Figure API is used (no pyplot global state, no GUI
backend), so this is safe in worker processes and threads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PipelineConfig
from ..geometry import camera_centers
from ..store import RunStore
from .context import ExportContext

log = logging.getLogger(__name__)

PLOTS = {"cameras": "Cameras from above, coloured by cluster", "cluster_graph": "Cluster graph",
         "merge_residuals": "Merge residuals per cluster edge", "image_status": "Image status"}
_MAX_COMPONENT_PANELS = 4


def _figure(w: float = 7.0, h: float = 5.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _cluster_colors(cluster_ids: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return np.array([cmap(int(c) % 20) if c >= 0 else (0.6, 0.6, 0.6, 1.0) for c in cluster_ids])


def top_down(extrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera centres and viewing directions projected on the ground plane (2D each).

    "Up" is the mean camera up vector (-y of OpenCV cameras): photos are mostly taken upright, so this is the
    scene's vertical without knowing gravity. Falls back to the least-variance axis of the centres.
    """
    R = extrinsics[:, :, :3].astype(np.float64)
    centers = camera_centers(extrinsics).astype(np.float64)
    up = -R[:, 1, :].mean(0)
    if np.linalg.norm(up) < 0.3 and len(centers) >= 3:
        _, _, vt = np.linalg.svd(centers - centers.mean(0), full_matrices=False)
        up = vt[-1]
    up = up / max(np.linalg.norm(up), 1e-12)
    helper = np.eye(3)[int(np.argmin(np.abs(up)))]
    e1 = np.cross(up, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(up, e1)
    basis = np.stack([e1, e2], 1)
    fwd = R[:, 2, :]  # camera z axis in world coordinates
    return centers @ basis, fwd @ basis


def plot_cameras(path: Path, extrinsics: np.ndarray, component: np.ndarray, cluster: np.ndarray) -> None:
    comps = np.unique(component)
    shown = comps[:_MAX_COMPONENT_PANELS]
    fig = _figure(5.0 * len(shown) if len(shown) > 1 else 7.0, 5.0)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, k in zip(axes, shown):
        sel = component == k
        xy, fwd = top_down(extrinsics[sel])
        span = float(np.ptp(xy, axis=0).max()) if len(xy) > 1 else 1.0
        cols = _cluster_colors(cluster[sel])
        ax.quiver(xy[:, 0], xy[:, 1], fwd[:, 0], fwd[:, 1], color=cols, angles="xy", scale_units="xy",
                  scale=1.0 / max(0.03 * span, 1e-9), width=0.003, alpha=0.6)
        ax.scatter(xy[:, 0], xy[:, 1], c=cols, s=12, edgecolors="none")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(f"component {int(k)}: {int(sel.sum())} images, {len(np.unique(cluster[sel]))} clusters",
                     fontsize=9)
        ax.tick_params(labelsize=7)
    note = f" (first {len(shown)} of {len(comps)} components)" if len(comps) > len(shown) else ""
    fig.suptitle("camera positions from above, colour = core cluster, arrow = viewing direction" + note, fontsize=9)
    fig.savefig(path)


def plot_cluster_graph(path: Path, clusters: dict[int, int], edges: list[dict[str, Any]]) -> None:
    import networkx as nx

    g = nx.Graph()
    g.add_nodes_from(clusters)
    for e in edges:
        g.add_edge(int(e["clusters"][0]), int(e["clusters"][1]), accepted=bool(e["accepted"]))
    fig = _figure()
    ax = fig.subplots()
    if g.number_of_nodes() == 0:
        ax.text(0.5, 0.5, "no clusters", ha="center", va="center")
    else:
        pos = (nx.spring_layout(g, seed=0, iterations=60) if g.number_of_nodes() <= 1500
               else nx.spectral_layout(g))
        for accepted, style, col in ((True, "-", "tab:green"), (False, "--", "tab:red")):
            el = [(a, b) for a, b, d in g.edges(data=True) if d["accepted"] == accepted]
            if el:
                seg = np.array([[pos[a], pos[b]] for a, b in el])
                from matplotlib.collections import LineCollection

                ax.add_collection(LineCollection(seg, colors=col, linestyles=style, linewidths=1.0,
                                                 label=f"{'accepted' if accepted else 'rejected'} ({len(el)})"))
        nodes = np.array(list(g.nodes()))
        xy = np.array([pos[n] for n in nodes])
        sizes = np.array([clusters.get(int(n), 1) for n in nodes], float)
        ax.scatter(xy[:, 0], xy[:, 1], s=10 + 80 * sizes / max(sizes.max(), 1), c=_cluster_colors(nodes),
                   edgecolors="k", linewidths=0.3, zorder=3)
        if len(nodes) <= 60:
            for n, (x, y) in zip(nodes, xy):
                ax.annotate(str(int(n)), (x, y), fontsize=6, ha="center", va="center", zorder=4)
        if g.number_of_edges():
            ax.legend(fontsize=7, loc="best")
    ax.set_axis_off()
    ax.set_title("clusters (size = frames) and merge edges", fontsize=9)
    fig.savefig(path)


def _edge_values(edges: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([e[key] if e.get(key) is not None else np.nan for e in edges], float)


def plot_merge_residuals(path: Path, edges: list[dict[str, Any]], max_rmse: float, min_inlier_ratio: float,
                         max_camera_rot_deg: float) -> None:
    """Per edge: relative RMSE, inlier ratio and shared-camera rotation disagreement against their thresholds."""
    fig = _figure(7.0, 7.0)
    axes = fig.subplots(3, 1, sharex=True)
    if not edges:
        axes[0].text(0.5, 0.5, "no cluster edges (one cluster, or no overlaps)", ha="center", va="center")
    else:
        rmse = _edge_values(edges, "rmse_rel")
        acc = np.array([bool(e["accepted"]) for e in edges])
        order = np.argsort(np.where(np.isfinite(rmse), rmse, np.inf), kind="stable")
        x = np.arange(len(edges))
        cols = np.where(acc[order], "tab:green", "tab:red")
        panels = (("rmse_rel", "relative inlier RMSE", f"merge.max_rmse = {max_rmse:g}", max_rmse),
                  ("inlier_ratio", "inlier ratio", f"merge.min_inlier_ratio = {min_inlier_ratio:g}",
                   min_inlier_ratio),
                  ("camera_rot_deg", "shared camera rot. (deg)",
                   f"merge.max_camera_rotation_deg = {max_camera_rot_deg:g}", max_camera_rot_deg))
        for ax, (key, ylabel, label, thr) in zip(axes, panels):
            ax.bar(x, np.nan_to_num(_edge_values(edges, key)[order], nan=0.0), color=cols)
            ax.axhline(thr, color="k", ls="--", lw=0.8, label=label)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.legend(fontsize=7)
        if len(edges) <= 40:
            axes[-1].set_xticks(x, [f"{edges[i]['clusters'][0]}-{edges[i]['clusters'][1]}" for i in order],
                                rotation=90, fontsize=6)
        n_rej = int((~acc).sum())
        axes[-1].set_xlabel(f"cluster edge (sorted by RMSE); green accepted, red rejected ({n_rej}; reasons in "
                            "report.md)", fontsize=8)
    axes[0].set_title("Sim(3) alignment residuals per cluster pair", fontsize=9)
    fig.savefig(path)


def plot_image_status(path: Path, counts: dict[str, int]) -> None:
    fig = _figure(7.0, max(2.0, 0.45 * len(counts) + 1.2))
    ax = fig.subplots()
    labels = list(counts)
    vals = [counts[k] for k in labels]
    cols = ["tab:green" if k.startswith("reconstructed") else "tab:orange" if k.startswith("kept")
            else "tab:red" for k in labels]
    ax.barh(np.arange(len(labels)), vals, color=cols)
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v}", va="center", fontsize=8)
    ax.set_xlabel("images", fontsize=8)
    ax.set_title(f"{sum(vals)} unique photos", fontsize=9)
    fig.savefig(path)


def status_counts(statuses: list[str], reconstructed: int) -> dict[str, int]:
    """reconstructed / kept-but-not-reconstructed / one row per skip reason (reason text before ' (')."""
    ok = sum(s == "ok" for s in statuses)
    out = {"reconstructed (exported)": int(reconstructed), "kept, not reconstructed": int(ok - reconstructed)}
    for s in statuses:
        if s != "ok":
            key = "skipped: " + str(s).split(" (")[0]
            out[key] = out.get(key, 0) + 1
    return out


def write_plots(store: RunStore, plots_dir: Path, merged: dict[str, np.ndarray], config: PipelineConfig
                ) -> dict[str, Any]:
    """All plots as PNG files under ``plots_dir``; returns {"files": {title: relative path}}."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    img_ids = merged["img_image_ids"].astype(np.int64)
    core: dict[int, int] = {}
    sizes: dict[int, int] = {}
    if store.has_table("clusters"):
        ct = store.read_table("clusters", columns=["cluster_id", "image_id", "role"])
        cid = ct.column("cluster_id").to_numpy()
        iid = ct.column("image_id").to_numpy()
        role = ct.column("role").to_pylist()
        for c, i, r in zip(cid.tolist(), iid.tolist(), role):
            sizes[c] = sizes.get(c, 0) + 1
            if r == "core":
                core[i] = c
    cluster = np.array([core.get(int(i), -1) for i in img_ids], np.int64)
    attrs = dict(store.group("merge", create=False).attrs) if "merge" in store.zarr else {}
    edges = list(attrs.get("residuals", []))
    statuses = store.read_table("images", columns=["status"]).column("status").to_pylist() \
        if store.has_table("images") else []
    files: dict[str, str] = {}
    jobs = {
        "cameras": lambda p: plot_cameras(p, merged["img_extrinsics"], merged["img_component"], cluster),
        "cluster_graph": lambda p: plot_cluster_graph(p, sizes, edges),
        "merge_residuals": lambda p: plot_merge_residuals(p, edges, config.merge.max_rmse,
                                                          config.merge.min_inlier_ratio,
                                                          config.merge.max_camera_rotation_deg),
        "image_status": lambda p: plot_image_status(p, status_counts(statuses, len(img_ids))),
    }
    for key, job in jobs.items():
        path = plots_dir / f"{key}.png"
        job(path)
        files[PLOTS[key]] = f"{plots_dir.name}/{path.name}"
    return {"files": files}


def write(ctx: ExportContext) -> dict[str, Any]:
    """Format writer: ``plots/*.png`` (listed in report.md)."""
    return {"plots": write_plots(ctx.store, ctx.out / "plots", ctx.merged, ctx.config)}


def plots_markdown(export_dir: Path, max_bytes: int = 2_000_000) -> str:
    """The export's plots as one Markdown document with the PNGs inline (data URIs), for a Prefect artifact.

    Why inline: a Prefect artifact cannot reference files on the worker's disk, and the UI renders data URIs.
    Plots are listed from the export manifest order in ``plots/``; returns "" when there are none.
    """
    import base64

    files = sorted((export_dir / "plots").glob("*.png")) if (export_dir / "plots").is_dir() else []
    titles = {f"{k}.png": v for k, v in PLOTS.items()}
    parts, used = [], 0
    for path in sorted(files, key=lambda p: list(titles).index(p.name) if p.name in titles else len(titles)):
        data = path.read_bytes()
        title = titles.get(path.name, path.stem)
        if used + len(data) > max_bytes:
            parts += [f"### {title}", "", f"(not inlined: over {max_bytes} bytes in all; see `{path}`)", ""]
            continue
        used += len(data)
        parts += [f"### {title}", "", f"![{title}](data:image/png;base64,{base64.b64encode(data).decode()})", ""]
    return ("# sparse-vggt plots\n\n" + "\n".join(parts)) if parts else ""
