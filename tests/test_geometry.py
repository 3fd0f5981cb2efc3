"""Pose encodings, quaternions, unprojection, Sim(3) and Umeyama."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.transform import Rotation

from sparse_vggt import geometry as geo


def _random_rotations(n: int, seed: int = 0) -> np.ndarray:
    return Rotation.random(n, random_state=seed).as_matrix()


def test_quaternion_matches_scipy_and_round_trips() -> None:
    R = _random_rotations(200)
    # include rotations near 180 degrees and the identity, where naive conversions fail
    R = np.concatenate([R, Rotation.from_rotvec([[math.pi - 1e-7, 0, 0], [0, 0, math.pi], [0, 0, 0]]).as_matrix()])
    q = geo.mat_to_quat(torch.from_numpy(R)).numpy()
    ref = Rotation.from_matrix(R).as_quat()  # scipy is XYZW too
    ref = np.where(ref[:, 3:4] < 0, -ref, ref)
    same = np.minimum(np.abs(q - ref).max(1), np.abs(q + ref).max(1))  # +-q equal at exactly 180 degrees
    assert same.max() < 1e-6
    assert (q[:, 3] >= 0).all()
    back = geo.quat_to_mat(torch.from_numpy(q)).numpy()
    np.testing.assert_allclose(back, R, atol=1e-6)
    # non-unit quaternions (the camera head never normalises) give the same rotation
    np.testing.assert_allclose(geo.quat_to_mat(torch.from_numpy(3.7 * q)).numpy(), R, atol=1e-6)


def test_pose_encoding_round_trip_and_reference_formulas() -> None:
    torch.manual_seed(0)
    B, S, H, W = 2, 5, 294, 518
    quat = torch.randn(B, S, 4, dtype=torch.float64)
    enc = torch.cat([torch.randn(B, S, 3, dtype=torch.float64), quat,
                     torch.rand(B, S, 2, dtype=torch.float64) * 1.0 + 0.4], -1)
    extri, intri = geo.pose_encoding_to_extri_intri(enc, (H, W))
    assert extri.shape == (B, S, 3, 4) and intri.shape == (B, S, 3, 3)
    # reference formulas: fy from fov_h and H, fx from fov_w and W, principal point at (W/2, H/2)
    np.testing.assert_allclose(intri[..., 1, 1], (H / 2) / torch.tan(enc[..., 7] / 2))
    np.testing.assert_allclose(intri[..., 0, 0], (W / 2) / torch.tan(enc[..., 8] / 2))
    assert torch.all(intri[..., 0, 2] == W / 2) and torch.all(intri[..., 1, 2] == H / 2)
    np.testing.assert_allclose(extri[..., :3, 3], enc[..., :3])
    R = extri[..., :3, :3]
    np.testing.assert_allclose(R @ R.transpose(-1, -2), torch.eye(3).expand_as(R).double(), atol=1e-10)
    back = geo.extri_intri_to_pose_encoding(extri, intri, (H, W))
    qn = quat / quat.norm(dim=-1, keepdim=True)
    qn = torch.where(qn[..., 3:4] < 0, -qn, qn)
    expected = torch.cat([enc[..., :3], qn, enc[..., 7:]], -1)
    np.testing.assert_allclose(back.numpy(), expected.numpy(), atol=1e-9)
    extri2, intri2 = geo.pose_encoding_to_extri_intri(back, (H, W))
    np.testing.assert_allclose(extri2, extri, atol=1e-9)
    np.testing.assert_allclose(intri2, intri, atol=1e-6)


def _look_at(center: np.ndarray, target: np.ndarray) -> np.ndarray:
    z = target - center
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])  # rows: camera axes in world coords -> world->camera rotation
    return np.concatenate([R, -(R @ center)[:, None]], 1)


def test_unprojected_depth_equals_world_points_of_synthetic_camera() -> None:
    rng = np.random.default_rng(1)
    H, W = 24, 32
    K = np.array([[30.0, 0, 16.0], [0, 28.0, 12.0], [0, 0, 1]])
    E = _look_at(np.array([1.0, -4.0, 1.5]), np.array([0.5, 3.0, 1.0]))
    # ground-truth world points: for each pixel choose a depth, build the point by hand
    depth = rng.uniform(2, 9, size=(H, W))
    pts = np.zeros((H, W, 3))
    Rt, c = E[:, :3].T, -E[:, :3].T @ E[:, 3]
    for v in range(H):
        for u in range(W):
            ray = np.array([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], 1.0])
            pts[v, u] = c + Rt @ (ray * depth[v, u])
    np.testing.assert_allclose(geo.unproject_depth(depth, E, K), pts, atol=1e-9)
    # torch path, batched, with a trailing channel dim as the model emits
    t = geo.unproject_depth(torch.from_numpy(depth)[None, None, ..., None], torch.from_numpy(E)[None, None],
                            torch.from_numpy(K)[None, None])
    np.testing.assert_allclose(t[0, 0].numpy(), pts, atol=1e-9)
    # the points project back to their pixels with their depths
    cam = pts @ E[:, :3].T + E[:, 3]
    np.testing.assert_allclose(cam[..., 2], depth, atol=1e-9)
    proj = cam @ K.T
    np.testing.assert_allclose(proj[..., 0] / proj[..., 2], np.broadcast_to(np.arange(W), (H, W)), atol=1e-9)
    uv = np.array([[3.0, 4.0], [31.0, 23.0]])
    np.testing.assert_allclose(geo.unproject_pixels(uv, depth[[4, 23], [3, 31]], E, K), pts[[4, 23], [3, 31]], atol=1e-9)
    np.testing.assert_allclose(geo.camera_centers(E), c, atol=1e-12)


def test_sim3_exp_log_against_matrix_exponential() -> None:
    rng = np.random.default_rng(2)
    xis = rng.normal(size=(50, 7))
    xis[:10, 3:6] *= 1e-9  # tiny rotations
    xis[10:20, 6] *= 1e-10  # unit scale
    xis[20:25, 3:7] = 0.0
    for xi in xis:
        G = np.zeros((4, 4))
        G[:3, :3] = geo.hat(xi[3:6]) + xi[6] * np.eye(3)
        G[:3, 3] = xi[:3]
        np.testing.assert_allclose(geo.sim3_exp(xi), scipy.linalg.expm(G), atol=1e-9)
    back = geo.sim3_log(geo.sim3_exp(xis * 0.5))
    np.testing.assert_allclose(back, xis * 0.5, atol=1e-8)


def test_sim3_compose_inverse_apply() -> None:
    rng = np.random.default_rng(3)
    R = _random_rotations(2, seed=3)
    A = geo.sim3_from_parts(2.5, R[0], rng.normal(size=3))
    B = geo.sim3_from_parts(0.3, R[1], rng.normal(size=3))
    x = rng.normal(size=(10, 3))
    np.testing.assert_allclose(geo.sim3_apply(geo.sim3_compose(A, B), x), geo.sim3_apply(A, geo.sim3_apply(B, x)))
    np.testing.assert_allclose(geo.sim3_apply(geo.sim3_inverse(A), geo.sim3_apply(A, x)), x, atol=1e-12)
    s, Rp, t = geo.sim3_parts(A)
    assert s == pytest.approx(2.5) and np.allclose(Rp, R[0])


def test_weighted_umeyama_recovers_similarity_and_ignores_zero_weight_outliers() -> None:
    rng = np.random.default_rng(4)
    S = geo.sim3_from_parts(3.0, _random_rotations(1, seed=5)[0], np.array([1.0, -2.0, 0.5]))
    src = rng.normal(size=(100, 3))
    dst = geo.sim3_apply(S, src)
    np.testing.assert_allclose(geo.umeyama(src, dst), S, atol=1e-10)
    dst[:20] += rng.normal(scale=50, size=(20, 3))
    w = np.ones(100)
    w[:20] = 0
    np.testing.assert_allclose(geo.umeyama(src, dst, w), S, atol=1e-10)
    assert not np.allclose(geo.umeyama(src, dst), S, atol=1e-2)
    # batched
    batch = geo.umeyama(np.stack([src[20:], src[20:]]), np.stack([dst[20:], dst[20:]]))
    assert batch.shape == (2, 4, 4) and np.allclose(batch[1], S, atol=1e-10)
    # rigid (no scale)
    rigid = geo.umeyama(src[20:], geo.sim3_apply(geo.sim3_from_parts(1.0, np.eye(3), np.ones(3)), src[20:]),
                        with_scale=False)
    np.testing.assert_allclose(rigid[:3, 3], np.ones(3), atol=1e-10)


def test_umeyama_rejects_collinear_points() -> None:
    line = np.linspace(0, 1, 50)[:, None] * np.array([[1.0, 2.0, 3.0]])
    with pytest.raises(geo.GeometryError, match="collinear"):
        geo.umeyama(line, line * 2)
    with pytest.raises(geo.GeometryError, match="non-finite"):
        geo.umeyama(np.full((5, 3), np.nan), np.zeros((5, 3)))
