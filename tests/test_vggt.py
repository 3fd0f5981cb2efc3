"""VGGT architecture: checkpoint layout, output conventions, chunking/batching equivalence, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparse_vggt.layers import Attention, RotaryPositionEmbedding2D, dinov2
from sparse_vggt.models.vggt import PRESETS, VGGT

TSV = Path(__file__).resolve().parents[1] / "sparse_vggt" / "model_facts" / "vggt_1b_state_dict.tsv"
H, W = 56, 70  # 4 x 5 patches: small, non-square


def read_tsv(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, _dtype = line.split("\t")
        rows.append((name, tuple(int(x) for x in shape.split(",")) if shape else ()))
    return rows


@pytest.fixture(scope="module")
def tiny() -> VGGT:
    torch.manual_seed(0)
    model = VGGT.from_preset("tiny").eval()
    with torch.no_grad():  # move LayerScale/special tokens off their near-zero init so every path matters
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.3, 1.0)
            elif name.endswith(("camera_token", "register_token")):
                p.normal_()
    return model


def test_state_dict_equals_vggt_1b_checkpoint_layout():
    with torch.device("meta"):
        model = VGGT()
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    ref = read_tsv(TSV)
    assert len(ours) == len(ref) == 1797
    assert dict(ours) == dict(ref)
    assert [k for k, _ in ours] == [k for k, _ in ref]  # same order as the published state dict
    assert sum(v.numel() for v in model.state_dict().values()) == 1_256_537_516


def test_disabled_heads_are_absent_from_state_dict():
    with torch.device("meta"):
        model = VGGT(enable_track=False, enable_point=False)
    keys = model.state_dict().keys()
    assert not any(k.startswith(("track_head.", "point_head.")) for k in keys)
    assert any(k.startswith("depth_head.") for k in keys)


def test_global_attention_exposes_reference_interface():
    model = VGGT.from_preset("tiny")
    agg = model.aggregator
    assert agg.patch_start_idx == 5
    attn = agg.global_blocks[0].attn
    assert isinstance(attn, Attention)
    for name in ("qkv", "q_norm", "k_norm", "proj", "rope", "num_heads", "head_dim", "scale"):
        assert hasattr(attn, name), name
    assert attn.head_dim * attn.num_heads == agg.embed_dim
    x = torch.randn(1, 2 * 25, agg.embed_dim)
    pos = agg.positions(2, 4, 5, x.device).reshape(1, 2 * 25, 2)
    assert attn(x, pos=pos).shape == x.shape


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("S", [1, 2, 5])
def test_output_shapes(tiny, B, S):
    images = torch.rand(B, S, 3, H, W)
    query = torch.rand(B, 3, 2) * torch.tensor([W - 1.0, H - 1.0])
    with torch.inference_mode():
        out = tiny(images, query_points=query)
    assert out["pose_enc"].shape == (B, S, 9)
    assert len(out["pose_enc_list"]) == 4 and all(p.shape == (B, S, 9) for p in out["pose_enc_list"])
    assert out["depth"].shape == (B, S, H, W, 1)
    assert out["depth_conf"].shape == (B, S, H, W)
    assert out["world_points"].shape == (B, S, H, W, 3)
    assert out["world_points_conf"].shape == (B, S, H, W)
    assert out["track"].shape == (B, S, 3, 2)
    assert out["vis"].shape == out["conf"].shape == (B, S, 3)
    assert out["images"].shape == (B, S, 3, H, W)
    # activations: depth = exp(.) > 0, confidences = 1 + exp(.) > 1, vis/conf sigmoid, FoV ReLU >= 0
    assert (out["depth"] > 0).all() and (out["depth_conf"] > 1).all() and (out["world_points_conf"] > 1).all()
    assert ((out["vis"] >= 0) & (out["vis"] <= 1)).all()
    assert (out["pose_enc"][..., 7:] >= 0).all()
    # frame-0 tracks are the queries themselves
    torch.testing.assert_close(out["track"][:, 0], query)


def test_unbatched_input_and_2d_queries(tiny):
    images = torch.rand(3, 3, H, W)
    with torch.inference_mode():
        a = tiny(images, query_points=torch.tensor([[10.0, 20.0]]))
        b = tiny(images[None], query_points=torch.tensor([[[10.0, 20.0]]]))
    assert a["depth"].shape == (1, 3, H, W, 1)
    assert torch.equal(a["depth"], b["depth"]) and torch.equal(a["track"], b["track"])


def test_heads_in_chunks_equal_single_batch(tiny):
    """Chunking only splits per-frame convolutions: dense outputs and the track features agree to fp32
    rounding. (Tracks themselves are not compared: the random-weight tracker amplifies 1e-7 feature
    differences over its iterations.)"""
    images = torch.rand(1, 5, 3, H, W)
    with torch.inference_mode():
        whole = tiny(images, head_chunk_frames=None)
        tokens, start = tiny.aggregator(images)
        fmaps = tiny.track_head.feature_extractor(tokens, images, start, frames_chunk_size=None)
        for chunk in (1, 2, 3):
            part = tiny(images, head_chunk_frames=chunk)
            for key in ("depth", "depth_conf", "world_points", "world_points_conf"):
                torch.testing.assert_close(part[key], whole[key], rtol=1e-5, atol=1e-6, msg=f"{key} chunk={chunk}")
            assert torch.equal(part["pose_enc"], whole["pose_enc"])
            f = tiny.track_head.feature_extractor(tokens, images, start, frames_chunk_size=chunk)
            torch.testing.assert_close(f, fmaps, rtol=1e-5, atol=1e-6)


def test_batch_entries_are_independent(tiny):
    images = torch.rand(2, 3, 3, H, W)
    with torch.inference_mode():
        both = tiny(images)
        first = tiny(images[:1])
    for key in ("pose_enc", "depth", "world_points"):
        torch.testing.assert_close(both[key][:1], first[key], rtol=1e-5, atol=1e-5)


def test_fp32_forward_is_deterministic(tiny):
    images = torch.rand(1, 4, 3, H, W)
    with torch.inference_mode():
        a, b = tiny(images), tiny(images)
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        assert torch.equal(a[key], b[key]), key


def test_first_frame_is_special_and_others_are_exchangeable(tiny):
    """Frame 0 gets its own camera/register tokens; other frames carry no index, so swapping two of them
    swaps their outputs and leaves frame 0 unchanged, while changing the reference frame changes everything."""
    images = torch.rand(1, 3, 3, H, W)
    with torch.inference_mode():
        base = tiny(images)
        swapped = tiny(images[:, [0, 2, 1]])
        new_ref = tiny(images[:, [1, 0, 2]])
    for key in ("pose_enc", "depth", "world_points"):
        torch.testing.assert_close(swapped[key][:, [0, 2, 1]], base[key], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(new_ref["depth"][:, 1], base["depth"][:, 0], atol=1e-4)


def test_aggregator_keeps_only_layers_the_heads_read(tiny):
    with torch.inference_mode():
        tokens, start = tiny.aggregator(torch.rand(1, 2, 3, H, W))
    kept = [i for i, t in enumerate(tokens) if t is not None]
    assert kept == [0, 1, 2, 3]  # tiny reads all 4 of its layers
    with torch.device("meta"):
        big = VGGT()
    assert big.aggregator.keep_layers == [4, 11, 17, 23]
    assert tokens[-1].shape == (1, 2, start + 4 * 5, 2 * tiny.aggregator.embed_dim)


def test_input_validation(tiny):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny(torch.rand(1, 2, 3, 50, 70))
    with pytest.raises(ValueError, match="3 input channels"):
        tiny(torch.rand(1, 2, 4, H, W))
    with pytest.raises(ValueError, match=r"\(S, 3, H, W\)"):
        tiny(torch.rand(3, H, W))


def test_predict_uses_inference_mode_and_fp32_on_cpu(tiny):
    out = tiny.predict(torch.rand(2, 3, H, W), device="cpu")
    assert out["depth"].dtype == torch.float32 and not out["depth"].requires_grad
    assert out["depth"].is_inference()


def test_autocast_dtype_per_device(monkeypatch):
    """bf16 on CUDA where supported (fp16 otherwise), fp16 on MPS, fp32 on CPU."""
    from sparse_vggt.device import select_dtype

    assert select_dtype(torch.device("cpu")) == torch.float32
    assert select_dtype(torch.device("mps")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert select_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert select_dtype(torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError, match="float16 is not supported for CPU"):
        select_dtype(torch.device("cpu"), "float16")


def test_predict_autocast_runs_aggregator_in_low_precision_and_heads_in_fp32(tiny):
    seen = []
    # proj, not qkv: the global block computes q, k and v from slices of the qkv weight (chunked queries),
    # so the qkv module itself is not called there; proj is, once per query chunk (one chunk here).
    hook = tiny.aggregator.global_blocks[0].attn.proj.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    try:
        images = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(3))
        low = tiny.predict(images, device="cpu", dtype="bfloat16")
        full = tiny.predict(images, device="cpu", dtype="float32")
    finally:
        hook.remove()
    assert seen == [torch.bfloat16, torch.float32]
    for key in ("pose_enc", "depth", "depth_conf", "world_points"):
        assert low[key].dtype == torch.float32, key  # heads run with autocast disabled
    assert not torch.equal(low["depth"], full["depth"])  # bf16 really was used upstream of the heads
    torch.testing.assert_close(low["depth"], full["depth"], rtol=0.1, atol=0.1)


def test_predict_passes_neighbors_to_a_sparse_model(tiny):
    import copy

    from sparse_vggt.layers.sparse_attention import SparseContext

    images = torch.rand(3, 3, H, W, generator=torch.Generator().manual_seed(4))
    dense = tiny.predict(images, device="cpu")
    sparse = VGGT(**{**tiny.config, "sparse": SparseContext()})
    sparse.load_state_dict(copy.deepcopy(tiny).state_dict())
    out = sparse.predict(images, device="cpu", neighbors=[[1, 2], [0, 2], [0, 1]])
    torch.testing.assert_close(out["depth"], dense["depth"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["pose_enc"], dense["pose_enc"], rtol=1e-5, atol=1e-5)


def test_tiny_preset_runs_s4_at_224x168():
    model = VGGT.from_preset("tiny").eval()
    with torch.inference_mode():
        out = model(torch.rand(4, 3, 168, 224))
    assert out["depth"].shape == (1, 4, 168, 224, 1)
    assert torch.isfinite(out["world_points"]).all()


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="tiny"):
        VGGT.from_preset("huge")
    assert {"vggt-1b", "tiny", "small"} <= set(PRESETS)


# ---- layers ------------------------------------------------------------------------------------------


def test_rope_is_relative_and_norm_preserving():
    rope = RotaryPositionEmbedding2D(100.0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 1, 16, dtype=torch.float64, generator=g)
    k = torch.randn(1, 2, 1, 16, dtype=torch.float64, generator=g)

    def score(pq, pk):
        a = rope(q, torch.tensor([[pq]]))
        b = rope(k, torch.tensor([[pk]]))
        return (a * b).sum(-1)

    # same offset (2, 3): equal up to the fp32 angle table the reference uses
    torch.testing.assert_close(score((3, 5), (1, 2)), score((7, 9), (5, 6)), rtol=0, atol=1e-5)
    assert not torch.allclose(score((3, 5), (1, 2)), score((3, 5), (2, 2)))
    torch.testing.assert_close(rope(q, torch.tensor([[(4, 7)]])).norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rope(q, torch.tensor([[(0, 0)]])), q)  # position 0 = identity


def test_dino_pos_embed_modes():
    """VGGT resamples to the exact grid size (antialias); MegaLoc by scale factor with +0.1: both hit the
    grid, give different values, and neither resamples for the native square input."""
    torch.manual_seed(0)
    vggt_style = dinov2("vits14", depth=1, img_size=70, interpolate_mode="size", interpolate_offset=0.0,
                        interpolate_antialias=True)
    megaloc_style = dinov2("vits14", depth=1, img_size=70)
    megaloc_style.load_state_dict(vggt_style.state_dict())
    a = vggt_style.interpolate_pos_encoding(3 * 7, 42, 98, torch.float32)
    b = megaloc_style.interpolate_pos_encoding(3 * 7, 42, 98, torch.float32)
    assert a.shape == b.shape == (1, 1 + 21, 384)
    assert not torch.allclose(a, b)
    assert torch.equal(vggt_style.interpolate_pos_encoding(25, 70, 70, torch.float32), vggt_style.pos_embed)
    out = vggt_style.forward_features(torch.rand(2, 3, 42, 98))
    assert out["x_norm_patchtokens"].shape == (2, 21, 384)
    torch.testing.assert_close(vggt_style.forward_patch_tokens(torch.rand(1, 3, 42, 98)).shape[1], 21)


def test_with_sparse_attention_shares_the_weights(tiny):
    """The sparse twin of a loaded model holds the same parameter tensors (no copy); with every frame listed as
    a neighbour it gives the dense model's outputs."""
    from sparse_vggt.layers.sparse_attention import SparseContext, SparseGlobalAttention

    sparse = tiny.with_sparse_attention(SparseContext())
    dense_params = dict(tiny.named_parameters())
    assert all(p.data_ptr() == dense_params[n].data_ptr() for n, p in sparse.named_parameters())
    assert all(isinstance(b.attn, SparseGlobalAttention) for b in sparse.aggregator.global_blocks)
    assert not sparse.training
    images = torch.rand(3, 3, H, W, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        dense_out = tiny(images)
        sparse_out = sparse(images, neighbors=[[0, 1, 2]] * 3)
    for key in ("pose_enc", "depth", "world_points"):
        torch.testing.assert_close(sparse_out[key], dense_out[key], rtol=1e-5, atol=1e-5)
