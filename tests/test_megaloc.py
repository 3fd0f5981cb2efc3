"""MegaLoc: checkpoint layout, strict loading through from_pretrained, SALAD maths, forward contract."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparse_vggt.models.megaloc import SALAD, MegaLoc, sinkhorn_log

TSV = Path(__file__).resolve().parents[1] / "sparse_vggt" / "model_facts" / "megaloc_state_dict.tsv"


def tsv_layout() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in TSV.read_text().splitlines()[1:]:
        name, shape, _ = line.split("\t")
        rows.append((name, tuple(int(s) for s in shape.split(",")) if shape else ()))
    return rows


def test_state_dict_names_and_shapes_equal_the_published_checkpoint() -> None:
    with torch.device("meta"):
        model = MegaLoc()
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    want = tsv_layout()
    assert len(want) == 189
    assert dict(got) == dict(want)
    assert [k for k, _ in got] == [k for k, _ in want]  # same order as the reference state dict
    assert sum(math.prod(s) for _, s in got) == 228_639_553
    assert model.feat_dim == 8448


def test_from_pretrained_loads_safetensors_strictly(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = MegaLoc("tiny").eval()
    state = {k: torch.randn_like(v) * 0.02 for k, v in ref.state_dict().items()}
    state["aggregator.agg.dust_bin"] = torch.tensor(1.3)
    ref.load_state_dict(state)
    (tmp_path / "ckpt").mkdir()
    save_file(state, tmp_path / "ckpt" / "model.safetensors")
    for source in (tmp_path / "ckpt", tmp_path / "ckpt" / "model.safetensors"):  # directory or file
        model = MegaLoc.from_pretrained(source, preset="tiny")
        x = torch.randn(2, 3, 56, 70)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    bad = dict(state)
    bad.pop("backbone.norm.bias")
    bad["aggregator.extra"] = torch.zeros(1)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(Exception, match="backbone.norm.bias|Missing|missing"):
        MegaLoc.from_pretrained(tmp_path / "bad.safetensors", preset="tiny")
    # The project's one loader: the same strict error as VGGT's, naming every missing and unexpected key.
    from sparse_vggt.weights import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError) as err:
        MegaLoc.from_pretrained(tmp_path / "bad.safetensors", preset="tiny")
    assert "backbone.norm.bias" in str(err.value) and "aggregator.extra" in str(err.value)
    with pytest.raises(FileNotFoundError, match="looked for model.safetensors"):
        MegaLoc.from_pretrained(tmp_path, preset="tiny")  # a directory without the file


def test_sinkhorn_marginals_and_dustbin() -> None:
    torch.manual_seed(1)
    b, m, n = 2, 8, 30
    scores = torch.randn(b, m, n)
    p = sinkhorn_log(scores, torch.tensor(1.0), keep_dustbin=True)
    assert p.shape == (b, m + 1, n)
    # after the last column update every column sums to 1 (a patch's mass over clusters + dustbin)
    torch.testing.assert_close(p.sum(1), torch.ones(b, n), atol=1e-5, rtol=0)
    # converged rows approach the marginals: 1 per cluster... and n - m for the dustbin
    p_conv = sinkhorn_log(scores, torch.tensor(1.0), iters=200, keep_dustbin=True)
    torch.testing.assert_close(p_conv.sum(2)[:, :m], torch.ones(b, m), atol=1e-4, rtol=0)
    torch.testing.assert_close(p_conv.sum(2)[:, m], torch.full((b,), float(n - m)), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="more patches"):
        sinkhorn_log(torch.randn(1, 8, 8), torch.tensor(1.0))


def test_salad_is_channel_major_with_token_first() -> None:
    torch.manual_seed(2)
    agg = SALAD(in_dim=12, num_clusters=4, cluster_dim=5, token_dim=3, mlp_dim=7).eval()
    x, t = torch.randn(2, 12, 3, 4), torch.randn(2, 12)
    out = agg(x, t)
    # independent loop formulation of the same aggregation
    f = agg.cluster_features(x).flatten(2)
    p = sinkhorn_log(agg.score(x).flatten(2), agg.dust_bin)
    v = torch.zeros(2, 5, 4)
    for c in range(5):
        for k in range(4):
            v[:, c, k] = (f[:, c] * p[:, k]).sum(-1)
    v = F.normalize(v, dim=1)
    flat = torch.stack([v[:, c, k] for c in range(5) for k in range(4)], 1)  # index c * 4 + k
    want = F.normalize(torch.cat([F.normalize(agg.token_features(t), dim=-1), flat], 1), dim=-1)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    assert out.shape == (2, 3 + 20)


def test_forward_contract_tiny() -> None:
    torch.manual_seed(3)
    model = MegaLoc("tiny").eval()
    x = torch.randn(3, 3, 98, 84)
    with torch.no_grad():
        out = model(x)
        alone = model(x[1:2])
        odd = model(torch.randn(1, 3, 100, 90))  # not multiples of 14: resized inside like the reference
    assert out.shape == (3, 96) and odd.shape == (1, 96)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1:2], alone, atol=1e-5, rtol=0)  # batch-independent
    assert not torch.allclose(out[0], out[2])
