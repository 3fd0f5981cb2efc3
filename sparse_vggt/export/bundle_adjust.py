"""Optional pycolmap bundle adjustment of an exported COLMAP model (``export.bundle_adjust``).

Merge poses come from per-cluster predictions; a short adjustment over the fused tracks can tighten them. It is
conservative: only well-observed images move, points that end behind a camera or far off are dropped, and the
unadjusted model is kept when the error does not go down.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_BA_MIN_OBSERVATIONS = 15  # multi-view observations an image needs for its pose to be adjusted
_BA_MAX_ERROR_PX = 4.0  # points reprojecting worse than this after the adjustment are dropped (COLMAP's default)


def run_bundle_adjustment(rec: Any, model: str, refine_focal: bool, refine_distortion: bool, max_iterations: int
                          ) -> tuple[Any, dict[str, Any]]:
    """pycolmap bundle adjustment of poses and points (focal optional); returns (reconstruction, report).

    A Cauchy loss keeps fused outliers weak. Points seen by one camera constrain nothing (and Ceres rejects them):
    they are taken out and put back at their depth along their pixel's ray through the adjusted camera, as merge
    made them. Afterwards, as COLMAP does, points behind a camera or over 4 px off are dropped (their count is
    reported). If the adjustment does not lower the mean error of the remaining multi-view points (a diverged or
    degenerate problem), the unadjusted model is kept and the report says so.
    """
    import pycolmap

    if rec.num_points3D() == 0:
        return rec, {"skipped": "no points3D with tracks (merge.fuse=false?): nothing to adjust"}
    before = mean_error(rec)
    work = pycolmap.Reconstruction(rec)
    opts = pycolmap.BundleAdjustmentOptions()
    opts.refine_focal_length = bool(refine_focal)
    opts.refine_principal_point = False
    opts.refine_extra_params = bool(refine_distortion) and model in ("SIMPLE_RADIAL", "RADIAL", "OPENCV")
    opts.print_summary = False
    opts.ceres.loss_function_type = pycolmap.LossFunctionType.CAUCHY
    opts.ceres.loss_function_scale = 2.0
    opts.ceres.solver_options.max_num_iterations = int(max_iterations)
    single = []
    for pid, p in work.points3D.items():
        if p.track.length() == 1:
            el = p.track.elements[0]
            xc = work.images[el.image_id].cam_from_world().matrix() @ np.append(p.xyz, 1.0)
            single.append((pid, el.image_id, el.point2D_idx, xc, np.asarray(p.color, np.uint8)))
    for pid, *_ in single:
        work.delete_point3D(pid)
    info: dict[str, Any] = {"reprojection_error_before_px": before, "refine_focal": bool(refine_focal),
                            "refine_distortion": bool(opts.refine_extra_params), "max_iterations": int(max_iterations),
                            "multi_view_points": work.num_points3D(), "single_view_points": len(single)}
    if work.num_points3D() == 0:
        info["skipped"] = "every point is seen by one camera only: nothing constrains the poses"
        info["reprojection_error_after_px"] = before
        return rec, info
    work.update_point_3d_errors()
    err_before = {pid: float(p.error) for pid, p in work.points3D.items()}
    # an image with few multi-view observations cannot pin its 6 pose parameters (the problem is rank deficient
    # and LM can run off): such images keep their merged pose; two well-observed cameras fix the gauge
    n_obs: dict[int, int] = {}
    for p in work.points3D.values():
        for el in p.track.elements:
            n_obs[el.image_id] = n_obs.get(el.image_id, 0) + 1
    config = pycolmap.BundleAdjustmentConfig()
    adjusted = [i for i, c in n_obs.items() if c >= _BA_MIN_OBSERVATIONS]
    for i in adjusted:
        config.add_image(i)
    info["images_adjusted"] = len(adjusted)
    if len(adjusted) < 2:
        info["skipped"] = f"fewer than 2 images with >= {_BA_MIN_OBSERVATIONS} multi-view observations"
        info["reprojection_error_after_px"] = before
        return rec, info
    config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    pycolmap.create_default_bundle_adjuster(opts, config, work).solve()
    # as COLMAP does after each adjustment: drop points that ended behind a camera (the reprojection cost does not
    # see that) or far off their observations; compare before/after on the points that stay
    work.update_point_3d_errors()
    drop = []
    for pid, p in work.points3D.items():
        behind = any((work.images[el.image_id].cam_from_world().matrix() @ np.append(p.xyz, 1.0))[2] <= 0
                     for el in p.track.elements)
        if behind or not np.isfinite(p.error) or p.error > _BA_MAX_ERROR_PX:
            drop.append(pid)
    for pid in drop:
        work.delete_point3D(pid)
    kept = list(work.points3D.keys())
    multi_before = round(float(np.mean([err_before[k] for k in kept])), 4) if kept else None
    multi_after = mean_error(work)
    info.update(multi_view_points_removed=len(drop), multi_view_error_before_px=multi_before,
                multi_view_error_after_px=multi_after)
    if not kept or multi_after is None or not np.isfinite(multi_after) or multi_after > multi_before:
        log.warning("bundle adjustment did not lower the multi-view reprojection error (%s -> %s px, %d of %d points "
                    "dropped): kept the unadjusted model", multi_before, multi_after, len(drop), len(err_before))
        info.update(reverted=True, reprojection_error_after_px=before)
        return rec, info
    for _, img, idx, xc, color in single:  # same depth along the observed pixel's (refined) ray
        image = work.images[img]
        E = image.cam_from_world().matrix()
        xy = image.camera.cam_from_img(image.points2D[idx].xy)
        xc_new = xc if xy is None else xc[2] * np.append(xy, 1.0)  # None: the pixel does not undistort
        work.add_point3D(E[:, :3].T @ (xc_new - E[:, 3]), pycolmap.Track([pycolmap.TrackElement(img, idx)]), color)
    after = mean_error(work)
    info.update(reverted=False, reprojection_error_after_px=after)
    log.info("bundle adjustment: mean reprojection error %.3f -> %.3f px (multi-view points %.3f -> %.3f, %d "
             "dropped)", before, after, multi_before, multi_after, len(drop))
    return work, info


def mean_error(rec: Any) -> float | None:
    if rec.num_points3D() == 0:
        return None
    rec.update_point_3d_errors()
    return round(float(rec.compute_mean_reprojection_error()), 4)
