"""Checkpoint loading: hub/dir/file resolution, safetensors and torch pickles, strict errors that name keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sparse_vggt.models.vggt import VGGT
from sparse_vggt.weights import (CheckpointMismatchError, check_state_dict, load_state_dict_file,
                                 resolve_checkpoint)

TSV = Path(__file__).resolve().parents[1] / "sparse_vggt" / "model_facts" / "vggt_1b_state_dict.tsv"


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: v.contiguous().clone() for k, v in VGGT.from_preset("tiny").state_dict().items()}


def _assert_same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_safetensors_from_directory_and_file(tmp_path, tiny_state):
    save_file(tiny_state, str(tmp_path / "model.safetensors"))
    for source in (tmp_path, tmp_path / "model.safetensors", str(tmp_path)):
        model = VGGT.from_pretrained(source, preset="tiny")
        _assert_same(model, tiny_state)
        assert not model.training
        assert not any(p.is_meta for p in model.parameters())
    with torch.inference_mode():  # the loaded model runs
        assert model(torch.rand(2, 3, 28, 28))["depth"].shape == (1, 2, 28, 28, 1)


def test_torch_pickle_checkpoint(tmp_path, tiny_state):
    torch.save({"model": tiny_state}, tmp_path / "model.pt")
    _assert_same(VGGT.from_pretrained(tmp_path, preset="tiny"), tiny_state)
    assert resolve_checkpoint(tmp_path) == tmp_path / "model.pt"


class _Arbitrary:  # an object a weights-only unpickler must refuse to construct
    pass


def test_pickle_with_code_is_refused(tmp_path):
    import pickle

    torch.save({"weights": _Arbitrary()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load_state_dict_file(tmp_path / "evil.pt")


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_state):
    bad = dict(tiny_state)
    bad.pop("camera_head.trunk_norm.weight")
    bad["aggregator.not_a_parameter"] = torch.zeros(3)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        VGGT.from_pretrained(tmp_path, preset="tiny")
    msg = str(err.value)
    assert "missing keys (1): camera_head.trunk_norm.weight" in msg
    assert "unexpected keys (1): aggregator.not_a_parameter" in msg


def test_shape_mismatch_is_named(tmp_path, tiny_state):
    bad = dict(tiny_state)
    bad["depth_head.norm.weight"] = torch.zeros(7)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"depth_head.norm.weight checkpoint \[7\] vs model \[128\]"):
        VGGT.from_pretrained(tmp_path, preset="tiny")


def test_wrong_architecture_fails_loudly(tmp_path, tiny_state):
    save_file(tiny_state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="preset"):
        VGGT.from_pretrained(tmp_path, preset="small")


def test_vggt_1b_checkpoint_names_and_shapes_pass_the_strict_check():
    """A checkpoint with exactly the published names/shapes (meta tensors: no 5 GB allocation) is accepted by
    the 1B model, and the same dict minus one key is rejected naming it."""
    state = {}
    for line in TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, _ = line.split("\t")
        state[name] = torch.empty(tuple(int(x) for x in shape.split(",")), device="meta")
    with torch.device("meta"):
        model = VGGT()
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    state.pop("aggregator.global_blocks.23.attn.k_norm.bias")
    with pytest.raises(CheckpointMismatchError, match="aggregator.global_blocks.23.attn.k_norm.bias"):
        check_state_dict(model, state)


def test_resolution_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="looked for model.safetensors, model.pt"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        resolve_checkpoint(str(tmp_path / "nope.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="Hugging Face repo 'facebook/VGGT-1B'"):
        resolve_checkpoint("facebook/VGGT-1B")


def test_no_network_or_files_at_construction(monkeypatch):
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("network access during construction")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)
    VGGT.from_preset("tiny")


def test_hub_repo_id_downloads_through_huggingface_hub(tmp_path, monkeypatch, tiny_state):
    """A repo id goes through ``hf_hub_download``: model.safetensors first, model.pt when the repo lacks it."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    torch.save(tiny_state, tmp_path / "model.pt")
    calls = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        if filename == "model.safetensors":
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the fake download stands in for the network
    monkeypatch.setattr("sparse_vggt.weights._hub_reachable", lambda timeout=3.0: True)
    model = VGGT.from_pretrained("facebook/VGGT-1B", preset="tiny", revision="main")
    assert calls == [("facebook/VGGT-1B", "model.safetensors", "main"), ("facebook/VGGT-1B", "model.pt", "main")]
    _assert_same(model, tiny_state)


def test_offline_hub_gives_one_actionable_message(monkeypatch):
    """Offline (HF_HUB_OFFLINE or no route) and not cached: no retries, no 'not in the repo', the commands."""
    from sparse_vggt import weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(weights.WeightsUnavailableError) as info:
        resolve_checkpoint("facebook/VGGT-1B", stage="reconstruct")
    msg = str(info.value)
    assert "HF_HUB_OFFLINE" in msg and "not in the repo" not in msg
    assert "--set reconstruct.model=random --set reconstruct.allow_random_weights=true" in msg
    assert "hf download facebook/VGGT-1B" in msg
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(weights, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(weights.WeightsUnavailableError, match="cannot reach the Hugging Face Hub"):
        resolve_checkpoint("gberton/MegaLoc", ("model.safetensors",), stage="describe")


def test_cached_hub_file_is_used_offline_and_recorded_with_its_revision(tmp_path, monkeypatch, tiny_state):
    """A file already in the Hugging Face cache resolves without network; provenance names the snapshot commit."""
    from safetensors.torch import save_file

    from sparse_vggt import weights

    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--facebook--VGGT-1B" / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file(tiny_state, str(snap / "model.safetensors"))
    (tmp_path / "hub" / "models--facebook--VGGT-1B" / "refs").mkdir()
    (tmp_path / "hub" / "models--facebook--VGGT-1B" / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_checkpoint("facebook/VGGT-1B") == snap / "model.safetensors"
    prov = weights.provenance("facebook/VGGT-1B", preset="tiny")
    assert prov["weights"] == "checkpoint" and prov["revision"] == commit and prov["bytes"] > 0
    assert commit in weights.describe_weights(prov)
    rnd = weights.provenance("random", preset="tiny", seed=3)
    assert rnd == {"weights": "random", "preset": "tiny", "seed": 3}
    assert "RANDOM" in weights.describe_weights(rnd)


def test_report_section_says_random_or_which_checkpoint(tmp_path):
    """report.md / the Prefect report: RANDOM in bold, or the checkpoint file; old runs fall back to the config."""
    from sparse_vggt.weights import run_weights, weights_markdown

    ckpt = tmp_path / "vggt.pt"
    ckpt.write_bytes(b"0" * 10)
    meta = {"config": {"describe": {"model": "random", "preset": "tiny"},
                       "reconstruct": {"model": str(ckpt), "preset": "vggt-1b", "seed": 0}},
            "stages": {"describe": {"manifest": {"weights": {"weights": "random", "preset": "tiny", "seed": 0}}}}}
    w = run_weights(meta)
    assert w["describe"]["weights"] == "random"
    assert w["reconstruct"]["weights"] == "checkpoint" and w["reconstruct"]["file"] == str(ckpt)
    assert w["reconstruct"]["bytes"] == 10 and w["reconstruct"]["from_config"]
    md = weights_markdown(meta)
    assert "## Model weights" in md and "**describe ran with RANDOM weights" in md and str(ckpt) in md
    real = weights_markdown({"config": {"describe": {"descriptors_file": "d.npy", "model": "gberton/MegaLoc"},
                                        "reconstruct": {"model": str(ckpt)}}})
    assert "RANDOM" not in real and "d.npy" in real
