"""The local executor: every step and unit in this process, no Prefect (``orchestration.executor = "local"``).

The smallest complete `sparse_vggt.scheduler.Executor`, and the model for a new one (Ray, Dask): map the
scheduler's steps to the stages' entries in `sparse_vggt.pipeline`, run units, report outcomes. Cluster models run
in the persistent child process of `sparse_vggt.cluster_worker` (``orchestration.cluster_process``), so an
out-of-memory kill costs that cluster (the scheduler splits it), not the run; the Prefect executor's local tasks
run clusters the same way (`run_cluster`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .config import PipelineConfig
from .scheduler import Outcome, Work, is_transient, run_pipeline, run_step, validate_parameters

log = logging.getLogger(__name__)


class LocalExecutor:
    """Every step in this process, one unit at a time; cluster models in the persistent child process
    (`sparse_vggt.cluster_worker`, ``orchestration.cluster_process``) so an out-of-memory kill costs one cluster.
    Transient errors are retried ``orchestration.retries`` times with a doubling delay."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.work = Work()

    def run_name(self) -> str | None:
        return None

    def notify(self, what: str, run_dir: str, **info: Any) -> None:
        if what == "progress" and info.get("done") and info.get("total"):
            log.debug("%s: %d of %d", info.get("kind"), info["done"], info["total"])

    def _retrying(self, fn: Callable[[], Any]) -> Any:
        orch = self.cfg.orchestration
        for attempt in range(max(0, orch.retries) + 1):
            try:
                return fn()
            except Exception as exc:
                if attempt >= orch.retries or not is_transient(exc):
                    raise
                delay = orch.retry_delay_s * 2 ** attempt
                log.warning("transient error (%s); retrying in %.0f s", exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def call(self, step: str, run_dir: str, config: dict[str, Any], *args: Any) -> Any:
        cfg = PipelineConfig.from_dict(config)
        try:
            return self._retrying(lambda: run_step(step, run_dir, cfg, *args))
        finally:
            self.work.add(step)

    def map(self, kind: str, run_dir: str, config: dict[str, Any], ids: list[int]) -> Iterator[tuple[Any, Outcome]]:
        from .reconstruct import ClusterOutOfMemory

        cfg = PipelineConfig.from_dict(config)
        name = "describe-chunk" if kind == "describe" else "reconstruct-cluster"
        for uid in ids:
            try:
                if kind == "describe":
                    from .pipeline import stage

                    result: Any = self._retrying(lambda: stage("describe").run(Path(run_dir), cfg, units=[int(uid)]))
                else:
                    result = self._retrying(lambda: run_cluster(run_dir, cfg, int(uid)))
                yield uid, ("ok", result)
            except ClusterOutOfMemory as exc:
                yield uid, ("oom", str(exc))
            except Exception as exc:  # noqa: BLE001 - the scheduler records it; the other units still run
                yield uid, ("failed", exc)
            finally:
                self.work.add(name)


def run_cluster(run_dir: str | Path, cfg: PipelineConfig, cluster_id: int) -> dict[str, Any]:
    """One cluster, in the persistent child process when ``orchestration.cluster_process`` (else here)."""
    if cfg.orchestration.cluster_process:
        from .cluster_worker import worker

        return worker().run(Path(run_dir), int(cluster_id), cfg)
    from .reconstruct import reconstruct_cluster

    return reconstruct_cluster(Path(run_dir), int(cluster_id), cfg)


def run_local(photos: Path, run_dir: Path, cfg: PipelineConfig, force: bool = False) -> dict[str, Any]:
    """`sparse-vggt run` with ``orchestration.executor = "local"``: the whole pipeline in this process, no
    Prefect (no server, no UI)."""
    from .lock import writer_lock

    photos_s, run_s = str(Path(photos).expanduser().resolve()), str(Path(run_dir).expanduser().resolve())
    cfgd = cfg.to_dict()
    validate_parameters(photos_s, run_s, cfgd, force, create=False)  # nothing is created for invalid parameters
    with writer_lock(run_s, f"run {photos} {run_dir}"):
        cfg, _ = validate_parameters(photos_s, run_s, cfgd, force)
        return run_pipeline(photos_s, run_s, cfg, LocalExecutor(cfg), force)
