"""Camera and similarity-transform maths shared by reconstruct, merge, export and evaluate.

Conventions (the same as the VGGT reference code):

* Extrinsics are **world -> camera** ``[R | t]`` (3x4) in the OpenCV camera frame (x right, y down, z forward).
* Quaternions are **XYZW** (scalar last). ``quat_to_mat`` accepts non-unit quaternions (2/|q|^2 scaling), as the
  camera head never normalises its output; ``mat_to_quat`` returns unit quaternions with ``w >= 0``.
* Pose encoding ``absT_quaR_FoV`` (9 numbers): ``[tx, ty, tz, qx, qy, qz, qw, fov_h, fov_w]`` (radians);
  ``fy = (H/2) / tan(fov_h/2)``, ``fx = (W/2) / tan(fov_w/2)``, principal point ``(W/2, H/2)``.
* Pixels are integer indices ``(u, v)`` = (column, row) without a +0.5 offset; ``x = (u - cx) d / fx``.
* A Sim(3) is a 4x4 matrix ``[[s R, t], [0, 1]]`` acting on column points: ``y = s R x + t``. Its Lie-algebra
  vector is ``xi = (rho, omega, sigma)`` (7 numbers): ``exp(xi) = [[e^sigma exp(omega^), V rho], [0, 1]]``.

Torch functions work on any leading batch dims; the Sim(3) / Umeyama helpers are numpy (they run on the CPU over
point sets and pose graphs).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "quat_to_mat", "mat_to_quat", "pose_encoding_to_extri_intri", "extri_intri_to_pose_encoding",
    "depth_to_camera_points", "unproject_depth", "unproject_pixels", "camera_centers", "closed_form_inverse",
    "hat", "so3_exp", "so3_log", "sim3_from_parts", "sim3_parts", "sim3_compose", "sim3_inverse", "sim3_apply",
    "sim3_exp", "sim3_log", "umeyama", "rotation_angle_deg", "GeometryError",
]


class GeometryError(ValueError):
    """Degenerate or invalid geometric input (too few points, collinear points, non-finite values)."""


# ------------------------------------------------------------------------------------------------------------
# quaternions (torch, XYZW)
# ------------------------------------------------------------------------------------------------------------
def quat_to_mat(quat: torch.Tensor) -> torch.Tensor:
    """(..., 4) XYZW quaternions (any norm > 0) -> (..., 3, 3) rotation matrices."""
    x, y, z, w = torch.unbind(quat, dim=-1)
    s = 2.0 / (quat * quat).sum(dim=-1)
    m = torch.stack(
        [
            1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
            s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
            s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
        ],
        dim=-1,
    )
    return m.reshape(quat.shape[:-1] + (3, 3))


def mat_to_quat(mat: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation matrices -> (..., 4) unit XYZW quaternions with w >= 0.

    Uses the numerically best of the four Shepperd candidates per matrix (largest of w, x, y, z), so it is
    stable for rotations near 180 degrees.
    """
    if mat.shape[-2:] != (3, 3):
        raise GeometryError(f"expected (..., 3, 3) rotation matrices, got shape {tuple(mat.shape)}")
    m = mat.reshape(-1, 3, 3)
    m00, m01, m02 = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    m10, m11, m12 = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    m20, m21, m22 = m[:, 2, 0], m[:, 2, 1], m[:, 2, 2]
    # 4*q_i^2 for i = w, x, y, z
    sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    best = sq.argmax(dim=-1)
    r = torch.sqrt(torch.clamp(sq.gather(-1, best[:, None])[:, 0], min=1e-12))  # 2*|q_best|
    # candidate quaternions (x, y, z, w) for each choice of the largest component, each scaled by 1/(2|q_best|)
    cand = torch.stack(
        [
            torch.stack([m21 - m12, m02 - m20, m10 - m01, r * r], -1),  # w largest
            torch.stack([r * r, m01 + m10, m02 + m20, m21 - m12], -1),  # x largest
            torch.stack([m01 + m10, r * r, m12 + m21, m02 - m20], -1),  # y largest
            torch.stack([m02 + m20, m12 + m21, r * r, m10 - m01], -1),  # z largest
        ],
        dim=1,
    )
    q = cand[torch.arange(m.shape[0], device=m.device), best] / (2 * r[:, None])
    q = q / q.norm(dim=-1, keepdim=True)
    q = torch.where(q[:, 3:4] < 0, -q, q)
    return q.reshape(mat.shape[:-2] + (4,))


