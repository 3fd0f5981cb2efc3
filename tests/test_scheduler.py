"""The scheduler without Prefect: the pipeline table's contract, the local executor end to end (byte-equal to
the Prefect flow's outputs is checked on the demo by hand; here: complete, resumable, OOM split), and a custom
executor plugged into the seam (what a Ray or Dask executor would do)."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest

from sparse_vggt import pipeline
from sparse_vggt.demo import DEMO_PHOTOS, demo_config
from sparse_vggt.store import STAGES, RunStore


def _cfg(**overrides):
    cfg = demo_config()
    cfg.orchestration.executor = "local"
    cfg.orchestration.cluster_process = False  # patched below in this process
    for k, v in overrides.items():
        cfg.set(k.replace("__", "."), v)
    return cfg


def test_pipeline_table_is_the_stage_order_and_every_entry_has_the_stage_signature():
    assert pipeline.NAMES == STAGES == ("scan", "describe", "graph", "partition", "reconstruct", "merge", "export")
    for st in pipeline.STAGES:
        params = inspect.signature(st.run).parameters
        assert list(params)[:2] == ["run_dir", "config"], st.name
        assert params["config"].default is None
        for kw in ("force", "units"):
            assert params[kw].kind is inspect.Parameter.KEYWORD_ONLY, (st.name, kw)
    assert [s.name for s in pipeline.STAGES if s.unit] == ["describe", "reconstruct"]
    with pytest.raises(KeyError, match="no stage 'eval'"):
        pipeline.stage("eval")


def test_reading_the_table_imports_no_stage_module():
    import subprocess

    code = ("import sys; from sparse_vggt import pipeline; [s.name for s in pipeline.STAGES]; "
            "print(sorted(m for m in sys.modules if m.startswith('sparse_vggt.') or m in ('torch', 'prefect')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['sparse_vggt.pipeline']"


def test_scan_has_no_units_and_needs_a_photo_folder_for_a_new_run(tmp_path: Path):
    from sparse_vggt.scan import ScanError

    scan = pipeline.stage("scan").run
    with pytest.raises(ValueError, match="no units"):
        scan(tmp_path / "run", units=[0])
    with pytest.raises(ScanError, match="records no photo folder"):
        scan(tmp_path / "run")


def test_local_executor_runs_resumes_and_splits_out_of_memory_clusters(tmp_path: Path, monkeypatch):
    import sparse_vggt.reconstruct as recon
    from sparse_vggt.local_executor import run_local
    from sparse_vggt.scheduler import ClusterFailures
    from sparse_vggt.durable import read_events

    run = tmp_path / "run"
    real = recon.reconstruct_cluster
    ooms: list[int] = []

    def oom_on_0(run_dir, cid, cfg):
        if int(cid) == 0 and len(ooms) < 2:
            ooms.append(cid)
            raise recon.ClusterOutOfMemory(cid, "out of memory (injected)")
        return real(run_dir, cid, cfg)

    monkeypatch.setattr(recon, "reconstruct_cluster", oom_on_0)
    with pytest.raises(ClusterFailures, match="re-run"):  # splitting disabled: recorded, reported, raised
        run_local(DEMO_PHOTOS, run, _cfg(orchestration__max_oom_splits=0))
    report = json.loads((run / "orchestration" / "report.json").read_text())
    assert [f["cluster_id"] for f in report["failures"]] == [0] and report["flow_run"] is None
    assert "describe-chunk" in report["stages_executed"] and "merge" not in report["stages_executed"]

    report = run_local(DEMO_PHOTOS, run, _cfg())  # resumes: only cluster 0 (split once) and the later stages
    assert len(report["oom_splits"]) == 1 and report["oom_splits"][0]["cluster"] == 0
    assert report["stages_executed"]["reconstruct-cluster"] == 3  # cluster 0 again, then its two halves
    assert "describe-chunk" not in report["stages_executed"] and "scan" in report["stages_executed"]
    assert [e["kind"] for e in read_events(run)] == ["cluster_failed", "oom_split"]
    assert (run / "export" / "points.ply").stat().st_size > 0
    # one human-readable report: report.md carries the run's section (rendered from orchestration/report.json)
    text = (run / "export" / "report.md").read_text()
    assert "## Last pipeline run (orchestration/report.json)" in text and "### Out-of-memory splits" in text
    assert "- cluster 0 -> " in text and "## Merge: cluster edges" in text

    again = run_local(DEMO_PHOTOS, run, _cfg())  # finished: no stage step, no unit
    assert again["stages_executed"] == {"scan": 1}
    assert again["stages_already_complete"] == [s for s in sorted(STAGES) if s != "scan"]


class RecordingExecutor:
    """A third-party executor in a few lines: delegates to the local one and records what it was asked."""

    def __init__(self, cfg):
        from sparse_vggt.local_executor import LocalExecutor

        self.inner = LocalExecutor(cfg)
        self.work = self.inner.work
        self.asked: list[tuple[str, str]] = []

    def run_name(self):
        return "recording-1"

    def call(self, step, run_dir, config, *args):
        self.asked.append(("call", step))
        return self.inner.call(step, run_dir, config, *args)

    def map(self, kind, run_dir, config, ids):
        self.asked.append(("map", kind))
        yield from self.inner.map(kind, run_dir, config, ids)

    def notify(self, what, run_dir, **info):
        self.asked.append(("notify", what))


def test_a_custom_executor_plugs_into_the_seam(tmp_path: Path):
    from sparse_vggt.scheduler import run_pipeline, validate_parameters

    run = str(tmp_path / "run")
    cfg, _ = validate_parameters(str(DEMO_PHOTOS), run, _cfg().to_dict())
    ex = RecordingExecutor(cfg)
    report = run_pipeline(str(DEMO_PHOTOS), run, cfg, ex)
    steps = [s for kind, s in ex.asked if kind == "call"]
    assert steps[:2] == ["scan", "describe-plan"] and steps[-2:] == ["merge", "export"]
    assert ("map", "describe") in ex.asked and ("map", "clusters") in ex.asked and ("notify", "report") in ex.asked
    assert report["flow_run"] == "recording-1"
    assert RunStore.open(run).meta()["stages"]["export"].get("finished")
