"""Camera-pose accuracy against a reference COLMAP model (`sparse-vggt evaluate PRED --reference REF`).

Images are matched by name (the ``path`` column of images.parquet = COLMAP image name) and ordered by name, so
pair (i, j), i < j, means name_i < name_j. ``E = [R | t]`` is a world->camera extrinsic (x_cam = R X + t).

Pair metrics, default (``mode="relative"``, the VGGT / PoseDiffusion definition)::

    E_ij      = E_i E_j^-1  ->  R_ij = R_i R_j^T,  t_ij = t_i - R_ij t_j     (camera j -> camera i; independent of
                                                                            the world frame and its scale)
    RRA error = angle(R_ij,ref^T R_ij,pred)                              (geodesic angle, degrees)
    RTA error = arccos(|cos angle(t_ij,pred, t_ij,ref)|)                   (sign-agnostic: 180 deg counts as 0;
                                                                            a zero-length t counts as 90 deg)
    RRA@k / RTA@k = fraction of pairs with error < k, k in 5, 15, 30
    AUC@30    = mean over the 30 bins [0,1), [1,2), ..., [29,30] of the cumulative histogram of
                max(RRA error, RTA error) divided by the number of pairs (numpy.histogram with bins 0..30, as the
                VGGT CO3D evaluation computes it)

This is the relative pose VGGT's training-time metric and PoseDiffusion compute (PoseDiffusion writes it as
inv(M_i) M_j in PyTorch3D's row-vector convention, i.e. E_j E_i^-1: the same rotation errors, and the inverse
pair's translation). ``mode="co3d"`` (``--co3d``) is the variant of VGGT's ``evaluation/test_co3d.py`` (the
script behind the paper's CO3D AUC@30): every pose is first re-expressed with the first camera as the world
(E_k E_0^-1; here the first image by name of each predicted component), then the pair pose is
inv(E_i) E_j (R = R_i^T R_j, t = R_i^T (t_j - t_i)), with the same RRA/RTA/AUC definitions; it depends on which
camera is first, the default does not. ``mode="symmetric"`` (``--symmetric``) is
a stricter variant: the translation error is signed (angle of cos, not |cos|) and is the larger of the i->j and
j->i errors (pose E_j E_i^-1 and its inverse). In every mode pairs split across predicted components count as
failures (180 deg).

Other metrics:

* ``ate``: RMSE of camera-centre distances after the Sim(3) (Umeyama) alignment of predicted to reference
  centres, in reference units; ``ate_rel_extent`` divides it by the diagonal of the bounding box of the matched
  reference centres. A prediction with several components (disconnected merges) is aligned per component.
* ``rotation_error_mean_deg`` / ``_median_``: absolute rotation error per image after the alignment.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .geometry import GeometryError, camera_centers, rotation_angle_deg, sim3_parts, umeyama

log = logging.getLogger(__name__)

THRESHOLDS = (5, 15, 30)


class EvaluationError(ValueError):
    """Inputs cannot be evaluated (unreadable model, too few matched images); the message says why."""


# ------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------
def _is_colmap_model(path: Path) -> bool:
    return any((path / f"images.{ext}").exists() for ext in ("bin", "txt"))


def load_colmap_poses(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names, world->camera extrinsics (N,3,4) and component ids from a COLMAP model dir, or a dir of models
    (``0/``, ``1/``, ...; each subdirectory is one component)."""
    import pycolmap

    path = Path(path)
    if _is_colmap_model(path):
        models = [(0, path)]
    else:
        subs = sorted((p for p in path.iterdir() if p.is_dir() and _is_colmap_model(p)), key=lambda p: p.name) \
            if path.is_dir() else []
        if not subs:
            raise EvaluationError(f"{path} is neither a run directory nor a COLMAP model (no images.bin/images.txt, "
                                  "no model subdirectories)")
        models = list(enumerate(subs))
    names, exts, comps = [], [], []
    for k, p in models:
        try:
            rec = pycolmap.Reconstruction(str(p))
        except Exception as exc:  # pycolmap raises plain RuntimeError/ValueError for bad files
            raise EvaluationError(f"cannot read COLMAP model {p}: {exc}") from exc
        for image in rec.images.values():
            if not image.has_pose:
                continue
            names.append(image.name)
            exts.append(np.asarray(image.cam_from_world().matrix(), dtype=np.float64))
            comps.append(k)
    return names, np.asarray(exts).reshape(-1, 3, 4), np.asarray(comps, np.int64)


