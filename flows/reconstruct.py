"""The end-to-end flow: photos -> COLMAP/PLY/GLB, plus the per-cluster flow the farm runs.

``reconstruct(photos, run_dir, config)``: scan -> describe (one task per ingest chunk) -> covisibility graph ->
partition -> one reconstruction per cluster -> merge -> export. Clusters run either as mapped tasks on this machine
(``orchestration.dispatch = "local"``; a tag concurrency limit keeps one model per accelerator) or as one flow run
per cluster on a Prefect work pool (``"pool"``; one process worker per Mac mini, run directory on shared storage).

Resume: every stage and unit writes its (verified) completion marker last and the run directory is the only truth
(no Prefect cache, no persisted task results), so a re-run of a finished run does no work, a killed run recomputes
only unfinished units, and a unit whose data fails verification is redone. The flow holds the run directory's
writer lock (`sparse_vggt.lock`) for its whole duration. An out-of-memory cluster (accelerator or host, or its
child process killed by the OS) is split in two with the partitioner and the halves are retried (at most
``orchestration.max_oom_splits`` times per original cluster; the depth is kept in clusters.parquet). Skips, splits and failures are appended to ``<run>/orchestration/events.jsonl`` and end up
in the final report (``<run>/orchestration/report.json`` and a Prefect artifact).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Failed

import sparse_vggt
from sparse_vggt.config import ConfigError, PipelineConfig
from sparse_vggt.lock import writer_lock
from sparse_vggt.store import RunStore, append_event, atomic_write_bytes
from tasks.dispatch import OOM_MARK, TRANSIENT_MARK, PoolDispatcher, PoolUnit, in_flight_limit, online_workers
from tasks.stages import (
    artifact_key,
    cached,
    describe_chunk_task,
    describe_finish_task,
    describe_plan_task,
    export_task,
    graph_task,
    merge_task,
    partition_task,
    publish_clusters,
    reconstruct_cluster_task,
    reconstruct_finish_task,
    retry_options,
    scan_task,
    split_cluster_task,
)

log = logging.getLogger(__name__)

DEMO_PHOTOS = Path(sparse_vggt.__file__).parent / "data" / "sacre_coeur" / "images"
# small, random-weight settings: the whole demo runs in minutes on 2 CPU cores (geometry is meaningless)
DEMO_SETTINGS: dict[str, Any] = {
    "ingest.chunk_size": 4,
    "describe.model": "random",
    "describe.preset": "tiny",
    "describe.allow_random_weights": True,
    "describe.image_size": 112,
    "graph.k": 4,
    "partition.max_cluster_frames": 6,
    "partition.min_overlap_frames": 2,
    "partition.k": 4,
    "reconstruct.model": "random",
    "reconstruct.preset": "tiny",
    "reconstruct.allow_random_weights": True,
    "reconstruct.image_size": 112,
    "merge.min_correspondences": 20,
    "orchestration.retries": 0,
}


class FlowParameterError(ValueError):
    """The flow's parameters are invalid; raised before any work starts."""


class ClusterFailures(RuntimeError):
    """Some clusters could not be reconstructed; they are listed in the report and a re-run retries them."""


# ---------------------------------------------------------------------------------------------------------
# validation and bookkeeping


def validate_parameters(photos: str | Path | None, run_dir: str | Path, config: dict[str, Any] | None,
                        force: bool = False, create: bool = True) -> tuple[PipelineConfig, dict[str, Any]]:
    """Check everything we can before any work starts; returns the config object and its dict."""
    problems: list[str] = []
    try:
        cfg = PipelineConfig.from_dict(config or {})
    except ConfigError as exc:
        raise FlowParameterError(f"invalid config: {exc}") from exc
    if photos is not None and not Path(photos).expanduser().is_dir():
        problems.append(f"photos={photos!s} is not a folder (pass the folder that contains the photos)")
    run = Path(run_dir).expanduser()
    parent = run if run.exists() else run.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if run.exists() and not run.is_dir():
        problems.append(f"run_dir={run} exists and is not a folder")
    elif not os.access(parent, os.W_OK):
        problems.append(f"run_dir={run}: {parent} is not writable")
    orch = cfg.orchestration
    if orch.dispatch not in ("local", "pool"):
        problems.append(f"orchestration.dispatch={orch.dispatch!r}: use 'local' or 'pool'")
    if orch.dispatch == "pool" and "/" not in orch.cluster_deployment:
        problems.append(f"orchestration.cluster_deployment={orch.cluster_deployment!r} must be 'FLOW/DEPLOYMENT' "
                        "(see `sparse-vggt deploy`)")
    if orch.retries < 0 or orch.retry_delay_s < 0 or orch.max_oom_splits < 0:
        problems.append("orchestration.retries, retry_delay_s and max_oom_splits must be >= 0")
    if orch.poll_interval_s <= 0:
        problems.append("orchestration.poll_interval_s must be > 0")
    for section in ("describe", "reconstruct"):
        sub = getattr(cfg, section)
        if sub.model == "random" and not sub.allow_random_weights and not (section == "describe" and sub.descriptors_file):
            problems.append(f"{section}.model='random' needs {section}.allow_random_weights=true (tests, demos); "
                            f"otherwise point {section}.model at a checkpoint")
    if cfg.reconstruct.image_size % 14 or cfg.describe.image_size % 14:
        problems.append("describe.image_size and reconstruct.image_size must be multiples of 14")
    try:
        from sparse_vggt.partition import validate_config

        validate_config(cfg.partition)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise FlowParameterError("invalid flow parameters:\n  " + "\n  ".join(problems))
    if photos is not None and create:
        RunStore.create_or_open(run, cfg, force=force)  # refuses a conflicting recorded config before any work
    return cfg, cfg.to_dict()


