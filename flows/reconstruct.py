"""The Prefect flows: the end-to-end flow (photos -> COLMAP/PLY/GLB) and the farm workers' unit flows.

``reconstruct(photos, run_dir, config)`` holds the run directory's writer lock and hands the pipeline to
`sparse_vggt.scheduler.run_pipeline` with the Prefect executor (flows/executor.py): every step a Prefect task,
clusters and descriptor chunks as tasks on this machine (``orchestration.dispatch = "local"``) or as flow runs
on a work pool (``"pool"``; one process worker per Mac mini, run directory on shared storage) running
``reconstruct-cluster`` / ``describe-chunks`` below. What runs, what is skipped, split or retried, the events log
and the report are the scheduler's; this module only names runs and starts flows.

Resume: every stage and unit writes its (verified) completion marker last and the run directory is the only truth
(no Prefect cache, no persisted task results), so a re-run of a finished run does no work and a killed run
recomputes only unfinished units.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from prefect import flow
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Failed

from sparse_vggt import scheduler
from sparse_vggt.config import PipelineConfig
from sparse_vggt.lock import writer_lock
from sparse_vggt.scheduler import FlowParameterError, validate_parameters
from sparse_vggt.durable import atomic_write_bytes
from tasks.dispatch import OOM_MARK, TRANSIENT_MARK

from .executor import PrefectExecutor, flow_run_name
from .pool import slug

log = logging.getLogger(__name__)

__all__ = ["reconstruct", "reconstruct_cluster_flow", "describe_chunks_flow", "run_pipeline", "record_event",
           "validate_parameters"]


def record_event(run_dir: str | Path, kind: str, **info: Any) -> dict[str, Any]:
    """`scheduler.record_event` under this flow run's name."""
    return scheduler.record_event(run_dir, kind, flow_run_name(), **info)


def _main_run_name() -> str:
    params = runtime_flow_run.parameters
    cfg = params.get("config") or {}
    dispatch = (cfg.get("orchestration") or {}).get("dispatch", "local")
    return f"reconstruct-{slug(params['run_dir'])}-{dispatch}-{_dt.datetime.now():%Y%m%d-%H%M%S}"