def load_run_poses(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names, extrinsics and component ids of a merged run directory (``store.zarr/merge/images``)."""
    from .store import RunStore

    store = RunStore.open(path)
    if not store.is_unit_complete("merge"):
        raise EvaluationError(f"{path} has no complete merge; run `sparse-vggt merge {path}` first")
    g = store.group("merge/images", create=False)
    ids = np.asarray(g["image_ids"][...], np.int64)
    table = store.read_table("images", columns=["image_id", "path"])
    name_of = dict(zip(table.column("image_id").to_numpy().tolist(), table.column("path").to_pylist()))
    return [name_of[int(i)] for i in ids], np.asarray(g["extrinsics"][...], np.float64), \
        np.asarray(g["component"][...], np.int64)


def load_poses(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"{path} does not exist")
    if (path / "run.json").exists():
        return load_run_poses(path)
    return load_colmap_poses(path)


# ------------------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------------------
MODES = ("relative", "co3d", "symmetric")
AUC_BINS = np.arange(31)  # [0,1), [1,2), ..., [29,30]: numpy.histogram's bins, last one closed


def _angle_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signed angle (degrees) between vectors; coincident centres (zero length) give 0."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    c = (a * b).sum(-1) / np.maximum(na * nb, 1e-300)
    ang = np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))
    return np.where((na < 1e-12) | (nb < 1e-12), 0.0, ang)


def _direction_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sign-agnostic angle (degrees) between translation directions: arccos |cos|, in [0, 90]. A zero-length
    vector has no direction and gives 90 degrees (as the eps-normalised VGGT/PoseDiffusion code does)."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    c = np.abs((a * b).sum(-1)) / np.maximum(na * nb, 1e-300)
    ang = np.degrees(np.arccos(np.clip(c, 0.0, 1.0)))
    return np.where((na < 1e-12) | (nb < 1e-12), 90.0, ang)


def _pose_i_from_j(ext: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E_a E_b^-1 (camera b -> camera a) for index arrays a, b: rotations (n,3,3) and translations (n,3)."""
    Ra, Rb, ta, tb = ext[a, :, :3], ext[b, :, :3], ext[a, :, 3], ext[b, :, 3]
    R = Ra @ np.swapaxes(Rb, 1, 2)
    return R, ta - (R @ tb[:, :, None])[..., 0]


def _in_anchor_frame(ext: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """E_k E_a(k)^-1 for every image k: the poses re-expressed with their anchor camera as the world."""
    Ra, ta = ext[anchors, :, :3], ext[anchors, :, 3]
    R = ext[:, :, :3] @ np.swapaxes(Ra, 1, 2)
    return np.concatenate([R, (ext[:, :, 3] - (R @ ta[:, :, None])[..., 0])[:, :, None]], 2)


def _co3d_pose(ext: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """inv(E_a) E_b as VGGT's test_co3d.py writes it: R = R_a^T R_b, t = R_a^T (t_b - t_a)."""
    RaT = np.swapaxes(ext[a, :, :3], 1, 2)
    return RaT @ ext[b, :, :3], (RaT @ (ext[b, :, 3] - ext[a, :, 3])[:, :, None])[..., 0]


def relative_errors(ext_p: np.ndarray, ext_r: np.ndarray, i: np.ndarray | None = None,
                    j: np.ndarray | None = None, mode: str = "relative", anchors: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Relative rotation and translation-direction errors (degrees) of pairs (i, j) (default: all i < j); see
    the module docstring for ``mode``. ``anchors`` (co3d only): per image, the camera whose frame is the world
    (default: image 0 for all)."""
    if mode not in MODES:
        raise EvaluationError(f"unknown pair-metric mode {mode!r}; use one of {', '.join(MODES)}")
    if i is None or j is None:
        i, j = np.triu_indices(len(ext_p), 1)
    if mode == "co3d":
        anchors = np.zeros(len(ext_p), np.int64) if anchors is None else np.asarray(anchors, np.int64)
        Rp, tp = _co3d_pose(_in_anchor_frame(ext_p, anchors), i, j)
        Rr, tr = _co3d_pose(_in_anchor_frame(ext_r, anchors), i, j)
        return rotation_angle_deg(np.swapaxes(Rr, 1, 2) @ Rp), _direction_error(tp, tr)
    Rp, tp = _pose_i_from_j(ext_p, i, j)
    Rr, tr = _pose_i_from_j(ext_r, i, j)
    rot = rotation_angle_deg(np.swapaxes(Rr, 1, 2) @ Rp)
    if mode == "relative":
        return rot, _direction_error(tp, tr)
    # symmetric: signed direction error of E_j E_i^-1 (the inverse pose: t = -R_ij^T t_ij) and of E_i E_j^-1
    back_p = -(np.swapaxes(Rp, 1, 2) @ tp[:, :, None])[..., 0]
    back_r = -(np.swapaxes(Rr, 1, 2) @ tr[:, :, None])[..., 0]
    return rot, np.maximum(_angle_between(tp, tr), _angle_between(back_p, back_r))


def _pair_counts(P: np.ndarray, R: np.ndarray, comp: np.ndarray, mode: str = "relative",
                 block_pairs: int = 1 << 20) -> dict[str, Any]:
    """Counts of pairs under each threshold and the AUC histogram, computed in blocks of rows so memory stays
    O(block) for any n."""
    n = len(P)
    rot_c = np.zeros(len(THRESHOLDS), np.int64)
    tra_c = np.zeros(len(THRESHOLDS), np.int64)
    hist = np.zeros(len(AUC_BINS) - 1, np.int64)
    # co3d: each predicted component's first image (in name order) is its world, for prediction and reference
    first = {int(c): int(np.argmax(comp == c)) for c in np.unique(comp)}
    anchors = np.array([first[int(c)] for c in comp], np.int64)
    total = 0
    start = 0
    while start < n - 1:
        # rows start..stop-1 pair with every later image; choose stop so the block has about block_pairs pairs
        stop = start + 1
        count = n - 1 - start
        while stop < n - 1 and count + (n - 1 - stop) <= block_pairs:
            count += n - 1 - stop
            stop += 1
        i = np.concatenate([np.full(n - 1 - a, a) for a in range(start, stop)])
        j = np.concatenate([np.arange(a + 1, n) for a in range(start, stop)])
        rot, trans = relative_errors(P, R, i, j, mode, anchors)
        split = comp[i] != comp[j]  # pairs split across predicted components count as failures
        rot = np.where(split, 180.0, rot)
        trans = np.where(split, 180.0, trans)
        for k, t in enumerate(THRESHOLDS):
            rot_c[k] += int((rot < t).sum())
            tra_c[k] += int((trans < t).sum())
        hist += np.histogram(np.maximum(rot, trans), bins=AUC_BINS)[0]
        total += len(i)
        start = stop
    return {"pairs": total, "rot": rot_c, "trans": tra_c, "hist": hist}


def auc_from_histogram(hist: np.ndarray, pairs: int) -> float:
    """AUC@30: mean of the cumulative, pair-normalised histogram of max(RRA error, RTA error) over 30 bins."""
    return float(np.mean(np.cumsum(np.asarray(hist, np.float64) / max(pairs, 1))))


def evaluate_poses(
    names_pred: list[str], ext_pred: np.ndarray, names_ref: list[str], ext_ref: np.ndarray,
    comp_pred: np.ndarray | None = None, mode: str = "relative",
) -> dict[str, Any]:
    """Metrics of predicted vs reference world->camera extrinsics, matched by name (see the module docstring)."""
    if mode not in MODES:
        raise EvaluationError(f"unknown pair-metric mode {mode!r}; use one of {', '.join(MODES)}")
    ref_index = {n: k for k, n in enumerate(names_ref)}
    pi = sorted((k for k, n in enumerate(names_pred) if n in ref_index), key=lambda k: names_pred[k])
    if len(pi) < 3:
        raise EvaluationError(f"only {len(pi)} predicted images match reference names (need >= 3); "
                              f"e.g. predicted {names_pred[:3]} vs reference {names_ref[:3]}")
    ri = [ref_index[names_pred[k]] for k in pi]
    P = np.asarray(ext_pred, np.float64)[pi]
    R = np.asarray(ext_ref, np.float64)[ri]
    comp = (np.zeros(len(pi), np.int64) if comp_pred is None else np.asarray(comp_pred, np.int64)[pi])
    cp, cr = camera_centers(P), camera_centers(R)
    extent = float(np.linalg.norm(cr.max(0) - cr.min(0)))
    err = np.full(len(pi), np.nan)
    rot_abs = np.full(len(pi), np.nan)
    aligned = np.zeros(len(pi), bool)
    for k in np.unique(comp):
        m = comp == k
        if m.sum() < 3:
            continue
        try:
            S = umeyama(cp[m], cr[m])
        except GeometryError:  # collinear centres: rotation about the line is free; fall back to scale+shift
            S = umeyama(np.concatenate([cp[m], cp[m] + 1e-9]), np.concatenate([cr[m], cr[m] + 1e-9]),
                        check_degenerate=False)
        s, Rs, t = sim3_parts(S)
        err[m] = np.linalg.norm(cp[m] @ (s * Rs).T + t - cr[m], axis=1)
        rot_abs[m] = rotation_angle_deg(P[m][:, :, :3] @ Rs.T @ np.swapaxes(R[m][:, :, :3], 1, 2))
        aligned[m] = True
    counts = _pair_counts(P, R, comp, mode)
    npairs = max(counts["pairs"], 1)
    ate = float(np.sqrt(np.nanmean(err[aligned] ** 2))) if aligned.any() else float("nan")
    result = {
        "images_matched": int(len(pi)),
        "images_pred": int(len(names_pred)),
        "images_reference": int(len(names_ref)),
        "images_aligned": int(aligned.sum()),
        "components": int(len(np.unique(comp))),
        "pairs": int(counts["pairs"]),
        "ate": ate,
        "ate_rel_extent": ate / extent if extent > 0 else float("nan"),
        "extent": extent,
        "rotation_error_mean_deg": float(np.nanmean(rot_abs)) if aligned.any() else float("nan"),
        "rotation_error_median_deg": float(np.nanmedian(rot_abs)) if aligned.any() else float("nan"),
        "rra": {str(t): float(counts["rot"][k] / npairs) for k, t in enumerate(THRESHOLDS)},
        "rta": {str(t): float(counts["trans"][k] / npairs) for k, t in enumerate(THRESHOLDS)},
        "auc30": auc_from_histogram(counts["hist"], counts["pairs"]),
        "pair_metric": mode,
    }
    return result


def evaluate(pred: Path, reference: Path, mode: str = "relative") -> dict[str, Any]:
    """Evaluate a run directory or COLMAP model ``pred`` against the COLMAP model ``reference``."""
    names_p, ext_p, comp_p = load_poses(Path(pred))
    names_r, ext_r, _ = load_colmap_poses(Path(reference))
    if len(names_r) == 0:
        raise EvaluationError(f"reference model {reference} has no posed images")
    result = evaluate_poses(names_p, ext_p, names_r, ext_r, comp_p, mode)
    result["pred"] = str(pred)
    result["reference"] = str(reference)
    return json.loads(json.dumps(result).replace("NaN", "null"))


def format_table(result: dict[str, Any]) -> Any:
    """A rich Table of the metrics (for the terminal)."""
    from rich.table import Table

    mode = result.get("pair_metric", "relative")
    table = Table(title="pose accuracy vs reference",
                  caption={"relative": "pairs: VGGT/PoseDiffusion metric",
                           "co3d": "pairs: VGGT test_co3d.py variant (first camera as world)"}.get(
                      mode, "pairs: --symmetric (stricter; not comparable to published numbers)"))
    table.add_column("metric")
    table.add_column("value", justify="right")

    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    table.add_row("images matched", f"{result['images_matched']} / {result.get('images_reference', '?')}")
    table.add_row("components", str(result.get("components", 1)))
    table.add_row("ATE", num(result["ate"], ".4g"))
    table.add_row("ATE / extent", num(result["ate_rel_extent"], ".3%"))
    table.add_row("rotation error mean (deg)", num(result.get("rotation_error_mean_deg"), ".3f"))
    for t in ("5", "15", "30"):
        table.add_row(f"RRA@{t}", num(result["rra"][t], ".3f"))
    for t in ("5", "15", "30"):
        table.add_row(f"RTA@{t}", num(result["rta"][t], ".3f"))
    table.add_row("AUC@30", num(result["auc30"], ".3f"))
    return table
