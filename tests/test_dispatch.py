"""Pool dispatch of one cluster: a dead worker (crashed flow run) is dispatched again; OOM and failures are not."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prefect import flow
from prefect.states import Completed, Crashed, Failed
from prefect.testing.utilities import prefect_test_harness

import tasks.dispatch as dispatch
from sparse_vggt.config import PipelineConfig
from sparse_vggt.reconstruct import ClusterOutOfMemory
from tasks.stages import retry_options


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _fake_runs(monkeypatch, states):
    calls = []

    def fake_run_deployment(name, parameters, **kwargs):
        calls.append((name, parameters["cluster_id"]))
        return SimpleNamespace(state=states[len(calls) - 1], name=f"cluster-run-{len(calls)}", id=len(calls))

    monkeypatch.setattr(dispatch, "run_deployment", fake_run_deployment)
    return calls


def _dispatch_in_flow(retries: int):
    cfg = PipelineConfig()
    cfg.orchestration.retries, cfg.orchestration.retry_delay_s = retries, 0.0
    cfgd = cfg.to_dict()

    @flow
    def parent():
        t = dispatch.dispatch_cluster_task.with_options(**retry_options(cfgd))
        return t("/shared/run", cfgd, 7, "reconstruct-cluster/mac-mini", "test", poll_interval=0.01)

    return parent


def test_crashed_worker_run_is_dispatched_again(harness, monkeypatch):
    calls = _fake_runs(monkeypatch, [Crashed(message="worker heartbeat missed"), Completed()])
    info = _dispatch_in_flow(retries=2)()
    assert calls == [("reconstruct-cluster/mac-mini", 7)] * 2  # the second dispatch picked the cluster up
    assert info["state"] == "Completed" and info["flow_run"] == "cluster-run-2"


def test_crash_without_retries_left_fails_and_oom_is_not_retried(harness, monkeypatch):
    calls = _fake_runs(monkeypatch, [Crashed(message="gone"), Crashed(message="gone again")])
    with pytest.raises(dispatch.TransientError, match="crashed"):
        _dispatch_in_flow(retries=1)()
    assert len(calls) == 2
    calls = _fake_runs(monkeypatch, [Failed(message=f"{dispatch.OOM_MARK}: MPS backend out of memory")])
    with pytest.raises(ClusterOutOfMemory):
        _dispatch_in_flow(retries=3)()
    assert len(calls) == 1  # OOM goes to the split logic, never to retries
    calls = _fake_runs(monkeypatch, [Failed(message="bad checkpoint")])
    with pytest.raises(RuntimeError, match="ended Failed"):
        _dispatch_in_flow(retries=3)()
    assert len(calls) == 1
