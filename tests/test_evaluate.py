"""evaluate: fox reference poses (COLMAP text model) vs perturbed copies with known expected numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from scipy.spatial.transform import Rotation

from sparse_vggt.cli import main
from sparse_vggt.evaluate import (
    EvaluationError,
    auc_from_histogram,
    evaluate,
    evaluate_poses,
    format_table,
    relative_errors,
)


def _ref(fox_dir: Path) -> Path:
    return fox_dir / "sparse" / "0"


def _write_perturbed(src: Path, dst: Path, fn, binary: bool = False) -> None:
    """Copy the model with every image's world->camera 3x4 matrix replaced by fn(name, matrix)."""
    rec = pycolmap.Reconstruction(str(src))
    for image in rec.images.values():
        E = np.asarray(image.cam_from_world().matrix())
        rec.frames[image.frame_id].rig_from_world = pycolmap.Rigid3d(fn(image.name, E))
    dst.mkdir(parents=True)
    (rec.write_binary if binary else rec.write_text)(str(dst))


def _sim3_of_world(E: np.ndarray, s: float, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Camera extrinsics after the world is mapped by X' = s R X + t (camera rigid, translation scaled)."""
    Rc = E[:, :3] @ R.T
    tc = s * E[:, 3] - Rc @ t
    return np.concatenate([Rc, tc[:, None]], 1)


def test_identity_and_similarity_copy_are_perfect(fox_dir: Path, tmp_path: Path) -> None:
    ref = _ref(fox_dir)
    same = evaluate(ref, ref)
    assert same["images_matched"] == 50
    assert same["ate"] < 1e-9 and same["auc30"] == 1.0
    R = Rotation.from_rotvec([0.3, -1.0, 0.5]).as_matrix()
    out = tmp_path / "sim3"
    _write_perturbed(ref, out, lambda n, E: _sim3_of_world(E, 3.7, R, np.array([5.0, -2.0, 1.0])), binary=True)
    res = evaluate(out, ref)
    assert res["images_matched"] == 50
    assert res["ate_rel_extent"] < 1e-5
    assert res["rotation_error_mean_deg"] < 1e-3
    assert all(v == 1.0 for v in res["rra"].values()) and all(v == 1.0 for v in res["rta"].values())
    assert res["auc30"] == 1.0
    co3d = evaluate(out, ref, mode="co3d")
    assert co3d["auc30"] == 1.0 and co3d["pair_metric"] == "co3d"


@pytest.mark.parametrize("mode", ["relative", "symmetric"])
def test_rotated_cameras_give_the_expected_rra_and_auc(fox_dir: Path, tmp_path: Path, mode: str) -> None:
    """5 of 50 cameras turned by 19.5 degrees about their own centre (same world-frame rotation Q for all five):
    pairs with exactly one turned camera have a relative-rotation error of 19.5 degrees, all other pairs 0.
    Centres do not move, so ATE stays ~0; translation-direction errors of the mixed pairs are <= 19.5
    degrees (19.5 keeps every error off the integer AUC thresholds)."""
    ref = _ref(fox_dir)
    names = sorted(im.name for im in pycolmap.Reconstruction(str(ref)).images.values())
    turned = set(names[::10])
    assert len(turned) == 5
    Q = Rotation.from_rotvec(np.radians(19.5) * np.array([0.0, 0.6, 0.8])).as_matrix()

    def perturb(name: str, E: np.ndarray) -> np.ndarray:
        if name not in turned:
            return E
        C = -E[:, :3].T @ E[:, 3]
        Rn = E[:, :3] @ Q  # camera axes turned in the world frame, centre kept
        return np.concatenate([Rn, (-Rn @ C)[:, None]], 1)

    out = tmp_path / "turned"
    _write_perturbed(ref, out, perturb)
    res = evaluate(out, ref, mode=mode)
    assert res["pair_metric"] == mode
    pairs = 50 * 49 / 2
    mixed = 5 * 45
    assert res["pairs"] == pairs
    assert res["ate_rel_extent"] < 1e-4  # centres unchanged, only the rotation fit may differ
    assert res["rra"]["5"] == pytest.approx((pairs - mixed) / pairs)
    assert res["rra"]["15"] == pytest.approx((pairs - mixed) / pairs)
    assert res["rra"]["30"] == 1.0
    assert res["rta"]["30"] == 1.0
    # expected per pair, from the geometry alone: rotation error 19.5 deg iff exactly one camera is turned; the
    # translation direction of a pair with a turned camera j is R_j Q (C_i - C_j) instead of R_j (C_i - C_j), so its
    # error is the angle between v = C_i - C_j and Q v (0 when no camera of the pair is turned)
    rec = pycolmap.Reconstruction(str(ref))
    by_name = {im.name: im for im in rec.images.values()}
    C = np.stack([np.asarray(by_name[n].projection_center()) for n in names])
    flag = np.array([n in turned for n in names])
    i, j = np.triu_indices(len(names), 1)
    v = C[i] - C[j]
    cosang = (v * (v @ Q.T)).sum(1) / (np.linalg.norm(v, axis=1) ** 2)
    moved = flag[i] | flag[j] if mode == "symmetric" else flag[i]
    t_err = np.where(moved, np.degrees(np.arccos(np.clip(cosang, -1, 1))), 0.0)
    r_err = np.where(flag[i] ^ flag[j], 19.5, 0.0)
    for t in ("5", "15", "30"):
        assert res["rta"][t] == pytest.approx((t_err < int(t)).mean())
    worst = np.maximum(r_err, t_err)
    assert res["auc30"] == pytest.approx(np.mean([(worst < t).mean() for t in range(1, 31)]), abs=1e-9)
    # the bounds without the geometry: mixed pairs count for thresholds 20..30 only
    assert res["auc30"] <= (pairs - mixed + mixed * 11 / 30) / pairs + 1e-12
    # absolute rotation error after alignment: the five turned cameras carry ~19.5 deg between them
    assert res["rotation_error_mean_deg"] == pytest.approx(19.5 * 5 / 50, rel=0.15)


def test_one_moved_camera_gives_the_expected_ate(fox_dir: Path, tmp_path: Path) -> None:
    """Moving one of n centres by d: the best similarity fit leaves an RMSE of at most d sqrt(n-1)/n (the value
    for a translation-only fit), and at least ~0.9 of it (rotation/scale can absorb little of one point)."""
    ref = _ref(fox_dir)
    names = sorted(im.name for im in pycolmap.Reconstruction(str(ref)).images.values())
    target = names[7]
    d = 0.5

    def perturb(name: str, E: np.ndarray) -> np.ndarray:
        if name != target:
            return E
        C = -E[:, :3].T @ E[:, 3] + np.array([d, 0.0, 0.0])
        return np.concatenate([E[:, :3], (-E[:, :3] @ C)[:, None]], 1)

    out = tmp_path / "moved"
    _write_perturbed(ref, out, perturb)
    res = evaluate(out, ref)
    bound = d * math.sqrt(49) / 50
    assert 0.9 * bound <= res["ate"] <= bound * (1 + 1e-6)
    assert res["rra"]["5"] == 1.0  # rotations untouched


def test_partial_match_subset_and_errors(fox_dir: Path, tmp_path: Path) -> None:
    ref = _ref(fox_dir)
    rec = pycolmap.Reconstruction(str(ref))
    names = [im.name for im in rec.images.values()]
    exts = np.stack([np.asarray(im.cam_from_world().matrix()) for im in rec.images.values()])
    res = evaluate_poses(names[:20] + ["not_in_ref.jpg"], np.concatenate([exts[:20], exts[:1]]), names, exts)
    assert res["images_matched"] == 20 and res["images_pred"] == 21 and res["images_reference"] == 50
    assert res["auc30"] == 1.0
    # a prediction split into two components: cross-component pairs count as failures
    split = evaluate_poses(names, exts, names, exts, comp_pred=np.array([0] * 25 + [1] * 25))
    assert split["rra"]["30"] == pytest.approx(2 * (25 * 24 / 2) / (50 * 49 / 2))
    assert split["ate"] < 1e-9
    with pytest.raises(EvaluationError, match="match reference names"):
        evaluate_poses(["x", "y", "z"], exts[:3], names, exts)
    with pytest.raises(EvaluationError, match="neither a run directory nor a COLMAP model"):
        evaluate(tmp_path, ref)
    table = format_table(res)
    assert table.row_count >= 10


@pytest.mark.parametrize("verb", ["evaluate", "eval"])  # the stage-style name, and the short alias
def test_cli_eval_json(verb: str, fox_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = _ref(fox_dir)
    assert main([verb, str(ref), "--reference", str(ref), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images_matched"] == 50 and set(out["rra"]) == {"5", "15", "30"} and out["auc30"] == 1.0


def _ext(R: np.ndarray, t: tuple[float, float, float]) -> np.ndarray:
    return np.concatenate([R, np.asarray(t, float)[:, None]], 1)


def _rz(deg: float) -> np.ndarray:
    return Rotation.from_euler("z", deg, degrees=True).as_matrix()


def test_vggt_metric_on_a_hand_computed_three_camera_case() -> None:
    """Three cameras, errors worked out by hand (E = [R|t] world->camera; pair pose E_i E_j^-1 has
    R_ij = R_i R_j^T and t_ij = t_i - R_ij t_j; theta = 12.5 deg).

    reference: R = I for all, t0 = 0, t1 = (-1, 0, 0), t2 = (0, -1, 0)
    predicted: R0 = I, t0 = 0; R1 = Rz(theta), t1 = (-2, 0, 0); R2 = I, t2 = (0, 2, 0)

    pair (0,1): R_ref = I, R_pred = Rz(-theta)                   -> rotation error 12.5
                t_ref = (1,0,0), t_pred = 2 Rz(-theta)(1,0,0)    -> direction error 12.5
    pair (0,2): R_ref = R_pred = I                               -> 0
                t_ref = (0,1,0), t_pred = (0,-2,0): opposite     -> sign-agnostic error 0 (signed: 180)
    pair (1,2): R_ref = I, R_pred = Rz(theta)                    -> 12.5
                t_ref = (-1,1,0) at 135 deg; t_pred = (-2,0,0) - Rz(theta)(0,2,0) = 2(sin theta - 1, -cos theta, 0)
                at 180 + 45 + theta/2 = 231.25 deg (tan(45 + theta/2) = cos theta / (1 - sin theta))
                -> 96.25 deg apart -> sign-agnostic error 180 - 96.25 = 83.75

    RRA@5 = 1/3, RRA@15 = RRA@30 = 1; RTA@5 = 1/3, RTA@15 = RTA@30 = 2/3.
    max errors 12.5, 0, 83.75: fraction below k is 1/3 for k = 1..12 and 2/3 for k = 13..30, so
    AUC@30 = (12 * 1/3 + 18 * 2/3) / 30 = 16/30.
    """
    ref = np.stack([_ext(np.eye(3), (0, 0, 0)), _ext(np.eye(3), (-1, 0, 0)), _ext(np.eye(3), (0, -1, 0))])
    pred = np.stack([_ext(np.eye(3), (0, 0, 0)), _ext(_rz(12.5), (-2, 0, 0)), _ext(np.eye(3), (0, 2, 0))])
    names = ["a.jpg", "b.jpg", "c.jpg"]
    rot, trans = relative_errors(pred, ref)
    np.testing.assert_allclose(rot, [12.5, 0.0, 12.5], atol=1e-9)
    np.testing.assert_allclose(trans, [12.5, 0.0, 83.75], atol=1e-9)
    res = evaluate_poses(names[::-1], pred[::-1], names, ref)  # input order does not matter: pairs go by name
    assert res["pairs"] == 3 and res["pair_metric"] == "relative"
    assert res["rra"] == pytest.approx({"5": 1 / 3, "15": 1.0, "30": 1.0})
    assert res["rta"] == pytest.approx({"5": 1 / 3, "15": 2 / 3, "30": 2 / 3})
    assert res["auc30"] == pytest.approx(16 / 30)
    # the same numbers after any similarity change of the predicted world (the pair pose is frame-free)
    Q = Rotation.from_rotvec([0.4, -0.2, 0.9]).as_matrix()
    moved = np.stack([_sim3_of_world(E, 2.5, Q, np.array([1.0, 2.0, -3.0])) for E in pred])
    assert evaluate_poses(names, moved, names, ref)["auc30"] == pytest.approx(16 / 30)
    # symmetric (stricter) variant, by hand: pair (0,2) is 180 (signed); pair (1,2) takes its j->i pose too,
    # t = (1,-1,0) at -45 deg vs 2(cos theta, 1 - sin theta, 0) at 45 - theta/2 = 38.75 deg: 83.75, and the i->j
    # pose above, signed: 96.25 -> 96.25; pair (0,1): max(12.5, 0) = 12.5. Only pair (0,1) is under 30 deg.
    rot_s, trans_s = relative_errors(pred, ref, mode="symmetric")
    np.testing.assert_allclose(rot_s, [12.5, 0.0, 12.5], atol=1e-9)
    np.testing.assert_allclose(trans_s, [12.5, 180.0, 96.25], atol=1e-6)
    sym = evaluate_poses(names, pred, names, ref, mode="symmetric")
    assert sym["rta"] == pytest.approx({"5": 0.0, "15": 1 / 3, "30": 1 / 3})
    assert sym["auc30"] == pytest.approx(18 / 30 / 3)  # max errors 12.5, 180, 96.25: 1/3 for k = 13..30
    with pytest.raises(EvaluationError, match="unknown pair-metric mode"):
        evaluate_poses(names, pred, names, ref, mode="vggt")


def test_co3d_variant_on_the_same_hand_computed_case() -> None:
    """VGGT's test_co3d.py variant, by hand on the cameras above. Camera 0 (first by name) is the identity in
    both, so the re-expressed poses are the poses; pair pose inv(E_i) E_j: R = R_i^T R_j, t = R_i^T (t_j - t_i).

    pair (0,1): R_pred = Rz(theta) -> 12.5; t_ref = (-1,0,0), t_pred = (-2,0,0) -> 0
    pair (0,2): R = I both -> 0; t_ref = (0,-1,0), t_pred = (0,2,0): opposite -> 0
    pair (1,2): R_pred = Rz(-theta) -> 12.5; t_ref = (1,-1,0) at -45 deg,
                t_pred = Rz(-theta)(2,2,0) at 45 - 12.5 = 32.5 deg -> 77.5 apart -> 77.5
    RTA@5 = RTA@15 = RTA@30 = 2/3; max errors 12.5, 0, 77.5 -> AUC@30 = 16/30 as before.
    """
    ref = np.stack([_ext(np.eye(3), (0, 0, 0)), _ext(np.eye(3), (-1, 0, 0)), _ext(np.eye(3), (0, -1, 0))])
    pred = np.stack([_ext(np.eye(3), (0, 0, 0)), _ext(_rz(12.5), (-2, 0, 0)), _ext(np.eye(3), (0, 2, 0))])
    names = ["a.jpg", "b.jpg", "c.jpg"]
    rot, trans = relative_errors(pred, ref, mode="co3d")
    np.testing.assert_allclose(rot, [12.5, 0.0, 12.5], atol=1e-9)
    np.testing.assert_allclose(trans, [0.0, 0.0, 77.5], atol=1e-9)
    res = evaluate_poses(names, pred, names, ref, mode="co3d")
    assert res["rta"] == pytest.approx({"5": 2 / 3, "15": 2 / 3, "30": 2 / 3})
    assert res["auc30"] == pytest.approx(16 / 30)
    # the first camera is the world: a similarity change of the predicted world does not matter
    Q = Rotation.from_rotvec([0.4, -0.2, 0.9]).as_matrix()
    moved = np.stack([_sim3_of_world(E, 2.5, Q, np.array([1.0, 2.0, -3.0])) for E in pred])
    rot_m, trans_m = relative_errors(moved, ref, mode="co3d")
    np.testing.assert_allclose(rot_m, rot, atol=1e-9)
    np.testing.assert_allclose(trans_m, trans, atol=1e-6)


def test_auc_uses_numpy_histogram_bins() -> None:
    """An error of exactly 30 degrees falls in the last, closed bin [29, 30] (numpy.histogram), 1 in [1, 2)."""
    hist = np.histogram([0.0, 1.0, 30.0, 31.0], bins=np.arange(31))[0]
    assert hist[0] == 1 and hist[1] == 1 and hist[29] == 1 and hist.sum() == 3
    # cumulative fractions: 1/4 for bin 0, 2/4 for bins 1..28, 3/4 for bin 29
    assert auc_from_histogram(hist, 4) == pytest.approx((1 / 4 + 28 * 2 / 4 + 3 / 4) / 30)


def test_cli_eval_symmetric_flag(fox_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = _ref(fox_dir)
    assert main(["eval", str(ref), "--reference", str(ref), "--json", "--symmetric"]) == 0
    assert json.loads(capsys.readouterr().out)["pair_metric"] == "symmetric"
    assert main(["eval", str(ref), "--reference", str(ref), "--json", "--co3d"]) == 0
    assert json.loads(capsys.readouterr().out)["pair_metric"] == "co3d"
    assert main(["eval", str(ref), "--reference", str(ref), "--co3d", "--symmetric"]) == 2
