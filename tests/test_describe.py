"""Describe stage: bring-your-own descriptors, chunk markers, resume after a kill, bad input, MegaLoc path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import sparse_vggt.describe as describe_mod
from sparse_vggt.config import PipelineConfig
from sparse_vggt.describe import DescribeError
from sparse_vggt.describe import run as describe
from sparse_vggt.store import RunStore

STATUS = ["ok", "ok", "too small", "ok", "ok", "ok", "decode error", "ok", "ok"]


def make_scan(root: Path, photos: Path | None = None, names: list[str] | None = None,
              status: list[str] | None = None, chunk_size: int = 3) -> tuple[RunStore, PipelineConfig]:
    status = status or STATUS
    names = names or [f"sub/img_{i}.jpg" for i in range(len(status))]
    chunk, kept = [], 0
    for s in status:
        chunk.append(kept // chunk_size if s == "ok" else -1)
        kept += s == "ok"
    cfg = PipelineConfig()
    cfg.scan.chunk_size = chunk_size
    store = RunStore.create_or_open(root, cfg)
    dups = [[] for _ in status]
    dups[0] = ["other/copy_of_0.jpg"]
    store.write_table("images", pa.table({
        "image_id": pa.array(range(len(status)), pa.int64()), "path": names, "status": status,
        "chunk_id": pa.array(chunk, pa.int64()), "duplicates": pa.array(dups, pa.list_(pa.string())),
    }).replace_schema_metadata({b"photos_root": str(photos or root).encode()}))
    store.stage_finished("scan", {})
    return store, cfg


def byo(tmp: Path, n_dim: int = 24) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    names = [f"sub/img_{i}.jpg" for i in range(len(STATUS)) if STATUS[i] == "ok"]
    names[0] = "other/copy_of_0.jpg"  # keyed by a duplicate's path: still found
    vec = rng.standard_normal((len(names), n_dim)).astype(np.float32) * 40  # not unit norm: stored normalised
    perm = rng.permutation(len(names))
    return [names[i] for i in perm], vec[perm]


def expected(names: list[str], vec: np.ndarray) -> np.ndarray:
    out = np.zeros((len(STATUS), vec.shape[1]), np.float32)
    for name, v in zip(names, vec):
        row = 0 if name == "other/copy_of_0.jpg" else int(name.split("_")[-1].split(".")[0])
        out[row] = v / np.linalg.norm(v)
    return out


@pytest.mark.parametrize("kind", ["npy", "npz", "parquet"])
def test_bring_your_own_descriptors(tmp_path: Path, kind: str) -> None:
    store, cfg = make_scan(tmp_path / "run")
    names, vec = byo(tmp_path)
    f = tmp_path / f"desc.{kind}"
    if kind == "npy":
        np.save(f, vec)
        (tmp_path / "desc.txt").write_text("\n".join(names) + "\n")
    elif kind == "npz":
        np.savez(f, names=np.array(names), descriptors=vec)
    else:
        pq.write_table(pa.table({"name": names, "descriptor": [list(map(float, v)) for v in vec]}), f)
    cfg.describe.descriptors_file = str(f)
    manifest = describe(tmp_path / "run", cfg)
    arr = store.zarr["descriptors"]
    assert arr.dtype == np.float16 and arr.shape == (9, 24)
    assert arr.chunks == (3, 24)  # Zarr row chunks = ingest chunk size
    np.testing.assert_allclose(arr[:], expected(names, vec), atol=2e-3)
    assert not arr[2].any() and not arr[6].any()  # skipped rows stay zero
    assert manifest["chunks"] == 3 and manifest["dim"] == 24
    assert store.complete_units("describe_chunks") == ["0", "1", "2"]
    assert describe(tmp_path / "run", cfg) == manifest  # finished + same settings: no-op


def test_resume_after_kill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, cfg = make_scan(tmp_path / "run")
    names, vec = byo(tmp_path)
    np.savez(tmp_path / "d.npz", names=np.array(names), descriptors=vec)
    cfg.describe.descriptors_file = str(tmp_path / "d.npz")
    real = describe_mod._write_rows
    calls = []

    def dying(arr, rows, values):  # the process "dies" while writing the second chunk
        calls.append(rows)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(arr, rows, values)

    monkeypatch.setattr(describe_mod, "_write_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        describe(tmp_path / "run", cfg)
    assert store.complete_units("describe_chunks") == ["0"]
    assert not store.is_stage_complete("describe")
    monkeypatch.setattr(describe_mod, "_write_rows", real)
    manifest = describe(tmp_path / "run", cfg)
    assert manifest["chunks_resumed"] == 1 and manifest["chunks_computed"] == 2
    np.testing.assert_allclose(store.zarr["descriptors"][:], expected(names, vec), atol=2e-3)


def test_bad_descriptor_files(tmp_path: Path) -> None:
    _, cfg = make_scan(tmp_path / "run")
    names, vec = byo(tmp_path)
    cases = {
        "missing": (names[1:], vec[1:], "no descriptor for 1 kept image"),
        "nan": (names, np.where(np.arange(vec.shape[0])[:, None] == 2, np.nan, vec), "NaN"),
    }
    for key, (n, v, msg) in cases.items():
        np.savez(tmp_path / f"{key}.npz", names=np.array(n), descriptors=v)
        cfg.describe.descriptors_file = str(tmp_path / f"{key}.npz")
        with pytest.raises(DescribeError, match=msg):
            describe(tmp_path / "run", cfg)
    ragged = pa.table({"name": names, "vector": [[1.0] * (3 if i else 4) for i in range(len(names))]})
    pq.write_table(ragged, tmp_path / "ragged.parquet")
    cfg.describe.descriptors_file = str(tmp_path / "ragged.parquet")
    with pytest.raises(DescribeError, match="different lengths"):
        describe(tmp_path / "run", cfg)
    np.save(tmp_path / "nonames.npy", vec)
    cfg.describe.descriptors_file = str(tmp_path / "nonames.npy")
    with pytest.raises(DescribeError, match="needs its image names"):
        describe(tmp_path / "run", cfg)


def test_dimension_change_replaces_descriptors_and_the_graph_notices(tmp_path: Path) -> None:
    from sparse_vggt.graph import run as build_graph

    store, cfg = make_scan(tmp_path / "run")
    names, vec = byo(tmp_path)
    np.savez(tmp_path / "a.npz", names=np.array(names), descriptors=vec)
    cfg.describe.descriptors_file = str(tmp_path / "a.npz")
    describe(tmp_path / "run", cfg)
    build_graph(tmp_path / "run", cfg)
    v1 = store.zarr["graph"].attrs["descriptors_version"]
    np.savez(tmp_path / "b.npz", names=np.array(names), descriptors=vec[:, :10])
    cfg.describe.descriptors_file = str(tmp_path / "b.npz")
    assert describe(tmp_path / "run", cfg)["dim"] == 10
    assert store.zarr["descriptors"].shape == (9, 10)
    build_graph(tmp_path / "run", cfg)  # same graph settings, new descriptors: recomputed, not reused
    v2 = store.zarr["graph"].attrs["descriptors_version"]
    assert v2 != v1 and v2 == store.zarr["descriptors"].attrs["version"]


def test_zero_kept_images(tmp_path: Path) -> None:
    _, cfg = make_scan(tmp_path / "run", status=["too small", "decode error"])
    with pytest.raises(DescribeError, match="zero kept images"):
        describe(tmp_path / "run", cfg)


def test_random_weights_need_explicit_permission(tmp_path: Path) -> None:
    _, cfg = make_scan(tmp_path / "run")
    cfg.describe.model, cfg.describe.preset = "random", "tiny"
    with pytest.raises(DescribeError, match="allow_random_weights"):
        describe(tmp_path / "run", cfg)


def test_megaloc_describe_on_real_photos_and_resume(tmp_path: Path, sample_photos: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The model path end to end: tiny MegaLoc (same code as the full one), random weights, 5 real photos."""
    pytest.importorskip("sparse_vggt.scan", reason="needs sparse_vggt.scan.load_image (scan stage)")
    photos = sorted(p.name for p in sample_photos.glob("*.jpg"))[:5]
    store, cfg = make_scan(tmp_path / "run", photos=sample_photos, names=photos, status=["ok"] * 5, chunk_size=2)
    cfg.describe.model, cfg.describe.preset, cfg.describe.allow_random_weights = "random", "tiny", True
    cfg.describe.image_size, cfg.describe.batch_size = 98, 2
    with caplog.at_level("WARNING"):
        manifest = describe(tmp_path / "run", cfg)
    assert "RANDOM WEIGHTS" in caplog.text
    arr = store.zarr["descriptors"][:].astype(np.float32)
    assert arr.shape == (5, 96) and manifest["chunks"] == 3 and manifest["device"] == "cpu"
    np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, atol=2e-3)
    assert len({tuple(np.round(r, 3)) for r in arr}) == 5  # different photos, different descriptors
    # a killed run resumes: drop one chunk's marker and its rows, the rerun recomputes exactly those
    store.zarr["describe_chunks/1"].attrs["complete"] = False
    store.stage_invalidate("describe")
    again = describe(tmp_path / "run", cfg)
    assert again["chunks_computed"] == 1 and again["chunks_resumed"] == 2
    np.testing.assert_allclose(store.zarr["descriptors"][:].astype(np.float32), arr, atol=1e-3)


