"""Bounded pool dispatch against an in-memory stand-in for the Prefect API: the bound on in-flight
runs, one state read per poll for all runs, and a run that never starts is cancelled at its timeout and
resubmitted instead of hanging the main flow. The real server is exercised in test_pool_integration.py."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

from prefect.states import Completed, Crashed, Failed, Pending, Running, Scheduled

from tasks.dispatch import PoolDispatcher, PoolUnit, classify, in_flight_limit


class FakeApi:
    """Runs go Scheduled -> Completed after ``steps`` polls, except names listed in ``never`` (never start)."""

    def __init__(self, steps: int = 2, never: set[str] = frozenset(), crash_once: set[str] = frozenset()):
        self.steps, self.never, self.crash_once = steps, set(never), set(crash_once)
        self.runs: dict = {}
        self.reads = 0
        self.cancelled: list[str] = []

    def read_deployment_by_name(self, name):
        return SimpleNamespace(id=name)

    def create_flow_run_from_deployment(self, dep, parameters, name, tags):
        fr = SimpleNamespace(id=uuid.uuid4(), name=name, state=Scheduled(), age=0)
        self.runs[fr.id] = fr
        return fr

    def read_flow_runs(self, flow_run_filter, limit):
        self.reads += 1
        ids = flow_run_filter.id.any_
        out = []
        for i in ids:
            fr = self.runs[i]
            fr.age += 1
            base = fr.name.split("-try")[0]
            if base in self.never and "-try" not in fr.name:
                fr.state = Scheduled()
            elif fr.age >= self.steps:
                if base in self.crash_once and "-try" not in fr.name:
                    fr.state = Crashed(message="worker went away")
                else:
                    fr.state = Completed()
            else:
                fr.state = Pending()
            out.append(fr)
        return out

    def set_flow_run_state(self, fid, state, force=False):
        self.cancelled.append(self.runs[fid].name)
        self.runs[fid].state = state


def _units(n):
    return [PoolUnit(i, "reconstruct-cluster/p", {"cluster_id": i}, f"c{i}", []) for i in range(n)]


def test_in_flight_bounded_and_one_read_per_poll():
    api = FakeApi(steps=3)
    d = PoolDispatcher(api, limit=3, poll_interval=0.001, timeout_s=60, retries=0)
    done = list(d.run(_units(10)))
    assert sorted(u.key for u, *_ in done) == list(range(10))
    assert all(outcome == "ok" for _, outcome, _, _ in done)
    assert d.max_in_flight == 3 and d.submitted == 10
    assert api.reads == d.polls  # one API read per poll for every in-flight run, not one per run


def test_never_started_run_times_out_and_is_resubmitted():
    api = FakeApi(steps=1, never={"c2"})
    d = PoolDispatcher(api, limit=2, poll_interval=0.01, timeout_s=60, retries=1, start_timeout_s=0.05)
    done = {u.key: (outcome, msg) for u, outcome, msg, _ in d.run(_units(4))}
    assert done[2][0] == "ok" and api.cancelled == ["c2"]
    assert d.submitted == 5


def test_timeout_without_retries_is_a_failure_not_a_hang():
    api = FakeApi(steps=1, never={"c0"})
    d = PoolDispatcher(api, limit=1, poll_interval=0.01, timeout_s=60, retries=0, start_timeout_s=0.05)
    done = {u.key: outcome for u, outcome, _, _ in d.run(_units(2))}
    assert done == {0: "failed", 1: "ok"}


def test_crashed_run_is_retried():
    api = FakeApi(steps=1, crash_once={"c1"})
    d = PoolDispatcher(api, limit=4, poll_interval=0.001, timeout_s=60, retries=2)
    done = {u.key: outcome for u, outcome, _, _ in d.run(_units(3))}
    assert done == {0: "ok", 1: "ok", 2: "ok"} and d.submitted == 4


def test_limit_defaults_and_classification():
    assert in_flight_limit(0, 8) == 16 and in_flight_limit(0, 0) == 1 and in_flight_limit(5, 8) == 5
    assert classify(Completed())[0] == "ok"
    assert classify(Crashed(message="Flow run infrastructure exited with non-zero status code -9"))[0] == "oom"
    assert classify(None, timed_out=True)[0] == "retry"
    assert classify(Failed(message="SPARSE_VGGT_TRANSIENT: resident process ended"))[0] == "retry"
    assert classify(Failed(message="ValueError: bad"))[0] == "failed"
    assert classify(Failed(message="CLUSTER_OUT_OF_MEMORY: MPS backend out of memory")) == (
        "oom", "MPS backend out of memory")
    assert classify(Crashed(message="worker heartbeat missed"))[0] == "retry"  # a dead worker: resubmitted


def test_running_run_past_its_timeout_is_cancelled():
    api = FakeApi(steps=10**6)  # Pending forever after the first poll: never completes
    api.read = api.read_flow_runs

    def running(flow_run_filter, limit):
        out = api.read(flow_run_filter, limit)
        for fr in out:
            if not fr.state.is_final():
                fr.state = Running()
        return out

    api.read_flow_runs = running
    d = PoolDispatcher(api, limit=1, poll_interval=0.01, timeout_s=0.05, retries=0, start_timeout_s=60)
    assert [o for _, o, _, _ in d.run(_units(1))] == ["failed"] and api.cancelled == ["c0"]


def test_auto_cluster_batch_size():
    from flows.pool import cluster_batch_size

    # small runs: one cluster per flow run, so no worker idles behind another's batch at the end of the stage
    assert cluster_batch_size(0, 6, in_flight_limit(0, 2)) == 1
    assert cluster_batch_size(0, 1, 1) == 1 and cluster_batch_size(0, 0, 4) == 1
    # large runs: capped at 16 (356 clusters, 4 in flight: 356 / 16 rounds would be 23)
    assert cluster_batch_size(0, 356, 4) == 16
    # in between: ceil(pending / (limit x 4)), so each slot gets about 4 batches
    assert cluster_batch_size(0, 100, 4) == 7 and cluster_batch_size(0, 17, 4) == 2
    assert cluster_batch_size(0, 160, 16) == 3 and cluster_batch_size(0, 100, 4, rounds=2, cap=8) == 8
    # an explicit size is kept whatever the run's size
    assert cluster_batch_size(8, 6, 4) == 8 and cluster_batch_size(1, 356, 4) == 1


def test_clusters_per_run_defaults_to_auto():
    from sparse_vggt.config import PipelineConfig

    assert PipelineConfig().orchestration.clusters_per_run == 0
