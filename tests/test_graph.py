"""Graph stage: blocked search == brute force, planted groups, priors, verification on real photos, bad input."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from sparse_vggt.config import GraphConfig, PipelineConfig
from sparse_vggt.graph import DescriptorSource, GraphError, run
from sparse_vggt.graph.csr import knn_pairs
from sparse_vggt.graph.knn import knn, knn_exact
from sparse_vggt.graph.recall import measure_recall
from sparse_vggt.graph.source import pair_similarity
from sparse_vggt.store import RunStore


def make_run(root: Path, desc: np.ndarray, *, status: list[str] | None = None, names: list[str] | None = None,
             gps: list[tuple[float, float] | None] | None = None, timestamps: list | None = None,
             photos_root: Path | None = None, config: PipelineConfig | None = None) -> RunStore:
    """A run directory as scan + describe leave it (images.parquet + store.zarr/descriptors)."""
    n = desc.shape[0]
    status = status or ["ok"] * n
    names = names or [f"img_{i:04d}.jpg" for i in range(n)]
    gps = gps or [None] * n
    store = RunStore.create_or_open(root, config or PipelineConfig())
    table = pa.table({
        "image_id": pa.array(np.arange(n), pa.int64()),
        "path": names,
        "status": status,
        "chunk_id": pa.array([0 if s == "ok" else -1 for s in status], pa.int64()),
        "gps_lat": pa.array([g[0] if g else None for g in gps], pa.float64()),
        "gps_lon": pa.array([g[1] if g else None for g in gps], pa.float64()),
        "timestamp": pa.array(timestamps or [None] * n, pa.float64()),
    }).replace_schema_metadata({b"photos_root": str(photos_root or root).encode()})
    store.write_table("images", table)
    store.stage_finished("scan", {})
    store.write_array(store.zarr, "descriptors", desc.astype(np.float16), chunks=(64, desc.shape[1]))
    store.stage_finished("describe", {})
    return store


def graph_sets(store: RunStore) -> tuple[list[set[int]], np.ndarray, np.ndarray, np.ndarray]:
    g = store.zarr["graph"]
    indptr, indices, comp = g["indptr"][:], g["indices"][:], g["component"][:]
    groups = [set(np.flatnonzero(comp == c).tolist()) for c in range(comp.max() + 1)]
    return groups, indptr, indices, comp


def brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    xf = x.astype(np.float32)
    xf /= np.linalg.norm(xf, axis=1, keepdims=True)
    s = xf @ xf.T
    np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(s, idx, 1)


@pytest.mark.parametrize("cached", [True, False])
def test_blocked_search_equals_brute_force(cached: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((700, 48)).astype(np.float16)
    rows = np.sort(rng.choice(900, size=700, replace=False))  # ok rows scattered among skipped ones
    full = np.zeros((900, 48), np.float16)
    full[rows] = x
    src = DescriptorSource(full, rows, memory_bytes=1 << 30 if cached else 0, read_rows=97)
    assert src.cached == cached
    idx, sim = knn_exact(src, 7, block_size=131)  # block sizes that do not divide n
    ref_idx, ref_sim = brute_force(x, 7)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sim, ref_sim, atol=1e-5)
    # exact pair similarity, cached gather and streamed super-blocks alike
    i = rng.integers(0, 700, 500)
    j = rng.integers(0, 700, 500)
    xf = x.astype(np.float32) / np.linalg.norm(x.astype(np.float32), axis=1, keepdims=True)
    np.testing.assert_allclose(pair_similarity(src, i, j), (xf[i] * xf[j]).sum(1), atol=1e-5)


@pytest.mark.parametrize("method", ["pca", "faiss"])
def test_reduced_search_with_rerank_is_exact_when_the_projection_keeps_the_signal(method: str) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1500, 12)) @ rng.standard_normal((12, 300))).astype(np.float16)  # rank 12
    src = DescriptorSource(x, np.arange(1500))
    cfg = GraphConfig(method=method, pca_dim=24, candidates=40, block_size=256, pca_sample=600)
    idx, sim, used = knn(src, 5, cfg)
    assert used == method
    ref_idx, ref_sim = brute_force(x, 5)
    np.testing.assert_allclose(sim, ref_sim, atol=2e-3)  # fp16 storage; ties only at that level
    assert measure_recall(src, idx, 5, sample=300, block_size=256) >= 0.99


def test_recall_is_measured_honestly_on_isotropic_noise() -> None:
    """Random high-dim vectors have no low-dim structure: a small PCA must show a recall well below 1."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1200, 128)).astype(np.float16)
    src = DescriptorSource(x, np.arange(1200))
    idx, _, _ = knn(src, 10, GraphConfig(method="pca", pca_dim=8, candidates=20, block_size=512))
    recall = measure_recall(src, idx, 10, sample=200, block_size=512)
    exact_idx, _ = knn_exact(src, 10, 512)
    assert recall < 0.9
    assert measure_recall(src, exact_idx, 10, sample=200, block_size=512) == 1.0