def test_model_is_loaded_only_when_a_chunk_is_pending(tmp_path: Path, sample_photos: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The flow calls describe once per chunk plus bookkeeping calls; a real checkpoint must not load for those."""
    import sparse_vggt.describe as describe_mod

    photos = sorted(p.name for p in sample_photos.glob("*.jpg"))[:4]
    store, cfg = make_scan(tmp_path / "run", photos=sample_photos, names=photos, status=["ok"] * 4, chunk_size=2)
    cfg.describe.model, cfg.describe.preset, cfg.describe.allow_random_weights = "random", "tiny", True
    cfg.describe.image_size = 98
    from sparse_vggt.retrieval import megaloc as megaloc_entry

    real = megaloc_entry.MegaLocDescriber
    built: list[int] = []
    monkeypatch.setattr(megaloc_entry, "MegaLocDescriber", lambda *a, **k: (built.append(1), real(*a, **k))[1])
    assert describe(tmp_path / "run", cfg, units=[0])["pending"] == 1
    assert len(built) == 1
    assert describe(tmp_path / "run", cfg, units=[])["pending"] == 1  # bookkeeping only
    assert len(built) == 1
    done = describe(tmp_path / "run", cfg, units=[1])
    assert len(built) == 2 and done["pending"] == 0 and done["chunks_computed"] == 1
    assert store.is_stage_complete("describe")
    assert describe(tmp_path / "run", cfg) == store.stage_manifest("describe") and len(built) == 2


def test_farm_units_touch_disjoint_zarr_chunks_and_head_plan_loads_no_model(tmp_path: Path) -> None:
    """The farm head plans without MegaLoc (load_model=False); units never share a Zarr chunk even when
    skipped images shift an ingest chunk across two Zarr chunks; a worker call (finish=False) never finishes."""
    store, cfg = make_scan(tmp_path / "run", chunk_size=2)  # 7 kept of 9 rows: chunks straddle Zarr chunks
    cfg.describe.model, cfg.describe.preset, cfg.describe.allow_random_weights = "random", "tiny", True
    cfg.describe.image_size = 98
    from sparse_vggt.retrieval import megaloc as megaloc_entry

    called = []
    orig = megaloc_entry.MegaLocDescriber.__init__
    megaloc_entry.MegaLocDescriber.__init__ = lambda self, *a, **k: called.append(1) or orig(self, *a, **k)
    try:
        describe(tmp_path / "run", cfg, units=[], load_model=False)
    finally:
        megaloc_entry.MegaLocDescriber.__init__ = orig
    assert not called and store.zarr["descriptors"].shape == (9, 96)
    rows_per = store.zarr["descriptors"].chunks[0]
    chunks, _ = describe_mod._chunks(store.read_table("images"))
    for per_unit in (1, 2, 10):
        units = describe_mod.describe_units(tmp_path / "run", sorted(chunks), per_unit)
        assert sorted(c for u in units for c in u) == sorted(chunks)
        owners: dict[int, int] = {}
        for i, u in enumerate(units):
            for z in {int(r) // rows_per for c in u for r in chunks[c]}:
                assert owners.setdefault(z, i) == i, (per_unit, units)
    assert len(describe_mod.describe_units(tmp_path / "run", sorted(chunks), 1)) < len(chunks)  # some merged


def test_a_registered_retrieval_descriptor_is_selected_by_name(tmp_path: Path) -> None:
    """Adding a retrieval descriptor: a describer class plus one `register` line; ``describe.descriptor`` then
    selects it, the stage stores what it returns row by row, and the planner can size the array without it."""
    from sparse_vggt import retrieval

    store, cfg = make_scan(tmp_path / "run")
    built: list[int] = []

    class RowIndex:
        """A deterministic 3-d descriptor of each row (stands for a real model)."""

        dim, model_id, weights = 3, "row-index", {"weights": "none"}

        def __init__(self, inputs: retrieval.DescribeInputs):
            built.append(int(inputs.rows.size))

        def __call__(self, rows: np.ndarray) -> np.ndarray:
            return np.stack([np.ones(rows.size), rows, rows**2], axis=1).astype(np.float32)

        def manifest(self, images: int, seconds: float) -> dict:
            return {"row_index_images": images}

    retrieval.register(retrieval.Retrieval("row-index", RowIndex, plan=lambda c: (3, "row-index", {"weights": "none"})))
    try:
        assert "row-index" in retrieval.names()
        cfg.describe.descriptor = "row-index"
        assert describe(tmp_path / "run", cfg, units=[], load_model=False)["pending"] == 3 and not built  # planned
        manifest = describe(tmp_path / "run", cfg)
        ok = [i for i, s in enumerate(STATUS) if s == "ok"]
        arr = store.zarr["descriptors"][:]
        np.testing.assert_array_equal(arr[ok], np.stack([np.ones(len(ok)), ok, np.square(ok)], 1).astype(np.float16))
        assert manifest["model"] == "row-index" and manifest["row_index_images"] == len(ok) and built == [len(ok)]
        assert store.zarr["descriptors"].attrs["weights"] == {"weights": "none"}
    finally:
        retrieval._LOADED.pop("row-index", None)
    cfg.describe.descriptor = "row-index"
    with pytest.raises(DescribeError, match="unknown describe.descriptor 'row-index'; registered: megaloc, file"):
        describe(tmp_path / "run", cfg, force=True)
    cfg.describe.descriptor = "file"
    with pytest.raises(DescribeError, match="needs describe.descriptors_file"):
        describe(tmp_path / "run", cfg, force=True)
