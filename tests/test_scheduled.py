"""Scheduled runs on a growing folder (flows/scheduled.py, sparse_vggt/grow.py): a finished run's folder gains
photos, the scheduled flow makes a new dated run directory that reuses the old descriptors by content hash, and
its output equals a fresh run on the grown folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sparse_vggt.store import RunStore

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "sparse_vggt" / "data" / "sacre_coeur" / "images"


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("prefect_home")
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    if old is None:
        os.environ.pop("PREFECT_HOME", None)
    else:
        os.environ["PREFECT_HOME"] = old


def _cfg() -> dict:
    from sparse_vggt.demo import demo_config

    cfg = demo_config()
    cfg.orchestration.cluster_process = False
    return cfg.to_dict()


def _poses(run: Path) -> dict[str, np.ndarray]:
    store = RunStore.open(run)
    paths = store.read_table("images", ["path"]).column("path").to_pylist()
    ids = np.asarray(store.zarr["merge/images/image_ids"][...])
    ext = np.asarray(store.zarr["merge/images/extrinsics"][...], np.float64)
    return {paths[int(i)]: e for i, e in zip(ids, ext)}


def _assert_copies(prev: Path, new: Path, mapping: dict[str, int]) -> None:
    """Each copied cluster holds the previous cluster's arrays byte for byte, with the new run's image ids for
    the same photos, and a marker that verifies in full."""
    from sparse_vggt.reconstruct import check_cluster, cluster_frames, cluster_inputs_key

    s1, s2 = RunStore.open(prev), RunStore.open(new)
    sha1 = s1.read_table("images", ["sha256"]).column("sha256").to_pylist()
    sha2 = s2.read_table("images", ["sha256"]).column("sha256").to_pylist()
    table = s2.read_table("clusters")
    for new_id, old_id in mapping.items():
        g1, g2 = s1.zarr[f"clusters/{old_id}"], s2.zarr[f"clusters/{new_id}"]
        for name in ("extrinsics", "intrinsics", "depth", "depth_conf", "depth_to_image"):
            np.testing.assert_array_equal(np.asarray(g1[name][...]), np.asarray(g2[name][...]))
        ids1, ids2 = np.asarray(g1["image_ids"][...]), np.asarray(g2["image_ids"][...])
        assert [sha1[i] for i in ids1] == [sha2[i] for i in ids2]
        frames, neighbors = cluster_frames(table, int(new_id))
        assert np.array_equal(frames, ids2)
        assert check_cluster(s2, int(new_id), cluster_inputs_key(s2.config(), frames, neighbors), full=True)[0]
        assert g2.attrs["reused_from"] == {"run": str(prev.resolve()), "cluster_id": old_id}


def test_grown_folder_new_dated_run_reuses_descriptors_and_equals_fresh_run(harness, tmp_path):
    from flows.reconstruct import reconstruct
    from flows.scheduled import scheduled_reconstruct

    files = sorted(PHOTOS.iterdir())
    photos, runs = tmp_path / "photos", tmp_path / "runs"
    photos.mkdir()
    for f in files[:6]:  # "a_" sorts the first photos before the ones added later
        shutil.copy(f, photos / f"a_{f.name}")
    first = scheduled_reconstruct(str(photos), str(runs), _cfg())
    run1 = Path(first["run_dir"])
    assert run1.parent == runs.resolve() and first["reused"]["from"] is None

    # nothing changed: no new work, the previous run stays current
    same = scheduled_reconstruct(str(photos), str(runs), _cfg())
    assert same["reused"]["unchanged"] and same["run_dir"] == str(run1)
    assert [p.name for p in runs.iterdir() if p.is_dir()] == [run1.name]

    for f in files[6:]:
        shutil.copy(f, photos / f"b_{f.name}")
    grown = scheduled_reconstruct(str(photos), str(runs), _cfg())
    run2 = Path(grown["run_dir"])
    assert run2 != run1 and run2.parent == runs.resolve()
    d = grown["reused"]["descriptors"]
    # chunk_size 4: chunk 0 holds 4 old photos (reused), chunk 1 two old + two new, chunk 2 two new
    assert d["reason"] is None and d["chunks_total"] == 3 and d["chunks_reused"] == 1 and d["images_reused"] == 4
    assert d["images_new"] == 4 and d["images_recomputed_known"] == 2
    assert grown["stages_executed"]["describe-chunk"] == 2  # only the chunks with new photos were described
    c = grown["reused"]["clusters"]  # copied: clusters whose inputs equal a finished previous cluster's
    assert c["clusters"] == grown["clusters"] and c["reused"] == len(c["map"]) and c["reason"] is None
    assert grown["stages_executed"].get("reconstruct-cluster", 0) == c["clusters"] - c["reused"]
    print("clusters copied from the previous run:", c)
    _assert_copies(run1, run2, c["map"])
    report = json.loads((run2 / "orchestration" / "report.json").read_text())
    assert report["reused"]["descriptors"]["images_reused"] == 4
    events = [json.loads(x) for x in (run2 / "orchestration" / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "reused_from_previous_run" for e in events)
    assert [e["map"] for e in events if e["kind"] == "clusters_reused"] == [c["map"]]

    # the reused rows are the previous run's rows, byte for byte
    s1, s2 = RunStore.open(run1), RunStore.open(run2)
    sha1 = s1.read_table("images", ["sha256"]).column("sha256").to_pylist()
    sha2 = s2.read_table("images", ["sha256"]).column("sha256").to_pylist()
    d1, d2 = np.asarray(s1.zarr["descriptors"][...]), np.asarray(s2.zarr["descriptors"][...])
    for r in range(4):
        assert np.array_equal(d2[r], d1[sha1.index(sha2[r])])

    fresh = tmp_path / "fresh"
    reconstruct(str(photos), str(fresh), _cfg())
    np.testing.assert_array_equal(np.asarray(RunStore.open(fresh).zarr["descriptors"][...]), d2)
    a, b = _poses(run2), _poses(fresh)
    assert a.keys() == b.keys() and len(a) == 10
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


def test_same_photos_other_settings_copy_upstream_and_unaffected_clusters(harness, tmp_path):
    """Same photos, changed settings: describe, graph and partition are copied whole; the clusters too while the
    reconstruct settings are unchanged (only merge/export recomputed), none once they change."""
    from flows.reconstruct import reconstruct
    from flows.scheduled import scheduled_reconstruct

    photos, runs = tmp_path / "photos", tmp_path / "runs"
    shutil.copytree(PHOTOS, photos)
    run1 = Path(scheduled_reconstruct(str(photos), str(runs), _cfg())["run_dir"])

    cfg = _cfg()
    cfg["merge"]["min_correspondences"] = 25  # result-affecting, downstream of the clusters
    second = scheduled_reconstruct(str(photos), str(runs), cfg)
    run2 = Path(second["run_dir"])
    r = second["reused"]
    assert run2 != run1 and r["settings_changed"] == ["merge.min_correspondences: 20 -> 25"]
    assert r["upstream"]["stages"] == ["describe", "graph", "partition"] and r["upstream"]["reason"] is None
    assert "descriptors" not in r  # the whole describe stage was copied instead
    assert r["clusters"]["reused"] == r["clusters"]["clusters"] == second["clusters"] >= 2
    executed = second["stages_executed"]
    assert not {"describe-chunk", "graph", "partition", "reconstruct-cluster"} & set(executed), executed
    assert r["recomputed"] == ["merge", "export"]
    from flows.scheduled import _reuse_markdown  # the UI artifact's text

    md = _reuse_markdown(str(run2), r)
    assert "copied whole: describe, graph, partition" in md and f"{second['clusters']} of {second['clusters']}" in md
    assert "merge.min_correspondences: 20 -> 25" in md
    _assert_copies(run1, run2, r["clusters"]["map"])
    s1, s2 = RunStore.open(run1), RunStore.open(run2)
    for stage in ("describe", "graph", "partition"):
        assert s2.stage_intact(stage) and s2.stage_manifest(stage)["reused_from"] == str(run1)
    fresh = tmp_path / "fresh"
    reconstruct(str(photos), str(fresh), cfg)
    a, b = _poses(run2), _poses(fresh)
    assert a.keys() == b.keys() and len(a) == 10
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6

    cfg["reconstruct"]["depth_dtype"] = "float32"  # changes every cluster's stored result: no cluster is copied
    third = scheduled_reconstruct(str(photos), str(runs), cfg)
    r = third["reused"]
    assert r["upstream"]["stages"] == ["describe", "graph", "partition"] and r["clusters"]["reused"] == 0
    assert third["stages_executed"]["reconstruct-cluster"] == third["clusters"]


def test_grown_folder_copies_the_clusters_the_new_photos_leave_untouched(harness, tmp_path):
    """Photos of a second place join the folder: with descriptors that keep the two places apart (a descriptor
    file and graph.min_similarity), the old place's clusters keep their exact inputs and are copied, the new
    place's are computed, and the result equals a fresh run on the grown folder."""
    from flows.reconstruct import reconstruct
    from flows.scheduled import scheduled_reconstruct

    files = sorted(PHOTOS.iterdir())
    photos, runs = tmp_path / "photos", tmp_path / "runs"
    photos.mkdir()
    names = [f"a_{f.name}" for f in files[:6]] + [f"b_{f.name}" for f in files[6:]]
    rng = np.random.default_rng(0)
    vectors = np.zeros((len(names), 16), np.float32)
    vectors[:6, 0], vectors[6:, 1] = 1.0, 1.0  # two places, orthogonal
    vectors += rng.normal(0, 0.05, vectors.shape).astype(np.float32)
    np.savez(tmp_path / "desc.npz", names=np.array(names), descriptors=vectors)
    cfg = _cfg()
    cfg["describe"]["descriptors_file"] = str(tmp_path / "desc.npz")
    cfg["graph"]["min_similarity"] = 0.5
    for f, name in zip(files[:6], names):
        shutil.copy(f, photos / name)
    run1 = Path(scheduled_reconstruct(str(photos), str(runs), cfg)["run_dir"])
    for f, name in zip(files[6:], names[6:]):
        shutil.copy(f, photos / name)
    grown = scheduled_reconstruct(str(photos), str(runs), cfg)
    run2 = Path(grown["run_dir"])
    c = grown["reused"]["clusters"]
    print("clusters copied from the previous run:", c)
    first = RunStore.open(run1).read_table("clusters", ["cluster_id"]).column(0).to_pylist()
    assert c["reused"] == len(set(first)) >= 1 and c["clusters"] > c["reused"]  # every old cluster, not the new ones
    assert grown["stages_executed"]["reconstruct-cluster"] == c["clusters"] - c["reused"]
    _assert_copies(run1, run2, c["map"])
    s2 = RunStore.open(run2)
    rows = s2.read_table("images", ["path", "sha256"]).to_pylist()
    for new_id in c["map"]:  # the copied clusters hold old photos only
        ids = np.asarray(s2.zarr[f"clusters/{new_id}/image_ids"][...])
        assert all(Path(rows[i]["path"]).name.startswith("a_") for i in ids)
    fresh = tmp_path / "fresh"
    reconstruct(str(photos), str(fresh), cfg)
    a, b = _poses(run2), _poses(fresh)
    assert a.keys() == b.keys() and len(a) == 10
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
