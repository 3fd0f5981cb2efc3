"""Farm dispatch (``orchestration.dispatch = "pool"``): units of work (cluster batches, describe chunks) as flow
runs on a work pool, a bounded number in flight, polled by one loop, and each finished run's state classified
(done, out of memory -> split, transient -> resubmit, failed)."""

from __future__ import annotations

import re
import time
from typing import Any

_KILLED = re.compile(r"(status code|exit code|exited with code) (-9|137)\b|SIGKILL", re.IGNORECASE)
OOM_MARK = "CLUSTER_OUT_OF_MEMORY"  # prefix of the failure message of a cluster flow run that ran out of memory
TRANSIENT_MARK = "SPARSE_VGGT_TRANSIENT"  # prefix of a failure worth resubmitting (the resident process died)


class PoolUnit:
    """One flow run to dispatch: ``key`` (a cluster id or a describe unit index) and its parameters."""

    def __init__(self, key: Any, deployment: str, parameters: dict[str, Any], name: str, tags: list[str]) -> None:
        self.key, self.deployment, self.parameters, self.name, self.tags = key, deployment, parameters, name, tags
        self.attempts = 0


def online_workers(client: Any, work_pool: str) -> int:
    """Workers of ``work_pool`` the server sees ONLINE now (0 if the pool does not exist)."""
    try:
        workers = client.read_workers_for_work_pool(work_pool)
    except Exception:  # noqa: BLE001 - a missing pool: the bound falls back to its minimum
        return 0
    return sum(1 for w in workers if str(getattr(w, "status", "")).upper().endswith("ONLINE"))


def in_flight_limit(configured: int, online: int) -> int:
    """``orchestration.max_in_flight``, or 2 per online worker when 0; never below 1."""
    return max(1, int(configured)) if configured and configured > 0 else max(1, 2 * int(online))


def classify(state: Any, timed_out: bool = False) -> tuple[str, str]:
    """A finished flow run's state -> ("ok" | "oom" | "retry" | "failed", message)."""
    if timed_out:
        return "retry", "timed out (cancelled)"
    message = (getattr(state, "message", "") or "") if state is not None else ""
    if state is not None and state.is_completed():
        return "ok", message
    if OOM_MARK in message:
        return "oom", message.split(OOM_MARK, 1)[1].strip(" :")
    if state is not None and state.is_crashed() and _KILLED.search(message):
        return "oom", f"killed by the OS ({message})"
    if TRANSIENT_MARK in message:
        return "retry", message.split(TRANSIENT_MARK, 1)[1].strip(" :")
    if state is not None and (state.is_crashed() or state.is_cancelled()):
        return "retry", f"{state.name}: {message}"
    return "failed", f"{state.name if state is not None else 'no state'}: {message}"


class PoolDispatcher:
    """Submit flow runs to a work pool keeping at most ``limit`` in flight, polled by ONE loop.

    Every ``poll_interval`` seconds a single API call reads the states of all in-flight runs (not one thread and
    one request per run). Two clocks per run: ``start_timeout_s`` from submission until a worker takes it
    (Pending or Running; a run no worker takes), then ``timeout_s`` (a stuck run, or one whose worker died and
    left it Pending or Running); queueing behind the bound's other runs does not eat into a run's own time.
    Past either clock the run is cancelled and resubmitted while ``retries`` allow, else reported failed; crashed
    and cancelled runs are resubmitted the same way. The finished-unit markers on shared storage make a
    resubmitted unit that had in fact completed a no-op. Yields ``(unit, outcome, message, flow_run)``.
    """

    def __init__(self, client: Any, limit: int, poll_interval: float, timeout_s: float, retries: int,
                 logger: Any = None, start_timeout_s: float | None = None) -> None:
        self.client, self.limit = client, max(1, int(limit))
        self.poll_interval, self.timeout_s, self.retries = float(poll_interval), float(timeout_s), int(retries)
        self.start_timeout_s = float(start_timeout_s if start_timeout_s is not None else timeout_s)
        self.logger = logger
        self.max_in_flight = 0
        self.submitted = 0
        self.polls = 0
        self._deployments: dict[str, Any] = {}

    def _deployment_id(self, name: str) -> Any:
        if name not in self._deployments:
            self._deployments[name] = self.client.read_deployment_by_name(name).id
        return self._deployments[name]

    def _submit(self, unit: PoolUnit) -> Any:
        unit.attempts += 1
        name = unit.name if unit.attempts == 1 else f"{unit.name}-try{unit.attempts}"
        fr = self.client.create_flow_run_from_deployment(self._deployment_id(unit.deployment),
                                                         parameters=unit.parameters, name=name, tags=unit.tags)
        self.submitted += 1
        return fr

    def _cancel(self, fr: Any) -> None:
        from prefect.states import Cancelled, Cancelling

        running = fr.state is not None and fr.state.is_running()
        state = (Cancelling if running else Cancelled)(message=f"cancelled by sparse-vggt after {self.timeout_s:.0f} s")
        try:
            self.client.set_flow_run_state(fr.id, state, force=True)
        except Exception as exc:  # noqa: BLE001 - best effort: the run is resubmitted anyway
            if self.logger:
                self.logger.warning("could not cancel flow run %s: %s", fr.name, exc)

    def run(self, units: list[PoolUnit]) -> Any:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        queue = list(units)
        flying: dict[Any, tuple[PoolUnit, Any, float]] = {}  # flow run id -> (unit, flow run, submitted at)
        started: dict[Any, float] = {}  # flow run id -> when first seen running
        while queue or flying:
            while queue and len(flying) < self.limit:
                unit = queue.pop(0)
                fr = self._submit(unit)
                flying[fr.id] = (unit, fr, time.monotonic())
            self.max_in_flight = max(self.max_in_flight, len(flying))
            time.sleep(self.poll_interval)
            self.polls += 1
            runs = self.client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flying))),
                                              limit=len(flying))
            now = time.monotonic()
            for fr in runs:
                unit, _, since = flying[fr.id]
                final = fr.state is not None and fr.state.is_final()
                if fr.id not in started and fr.state is not None and (fr.state.is_running() or fr.state.is_pending()
                                                                      or final):  # a worker took it
                    started[fr.id] = now
                if fr.id in started:
                    timed_out = not final and now - started[fr.id] > self.timeout_s
                else:
                    timed_out = not final and now - since > self.start_timeout_s
                if not (final or timed_out):
                    continue
                if timed_out:
                    self._cancel(fr)
                del flying[fr.id]
                started.pop(fr.id, None)
                outcome, message = classify(fr.state, timed_out)
                if outcome == "retry" and unit.attempts <= self.retries:
                    if self.logger:
                        self.logger.warning("%s %s: %s; resubmitting (attempt %d)", unit.deployment, unit.key,
                                            message, unit.attempts + 1)
                    queue.insert(0, unit)
                    continue
                if outcome == "retry":
                    outcome = "failed"
                yield unit, outcome, message, fr
