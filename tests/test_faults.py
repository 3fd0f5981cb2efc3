"""Fault injection with real processes: the run directory is the truth, locked, verified.

Every pipeline run here is a separate `python -m sparse_vggt.cli demo` process (10 bundled photos, the demo's tiny
random-weight settings) talking to one Prefect test server. One uninterrupted run (module fixture) is the
reference; each fault starts from a copy of it (or from scratch), breaks something the way an operator or the OS
would, re-runs, and asserts that the final export equals the reference (poses max abs diff <= 1e-6), that units
finished before the fault keep their markers, and that the fault was recorded.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from sparse_vggt.store import STAGES, RunStore

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300


_HOME: list[str] = []  # own PREFECT_HOME for the subprocesses (set by the harness fixture)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """A Prefect test server for every subprocess, and an own PREFECT_HOME: the local-run flock kept there must
    not be shared with unrelated flows on this machine."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    _HOME[:] = [str(tmp_path_factory.mktemp("prefect_home"))]
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def _env(harness: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PREFECT_API_URL=harness, PYTHONPATH=str(REPO), SPARSE_VGGT_LOCK_HEARTBEAT_S="1",
               PREFECT_HOME=_HOME[0])
    env.pop("SPARSE_VGGT_INJECT_FAULTS", None)
    env.update(extra)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sparse_vggt.cli", "--no-progress", *args]


def _run(harness: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), env=env or _env(harness), capture_output=True, text=True, timeout=TIMEOUT)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _poses(run: Path) -> dict[str, np.ndarray]:
    from sparse_vggt.evaluate import load_colmap_poses

    names, ext, _ = load_colmap_poses(run / "export" / "sparse")
    return dict(zip(names, ext))


def _assert_same_output(run: Path, ref: Path) -> None:
    a, b = _poses(run), _poses(ref)
    assert sorted(a) == sorted(b) and len(a) == 10, (sorted(a), sorted(b))
    diff = max(float(np.abs(a[n] - b[n]).max()) for n in a)
    assert diff <= 1e-6, f"poses differ from the uninterrupted run by {diff}"
    files = lambda r: sorted(str(p.relative_to(r / "export")) for p in (r / "export").rglob("*") if p.is_file())
    assert files(run) == files(ref)
    store = RunStore.open(run)
    assert all(store.is_stage_complete(s) for s in STAGES)


def _cluster_markers(run: Path) -> dict[str, tuple[str, bytes]]:
    """cluster id -> (completed_at, zarr.json bytes) of every complete cluster."""
    store = RunStore.open(run)
    out = {}
    for c in store.complete_units("clusters"):
        meta = store.zarr_path / "clusters" / c / "zarr.json"
        out[c] = (store.unit_attrs(f"clusters/{c}")["completed_at"], meta.read_bytes())
    return out


def _stage_markers(run: Path) -> dict[str, str]:
    return {s: e["finished"] for s, e in RunStore.open(run).meta().get("stages", {}).items() if e.get("finished")}