# ------------------------------------------------------------------------------------------------------------
# pose encoding (torch)
# ------------------------------------------------------------------------------------------------------------
def pose_encoding_to_extri_intri(
    pose_enc: torch.Tensor, image_size_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 9) ``absT_quaR_FoV`` encodings -> ((..., 3, 4) world->camera extrinsics, (..., 3, 3) intrinsics).

    Intrinsics are in pixels of an image of size ``image_size_hw = (H, W)`` (the model input).
    """
    if pose_enc.shape[-1] != 9:
        raise GeometryError(f"pose encoding must have 9 numbers in its last dim, got {tuple(pose_enc.shape)}")
    h, w = float(image_size_hw[0]), float(image_size_hw[1])
    t = pose_enc[..., :3]
    rot = quat_to_mat(pose_enc[..., 3:7])
    extrinsics = torch.cat([rot, t[..., None]], dim=-1)
    fy = (h / 2.0) / torch.tan(pose_enc[..., 7] / 2.0)
    fx = (w / 2.0) / torch.tan(pose_enc[..., 8] / 2.0)
    intrinsics = torch.zeros(pose_enc.shape[:-1] + (3, 3), dtype=pose_enc.dtype, device=pose_enc.device)
    intrinsics[..., 0, 0] = fx
    intrinsics[..., 1, 1] = fy
    intrinsics[..., 0, 2] = w / 2.0
    intrinsics[..., 1, 2] = h / 2.0
    intrinsics[..., 2, 2] = 1.0
    return extrinsics, intrinsics


def extri_intri_to_pose_encoding(
    extrinsics: torch.Tensor, intrinsics: torch.Tensor, image_size_hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`pose_encoding_to_extri_intri` (the principal point is assumed at the image centre)."""
    h, w = float(image_size_hw[0]), float(image_size_hw[1])
    t = extrinsics[..., :3, 3]
    quat = mat_to_quat(extrinsics[..., :3, :3])
    fov_h = 2.0 * torch.atan((h / 2.0) / intrinsics[..., 1, 1])
    fov_w = 2.0 * torch.atan((w / 2.0) / intrinsics[..., 0, 0])
    return torch.cat([t, quat, fov_h[..., None], fov_w[..., None]], dim=-1)


# ------------------------------------------------------------------------------------------------------------
# unprojection (numpy or torch, matching the input type)
# ------------------------------------------------------------------------------------------------------------
def closed_form_inverse(extrinsics: Any) -> Any:
    """(..., 3, 4) or (..., 4, 4) rigid [R | t] -> (..., 3, 4) inverse [R^T | -R^T t] (numpy or torch)."""
    rot = extrinsics[..., :3, :3]
    t = extrinsics[..., :3, 3:4]
    rt = rot.transpose(-1, -2) if isinstance(rot, torch.Tensor) else np.swapaxes(rot, -1, -2)
    cat = torch.cat if isinstance(rot, torch.Tensor) else np.concatenate
    return cat([rt, -(rt @ t)], -1)


def camera_centers(extrinsics: Any) -> Any:
    """(..., 3, 4) world->camera extrinsics -> (..., 3) camera centres in world coordinates."""
    return closed_form_inverse(extrinsics)[..., :3, 3]


def _squeeze_depth(depth: Any) -> Any:
    if depth.ndim >= 3 and depth.shape[-1] == 1:
        return depth[..., 0]
    return depth


