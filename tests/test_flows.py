"""The Prefect flow end to end (prefect_test_harness, random tiny weights on the bundled photos).

Covers what needs no farm: every export file written, a re-run does no stage
work, SIGKILL during the cluster stage resumes without recomputing finished clusters, injected OOM splits a
cluster, one model at a time on the accelerator tag, parameter validation before any work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sparse_vggt.store import RunStore

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "sparse_vggt" / "data" / "sacre_coeur" / "images"


@pytest.fixture(scope="module")
def harness():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def _cfg(**overrides):
    from sparse_vggt.demo import demo_config

    cfg = demo_config()
    # these tests patch sparse_vggt.reconstruct in this process: run clusters here, not in the child worker
    # (the child-process path is covered with real processes in tests/test_faults.py)
    cfg.orchestration.cluster_process = False
    for k, v in overrides.items():
        cfg.set(k.replace("__", "."), v)
    return cfg


def _export_files(run: Path) -> list[Path]:
    export = run / "export"
    comps = sorted(p for p in (export / "sparse").iterdir() if p.is_dir())
    assert comps, "no COLMAP component written"
    files = [export / "points.ply", export / "scene.glb", export / "report.md"]
    for c in comps:
        files += [c / "cameras.bin", c / "images.bin", c / "points3D.bin"]
    return files


def _markers(run: Path) -> tuple[dict[str, str], dict[str, str]]:
    store = RunStore.open(run)
    stages = {k: v.get("finished") for k, v in store.meta()["stages"].items()}
    clusters = {c: store.zarr[f"clusters/{c}"].attrs["completed_at"] for c in store.complete_units("clusters")}
    return stages, clusters


def _forbid(monkeypatch, what: str):
    def boom(*a, **k):
        raise AssertionError(f"{what} ran on a finished run")

    return boom


def test_full_flow_then_rerun_does_no_work(harness, tmp_path, monkeypatch):
    import sparse_vggt.reconstruct as recon
    from flows.reconstruct import run_pipeline

    intervals: list[tuple[float, float]] = []
    lock = threading.Lock()
    real = recon.reconstruct_cluster

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            with lock:
                intervals.append((t0, time.perf_counter()))

    monkeypatch.setattr(recon, "reconstruct_cluster", timed)
    run = tmp_path / "run"
    report = run_pipeline(PHOTOS, run, _cfg())
    for f in _export_files(run):
        assert f.is_file() and f.stat().st_size > 0, f
    # every export file, except the images/ folder (one entry per photo) which is named once
    assert sorted(report["outputs"]["files"]) == sorted(
        ["images/"] + [str(f.relative_to(run / "export")) for f in (run / "export").rglob("*")
                       if f.is_file() and f.relative_to(run / "export").parts[0] != "images"])
    assert len(list((run / "export" / "images").iterdir())) == 10  # the demo's photos
    stages, clusters = _markers(run)
    assert all(stages.get(s) for s in ("scan", "describe", "graph", "partition", "reconstruct", "merge", "export"))
    assert len(clusters) == report["clusters"] >= 2
    assert report["stages_executed"]["reconstruct-cluster"] == report["clusters"]
    assert report["stages_executed"]["describe-chunk"] == 3  # 10 photos, chunk_size 4: mapped over 3 chunks
    assert report["random_weights"] == ["describe", "reconstruct"]
    # the accelerator tag limit: never two models at once, although the cluster tasks are submitted together
    intervals.sort()
    assert len(intervals) == report["clusters"]
    assert all(b[0] >= a[1] for a, b in zip(intervals, intervals[1:])), intervals
    assert json.loads((run / "orchestration" / "report.json").read_text())["clusters"] == report["clusters"]

    # second run: no stage work at all (every heavy library entry point would raise)
    mtimes = {f: f.stat().st_mtime_ns for f in _export_files(run)}
    import sparse_vggt.graph.stage as cov
    import sparse_vggt.describe as desc
    import sparse_vggt.export as exp
    import sparse_vggt.scan as scan_mod
    import sparse_vggt.merge as merge
    import sparse_vggt.partition as part

    for mod, name in ((recon, "reconstruct_cluster"), (recon, "load_model"), (desc, "_describer"),
                      (cov, "knn"), (part.stage, "partition_graph"), (part, "split_cluster"), (merge, "run"),
                      (exp, "run"), (scan_mod, "_read_and_inspect")):
        monkeypatch.setattr(mod, name, _forbid(monkeypatch, f"{mod.__name__}.{name}"))
    again = run_pipeline(PHOTOS, run, _cfg())
    # scan is never Prefect-cached (its input is the photo folder); it only re-lists the folder and returns
    assert again["stages_executed"] == {"scan": 1}, again["stages_executed"]
    assert again["stages_already_complete"] == sorted(["describe", "graph", "partition", "reconstruct", "merge",
                                                       "export"])
    # --force with an unchanged config invalidates nothing (--force invalidates the stages whose
    # result-affecting fields changed, and every later one), so every stage is skipped on its verified marker;
    # there is no Prefect cache any more (the heavy entry points above still raise if called)
    forced = run_pipeline(PHOTOS, run, _cfg(), force=True)
    assert forced["stages_executed"] == {"scan": 1}, forced["stages_executed"]
    assert forced["stages_cached"] == {}
    assert forced["stages_already_complete"] == sorted(["describe", "graph", "partition", "reconstruct", "merge",
                                                        "export"])
    assert _markers(run) == (stages, clusters)
    assert {f: f.stat().st_mtime_ns for f in _export_files(run)} == mtimes


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import sparse_vggt.reconstruct as recon
    from flows.reconstruct import run_pipeline
    from sparse_vggt.demo import demo_config

    real, calls = recon.reconstruct_cluster, []
    ready = Path(sys.argv[2])

    def hang_on_third(run_dir, cid, cfg):
        calls.append(cid)
        if len(calls) == 3:
            ready.write_text(str(cid))
            time.sleep(600)  # killed here, mid cluster stage
        return real(run_dir, cid, cfg)

    recon.reconstruct_cluster = hang_on_third
    cfg = demo_config()
    cfg.orchestration.cluster_process = False  # the patch above lives in this process
    run_pipeline(Path(sys.argv[3]), Path(sys.argv[1]), cfg)
""")


