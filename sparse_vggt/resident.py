"""A model-resident process per farm worker: every flow run on that worker reuses one loaded model.

A Prefect process worker starts a fresh Python process per flow run, so a model loaded inside a flow run is
loaded again for the next one (VGGT-1B is 5 GB: ~600 loads for 600 clusters). Instead the flow run asks a
resident server process on its worker, found by a Unix socket whose name is derived from (worker name, run
directory, result-affecting model settings). The first flow run of a run on a worker starts it; later ones
connect. The server loads each model on first use and keeps it (`reconstruct.load_model` caches per process;
`describe.RESIDENT` keeps describers), answers one request at a time, and exits after ``idle_s`` seconds
without a request, so a finished run frees its memory. A different run directory or model setting gets a
different server, so a stale model is never reused.

Each answer carries the server's pid, its model loads so far (``{"reconstruct": 1, "describe": 1}``) and the
request's peak resident memory (sampled) plus the accelerator's peak where torch reports one: the farm report
lists model loads per worker (host/pid) from these.

When the server dies while answering, the client tells how, as local mode's cluster child does
(`sparse_vggt.cluster_worker`):

* killed by SIGKILL (the Linux OOM killer, macOS jetsam) while the worker lives: a cluster answers as out of
  memory (``oom``), so the head splits it like an out-of-memory error; a describe unit raises
  :class:`ResidentDied` (transient: retried);
* any other end (SIGTERM, an exit, a failed start, a lost connection): :class:`ResidentDied` (transient);
* no answer within the unit's time limit (`cluster_worker.unit_time_limit`): the client SIGKILLs the server
  (hung) and raises :class:`ResidentHung` (transient); the next request starts a new server.

How it ended is known exactly when this process started the server (its exit status); otherwise the server's
exit note tells: a server that exits in an orderly way (idle, SIGTERM, an error) leaves ``<key>.<pid>.exit``;
one that is gone without a note was SIGKILLed. If the worker itself is gone too (the flow run's parent
process died: the whole machine or worker was killed), the unit is retried, not split.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .config import PipelineConfig

log = logging.getLogger(__name__)

DIR_ENV = "SPARSE_VGGT_RESIDENT_DIR"
WORKER_ENV = "SPARSE_VGGT_WORKER_NAME"


class ResidentDied(ConnectionError):
    """The resident process ended before answering; transient (the unit is retried on a new process)."""


class ResidentHung(ResidentDied):
    """The resident process did not answer within the unit's time limit; it was killed (transient)."""


_STARTED: dict[str, subprocess.Popen] = {}  # servers this process started: their exit status is known exactly
_PARENT = os.getppid()  # the worker that started this flow run; another parent later means it died


def worker_name() -> str:
    return os.environ.get(WORKER_ENV) or socket.gethostname()


