"""Deploy as written: prefect.yaml is generated from flows/deploy.py; `sparse-vggt deploy` and `prefect deploy
--all` (deploy/README.md, verbatim) register the same deployments on a real temporary server, plus the zombie-run
automation; the compose file, the launchd files and the heartbeat settings are checked as far as this machine
allows (no docker engine, no launchd)."""

from __future__ import annotations

import os
import plistlib
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import deploy

REPO = Path(__file__).resolve().parents[1]


def test_prefect_yaml_is_the_rendering_of_flows_deploy():
    assert (REPO / "prefect.yaml").read_text() == deploy.prefect_yaml(), \
        "prefect.yaml is stale: run `sparse-vggt deploy --write-yaml prefect.yaml`"
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert doc["pull"] == [] and not (REPO / "deploy" / "prefect.yaml").exists()
    from prefect.utilities.importtools import import_object

    for d in doc["deployments"]:  # module entrypoints that import from anywhere (installed package)
        assert ".py" not in d["entrypoint"] and callable(import_object(d["entrypoint"]))


def test_heartbeat_setting_is_prefects_and_the_zombie_threshold_has_margin(monkeypatch):
    from prefect.settings import Settings

    for s in deploy.deployment_specs():
        env = s["job_variables"]["env"]
        assert env["HF_HUB_OFFLINE"] == "1"
        monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
        assert Settings().flows.heartbeat_frequency == deploy.HEARTBEAT_S
    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
    assert Settings().flows.heartbeat_frequency == deploy.PREFECT_DEFAULT_HEARTBEAT_S
    spec = deploy.automation_spec()
    assert spec["trigger"]["within"] >= 4 * deploy.HEARTBEAT_S
    assert spec["trigger"]["within"] > deploy.PREFECT_DEFAULT_HEARTBEAT_S + 60
    nightly = next(s for s in deploy.deployment_specs() if s["name"] == "nightly")
    assert nightly["concurrency_limit"]["limit"] == 1 and nightly["schedule"]["active"] is False


def _interpolate(text: str, env: dict[str, str]) -> str:
    """docker compose's ${VAR}, ${VAR:-default}, ${VAR:?error} (the forms the file uses)."""
    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if op == ":?" and not env.get(name):
            raise KeyError(f"{name}: {arg}")
        if op == ":-" and not env.get(name):
            return arg
        return env.get(name, "")
    return re.sub(r"\$\{([A-Z_]+)(?:(:[-?])([^}]*))?\}", sub, text)


@pytest.mark.parametrize("with_auth", [False, True])
def test_compose_file_with_and_without_auth(with_auth, tmp_path):
    text = (REPO / "deploy" / "docker-compose.yml").read_text()
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        _interpolate(text, {})
    env = {"POSTGRES_PASSWORD": "pw"} | ({"PREFECT_BIND": "10.0.0.2", "PREFECT_PUBLIC_HOST": "10.0.0.2"} if with_auth
                                         else {})
    doc = yaml.safe_load(_interpolate(text, env))
    server = doc["services"]["prefect-server"]
    # never an empty auth string (it turns auth on and answers 401): only from the optional auth.env file
    assert "PREFECT_SERVER_API_AUTH_STRING" not in server["environment"]
    assert server["env_file"] == [{"path": "./auth.env", "required": False}]
    assert all(v != "" for v in server["environment"].values())
    assert server["ports"] == [f"{'10.0.0.2' if with_auth else '127.0.0.1'}:4200:4200"]
    ignored = (REPO / ".gitignore").read_text().split()
    assert "deploy/.env" in ignored and "deploy/auth.env" in ignored


def test_launchd_runs_as_a_user_without_secrets_in_the_plist():
    plist = plistlib.loads((REPO / "deploy" / "launchd" / "org.sparse-vggt.worker.plist").read_bytes())
    assert plist["UserName"] == "sparsevggt"
    env = plist.get("EnvironmentVariables", {})
    assert not any("AUTH" in k or "PASSWORD" in k for k in env)
    assert "StandardOutPath" not in plist  # the worker's output goes to the rotated log (worker.sh)
    example = (REPO / "deploy" / "launchd" / "worker.env.example").read_text()
    assert "PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30" in example and "PREFECT_RUNNER_HEARTBEAT" not in example.replace(
        "PREFECT_RUNNER_HEARTBEAT_FREQUENCY is deprecated", "")


def _fake_home(tmp_path: Path) -> Path:
    home = tmp_path / "opt"
    (home / ".venv" / "bin").mkdir(parents=True)
    prefect = home / ".venv" / "bin" / "prefect"
    prefect.write_text("#!/bin/sh\necho \"prefect $* auth=$PREFECT_API_AUTH_STRING hb=$PREFECT_FLOWS_HEARTBEAT_FREQUENCY "
                       "offline=$HF_HUB_OFFLINE\"\n")
    prefect.chmod(0o755)
    py = home / ".venv" / "bin" / "python"
    py.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    (home / "worker.env").write_text("PREFECT_API_URL=http://head:4200/api\nPREFECT_API_AUTH_STRING=admin:s3cret\n"
                                     "SPARSE_VGGT_WORKER_NAME=mac-mini-07\n")
    return home