def record_event(run_dir: str | Path, kind: str, **info: Any) -> dict[str, Any]:
    """Append one skip/split/failure to <run>/orchestration/events.jsonl (locked: several workers may write)."""
    return append_event(run_dir, {"kind": kind, "flow_run": _flow_run_name(), **info})


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "orchestration" / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def _flow_run_name() -> str | None:
    try:
        return runtime_flow_run.name
    except Exception:  # noqa: BLE001 - outside a flow run
        return None


def _slug(run_dir: str | Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(run_dir).resolve().name) or "run"


def _main_run_name() -> str:
    params = runtime_flow_run.parameters
    cfg = params.get("config") or {}
    dispatch = (cfg.get("orchestration") or {}).get("dispatch", "local")
    return f"reconstruct-{_slug(params['run_dir'])}-{dispatch}-{_dt.datetime.now():%Y%m%d-%H%M%S}"


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
    from prefect.exceptions import ObjectNotFound

    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

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


class _Work:
    """Which stage tasks really ran in this flow run (versus cache hits): the proof that a re-run is free."""

    def __init__(self) -> None:
        self.executed: dict[str, int] = {}
        self.cached: dict[str, int] = {}
        self.complete: dict[str, bool] = {}  # stages skipped on their completion marker

    def add(self, name: str, state: Any) -> None:
        bucket = self.cached if state.name == "Cached" else self.executed
        bucket[name] = bucket.get(name, 0) + 1

    def call(self, t: Any, *args: Any) -> Any:
        state = t(*args, return_state=True)
        self.add(t.name, state)
        return state.result()

    def stage(self, stage: str, run_dir: str, force: bool, t: Any, cfgd: dict[str, Any]) -> Any:
        """Skip a stage whose completion marker is set and whose outputs verify (no task run at all), else run
        its task (never Prefect-cached: the library's markers make finished units no-ops).

        A config that changes a finished stage's results is refused without ``force``; with ``force`` RunStore has
        already invalidated that stage and every later one, so a stage still marked here is valid as is.
        """
        store = RunStore.open(run_dir)
        if store.stage_intact(stage):  # --force already invalidated what a changed config affects
            self.complete[stage] = True
            return store.stage_manifest(stage)
        return self.call(t, run_dir, cfgd)


# ---------------------------------------------------------------------------------------------------------
# cluster stage


def _pending_clusters(run_dir: str, cfg: PipelineConfig) -> tuple[list[int], list[int]]:
    """(all clusters, those to compute): markers verified, damaged or stale ones recorded and redone."""
    from sparse_vggt.reconstruct import cluster_status

    return cluster_status(run_dir, cfg)


def _cluster_ids(run_dir: str) -> list[int]:
    store = RunStore.open(run_dir)
    return sorted({int(c) for c in store.read_table("clusters", columns=["cluster_id"]).column(0).to_pylist()})


def _failure(state: Any) -> BaseException | None:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None


def _windowed(submit: Any, items: list[Any], window: int) -> Any:
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


