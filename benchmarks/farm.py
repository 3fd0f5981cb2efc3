"""Farm scale rehearsal: a real Prefect server, two process workers, pool dispatch of describe and clusters,
one worker killed mid-run (and restarted, as launchd's KeepAlive would).

Synthetic photos (generated noise/shape images), tiny models with random weights, small images: the numbers are
about orchestration, not geometry. Prints:

* ``overhead_per_cluster_s``: (cluster-stage wall time x 2 workers - model work inside the resident processes)
  / clusters: everything a cluster costs beyond its work (flow-run process start, API calls, polling, the kill and
  its timeout). Target <= 0.5 s.
* ``api_requests_per_s``: HTTP requests the server answered / main-flow wall time (a counting middleware in
  benchmarks/_farm_server.py).
* ``head_cpu_s``: CPU seconds of the head's flow process (this process) during the main flow.
* ``lost_clusters``: clusters without a verified completion marker at the end (must be 0).
* model loads per worker (host/pid) and the in-flight bound.

    python benchmarks/farm.py                          # 2,000 photos, ~150 clusters
    python benchmarks/farm.py --photos 300 --json      # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
POOL = "farm-bench"


def make_photos(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` small JPEGs: a gradient, random rectangles and noise (distinct, decodable, above scan.min_side)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:72, 0:96]
    for i in range(n):
        img = np.empty((72, 96, 3), np.float32)
        for c in range(3):
            img[..., c] = rng.uniform(0, 255) * (xx / 96) + rng.uniform(0, 255) * (yy / 72) / 2
        for _ in range(4):
            x0, y0 = rng.integers(0, 80), rng.integers(0, 60)
            img[y0:y0 + rng.integers(6, 24), x0:x0 + rng.integers(6, 30)] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{i:05d}.jpg", quality=85)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _family(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # gone, or a zombie not yet reaped
        return ""


def _residents(worker: str, folder: Path) -> list[psutil.Process]:
    return [p for p in _worker_procs(worker, folder) if "sparse_vggt.resident" in _cmdline(p)]


def _worker_procs(worker: str, folder: Path) -> list[psutil.Process]:
    """Every process of this benchmark running as ``worker``: the worker, its flow-run processes (whatever their
    parentage) and its resident model process (all inherit SPARSE_VGGT_WORKER_NAME and the resident folder)."""
    out = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if env.get("SPARSE_VGGT_WORKER_NAME") == worker and env.get("SPARSE_VGGT_RESIDENT_DIR") == str(folder):
            out.append(p)
    return out


def _flow_run_timing(deployment: str) -> dict[str, float]:
    """Medians over the cluster flow runs (from the server): submission -> Running (the worker's poll, its
    process start and the flow module import) and Running -> end (the batch's body)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        runs: list = []
        while True:  # the API answers at most 200 per call
            page = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                                         limit=200, offset=len(runs))
            runs += page
            if len(page) < 200:
                break
    start = [(r.start_time - r.created).total_seconds() for r in runs if r.start_time and r.created]
    body = [(r.end_time - r.start_time).total_seconds() for r in runs if r.end_time and r.start_time]
    return {"flow_runs_seen": len(runs),
            "median_submit_to_running_s": round(float(np.median(start)), 2) if start else None,
            "median_running_to_end_s": round(float(np.median(body)), 2) if body else None}


