"""The Prefect executor: the scheduler's steps as Prefect tasks, its units as tasks on this machine
(``orchestration.dispatch = "local"``; a tag concurrency limit keeps one model per accelerator) or as flow runs on
a work pool (``"pool"``; flows/pool.py). It decides nothing: `sparse_vggt.scheduler` does.

No Prefect cache and no persisted results: the run directory is the only truth (tasks/stages.py says why).
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Any, Iterator

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run as runtime_flow_run

from sparse_vggt.config import PipelineConfig
from sparse_vggt.scheduler import Outcome, Work
from sparse_vggt.store import RunStore
from tasks.stages import STEP_TASKS, UNIT_TASKS, artifact_key, publish_clusters, retry_options, stage_task

from .pool import clusters_on_pool, describe_on_pool


def flow_run_name() -> str | None:
    try:
        return runtime_flow_run.name
    except Exception:  # noqa: BLE001 - outside a flow run
        return None


_LOCAL_LOCK: Any = None  # shared flock held for the life of this process once a local flow started


def _local_lock_path() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()).expanduser() / "sparse-vggt-local.lock"


def ensure_accelerator_limit(tag: str, limit: int = 1) -> None:
    """Create the tag concurrency limit (one model per accelerator) unless an operator already set one, and
    reclaim slots leaked by a killed local run.

    A task killed with SIGKILL never releases its slot; the server only revokes the lease after it expires, and an
    ephemeral server forgets leases on restart, so the next run would wait forever. Every local flow process holds
    a shared flock on ``$PREFECT_HOME/sparse-vggt-local.lock``; if an exclusive lock can be taken, no other local
    run is alive on this machine and any occupied slot is stale, so the limit is reset.
    """
    global _LOCAL_LOCK
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:  # tag limits are global concurrency limits named "tag:<tag>" (what the task engine acquires)
            current = client.read_global_concurrency_limit_by_name(f"tag:{tag}")
        except ObjectNotFound:
            client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
            current = None
        if _LOCAL_LOCK is None:
            path = _local_lock_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            _LOCAL_LOCK = open(path, "a+")
        try:  # (upgrading our own shared lock succeeds unless another process holds one)
            fcntl.flock(_LOCAL_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        if alone and current is not None and current.active_slots:
            get_run_logger().warning("reclaiming %d concurrency slot(s) of tag %r left by a killed run",
                                     current.active_slots, tag)
            client.update_global_concurrency_limit(f"tag:{tag}", GlobalConcurrencyLimitUpdate(active_slots=0))
        fcntl.flock(_LOCAL_LOCK, fcntl.LOCK_SH)  # from now on other local runs see this process as alive


def _failure(state: Any) -> BaseException | None:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None


def windowed(submit: Any, items: list[Any], window: int) -> Any:
    """Submit ``items`` keeping at most ``window`` in flight; yield (item, finished future) as they finish.

    Locally the window is 1: the accelerator runs one model at a time anyway, and a task that finds the tag's
    slot taken polls for it with back-off, which costs more than submitting the next task when a slot frees.
    """
    queue = list(items)
    running: dict[Any, Any] = {}
    while queue or running:
        while queue and len(running) < max(1, window):
            item = queue.pop(0)
            running[submit(item)] = item
        fut = next(iter(as_completed(list(running))))
        fut.wait()
        yield running.pop(fut), fut


class PrefectExecutor:
    """`sparse_vggt.scheduler.Executor` on Prefect: steps are tasks (retried on transient errors), units are
    tasks here or flow runs on the pool, progress and the report are artifacts."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.work = Work()
        self._progress: dict[str, Any] = {}
        if cfg.orchestration.dispatch == "local":
            ensure_accelerator_limit(cfg.orchestration.accelerator_tag)

    def run_name(self) -> str | None:
        return flow_run_name()

    def _task(self, t: Any, config: dict[str, Any], **options: Any) -> Any:
        return stage_task(t, **retry_options(config), **options)

    def call(self, step: str, run_dir: str, config: dict[str, Any], *args: Any) -> Any:
        t = STEP_TASKS[step]
        if step == "scan":  # scan_task(photos, run_dir, config, force)
            photos, force = args
            args, head = (force,), (photos, run_dir, config)
        else:
            head = (run_dir, config)
        state = self._task(t, config)(*head, *args, return_state=True)
        self.work.add(t.name)
        return state.result()

    def map(self, kind: str, run_dir: str, config: dict[str, Any], ids: list[int]) -> Iterator[tuple[Any, Outcome]]:
        from sparse_vggt.reconstruct import ClusterOutOfMemory

        orch = self.cfg.orchestration
        if orch.dispatch == "pool":  # bounded: at most max_in_flight flow runs, one poller
            on_pool = describe_on_pool if kind == "describe" else clusters_on_pool
            yield from on_pool(run_dir, self.cfg, config, ids, self.work)
            return
        t = self._task(UNIT_TASKS[kind], config, tags=[orch.accelerator_tag])
        args = (orch.cluster_process,) if kind == "clusters" else ()
        # one unit at a time on this machine: one model per accelerator, and the rows of neighbouring ingest
        # chunks may share a Zarr chunk of the descriptor array
        for uid, fut in windowed(lambda u: t.submit(run_dir, config, u, *args), ids, 1):
            self.work.add(t.name)
            exc = _failure(fut.state)
            if exc is None:
                yield uid, ("ok", fut.state.result())
            elif isinstance(exc, ClusterOutOfMemory):
                yield uid, ("oom", str(exc))
            else:
                yield uid, ("failed", exc)

    def notify(self, what: str, run_dir: str, **info: Any) -> None:
        with contextlib.suppress(Exception):  # monitoring never fails a run
            if what == "progress":
                self._progress_artifact(run_dir, **info)
            elif what == "clusters":
                publish_clusters(run_dir, info["description"])
            elif what == "report":
                self._report_artifacts(run_dir, info["report"])

    def _progress_artifact(self, run_dir: str, kind: str, done: int, total: int, note: str = "") -> None:
        value = min(100.0, 100.0 * done / max(1, total))
        if kind not in self._progress:
            what = "describe-progress" if kind == "describe" else "reconstruct-progress"
            self._progress[kind] = create_progress_artifact(progress=value, key=artifact_key(run_dir, what),
                                                            description=note or kind)
        else:
            update_progress_artifact(self._progress[kind], value)

    def _report_artifacts(self, run_dir: str, report: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            from sparse_vggt.export.report import run_markdown  # the export package is heavy: not in farm flow runs

            create_markdown_artifact(key=artifact_key(run_dir, "report"), markdown=run_markdown(report),
                                     description="final report with output paths")
        with contextlib.suppress(Exception):  # the export's plots (export/plots/*.png), inlined
            from sparse_vggt.export.plots import plots_markdown  # imports torch: not in every farm flow run

            plots = plots_markdown(RunStore(run_dir).export_dir)
            if plots:
                create_markdown_artifact(key=artifact_key(run_dir, "plots"), markdown=plots,
                                         description="cameras by cluster, cluster graph, merge residuals, image status")