@flow(name="reconstruct", flow_run_name=_main_run_name, log_prints=True, persist_result=False)
def reconstruct(photos: str, run_dir: str, config: dict[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
    """Photos folder -> run directory with COLMAP/PLY/GLB exports (see the module docstring).

    Holds the run directory's writer lock throughout: a second run on the same directory is refused at once."""
    with writer_lock(run_dir, f"flow reconstruct {photos} {run_dir}"):
        return _reconstruct(photos, run_dir, config, force)


def _reconstruct(photos: str, run_dir: str, config: dict[str, Any] | None, force: bool,
                 after_partition: Callable[[], Any] | None = None) -> dict[str, Any]:
    photos, run_dir = str(Path(photos).expanduser().resolve()), str(Path(run_dir).expanduser().resolve())
    cfg, _ = validate_parameters(photos, run_dir, config, force)
    return scheduler.run_pipeline(photos, run_dir, cfg, PrefectExecutor(cfg), force, after_partition)


def _cluster_run_name() -> str:
    p = runtime_flow_run.parameters
    return f"cluster-{p['cluster_id']}-{slug(p['run_dir'])}"


@flow(name="reconstruct-cluster", flow_run_name=_cluster_run_name, persist_result=False)
def reconstruct_cluster_flow(run_dir: str, cluster_id: int, config: dict[str, Any],
                             batch: list[int] | None = None) -> Any:
    """One cluster, or a ``batch`` of clusters (``orchestration.clusters_per_run``), on a farm worker (pool
    dispatch). The run directory must be on storage this worker mounts.

    The model runs in this worker's resident process (`sparse_vggt.resident`): loaded once per worker and run,
    not once per cluster; a batch also pays the flow run's process start once. No writer lock here: the main
    flow holds it; this flow writes only ``store.zarr/clusters/<id>`` and ``orchestration/clusters/<id>.json``
    (and appends to events.jsonl), so workers never touch each other's files. Out of memory: the flow ends
    Failed with ``OOM_MARK`` and a JSON map cluster -> reason (the head splits those clusters)."""
    from sparse_vggt import resident
    _require_visible(run_dir)
    cfg = PipelineConfig.from_dict(config)
    ids = [int(c) for c in batch] if batch else [int(cluster_id)]
    oom: dict[str, str] = {}
    errors: list[BaseException] = []
    result: Any = None
    for cid in ids:
        started = time.time()
        try:
            answer = resident.call("cluster", run_dir, cfg, cid, cfg.orchestration.resident_idle_s)
        except resident.ResidentDied as exc:  # the worker's model process died: the head resubmits the batch
            return Failed(message=f"{TRANSIENT_MARK}: {exc}")
        _write_unit_record(run_dir, "clusters", str(cid), answer, started,
                           {"cluster_id": cid, "frames": (answer.get("ok") or {}).get("frames", 0),
                            "skipped": bool((answer.get("ok") or {}).get("skipped")), "batch": len(ids)})
        if answer.get("oom"):  # read from the answer: this process never imports torch (a shorter start)
            oom[str(cid)] = answer.get("oom_message") or answer.get("message", "")
            continue
        try:
            result = resident.raise_for(answer, "cluster", cid)
        except Exception as exc:  # noqa: BLE001 - the rest of the batch still runs; the flow fails at the end
            errors.append(exc)
    if errors:
        raise errors[0]
    if oom:
        return Failed(message=f"{OOM_MARK}: {json.dumps(oom)}" if batch else f"{OOM_MARK}: {oom[str(ids[0])]}")
    return result if not batch else {"clusters": ids}


def _describe_run_name() -> str:
    p = runtime_flow_run.parameters
    ids = p["chunk_ids"]
    return f"describe-{min(ids)}-{max(ids)}-{slug(p['run_dir'])}"


@flow(name="describe-chunks", flow_run_name=_describe_run_name, persist_result=False)
def describe_chunks_flow(run_dir: str, chunk_ids: list[int], config: dict[str, Any]) -> Any:
    """Describe ingest chunks on a farm worker (pool dispatch) into their disjoint Zarr chunks; the head plans
    (creates the array, groups chunks, `describe.describe_units`) and finishes the stage after every unit."""
    from sparse_vggt import resident

    _require_visible(run_dir)
    cfg = PipelineConfig.from_dict(config)
    started = time.time()
    ids = [int(c) for c in chunk_ids]
    try:
        answer = resident.call("describe", run_dir, cfg, ids, cfg.orchestration.resident_idle_s)
    except resident.ResidentDied as exc:
        return Failed(message=f"{TRANSIENT_MARK}: {exc}")
    _write_unit_record(run_dir, "describe", f"{min(ids)}-{max(ids)}", answer, started,
                       {"chunk_ids": ids, "images": (answer.get("ok") or {}).get("images_computed")})
    return resident.raise_for(answer, "describe", ids)


def _require_visible(run_dir: str) -> None:
    if not (Path(run_dir) / "run.json").exists():
        raise FlowParameterError(f"{run_dir} is not visible on worker {socket.gethostname()}: mount the shared "
                                 "storage at the same path on every worker (deploy/README.md)")


def _write_unit_record(run_dir: str, kind: str, name: str, answer: dict[str, Any], started: float,
                       extra: dict[str, Any]) -> None:
    """orchestration/<kind>/<name>.json: who ran the unit (worker, host, resident pid), its model loads so far,
    its time and peak memory; the head's monitoring and report read these."""
    from sparse_vggt.resident import worker_name

    record = {**extra, "worker": answer.get("worker") or worker_name(), "host": answer.get("host"),
              "pid": answer.get("pid"), "flow_pid": os.getpid(), "flow_run": flow_run_name(),
              "loads": answer.get("loads"), "work_seconds": answer.get("seconds"),
              "seconds": round(time.time() - started, 3), "finished": time.time(), "ok": "ok" in answer,
              "peak_rss_mb": answer.get("peak_rss_mb"), "peak_accelerator_mb": answer.get("peak_accelerator_mb")}
    atomic_write_bytes(Path(run_dir) / "orchestration" / kind / f"{name}.json", json.dumps(record).encode())



def run_pipeline(photos: Path, run_dir: Path, cfg: PipelineConfig, force: bool = False) -> dict[str, Any]:
    """`sparse-vggt run` (``orchestration.executor = "prefect"``): the main flow (ephemeral Prefect unless
    PREFECT_API_URL points at a server)."""
    cfg_d = cfg.to_dict()
    validate_parameters(photos, run_dir, cfg_d, force, create=False)  # nothing is created for invalid parameters
    with writer_lock(run_dir, f"run {photos} {run_dir}"):
        validate_parameters(photos, run_dir, cfg_d, force)  # clear errors before Prefect starts anything
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call drowns the stage logs
        return reconstruct(str(photos), str(run_dir), cfg_d, force)