def _run_cluster_round(run_dir: str, cfg: PipelineConfig, cfgd: dict[str, Any], ids: list[int], work: _Work,
                       progress: Any) -> dict[int, tuple[str, Any]]:
    """Run clusters ``ids`` (local tasks or pool flow runs); returns cluster -> ("ok"|"oom"|"failed", info)."""
    from sparse_vggt.reconstruct import ClusterOutOfMemory

    orch = cfg.orchestration
    if orch.dispatch == "pool":  # bounded: at most max_in_flight flow runs, one poller (issue 16)
        return _pool_cluster_round(run_dir, cfg, cfgd, ids, work, progress)
    else:
        t = cached(run_dir, reconstruct_cluster_task, tags=[orch.accelerator_tag], **retry_options(cfgd))
        finished = _windowed(lambda c: t.submit(run_dir, cfgd, c, orch.cluster_process), ids, 1)
    out: dict[int, tuple[str, Any]] = {}
    for cid, fut in finished:
        state = fut.state
        work.add(t.name, state)
        exc = _failure(state)
        if exc is None:
            out[cid] = ("ok", state.result())
        elif isinstance(exc, ClusterOutOfMemory):
            out[cid] = ("oom", str(exc))
        else:
            out[cid] = ("failed", f"{type(exc).__name__}: {exc}")
        progress()
    return out


def pool_dispatch(run_dir: str, cfg: PipelineConfig, units: list[PoolUnit], kind: str) -> Any:
    """Run ``units`` as flow runs on the pool through one bounded `PoolDispatcher`; yields as they finish and
    keeps the monitoring artifacts and ``orchestration/dispatch-<kind>.json`` (limit, max in flight) current."""
    from prefect.client.orchestration import get_client

    orch = cfg.orchestration
    logger = get_run_logger()
    t0 = time.time()
    with get_client(sync_client=True) as client:
        online = online_workers(client, orch.work_pool)
        limit = in_flight_limit(orch.max_in_flight, online)
        logger.info("%s: %d flow run(s) on pool %s, at most %d in flight (%d worker(s) online)", kind, len(units),
                    orch.work_pool, limit, online)
        disp = PoolDispatcher(client, limit, orch.poll_interval_s, orch.run_timeout_s, orch.retries, logger,
                              start_timeout_s=orch.start_timeout_s)
        done, last = 0, 0.0
        for item in disp.run(units):
            done += 1
            if time.time() - last > 3.0 or done == len(units):
                last = time.time()
                with contextlib.suppress(Exception):
                    publish_monitoring(run_dir, kind, done, len(units), t0)
            yield item
    stats = {"kind": kind, "units": len(units), "online_workers": online, "limit": limit,
             "max_in_flight": disp.max_in_flight, "submitted": disp.submitted, "polls": disp.polls,
             "seconds": round(time.time() - t0, 2)}
    atomic_write_bytes(Path(run_dir) / "orchestration" / f"dispatch-{kind}.json", json.dumps(stats).encode())
    with contextlib.suppress(Exception):
        publish_monitoring(run_dir, kind, len(units), len(units), t0)


def describe_on_pool(run_dir: str, cfg: PipelineConfig, cfgd: dict[str, Any], pending: list[int],
                     work: _Work) -> None:
    """Descriptor chunks as flow runs on the workers, grouped so units write disjoint Zarr chunks."""
    from sparse_vggt.describe import describe_units

    orch = cfg.orchestration
    groups = describe_units(Path(run_dir), pending, orch.describe_chunks_per_run)
    units = [PoolUnit(i, orch.describe_deployment, {"run_dir": run_dir, "chunk_ids": g, "config": cfgd},
                      f"describe-{min(g)}-{max(g)}-{_slug(run_dir)}", ["sparse-vggt", "describe"])
             for i, g in enumerate(groups)]
    failed = []
    for unit, outcome, message, _ in pool_dispatch(run_dir, cfg, units, "describe"):
        work.executed["dispatch-describe"] = work.executed.get("dispatch-describe", 0) + 1
        if outcome != "ok":
            failed.append(f"chunks {unit.parameters['chunk_ids']}: {message}")
    if failed:
        raise RuntimeError(f"describe on the pool: {len(failed)} unit(s) failed: " + "; ".join(failed)
                           + f". Re-run the same command to retry them (finished chunks are kept).")


def unit_records(run_dir: str, kind: str) -> list[dict[str, Any]]:
    out = []
    for p in sorted((Path(run_dir) / "orchestration" / kind).glob("*.json")):
        with contextlib.suppress(ValueError, OSError):
            out.append(json.loads(p.read_text()))
    return out


