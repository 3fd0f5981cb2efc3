"""One Prefect task per scheduler step: the Prefect executor's (flows/executor.py) view of the pipeline.

Each task calls the stage's entry from the pipeline table (`sparse_vggt.pipeline`) with a run-directory path and
a config dict, publishes a Prefect artifact describing what the stage produced, and returns the stage's small
manifest; `STEP_TASKS` and `UNIT_TASKS` map the scheduler's step and unit names to the tasks. Tensors and arrays never
cross a task boundary: the run directory is the data plane, Prefect only sees paths and counts.

No Prefect caching and no result persistence: the run directory is the only truth. A Prefect cache
record would let a task be skipped while the run directory says its unit is missing or corrupt, and a persisted
result is deserialised with the serializer named *in the stored file* (pickle included), so anyone who can write
the shared storage could run code in every worker. Instead every task runs, and the library's verified completion
markers (``sparse_vggt.store``) make a complete, intact stage or unit a no-op, while a missing or damaged one is
recomputed. Task return values are small JSON-able manifests kept in memory only.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from sparse_vggt.config import PipelineConfig
from sparse_vggt.scheduler import is_transient, run_step
from sparse_vggt.store import RunStore

log = logging.getLogger(__name__)

ARTIFACT_ROWS = 500  # rows shown per table artifact (the full tables are in the run directory)


# ---------------------------------------------------------------------------------------------------------
# no Prefect cache, no persisted results (see the module docstring)

TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


def stage_task(t: Any, **options: Any) -> Any:
    """``t`` configured for a stage: never cached by Prefect, result never persisted (the run directory decides
    what is done)."""
    return t.with_options(**TASK_OPTIONS, **options)


# ---------------------------------------------------------------------------------------------------------
# retries: only transient errors are retried (which ones: sparse_vggt.scheduler.is_transient)


def retry_transient(task_obj: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - inspecting the failure, not handling it
        return is_transient(exc)
    return False


def retry_options(config: dict[str, Any]) -> dict[str, Any]:
    orch = PipelineConfig.from_dict(config).orchestration
    return {
        "retries": max(0, orch.retries),
        "retry_delay_seconds": exponential_backoff(backoff_factor=orch.retry_delay_s) if orch.retries else 0,
        "retry_jitter_factor": 0.2,
        "retry_condition_fn": retry_transient,
    }


# ---------------------------------------------------------------------------------------------------------
# artifacts


def artifact_key(run_dir: str | Path, what: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(run_dir).resolve().name.lower()).strip("-") or "run"
    return f"{slug[:40]}-{what}"


def _cfg(config: dict[str, Any]) -> PipelineConfig:
    return PipelineConfig.from_dict(config)


def _md_kv(title: str, items: dict[str, Any]) -> str:
    lines = [f"### {title}", "", "| key | value |", "|---|---|"]
    for k, v in items.items():
        if isinstance(v, (dict, list)):
            continue
        lines.append(f"| {k} | {v} |")
    return "\n".join(lines)


def _publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    try:
        create_table_artifact(key=key, table=rows[:ARTIFACT_ROWS] or [{"empty": ""}], description=description)
    except Exception as exc:  # noqa: BLE001 - monitoring must never fail a stage
        log.warning("could not publish artifact %s: %s", key, exc)


def _publish_markdown(key: str, markdown: str, description: str) -> None:
    try:
        create_markdown_artifact(key=key, markdown=markdown, description=description)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not publish artifact %s: %s", key, exc)


def images_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """images.parquet as rows, skipped images first (those are what an operator looks for)."""
    table = RunStore.open(run_dir).read_table(
        "images", columns=["image_id", "path", "status", "width", "height", "focal_px", "chunk_id"])
    rows = table.to_pylist()
    rows.sort(key=lambda r: (r["status"] == "ok", r["image_id"]))
    return rows


def cluster_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """One row per cluster: frame counts by role, component, whether it is reconstructed."""
    store = RunStore.open(run_dir)
    t = store.read_table("clusters", columns=["cluster_id", "role", "component_id"])
    cid = np.asarray(t.column("cluster_id").to_numpy())
    core = np.asarray([r == "core" for r in t.column("role").to_pylist()], bool)
    comp = np.asarray(t.column("component_id").to_numpy())
    done = {int(c) for c in store.complete_units("clusters") if c.isdigit()}
    rows = []
    for c in np.unique(cid).tolist():
        m = cid == c
        rows.append({"cluster_id": int(c), "frames": int(m.sum()), "core": int((m & core).sum()),
                     "overlap": int((m & ~core).sum()), "component": int(comp[m][0]),
                     "reconstructed": int(c) in done})
    return rows


# ---------------------------------------------------------------------------------------------------------
# step tasks: each runs its step through scheduler.run_step (what the local executor runs too) and publishes an
# artifact


@task(name="scan", task_run_name="scan", **TASK_OPTIONS)
def scan_task(photos: str, run_dir: str, config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """Its input is a folder outside the run directory; the library compares the folder listing with the
    finished scan itself (and refuses a changed folder)."""
    manifest = run_step("scan", run_dir, _cfg(config), photos, force)
    _publish_table(artifact_key(run_dir, "images"), images_rows(run_dir),
                   f"{manifest['kept']} images kept, {manifest['skipped']} skipped, {manifest['duplicates']} "
                   f"duplicates folded (skipped rows first; full table: tables/images.parquet)")
    return manifest


@task(name="describe-plan", task_run_name="describe-plan", **TASK_OPTIONS)
def describe_plan_task(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    """Create the descriptor array (so chunk tasks never race to create it) and list the unfinished chunks."""
    return run_step("describe-plan", run_dir, _cfg(config))


@task(name="describe-chunk", task_run_name="describe-chunk-{chunk_id}", **TASK_OPTIONS)
def describe_chunk_task(run_dir: str, config: dict[str, Any], chunk_id: int) -> dict[str, Any]:
    from sparse_vggt.pipeline import stage

    manifest = stage("describe").run(Path(run_dir), _cfg(config), units=[int(chunk_id)])
    return {"chunk_id": int(chunk_id), "computed": int(manifest.get("chunks_computed", 0)),
            "images_per_s": manifest.get("images_per_s")}


@task(name="describe-finish", task_run_name="describe-finish", **TASK_OPTIONS)
def describe_finish_task(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    return run_step("describe-finish", run_dir, _cfg(config))


@task(name="graph", task_run_name="covisibility-graph", **TASK_OPTIONS)
def graph_task(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    manifest = run_step("graph", run_dir, _cfg(config))
    _publish_markdown(artifact_key(run_dir, "graph"), _md_kv("covisibility graph", manifest),
                      f"{manifest.get('edges')} edges, {manifest.get('components')} components")
    return manifest


@task(name="partition", task_run_name="partition", **TASK_OPTIONS)
def partition_task(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    manifest = run_step("partition", run_dir, _cfg(config))
    publish_clusters(run_dir, f"{manifest.get('clusters')} clusters after partition")
    return manifest


def publish_clusters(run_dir: str, description: str) -> None:
    _publish_table(artifact_key(run_dir, "clusters"), cluster_rows(run_dir), description)


@task(name="reconstruct-cluster", task_run_name="reconstruct-cluster-{cluster_id}", **TASK_OPTIONS)
def reconstruct_cluster_task(run_dir: str, config: dict[str, Any], cluster_id: int,
                             isolate: bool = False) -> dict[str, Any]:
    """One cluster through (sparse) VGGT. ClusterOutOfMemory propagates (never retried): the scheduler splits.

    ``isolate``: run the model in this process's persistent cluster child process
    (`sparse_vggt.cluster_worker`), so an OOM kill costs this cluster only."""
    from sparse_vggt.local_executor import run_cluster

    cfg = _cfg(config)
    cfg.orchestration.cluster_process = bool(isolate)
    return run_cluster(Path(run_dir), cfg, int(cluster_id))


@task(name="split-cluster", task_run_name="split-cluster-{cluster_id}", **TASK_OPTIONS)
def split_cluster_task(run_dir: str, config: dict[str, Any], cluster_id: int) -> list[int]:
    return run_step("split-cluster", run_dir, _cfg(config), cluster_id)


@task(name="reconstruct-finish", task_run_name="reconstruct-finish", **TASK_OPTIONS)
def reconstruct_finish_task(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    """Mark the reconstruct stage finished once every cluster of clusters.parquet is complete."""
    manifest = run_step("reconstruct-finish", run_dir, _cfg(config))
    publish_clusters(run_dir, f"{manifest['clusters']} clusters, all reconstructed")
    return manifest


@task(name="merge", task_run_name="merge", **TASK_OPTIONS)
def merge_task(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    manifest = run_step("merge", run_dir, _cfg(config))
    rows = merge_residual_rows(run_dir)
    _publish_table(artifact_key(run_dir, "merge-residuals"), rows,
                   f"per-edge Sim(3) residuals of {len(rows)} cluster pairs (store.zarr/merge)")
    return manifest


def merge_residual_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """store.zarr/merge attrs 'residuals' as table rows (a list of dicts, or a dict keyed by edge)."""
    store = RunStore.open(run_dir)
    if "merge" not in store.zarr:
        return []
    res = store.zarr["merge"].attrs.get("residuals", [])
    if isinstance(res, dict):
        res = [{"edge": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in res.items()]
    rows = []
    for r in res if isinstance(res, list) else []:
        if isinstance(r, dict):
            rows.append({k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in r.items()})
    return rows


@task(name="export", task_run_name="export", **TASK_OPTIONS)
def export_task(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    return run_step("export", run_dir, _cfg(config))


# the scheduler's steps and unit kinds (sparse_vggt.scheduler.STEPS / UNIT_KINDS) -> their tasks
STEP_TASKS: dict[str, Any] = {
    "scan": scan_task, "describe-plan": describe_plan_task, "describe-finish": describe_finish_task,
    "graph": graph_task, "partition": partition_task, "split-cluster": split_cluster_task,
    "reconstruct-finish": reconstruct_finish_task, "merge": merge_task, "export": export_task,
}
UNIT_TASKS: dict[str, Any] = {"describe": describe_chunk_task, "clusters": reconstruct_cluster_task}
