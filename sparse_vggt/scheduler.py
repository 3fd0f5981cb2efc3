"""The pipeline driver: what runs in which order, which failures are split, retried or reported, behind a small
`Executor` seam.

The scheduler decides; an executor only runs. `run_pipeline` walks the stages (scan -> describe units ->
graph -> partition -> cluster units -> merge -> export), skips every stage whose completion marker is set and
whose outputs verify, runs the pending units of the two unit stages through ``executor.map`` and every other
step through ``executor.call``. An out-of-memory cluster is split in two with the partitioner and the halves
are retried (at most ``orchestration.max_oom_splits`` times per original cluster; the depth is kept in
clusters.parquet). Skips, splits and failures are appended to ``<run>/orchestration/events.jsonl`` and end up
in ``<run>/orchestration/report.json``.

Executors: `sparse_vggt.local_executor` (no Prefect; clusters in the persistent child process of
`sparse_vggt.cluster_worker`) and the Prefect executor in ``flows/executor.py`` (tasks on this machine, or flow
runs on a work pool). A Ray or Dask executor is one new file implementing `Executor` plus one line in
`EXECUTORS`. The library never imports an executor's module except lazily through `load_runner`.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from .config import ConfigError, PipelineConfig
from .durable import append_event
from .store import RunStore

log = logging.getLogger(__name__)

# A unit's outcome: ("ok", result) | ("oom", reason) | ("failed", exception or reason text)
Outcome = tuple[str, Any]

# the steps an executor's `call` runs (head side, one at a time); extra arguments after (run_dir, config):
# scan (photos, force), split-cluster (cluster_id), none for the others
STEPS = ("scan", "describe-plan", "describe-finish", "graph", "partition", "split-cluster", "reconstruct-finish",
         "merge", "export")
# the unit kinds an executor's `map` runs: describe = ingest chunk ids, clusters = cluster ids
UNIT_KINDS = ("describe", "clusters")

# runners the CLI loads lazily by name (`orchestration.executor`): "module:function(photos, run_dir, cfg, force)"
EXECUTORS: dict[str, str] = {
    "prefect": "flows.reconstruct:run_pipeline",
    "local": "sparse_vggt.local_executor:run_local",
}


class FlowParameterError(ValueError):
    """The run's parameters are invalid; raised before any work starts."""


class ClusterFailures(RuntimeError):
    """Some clusters could not be reconstructed; they are listed in the report and a re-run retries them."""


class TransientError(RuntimeError):
    """A failure worth retrying as is (e.g. the worker running a cluster flow died)."""