def depth_to_camera_points(depth: Any, intrinsics: Any) -> Any:
    """(..., H, W) depth (or (..., H, W, 1)) and (..., 3, 3) intrinsics -> (..., H, W, 3) camera-frame points."""
    depth = _squeeze_depth(depth)
    h, w = depth.shape[-2], depth.shape[-1]
    if isinstance(depth, torch.Tensor):
        v, u = torch.meshgrid(
            torch.arange(h, dtype=depth.dtype, device=depth.device),
            torch.arange(w, dtype=depth.dtype, device=depth.device),
            indexing="ij",
        )
        stack = torch.stack
    else:
        depth = np.asarray(depth)
        dtype = np.promote_types(depth.dtype, np.float32)
        v, u = np.meshgrid(np.arange(h, dtype=dtype), np.arange(w, dtype=dtype), indexing="ij")
        stack = np.stack
    K = intrinsics[..., None, None, :, :]
    fx, fy, cx, cy = K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2]
    x = (u - cx) * depth / fx
    y = (v - cy) * depth / fy
    return stack([x, y, depth + 0 * x], -1)


def unproject_depth(depth: Any, extrinsics: Any, intrinsics: Any) -> Any:
    """Depth maps -> world points (..., H, W, 3), with world->camera ``extrinsics`` (..., 3, 4) (numpy or torch)."""
    cam = depth_to_camera_points(depth, intrinsics)
    inv = closed_form_inverse(extrinsics)[..., None, None, :, :]  # camera->world
    return (inv[..., :3, :3] @ cam[..., None])[..., 0] + inv[..., :3, 3]


