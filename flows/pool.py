"""Pool dispatch for the Prefect executor: units as flow runs on the work pool, bounded, with farm monitoring.

`pool_dispatch` runs `PoolUnit`s through one bounded `tasks.dispatch.PoolDispatcher` and keeps the Prefect UI's
farm artifacts (per-worker throughput, ETA, per-cluster memory) and ``orchestration/dispatch-<kind>.json``
current. `describe_on_pool` and `clusters_on_pool` turn the scheduler's unit ids into flow runs (describe
chunks grouped so units write disjoint Zarr chunks; ``orchestration.clusters_per_run`` clusters per run, or
`cluster_batch_size` when that is 0) and yield per-unit outcomes in the scheduler's `Outcome` form.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Iterator

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from sparse_vggt.config import PipelineConfig
from sparse_vggt.report import unit_records, worker_rows
from sparse_vggt.scheduler import Outcome, Work
from sparse_vggt.durable import atomic_write_bytes
from sparse_vggt.store import RunStore
from tasks.dispatch import PoolDispatcher, PoolUnit, in_flight_limit, online_workers
from tasks.stages import artifact_key


def slug(run_dir: str | Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(run_dir).resolve().name) or "run"


# Auto batch size: each in-flight slot should get about this many batches, so the last round (where slots run
# dry while others finish) is ~1/4 of a slot's work; the cap keeps a batch's retry after a lost worker cheap.
BATCH_ROUNDS = 4
MAX_AUTO_BATCH = 16


def cluster_batch_size(configured: int, pending: int, limit: int, rounds: int = BATCH_ROUNDS,
                       cap: int = MAX_AUTO_BATCH) -> int:
    """Clusters per flow run: ``configured`` when > 0; 0 = auto, ceil(pending / (limit x rounds)) clamped to
    [1, cap]. Every flow run pays a fixed gap on its worker (the worker's poll, the run's process start), so
    large runs want large batches; small runs want batches of 1 so no worker idles while another finishes a
    batch at the end of the stage."""
    if configured and configured > 0:
        return int(configured)
    return max(1, min(int(cap), math.ceil(int(pending) / (max(1, int(limit)) * max(1, int(rounds))))))


def pool_bound(cfg: PipelineConfig, client: Any = None) -> tuple[int, int]:
    """(online workers, in-flight limit) of the configured work pool: what the dispatcher bounds itself by."""
    orch = cfg.orchestration
    if client is None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as own:
            return pool_bound(cfg, own)
    online = online_workers(client, orch.work_pool)
    return online, in_flight_limit(orch.max_in_flight, online)


def pool_dispatch(run_dir: str, cfg: PipelineConfig, units: list[PoolUnit], kind: str,
                  bound: tuple[int, int] | None = None, extra: dict[str, Any] | None = None) -> Any:
    """Run ``units`` as flow runs on the pool through one bounded `PoolDispatcher`; yields as they finish and
    keeps the monitoring artifacts and ``orchestration/dispatch-<kind>.json`` (limit, max in flight, and
    ``extra``) current. ``bound`` = (online workers, limit) when the caller already computed it."""
    from prefect.client.orchestration import get_client

    orch = cfg.orchestration
    logger = get_run_logger()
    t0 = time.time()
    with get_client(sync_client=True) as client:
        online, limit = bound if bound is not None else pool_bound(cfg, client)
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
             "seconds": round(time.time() - t0, 2), **(extra or {})}
    atomic_write_bytes(Path(run_dir) / "orchestration" / f"dispatch-{kind}.json", json.dumps(stats).encode())
    with contextlib.suppress(Exception):
        publish_monitoring(run_dir, kind, len(units), len(units), t0)


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


def describe_on_pool(run_dir: str, cfg: PipelineConfig, cfgd: dict[str, Any], pending: list[int],
                     work: Work) -> Iterator[tuple[Any, Outcome]]:
    """Descriptor chunks as flow runs on the workers, grouped so units write disjoint Zarr chunks
    (`describe.describe_units`); yields (the unit's chunk ids, outcome)."""
    from sparse_vggt.describe import describe_units

    orch = cfg.orchestration
    groups = describe_units(Path(run_dir), pending, orch.describe_chunks_per_run)
    units = [PoolUnit(i, orch.describe_deployment, {"run_dir": run_dir, "chunk_ids": g, "config": cfgd},
                      f"describe-{min(g)}-{max(g)}-{slug(run_dir)}", ["sparse-vggt", "describe"])
             for i, g in enumerate(groups)]
    for unit, outcome, message, _ in pool_dispatch(run_dir, cfg, units, "describe"):
        work.add("dispatch-describe")
        yield unit.parameters["chunk_ids"], ("ok", None) if outcome == "ok" else ("failed", message)


def clusters_on_pool(run_dir: str, cfg: PipelineConfig, cfgd: dict[str, Any], ids: list[int],
                     work: Work) -> Iterator[tuple[int, Outcome]]:
    """Clusters as flow runs, ``orchestration.clusters_per_run`` per run (0: `cluster_batch_size` from the
    pending count and the in-flight limit, computed once here and recorded in ``dispatch-clusters.json``);
    per-cluster outcomes from the run's state, its out-of-memory map and the clusters' completion markers (a
    failed batch keeps its finished ones)."""
    orch = cfg.orchestration
    bound = pool_bound(cfg)
    k = cluster_batch_size(orch.clusters_per_run, len(ids), bound[1])
    get_run_logger().info("clusters: %d pending, %d per flow run (%s)", len(ids), k,
                          "configured" if orch.clusters_per_run > 0 else f"auto, in-flight limit {bound[1]}")
    units = []
    for i in range(0, len(ids), k):
        b = [int(c) for c in ids[i:i + k]]
        params: dict[str, Any] = {"run_dir": run_dir, "cluster_id": b[0], "config": cfgd}
        if k > 1:
            params["batch"] = b
        name = f"cluster-{b[0]}-{slug(run_dir)}" if len(b) == 1 else f"clusters-{b[0]}-{b[-1]}-{slug(run_dir)}"
        units.append(PoolUnit(tuple(b), orch.cluster_deployment, params, name,
                              ["sparse-vggt"] + [f"cluster-{c}" for c in b]))
    sizing = {"clusters_per_run": k, "clusters_per_run_mode": "configured" if orch.clusters_per_run > 0 else "auto"}
    for unit, outcome, message, fr in pool_dispatch(run_dir, cfg, units, "clusters", bound, sizing):
        work.add("dispatch-cluster", len(unit.key))
        oom: dict[str, str] = {}
        batched = "batch" in unit.parameters
        if outcome == "oom" and batched:
            with contextlib.suppress(ValueError):
                oom = json.loads(message)
        done = set(RunStore.open(run_dir).complete_units("clusters")) if outcome != "ok" else set()
        for c in unit.key:
            if outcome == "ok" or str(c) in done:
                yield c, ("ok", {"flow_run": fr.name})
            elif outcome == "oom" and (not batched or str(c) in oom):
                yield c, ("oom", oom.get(str(c), message))
            else:
                yield c, ("failed", message)