def test_sigkill_during_cluster_stage_resumes(harness, tmp_path, monkeypatch):
    import sparse_vggt.reconstruct as recon
    from flows.reconstruct import run_pipeline

    run, ready, script = tmp_path / "run", tmp_path / "ready", tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PREFECT_API_URL=harness, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(run), str(ready), str(PHOTOS)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not ready.exists():
            assert proc.poll() is None, "the flow process ended before reaching the cluster stage"
            assert time.time() < deadline, "timed out waiting for the cluster stage"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    store = RunStore.open(run)
    assert not store.is_stage_complete("reconstruct")
    _, before = _markers(run)
    all_ids = {str(c) for c in store.read_table("clusters", columns=["cluster_id"]).column(0).to_pylist()}
    assert len(before) == 2 and set(before) < all_ids

    computed: list[str] = []
    real = recon.reconstruct_cluster

    def counting(run_dir, cid, cfg):
        out = real(run_dir, cid, cfg)
        if not out["skipped"]:
            computed.append(str(cid))
        return out

    monkeypatch.setattr(recon, "reconstruct_cluster", counting)
    report = run_pipeline(PHOTOS, run, _cfg())
    _, after = _markers(run)
    assert sorted(computed) == sorted(all_ids - set(before))  # finished clusters were not recomputed
    assert all(after[c] == before[c] for c in before)
    assert set(after) == all_ids
    for f in _export_files(run):
        assert f.is_file() and f.stat().st_size > 0
    assert report["stages_executed"].get("describe-chunk") is None  # describe finished before the kill