def worker_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per worker: units, frames, frames/s of model work, and model loads per resident process (host/pid)."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        w = rows.setdefault(r.get("worker") or "?", {"worker": r.get("worker") or "?", "units": 0, "frames": 0,
                                                     "work_s": 0.0, "flow_s": 0.0, "loads": {}})
        w["units"] += 1
        w["frames"] += int(r.get("frames") or r.get("images") or 0)
        w["work_s"] += float(r.get("work_seconds") or 0)
        w["flow_s"] += float(r.get("seconds") or 0)
        key = f"{r.get('host')}/{r.get('pid')}"
        for model, n in (r.get("loads") or {}).items():
            w["loads"].setdefault(key, {})[model] = max(n, w["loads"].get(key, {}).get(model, 0))
    for w in rows.values():
        w["frames_per_s"] = round(w["frames"] / w["work_s"], 2) if w["work_s"] else None
        w["work_s"], w["flow_s"] = round(w["work_s"], 2), round(w["flow_s"], 2)
    return sorted(rows.values(), key=lambda w: w["worker"])


def publish_monitoring(run_dir: str, kind: str, done: int, total: int, t0: float) -> None:
    """Prefect UI artifacts, new versions as units finish: per-worker throughput, the stage's ETA and (clusters)
    per-cluster peak memory."""
    from prefect.artifacts import create_table_artifact

    records = unit_records(run_dir, kind)
    workers = worker_rows(records)
    elapsed = time.time() - t0
    eta = elapsed / done * (total - done) if done else None
    create_table_artifact(key=artifact_key(run_dir, f"farm-{kind}-workers"),
                          table=[{**w, "loads": json.dumps(w["loads"])} for w in workers],
                          description=f"{kind}: per-worker throughput (frames/s of model work) and model loads")
    create_markdown_artifact(
        key=artifact_key(run_dir, f"farm-{kind}-eta"),
        markdown=(f"# {kind} on the farm\n\n- finished: {done} of {total}\n- elapsed: {elapsed:.0f} s\n"
                  f"- ETA: {'%.0f s' % eta if eta is not None else 'unknown'}\n"),
        description=f"{kind}: {done}/{total} finished, ETA {'%.0f s' % eta if eta is not None else '?'}")
    if kind == "clusters":
        create_table_artifact(key=artifact_key(run_dir, "farm-cluster-memory"),
                              table=[{k: r.get(k) for k in ("cluster_id", "worker", "frames", "work_seconds",
                                                            "peak_rss_mb", "peak_accelerator_mb")}
                                     for r in sorted(records, key=lambda r: r.get("cluster_id", 0))],
                              description="per-cluster peak memory (resident process RSS; accelerator if any)")


def _pool_cluster_round(run_dir: str, cfg: PipelineConfig, cfgd: dict[str, Any], ids: list[int], work: _Work,
                        progress: Any) -> dict[int, tuple[str, Any]]:
    """Clusters as flow runs, ``orchestration.clusters_per_run`` per run; per-cluster outcomes from the run's
    state, its out-of-memory map and the clusters' completion markers (a failed batch keeps its finished ones)."""
    orch = cfg.orchestration
    k = max(1, orch.clusters_per_run)
    units = []
    for i in range(0, len(ids), k):
        b = [int(c) for c in ids[i:i + k]]
        params: dict[str, Any] = {"run_dir": run_dir, "cluster_id": b[0], "config": cfgd}
        if k > 1:
            params["batch"] = b
        name = f"cluster-{b[0]}-{_slug(run_dir)}" if len(b) == 1 else f"clusters-{b[0]}-{b[-1]}-{_slug(run_dir)}"
        units.append(PoolUnit(tuple(b), orch.cluster_deployment, params, name,
                              ["sparse-vggt"] + [f"cluster-{c}" for c in b]))
    out: dict[int, tuple[str, Any]] = {}
    for unit, outcome, message, fr in pool_dispatch(run_dir, cfg, units, "clusters"):
        work.executed["dispatch-cluster"] = work.executed.get("dispatch-cluster", 0) + len(unit.key)
        oom: dict[str, str] = {}
        batched = "batch" in unit.parameters
        if outcome == "oom" and batched:
            with contextlib.suppress(ValueError):
                oom = json.loads(message)
        done = set(RunStore.open(run_dir).complete_units("clusters")) if outcome != "ok" else set()
        for c in unit.key:
            if outcome == "ok" or str(c) in done:
                out[c] = ("ok", {"flow_run": fr.name})
            elif outcome == "oom" and (not batched or str(c) in oom):
                out[c] = ("oom", oom.get(str(c), message))
            else:
                out[c] = ("failed", message)
            progress()
    return out


