"""The farm's deployments, in one place: `sparse-vggt deploy` registers them, `prefect.yaml` is generated from them.

One source of truth: `deployment_specs` below. ``prefect.yaml`` at the repository root is its rendering
(`sparse-vggt deploy --write-yaml prefect.yaml`; tests/test_deploy.py fails when the file and the specs disagree,
and registers both ways against a real server to compare what the server stores). Deployments:

* ``reconstruct/farm`` — the main flow on the head node's pool (``sparse-vggt-head``), ``dispatch = "pool"``;
  started by hand (UI/CLI) with ``photos`` and ``run_dir``. It waits on the cluster runs, so it must not hold a
  Mac's slot.
* ``reconstruct-scheduled/nightly`` — the growing-collection flow (flows/scheduled.py): a new dated run directory
  under ``runs_root`` per run, reusing the previous run. Nightly cron, registered *paused*; concurrency limit 1
  (an overlapping run is cancelled, not queued).
* ``reconstruct-cluster/<work_pool>`` — one cluster per flow run on the Mac minis' process pool.
* ``describe-chunks/<work_pool>`` — a few descriptor chunks per flow run on the same pool; the head only plans
  and finishes the describe stage.

Entrypoints are module paths (``flows.reconstruct:reconstruct``) of the installed package and there are no pull
steps: a worker needs the package installed (`pip install -e src`), not a checkout at an agreed directory.

Every deployment sets ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` (Prefect 3.9's name; ``PREFECT_RUNNER_...`` is
deprecated) to `HEARTBEAT_S`, and `register_deployments` creates the automation that marks a flow run of these
flows Crashed when no heartbeat came for `ZOMBIE_AFTER_S` — 10 heartbeats, and more than Prefect's default
interval (180 s), so a healthy run whose process did not get the setting is not marked Crashed either.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from tasks import LIBRARY_LOGGERS

HEAD_POOL = "sparse-vggt-head"
WORK_POOL = "mac-mini"
CRON_EXAMPLE = "0 2 * * *"  # every night at 02:00 (paused until an operator activates it)
TIMEZONE = "UTC"
HEARTBEAT_S = 30  # Prefect's minimum; the flow engine emits prefect.flow-run.heartbeat events at this interval
PREFECT_DEFAULT_HEARTBEAT_S = 180  # Prefect 3.9's default when the setting is not in a run's environment
ZOMBIE_AFTER_S = 300
assert ZOMBIE_AFTER_S >= 4 * HEARTBEAT_S and ZOMBIE_AFTER_S > PREFECT_DEFAULT_HEARTBEAT_S + 60
AUTOMATION_NAME = "sparse-vggt: crash flow runs whose heartbeats stopped"
FLOW_NAMES = ("reconstruct", "reconstruct-scheduled", "reconstruct-cluster", "describe-chunks")
EXAMPLE_PHOTOS = "/Volumes/sparse-vggt/photos/city"  # same path on every machine (shared storage)
EXAMPLE_RUNS = "/Volumes/sparse-vggt/runs/city"
BASE_ENV = {
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
    **LIBRARY_LOGGERS,
    "HF_HUB_OFFLINE": "1",  # weights come from `sparse-vggt weights fetch`, never from the hub during a run
}
MPS_ENV = {
    "PYTORCH_ENABLE_MPS_FALLBACK": "1",  # ops without an MPS kernel fall back to the CPU instead of failing
}


def _pool_config(work_pool: str) -> dict[str, Any]:
    return {"orchestration": {"dispatch": "pool", "work_pool": work_pool,
                              "cluster_deployment": f"reconstruct-cluster/{work_pool}",
                              "describe_deployment": f"describe-chunks/{work_pool}"}}


def deployment_specs(work_pool: str = WORK_POOL, head_pool: str = HEAD_POOL) -> list[dict[str, Any]]:
    """What `register_deployments` creates and `prefect_yaml` renders, as plain data (also `--dry-run`)."""
    head_env = {"env": dict(BASE_ENV)}
    return [
        {
            "flow": "reconstruct", "name": "farm", "entrypoint": "flows.reconstruct:reconstruct",
            "work_pool": head_pool,
            "parameters": {"photos": EXAMPLE_PHOTOS, "run_dir": f"{EXAMPLE_RUNS}/manual",
                           "config": _pool_config(work_pool)},
            "schedule": None, "concurrency_limit": None,
            "tags": ["sparse-vggt"],
            "description": "photos -> COLMAP/PLY/GLB in run_dir; clusters dispatched to the Mac pool",
            "job_variables": head_env,
        },
        {
            "flow": "reconstruct-scheduled", "name": "nightly", "entrypoint": "flows.scheduled:scheduled_reconstruct",
            "work_pool": head_pool,
            "parameters": {"photos": EXAMPLE_PHOTOS, "runs_root": EXAMPLE_RUNS, "config": _pool_config(work_pool)},
            "schedule": {"cron": CRON_EXAMPLE, "timezone": TIMEZONE, "active": False},
            "concurrency_limit": {"limit": 1, "collision_strategy": "CANCEL_NEW"},
            "tags": ["sparse-vggt"],
            "description": "growing folder: a new dated run under runs_root per run, reusing the previous run",
            "job_variables": head_env,
        },
        {
            "flow": "reconstruct-cluster", "name": work_pool, "entrypoint": "flows.reconstruct:reconstruct_cluster_flow",
            "work_pool": work_pool, "parameters": {}, "schedule": None, "concurrency_limit": None,
            "tags": ["sparse-vggt", "cluster"],
            "description": "one cluster through sparse VGGT on a farm worker",
            "job_variables": {"env": {**BASE_ENV, **MPS_ENV}},
        },
        {  # descriptor chunks run on the workers too (the same pool; the head only plans and finishes)
            "flow": "describe-chunks", "name": work_pool, "entrypoint": "flows.reconstruct:describe_chunks_flow",
            "work_pool": work_pool, "parameters": {}, "schedule": None, "concurrency_limit": None,
            "tags": ["sparse-vggt", "describe"],
            "description": "MegaLoc descriptors of a few ingest chunks on a farm worker",
            "job_variables": {"env": {**BASE_ENV, **MPS_ENV}},
        },
    ]


def prefect_yaml(work_pool: str = WORK_POOL, head_pool: str = HEAD_POOL) -> str:
    """`deployment_specs` as a prefect.yaml for `prefect deploy --all` (run from the repository root)."""
    import prefect
    import yaml

    deployments = []
    for s in deployment_specs(work_pool, head_pool):
        d: dict[str, Any] = {"name": s["name"], "entrypoint": s["entrypoint"], "description": s["description"],
                             "tags": s["tags"],
                             "work_pool": {"name": s["work_pool"], "job_variables": copy.deepcopy(s["job_variables"])},
                             "parameters": copy.deepcopy(s["parameters"])}
        if s["schedule"]:
            d["schedules"] = [dict(s["schedule"])]
        if s["concurrency_limit"]:
            d["concurrency_limit"] = dict(s["concurrency_limit"])
        deployments.append(d)
    doc = {"name": "sparse-vggt", "prefect-version": prefect.__version__, "build": None, "push": None,
           "pull": [], "deployments": deployments}
    header = ("# GENERATED from flows/deploy.py by `sparse-vggt deploy --write-yaml prefect.yaml`: edit that file, "
              "not this one\n# (tests/test_deploy.py fails when they differ). `prefect deploy --all` from the "
              "repository root\n# registers the same deployments as `sparse-vggt deploy`, but only `sparse-vggt "
              "deploy` also creates the\n# zombie-run automation (run `sparse-vggt deploy --automation-only` "
              "after `prefect deploy`).\n# Entrypoints are modules of the installed package: no pull steps.\n")
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)


def automation_spec(flow_names: tuple[str, ...] = FLOW_NAMES, after_s: int = ZOMBIE_AFTER_S) -> dict[str, Any]:
    """The 'heartbeats stopped -> Crashed' automation for the runs of ``flow_names`` (plain data)."""
    return {
        "name": AUTOMATION_NAME,
        "description": (f"a flow run of {', '.join(flow_names)} that sent heartbeats (every {HEARTBEAT_S} s) and "
                        f"then none for {after_s} s is marked Crashed, so the main flow redispatches its cluster"),
        "trigger": {
            "type": "event", "posture": "Proactive", "threshold": 1, "within": after_s,
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "match_related": {"prefect.resource.role": "flow",
                              "prefect.resource.name": list(flow_names)},
            "after": ["prefect.flow-run.heartbeat"],
            # a heartbeat or any state in which a run legitimately stops beating (final, paused, waiting to retry)
            "expect": ["prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                       "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed", "prefect.flow-run.Paused",
                       "prefect.flow-run.Suspended", "prefect.flow-run.AwaitingRetry", "prefect.flow-run.Scheduled"],
            "for_each": ["prefect.resource.id"],
        },
        "actions": [{"type": "change-flow-run-state", "state": "CRASHED",
                     "message": f"no heartbeat for {after_s} s: the worker or its process died"}],
    }


def ensure_automation(client: Any, spec: dict[str, Any] | None = None) -> str:
    """Create (or replace, so a changed threshold takes effect) the zombie-run automation; returns its id."""
    from prefect.events.schemas.automations import AutomationCore

    spec = spec or automation_spec()
    for old in client.read_automations_by_name(spec["name"]):
        client.delete_automation(old.id)
    return str(client.create_automation(AutomationCore.model_validate(spec)))


def register_deployments(work_pool: str = WORK_POOL, apply: bool = True, head_pool: str = HEAD_POOL,
                         deployments: bool = True) -> dict[str, Any]:
    """Create or update the deployments (and their process work pools if missing) and the zombie automation.

    With ``apply=False`` nothing is contacted; the specs are returned. ``deployments=False`` only (re)creates
    the automation (after `prefect deploy --all`). Needs PREFECT_API_URL to point at the head node's server.
    """
    specs = deployment_specs(work_pool, head_pool)
    result: dict[str, Any] = {"work_pool": work_pool, "head_pool": head_pool, "applied": apply,
                              "deployments": [{"deployment": f"{s['flow']}/{s['name']}", "pool": s["work_pool"],
                                               "entrypoint": s["entrypoint"],
                                               "schedule": (s["schedule"] or {}).get("cron", "")} for s in specs],
                              "automation": {"name": AUTOMATION_NAME, "no_heartbeat_for_s": ZOMBIE_AFTER_S,
                                             "heartbeat_s": HEARTBEAT_S}}
    if not apply:
        return result
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate, WorkPoolCreate
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise RuntimeError("PREFECT_API_URL is not set: deployments must go to the head node's Prefect server "
                           "(e.g. export PREFECT_API_URL=http://HEAD:4200/api; see deploy/README.md)")
    from prefect.utilities.importtools import import_object

    ids = []
    with get_client(sync_client=True) as client:
        if deployments:
            for pool in {s["work_pool"] for s in specs}:
                try:
                    client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                except ObjectAlreadyExists:
                    pass
            for s in specs:
                fl = import_object(s["entrypoint"])
                flow_id = client.create_flow_from_name(fl.name)
                sch = s["schedule"]
                schedules = ([DeploymentScheduleCreate(schedule=CronSchedule(cron=sch["cron"], timezone=sch["timezone"]),
                                                       active=sch["active"])] if sch else [])
                limit = s["concurrency_limit"]
                dep_id = client.create_deployment(
                    flow_id=flow_id, name=s["name"], work_pool_name=s["work_pool"], entrypoint=s["entrypoint"],
                    parameters=s["parameters"], parameter_openapi_schema=fl.parameters.model_dump_for_openapi(),
                    schedules=schedules, tags=s["tags"], description=s["description"],
                    job_variables=s["job_variables"], pull_steps=[], enforce_parameter_schema=True,
                    concurrency_limit=limit["limit"] if limit else None,
                    concurrency_options=ConcurrencyOptions(
                        collision_strategy=ConcurrencyLimitStrategy(limit["collision_strategy"])) if limit else None,
                )
                ids.append(str(dep_id))
        result["automation"]["id"] = ensure_automation(client)
    for row, dep_id in zip(result["deployments"], ids):
        row["id"] = dep_id
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.deploy --write-yaml prefect.yaml` (the same as `sparse-vggt deploy --write-yaml`)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write-yaml", required=True, metavar="PATH")
    args = p.parse_args(argv)
    Path(args.write_yaml).write_text(prefect_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