def _events(run: Path) -> list[dict]:
    path = run / "orchestration" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def reference(harness, tmp_path_factory):
    """One uninterrupted run: the output every faulted run must reproduce."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    t0 = time.perf_counter()
    _ok(_run(harness, "demo", str(run)))
    return run, time.perf_counter() - t0


def _copy(reference, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference[0], run, symlinks=True)
    return run


def _drop_marker(run: Path, unit: str) -> None:
    meta_path = run / "store.zarr" / unit / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"].pop("complete")
    meta_path.write_text(json.dumps(meta))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED_PATH']}",))


def test_marker_deleted_recomputed_second_run_refused_pickle_not_run(harness, reference, tmp_path, monkeypatch):
    """Rows: cluster marker deleted; stage marker deleted; two runs at once; a pickle planted in <run>/.prefect/."""
    run = _copy(reference, tmp_path)
    before = _cluster_markers(run)
    _drop_marker(run, "clusters/2")
    meta = json.loads((run / "run.json").read_text())
    meta["stages"]["graph"].pop("finished")  # a stage marker too: graph (and everything after it) is redone
    (run / "run.json").write_text(json.dumps(meta))
    pwned = tmp_path / "PWNED"
    monkeypatch.setenv("PWNED_PATH", str(pwned))
    blob = pickle.dumps(_Evil())
    for sub in ("results", "cache", "storage"):  # where Prefect kept cache records and results in older versions
        d = run / ".prefect" / sub
        d.mkdir(parents=True)
        for name in ("0" * 32, "a" * 64, "result"):
            (d / name).write_bytes(blob)
            (d / f"{name}.json").write_text(json.dumps({"metadata": {"serializer": {"type": "pickle"}},
                                                         "result": blob.hex()}))

    first = subprocess.Popen(_cli("demo", str(run)), env=_env(harness), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (run / "writer.json").exists():
            assert first.poll() is None and time.time() < deadline, "first run never took the lock"
            time.sleep(0.1)
        owner = json.loads((run / "writer.json").read_text())
        t0 = time.perf_counter()
        second = _run(harness, "demo", str(run))
        assert second.returncode != 0
        assert str(owner["pid"]) in second.stderr and owner["host"] in second.stderr, second.stderr[-2000:]
        # refused at once: interpreter start + imports only, no stage work (the first run is still going)
        assert first.poll() is None, "the second run was not refused before the first ended"
        out, err = first.communicate(timeout=TIMEOUT)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, err[-4000:]
    assert not pwned.exists(), "a pickle planted in <run>/.prefect/ was executed"
    after = _cluster_markers(run)
    assert set(after) == set(before)
    # partition is recomputed after the graph, identically, so every cluster except the unmarked one is kept
    assert {c for c in before if after[c] == before[c]} == set(before) - {"2"}
    assert after["2"][0] >= before["2"][0]
    _assert_same_output(run, reference[0])
    assert not (run / "writer.json").exists()  # released at the end
    print(f"second run refused after {time.perf_counter() - t0:.1f} s")


def test_truncated_and_deleted_chunks_are_redone(harness, reference, tmp_path):
    """Row: a data chunk of a completed cluster truncated / deleted (a damaged stage unit: see test_store_integrity)."""
    run = _copy(reference, tmp_path)
    before = _cluster_markers(run)
    depth_chunks = sorted(p for p in (run / "store.zarr/clusters/1/depth").rglob("*") if p.name != "zarr.json"
                          and p.is_file())
    depth_chunks[0].write_bytes(depth_chunks[0].read_bytes()[:7])  # truncated zstd frame
    ext_chunks = [p for p in (run / "store.zarr/clusters/3/extrinsics").rglob("*") if p.name != "zarr.json"
                  and p.is_file()]
    assert ext_chunks
    for p in ext_chunks:
        p.unlink()  # would read back as zeros

    proc = _run(harness, "demo", str(run))
    _ok(proc)
    assert "Traceback" not in proc.stderr
    redone = {e["unit"] for e in _events(run) if e["kind"] == "unit_redone"}
    assert {"clusters/1", "clusters/3"} <= redone, _events(run)
    after = _cluster_markers(run)
    assert {c for c in before if after[c] == before[c]} == set(before) - {"1", "3"}
    _assert_same_output(run, reference[0])
    report = json.loads((run / "orchestration" / "report.json").read_text())
    assert {e["unit"] for e in report["events"] if e["kind"] == "unit_redone"} >= {"clusters/1", "clusters/3"}


def test_oom_sigkill_and_cpu_alloc_split_depth_kept(harness, reference, tmp_path):
    """Row: a cluster process killed by the OS and a CPU allocation failure count as OOM; depth survives re-runs."""
    run = _copy(reference, tmp_path)
    ids = set(pq.read_table(run / "tables/clusters.parquet").column("cluster_id").to_pylist())
    a, b = max(ids) + 1, max(ids) + 2
    _drop_marker(run, "clusters/0")
    faults = dict(SPARSE_VGGT_INJECT_FAULTS=f"sigkill@0,alloc@{a}", SPARSE_VGGT_INJECT_ONCE_DIR=str(tmp_path / "f1"))
    proc = _run(harness, "demo", str(run), "--set", "orchestration.max_oom_splits=1", env=_env(harness, **faults))
    assert proc.returncode != 0 and "re-run" in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "f1" / "sigkill@0").exists() and (tmp_path / "f1" / f"alloc@{a}").exists()
    table = pq.read_table(run / "tables/clusters.parquet").to_pydict()
    depth = dict(zip(table["cluster_id"], table["split_depth"]))
    assert depth[a] == depth[b] == 1 and 0 not in depth and all(depth[c] == 0 for c in ids - {0})
    ev = _events(run)
    assert [(e["cluster_id"], e["into"]) for e in ev if e["kind"] == "oom_split"] == [(0, [a, b])]
    assert "SIGKILL" in next(e for e in ev if e["kind"] == "oom_split")["reason"]
    failed = [e for e in ev if e["kind"] == "cluster_failed"]
    assert [e["cluster_id"] for e in failed] == [a] and "after 1 split" in failed[0]["reason"]
    assert "allocate memory" in failed[0]["reason"]

    # re-run, the half still too big: the depth in clusters.parquet is kept, so it is not split again
    faults["SPARSE_VGGT_INJECT_ONCE_DIR"] = str(tmp_path / "f2")
    proc = _run(harness, "demo", str(run), "--set", "orchestration.max_oom_splits=1", env=_env(harness, **faults))
    assert proc.returncode != 0
    ev = _events(run)
    assert len([e for e in ev if e["kind"] == "oom_split"]) == 1
    assert [e["cluster_id"] for e in ev if e["kind"] == "cluster_failed"] == [a, a]

    # memory is back: the run finishes, nothing lost
    before = _cluster_markers(run)
    _ok(_run(harness, "demo", str(run), "--set", "orchestration.max_oom_splits=1"))
    after = _cluster_markers(run)
    assert all(after[c] == before[c] for c in before)
    assert set(after) == {str(c) for c in (ids - {0}) | {a, b}}
    assert sorted(_poses(run)) == sorted(_poses(reference[0]))  # every photo posed (the split changes geometry)


def test_force_graph_k_invalidates_later_stages(harness, reference, tmp_path):
    """Row: --force after changing graph.retrieval_neighbors redoes graph and every later stage (recorded)."""
    run = _copy(reference, tmp_path)
    refused = _run(harness, "graph", str(run), "--set", "graph.retrieval_neighbors=3")
    assert refused.returncode == 2 and "graph.retrieval_neighbors: 4 -> 3" in refused.stderr
    assert "--force" in refused.stderr
    assert all(RunStore.open(run).is_stage_complete(s) for s in STAGES)
    _ok(_run(harness, "graph", str(run), "--set", "graph.retrieval_neighbors=3", "--force"))
    store = RunStore.open(run)
    inval = [h for h in store.meta()["history"] if h["event"] == "invalidated"]
    assert inval and inval[-1]["stages"] == ["graph", "partition", "reconstruct", "merge", "export"]
    assert [s for s in STAGES if store.is_stage_complete(s)] == ["scan", "describe", "graph"]
    assert store.zarr["graph"].attrs["config"]["retrieval_neighbors"] == 3
    _ok(_run(harness, "demo", str(run), "--set", "graph.retrieval_neighbors=3"))
    from sparse_vggt.reconstruct import cluster_status

    assert cluster_status(run, store.config())[1] == []  # every cluster matches the new partition
    assert all(store.is_stage_complete(s) for s in STAGES)
    assert sorted(_poses(run)) == sorted(_poses(reference[0]))


def test_chaos_sigkill_five_times_then_finish(harness, reference, tmp_path):
    """SIGKILL the whole process group at 5 random moments in a row, then finish: same output, nothing lost."""
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    run = tmp_path / "run"
    # each restart pays the start-up again and resumes, so kills up to 0.4 of a full run spread over the stages
    span = max(5.0, 0.4 * reference[1])
    kept: dict[str, tuple[str, bytes]] = {}
    kept_stages: dict[str, str] = {}
    moments = []
    for _ in range(5):
        t = rng.uniform(2.0, span)
        moments.append(round(t, 2))
        proc = subprocess.Popen(_cli("demo", str(run)), env=_env(harness), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=t)
        except subprocess.TimeoutExpired:
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        if (run / "run.json").exists():
            stages = _stage_markers(run)
            assert all(stages.get(s) == t for s, t in kept_stages.items()), f"a finished stage was redone ({seed})"
            kept_stages.update(stages)
        if (run / "run.json").exists() and (run / "store.zarr" / "clusters").exists():
            now = _cluster_markers(run)
            assert all(now.get(c) == m for c, m in kept.items()), f"a finished cluster was redone (seed {seed})"
            kept.update(now)
    final = _run(harness, "demo", str(run))
    _ok(final)
    now = _cluster_markers(run)
    assert all(now.get(c) == m for c, m in kept.items()), f"a finished cluster was redone (seed {seed})"
    assert all(_stage_markers(run)[s] == t for s, t in kept_stages.items()), f"a finished stage was redone ({seed})"
    _assert_same_output(run, reference[0])
    print(f"chaos seed {seed}: killed at {moments} s; {len(kept)} clusters and stages {sorted(kept_stages)} "
          "survived the kills")


# ---------------------------------------------------------------------------------------------------------
# the pieces, in process (fast)


def test_pool_worker_writes_only_its_cluster(harness, reference, tmp_path):
    """A farm worker's cluster flow writes its own cluster unit and record only (no lock, no run.json)."""
    from flows.reconstruct import reconstruct_cluster_flow

    run = _copy(reference, tmp_path)
    _drop_marker(run, "clusters/4")
    snap = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*") if p.is_file()}
    cfg = RunStore.open(run).config()
    cfg.orchestration.cluster_process = False
    reconstruct_cluster_flow(str(run), 4, cfg.to_dict())
    now = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*") if p.is_file()}
    changed = {str(p.relative_to(run)) for p in set(now) | set(snap) if now.get(p) != snap.get(p)}
    own = ("store.zarr/clusters/4/", "orchestration/clusters/4.json", "orchestration/events.jsonl")
    assert changed and all(c.startswith(own) for c in changed), sorted(changed)
    assert RunStore.open(run).is_unit_complete("clusters/4", full=True)