def planted(rng: np.random.Generator, sizes: list[int], dim: int = 64, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    centers = rng.standard_normal((len(sizes), dim))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = centers[labels] + noise * rng.standard_normal((labels.size, dim))
    perm = rng.permutation(labels.size)
    return x[perm], labels[perm]


def test_planted_groups_give_planted_components(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x, labels = planted(rng, [7, 5, 12, 3, 9, 1])
    status = ["ok"] * len(labels)
    status[4] = "too small"  # a skipped row: zero descriptor, component -1, no edges
    x[4] = 0
    cfg = PipelineConfig()
    cfg.graph.retrieval_neighbors, cfg.graph.min_similarity = 6, 0.5
    store = make_run(tmp_path / "run", x, status=status, config=cfg)
    manifest = run(tmp_path / "run", cfg)
    groups, indptr, indices, comp = graph_sets(store)
    ok = np.array([s == "ok" for s in status])
    want = {frozenset(np.flatnonzero((labels == g) & ok).tolist()) for g in np.unique(labels)}
    want.discard(frozenset())
    assert {frozenset(g) for g in groups} == want
    assert comp[4] == -1 and indptr[5] - indptr[4] == 0
    assert manifest["components"] == len(want)
    assert manifest["largest_component"] == max(len(g) for g in want)
    # symmetric CSR with sorted rows, no self loops
    mat = {(r, int(c)) for r in range(len(status)) for c in indices[indptr[r]:indptr[r + 1]]}
    assert all((c, r) in mat for r, c in mat) and all(r != c for r, c in mat)
    # re-running a finished stage with the same settings is a no-op; new settings recompute
    assert run(tmp_path / "run", cfg) == manifest
    cfg.graph.min_similarity, cfg.graph.retrieval_neighbors = -1.0, 40  # every pair: one component
    assert run(tmp_path / "run", cfg)["components"] == 1


def test_mutual_knn_keeps_only_pairs_found_from_both_ends() -> None:
    idx = np.array([[1], [2], [1]])  # 0->1, 1->2, 2->1
    sim = np.ones((3, 1), np.float32)
    a, b, _ = knn_pairs(idx, sim, 0.0, mutual=False)
    assert set(zip(a.tolist(), b.tolist())) == {(0, 1), (1, 2)}
    a, b, _ = knn_pairs(idx, sim, 0.0, mutual=True)
    assert set(zip(a.tolist(), b.tolist())) == {(1, 2)}


def test_priors_sequence_and_gps(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 32))
    x[5] = x[0] + 0.01 * rng.standard_normal(32)  # 5 looks like 0 ...
    gps = [(48.8867, 2.3431), (48.8867, 2.3432), None, (48.8868, 2.3431), None, (40.0, -3.0)]  # ... but is 1000 km away
    ts = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    cfg = PipelineConfig()
    cfg.graph.retrieval_neighbors, cfg.graph.min_similarity = 1, 0.9
    cfg.graph.sequence_neighbors = 1
    cfg.graph.gps_radius_m, cfg.graph.gps_max_distance_m = 50.0, 5000.0
    store = make_run(tmp_path / "run", x, gps=gps, timestamps=ts, config=cfg)
    manifest = run(tmp_path / "run", cfg)
    _, indptr, indices, _ = graph_sets(store)
    edges = {(r, int(c)) for r in range(6) for c in indices[indptr[r]:indptr[r + 1]] if r < c}
    assert (0, 5) not in edges  # look-alike pair dropped by the GPS distance cap
    assert manifest["pairs_dropped_by_gps"] >= 1
    # capture-time order 5,4,3,2,1,0 minus the dropped far pair; plus GPS neighbours 0-1, 0-3, 1-3
    assert edges == {(1, 2), (2, 3), (3, 4), (4, 5), (0, 1), (0, 3), (1, 3)}
    assert any(p.startswith("sequence:1:capture_time") for p in manifest["priors"])


def test_bad_input_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    x = np.random.default_rng(5).standard_normal((5, 16))
    x[2, 3] = np.nan
    make_run(tmp_path / "nan", x)
    with pytest.raises(GraphError, match=r"NaN.*img_0002"):
        run(tmp_path / "nan")
    make_run(tmp_path / "none", np.zeros((3, 16)), status=["too small"] * 3)
    with pytest.raises(GraphError, match="zero kept images"):
        run(tmp_path / "none")
    cfg = PipelineConfig()
    cfg.graph.retrieval_neighbors = 10
    make_run(tmp_path / "small", np.abs(x[[0, 1, 3]]), config=cfg)
    with caplog.at_level(logging.WARNING):
        manifest = run(tmp_path / "small", cfg)
    assert manifest["k"] == 2 and "clamped" in manifest["warnings"][0] and "clamped" in caplog.text
    assert manifest["edges"] == 3


def test_verification_separates_two_unrelated_real_scenes(tmp_path: Path, sample_photos: Path, fox_dir: Path) -> None:
    """All pairs are candidates (random descriptors, k = N-1); only geometry decides the components."""
    pytest.importorskip("sparse_vggt.scan", reason="verification reads photos with sparse_vggt.scan.load_image")
    sacre = sorted(sample_photos.glob("*.jpg"))
    sacre = [sacre[i] for i in (0, 3, 5, 8, 9)]
    fox = sorted((fox_dir / "images").glob("*.jpg"))[:4]
    root = tmp_path / "photos"
    root.mkdir()
    names = []
    for p in sacre + fox:
        name = f"{p.parent.parent.name}_{p.name}"
        (root / name).symlink_to(p.resolve())
        names.append(name)
    x = np.random.default_rng(6).standard_normal((len(names), 32))
    cfg = PipelineConfig()
    cfg.graph.retrieval_neighbors, cfg.graph.min_similarity = len(names), -1.0
    cfg.graph.verify, cfg.graph.verify_workers = True, 2
    store = make_run(tmp_path / "run", x, names=names, photos_root=root, config=cfg)
    manifest = run(tmp_path / "run", cfg)
    groups, _, _, _ = graph_sets(store)
    assert manifest["verification"]["pairs_checked"] == len(names) * (len(names) - 1) // 2
    assert {frozenset(g) for g in groups} == {frozenset(range(5)), frozenset(range(5, 9))}
    assert manifest["weights"] == "inliers"
    # without verification the same candidates join everything: verification made the split
    cfg.graph.verify = False
    assert run(tmp_path / "run", cfg)["components"] == 1


def test_low_recall_is_a_warning_in_the_manifest_and_the_report(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Isotropic descriptors and a tiny PCA: recall far below graph.min_recall must be loud, not an INFO line."""
    from sparse_vggt.export.report import _checks

    rng = np.random.default_rng(5)
    x = rng.standard_normal((900, 96))
    cfg = PipelineConfig()
    cfg.graph.method, cfg.graph.pca_dim, cfg.graph.candidates, cfg.graph.retrieval_neighbors = "pca", 6, 12, 8
    cfg.graph.min_similarity = -1.0
    make_run(tmp_path / "run", x, config=cfg)
    with caplog.at_level(logging.WARNING, logger="sparse_vggt.graph"):
        man = run(tmp_path / "run", cfg)
    assert man["method"] == "pca" and man["recall_at_k"] < 0.5 and man["recall_sample"] == 256
    assert man["recall_ok"] is False and man["min_recall"] == 0.95
    assert any("graph.min_recall" in w for w in man["warnings"])
    assert any("below graph.min_recall" in r.message for r in caplog.records if r.levelno == logging.WARNING)
    store = RunStore.open(tmp_path / "run")
    assert store.zarr["graph"].attrs["recall_ok"] is False
    assert any("graph recall@8" in c and "below graph.min_recall" in c for c in _checks(store))
    # exact search is measured too, and passes
    cfg.graph.method = "exact"
    man = run(tmp_path / "run", cfg)
    assert man["recall_at_k"] == 1.0 and man["recall_ok"] is True and man["recall_sample"] == 256
    assert not man["warnings"] and _checks(store) == []


def test_auto_picks_exact_search_below_the_measured_crossover() -> None:
    from sparse_vggt.graph.knn import exact_is_not_slower

    cfg = GraphConfig()
    assert exact_is_not_slower(2000, 8448, 10, cfg)
    assert not exact_is_not_slower(200_000, 8448, 10, cfg)
    assert exact_is_not_slower(10**6, cfg.pca_dim, 10, cfg)  # nothing to reduce
    # one crossover: once PCA is faster it stays faster as n grows
    flips = [exact_is_not_slower(n, 8448, 10, cfg) for n in range(1000, 200_001, 1000)]
    assert flips == sorted(flips, reverse=True)
    rng = np.random.default_rng(0)
    src = DescriptorSource(rng.standard_normal((500, 512)).astype(np.float16), np.arange(500))
    assert knn(src, 5, GraphConfig(method="auto", pca_dim=16, candidates=20))[2] == "exact"


def test_the_graph_has_no_units_to_select(tmp_path: Path) -> None:
    """The graph is built over all images at once: a units selection is a caller's mistake, said before any work."""
    make_run(tmp_path / "run", np.random.default_rng(1).standard_normal((6, 16)))
    with pytest.raises(ValueError, match="no units"):
        run(tmp_path / "run", units=[0])
    assert "graph" not in RunStore.open(tmp_path / "run").zarr


def test_verification_without_opencv_names_the_extra_to_install(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    cfg = PipelineConfig()
    cfg.graph.retrieval_neighbors, cfg.graph.verify, cfg.graph.verify_workers = 3, True, 1
    make_run(tmp_path / "run", np.random.default_rng(2).standard_normal((6, 16)), config=cfg)
    with pytest.raises(GraphError, match=r'pip install "sparse-vggt\[verify\]"'):
        run(tmp_path / "run", cfg)


def test_importing_the_graph_stage_does_not_import_opencv() -> None:
    """OpenCV is an optional extra: only graph.verify=true may need it."""
    code = "import sys, sparse_vggt.graph, sparse_vggt.cli; assert 'cv2' not in sys.modules, 'cv2 imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
