"""The `sparse-vggt` command line: scan summary, status, overrides, errors without tracebacks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_vggt.cli import main


def _photos(tmp_path: Path, sample_photos: Path, fixtures_dir: Path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for p in sorted(sample_photos.glob("*.jpg"))[:3]:
        shutil.copy(p, root / p.name)
    shutil.copy(fixtures_dir / "bad" / "notes.jpg", root / "notes.jpg")
    return root


def test_scan_prints_skip_table_and_status(tmp_path: Path, sample_photos: Path, fixtures_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    photos = _photos(tmp_path, sample_photos, fixtures_dir)
    run = tmp_path / "run"
    assert main(["scan", str(photos), str(run), "--set", "scan.chunk_size=2"]) == 0
    out = capsys.readouterr().out
    assert "skipped_files" in out and "notes.jpg" in out and "not an image" in out
    meta = json.loads((run / "run.json").read_text())
    assert meta["config"]["scan"]["chunk_size"] == 2
    assert meta["stages"]["scan"]["manifest"]["chunks"] == 2

    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "scan" in out and "finished" in out and "pending" in out and "kept=3" in out
    assert main(["status", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [s["state"] for s in status["stages"]][:2] == ["finished", "pending"]


def test_user_errors_exit_2_with_a_message(tmp_path: Path, sample_photos: Path, fixtures_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    photos = _photos(tmp_path, sample_photos, fixtures_dir)
    run = tmp_path / "run"
    assert main(["scan", str(photos), str(run)]) == 0
    capsys.readouterr()
    assert main(["scan", str(photos), str(run), "--set", "scan.min_side=10"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "scan.min_side" in err and "Traceback" not in err
    assert main(["describe", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["scan", str(photos), str(tmp_path / "r2"), "--set", "partition.bogus=1"]) == 2
    assert "unknown field partition.bogus" in capsys.readouterr().err
    assert main(["graph", str(run)]) == 2  # describe has not run
    assert "describe" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    exe = shutil.which("sparse-vggt") or str(Path(sys.executable).parent / "sparse-vggt")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for cmd in ("scan", "describe", "graph", "partition", "reconstruct", "merge", "export", "run", "demo",
                "evaluate", "eval", "status", "deploy"):
        assert cmd in out.stdout


# ---------------------------------------------------------------------------------------------------------
# version, global flags, exit codes, config show, deploy, fast re-run, weights messages

REPO = Path(__file__).resolve().parents[1]


def test_version_and_global_flags_after_the_subcommand(tmp_path: Path, sample_photos: Path, fixtures_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from sparse_vggt import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"sparse-vggt {__version__}"
    photos = _photos(tmp_path, sample_photos, fixtures_dir)
    run = tmp_path / "run"
    from sparse_vggt.cli import build_parser

    args = build_parser().parse_args(["scan", str(photos), str(run), "-q", "--no-progress", "-vv"])
    assert args.quiet and args.no_progress and args.verbose == 2
    before = build_parser().parse_args(["-v", "status", str(run)])
    assert before.verbose == 1 and not before.quiet  # given before the subcommand: kept
    assert main(["scan", str(photos), str(run), "-q"]) == 0
    with pytest.raises(SystemExit) as info:  # argparse usage error
        main(["scan", "--bogus-flag"])
    assert info.value.code == 2


def test_exit_codes_usage_failure_partial_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from sparse_vggt import cli
    from sparse_vggt.config import ConfigError

    class ClusterFailures(RuntimeError):  # the flow's class is matched by name (flows/ is not imported)
        pass

    assert cli.exit_code(ConfigError("x")) == 2
    assert cli.exit_code(RuntimeError("boom")) == 1
    assert cli.exit_code(ClusterFailures("2 clusters failed")) == 3
    assert cli.exit_code(KeyboardInterrupt()) == 130

    def fails(args):
        raise RuntimeError("disk on fire")

    def interrupted(args):
        raise KeyboardInterrupt

    def partial(args):
        raise ClusterFailures("1 cluster(s) failed: 3: boom")

    for func, code in ((fails, 1), (interrupted, 130), (partial, 3)):
        monkeypatch.setattr(cli, "cmd_status", func)
        assert main(["status", str(tmp_path)]) == code
        err = capsys.readouterr().err
        assert "Traceback" not in err
    monkeypatch.setattr(cli, "cmd_status", fails)
    with pytest.raises(RuntimeError, match="disk on fire"):  # -v (also after the subcommand) shows the traceback
        main(["status", str(tmp_path), "-v"])


def test_config_show_prints_toml(tmp_path: Path, sample_photos: Path, fixtures_dir: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib

    from sparse_vggt.config import PipelineConfig

    assert main(["config", "show", "--defaults"]) == 0
    assert tomllib.loads(capsys.readouterr().out) == tomllib.loads(PipelineConfig().to_toml())
    assert main(["config", "show", "--set", "graph.retrieval_neighbors=7"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["graph"]["retrieval_neighbors"] == 7
    photos = _photos(tmp_path, sample_photos, fixtures_dir)
    run = tmp_path / "run"
    assert main(["scan", str(photos), str(run), "--set", "scan.chunk_size=2"]) == 0
    capsys.readouterr()
    assert main(["config", "show", str(run), "--set", "graph.retrieval_neighbors=9"]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    assert shown["scan"]["chunk_size"] == 2 and shown["graph"]["retrieval_neighbors"] == 9
    assert main(["config", "show", "--set", "graph.nope=1"]) == 2
    assert "unknown field graph.nope" in capsys.readouterr().err


def test_deploy_without_a_server_is_a_short_message(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}):
        assert main(["deploy"]) == 1
    err = capsys.readouterr().err
    assert "no Prefect server configured" in err and "PREFECT_API_URL" in err and "Traceback" not in err


def test_missing_weights_offline_is_one_message(tmp_path: Path, sample_photos: Path, fixtures_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`run` with the default (hub) checkpoints on an offline machine: one actionable message, exit 1, no
    Prefect flow started."""
    import sys as _sys

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(_sys.modules, "flows.reconstruct", None)  # importing the flow module would fail
    photos = _photos(tmp_path, sample_photos, fixtures_dir)
    assert main(["run", str(photos), str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "Traceback" not in err
    assert "--set describe.model=random --set describe.allow_random_weights=true" in err.replace("\n", " ")


def _demo_cfg():
    from sparse_vggt.demo import demo_config

    return demo_config()


def _finished_run(tmp_path: Path, sample_photos: Path) -> tuple[Path, Path]:
    """A really finished run of 3 photos (every stage run in-process with the demo's tiny random models)."""
    from sparse_vggt.graph import run as build_graph
    from sparse_vggt.describe import run as describe
    from sparse_vggt.export import run as export
    from sparse_vggt.scan import run as run_scan
    from sparse_vggt.merge import run as merge
    from sparse_vggt.partition import run as partition
    from sparse_vggt.reconstruct import run as reconstruct

    photos = tmp_path / "photos"
    photos.mkdir(parents=True)
    for p in sorted(sample_photos.glob("*.jpg"))[:3]:
        shutil.copy(p, photos / p.name)
    run = tmp_path / "run"
    cfg = _demo_cfg()
    run_scan(run, cfg, photos=photos)
    for stage in (describe, build_graph, partition, reconstruct, merge, export):
        stage(run, cfg)
    return photos, run


def test_rerun_of_a_finished_run_takes_the_fast_path_without_prefect(tmp_path: Path, sample_photos: Path) -> None:
    """Markers are checked before Prefect is imported: no server can start. Checked in a fresh interpreter."""
    photos, run = _finished_run(tmp_path, sample_photos)
    code = ("import sys; from sparse_vggt.cli import main; rc = main(sys.argv[1:]); "
            "print('PREFECT_IMPORTED', 'prefect' in sys.modules, 'FLOWS_IMPORTED', 'flows.reconstruct' in sys.modules);"
            "sys.exit(rc)")
    from sparse_vggt.demo import DEMO_SETTINGS

    sets = [a for k, v in DEMO_SETTINGS.items() for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]
    out = subprocess.run([sys.executable, "-c", code, "run", str(photos), str(run), *sets], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "PREFECT_IMPORTED False FLOWS_IMPORTED False" in out.stdout
    assert "already complete" in out.stdout and "points.ply" in out.stdout


def test_fast_path_is_not_taken_when_anything_is_left(tmp_path: Path, sample_photos: Path) -> None:
    from sparse_vggt.runcheck import finished_run
    from sparse_vggt.store import RunStore

    photos, run = _finished_run(tmp_path, sample_photos)
    assert finished_run(run, photos, _demo_cfg())["frames_reconstructed"] == 3
    changed = _demo_cfg()
    changed.graph.retrieval_neighbors = 3
    assert finished_run(run, photos, changed) is None  # result-affecting config change: the flow decides
    runtime = _demo_cfg()
    runtime.reconstruct.device = "cpu"
    assert finished_run(run, photos, runtime) is not None  # runtime-only fields do not matter
    assert finished_run(run, tmp_path, _demo_cfg()) is None  # another photo folder
    for damage in ("export", "chunk", "marker"):  # a stage left, a deleted data chunk, a deleted unit marker
        copy = tmp_path / f"run_{damage}"
        shutil.copytree(run, copy)
        if damage == "export":
            RunStore.open(copy).stage_invalidate("export")
        elif damage == "chunk":
            chunks = [p for p in (copy / "store.zarr" / "clusters" / "0" / "extrinsics").rglob("*")
                      if p.is_file() and p.name != "zarr.json"]
            chunks[0].unlink()
        else:
            (copy / "store.zarr" / "graph" / "zarr.json").unlink()
        assert finished_run(copy, photos, _demo_cfg()) is None, damage
    (photos / sorted(p.name for p in photos.iterdir())[0]).touch()  # a photo changed (mtime)
    assert finished_run(run, photos, _demo_cfg()) is None


def test_manifest_lists_render_in_tables(capsys: pytest.CaptureFixture[str]) -> None:
    """rich must not read list cells as markup: the demo's outputs cell was printed empty."""
    from sparse_vggt.cli import print_manifest

    print_manifest("demo", {"outputs": ["colmap/0/cameras.bin", "points.ply"], "note": "[bold]x[/]"})
    out = capsys.readouterr().out
    assert "colmap/0/cameras.bin" in out and "points.ply" in out and "[bold]x[/]" in out


def test_console_logs_hide_tracebacks_unless_verbose() -> None:
    """A failure logged with exc_info (as Prefect logs task/flow failures) prints one line, not a traceback."""
    import io
    import logging

    from sparse_vggt.cli import hide_log_tracebacks

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    loggers = [logging.getLogger(n) for n in ("prefect.task_runs", "prefect.flow_runs")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
    try:
        hide_log_tracebacks()
        try:
            raise ValueError("the real reason")
        except ValueError:
            logging.getLogger("prefect.task_runs").error("Task run failed with exception: boom", exc_info=True)
        logging.getLogger("prefect.task_runs").warning("Finished in state Completed()")  # kept: a warning
        logging.getLogger("prefect.task_runs").info("Finished in state Completed()")  # routine: dropped
        logging.getLogger("prefect.flow_runs").info("reconstructing 6 cluster(s)")
    finally:
        root.removeHandler(handler)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    out = stream.getvalue()
    assert "Task run failed with exception: boom" in out and "Traceback" not in out and "-v shows it" in out
    assert out.count("Finished in state Completed()") == 1 and "reconstructing 6 cluster(s)" in out


def test_run_summary_shows_only_this_attempts_events() -> None:
    from sparse_vggt.cli import _current_events

    result = {"flow_run": "b", "events": [{"kind": "cluster_failed", "flow_run": "a"},
                                          {"kind": "oom_split", "flow_run": "b"}]}
    shown = _current_events(result)
    assert shown["events"] == [{"kind": "oom_split", "flow_run": "b"}]
    assert shown["earlier_events"].startswith("1 from earlier attempts")
    assert _current_events({"events": []}) == {"events": []}


def test_quiet_keeps_prefect_info_off_the_terminal() -> None:
    import io
    import logging

    from sparse_vggt.cli import hide_log_tracebacks

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    flow_logger = logging.getLogger("prefect.flow_runs")
    level = flow_logger.level
    flow_logger.setLevel(logging.INFO)
    try:
        hide_log_tracebacks(quiet=True)
        flow_logger.info("Beginning flow run")
        flow_logger.warning("cluster 3 ran out of memory; split")
    finally:
        root.removeHandler(handler)
        flow_logger.setLevel(level)
    assert stream.getvalue() == "cluster 3 ran out of memory; split\n"
