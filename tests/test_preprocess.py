"""Preprocessing: reference sizes/rounding/padding and the model->original transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_vggt.preprocess import intrinsics_to_original, model_to_original, preprocess_images, valid_mask


def _img(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_crop_mode_sizes_and_bankers_rounding():
    # 640x490 -> 518 x 396.59 -> /14 = 28.33 -> 392 ; 800x700 -> 453.25/14 = 32.375 -> 448
    t, A = preprocess_images([_img(640, 490)], mode="crop")
    assert t.shape == (1, 3, 392, 518)
    # 518x35: 35/14 = 2.5 -> round half to even -> 2 -> 28 (would be 42 with round-half-up)
    t, _ = preprocess_images([_img(518, 35)], mode="crop")
    assert t.shape[-2:] == (28, 518)
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0


def test_crop_mode_portrait_is_centre_cropped_and_transform_maps_back():
    img = _img(400, 800)
    t, A = preprocess_images([img], mode="crop")
    assert t.shape == (1, 3, 518, 518)  # 518 x 1036 resized, rows cropped
    # the model's centre is the original centre; its top edge is 259 resized rows = a quarter of the height
    centre = model_to_original(np.array([[259.0, 259.0]]), A[0])
    np.testing.assert_allclose(centre, [[200.0, 400.0]], atol=1e-9)
    np.testing.assert_allclose(model_to_original(np.array([[0.0, 0.0]]), A[0]), [[0.0, 200.0]], atol=1e-9)
    assert valid_mask(A[0], (518, 518), img.size).all()


def test_pad_mode_is_white_and_padding_is_invalid():
    img = _img(300, 600)  # portrait: height 518, width round(259/14)*14 = 252 (18.5 -> 18, half to even)
    t, A = preprocess_images([img], mode="pad")
    assert t.shape == (1, 3, 518, 518)
    left = (518 - 252) // 2
    assert torch.all(t[0, :, :, :left] == 1.0) and torch.all(t[0, :, :, left + 252:] == 1.0)
    mask = valid_mask(A[0], (518, 518), img.size)
    assert not mask[:, :left].any() and mask[:, left:left + 252].all() and not mask[:, left + 252:].any()
    np.testing.assert_allclose(model_to_original(np.array([[left, 0.0]]), A[0]), [[0.0, 0.0]], atol=1e-9)


def test_mixed_sizes_are_padded_to_common_shape_and_transforms_follow():
    imgs = [_img(640, 480, 1), _img(640, 320, 2)]
    t, A = preprocess_images(imgs, mode="crop")
    assert t.shape == (2, 3, 392, 518)  # 388.5/14=27.75 -> 392 ; 259/14=18.5 -> 18 -> 252
    top = (392 - 252) // 2
    assert torch.all(t[1, :, :top] == 1.0)
    np.testing.assert_allclose(model_to_original(np.array([[0.0, top]]), A[1]), [[0.0, 0.0]], atol=1e-9)
    np.testing.assert_allclose(model_to_original(np.array([[518.0, top + 252]]), A[1]), [[640.0, 320.0]], atol=1e-9)


def test_resize_matches_pil_bicubic_exactly():
    img = _img(700, 525, 3)
    t, _ = preprocess_images([img], mode="crop")
    ref = np.asarray(img.resize((518, 392), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    assert torch.equal(t[0].permute(1, 2, 0), torch.from_numpy(ref))


def test_intrinsics_map_to_original_pixels():
    """A pinhole camera seen through the model-input frame projects a 3-D point to (u, v); the mapped
    intrinsics project it to the same original pixel that the affine maps (u, v) to."""
    img = _img(1000, 750)
    t, A = preprocess_images([img], mode="crop")
    h, w = t.shape[-2:]
    K = np.array([[400.0, 0, w / 2], [0, 410.0, h / 2], [0, 0, 1]])
    X = np.array([0.3, -0.2, 2.0])
    uv = (K @ X)[:2] / X[2]
    K0 = intrinsics_to_original(K, A[0])
    xy = (K0 @ X)[:2] / X[2]
    np.testing.assert_allclose(xy, model_to_original(uv[None], A[0])[0], rtol=1e-12)
    np.testing.assert_allclose(K0[:2, 2], [500.0, 375.0], rtol=1e-9)  # image centre -> image centre
    assert intrinsics_to_original(torch.tensor(K), A[0]).shape == (3, 3)


def test_rgba_is_composited_on_white_and_errors():
    rgba = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    t, _ = preprocess_images([rgba], image_size=56)
    assert torch.all(t == 1.0)
    with pytest.raises(ValueError, match="at least one image"):
        preprocess_images([])
    with pytest.raises(ValueError, match="crop"):
        preprocess_images([rgba], mode="stretch")
    with pytest.raises(ValueError, match="multiple of 14"):
        preprocess_images([rgba], image_size=500)


def test_sample_photos_preprocess(sample_photos):
    paths = sorted(sample_photos.glob("*.jpg"))[:3]
    t, A = preprocess_images([Image.open(p) for p in paths], mode="crop")
    assert t.shape[0] == 3 and t.shape[-1] == 518 and t.shape[-2] % 14 == 0
    assert A.shape == (3, 2, 3)
