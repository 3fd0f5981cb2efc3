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
    assert main(["scan", str(photos), str(run), "--set", "ingest.chunk_size=2"]) == 0
    out = capsys.readouterr().out
    assert "skipped_files" in out and "notes.jpg" in out and "not an image" in out
    meta = json.loads((run / "run.json").read_text())
    assert meta["config"]["ingest"]["chunk_size"] == 2
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
    assert main(["scan", str(photos), str(run), "--set", "ingest.min_side=10"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "ingest.min_side" in err and "Traceback" not in err
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
                "eval", "status", "deploy"):
        assert cmd in out.stdout