def unproject_pixels(uv: np.ndarray, depth: np.ndarray, extrinsics: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Points at pixel coordinates ``uv`` (N, 2) with depths (N,) of one camera -> (N, 3) world points."""
    K = np.asarray(intrinsics, dtype=np.float64)
    uv = np.asarray(uv, dtype=np.float64)
    d = np.asarray(depth, dtype=np.float64)
    x = (uv[:, 0] - K[0, 2]) * d / K[0, 0]
    y = (uv[:, 1] - K[1, 2]) * d / K[1, 1]
    cam = np.stack([x, y, d], -1)
    E = np.asarray(extrinsics, dtype=np.float64)
    R, t = E[:3, :3], E[:3, 3]
    return (cam - t) @ R  # R^T (cam - t) for row vectors


# ------------------------------------------------------------------------------------------------------------
# SO(3) / Sim(3) (numpy; batched over leading dims)
# ------------------------------------------------------------------------------------------------------------
def hat(w: np.ndarray) -> np.ndarray:
    """(..., 3) -> (..., 3, 3) skew-symmetric matrices."""
    w = np.asarray(w, dtype=np.float64)
    z = np.zeros(w.shape[:-1])
    return np.stack(
        [np.stack([z, -w[..., 2], w[..., 1]], -1),
         np.stack([w[..., 2], z, -w[..., 0]], -1),
         np.stack([-w[..., 1], w[..., 0], z], -1)],
        -2,
    )


def so3_exp(w: np.ndarray) -> np.ndarray:
    """Rotation vectors (..., 3) -> rotation matrices (Rodrigues; Taylor terms near zero)."""
    w = np.asarray(w, dtype=np.float64)
    th = np.linalg.norm(w, axis=-1)[..., None, None]
    W = hat(w)
    small = th < 1e-6
    ths = np.where(small, 1.0, th)
    a = np.where(small, 1.0 - th**2 / 6.0, np.sin(ths) / ths)
    b = np.where(small, 0.5 - th**2 / 24.0, (1.0 - np.cos(ths)) / ths**2)
    return np.eye(3) + a * W + b * (W @ W)


def so3_log(R: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) -> rotation vectors (..., 3); exact near 0 and near pi."""
    R = np.asarray(R, dtype=np.float64)
    q = mat_to_quat(torch.from_numpy(np.ascontiguousarray(R))).numpy()  # x y z w, w >= 0
    v = q[..., :3]
    s = np.linalg.norm(v, axis=-1)
    ang = 2.0 * np.arctan2(s, q[..., 3])
    scale = np.where(s < 1e-12, 2.0, ang / np.where(s < 1e-12, 1.0, s))
    return v * scale[..., None]


def _sim3_V(omega: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """V(omega, sigma) = integral_0^1 e^(sigma s) exp(s omega^) ds, the translation Jacobian of exp on Sim(3)."""
    th = np.linalg.norm(omega, axis=-1)
    W = hat(omega)
    W2 = W @ W
    # c0 = int e^{sigma s} ds, c1 = int e^{sigma s} sin(th s) ds / th, c2 = int e^{sigma s} (1 - cos(th s)) ds / th^2
    c0 = np.where(np.abs(sigma) < 1e-8, 1.0 + sigma / 2.0, np.expm1(sigma) / np.where(np.abs(sigma) < 1e-8, 1.0, sigma))
    es = np.exp(sigma)
    den = sigma**2 + th**2
    safe_den = np.where(den < 1e-12, 1.0, den)
    ths = np.where(th < 1e-8, 1.0, th)
    # int_0^1 e^{a s} sin(b s) ds = (e^a (a sin b - b cos b) + b) / (a^2 + b^2); same for cos: (e^a (a cos b + b sin b) - a)/(a^2+b^2)
    Is = (es * (sigma * np.sin(th) - th * np.cos(th)) + th) / safe_den
    Ic = (es * (sigma * np.cos(th) + th * np.sin(th)) - sigma) / safe_den
    small_th = th < 1e-5
    # small-angle limits: sin(th s)/th -> s, (1-cos(th s))/th^2 -> s^2/2
    if np.any(small_th):
        a = sigma
        # int s e^{a s} ds and int s^2/2 e^{a s} ds over [0, 1] (series for small a)
        small_a = np.abs(a) < 1e-4
        aa = np.where(small_a, 1.0, a)
        i1 = np.where(small_a, 0.5 + a / 3.0, (es * (aa - 1) + 1) / aa**2)
        i2 = np.where(small_a, 1.0 / 6.0 + a / 8.0, (es * (aa**2 - 2 * aa + 2) - 2) / (2 * aa**3))
    else:
        i1 = i2 = np.zeros_like(th)
    c1 = np.where(small_th, i1, Is / ths)
    c2 = np.where(small_th, i2, (c0 - Ic) / ths**2)
    return c0[..., None, None] * np.eye(3) + c1[..., None, None] * W + c2[..., None, None] * W2


def sim3_from_parts(scale: Any, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(...,), (..., 3, 3), (..., 3) -> (..., 4, 4) matrices [[s R, t], [0, 1]]."""
    R = np.asarray(R, dtype=np.float64)
    s = np.asarray(scale, dtype=np.float64)
    out = np.zeros(R.shape[:-2] + (4, 4))
    out[..., :3, :3] = s[..., None, None] * R
    out[..., :3, 3] = t
    out[..., 3, 3] = 1.0
    return out


def sim3_parts(S: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(..., 4, 4) -> (scale (...,), rotation (..., 3, 3), translation (..., 3))."""
    S = np.asarray(S, dtype=np.float64)
    sR = S[..., :3, :3]
    scale = np.cbrt(np.linalg.det(sR))
    return scale, sR / scale[..., None, None], S[..., :3, 3].copy()


def sim3_compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a o b (apply b first)."""
    return np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64)


def sim3_inverse(S: np.ndarray) -> np.ndarray:
    s, R, t = sim3_parts(S)
    Rt = np.swapaxes(R, -1, -2)
    return sim3_from_parts(1.0 / s, Rt, -(Rt @ t[..., None])[..., 0] / s[..., None])


def sim3_apply(S: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply one Sim(3) (4, 4) to points (..., 3)."""
    S = np.asarray(S, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ S[:3, :3].T + S[:3, 3]


def sim3_exp(xi: np.ndarray) -> np.ndarray:
    """(..., 7) Lie-algebra vectors (rho, omega, sigma) -> (..., 4, 4) Sim(3) matrices."""
    xi = np.asarray(xi, dtype=np.float64)
    rho, omega, sigma = xi[..., :3], xi[..., 3:6], xi[..., 6]
    R = so3_exp(omega)
    V = _sim3_V(omega, sigma)
    return sim3_from_parts(np.exp(sigma), R, (V @ rho[..., None])[..., 0])


def sim3_log(S: np.ndarray) -> np.ndarray:
    """(..., 4, 4) Sim(3) matrices -> (..., 7) Lie-algebra vectors (rho, omega, sigma)."""
    s, R, t = sim3_parts(S)
    omega = so3_log(R)
    sigma = np.log(s)
    V = _sim3_V(omega, sigma)
    rho = np.linalg.solve(V, t[..., None])[..., 0]
    return np.concatenate([rho, omega, sigma[..., None]], -1)


def rotation_angle_deg(R: np.ndarray) -> np.ndarray:
    """Rotation angle(s) in degrees of (..., 3, 3) rotation matrices."""
    R = np.asarray(R, dtype=np.float64)
    c = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


# ------------------------------------------------------------------------------------------------------------
# Umeyama
# ------------------------------------------------------------------------------------------------------------
def umeyama(
    src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None, with_scale: bool = True,
    check_degenerate: bool = True,
) -> np.ndarray:
    """Weighted least-squares similarity ``S`` with ``dst ~ S(src)`` (Umeyama 1991). Batched over leading dims.

    ``src``/``dst`` (..., N, 3), ``weights`` (..., N) >= 0. Returns (..., 4, 4). With ``check_degenerate`` a
    :class:`GeometryError` is raised when the weighted source points are (nearly) collinear or coincident, where
    the rotation about their line is undetermined.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.shape[-1] != 3:
        raise GeometryError(f"umeyama needs matching (..., N, 3) arrays, got {src.shape} and {dst.shape}")
    if src.shape[-2] < 3:
        raise GeometryError(f"umeyama needs at least 3 points, got {src.shape[-2]}")
    w = np.ones(src.shape[:-1]) if weights is None else np.asarray(weights, dtype=np.float64)
    if not (np.isfinite(src).all() and np.isfinite(dst).all() and np.isfinite(w).all()):
        raise GeometryError("umeyama got non-finite points or weights")
    wsum = w.sum(-1, keepdims=True)
    if np.any(wsum <= 0):
        raise GeometryError("umeyama got all-zero weights")
    wn = w / wsum
    mu_s = (wn[..., None] * src).sum(-2)
    mu_d = (wn[..., None] * dst).sum(-2)
    xs = src - mu_s[..., None, :]
    xd = dst - mu_d[..., None, :]
    var_s = (wn * (xs**2).sum(-1)).sum(-1)
    cov = np.swapaxes(xd, -1, -2) @ (wn[..., None] * xs)  # (..., 3, 3) = sum w xd xs^T
    if check_degenerate:
        sv = np.linalg.svd(np.swapaxes(xs, -1, -2) @ (wn[..., None] * xs), compute_uv=False)
        if np.any(sv[..., 1] <= 1e-6 * np.maximum(sv[..., 0], 1e-300)):
            raise GeometryError("degenerate geometry: the points are (nearly) collinear or coincident")
    U, D, Vt = np.linalg.svd(cov)
    sign = np.sign(np.linalg.det(U) * np.linalg.det(Vt))
    sign = np.where(sign == 0, 1.0, sign)
    E = np.broadcast_to(np.eye(3), cov.shape).copy()
    E[..., 2, 2] = sign
    R = U @ E @ Vt
    if with_scale:
        trace = (D * np.diagonal(E, axis1=-2, axis2=-1)).sum(-1)
        scale = trace / np.maximum(var_s, 1e-300)
    else:
        scale = np.ones(cov.shape[:-2])
    t = mu_d - scale[..., None] * (R @ mu_s[..., None])[..., 0]
    return sim3_from_parts(scale, R, t)
