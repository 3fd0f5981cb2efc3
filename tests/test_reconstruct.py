"""Reconstruct stage: cluster table parsing, arrays and markers, resume, OOM mapping.

``test_stage_with_real_modules`` runs the real path (scan_mod.load_image, preprocess, VGGT tiny preset with
random weights, geometry) on the bundled photos once those modules exist; the other tests swap the model
and image loading for small stand-ins so the stage logic is tested regardless.
"""

from __future__ import annotations

import importlib
import logging

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from sparse_vggt import reconstruct as rec
from sparse_vggt.config import PipelineConfig
from sparse_vggt.store import RunStore

H, W = 42, 56


def _config() -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.reconstruct.model = "random"
    cfg.reconstruct.allow_random_weights = True
    cfg.reconstruct.preset = "tiny"
    cfg.reconstruct.image_size = 56
    cfg.reconstruct.device = "cpu"
    cfg.partition.attention_neighbors = 2
    return cfg


def _make_run(tmp_path, sample_photos, cfg: PipelineConfig) -> tuple[RunStore, list[str]]:
    store = RunStore.create_or_open(tmp_path / "run", cfg)
    names = sorted(p.name for p in sample_photos.iterdir() if p.suffix.lower() == ".jpg")[:7]
    sizes = [Image.open(sample_photos / n).size for n in names]
    images = pa.table({
        "image_id": pa.array(range(len(names)), pa.int64()),
        "path": names,
        "width": [s[0] for s in sizes],
        "height": [s[1] for s in sizes],
        "status": ["ok"] * len(names),
    }).replace_schema_metadata({b"photos_root": str(sample_photos).encode()})
    store.write_table("images", images)
    # Cluster 3: images 0..4 (reference image 2 at position 0); cluster 8: images 4..6 (4 shared).
    rows = [
        (3, 2, "core", 0, [0, 1]), (3, 0, "core", 1, [2, 1]), (3, 1, "core", 2, [0, 3]), (3, 3, "core", 3, [1, 4]),
        (3, 4, "overlap", 4, [3]),
        (8, 5, "core", 0, [6]), (8, 6, "core", 1, [5, 4]), (8, 4, "overlap", 2, [6]),
    ]
    clusters = pa.table({
        "cluster_id": pa.array([r[0] for r in rows], pa.int64()),
        "image_id": pa.array([r[1] for r in rows], pa.int64()),
        "role": [r[2] for r in rows],
        "component_id": pa.array([0] * len(rows), pa.int64()),
        "position": pa.array([r[3] for r in rows], pa.int64()),
        "neighbors": pa.array([r[4] for r in rows], pa.list_(pa.int64())),
    })
    store.write_table("clusters", clusters)
    store.stage_finished("partition", {})
    return store, names


@pytest.fixture
def standin(monkeypatch):
    """Stand-in model and image loading (own PIL resize); counts model builds and forward calls."""
    from test_sparse import _StandIn, sparse_standin

    calls = {"build": 0, "forward": 0, "neighbors": []}

    def load_model(cfg, device, k=10):
        key = ("standin", cfg.attention)
        if key not in rec._MODELS:
            calls["build"] += 1
            torch.manual_seed(cfg.seed)
            model = _StandIn().eval()
            if cfg.attention == "sparse":
                model = sparse_standin(model)
            rec._MODELS.clear()
            rec._MODELS[key] = model
        model = rec._MODELS[key]
        original = model.forward

        def counted(images, **kw):
            calls["forward"] += 1
            calls["neighbors"].append(kw.get("neighbors"))
            return original(images, **kw)

        return _Counted(model, counted)

    def load_frames(store, image_ids, cfg):
        table = store.read_table("images")
        root = table.schema.metadata[b"photos_root"].decode()
        frames, maps = [], []
        for i in image_ids.tolist():
            img = Image.open(f"{root}/{table.column('path')[i].as_py()}").convert("RGB")
            maps.append([[img.width / W, 0, 0], [0, img.height / H, 0]])
            frames.append(torch.from_numpy(np.asarray(img.resize((W, H)), dtype=np.float32) / 255).permute(2, 0, 1))
        return torch.stack(frames), np.asarray(maps, dtype=np.float32)

    def decode(pose_enc, hw, to_image):
        S = pose_enc.shape[0]
        extri = np.concatenate([np.repeat(np.eye(3)[None], S, 0), pose_enc[:, :3, None].numpy()], axis=2)
        K = np.repeat(np.array([[50.0, 0, W / 2], [0, 50.0, H / 2], [0, 0, 1]])[None], S, 0)
        A = np.zeros((S, 3, 3))
        A[:, :2], A[:, 2, 2] = to_image, 1
        return extri.astype(np.float32), (A @ K).astype(np.float32)

    rec._MODELS.clear()
    monkeypatch.setattr(rec, "load_model", load_model)
    monkeypatch.setattr(rec, "_load_frames", load_frames)
    monkeypatch.setattr(rec, "decode_cameras", decode)
    yield calls
    rec._MODELS.clear()