def run_clusters(run_dir: str, cfg: PipelineConfig, cfgd: dict[str, Any], work: _Work) -> dict[str, Any]:
    """Every unfinished cluster, with OOM splitting; returns counts and the failures."""
    logger = get_run_logger()
    from sparse_vggt.partition import split_depths

    all_ids, pending = _pending_clusters(run_dir, cfg)
    total = max(1, len(pending))
    state = {"done": 0, "total": total}
    pid = create_progress_artifact(progress=0.0 if pending else 100.0, key=artifact_key(run_dir, "reconstruct-progress"),
                                   description=f"clusters reconstructed ({len(all_ids) - len(pending)} of "
                                               f"{len(all_ids)} already complete)")

    def tick() -> None:
        state["done"] += 1
        update_progress_artifact(pid, min(100.0, 100.0 * state["done"] / state["total"]))

    depth = split_depths(RunStore.open(run_dir).read_table("clusters"))  # kept across re-runs
    failures: list[dict[str, Any]] = []
    splits: list[dict[str, Any]] = []
    rounds = 0
    while pending:
        rounds += 1
        logger.info("reconstructing %d cluster(s) (%s dispatch, round %d)", len(pending), cfg.orchestration.dispatch,
                    rounds)
        results = _run_cluster_round(run_dir, cfg, cfgd, pending, work, tick)
        nxt: list[int] = []
        for cid in sorted(results):
            kind, info = results[cid]
            if kind == "oom" and cfg.orchestration.oom_split and depth[cid] < cfg.orchestration.max_oom_splits:
                try:
                    halves = work.call(split_cluster_task, run_dir, cfgd, cid)
                except Exception as exc:  # noqa: BLE001 - a cluster that cannot be split is a recorded failure
                    failures.append(record_event(run_dir, "cluster_failed", cluster_id=cid,
                                                 reason=f"out of memory and could not split: {exc}"))
                    continue
                for h in halves:
                    depth[h] = depth[cid] + 1
                nxt.extend(halves)
                state["total"] += len(halves)
                splits.append(record_event(run_dir, "oom_split", cluster_id=cid, into=halves, reason=info))
                logger.warning("cluster %d ran out of memory; split into %s", cid, halves)
            elif kind == "oom":
                failures.append(record_event(run_dir, "cluster_failed", cluster_id=cid,
                                             reason=f"out of memory after {depth[cid]} split(s): {info}"))
            elif kind == "failed":
                failures.append(record_event(run_dir, "cluster_failed", cluster_id=cid, reason=info))
        pending = nxt
        if splits:
            publish_clusters(run_dir, f"clusters after {len(splits)} out-of-memory split(s)")
    from sparse_vggt.cluster_worker import shutdown

    shutdown()  # frees the child's model memory before merge
    update_progress_artifact(pid, 100.0)
    return {"failures": failures, "splits": splits, "rounds": rounds}


# ---------------------------------------------------------------------------------------------------------
# report


def _outputs(run_dir: str) -> dict[str, Any]:
    export_dir = RunStore(run_dir).export_dir
    files = sorted(str(p.relative_to(export_dir)) for p in export_dir.rglob("*") if p.is_file()
                   and p.relative_to(export_dir).parts[0] != "images") if export_dir.exists() else []
    if (export_dir / "images").is_dir():  # one entry per photo (symlinks / upright copies): named once, not listed
        files.insert(0, "images/")
    return {"export_dir": str(export_dir.resolve()), "files": files}


