"""`sparse-vggt weights fetch/verify` against a fake hub (no network): a hub-style cache layout written by a
monkeypatched download, checksum recorded and verified, a mismatch refused, the loaders find the pinned files
offline, and provenance records revision + sha256."""

from __future__ import annotations

import hashlib
import json

import pytest
from huggingface_hub import constants as _hf_constants  # noqa: F401 - imported before the env points at a fake cache

from sparse_vggt import provision
from sparse_vggt.provision import PINS, ChecksumMismatchError

CONTENT = {"reconstruct": b"fake vggt checkpoint bytes", "describe": b"fake megaloc checkpoint bytes"}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A hub cache under tmp_path and a download that writes what hf_hub_download would (blobs/ + snapshots/)."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []

    def download(pin, dest):
        calls.append((pin.repo, pin.revision, dest))
        data = CONTENT[pin.stage]
        if dest is not None:
            path = dest / pin.repo.replace("/", "--") / pin.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return path
        repo = cache / f"models--{pin.repo.replace('/', '--')}"
        blob = repo / "blobs" / _sha(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        snap = repo / "snapshots" / pin.revision / pin.filename
        snap.parent.mkdir(parents=True, exist_ok=True)
        snap.symlink_to(blob)
        return snap

    return {"cache": cache, "download": download, "calls": calls,
            "hub_sha": lambda pin: _sha(CONTENT[pin.stage])}


def test_fetch_records_checksum_and_verify_passes(fake_hub):
    out = provision.fetch(download=fake_hub["download"], hub_sha256=fake_hub["hub_sha"])
    assert {(r, v) for r, v, _ in fake_hub["calls"]} == {(p.repo, p.revision) for p in PINS.values()}
    lock = json.loads((fake_hub["cache"] / provision.LOCK_NAME).read_text())
    for stage in ("describe", "reconstruct"):
        assert lock[stage]["sha256"] == _sha(CONTENT[stage]) == out["weights"][stage]["sha256"]
        assert lock[stage]["revision"] == PINS[stage].revision
    rows = provision.verify()
    assert all(r["ok"] for r in rows.values()), rows


def test_fetch_refuses_checksum_mismatch(fake_hub):
    with pytest.raises(ChecksumMismatchError, match="sparse-vggt weights fetch"):
        provision.fetch(download=fake_hub["download"], hub_sha256=lambda pin: "0" * 64)
    assert not (fake_hub["cache"] / provision.LOCK_NAME).exists()  # nothing recorded for a bad file


def test_verify_catches_a_corrupted_file_and_a_missing_fetch(fake_hub, tmp_path):
    rows = provision.verify()
    assert not any(r["ok"] for r in rows.values())
    assert "sparse-vggt weights fetch" in rows["reconstruct"]["problem"]
    provision.fetch(download=fake_hub["download"], hub_sha256=fake_hub["hub_sha"])
    f = provision.local_file(PINS["reconstruct"], None)
    f.resolve().write_bytes(b"truncated")
    rows = provision.verify()
    assert rows["describe"]["ok"] and not rows["reconstruct"]["ok"]
    assert "differs" in rows["reconstruct"]["problem"]


def test_fetch_into_dir_and_cli(fake_hub, tmp_path, monkeypatch, capsys):
    from sparse_vggt import cli

    monkeypatch.setattr(provision, "_download", fake_hub["download"])
    monkeypatch.setattr(provision, "_hub_sha256", fake_hub["hub_sha"])
    d = tmp_path / "weights"
    assert cli.main(["weights", "fetch", "--dir", str(d)]) == 0
    assert (d / "facebook--VGGT-1B" / "model.pt").read_bytes() == CONTENT["reconstruct"]
    assert cli.main(["weights", "verify", "--dir", str(d)]) == 0
    (d / "gberton--MegaLoc" / "model.safetensors").write_bytes(b"other")
    assert cli.main(["weights", "verify", "--dir", str(d)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_loaders_find_pinned_cache_offline_and_provenance_records_sha(fake_hub):
    from sparse_vggt.provenance import describe_weights, provenance
    from sparse_vggt.weights import resolve_checkpoint

    provision.fetch(download=fake_hub["download"], hub_sha256=fake_hub["hub_sha"])
    # HF_HUB_OFFLINE=1: the default repo id resolves to the pinned snapshot without any network access
    path = resolve_checkpoint("facebook/VGGT-1B", ("model.safetensors", "model.pt"))
    assert path.read_bytes() == CONTENT["reconstruct"] and PINS["reconstruct"].revision in str(path)
    prov = provenance("facebook/VGGT-1B", ("model.safetensors", "model.pt"))
    assert prov["revision"] == PINS["reconstruct"].revision
    assert prov["sha256"] == _sha(CONTENT["reconstruct"])
    assert _sha(CONTENT["reconstruct"]) in describe_weights(prov)


def test_offline_miss_says_fetch_and_random_flags(fake_hub):
    from sparse_vggt.weights import WeightsUnavailableError, resolve_checkpoint

    with pytest.raises(WeightsUnavailableError) as info:
        resolve_checkpoint("facebook/VGGT-1B", ("model.safetensors", "model.pt"), stage="reconstruct")
    msg = str(info.value)
    assert "sparse-vggt weights fetch" in msg
    assert "--set reconstruct.model=random --set reconstruct.allow_random_weights=true" in msg


def test_megaloc_default_repo_loads_offline_from_the_pinned_fetch(fake_hub, monkeypatch):
    """describe's loader (MegaLoc.from_pretrained("gberton/MegaLoc")) finds the fetched, pinned file offline."""
    import torch
    from safetensors.torch import save

    from sparse_vggt.models.megaloc import MegaLoc

    torch.manual_seed(0)
    tiny = MegaLoc("tiny").eval()
    monkeypatch.setitem(CONTENT, "describe", save({k: v.contiguous() for k, v in tiny.state_dict().items()}))
    provision.fetch(download=fake_hub["download"], hub_sha256=fake_hub["hub_sha"], stages=("describe",))
    loaded = MegaLoc.from_pretrained("gberton/MegaLoc", preset="tiny")
    for k, v in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_fetch_without_network_says_what_to_do(fake_hub):
    def offline(pin, dest):
        raise OSError("Name or service not known")

    with pytest.raises(provision.WeightsFetchError, match="copy the Hugging Face cache"):
        provision.fetch(download=offline, hub_sha256=fake_hub["hub_sha"])
