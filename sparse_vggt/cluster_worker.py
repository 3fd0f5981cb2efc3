"""Run cluster reconstructions in a child process, so the OS out-of-memory killer costs one cluster, not the run.

Local dispatch (``orchestration.cluster_process = true``) sends each cluster to one persistent child process
(``spawn``: safe with CUDA/MPS and with the parent's threads). The child keeps its model loaded between
clusters (`reconstruct.load_model` caches it), so the cost is one process start plus one model load per flow run,
not per cluster. When the child dies while a cluster is in flight:

* by SIGKILL (what the Linux OOM killer and macOS jetsam send) -> :class:`ClusterOutOfMemory`: the orchestrator
  splits the cluster and retries the halves; the next cluster gets a fresh child;
* by any other signal or exit -> :class:`ClusterProcessDied` (an ``OSError``: retried as a transient error).

Errors inside the child come back as JSON (type, message, whether it was out of memory), never as pickles.

Fault injection for tests and drills (real faults, not mocks): ``SPARSE_VGGT_INJECT_FAULTS="sigkill@3,alloc@5"``
makes the child SIGKILL itself when asked for cluster 3, or request an impossible CPU allocation (a real
``DefaultCPUAllocator`` failure) for cluster 5. With ``SPARSE_VGGT_INJECT_ONCE_DIR`` set, each fault fires once
(a file per fired fault is left there).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import threading
from pathlib import Path
from typing import Any

from .config import PipelineConfig

log = logging.getLogger(__name__)

FAULTS_ENV = "SPARSE_VGGT_INJECT_FAULTS"
ONCE_ENV = "SPARSE_VGGT_INJECT_ONCE_DIR"


class ClusterProcessDied(ChildProcessError):
    """The cluster child process ended without an answer (not by SIGKILL); transient, the cluster is retried."""


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
        elif kind == "alloc":
            import torch

            torch.empty(1 << 60, dtype=torch.uint8)  # raises the allocator's "can't allocate memory"


def _child_main(conn: Any, log_level: int) -> None:
    """Child loop: JSON request in, JSON answer out, until the pipe closes."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    from . import reconstruct as recon

    while True:
        try:
            req = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        cid = int(req["cluster_id"])
        try:
            _inject(cid)
            result = recon.reconstruct_cluster(Path(req["run_dir"]), cid, PipelineConfig.from_dict(req["config"]))
            answer: dict[str, Any] = {"ok": result}
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent as data
            answer = {"error": type(exc).__name__, "message": str(exc), "oom": recon.is_oom(exc)
                      or isinstance(exc, recon.ClusterOutOfMemory),
                      "oom_message": getattr(exc, "message", str(exc).splitlines()[0] if str(exc) else ""),
                      "transient": isinstance(exc, OSError)}
        conn.send_bytes(json.dumps(answer, default=str).encode())


class ClusterWorker:
    """One persistent child process; ``run`` reconstructs one cluster in it (see the module docstring)."""

    def __init__(self) -> None:
        self._proc: Any = None
        self._conn: Any = None
        self._lock = threading.Lock()
        self.started = 0  # child processes started (a restart after each OOM kill)

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self.close()
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        level = logging.getLogger("sparse_vggt").getEffectiveLevel()
        self._proc = ctx.Process(target=_child_main, args=(child, level), name="sparse-vggt-cluster", daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        self.started += 1

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def run(self, run_dir: str | Path, cluster_id: int, config: PipelineConfig) -> dict[str, Any]:
        from .reconstruct import ClusterOutOfMemory, ReconstructError

        with self._lock:
            self._ensure()
            request = json.dumps({"run_dir": str(run_dir), "cluster_id": int(cluster_id),
                                  "config": config.to_dict()}).encode()
            answer = None
            try:
                self._conn.send_bytes(request)
                while answer is None:
                    if self._conn.poll(0.2):
                        answer = json.loads(self._conn.recv_bytes())
                    elif not self._proc.is_alive():
                        break
            except (EOFError, OSError):
                answer = None
            if answer is None:
                self._proc.join(timeout=10)
                code = self._proc.exitcode
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
        """Stop the child (its model memory is freed)."""
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
        if self._proc is not None:
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)
        self._proc = self._conn = None


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