class _Counted:
    def __init__(self, model, fn):
        self.model, self.fn = model, fn

    def __call__(self, images, **kw):
        return self.fn(images, **kw)


def test_cluster_frames_orders_by_position_and_maps_neighbours(tmp_path, sample_photos) -> None:
    store, _ = _make_run(tmp_path, sample_photos, _config())
    ids, nbrs = rec.cluster_frames(store.read_table("clusters"), 3)
    assert ids.tolist() == [2, 0, 1, 3, 4]
    assert nbrs == [[1, 2], [0, 2], [1, 3], [2, 4], [3]]
    ids, nbrs = rec.cluster_frames(store.read_table("clusters"), 8)
    assert ids.tolist() == [5, 6, 4] and nbrs == [[1], [0, 2], [1]]
    with pytest.raises(rec.ReconstructError, match="not in clusters.parquet"):
        rec.cluster_frames(store.read_table("clusters"), 5)


def test_cluster_frames_rejects_outside_neighbours() -> None:
    table = pa.table({"cluster_id": pa.array([1, 1], pa.int64()), "image_id": pa.array([4, 7], pa.int64()),
                      "position": pa.array([0, 1], pa.int64()),
                      "neighbors": pa.array([[7], [9]], pa.list_(pa.int64()))})
    with pytest.raises(rec.ReconstructError, match=r"neighbours \[9\]"):
        rec.cluster_frames(table, 1)


def test_stage_writes_complete_arrays_and_resumes(tmp_path, sample_photos, standin) -> None:
    cfg = _config()
    store, _ = _make_run(tmp_path, sample_photos, cfg)
    manifest = rec.run(store.root, cfg)
    weights = manifest.pop("weights")
    assert manifest == {"clusters": 2, "reconstructed": 2, "skipped_complete": 0, "frames": 8, "pending": 0,
                        "reconstructed_now": 2, "frames_now": 8}
    assert weights["weights"] == "random"
    assert store.is_stage_complete("reconstruct")
    assert standin["build"] == 1 and standin["forward"] == 2  # model cached across clusters
    assert standin["neighbors"][0] == [[1, 2], [0, 2], [1, 3], [2, 4], [3]]
    images = store.read_table("images")
    for cid, ids in ((3, [2, 0, 1, 3, 4]), (8, [5, 6, 4])):
        g = store.zarr[f"clusters/{cid}"]
        n = len(ids)
        assert g.attrs["complete"] is True and g.attrs["device"] == "cpu" and g.attrs["model"] == "random"
        assert g["image_ids"][:].tolist() == ids
        assert g["extrinsics"].shape == (n, 3, 4) and g["extrinsics"].dtype == np.float32
        assert g["intrinsics"].shape == (n, 3, 3) and g["intrinsics"].dtype == np.float32
        assert g["depth"].shape == (n, H, W) and g["depth"].dtype == np.float16
        assert g["depth_conf"].shape == (n, H, W) and g["depth_conf"].dtype == np.float16
        assert g["depth_to_image"].shape == (n, 2, 3)
        assert np.isfinite(g["depth"][:]).all() and (g["depth"][:] > 0).all()
        K = g["intrinsics"][:]
        for row, img in enumerate(ids):  # principal point maps to the centre of the original image
            assert K[row, 0, 2] == pytest.approx(images.column("width")[img].as_py() / 2, rel=1e-5)
            assert K[row, 1, 2] == pytest.approx(images.column("height")[img].as_py() / 2, rel=1e-5)

    # Re-run: a no-op (no forward), manifest says so.
    again = rec.run(store.root, cfg)
    assert again["reconstructed_now"] == 0 and again["skipped_complete"] == 2
    # the stage's numbers stay the totals (what `status` and the reports show), not this call's zero
    assert again["reconstructed"] == 2 and again["frames"] == 8
    assert standin["forward"] == 2


def test_incomplete_cluster_is_cleaned_and_redone(tmp_path, sample_photos, standin) -> None:
    cfg = _config()
    store, _ = _make_run(tmp_path, sample_photos, cfg)
    grp = store.group("clusters/8")
    store.write_array(grp, "depth", np.zeros((9, 9), np.float16))  # leftover of a killed run, no marker
    manifest = rec.run(store.root, cfg, units=[8])
    assert manifest["reconstructed"] == 1 and manifest["pending"] == 1
    assert not store.is_stage_complete("reconstruct")  # cluster 3 is still missing
    assert store.zarr["clusters/8/depth"].shape == (3, H, W)
    rec.run(store.root, cfg, units=[3])
    assert store.is_stage_complete("reconstruct")
    with pytest.raises(rec.ReconstructError, match=r"clusters \[42\]"):
        rec.run(store.root, cfg, units=[42])


