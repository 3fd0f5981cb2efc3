"""Run cluster reconstructions in a child process, so the OS out-of-memory killer costs one cluster, not the run.

Local dispatch (``orchestration.cluster_process = true``) sends each cluster to one persistent child process
(a fresh interpreter: safe with CUDA/MPS and with the parent's threads). The child keeps its model loaded between
clusters (`reconstruct.load_model` caches it), so the cost is one process start plus one model load per flow run,
not per cluster. When the child dies while a cluster is in flight:

* by SIGKILL (what the Linux OOM killer and macOS jetsam send) -> :class:`ClusterOutOfMemory`: the orchestrator
  splits the cluster and retries the halves; the next cluster gets a fresh child;
* by any other signal or exit -> :class:`ClusterProcessDied` (an ``OSError``: retried as a transient error).

A child that does not answer within the unit's time limit (:func:`unit_time_limit`: ``orchestration.
unit_timeout_s``, or derived from the cluster's frames) is taken as hung (a deadlocked driver, a stuck
accelerator): it is killed, :class:`ClusterProcessHung` (transient) is raised and the next cluster gets a fresh
child. The farm's resident model processes (`sparse_vggt.resident`) use the same limit and the same rules.

Errors inside the child come back as JSON (type, message, whether it was out of memory), never as pickles.

Fault injection for tests and drills (real faults, not mocks): ``SPARSE_VGGT_INJECT_FAULTS="sigkill@3,alloc@5"``
makes the child SIGKILL itself when asked for cluster 3, or request an impossible CPU allocation (a real
``DefaultCPUAllocator`` failure) for cluster 5; ``hang@4`` makes it sleep (never answer) on cluster 4.
With ``SPARSE_VGGT_INJECT_ONCE_DIR`` set, each fault fires once (a file per fired fault is left there).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import PipelineConfig

log = logging.getLogger(__name__)

FAULTS_ENV = "SPARSE_VGGT_INJECT_FAULTS"
ONCE_ENV = "SPARSE_VGGT_INJECT_ONCE_DIR"


class ClusterProcessDied(ChildProcessError):
    """The cluster child process ended without an answer (not by SIGKILL); transient, the cluster is retried."""


class ClusterProcessHung(ClusterProcessDied):
    """The cluster child did not answer within the unit's time limit; it was killed (transient: retried)."""


UNIT_TIMEOUT_BASE_S = 600.0  # the derived limit's fixed part: model load, warm-up, a slow first batch


def unit_time_limit(config: PipelineConfig, frames: int) -> float:
    """Seconds a unit of ``frames`` frames may take in its model process before it is taken as hung."""
    o = config.orchestration
    if o.unit_timeout_s and o.unit_timeout_s > 0:
        return float(o.unit_timeout_s)
    return UNIT_TIMEOUT_BASE_S + float(o.unit_timeout_per_frame_s) * max(int(frames), 1)


_FRAMES: dict[tuple[str, int], dict[int, int]] = {}


def cluster_frame_count(run_dir: str | Path, cluster_id: int) -> int:
    """Frames of one cluster from the run's clusters table (read once per table version); 0 if unknown."""
    from .store import RunStore

    try:
        store = RunStore.open(run_dir)
        path = store.table_path("clusters")
        key = (str(path), path.stat().st_mtime_ns)
        if key not in _FRAMES:
            ids = store.read_table("clusters", ["cluster_id"]).column("cluster_id").to_numpy()
            values, counts = np.unique(ids, return_counts=True)
            _FRAMES.clear()
            _FRAMES[key] = {int(v): int(c) for v, c in zip(values, counts)}
        return _FRAMES[key].get(int(cluster_id), 0)
    except Exception:  # noqa: BLE001 - no table (yet): the limit falls back to its fixed part
        return 0


def _inject(cluster_id: int) -> None:
    spec = os.environ.get(FAULTS_ENV, "")
    for item in filter(None, (x.strip() for x in spec.split(","))):
        kind, _, cid = item.partition("@")
        if not cid.strip().lstrip("-").isdigit() or int(cid) != int(cluster_id):
            continue
        once = os.environ.get(ONCE_ENV)
        if once:
            flag = Path(once) / f"{kind}@{int(cid)}"
            if flag.exists():
                continue
            flag.parent.mkdir(parents=True, exist_ok=True)
            flag.write_text(str(os.getpid()))
        if kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "hang":
            while True:
                time.sleep(3600)
        elif kind == "alloc":
            import torch

            torch.empty(1 << 60, dtype=torch.uint8)  # raises the allocator's "can't allocate memory"