def _unit(tmp_path: Path):
    from sparse_vggt.config import PipelineConfig

    store = RunStore.create_or_open(tmp_path / "run", PipelineConfig())
    grp = store.group("merge")
    store.write_array(grp, "depth", np.arange(2 * 4 * 5, dtype=np.float16).reshape(2, 4, 5), chunks=(1, 4, 5))
    store.write_array(grp, "extrinsics", np.ones((2, 3, 4), np.float32), chunks=(2, 3, 4))
    store.mark_unit_complete("merge", images=2)
    return store


def test_markers_record_and_verify_every_array(tmp_path):
    store = _unit(tmp_path)
    arrays = store.unit_attrs("merge")["arrays"]
    assert arrays["depth"]["shape"] == [2, 4, 5] and arrays["depth"]["dtype"] == "float16"
    assert arrays["depth"]["files"] == 3 and arrays["depth"]["nbytes"] > 0 and "crc32" in arrays["depth"]
    assert store.verify_unit("merge", full=True)
    chunk = sorted(p for p in (store.zarr_path / "merge/depth").rglob("*") if p.is_file() and p.name != "zarr.json")[-1]
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte altered: only the checksum sees it
    chunk.write_bytes(bytes(data))
    from sparse_vggt import store as store_mod

    store_mod._FULLY_VERIFIED.clear()
    assert store.verify_unit("merge")  # quick check: sizes still match
    check = store.verify_unit("merge", full=True)
    assert not check and check.marked and "crc32" in check.reason
    chunk.write_bytes(bytes(data[:5]))
    assert "nbytes" in store.verify_unit("merge").reason
    chunk.unlink()
    assert "files" in store.verify_unit("merge").reason and not store.is_unit_complete("merge")
    assert store.complete_units("") == []