def _batch_gaps(recs: list[dict]) -> dict[str, float | None]:
    """Per worker, the idle time between one cluster flow run's last cluster and the next run's first (the flow
    run's process exit and start, the worker's poll, the engine's API calls): the per-batch dead time."""
    runs: dict[tuple[str, str], list[float]] = {}
    for r in recs:
        t1 = float(r.get("finished") or 0)
        span = runs.setdefault((str(r.get("worker")), str(r.get("flow_run"))), [t1 - float(r.get("seconds") or 0), t1])
        span[0], span[1] = min(span[0], t1 - float(r.get("seconds") or 0)), max(span[1], t1)
    gaps = []
    for worker in {w for w, _ in runs}:
        spans = sorted(v for (w, _), v in runs.items() if w == worker)
        gaps += [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    return {"median_gap_between_batches_s": round(float(np.median(gaps)), 2) if gaps else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=2000)
    ap.add_argument("--max-cluster-frames", type=int, default=14)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--kill-at", type=float, default=0.3, help="kill worker-b after this fraction of clusters")
    ap.add_argument("--per-run", type=int, default=None, help="orchestration.clusters_per_run (default: the "
                                                                "config's, 0 = auto)")
    ap.add_argument("--timeout", type=float, default=30.0, help="orchestration.run_timeout_s")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="farm-bench-"))
    if work.exists():
        shutil.rmtree(work)
    home = work / "prefect_home"
    home.mkdir(parents=True)
    photos, run_dir, resident_dir = work / "photos", work / "run", work / "resident"
    t = time.perf_counter()
    make_photos(photos, args.photos)
    gen_s = time.perf_counter() - t

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
               SPARSE_VGGT_RESIDENT_DIR=str(resident_dir))
    env.pop("PREFECT_PROFILES_PATH", None)
    os.environ.update({k: env[k] for k in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED",
                                           "SPARSE_VGGT_RESIDENT_DIR")})
    count_file = home / "requests"
    procs: dict[str, subprocess.Popen] = {}

    def start_worker(name: str) -> None:
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1",
             "--name", name], env=dict(env, SPARSE_VGGT_WORKER_NAME=name),
            stdout=open(home / f"{name}.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)

    kill_info: dict[str, object] = {}
    try:
        procs["server"] = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "_farm_server.py"), str(port),
                                            str(count_file)], env=env, stdout=open(home / "server.log", "w"),
                                           stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or procs["server"].poll() is not None:
                    raise RuntimeError((home / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        for name in ("worker-a", "worker-b"):
            start_worker(name)

        from flows.deploy import register_deployments
        from flows.reconstruct import run_pipeline
        from sparse_vggt.demo import demo_config

        register_deployments(work_pool=POOL, apply=True)
        cfg = demo_config([f"partition.max_cluster_frames={args.max_cluster_frames}", "scan.chunk_size=64",
                           f"describe.image_size={args.image_size}", f"reconstruct.image_size={args.image_size}"])
        o = cfg.orchestration
        o.dispatch, o.work_pool = "pool", POOL
        o.cluster_deployment, o.describe_deployment = f"reconstruct-cluster/{POOL}", f"describe-chunks/{POOL}"
        if args.per_run:
            o.clusters_per_run = args.per_run
        o.retries, o.run_timeout_s, o.poll_interval_s, o.resident_idle_s = 3, args.timeout, 0.5, 60
        time.sleep(3)  # both workers online before the bound is computed

        def killer() -> None:  # worker-b (its flow-run process and its resident model process) dies mid-run
            while "done" not in kill_info:
                clusters = run_dir / "tables" / "clusters.parquet"
                recs = list((run_dir / "orchestration" / "clusters").glob("*.json"))
                if clusters.exists() and recs:
                    import pyarrow.parquet as pq

                    n = len(set(pq.read_table(clusters, columns=["cluster_id"]).column(0).to_pylist()))
                    mine = _worker_procs("worker-b", resident_dir)
                    flow_runs = [p for p in mine if "flow-run" in _cmdline(p) or "flow_run" in _cmdline(p)
                                 or p.pid != procs["worker-b"].pid and "sparse_vggt.resident" not in _cmdline(p)]
                    if len(recs) >= args.kill_at * n and flow_runs:  # a flow run is in progress there
                        victims = mine
                        what = [" ".join(_cmdline(p).split()[1:4])[:60] for p in victims]
                        for p in victims:
                            try:
                                p.send_signal(signal.SIGKILL)
                            except psutil.Error:
                                pass
                        kill_info.update(at_clusters=len(recs), of=n, killed=len(victims), time=time.time(),
                                         what=what)
                        time.sleep(2)
                        start_worker("worker-b")  # launchd KeepAlive restarts it
                        return
                time.sleep(0.2)

        threading.Thread(target=killer, daemon=True).start()
        me = psutil.Process()
        cpu0, req0, t0 = sum(me.cpu_times()[:2]), int(count_file.read_text() or 0), time.perf_counter()
        report = run_pipeline(photos, run_dir, cfg)
        wall = time.perf_counter() - t0
        cpu = sum(me.cpu_times()[:2]) - cpu0
        time.sleep(1.2)
        requests = int(count_file.read_text() or 0) - req0
        kill_info["done"] = True
        timing = _flow_run_timing(f"reconstruct-cluster/{POOL}")
    finally:
        for p in procs.values():
            for q in _family(p.pid):
                try:
                    q.kill()
                except psutil.Error:
                    pass
        for q in _residents("worker-a", resident_dir) + _residents("worker-b", resident_dir):
            q.kill()

    from sparse_vggt.report import unit_records
    from sparse_vggt.store import RunStore

    store = RunStore.open(run_dir)
    ids = {int(c) for c in store.read_table("clusters", columns=["cluster_id"]).column(0).to_pylist()}
    done = {int(c) for c in store.complete_units("clusters")}
    disp = json.loads((run_dir / "orchestration" / "dispatch-clusters.json").read_text())
    ddisp = json.loads((run_dir / "orchestration" / "dispatch-describe.json").read_text())
    recs = unit_records(str(run_dir), "clusters")
    work_s = sum(float(r.get("work_seconds") or 0) for r in recs)
    loads = {w["worker"]: w["loads"] for k in ("describe", "clusters") for w in report["farm"][k]["workers"]}
    row = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
        "photos": args.photos, "images_kept": report["images_kept"], "clusters": len(ids),
        "lost_clusters": len(ids - done), "wall_s": round(wall, 1), "gen_photos_s": round(gen_s, 1),
        "describe_stage_s": ddisp["seconds"], "describe_units": ddisp["units"],
        "cluster_stage_s": disp["seconds"], "cluster_work_s": round(work_s, 1),
        "overhead_per_cluster_s": round((disp["seconds"] * 2 - work_s) / max(1, len(ids)), 3),
        "api_requests": requests, "api_requests_per_s": round(requests / wall, 1),
        "head_cpu_s": round(cpu, 1), "in_flight_limit": disp["limit"], "max_in_flight": disp["max_in_flight"],
        "cluster_flow_runs_submitted": disp["submitted"], "polls": disp["polls"], "killed": kill_info,
        "model_loads": loads, "failures": len(report["failures"]),
        "clusters_per_run": disp.get("clusters_per_run", o.clusters_per_run),
        "clusters_per_run_mode": disp.get("clusters_per_run_mode", "configured"),
        # where a cluster's time goes beyond its model work (per cluster, from the unit records and the server)
        "in_flow_overhead_per_cluster_s": round(sum(float(r.get("seconds") or 0) - float(r.get("work_seconds") or 0)
                                                    for r in recs) / max(1, len(recs)), 3),
        **timing, **_batch_gaps(recs),
    }
    if args.json:
        print(json.dumps(row))
    else:
        for k, v in row.items():
            print(f"{k:>28}: {v}")


if __name__ == "__main__":
    main()
