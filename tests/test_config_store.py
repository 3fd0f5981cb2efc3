"""PipelineConfig (TOML, overrides, diff) and RunStore (markers, atomic tables, config guard, status)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from sparse_vggt.config import ConfigError, PipelineConfig, load_config
from sparse_vggt.store import STAGES, ConfigMismatchError, RunStore, RunStoreError


def test_config_round_trips_through_toml_and_json(tmp_path: Path) -> None:
    cfg = PipelineConfig()
    cfg.set("partition.max_cluster_frames", "64")
    cfg.set("graph.mutual", "true")
    cfg.set("scan.extensions", "jpg,png")
    cfg.set("merge.voxel_size", 0.25)
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    back = PipelineConfig.from_toml(path)
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert back.partition.max_cluster_frames == 64 and back.graph.mutual is True
    assert back.scan.extensions == ["jpg", "png"]
    assert PipelineConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_every_field_is_overridable_from_the_cli_syntax() -> None:
    cfg = PipelineConfig()
    for section, values in cfg.to_dict().items():
        for name, value in values.items():
            raw = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            cfg.apply_overrides([f"{section}.{name}={raw}"])
            assert getattr(getattr(cfg, section), name) == value, f"{section}.{name}"


def test_bad_overrides_name_the_problem(tmp_path: Path) -> None:
    cfg = PipelineConfig()
    with pytest.raises(ConfigError, match="unknown field partition.nope"):
        cfg.set("partition.nope", 1)
    with pytest.raises(ConfigError, match="unknown config section"):
        cfg.set("bogus.k", 1)
    with pytest.raises(ConfigError, match="section.field=value"):
        cfg.apply_overrides(["partition.attention_neighbors"])
    with pytest.raises(ConfigError):
        cfg.set("partition.attention_neighbors", "ten")
    bad = tmp_path / "bad.toml"
    bad.write_text("[partition\nk=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, None)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", None)


def test_runtime_fields_do_not_count_as_config_changes() -> None:
    a, b = PipelineConfig(), PipelineConfig()
    b.set("reconstruct.device", "cpu")
    b.set("orchestration.dispatch", "pool")
    assert a.diff(b) == []
    b.set("graph.retrieval_neighbors", 12)
    assert a.diff(b) == ["graph.retrieval_neighbors: 10 -> 12"]


def test_run_directory_guards_its_config(tmp_path: Path) -> None:
    cfg = PipelineConfig()
    store = RunStore.create_or_open(tmp_path / "run", cfg)
    assert json.loads(store.run_json.read_text())["config"] == cfg.to_dict()
    other = PipelineConfig()
    other.set("partition.max_cluster_frames", 32)
    # a field of a stage that has not run yet is accepted (and recorded) without --force
    RunStore.create_or_open(tmp_path / "run", other)
    assert store.meta()["config"]["partition"]["max_cluster_frames"] == 32
    assert store.meta()["history"][-1]["event"] == "config changed"
    for stage in ("scan", "describe", "graph", "partition", "reconstruct"):
        store.stage_finished(stage, {})
    other = PipelineConfig()
    other.set("partition.max_cluster_frames", 16)
    with pytest.raises(ConfigMismatchError, match="partition.max_cluster_frames: 32 -> 16"):
        RunStore.create_or_open(tmp_path / "run", other)
    RunStore.create_or_open(tmp_path / "run", other, force=True)
    meta = store.meta()
    assert meta["config"]["partition"]["max_cluster_frames"] == 16
    assert meta["history"][-2]["event"] == "config forced"
    # --force invalidates the changed stage and every later one, and says so
    assert meta["history"][-1] == {**meta["history"][-1], "event": "invalidated", "stages": ["partition", "reconstruct"]}
    assert [s for s in STAGES if store.is_stage_complete(s)] == ["scan", "describe", "graph"]
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "x.txt").write_text("x")
    with pytest.raises(RunStoreError, match="not empty"):
        RunStore.create_or_open(tmp_path / "notarun", cfg)
    with pytest.raises(RunStoreError, match="not a run directory"):
        RunStore.open(tmp_path / "nothing")


def test_stage_and_unit_markers_and_status(tmp_path: Path) -> None:
    store = RunStore.create_or_open(tmp_path / "run", PipelineConfig())
    assert [r["state"] for r in store.status()["stages"]] == ["pending"] * len(STAGES)
    with pytest.raises(RunStoreError, match="sparse-vggt scan"):
        store.require_stage("scan", "describe")
    store.stage_started("scan")
    assert not store.is_stage_complete("scan")
    store.stage_finished("scan", {"kept": np.int64(3)})
    assert store.is_stage_complete("scan") and store.stage_manifest("scan") == {"kept": 3}

    grp = store.group("clusters/0")
    store.write_array(grp, "depth", np.ones((2, 4, 5), np.float16), chunks=(1, 4, 5))
    assert not store.is_unit_complete("clusters/0") and store.complete_units("clusters") == []
    store.mark_unit_complete("clusters/0", frames=2)
    store.group("clusters/1")  # started, never finished
    assert store.complete_units("clusters") == ["0"]
    status = store.status()
    assert status["stages"][0]["state"] == "finished" and status["units"]["clusters_complete"] == 1
    store.remove_group("clusters/1")
    assert "clusters/1" not in store.zarr
    np.testing.assert_array_equal(store.zarr["clusters/0/depth"][...], np.ones((2, 4, 5), np.float16))


def test_tables_are_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RunStore.create_or_open(tmp_path / "run", PipelineConfig())
    store.write_table("t", pa.table({"a": [1, 2]}))
    import pyarrow.parquet as pq

    def torn(table, where, **kw):
        Path(where).write_bytes(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", torn)
    with pytest.raises(OSError):
        store.write_table("t", pa.table({"a": [9]}))
    monkeypatch.undo()
    assert store.read_table("t").column("a").to_pylist() == [1, 2]  # the old table survives intact
    assert [p.name for p in store.tables_dir.iterdir()] == ["t.parquet"]  # no temp file left behind


def test_dtype_and_attention_backend_change_results() -> None:
    """bf16 vs fp32 and flex vs sdpa give different numbers, so they are not runtime-only."""
    a, b = PipelineConfig(), PipelineConfig()
    b.set("reconstruct.dtype", "bfloat16")
    b.set("reconstruct.attention_backend", "sdpa")
    assert a.diff(b) == ["reconstruct.dtype: 'auto' -> 'bfloat16'", "reconstruct.attention_backend: 'auto' -> 'sdpa'"]


def test_config_is_validated_on_load_with_every_problem_at_once(tmp_path):
    from sparse_vggt.config import ConfigError, load_config

    bad = tmp_path / "bad.toml"
    bad.write_text('[graph]\nmethod = "annoy"\n[reconstruct]\nimage_size = 500\n[partition]\nmin_overlap_frames = 0\n')
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "graph.method='annoy'" in msg and "reconstruct.image_size=500" in msg and "min_overlap_frames=0" in msg
    # overrides are applied before the check: a file needing an override still loads
    needs = tmp_path / "needs.toml"
    needs.write_text('[reconstruct]\nmodel = "random"\n')
    with pytest.raises(ConfigError, match="allow_random_weights"):
        load_config(needs)
    cfg = load_config(needs, ["reconstruct.allow_random_weights=true"])
    assert cfg.reconstruct.model == "random"


def test_renamed_keys_still_load_with_a_warning(caplog):
    from sparse_vggt.config import PipelineConfig

    cfg = PipelineConfig.from_dict({"graph": {"k": 7}})
    assert cfg.graph.retrieval_neighbors == 7
    assert "graph.k is now called graph.retrieval_neighbors" in caplog.text


def test_renamed_section_loads_with_a_warning(caplog):
    from sparse_vggt.config import PipelineConfig

    cfg = PipelineConfig.from_dict({"ingest": {"chunk_size": 7}, "partition": {"k": 3}})
    assert cfg.scan.chunk_size == 7 and cfg.partition.attention_neighbors == 3
    assert "[ingest] is now called [scan]" in caplog.text
    cfg.set("ingest.min_side", 32)
    assert cfg.scan.min_side == 32