def test_damaged_stage_unit_invalidates_stage_and_later(tmp_path):
    store = _unit(tmp_path)
    for s in STAGES:
        store.stage_finished(s, {})
    assert store.stage_intact("merge")
    chunk = next(p for p in (store.zarr_path / "merge/extrinsics").rglob("*") if p.name != "zarr.json" and p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-1])
    assert not store.stage_intact("merge")
    assert [s for s in STAGES if store.is_stage_complete(s)] == list(STAGES[:5])
    kinds = [e["kind"] for e in _events(store.root)]
    assert kinds == ["unit_redone", "stages_invalidated"]
    assert "merge" not in store.zarr  # the damaged unit is gone, never read as zeros


def test_files_are_group_and_world_readable(tmp_path):
    from sparse_vggt.durable import FILE_MODE, append_event, atomic_write_bytes

    old = os.umask(0o022)
    try:
        assert FILE_MODE == 0o644  # pytest runs with the usual umask here
        import pyarrow as pa

        atomic_write_bytes(tmp_path / "a.json", b"{}")
        store = _unit(tmp_path)
        store.write_table("t", pa.table({"a": [1]}))
        append_event(store.root, {"kind": "x"})
        for p in (tmp_path / "a.json", store.table_path("t"), store.run_json, store.root / "orchestration/events.jsonl",
                  store.zarr_path / "merge/zarr.json"):
            assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))
    finally:
        os.umask(old)


