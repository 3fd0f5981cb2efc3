"""One Prefect task per pipeline stage.

Each task calls the library entry function with a run-directory path and a config dict, publishes a Prefect
artifact describing what the stage produced, and returns the stage's small manifest. Tensors and arrays never
cross a task boundary: the run directory is the data plane, Prefect only sees paths and counts.

No Prefect caching and no result persistence (issue 15): the run directory is the only truth. A Prefect cache
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
from sparse_vggt.store import RunStore

log = logging.getLogger(__name__)

ARTIFACT_ROWS = 500  # rows shown per table artifact (the full tables are in the run directory)


# ---------------------------------------------------------------------------------------------------------
# no Prefect cache, no persisted results (see the module docstring)

TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


def stage_task(run_dir: str | Path, t: Any, **options: Any) -> Any:
    """``t`` configured for a stage: never cached by Prefect, result never persisted (the run directory decides
    what is done). ``run_dir`` is accepted for call-site symmetry with the old cached variant."""
    return t.with_options(**TASK_OPTIONS, **options)


cached = stage_task  # old name, kept for callers; nothing is cached any more

# ---------------------------------------------------------------------------------------------------------
# retries: only transient errors are retried


class TransientError(RuntimeError):
    """A failure worth retrying as is (e.g. the worker running a cluster flow died)."""


def is_transient(exc: BaseException | None) -> bool:
    """I/O hiccups (shared storage, network) and lost workers are retried; our own errors and OOM are not."""
    from sparse_vggt.reconstruct import ClusterOutOfMemory

    if exc is None or isinstance(exc, ClusterOutOfMemory):
        return False
    if isinstance(exc, TransientError):
        return True
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) and not isinstance(
        exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


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
# stage tasks


@task(name="scan", task_run_name="scan",
      **TASK_OPTIONS)
def scan_task(photos: str, run_dir: str, config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """Not Prefect-cached on purpose: its input is a folder outside the run directory; the library compares the
    folder listing with the finished scan itself (and refuses a changed folder)."""
    from sparse_vggt.ingest import scan

    manifest = scan(Path(photos), Path(run_dir), _cfg(config), force=force)
    _publish_table(artifact_key(run_dir, "images"), images_rows(run_dir),
                   f"{manifest['kept']} images kept, {manifest['skipped']} skipped, {manifest['duplicates']} "
                   f"duplicates folded (skipped rows first; full table: tables/images.parquet)")
    return manifest


@task(name="describe-plan", task_run_name="describe-plan",
      **TASK_OPTIONS)
def describe_plan_task(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    """Create the descriptor array (so chunk tasks never race to create it) and list the unfinished chunks."""
    from sparse_vggt import describe

    store = RunStore.open(run_dir)
    table = store.read_table("images", columns=["status", "chunk_id"])
    chunk = np.asarray(table.column("chunk_id").to_numpy(zero_copy_only=False))
    ok = np.asarray([s == "ok" for s in table.column("status").to_pylist()], bool)
    chunks = sorted({int(c) for c in chunk[ok].tolist()})
    cfg = _cfg(config)  # the farm head (pool dispatch) never loads MegaLoc: the workers do (issue 16)
    manifest = describe.run(Path(run_dir), cfg, units=[], load_model=cfg.orchestration.dispatch != "pool")
    done = {int(c) for c in store.complete_units("describe_chunks")}
    finished = store.is_stage_complete("describe")
    return {"chunks": chunks, "pending": [] if finished else [c for c in chunks if c not in done],
            "finished": finished, "manifest": manifest}


@task(name="describe-chunk", task_run_name="describe-chunk-{chunk_id}",
      **TASK_OPTIONS)
def describe_chunk_task(run_dir: str, config: dict[str, Any], chunk_id: int) -> dict[str, Any]:
    from sparse_vggt import describe

    manifest = describe.run(Path(run_dir), _cfg(config), units=[int(chunk_id)])
    return {"chunk_id": int(chunk_id), "computed": int(manifest.get("chunks_computed", 0)),
            "images_per_s": manifest.get("images_per_s")}


@task(name="describe-finish", task_run_name="describe-finish",
      **TASK_OPTIONS)
def describe_finish_task(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    from sparse_vggt import describe

    manifest = describe.run(Path(run_dir), _cfg(config), units=[])
    if manifest.get("pending"):
        raise RuntimeError(f"describe: {manifest['pending']} chunk(s) still unfinished in {run_dir}; re-run to resume")
    return manifest


@task(name="graph", task_run_name="covisibility-graph",
      **TASK_OPTIONS)
def graph_task(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    from sparse_vggt.graph import run as build_graph

    manifest = build_graph(Path(run_dir), _cfg(config))
    _publish_markdown(artifact_key(run_dir, "graph"), _md_kv("covisibility graph", manifest),
                      f"{manifest.get('edges')} edges, {manifest.get('components')} components")
    return manifest


@task(name="partition", task_run_name="partition",
      **TASK_OPTIONS)
def partition_task(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    from sparse_vggt.partition import run as partition

    manifest = partition(Path(run_dir), _cfg(config))
    publish_clusters(run_dir, f"{manifest.get('clusters')} clusters after partition")
    return manifest


def publish_clusters(run_dir: str, description: str) -> None:
    _publish_table(artifact_key(run_dir, "clusters"), cluster_rows(run_dir), description)


@task(name="reconstruct-cluster", task_run_name="reconstruct-cluster-{cluster_id}",
      **TASK_OPTIONS)
def reconstruct_cluster_task(run_dir: str, config: dict[str, Any], cluster_id: int,
                             isolate: bool = False) -> dict[str, Any]:
    """One cluster through (sparse) VGGT. ClusterOutOfMemory propagates (never retried): the flow splits.

    ``isolate``: run the model in this process's persistent cluster child process
    (`sparse_vggt.cluster_worker`), so an OOM kill costs this cluster only."""
    from sparse_vggt import reconstruct as lib

    if isolate:
        from sparse_vggt.cluster_worker import worker

        return worker().run(Path(run_dir), int(cluster_id), _cfg(config))
    return lib.reconstruct_cluster(Path(run_dir), int(cluster_id), _cfg(config))


@task(name="split-cluster", task_run_name="split-cluster-{cluster_id}",
      **TASK_OPTIONS)
def split_cluster_task(run_dir: str, config: dict[str, Any], cluster_id: int) -> list[int]:
    from sparse_vggt.partition import split_cluster

    return split_cluster(Path(run_dir), int(cluster_id), _cfg(config))


@task(name="reconstruct-finish", task_run_name="reconstruct-finish",
      **TASK_OPTIONS)
def reconstruct_finish_task(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    """Mark the reconstruct stage finished once every cluster of clusters.parquet is complete."""
    from sparse_vggt.reconstruct import reconstruct

    manifest = reconstruct(Path(run_dir), _cfg(config), cluster_ids=[])
    publish_clusters(run_dir, f"{manifest['clusters']} clusters, {manifest['pending']} not reconstructed")
    if manifest["pending"]:  # never cache an unfinished stage
        raise RuntimeError(f"reconstruct: {manifest['pending']} cluster(s) unfinished in {run_dir}; re-run to resume")
    return manifest


@task(name="merge", task_run_name="merge",
      **TASK_OPTIONS)
def merge_task(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    from sparse_vggt.merge import run as merge

    manifest = merge(Path(run_dir), _cfg(config))
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


@task(name="export", task_run_name="export",
      **TASK_OPTIONS)
def export_task(run_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    from sparse_vggt.export import run as export

    return export(Path(run_dir), _cfg(config))