def test_injected_oom_splits_cluster_and_completes(harness, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import sparse_vggt.reconstruct as recon
    from flows.reconstruct import run_pipeline
    from sparse_vggt.scheduler import ClusterFailures
    from sparse_vggt.durable import read_events

    real = recon.reconstruct_cluster
    run = tmp_path / "run"
    ooms: list[int] = []

    def always_oom_on_0(run_dir, cid, cfg):
        if int(cid) == 0:
            ooms.append(cid)
            raise recon.ClusterOutOfMemory(cid, "MPS backend out of memory (injected)")
        return real(run_dir, cid, cfg)

    # 1) splitting disabled: the failure is recorded and the flow fails with a message saying what to do
    monkeypatch.setattr(recon, "reconstruct_cluster", always_oom_on_0)
    with pytest.raises(ClusterFailures, match="re-run"):
        run_pipeline(PHOTOS, run, _cfg(orchestration__max_oom_splits=0, orchestration__retries=2,
                                      orchestration__retry_delay_s=0))
    assert ooms == [0]  # OOM is not retried as a transient error
    report = json.loads((run / "orchestration" / "report.json").read_text())
    assert [f["cluster_id"] for f in report["failures"]] == [0]
    assert "out of memory" in report["failures"][0]["reason"]

    # 2) splitting enabled (runtime field: same run directory): cluster 0 is split once, the halves succeed
    def oom_once(run_dir, cid, cfg):
        if int(cid) == 0 and len(ooms) < 2:
            ooms.append(cid)
            raise recon.ClusterOutOfMemory(cid, "CUDA out of memory (injected)")
        return real(run_dir, cid, cfg)

    monkeypatch.setattr(recon, "reconstruct_cluster", oom_once)
    old_ids = set(pq.read_table(run / "tables" / "clusters.parquet").column("cluster_id").to_pylist())
    report = run_pipeline(PHOTOS, run, _cfg())
    new_ids = set(pq.read_table(run / "tables" / "clusters.parquet").column("cluster_id").to_pylist())
    assert report["oom_splits"] == [{"cluster": 0, "into": [max(old_ids) + 1, max(old_ids) + 2]}]
    assert new_ids == (old_ids - {0}) | {max(old_ids) + 1, max(old_ids) + 2}
    assert {c for c in RunStore.open(run).complete_units("clusters")} == {str(c) for c in new_ids}
    assert [e["kind"] for e in read_events(run)] == ["cluster_failed", "oom_split"]
    for f in _export_files(run):
        assert f.is_file() and f.stat().st_size > 0


def test_parameters_validated_before_any_work(tmp_path):
    from flows.reconstruct import run_pipeline
    from sparse_vggt.demo import demo_config
    from sparse_vggt.scheduler import FlowParameterError

    cfg = demo_config()
    cfg.orchestration.dispatch = "farm"
    cfg.reconstruct.allow_random_weights = False
    with pytest.raises(FlowParameterError) as err:
        run_pipeline(tmp_path / "missing", tmp_path / "run", cfg)
    msg = str(err.value)
    assert "is not a folder" in msg and "dispatch" in msg and "allow_random_weights" in msg
    assert not (tmp_path / "run").exists()


def test_register_deployments_dry_run():
    from flows.deploy import register_deployments

    out = register_deployments(work_pool="mac-mini", apply=False)
    deps = {d["deployment"]: d for d in out["deployments"]}
    assert deps["reconstruct-cluster/mac-mini"]["pool"] == "mac-mini"
    assert deps["describe-chunks/mac-mini"]["pool"] == "mac-mini"
    assert not deps["reconstruct/farm"]["schedule"] and deps["reconstruct/farm"]["pool"] != "mac-mini"
    assert deps["reconstruct-scheduled/nightly"]["schedule"] and deps["reconstruct-scheduled/nightly"]["pool"] != "mac-mini"
    assert out["applied"] is False
