"""A farm worker's resident model process and local mode's cluster child, faced with real faults (the
SPARSE_VGGT_INJECT_FAULTS hook: the process SIGKILLs itself, or hangs): a SIGKILL answers as out of memory (the head
splits the cluster), an orderly death is retried, and a hung process is killed by the watchdog and replaced."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from sparse_vggt import resident
from sparse_vggt.cluster_worker import ClusterProcessHung, ClusterWorker, unit_time_limit
from sparse_vggt.config import PipelineConfig
from sparse_vggt.reconstruct import ClusterOutOfMemory, ReconstructError


@pytest.fixture()
def faults(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_VGGT_RESIDENT_DIR", str(tmp_path / "resident"))
    monkeypatch.setenv("SPARSE_VGGT_INJECT_FAULTS", "sigkill@3,hang@4")
    yield tmp_path / "no-run"
    for proc in resident._STARTED.values():  # the servers this test started (own sessions)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    resident._STARTED.clear()


def _cfg(timeout: float = 0.0) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.describe.model = cfg.reconstruct.model = "random"
    cfg.describe.allow_random_weights = cfg.reconstruct.allow_random_weights = True
    cfg.orchestration.unit_timeout_s = timeout
    return cfg


def _pid(answer: dict) -> int:
    return int(answer["pid"])


def test_unit_time_limit_is_derived_from_frames_unless_set():
    cfg = PipelineConfig()
    assert unit_time_limit(cfg, 100) == 600 + 100 * cfg.orchestration.unit_timeout_per_frame_s
    assert unit_time_limit(cfg, 0) == unit_time_limit(cfg, 1)
    cfg.orchestration.unit_timeout_s = 5
    assert unit_time_limit(cfg, 100) == 5


def test_resident_sigkill_answers_out_of_memory_and_a_new_process_takes_over(faults):
    run_dir = faults
    cfg = _cfg()
    # a unit on a missing run fails inside the server: an error answer, the server lives on
    first = resident.call("cluster", run_dir, cfg, 1, idle_s=60)
    assert "error" in first and not first["oom"]
    pid = _pid(first)
    answer = resident.call("cluster", run_dir, cfg, 3, idle_s=60)  # the server SIGKILLs itself
    assert answer["oom"] and "SIGKILL" in answer["message"] and answer["pid"] == pid
    with pytest.raises(ClusterOutOfMemory, match="SIGKILL"):
        resident.raise_for(answer, "cluster", 3)
    # the next unit starts a fresh server; a server this process did not start is judged by its exit note
    after = resident.call("cluster", run_dir, cfg, 1, idle_s=60)
    assert _pid(after) != pid
    resident._STARTED.clear()
    answer = resident.call("cluster", run_dir, cfg, 3, idle_s=60)
    assert answer["oom"] and answer["pid"] == _pid(after)


def test_resident_stopped_in_order_is_retried_not_split(faults):
    run_dir = faults
    cfg = _cfg()
    pid = _pid(resident.call("cluster", run_dir, cfg, 1, idle_s=60))
    resident._STARTED.clear()  # judged by the exit note, as from a later flow run on the worker
    threading.Timer(1.0, os.kill, (pid, signal.SIGTERM)).start()
    with pytest.raises(resident.ResidentDied, match="signal 15") as info:
        resident.call("cluster", run_dir, cfg, 4, idle_s=60)  # hangs until the SIGTERM
    assert not isinstance(info.value, resident.ResidentHung)


def test_hung_resident_is_killed_by_the_watchdog_and_replaced(faults):
    run_dir = faults
    cfg = _cfg()  # the derived limit for the units that start a process (imports take seconds on a busy machine)
    pid = _pid(resident.call("cluster", run_dir, cfg, 1, idle_s=60))
    t0 = time.monotonic()
    with pytest.raises(resident.ResidentHung, match="did not answer within 2 s"):
        resident.call("cluster", run_dir, _cfg(timeout=2.0), 4, idle_s=60)
    assert time.monotonic() - t0 < 30
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed (and reaped)
    again = resident.call("cluster", run_dir, cfg, 1, idle_s=60)
    assert _pid(again) != pid and "error" in again  # a new server answers


def test_local_cluster_child_hang_is_killed_and_the_next_cluster_gets_a_new_child(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_VGGT_INJECT_FAULTS", "hang@4")
    worker = ClusterWorker()
    try:
        with pytest.raises(ReconstructError):  # the child starts (derived limit) and answers
            worker.run(tmp_path / "no-run", 1, _cfg())
        first = worker.pid
        with pytest.raises(ClusterProcessHung, match="within 2 s"):
            worker.run(tmp_path / "no-run", 4, _cfg(timeout=2.0))
        assert isinstance(ClusterProcessHung("x"), OSError)  # transient: the task's retries take it
        with pytest.raises(ReconstructError):
            worker.run(tmp_path / "no-run", 1, _cfg())
        assert worker.pid != first and worker.started == 2
    finally:
        worker.close()


def test_cluster_flow_run_reports_a_sigkilled_resident_as_out_of_memory(faults, tmp_path):
    """The worker-side cluster flow turns the resident's SIGKILL into a Failed state with the OOM mark and the
    cluster's reason, which the head's classifier reads as "oom" (split), not "retry"."""
    import json

    from prefect.testing.utilities import prefect_test_harness

    from flows.reconstruct import reconstruct_cluster_flow
    from tasks.dispatch import OOM_MARK, classify

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")  # visible to the worker; the fault fires before any store read
    with prefect_test_harness(server_startup_timeout=120):
        state = reconstruct_cluster_flow(str(run_dir), 3, _cfg().to_dict(), batch=[3], return_state=True)
    assert state.is_failed() and OOM_MARK in state.message
    outcome, message = classify(state)
    assert outcome == "oom" and "SIGKILL" in json.loads(message)["3"]
    record = json.loads((run_dir / "orchestration" / "clusters" / "3.json").read_text())
    assert record["ok"] is False and record["pid"]