def socket_dir() -> Path:
    d = Path(os.environ.get(DIR_ENV) or f"/tmp/sparse-vggt-resident-{os.getuid()}")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def resident_key(run_dir: str | Path, config: PipelineConfig) -> str:
    """Same worker + run + model settings -> same server; anything else gets its own."""
    ra = config.result_affecting()
    blob = json.dumps({"worker": worker_name(), "run": str(Path(run_dir).resolve()),
                       "describe": ra.get("describe"), "reconstruct": ra.get("reconstruct"),
                       "devices": [config.describe.device, config.reconstruct.device]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# ---- server -------------------------------------------------------------------------------------------


def _loads() -> dict[str, int]:
    from . import describe, reconstruct

    return {"reconstruct": len(reconstruct._MODELS), "describe": len(describe.RESIDENT or {})}


class _PeakSampler:
    """Peak RSS of this process during one request (sampled every 20 ms: a per-request figure, unlike ru_maxrss)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> "_PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _accelerator_peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _accelerator_peak_mb() -> float | None:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if getattr(torch, "mps", None) is not None and torch.backends.mps.is_available():
        return round(torch.mps.driver_allocated_memory() / 2**20, 1)
    return None


def _handle(req: dict[str, Any]) -> dict[str, Any]:
    from . import describe as desc
    from . import reconstruct as recon
    from .cluster_worker import _inject, failure_answer

    run_dir = Path(req["run_dir"])
    _accelerator_peak_reset()
    t0 = time.perf_counter()
    with _PeakSampler() as peak:
        try:
            cfg = PipelineConfig.from_dict(req["config"])  # an invalid config is answered, not fatal to the server
            if req["kind"] == "cluster":
                cid = int(req["unit"])
                _inject(cid)
                result: Any = recon.reconstruct_cluster(run_dir, cid, cfg)
            elif req["kind"] == "describe":
                result = desc.run(run_dir, cfg, units=[int(c) for c in req["unit"]], finish=False)
            else:
                raise ValueError(f"unknown request kind {req['kind']!r}")
            answer: dict[str, Any] = {"ok": result}
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the client as data
            answer = failure_answer(exc)
    answer.update(pid=os.getpid(), host=socket.gethostname(), worker=worker_name(), loads=_loads(),
                  seconds=round(time.perf_counter() - t0, 4), peak_rss_mb=round(peak.peak / 2**20, 1),
                  peak_accelerator_mb=_accelerator_peak_mb(),
                  max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return answer


def serve(sock_path: str, idle_s: float) -> None:
    """Answer requests on ``sock_path`` (one JSON line in, one out) until idle for ``idle_s`` seconds."""
    from . import describe as desc

    desc.RESIDENT = {}
    path = Path(sock_path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    srv.bind(str(tmp))
    srv.listen(16)
    pid = os.getpid()
    note = _exit_note(path, pid)
    for old in path.parent.glob("*.exit"):  # notes nobody asked for (servers that ended idle) older than a day
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > 86400:
                old.unlink()
    _pid_file(path).write_text(str(pid))
    os.replace(tmp, path)  # appears only once it accepts connections
    ino = os.stat(path).st_ino

    def _terminated(signum: int, frame: Any) -> None:  # an orderly stop: say so, so it is not taken for an OOM kill
        note.write_text(f"signal {signum}")
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, _terminated)
    reason = "error"
    srv.settimeout(idle_s)
    log.info("resident process %d serving %s (idle exit after %.0f s)", os.getpid(), path, idle_s)
    try:
        while True:
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                reason = "idle"
                break
            with conn, conn.makefile("rwb") as fh:
                line = fh.readline()
                if not line:
                    continue
                answer = _handle(json.loads(line))
                try:
                    fh.write(json.dumps(answer, default=str).encode() + b"\n")
                    fh.flush()
                except OSError:  # the flow run went away (cancelled); the unit's marker says what was done
                    pass
    finally:
        try:  # remove the socket unless a newer server already replaced it
            if os.stat(path).st_ino == ino:
                path.unlink()
        except OSError:
            pass
        srv.close()
        note.write_text(reason)


def _pid_file(path: Path) -> Path:
    return path.with_suffix(".pid")


def _exit_note(path: Path, pid: int) -> Path:
    return path.with_suffix(f".{pid}.exit")


def _server_pid(path: Path) -> int | None:
    try:
        return int(_pid_file(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _how_it_ended(path: Path, pid: int | None, wait_s: float = 10.0) -> str:
    """"sigkill", "alive", or the orderly end's reason (exit code, signal, idle, error, unknown)."""
    if pid is None:
        return "unknown"
    proc = _STARTED.get(str(path))
    if proc is not None and proc.pid == pid:
        try:
            code = proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return "alive"
        _exit_note(path, pid).unlink(missing_ok=True)
        return "sigkill" if code == -signal.SIGKILL else f"exit code {code}"
    import psutil

    deadline = time.monotonic() + wait_s
    while True:  # not our child: wait until it is gone (a zombie is gone), then read its exit note
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        if time.monotonic() > deadline:
            return "alive"
        time.sleep(0.05)
    note = _exit_note(path, pid)
    try:
        reason = note.read_text().strip() or "unknown"
    except OSError:
        return "sigkill"  # no exit handler ran: only SIGKILL (or a hard crash) ends a server like that
    note.unlink(missing_ok=True)
    return reason


def _kill(path: Path, pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc = _STARTED.get(str(path))
    if proc is not None and proc.pid == pid:
        proc.wait(timeout=10)


def _unit_frames(kind: str, run_dir: str | Path, config: PipelineConfig, unit: Any) -> int:
    from .cluster_worker import cluster_frame_count

    if kind == "cluster":
        return cluster_frame_count(run_dir, int(unit))
    return len(unit) * max(1, int(config.scan.chunk_size))


# ---- client -------------------------------------------------------------------------------------------


def _connect(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return s
    except OSError:
        s.close()
        return None


def _start(path: Path, idle_s: float, timeout: float = 120.0) -> socket.socket:
    lock = path.with_suffix(".lock")
    with open(lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # one start per key even when two flow runs race
        s = _connect(path)
        if s is not None:
            return s
        try:
            path.unlink()  # a dead server's socket
        except FileNotFoundError:
            pass
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH", "")]))
        logf = open(path.with_suffix(".log"), "ab")
        proc = subprocess.Popen([sys.executable, "-m", "sparse_vggt.resident", str(path), str(idle_s)], env=env,
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)  # outlives this flow run; exits when idle
        _STARTED[str(path)] = proc
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = _connect(path)
            if s is not None:
                return s
            if proc.poll() is not None:
                raise ResidentDied(f"resident process exited with code {proc.returncode} at start; see "
                                   f"{path.with_suffix('.log')}")
            time.sleep(0.05)
        proc.kill()
        raise ResidentDied(f"resident process did not listen on {path} within {timeout:.0f} s")


def call(kind: str, run_dir: str | Path, config: PipelineConfig, unit: Any, idle_s: float = 60.0
         ) -> dict[str, Any]:
    """Run one unit (``kind`` "cluster": a cluster id; "describe": a list of ingest chunk ids) in this worker's
    resident process; returns the raw answer (``ok`` or ``error`` plus pid/loads/peak memory)."""
    from .cluster_worker import unit_time_limit

    path = socket_dir() / f"{resident_key(run_dir, config)}.sock"
    s = _connect(path) or _start(path, idle_s)
    pid = _server_pid(path)
    limit = unit_time_limit(config, _unit_frames(kind, run_dir, config, unit))
    request = {"kind": kind, "run_dir": str(run_dir), "config": config.to_dict(), "unit": unit}
    s.settimeout(limit)
    with s, s.makefile("rwb") as fh:
        try:
            fh.write(json.dumps(request).encode() + b"\n")
            fh.flush()
            line = fh.readline()
        except TimeoutError as exc:  # socket.timeout: the watchdog
            log.warning("%s %s: no answer from resident process %s within %.0f s: killed as hung", kind, unit, pid,
                        limit)
            _kill(path, pid)
            raise ResidentHung(f"{kind} {unit}: the resident process on {worker_name()} did not answer within "
                               f"{limit:.0f} s (orchestration.unit_timeout_s); it was killed, the unit is retried on "
                               "a new one") from exc
        except OSError as exc:
            raise ResidentDied(f"{kind} {unit}: resident process connection failed ({exc}); retried") from exc
    if line:
        return json.loads(line)
    how = _how_it_ended(path, pid)
    worker_alive = os.getppid() == _PARENT
    if how == "sigkill" and kind == "cluster" and worker_alive:
        message = (f"the resident model process {pid} on {worker_name()} was killed with SIGKILL (the OS "
                   "out-of-memory killer)")
        log.warning("cluster %s: %s", unit, message)
        return {"error": "ResidentKilled", "message": message, "oom": True, "oom_message": message,
                "transient": False, "pid": pid, "host": socket.gethostname(), "worker": worker_name()}
    raise ResidentDied(f"{kind} {unit}: the resident process {pid} on {worker_name()} ended before answering "
                       f"({how}{'' if worker_alive else '; its worker is gone too'}); the unit is retried on a new "
                       "process")


def raise_for(answer: dict[str, Any], kind: str, unit: Any) -> Any:
    """The answer's result, or the matching library exception (OOM -> ClusterOutOfMemory for clusters)."""
    if "ok" in answer:
        return answer["ok"]
    from .reconstruct import ClusterOutOfMemory, ReconstructError  # imports torch: only on a failure

    if answer.get("oom") and kind == "cluster":
        raise ClusterOutOfMemory(int(unit), answer.get("oom_message") or answer.get("message", ""))
    if answer.get("transient"):
        raise OSError(f"{kind} {unit}: {answer['error']}: {answer['message']}")
    raise ReconstructError(f"{kind} {unit}: {answer['error']}: {answer['message']}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(sys.argv[1], float(sys.argv[2]))