def test_out_of_memory_becomes_cluster_out_of_memory(tmp_path, sample_photos, standin, monkeypatch) -> None:
    cfg = _config()
    store, _ = _make_run(tmp_path, sample_photos, cfg)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(rec, "decode_cameras", oom)
    with pytest.raises(rec.ClusterOutOfMemory) as info:
        rec.reconstruct_cluster(store.root, 3, cfg)
    assert info.value.cluster_id == 3 and "20.00 GiB" in str(info.value)
    assert not store.is_unit_complete("clusters/3")

    def mps_oom(*a, **k):
        raise RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)")

    monkeypatch.setattr(rec, "decode_cameras", mps_oom)
    with pytest.raises(rec.ClusterOutOfMemory):
        rec.reconstruct_cluster(store.root, 8, cfg)

    def other(*a, **k):
        raise ValueError("something else")

    monkeypatch.setattr(rec, "decode_cameras", other)
    with pytest.raises(ValueError, match="something else"):
        rec.reconstruct_cluster(store.root, 8, cfg)


def test_random_weights_need_explicit_permission() -> None:
    cfg = _config().reconstruct
    cfg.allow_random_weights = False
    with pytest.raises(rec.ReconstructError, match="allow_random_weights=true"):
        rec.load_model(cfg, torch.device("cpu"))


def test_stage_with_real_modules(tmp_path, sample_photos) -> None:
    for name in ("sparse_vggt.scan", "sparse_vggt.preprocess", "sparse_vggt.geometry"):
        pytest.importorskip(name, reason=f"{name} not written yet")
    models = importlib.import_module("sparse_vggt.models")
    if not hasattr(models, "VGGT"):
        pytest.skip("sparse_vggt.models.VGGT not written yet")
    cfg = _config()
    cfg.reconstruct.image_size = 70
    store, _ = _make_run(tmp_path, sample_photos, cfg)
    rec._MODELS.clear()
    manifest = rec.run(store.root, cfg)
    assert manifest["reconstructed"] == 2 and store.is_stage_complete("reconstruct")
    images = store.read_table("images")
    for cid, n in ((3, 5), (8, 3)):
        g = store.zarr[f"clusters/{cid}"]
        assert g.attrs["complete"] and g["extrinsics"].shape == (n, 3, 4)
        depth = g["depth"][:]
        assert depth.ndim == 3 and depth.shape[0] == n and depth.shape[2] == 70 and np.isfinite(depth).all()
        K = g["intrinsics"][:]
        assert np.isfinite(K).all() and (K[:, 0, 0] > 0).all()
        A = g["depth_to_image"][:]
        for row, img in enumerate(g["image_ids"][:].tolist()):
            # The depth-map centre maps inside the original image.
            u, v = A[row] @ np.array([depth.shape[2] / 2, depth.shape[1] / 2, 1.0])
            assert 0 <= u <= images.column("width")[img].as_py() and 0 <= v <= images.column("height")[img].as_py()
    assert rec.run(store.root, cfg)["reconstructed_now"] == 0


def test_layer_progress_reports_blocks_without_changing_outputs(caplog) -> None:
    """The forward hooks of a long VGGT forward log 'layer i/n' and leave the outputs bit-identical."""
    from sparse_vggt.models import VGGT
    from sparse_vggt.progress import layer_progress

    torch.manual_seed(0)
    model = VGGT.from_preset("tiny").eval()
    images = torch.rand(2, 3, 28, 28)
    with torch.inference_mode():
        plain = model(images)["pose_enc"]
        with caplog.at_level(logging.INFO, logger="sparse_vggt.progress"), layer_progress(model, "cluster 7",
                                                                                          every_s=0.0):
            hooked = model(images)["pose_enc"]
        again = model(images)["pose_enc"]  # hooks removed afterwards
    agg = model.aggregator
    n = 1 + len(agg.frame_blocks) + len(agg.global_blocks)  # one patch-embedding chunk (2 small frames), then layers
    lines = [r.getMessage() for r in caplog.records if r.name == "sparse_vggt.progress"]
    assert len(lines) == n and lines[-1].startswith(f"cluster 7: layer {n}/{n}")
    assert torch.equal(plain, hooked) and torch.equal(plain, again)
    assert agg.progress_listeners == []  # removed afterwards
