"""Farm dispatch against a real Prefect server: `prefect server start` on 127.0.0.1 (temporary PREFECT_HOME,
SQLite, free port), a process work pool, two `prefect worker` processes, the main flow in `pool` mode.

Asserts that both workers executed cluster flow runs and that the result equals `local` mode's. Every process the
test starts (server, workers and the flow-run processes the workers spawn) is killed at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from sparse_vggt.store import RunStore

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "sparse_vggt" / "data" / "sacre_coeur" / "images"
POOL = "it-pool"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {log.read_text()[-3000:]}")
            time.sleep(0.3)
    raise TimeoutError(f"prefect server not healthy after {timeout} s: {log.read_text()[-3000:]}")


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM then SIGKILL every started process group and every descendant (flow-run processes)."""
    family = []
    for p in procs:
        try:
            family += psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(15)
    for c in family:
        try:
            c.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


def _config(dispatch: str):
    from sparse_vggt.demo import demo_config

    cfg = demo_config(["partition.max_cluster_frames=7"])
    cfg.orchestration.dispatch = dispatch
    cfg.orchestration.cluster_deployment = f"reconstruct-cluster/{POOL}"
    cfg.orchestration.describe_deployment = f"describe-chunks/{POOL}"
    cfg.orchestration.work_pool = POOL
    cfg.orchestration.describe_chunks_per_run = 2
    # clusters_per_run stays auto: a small run (a few clusters, bound 3) gets one cluster per flow run
    cfg.orchestration.max_in_flight = 3  # below the clusters' count: the bound is exercised
    cfg.orchestration.resident_idle_s = 20
    cfg.orchestration.poll_interval_s = 0.5
    return cfg


def _assert_same_output(a: Path, b: Path) -> None:
    ta, tb = pq.read_table(a / "tables" / "clusters.parquet"), pq.read_table(b / "tables" / "clusters.parquet")
    assert ta.equals(tb)
    sa, sb = RunStore.open(a), RunStore.open(b)
    ids = sa.complete_units("clusters")
    assert ids == sb.complete_units("clusters") and ids
    for c in ids:
        for name in ("extrinsics", "intrinsics", "depth", "depth_conf", "image_ids", "depth_to_image"):
            x, y = np.asarray(sa.zarr[f"clusters/{c}/{name}"][...]), np.asarray(sb.zarr[f"clusters/{c}/{name}"][...])
            np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=1e-4, atol=1e-5,
                                       err_msg=f"cluster {c} {name}")
    np.testing.assert_allclose(np.asarray(sa.zarr["merge/cluster_sim3"][...]),
                               np.asarray(sb.zarr["merge/cluster_sim3"][...]), rtol=1e-4, atol=1e-5)
    fa = sorted(str(p.relative_to(a / "export")) for p in (a / "export").rglob("*") if p.is_file())
    fb = sorted(str(p.relative_to(b / "export")) for p in (b / "export").rglob("*") if p.is_file())
    assert fa == fb and "points.ply" in fa


