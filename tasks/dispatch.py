"""Farm dispatch: run one cluster as its own flow run on a work pool (``orchestration.dispatch = "pool"``)."""

from __future__ import annotations

import re
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment

from .stages import TransientError

_KILLED = re.compile(r"(status code|exit code|exited with code) (-9|137)\b|SIGKILL", re.IGNORECASE)
OOM_MARK = "CLUSTER_OUT_OF_MEMORY"  # prefix of the failure message of a cluster flow run that ran out of memory


@task(name="dispatch-cluster", task_run_name="dispatch-cluster-{cluster_id}", cache_policy=NO_CACHE,
      persist_result=False)
def dispatch_cluster_task(run_dir: str, config: dict[str, Any], cluster_id: int, deployment: str,
                          run_label: str, poll_interval: float = 1.0) -> dict[str, Any]:
    """Start the per-cluster flow on the pool and wait for it.

    Out of memory comes back as ClusterOutOfMemory (the parent flow splits the cluster); a crashed run (the worker
    died) raises TransientError so the task's retries dispatch it again: the cluster's completion marker is on
    shared storage, so a finished cluster is never recomputed and an unfinished one starts over.
    """
    from sparse_vggt.reconstruct import ClusterOutOfMemory

    flow_run = run_deployment(
        name=deployment,
        parameters={"run_dir": run_dir, "cluster_id": int(cluster_id), "config": config},
        timeout=None,
        poll_interval=poll_interval,
        flow_run_name=f"cluster-{int(cluster_id)}-{run_label}",
        tags=["sparse-vggt", f"cluster-{int(cluster_id)}"],
    )
    state = flow_run.state
    info = {"cluster_id": int(cluster_id), "flow_run": flow_run.name, "flow_run_id": str(flow_run.id),
            "state": state.name if state else None}
    if state is not None and state.is_completed():
        return info
    message = (state.message if state else "") or ""
    if OOM_MARK in message:
        raise ClusterOutOfMemory(int(cluster_id), message.split(OOM_MARK, 1)[1].strip(" :"))
    if state is not None and state.is_crashed() and _KILLED.search(message):
        # the OS killed the worker's flow process (OOM killer / jetsam send SIGKILL): split, do not retry as is
        raise ClusterOutOfMemory(int(cluster_id), f"flow run {flow_run.name} was killed by the OS ({message})")
    if state is not None and state.is_crashed():
        raise TransientError(f"cluster {cluster_id}: flow run {flow_run.name} crashed ({message}); dispatching again")
    raise RuntimeError(f"cluster {cluster_id}: flow run {flow_run.name} ended {info['state']}: {message}")