def is_transient(exc: BaseException | None) -> bool:
    """I/O hiccups (shared storage, network) and lost workers are retried; our own errors and OOM are not."""
    from .reconstruct import ClusterOutOfMemory

    if exc is None or isinstance(exc, ClusterOutOfMemory):
        return False
    if isinstance(exc, TransientError):
        return True
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) and not isinstance(
        exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


# ---------------------------------------------------------------------------------------------------------
# the seam


class Work:
    """Which steps and units really ran in this run (the proof that a re-run is free)."""

    def __init__(self) -> None:
        self.executed: dict[str, int] = {}
        self.cached: dict[str, int] = {}  # nothing is cached any more; kept so reports keep their shape
        self.complete: dict[str, bool] = {}  # stages skipped on their completion marker

    def add(self, name: str, n: int = 1) -> None:
        self.executed[name] = self.executed.get(name, 0) + n


class Executor(Protocol):
    """Runs what the scheduler asks for; decides nothing.

    ``work`` counts what ran (name -> count; the report's ``stages_executed``). ``call`` runs one head-side
    step of `STEPS` and returns its result or raises its error (after the executor's own retries of
    transient errors). ``map`` runs units of one of `UNIT_KINDS` and yields ``(key, Outcome)`` as each
    finishes: the key is the unit id, or for a group of ids run together the list of them (describe only).
    ``notify`` shows progress to the operator (``what``: "progress", "clusters", "report"); it never fails the
    run. ``run_name`` names this run in events (None outside an orchestrated run)."""

    work: Work

    def call(self, step: str, run_dir: str, config: dict[str, Any], *args: Any) -> Any: ...

    def map(self, kind: str, run_dir: str, config: dict[str, Any], ids: list[int]) -> Iterator[tuple[Any, Outcome]]:
        ...

    def notify(self, what: str, run_dir: str, **info: Any) -> None: ...

    def run_name(self) -> str | None: ...


# ---------------------------------------------------------------------------------------------------------
# parameters and events


def validate_parameters(photos: str | Path | None, run_dir: str | Path, config: dict[str, Any] | None,
                        force: bool = False, create: bool = True) -> tuple[PipelineConfig, dict[str, Any]]:
    """Check everything we can before any work starts; returns the config object and its dict."""
    problems: list[str] = []
    try:
        cfg = PipelineConfig.from_dict(config or {}, validate=False)
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
    problems += cfg.problems()
    orch = cfg.orchestration
    if orch.executor not in EXECUTORS:
        problems.append(f"orchestration.executor={orch.executor!r}: use one of {', '.join(EXECUTORS)}")
    elif orch.executor != "prefect" and orch.dispatch == "pool":
        problems.append("orchestration.dispatch='pool' needs orchestration.executor='prefect' (the work pool)")
    if problems:
        raise FlowParameterError("invalid flow parameters:\n  " + "\n  ".join(problems))
    if photos is not None and create:
        RunStore.create_or_open(run, cfg, force=force)  # refuses a conflicting recorded config before any work
    return cfg, cfg.to_dict()


def record_event(run_dir: str | Path, kind: str, run_name: str | None = None, **info: Any) -> dict[str, Any]:
    """Append one skip/split/failure to <run>/orchestration/events.jsonl (locked: several workers may write)."""
    return append_event(run_dir, {"kind": kind, "flow_run": run_name, **info})


def _reason(info: Any) -> str:
    return f"{type(info).__name__}: {info}" if isinstance(info, BaseException) else str(info)


# ---------------------------------------------------------------------------------------------------------
# the driver


def _stage(executor: Executor, stage: str, step: str, run_dir: str, cfgd: dict[str, Any]) -> dict[str, Any]:
    """Skip a stage whose completion marker is set and whose outputs verify (no step at all), else run its step
    (the library's markers make finished units no-ops).

    A config that changes a finished stage's results is refused without ``force``; with ``force`` RunStore has
    already invalidated that stage and every later one, so a stage still marked here is valid as is."""
    store = RunStore.open(run_dir)
    if store.stage_intact(stage):
        executor.work.complete[stage] = True
        return store.stage_manifest(stage)
    return executor.call(step, run_dir, cfgd)


def _describe(executor: Executor, run_dir: str, cfgd: dict[str, Any]) -> None:
    """Every unfinished ingest chunk through ``executor.map("describe")``; the first failure is raised after
    every unit ran (finished chunks are kept for the re-run)."""
    if RunStore.open(run_dir).stage_intact("describe"):  # marker set and descriptors verify: no plan needed
        return
    plan = executor.call("describe-plan", run_dir, cfgd)
    pending = plan["pending"]
    if not pending:
        return
    total = len(pending)
    executor.notify("progress", run_dir, kind="describe", done=0, total=total,
                    note=f"descriptor chunks ({plan['chunks'] - total} of {plan['chunks']} already complete)")
    failed: list[tuple[Any, Any]] = []
    done = 0
    for key, (status, info) in executor.map("describe", run_dir, cfgd, pending):
        done += len(key) if isinstance(key, list) else 1
        executor.notify("progress", run_dir, kind="describe", done=done, total=total)
        if status != "ok":
            failed.append((key, info))
    if not failed:
        return
    first = failed[0][1]
    if isinstance(first, BaseException):
        raise first
    raise RuntimeError(f"describe: {len(failed)} unit(s) failed: "
                       + "; ".join(f"chunks {k}: {_reason(i)}" for k, i in failed)
                       + ". Re-run the same command to retry them (finished chunks are kept).")


def describe_plan(run_dir: Path, cfg: PipelineConfig) -> dict[str, Any]:
    """Create the descriptor array (so unit tasks never race to create it) and list the unfinished chunks.

    The pool head never loads the descriptor model: the workers do."""
    from . import describe

    manifest = describe.run(Path(run_dir), cfg, units=[], load_model=cfg.orchestration.dispatch != "pool")
    return {"chunks": int(manifest["chunks"]), "pending": list(manifest.get("pending_chunks", [])),
            "finished": RunStore.open(run_dir).is_stage_complete("describe"), "manifest": manifest}


def finish_stage(name: str, run_dir: str | Path, cfg: PipelineConfig) -> dict[str, Any]:
    """Finish a unit stage after its units ran (``run(units=[])``): marks it finished once every unit is
    complete, else raises (a re-run resumes the unfinished units)."""
    from .pipeline import stage

    manifest = stage(name).run(Path(run_dir), cfg, units=[])
    if manifest.get("pending"):
        what = "chunk(s)" if name == "describe" else "cluster(s)"
        raise RuntimeError(f"{name}: {manifest['pending']} {what} unfinished in {run_dir}; re-run to resume")
    return manifest


def run_step(step: str, run_dir: str | Path, cfg: PipelineConfig, *args: Any) -> Any:
    """What one of `STEPS` does in the library, for every executor (the Prefect tasks wrap the same calls):
    the stage entries from the pipeline table, plus the plan/finish halves of the two unit stages."""
    from .partition import split_cluster
    from .pipeline import stage

    run = Path(run_dir)
    if step == "scan":
        photos, *rest = args
        return stage("scan").run(run, cfg, force=bool(rest and rest[0]), photos=Path(photos))
    if step == "describe-plan":
        return describe_plan(run, cfg)
    if step in ("describe-finish", "reconstruct-finish"):
        return finish_stage(step.split("-")[0], run, cfg)
    if step == "split-cluster":
        return split_cluster(run, int(args[0]), cfg)
    if step in ("graph", "partition", "merge", "export"):
        return stage(step).run(run, cfg)
    raise ValueError(f"unknown step {step!r}; the steps are {', '.join(STEPS)}")


def run_clusters(run_dir: str, cfg: PipelineConfig, executor: Executor) -> dict[str, Any]:
    """Every unfinished cluster, with OOM splitting; returns the failures, the splits and the rounds."""
    from .cluster_worker import shutdown
    from .partition import split_depths
    from .reconstruct import cluster_status

    cfgd = cfg.to_dict()
    orch = cfg.orchestration
    all_ids, pending = cluster_status(run_dir, cfg)
    state = {"done": 0, "total": max(1, len(pending))}
    executor.notify("progress", run_dir, kind="clusters", done=0 if pending else state["total"], total=state["total"],
                    note=f"clusters reconstructed ({len(all_ids) - len(pending)} of {len(all_ids)} already complete)")
    depth = split_depths(RunStore.open(run_dir).read_table("clusters"))  # kept across re-runs
    failures: list[dict[str, Any]] = []
    splits: list[dict[str, Any]] = []
    rounds = 0

    def event(kind: str, **info: Any) -> dict[str, Any]:
        return record_event(run_dir, kind, executor.run_name(), **info)

    while pending:
        rounds += 1
        log.info("reconstructing %d cluster(s) (%s dispatch, round %d)", len(pending), orch.dispatch, rounds)
        results: dict[int, Outcome] = {}
        for cid, outcome in executor.map("clusters", run_dir, cfgd, pending):
            results[int(cid)] = outcome
            state["done"] += 1
            executor.notify("progress", run_dir, kind="clusters", done=state["done"], total=state["total"])
        nxt: list[int] = []
        for cid in sorted(results):
            kind, info = results[cid]
            if kind == "oom" and orch.oom_split and depth[cid] < orch.max_oom_splits:
                try:
                    halves = executor.call("split-cluster", run_dir, cfgd, cid)
                except Exception as exc:  # noqa: BLE001 - a cluster that cannot be split is a recorded failure
                    failures.append(event("cluster_failed", cluster_id=cid,
                                          reason=f"out of memory and could not split: {exc}"))
                    continue
                for h in halves:
                    depth[h] = depth[cid] + 1
                nxt.extend(halves)
                state["total"] += len(halves)
                splits.append(event("oom_split", cluster_id=cid, into=halves, reason=info))
                log.warning("cluster %d ran out of memory; split into %s", cid, halves)
            elif kind == "oom":
                failures.append(event("cluster_failed", cluster_id=cid,
                                      reason=f"out of memory after {depth[cid]} split(s): {info}"))
            elif kind == "failed":
                failures.append(event("cluster_failed", cluster_id=cid, reason=_reason(info)))
        pending = nxt
        if splits:
            executor.notify("clusters", run_dir, description=f"clusters after {len(splits)} out-of-memory split(s)")
    shutdown()  # frees the local child process's model memory before merge (no-op when none was started)
    executor.notify("progress", run_dir, kind="clusters", done=state["total"], total=state["total"])
    return {"failures": failures, "splits": splits, "rounds": rounds}


def run_pipeline(photos: str, run_dir: str, cfg: PipelineConfig, executor: Executor, force: bool = False,
                 after_partition: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Photos folder -> run directory with COLMAP/PLY/GLB exports, every step through ``executor``.

    The caller holds the writer lock and has validated the parameters (`validate_parameters`). Raises
    `ClusterFailures` (after writing the report) when some clusters failed."""
    from .report import build_report, publish_report

    t0 = time.perf_counter()
    cfgd = cfg.to_dict()
    manifests: dict[str, dict[str, Any]] = {}
    manifests["scan"] = executor.call("scan", run_dir, cfgd, photos, force)
    for s in manifests["scan"].get("skipped_files", []):
        log.warning("skipped %s: %s", s["path"], s["reason"])
    _describe(executor, run_dir, cfgd)
    manifests["describe"] = _stage(executor, "describe", "describe-finish", run_dir, cfgd)
    manifests["graph"] = _stage(executor, "graph", "graph", run_dir, cfgd)
    manifests["partition"] = _stage(executor, "partition", "partition", run_dir, cfgd)
    if after_partition is not None:  # a scheduled run copies the previous run's clusters with unchanged inputs
        after_partition()

    cluster_info = run_clusters(run_dir, cfg, executor)

    def report() -> dict[str, Any]:
        out = build_report(run_dir, manifests, executor.work, time.perf_counter() - t0, cluster_info, cfg,
                           executor.run_name())
        publish_report(run_dir, out)
        executor.notify("report", run_dir, report=out)
        return out

    if cluster_info["failures"]:
        report()
        raise ClusterFailures(
            f"{len(cluster_info['failures'])} cluster(s) failed: "
            + "; ".join(f"{f['cluster_id']}: {f['reason']}" for f in cluster_info["failures"])
            + f". Details in {run_dir}/orchestration/report.json; re-run the same command to retry them.")
    manifests["reconstruct"] = _stage(executor, "reconstruct", "reconstruct-finish", run_dir, cfgd)
    manifests["merge"] = _stage(executor, "merge", "merge", run_dir, cfgd)
    manifests["export"] = _stage(executor, "export", "export", run_dir, cfgd)
    out = report()
    log.info("outputs in %s: %s", out["outputs"]["export_dir"], ", ".join(out["outputs"]["files"]))
    return out


def load_runner(name: str) -> Callable[..., dict[str, Any]]:
    """The ``run_pipeline(photos, run_dir, cfg, force)`` of executor ``name`` (`EXECUTORS`), imported now: the
    CLI reaches Prefect only through here, and only when a run really has to happen."""
    try:
        module, func = EXECUTORS[name].split(":")
    except KeyError:
        raise ConfigError(f"orchestration.executor={name!r}: use one of {', '.join(EXECUTORS)}") from None
    return getattr(importlib.import_module(module), func)