def _child_main(req_fd: int, ans_fd: int, log_level: int) -> None:
    """Child loop: one JSON request line in, one JSON answer line out, until the request pipe closes."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    from . import reconstruct as recon

    with os.fdopen(req_fd, "rb") as requests, os.fdopen(ans_fd, "wb") as answers:
        for line in requests:
            req = json.loads(line)
            cid = int(req["cluster_id"])
            try:
                _inject(cid)
                result = recon.reconstruct_cluster(Path(req["run_dir"]), cid,
                                                   PipelineConfig.from_dict(req["config"]))
                answer: dict[str, Any] = {"ok": result}
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent as data
                answer = failure_answer(exc)
            answers.write(json.dumps(answer, default=str).encode() + b"\n")
            answers.flush()


def failure_answer(exc: BaseException) -> dict[str, Any]:
    """A unit's failure as JSON data for the process that asked (out of memory and transient errors flagged, so
    the scheduler can split or retry)."""
    from . import reconstruct as recon

    return {"error": type(exc).__name__, "message": str(exc),
            "oom": recon.is_oom(exc) or isinstance(exc, recon.ClusterOutOfMemory),
            "oom_message": getattr(exc, "message", str(exc).splitlines()[0] if str(exc) else ""),
            "transient": isinstance(exc, OSError)}


class ClusterWorker:
    """One persistent child process; ``run`` reconstructs one cluster in it (see the module docstring).

    The child is ``python -m sparse_vggt.cluster_worker`` with two pipes (not multiprocessing): it never re-imports
    the caller's ``__main__``, so scripts without a ``__main__`` guard work, and it starts clean (no inherited
    threads or accelerator context)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._req: Any = None
        self._ans: Any = None
        self._lock = threading.Lock()
        self.started = 0  # child processes started (a restart after each OOM kill)

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self.close()
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parents[1])  # the package's parent: the child imports this code
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH", "")]))
        level = logging.getLogger("sparse_vggt").getEffectiveLevel()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "sparse_vggt.cluster_worker", str(req_r), str(ans_w), str(level)],
                pass_fds=(req_r, ans_w), env=env, stdin=subprocess.DEVNULL)
        finally:
            os.close(req_r)
            os.close(ans_w)
        self._req = os.fdopen(req_w, "wb", buffering=0)
        self._ans = os.fdopen(ans_r, "rb")
        self.started += 1

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def run(self, run_dir: str | Path, cluster_id: int, config: PipelineConfig) -> dict[str, Any]:
        from .reconstruct import ClusterOutOfMemory, ReconstructError

        with self._lock:
            self._ensure()
            assert self._proc is not None
            request = json.dumps({"run_dir": str(run_dir), "cluster_id": int(cluster_id),
                                  "config": config.to_dict()}).encode() + b"\n"
            answer = None
            limit = unit_time_limit(config, cluster_frame_count(run_dir, cluster_id))
            deadline = time.monotonic() + limit
            hung = False
            try:
                self._req.write(request)
                while answer is None:
                    ready, _, _ = select.select([self._ans], [], [], 0.2)
                    if ready:
                        line = self._ans.readline()
                        if not line:  # EOF: the child is gone
                            break
                        answer = json.loads(line)
                    elif self._proc.poll() is not None:
                        break
                    elif time.monotonic() > deadline:
                        hung = True
                        break
            except (BrokenPipeError, OSError, ValueError):
                answer = None
            if hung:
                log.warning("cluster %s: no answer from the cluster process %s within %.0f s: killed as hung",
                            cluster_id, self._proc.pid, limit)
                self._proc.kill()
                self._proc.wait(timeout=10)
                self.close()
                raise ClusterProcessHung(f"cluster {cluster_id}: the cluster process did not answer within "
                                         f"{limit:.0f} s (orchestration.unit_timeout_s); it was killed and the "
                                         "cluster is retried in a new one")
            if answer is None:
                try:
                    code = self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    code = None
                self.close()
                if code == -signal.SIGKILL:
                    raise ClusterOutOfMemory(int(cluster_id), "the cluster process was killed with SIGKILL (the "
                                                              "OS out-of-memory killer)")
                raise ClusterProcessDied(f"cluster {cluster_id}: the cluster process ended with exit code {code} "
                                         "before answering; it is retried")
        if "ok" in answer:
            return answer["ok"]
        if answer.get("oom"):
            raise ClusterOutOfMemory(int(cluster_id), answer.get("oom_message") or answer.get("message", ""))
        if answer.get("transient"):
            raise OSError(f"cluster {cluster_id}: {answer['error']}: {answer['message']}")
        raise ReconstructError(f"cluster {cluster_id}: {answer['error']}: {answer['message']}")

    def close(self) -> None:
        """Stop the child (its model memory is freed): closing its request pipe ends its loop."""
        for fh in (self._req, self._ans):
            if fh is not None:
                try:
                    fh.close()
                except OSError:
                    pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = self._req = self._ans = None


_WORKER: ClusterWorker | None = None


def worker() -> ClusterWorker:
    """This process's cluster worker (created on first use)."""
    global _WORKER
    if _WORKER is None:
        _WORKER = ClusterWorker()
    return _WORKER


def shutdown() -> None:
    global _WORKER
    if _WORKER is not None:
        _WORKER.close()
        _WORKER = None


if __name__ == "__main__":
    _child_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
