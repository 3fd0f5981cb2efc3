"""Register the farm deployments with the Prefect server (`sparse-vggt deploy`).

Three deployments, the same as ``deploy/prefect.yaml``:

* ``reconstruct/farm`` — the main flow on the head node's pool (``sparse-vggt-head``) with ``dispatch = "pool"``
  and an example nightly cron schedule that is registered *paused* (turn it on in the UI once the photos path is
  right). It must not run on the Mac pool: it waits for the cluster runs and would hold a worker slot.
* ``reconstruct-cluster/<work_pool>`` — the per-cluster flow on the Mac minis' process pool (one worker per Mac,
  concurrency 1), with the MPS environment variables.
* ``describe-chunks/<work_pool>`` — a few descriptor chunks per flow run on the same pool (issue 16).

Entrypoints are module paths (``flows.reconstruct.reconstruct_cluster_flow``), so a worker needs only the installed
package, no checkout or pull step.
"""

from __future__ import annotations

import os
from typing import Any

from sparse_vggt.config import PipelineConfig

HEAD_POOL = "sparse-vggt-head"
CRON_EXAMPLE = "0 2 * * *"  # every night at 02:00 (paused until an operator activates it)
MPS_ENV = {
    "PYTORCH_ENABLE_MPS_FALLBACK": "1",  # ops without an MPS kernel fall back to the CPU instead of failing
    "PREFECT_LOGGING_EXTRA_LOGGERS": "sparse_vggt",
}


def deployment_specs(work_pool: str = "mac-mini", head_pool: str = HEAD_POOL) -> list[dict[str, Any]]:
    """What `register_deployments` creates, as plain data (also what `--dry-run` prints)."""
    config = PipelineConfig()
    config.orchestration.dispatch = "pool"
    config.orchestration.work_pool = work_pool
    config.orchestration.cluster_deployment = f"reconstruct-cluster/{work_pool}"
    config.orchestration.describe_deployment = f"describe-chunks/{work_pool}"
    return [
        {
            "flow": "reconstruct",
            "name": "farm",
            "entrypoint": "flows.reconstruct.reconstruct",
            "work_pool": head_pool,
            "parameters": {
                "photos": os.environ.get("SPARSE_VGGT_PHOTOS", "/Volumes/sparse-vggt/photos/city"),
                "run_dir": os.environ.get("SPARSE_VGGT_RUN_DIR", "/Volumes/sparse-vggt/runs/city"),
                "config": {"orchestration": {k: v for k, v in config.to_dict()["orchestration"].items()
                                             if k in ("dispatch", "work_pool", "cluster_deployment",
                                                      "describe_deployment")}},
            },
            "schedule": {"cron": CRON_EXAMPLE, "active": False},
            "tags": ["sparse-vggt"],
            "description": "photos -> COLMAP/PLY/GLB; clusters dispatched to the Mac pool",
            "job_variables": {"env": {"PREFECT_LOGGING_EXTRA_LOGGERS": "sparse_vggt"}},
        },
        {
            "flow": "reconstruct-cluster",
            "name": work_pool,
            "entrypoint": "flows.reconstruct.reconstruct_cluster_flow",
            "work_pool": work_pool,
            "parameters": {},
            "schedule": None,
            "tags": ["sparse-vggt", "cluster"],
            "description": "one cluster through sparse VGGT on a farm worker",
            "job_variables": {"env": dict(MPS_ENV)},
        },
        {  # issue 16: descriptor chunks run on the workers too (the same pool; the head only plans/finishes)
            "flow": "describe-chunks",
            "name": work_pool,
            "entrypoint": "flows.reconstruct.describe_chunks_flow",
            "work_pool": work_pool,
            "parameters": {},
            "schedule": None,
            "tags": ["sparse-vggt", "describe"],
            "description": "MegaLoc descriptors of a few ingest chunks on a farm worker",
            "job_variables": {"env": dict(MPS_ENV)},
        },
    ]


def register_deployments(work_pool: str = "mac-mini", apply: bool = True, head_pool: str = HEAD_POOL
                         ) -> dict[str, Any]:
    """Create or update the two deployments (and their process work pools if missing).

    With ``apply=False`` nothing is contacted; the specs are returned. Needs PREFECT_API_URL to point at the
    head node's server (an ephemeral server would forget them on exit).
    """
    specs = deployment_specs(work_pool, head_pool)
    result: dict[str, Any] = {"work_pool": work_pool, "head_pool": head_pool, "applied": apply,
                              "deployments": [{"deployment": f"{s['flow']}/{s['name']}", "pool": s["work_pool"],
                                               "entrypoint": s["entrypoint"],
                                               "schedule": (s["schedule"] or {}).get("cron", "")} for s in specs]}
    if not apply:
        return result
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate, WorkPoolCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL

    from flows.reconstruct import describe_chunks_flow, reconstruct, reconstruct_cluster_flow

    if not PREFECT_API_URL.value():
        raise RuntimeError("PREFECT_API_URL is not set: deployments must go to the head node's Prefect server "
                           "(e.g. export PREFECT_API_URL=http://HEAD:4200/api; see deploy/README.md)")
    flows = {"reconstruct": reconstruct, "reconstruct-cluster": reconstruct_cluster_flow,
             "describe-chunks": describe_chunks_flow}
    ids = []
    with get_client(sync_client=True) as client:
        for pool in {s["work_pool"] for s in specs}:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            except ObjectAlreadyExists:
                pass
        for s in specs:
            fl = flows[s["flow"]]
            flow_id = client.create_flow_from_name(fl.name)
            schedules = ([DeploymentScheduleCreate(schedule=CronSchedule(cron=s["schedule"]["cron"]),
                                                   active=s["schedule"]["active"])] if s["schedule"] else [])
            dep_id = client.create_deployment(
                flow_id=flow_id, name=s["name"], work_pool_name=s["work_pool"], entrypoint=s["entrypoint"],
                parameters=s["parameters"], parameter_openapi_schema=fl.parameters.model_dump_for_openapi(),
                schedules=schedules, tags=s["tags"], description=s["description"], job_variables=s["job_variables"],
                pull_steps=[], enforce_parameter_schema=True,
            )
            ids.append(str(dep_id))
    for row, dep_id in zip(result["deployments"], ids):
        row["id"] = dep_id
    return result
