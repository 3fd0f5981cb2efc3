"""Geometric verification of candidate pairs: local features + RANSAC fundamental matrix, in worker processes.

Why: retrieval and priors propose pairs that only look alike (repeated facades, similar streets); a pair whose
photos admit a fundamental matrix with enough inliers really shares a view. Verified pairs are weighted by their
inlier count. OpenCV is an optional extra (``pip install "sparse-vggt[verify]"``) and is imported only here,
only when ``graph.verify`` is on.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import GraphConfig
from ..progress import track
from .source import GraphError

log = logging.getLogger(__name__)


def _cv2() -> Any:
    """OpenCV, or a GraphError that says how to install it (it is not a core dependency)."""
    try:
        import cv2
    except ImportError as exc:
        raise GraphError('graph.verify=true needs OpenCV, an optional extra: pip install "sparse-vggt[verify]" '
                         "(or set graph.verify=false)") from exc
    return cv2


_VERIFY: dict[str, Any] = {}


def _verify_init(root: str, paths: list[str], features: str, max_side: int) -> None:
    cv2 = _cv2()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    _VERIFY.update(root=root, paths=paths, features=features, max_side=max_side)
    _features.cache_clear()


@lru_cache(maxsize=128)
def _features(i: int) -> tuple[np.ndarray, np.ndarray | None]:
    from ..scan import load_image

    cv2 = _cv2()
    img = load_image(Path(_VERIFY["root"]) / _VERIFY["paths"][i]).convert("L")
    scale = _VERIFY["max_side"] / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    gray = np.asarray(img)
    if _VERIFY["features"] == "orb":
        det = cv2.ORB_create(nfeatures=4000)
    else:
        det = cv2.SIFT_create(nfeatures=2048)
    kps, desc = det.detectAndCompute(gray, None)
    pts = np.array([kp.pt for kp in kps], dtype=np.float32).reshape(-1, 2)
    return pts, desc


def _verify_pair(i: int, j: int) -> int:
    cv2 = _cv2()
    pi, di = _features(i)
    pj, dj = _features(j)
    if di is None or dj is None or len(pi) < 8 or len(pj) < 8:
        return 0
    norm = cv2.NORM_HAMMING if _VERIFY["features"] == "orb" else cv2.NORM_L2
    matcher = cv2.BFMatcher(norm)
    fwd = matcher.knnMatch(di, dj, k=2)
    back = {m.queryIdx: m.trainIdx for m in matcher.match(dj, di)}
    # Lowe ratio test + mutual nearest neighbour: keeps random matches (and thus chance F fits) rare
    good = [m[0] for m in fwd
            if len(m) == 2 and m[0].distance < 0.8 * m[1].distance and back.get(m[0].trainIdx) == m[0].queryIdx]
    if len(good) < 8:
        return 0
    a = pi[[m.queryIdx for m in good]]
    b = pj[[m.trainIdx for m in good]]
    _, mask = cv2.findFundamentalMat(a, b, cv2.USAC_MAGSAC, 1.5, 0.999, 10000)
    return 0 if mask is None else int(mask.sum())


def _verify_batch(pairs: np.ndarray) -> np.ndarray:
    out = np.zeros(len(pairs), dtype=np.int32)
    for n, (i, j) in enumerate(pairs):
        try:
            out[n] = _verify_pair(int(i), int(j))
        except Exception as exc:  # one unreadable photo must not kill the stage; the pair is just unverified
            log.warning("verification of %s / %s failed: %s", _VERIFY["paths"][i], _VERIFY["paths"][j], exc)
            out[n] = -1
    return out


def verify_pairs(root: Path, paths: Sequence[str], a: np.ndarray, b: np.ndarray, cfg: GraphConfig
                 ) -> np.ndarray:
    """RANSAC inlier count per pair (-1 = an image could not be read), parallel over pairs.

    Pairs are sorted by first image and split into contiguous batches so each worker's feature cache is
    reused; features are never held for all images at once (city scale).
    """
    if cfg.verify_features not in {"sift", "orb"}:
        raise GraphError(f"graph.verify_features={cfg.verify_features!r}: use sift or orb")
    _cv2()  # a missing OpenCV is reported here, not as a broken worker pool
    pairs = np.stack([a, b], 1)
    order = np.lexsort((b, a))
    pairs = pairs[order]
    workers = cfg.verify_workers or (os.cpu_count() or 1)
    batch = max(1, min(256, math.ceil(len(pairs) / (workers * 4))))
    batches = [pairs[s:s + batch] for s in range(0, len(pairs), batch)]
    init = (str(root), list(paths), cfg.verify_features, cfg.verify_max_side)
    results: list[np.ndarray] = []
    if workers <= 1:
        _verify_init(*init)
        for bt in track(batches, total=len(batches), description="verifying pairs"):
            results.append(_verify_batch(bt))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # fork after torch/zarr threads started is unsafe
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_verify_init,
                                 initargs=init) as pool:
            for r in track(pool.map(_verify_batch, batches), total=len(batches), description="verifying pairs"):
                results.append(r)
    inl = np.concatenate(results) if results else np.zeros(0, np.int32)
    out = np.empty_like(inl)
    out[order] = inl
    return out