def test_pool_dispatch_two_workers_equals_local(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path / "prefect_home"
    home.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5", PYTHONPATH=str(REPO))
    env.pop("PREFECT_PROFILES_PATH", None)
    env["SPARSE_VGGT_RESIDENT_DIR"] = str(tmp_path / "resident")
    procs: list[subprocess.Popen] = []
    try:
        log = home / "server.log"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--no-ui", "--analytics-off", "--no-scheduler", "--no-late-runs"],
            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True))
        _wait_healthy(url, procs[0], log)
        for name in ("worker-a", "worker-b"):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
                 "--limit", "1", "--name", name],
                env=dict(env, SPARSE_VGGT_WORKER_NAME=name), stdout=open(home / f"{name}.log", "w"),
                stderr=subprocess.STDOUT, start_new_session=True))
        with temporary_settings({PREFECT_API_URL: url}):
            from flows.deploy import register_deployments
            from flows.reconstruct import run_pipeline

            reg = register_deployments(work_pool=POOL, apply=True)
            assert {d["deployment"] for d in reg["deployments"]} == {"reconstruct/farm", "reconstruct-scheduled/nightly",
                                                                     f"reconstruct-cluster/{POOL}",
                                                                     f"describe-chunks/{POOL}"}
            local = run_pipeline(PHOTOS, tmp_path / "local", _config("local"))
            pool = run_pipeline(PHOTOS, tmp_path / "pool", _config("pool"))
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()  # ship queued logs while the server is still up (else exit waits on retries)
        assert pool["clusters"] == local["clusters"] >= 2
        assert pool["stages_executed"]["dispatch-cluster"] == pool["clusters"]
        assert "reconstruct-cluster" not in pool["stages_executed"]  # no cluster ran in the main flow's process
        records = [__import__("json").loads(p.read_text())
                   for p in sorted((tmp_path / "pool" / "orchestration" / "clusters").glob("*.json"))]
        assert len(records) == pool["clusters"]
        assert {r["worker"] for r in records} == {"worker-a", "worker-b"}, records
        assert all(r["pid"] != os.getpid() and not r["skipped"] for r in records)
        _assert_same_output(tmp_path / "local", tmp_path / "pool")
        # describe ran on the workers (not in the main flow), and the descriptors equal local mode's
        assert pool["stages_executed"].get("dispatch-describe", 0) >= 2
        assert "describe-chunk" not in pool["stages_executed"]
        desc = [__import__("json").loads(p.read_text())
                for p in sorted((tmp_path / "pool" / "orchestration" / "describe").glob("*.json"))]
        assert desc and {r["worker"] for r in desc} <= {"worker-a", "worker-b"} and all(r["ok"] for r in desc)
        np.testing.assert_array_equal(np.asarray(RunStore.open(tmp_path / "pool").zarr["descriptors"][...]),
                                      np.asarray(RunStore.open(tmp_path / "local").zarr["descriptors"][...]))
        # each model loaded at most once per worker in this run: one resident process per worker, reused
        farm = pool["farm"]
        for kind in ("describe", "clusters"):
            for w in farm[kind]["workers"]:
                assert len(w["loads"]) == 1, w  # one resident process (host/pid) per worker
        per_worker: dict = {}
        for r in desc + records:
            per_worker.setdefault(r["worker"], set()).add(r["pid"])
            for model, n in r["loads"].items():
                assert n <= 1, r
        assert all(len(pids) == 1 for pids in per_worker.values()), per_worker
        # bounded dispatch: never more flow runs in flight than the limit
        for kind in ("describe", "clusters"):
            d = farm[kind]["dispatch"]
            assert d["limit"] == 3 and 1 <= d["max_in_flight"] <= 3, d
        assert farm["clusters"]["dispatch"]["max_in_flight"] == 3  # more clusters than the bound
        assert (farm["clusters"]["dispatch"]["clusters_per_run"], farm["clusters"]["dispatch"]["clusters_per_run_mode"]
                ) == (1, "auto")
        # the healthy main run never went Crashed; no cluster flow run did either
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
        from prefect.client.schemas.objects import StateType

        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            crashed = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.CRASHED, StateType.FAILED]))))
            assert len(client.read_flow_runs()) >= 2 + pool["clusters"] + 2  # the filter sees this server's runs
            # monitoring artifacts: per-worker throughput, ETA, per-cluster peak memory
            keys = {a.key for a in client.read_artifacts() if a.key}
            for what in ("farm-clusters-workers", "farm-clusters-eta", "farm-cluster-memory", "farm-describe-workers"):
                assert f"pool-{what}" in keys, sorted(keys)
            mem = [a for a in client.read_artifacts() if a.key == "pool-farm-cluster-memory"]
            assert mem and "peak_rss_mb" in str(mem[-1].data)
            assert not crashed, [(r.name, r.state.message) for r in crashed]
        # the worker processes are still alive (they did not crash on the way)
        assert all(p.poll() is None for p in procs)
    finally:
        _stop(procs)
    assert all(p.poll() is not None for p in procs)
    _stop_resident(tmp_path / "resident")


def _stop_resident(folder: Path) -> None:
    """The resident model processes (own sessions, exit when idle): stop the ones this test started now."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "sparse_vggt.resident" in cmd and any(str(folder) in c for c in cmd):
            proc.kill()