def test_filesystem_without_hard_links_fails_at_start(tmp_path, monkeypatch):
    from sparse_vggt import lock
    from sparse_vggt.store import RunStoreError

    def no_link(*a, **k):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    with pytest.raises(RunStoreError, match="hard link"):
        lock.check_filesystem(tmp_path / "share")
    assert not [p for p in (tmp_path / "share").iterdir()]  # probes cleaned up


HOLDER = """
import sys, time
from sparse_vggt.lock import RunLock
RunLock(sys.argv[1], "holder").acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_writer_lock_refuses_second_writer_and_takes_over_stale(tmp_path):
    from sparse_vggt import lock

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.RunLockedError, match=f"pid {holder.pid} on host "):
            lock.RunLock(run, "second").acquire()
    finally:
        holder.kill()
        holder.wait(10)
    # the holder died (SIGKILL): its flock is gone with it, its owner record is stale and taken over
    assert lock.read_owner(run)["pid"] == holder.pid
    first = lock.RunLock(run, "after").acquire()
    again = lock.RunLock(run, "re-entrant").acquire()  # same process: re-entrant
    assert again is first and lock.read_owner(run)["pid"] == os.getpid()
    first.heartbeat()
    again.release()
    assert lock.read_owner(run)["pid"] == os.getpid()  # still held once
    first.release()
    assert lock.read_owner(run) is None

    # another host whose flock we cannot see: a fresh heartbeat refuses, a stale one is taken over
    other = {"host": "other-host", "pid": 1, "command": "run", "started": "x", "heartbeat": time.time()}
    (run / "writer.json").write_text(json.dumps(other))
    with pytest.raises(lock.RunLockedError, match="pid 1 on host other-host"):
        lock.RunLock(run, "x", stale_s=60).acquire()
    (run / "writer.json").write_text(json.dumps({**other, "heartbeat": time.time() - 61}))
    taken = lock.RunLock(run, "x", stale_s=60).acquire()
    assert lock.read_owner(run)["host"] != "other-host"
    taken.release()


def test_heartbeat_thread_refreshes_owner(tmp_path):
    from sparse_vggt import lock

    held = lock.RunLock(tmp_path / "run", "beat", heartbeat_s=0.05).acquire()
    try:
        t0 = lock.read_owner(tmp_path / "run")["heartbeat"]
        deadline = time.time() + 30
        while lock.read_owner(tmp_path / "run")["heartbeat"] == t0:
            assert time.time() < deadline, "no heartbeat"
            time.sleep(0.05)
    finally:
        held.release()


def test_damaged_descriptors_reopen_describe(tmp_path):
    """The describe stage's shared array is checksummed in its manifest: a damaged chunk reopens the stage."""
    from sparse_vggt.config import PipelineConfig

    store = RunStore.create_or_open(tmp_path / "run", PipelineConfig())
    arr = store.zarr.create_array("descriptors", shape=(8, 4), dtype="float16", chunks=(4, 4), fill_value=0)
    arr[...] = np.ones((8, 4), np.float16)
    store.mark_unit_complete("describe_chunks/0", images=8)
    for s in STAGES:
        store.stage_finished(s, {"integrity": store.array_integrity("descriptors")} if s == "describe" else {})
    assert store.stage_intact("describe")
    chunk = next(p for p in (store.zarr_path / "descriptors").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()  # would read back as zeros (the fill value)
    assert not store.stage_intact("describe")
    assert [s for s in STAGES if store.is_stage_complete(s)] == ["scan"]
    assert store.complete_units("describe_chunks") == []  # every chunk is described again
    assert [e["kind"] for e in _events(store.root)] == ["unit_redone", "stages_invalidated"]


def test_stage_commands_verify_what_they_read(tmp_path):
    """A stage command (e.g. `partition`) reading a damaged graph refuses with what to run, and records it."""
    from sparse_vggt.config import PipelineConfig
    from sparse_vggt.store import RunStoreError

    store = RunStore.create_or_open(tmp_path / "run", PipelineConfig())
    g = store.group("graph")
    store.write_array(g, "indptr", np.arange(5, dtype=np.int64))
    store.mark_unit_complete("graph")
    for s in STAGES[:3]:
        store.stage_finished(s, {})
    store.require_stage("graph", "partition")  # intact: no error
    chunk = next(p for p in (store.zarr_path / "graph/indptr").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    with pytest.raises(RunStoreError, match="failed verification.*sparse-vggt graph"):
        store.require_stage("graph", "partition")
    assert not store.is_stage_complete("graph")
    assert [e["kind"] for e in _events(store.root)] == ["unit_redone", "stages_invalidated"]