def build_report(run_dir: str, manifests: dict[str, dict[str, Any]], work: _Work, seconds: float,
                 cluster_info: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
    store = RunStore.open(run_dir)
    scan = store.stage_manifest("scan")
    part = store.stage_manifest("partition")
    random_weights = [s for s in ("describe", "reconstruct") if getattr(cfg, s).model == "random"]
    report: dict[str, Any] = {
        "run_dir": str(Path(run_dir).resolve()),
        "flow_run": _flow_run_name(),
        "dispatch": cfg.orchestration.dispatch,
        "seconds": round(seconds, 2),
        "images_kept": scan.get("kept"),
        "images_skipped": scan.get("skipped"),
        "skipped_images": scan.get("skipped_files", []),
        "components_skipped": part.get("small_components_skipped"),
        "singletons_skipped": (part.get("singletons", 0) or 0) - (part.get("singletons_reconstructed", 0) or 0),
        "frames_not_clustered": part.get("frames_skipped"),
        "clusters": len(_cluster_ids(run_dir)),
        "oom_splits": part.get("splits", []),
        "failures": cluster_info.get("failures", []),  # this flow run's; earlier ones stay in "events"
        "events": read_events(run_dir),
        "stages_executed": dict(work.executed),
        "stages_cached": dict(work.cached),
        "stages_already_complete": sorted(work.complete),
        "merge": {k: v for k, v in manifests.get("merge", {}).items() if isinstance(v, (int, float, str, bool))},
        "outputs": _outputs(run_dir),
        "random_weights": random_weights,
        "weights": _run_weights(store),  # per model stage: random, or checkpoint file + revision
    }
    if cfg.orchestration.dispatch == "pool":  # issue 16: who did the work, model loads per worker (host/pid)
        report["farm"] = {kind: {"workers": worker_rows(unit_records(run_dir, kind)),
                                 "dispatch": _read_json(Path(run_dir) / "orchestration" / f"dispatch-{kind}.json")}
                          for kind in ("describe", "clusters")}
    return report


def _read_json(path: Path) -> Any:
    with contextlib.suppress(ValueError, OSError):
        return json.loads(path.read_text())
    return None


def _report_markdown(report: dict[str, Any]) -> str:
    lines = ["# sparse-vggt run report", ""]
    if report["random_weights"]:
        lines += [f"**WARNING: {', '.join(report['random_weights'])} ran with RANDOM weights: the geometry is "
                  "meaningless.**", ""]
    lines += [_weights_markdown(report), ""]
    for key in ("run_dir", "flow_run", "dispatch", "seconds", "images_kept", "images_skipped", "clusters",
                "components_skipped", "singletons_skipped", "frames_not_clustered"):
        lines.append(f"- **{key}**: {report.get(key)}")
    lines.append(f"- **stage tasks executed**: {report['stages_executed'] or 'none'}; cached: {report['stages_cached'] or 'none'}")
    if report["skipped_images"]:
        lines += ["", "## Skipped images", "", "| path | reason |", "|---|---|"]
        lines += [f"| {s['path']} | {s['reason']} |" for s in report["skipped_images"][:200]]
    if report["oom_splits"]:
        lines += ["", "## Out-of-memory splits", ""] + [f"- cluster {s['cluster']} -> {s['into']}" for s in report["oom_splits"]]
    if report["failures"]:
        lines += ["", "## Failures", ""] + [f"- cluster {f.get('cluster_id')}: {f.get('reason')} ({f.get('time')})"
                                            for f in report["failures"]]
    integrity = [e for e in report["events"] if e.get("kind") in ("unit_redone", "stages_invalidated",
                                                                   "stale_lock_taken_over")]
    if integrity:  # issue 15: damaged units redone, stages invalidated, stale locks taken over (all runs)
        lines += ["", "## Redone, invalidated, taken over", ""]
        lines += [f"- {e.get('time')} {e['kind']}: {e.get('unit') or e.get('stages') or e.get('owner')}: "
                  f"{e.get('reason')}" for e in integrity[-200:]]
    for kind, farm in (report.get("farm") or {}).items():  # issue 16: who did the work, model loads per worker
        d = farm.get("dispatch") or {}
        lines += ["", f"## Farm: {kind}", "", f"- flow runs: {d.get('submitted')} for {d.get('units')} unit(s); "
                  f"in-flight limit {d.get('limit')}, max observed {d.get('max_in_flight')}", "",
                  "| worker | units | frames | frames/s | model loads (host/pid) |", "|---|---|---|---|---|"]
        lines += [f"| {w['worker']} | {w['units']} | {w['frames']} | {w['frames_per_s']} | {json.dumps(w['loads'])} |"
                  for w in farm.get("workers", [])]
    if report["merge"]:
        lines += ["", "## Merge", ""] + [f"- {k}: {v}" for k, v in report["merge"].items()]
    out = report["outputs"]
    lines += ["", "## Outputs", "", f"`{out['export_dir']}`", ""] + [f"- `{f}`" for f in out["files"]]
    return "\n".join(lines)


def _run_weights(store: RunStore) -> dict[str, Any]:
    from sparse_vggt.provenance import run_weights

    return run_weights(store.meta())


def _weights_markdown(report: dict[str, Any]) -> str:
    from sparse_vggt.provenance import weights_markdown

    return weights_markdown({"stages": {s: {"manifest": {"weights": w}} for s, w in report.get("weights", {}).items()}})


def _publish_report(run_dir: str, report: dict[str, Any]) -> None:
    path = Path(run_dir) / "orchestration" / "report.json"
    atomic_write_bytes(path, json.dumps(report, indent=2, default=str).encode())
    with contextlib.suppress(Exception):
        create_markdown_artifact(key=artifact_key(run_dir, "report"), markdown=_report_markdown(report),
                                 description="final report with output paths")
    with contextlib.suppress(Exception):  # the export's plots (export/plots/*.png), inlined
        from sparse_vggt.plots import plots_markdown  # imports torch: not in every farm flow-run process

        plots = plots_markdown(RunStore(run_dir).export_dir)
        if plots:
            create_markdown_artifact(key=artifact_key(run_dir, "plots"), markdown=plots,
                                     description="cameras by cluster, cluster graph, merge residuals, image status")


# ---------------------------------------------------------------------------------------------------------
# flows


@flow(name="reconstruct", flow_run_name=_main_run_name, log_prints=True, persist_result=False)
def reconstruct(photos: str, run_dir: str, config: dict[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
    """Photos folder -> run directory with COLMAP/PLY/GLB exports (see the module docstring).

    Holds the run directory's writer lock throughout: a second run on the same directory is refused at once."""
    with writer_lock(run_dir, f"flow reconstruct {photos} {run_dir}"):
        return _reconstruct(photos, run_dir, config, force)


def _reconstruct(photos: str, run_dir: str, config: dict[str, Any] | None, force: bool,
                 after_partition: Callable[[], Any] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    photos, run_dir = str(Path(photos).expanduser().resolve()), str(Path(run_dir).expanduser().resolve())
    cfg, cfgd = validate_parameters(photos, run_dir, config, force)
    logger = get_run_logger()
    orch = cfg.orchestration
    if orch.dispatch == "local":
        ensure_accelerator_limit(orch.accelerator_tag)
    work = _Work()
    retry = retry_options(cfgd)
    manifests: dict[str, dict[str, Any]] = {}

    manifests["scan"] = work.call(scan_task.with_options(**retry), photos, run_dir, cfgd, force)
    for s in manifests["scan"].get("skipped_files", []):
        logger.warning("skipped %s: %s", s["path"], s["reason"])

    # a finished describe stage needs no plan (the finish task below is a cache hit)
    described = RunStore.open(run_dir).stage_intact("describe")  # marker set and descriptors verify
    plan = {"pending": []} if described else work.call(describe_plan_task.with_options(**retry), run_dir, cfgd)
    if plan["pending"] and orch.dispatch == "pool":  # on the workers; the head only plans and finishes
        describe_on_pool(run_dir, cfg, cfgd, plan["pending"], work)
    elif plan["pending"]:
        chunk_task = cached(run_dir, describe_chunk_task, tags=[orch.accelerator_tag] if orch.dispatch == "local" else [],
                            **retry)
        pid = create_progress_artifact(progress=0.0, key=artifact_key(run_dir, "describe-progress"),
                                       description=f"descriptor chunks ({len(plan['chunks']) - len(plan['pending'])} "
                                                   f"of {len(plan['chunks'])} already complete)")
        # one chunk at a time on this machine (also in pool mode): one model per accelerator, and chunk rows of
        # neighbouring ingest chunks may share a Zarr chunk of the descriptor array
        window = 1
        futures = []
        for n, (_, fut) in enumerate(_windowed(lambda c: chunk_task.submit(run_dir, cfgd, c), plan["pending"],
                                               window), start=1):
            work.add(chunk_task.name, fut.state)
            futures.append(fut)
            update_progress_artifact(pid, 100.0 * n / len(plan["pending"]))
        for fut in futures:
            fut.result()  # raises the first chunk failure (after its retries)
    manifests["describe"] = work.stage("describe", run_dir, force, cached(run_dir, describe_finish_task, **retry), cfgd)
    manifests["graph"] = work.stage("graph", run_dir, force, cached(run_dir, graph_task, **retry), cfgd)
    manifests["partition"] = work.stage("partition", run_dir, force, cached(run_dir, partition_task, **retry), cfgd)
    if after_partition is not None:  # the scheduled flow copies clusters with unchanged inputs here
        after_partition()

    cluster_info = run_clusters(run_dir, cfg, cfgd, work)
    if cluster_info["failures"]:
        report = build_report(run_dir, manifests, work, time.perf_counter() - t0, cluster_info, cfg)
        _publish_report(run_dir, report)
        raise ClusterFailures(
            f"{len(cluster_info['failures'])} cluster(s) failed: "
            + "; ".join(f"{f['cluster_id']}: {f['reason']}" for f in cluster_info["failures"])
            + f". Details in {run_dir}/orchestration/report.json; re-run the same command to retry them.")
    manifests["reconstruct"] = work.stage("reconstruct", run_dir, force, cached(run_dir, reconstruct_finish_task, **retry), cfgd)
    manifests["merge"] = work.stage("merge", run_dir, force, cached(run_dir, merge_task, **retry), cfgd)
    manifests["export"] = work.stage("export", run_dir, force, cached(run_dir, export_task, **retry), cfgd)

    report = build_report(run_dir, manifests, work, time.perf_counter() - t0, cluster_info, cfg)
    _publish_report(run_dir, report)
    logger.info("outputs in %s: %s", report["outputs"]["export_dir"], ", ".join(report["outputs"]["files"]))
    return report


def _cluster_run_name() -> str:
    p = runtime_flow_run.parameters
    return f"cluster-{p['cluster_id']}-{_slug(p['run_dir'])}"


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
    return f"describe-{min(ids)}-{max(ids)}-{_slug(p['run_dir'])}"


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
              "pid": answer.get("pid"), "flow_pid": os.getpid(), "flow_run": _flow_run_name(),
              "loads": answer.get("loads"), "work_seconds": answer.get("seconds"),
              "seconds": round(time.time() - started, 3), "finished": time.time(), "ok": "ok" in answer,
              "peak_rss_mb": answer.get("peak_rss_mb"), "peak_accelerator_mb": answer.get("peak_accelerator_mb")}
    atomic_write_bytes(Path(run_dir) / "orchestration" / kind / f"{name}.json", json.dumps(record).encode())


# ---------------------------------------------------------------------------------------------------------
# entry points for the CLI


def run_pipeline(photos: Path, run_dir: Path, cfg: PipelineConfig, force: bool = False) -> dict[str, Any]:
    """`sparse-vggt run`: the main flow (ephemeral Prefect unless PREFECT_API_URL points at a server)."""
    cfg_d = cfg.to_dict()
    validate_parameters(photos, run_dir, cfg_d, force, create=False)  # nothing is created for invalid parameters
    with writer_lock(run_dir, f"run {photos} {run_dir}"):
        validate_parameters(photos, run_dir, cfg_d, force)  # clear errors before Prefect starts anything
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call drowns the stage logs
        return reconstruct(str(photos), str(run_dir), cfg_d, force)


RANDOM_BANNER = (
    "\n" + "!" * 74 + "\n"
    "!!  DEMO WITH RANDOM WEIGHTS: the models are randomly initialised, so every\n"
    "!!  pose, depth map and point of this run is MEANINGLESS. It shows the\n"
    "!!  pipeline end to end; for real results load checkpoints (describe.model,\n"
    "!!  reconstruct.model) and run `sparse-vggt run PHOTOS RUN`.\n" + "!" * 74 + "\n"
)


def demo_config(overrides: list[str] | None = None) -> PipelineConfig:
    cfg = PipelineConfig()
    for key, value in DEMO_SETTINGS.items():
        cfg.set(key, value)
    return cfg.apply_overrides(overrides)


def run_demo(run_dir: Path, overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """`sparse-vggt demo`: the whole flow on the bundled photos, locally, small and (by default) random."""
    from rich.console import Console

    console = Console(stderr=True)
    cfg = demo_config(overrides)
    cfg.orchestration.dispatch = "local"
    random = [s for s in ("describe", "reconstruct") if getattr(cfg, s).model == "random"]
    if random:
        console.print(f"[bold red]{RANDOM_BANNER}[/]", highlight=False)
    console.print(f"demo: {len(list(DEMO_PHOTOS.iterdir()))} photos from {DEMO_PHOTOS} -> {Path(run_dir).resolve()} "
                  "(Prefect ephemeral mode unless PREFECT_API_URL is set)", highlight=False)
    report = run_pipeline(DEMO_PHOTOS, Path(run_dir), cfg, force=force)
    out = report["outputs"]
    console.print(f"\n[bold green]outputs[/] in {out['export_dir']}:", highlight=False)
    for f in out["files"]:
        console.print(f"  {f}", highlight=False)
    console.print(f"report: {Path(run_dir).resolve() / 'orchestration' / 'report.json'}", highlight=False)
    if random:
        console.print(f"[bold red]{RANDOM_BANNER}[/]", highlight=False)
    return {k: report[k] for k in ("run_dir", "seconds", "images_kept", "images_skipped", "clusters", "oom_splits",
                                   "stages_executed", "random_weights")} | {"export_dir": out["export_dir"],
                                                                            "outputs": out["files"]}