def test_worker_script_refuses_a_readable_secret_file_and_logs_rotated(tmp_path):
    home = _fake_home(tmp_path)
    env = dict(os.environ, SPARSE_VGGT_HOME=str(home), PYTHONPATH=str(REPO))
    script = REPO / "deploy" / "launchd" / "worker.sh"
    (home / "worker.env").chmod(0o644)
    r = subprocess.run(["/bin/sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 78 and "chmod 600" in r.stderr
    (home / "worker.env").chmod(0o600)
    r = subprocess.run(["/bin/sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    log = (home / "logs" / "worker.log").read_text()
    assert "worker start --pool mac-mini --type process --limit 1 --name mac-mini-07" in log
    assert "auth=admin:s3cret hb=30 offline=1" in log
    assert stat.S_IMODE((home / "worker.env").stat().st_mode) == 0o600


def test_logpipe_rotates(tmp_path):
    log = tmp_path / "w.log"
    data = "".join(f"line {i:05d} " + "x" * 80 + "\n" for i in range(400))
    subprocess.run([sys.executable, "-m", "sparse_vggt.logpipe", str(log), "--max-bytes", "4000", "--backups", "3"],
                   input=data, text=True, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["w.log", "w.log.1", "w.log.2", "w.log.3"]
    assert all(p.stat().st_size <= 4100 for p in tmp_path.iterdir())
    assert log.read_text().rstrip().endswith("line 00399 " + "x" * 80)


# ---------------------------------------------------------------------------------------------------------
# against a real temporary Prefect server: the README's commands, verbatim where possible


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(tmp_path: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    import time
    import urllib.request

    home = tmp_path / "prefect_home"
    home.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db", PYTHONPATH=str(REPO))
    env.pop("PREFECT_PROFILES_PATH", None)
    log = home / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port), "--no-ui", "--analytics-off", "--no-scheduler", "--no-late-runs"],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, env
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"prefect server did not start: {log.read_text()[-3000:]}")
            time.sleep(0.3)


def _read_back(url: str) -> dict[str, dict]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        out = {}
        for d in client.read_deployments():
            flow = client.read_flow(d.flow_id)
            out[f"{flow.name}/{d.name}"] = {
                "entrypoint": d.entrypoint, "pool": d.work_pool_name, "parameters": d.parameters,
                "job_variables": d.job_variables, "tags": sorted(d.tags), "pull_steps": d.pull_steps or [],
                "concurrency_limit": d.global_concurrency_limit.limit if d.global_concurrency_limit else None,
                "collision": (d.concurrency_options.collision_strategy.value if d.concurrency_options else None),
                "schedules": [(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules],
            }
        autos = client.read_automations_by_name(deploy.AUTOMATION_NAME)
    return out, autos



def _stop(proc: subprocess.Popen) -> None:
    """Stop a server started by _server (its whole process group)."""
    os.killpg(proc.pid, 15)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(10)


@pytest.mark.integration
def test_sparse_vggt_deploy_and_prefect_deploy_register_the_same_on_a_real_server(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    proc, env = _server(tmp_path)
    try:
        cli = [sys.executable, "-c", "from sparse_vggt.cli import main; raise SystemExit(main())"]
        # deploy/README.md: `sparse-vggt deploy --work-pool mac-mini`
        r = subprocess.run(cli + ["deploy", "--work-pool", "mac-mini"], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        ours, autos = _read_back(env["PREFECT_API_URL"])
        assert set(ours) == {"reconstruct/farm", "reconstruct-scheduled/nightly", "reconstruct-cluster/mac-mini",
                             "describe-chunks/mac-mini"}
        assert ours["reconstruct-scheduled/nightly"]["concurrency_limit"] == 1
        assert ours["reconstruct-scheduled/nightly"]["schedules"] == [("0 2 * * *", "UTC", False)]
        assert len(autos) == 1
        trig = autos[0].trigger
        assert trig.within.total_seconds() == deploy.ZOMBIE_AFTER_S and trig.posture.value == "Proactive"
        assert autos[0].actions[0].type == "change-flow-run-state" and autos[0].actions[0].state.value == "CRASHED"
        # again: idempotent (one automation, same deployments)
        r = subprocess.run(cli + ["deploy", "--work-pool", "mac-mini"], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        again, autos = _read_back(env["PREFECT_API_URL"])
        assert again == ours and len(autos) == 1

        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            for d in client.read_deployments():
                client.delete_deployment(d.id)
        # deploy/README.md: `prefect deploy --all` from the repository root (the generated prefect.yaml)
        r = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        theirs, _ = _read_back(env["PREFECT_API_URL"])
        assert theirs == ours, (theirs, ours)
    finally:
        _stop(proc)


@pytest.mark.integration
def test_zombie_automation_crashes_a_silent_run_and_spares_a_heartbeating_one(tmp_path):
    """The automation as `deploy` creates it (threshold shortened to 12 s for the test) on a real server with its
    trigger service: a run whose heartbeats stop is marked Crashed; a run that keeps sending them is not."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Running

    proc, env = _server(tmp_path)
    try:
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            deploy.ensure_automation(client, deploy.automation_spec(after_s=12))
            from flows.reconstruct import reconstruct_cluster_flow

            runs = {k: client.create_flow_run(reconstruct_cluster_flow, name=k, state=Running())
                    for k in ("silent", "alive")}
            flow_id = runs["silent"].flow_id

            def beat(run):
                emit_event(event="prefect.flow-run.heartbeat",
                           resource={"prefect.resource.id": f"prefect.flow-run.{run.id}",
                                     "prefect.resource.name": run.name},
                           related=[{"prefect.resource.id": f"prefect.flow.{flow_id}",
                                     "prefect.resource.role": "flow",
                                     "prefect.resource.name": "reconstruct-cluster"}])

            t0 = time.time()
            beat(runs["silent"])
            states = {}
            while time.time() - t0 < 60:
                beat(runs["alive"])
                states = {k: client.read_flow_run(r.id).state.type.value for k, r in runs.items()}
                if states["silent"] == "CRASHED" and time.time() - t0 > 30:
                    break
                time.sleep(3)
            assert states["silent"] == "CRASHED", states
            assert states["alive"] == "RUNNING", states  # heartbeats every 3 s < 12 s: never marked Crashed
    finally:
        _stop(proc)
