"""Dense vs sparse global attention (one global block) and the whole aggregator, in one run.

Each (bench, variant) runs in a child process of its own: one warm-up call, one call measured for peak
memory, then ``--repeats`` timed calls (median reported). Peak memory is the peak of bytes allocated above
the level before the call: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the same quantity from the
profiler's allocation events (every allocation and free, op-internal buffers included). Process RSS is not
used: on this shared VM the RSS peaks of identical calls varied by tens of MB.

Variants of global attention:
- ``dense``: the model's own attention module (``F.scaled_dot_product_attention`` over all S·P tokens; on CPU
  and CUDA this is a fused kernel whose memory is O(S·P), its time O((S·P)²));
- ``dense-math``: the same attention computed as softmax(QKᵀ)V with the score matrix materialised, i.e. what
  SDPA's math backend (and the reference's ``fused_attn=False`` path) allocates: memory O((S·P)²);
- ``sparse``: `SparseGlobalAttention` with random k-neighbour sets (+ self + frame 0).

    python benchmarks/sparse_attention.py --device cpu --frames 96 --neighbors 8
    python benchmarks/sparse_attention.py --device cuda --preset vggt-1b --dtype bfloat16 --frames 100 200 500 1000 --neighbors 10 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from typing import Any

PRESETS: dict[str, dict[str, int]] = {
    # CPU-sized: 126x126 px -> 9x9 patches (+5 special = 86 tokens/frame), width 128, 4 heads, 2 blocks of each kind.
    "small": {"embed_dim": 128, "num_heads": 4, "depth": 2, "image": 126},
    # The published VGGT-1B aggregator at 518x392 (37x28 patches + 5 = 1041 tokens/frame).
    "vggt-1b": {"embed_dim": 1024, "num_heads": 16, "depth": 24, "image": 518},
}


def _allocated_peak(fn: Any) -> int:
    """Peak of bytes allocated through PyTorch's CPU allocator during ``fn()``, above the level before it.

    The CPU analogue of ``torch.cuda.max_memory_allocated``: from the profiler's allocation events (every
    allocation and free, op-internal buffers included), so it is deterministic, unlike RSS on a shared VM.
    """
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts, profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def _build_aggregator(args: argparse.Namespace, sparse: Any = None) -> Any:
    """Our aggregator with the preset's width/depth and a conv patch embed (the DINOv2 trunk is not timed);
    ``sparse``: a SparseContext for sparse global attention.

    ``--reference DIR`` (hidden, developers only) builds the reference implementation's instead, as an oracle
    (sparse: its global blocks rebuilt by its own ``Block`` with our sparse attention as ``attn_class``).
    """
    import torch

    p = PRESETS[args.preset]
    torch.manual_seed(0)
    kwargs = dict(img_size=p["image"], patch_size=14, embed_dim=p["embed_dim"], depth=p["depth"],
                  num_heads=p["num_heads"], patch_embed="conv")
    if not args.reference:
        from sparse_vggt.models.aggregator import Aggregator

        return Aggregator(**kwargs, sparse=sparse)
    # developer oracle only; never part of the project
    sys.path.insert(0, args.reference)
    from vggt.layers.block import Block  # type: ignore[import-not-found]
    from vggt.models.aggregator import Aggregator  # type: ignore[import-not-found]

    agg = Aggregator(**kwargs)
    if sparse is not None:
        from torch import nn

        from sparse_vggt.layers.sparse_attention import SparseGlobalAttention

        def attn_class(dim, num_heads=8, qkv_bias=True, proj_bias=True, qk_norm=False, rope=None, **_unused):
            return SparseGlobalAttention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm,
                                         rope=rope, context=sparse, num_special=agg.patch_start_idx)

        state = agg.state_dict()
        agg.global_blocks = nn.ModuleList(
            Block(dim=p["embed_dim"], num_heads=p["num_heads"], mlp_ratio=4.0, qkv_bias=True, proj_bias=True,
                  ffn_bias=True, init_values=0.01, qk_norm=True, rope=agg.rope, attn_class=attn_class)
            for _ in agg.global_blocks)
        agg.load_state_dict(state)
        agg.sparse = sparse
    return agg


def _image_hw(args: argparse.Namespace) -> tuple[int, int]:
    side = PRESETS[args.preset]["image"]
    if args.tokens:
        g = max(1, round(args.tokens**0.5))
        return 14 * g, 14 * g
    return (side, side) if args.preset == "small" else (392, 518)


def _neighbors(S: int, k: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [rng.sample([j for j in range(S) if j != i], min(k, S - 1)) for i in range(S)]


def _with(cm: Any, fn: Any) -> Any:
    with cm:
        return fn()


def _math_attention(attn: Any, x: Any, pos: Any) -> Any:
    """Dense attention with materialised scores (SDPA math backend / fused_attn=False)."""
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.rope is not None:
        q, k = attn.rope(q, pos), attn.rope(k, pos)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    out = scores.softmax(dim=-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(B, N, C))


def _child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from sparse_vggt.device import select_device, select_dtype
    from sparse_vggt.layers.neighbor_sets import NeighborSets
    from sparse_vggt.layers.sparse_attention import SparseContext

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    dtype = select_dtype(device, args.dtype)
    S, k = args.frames[0], args.neighbors
    Hh, Ww = _image_hw(args)
    special = 5  # camera + 4 register tokens per frame
    P = special + (Hh // 14) * (Ww // 14)
    C = PRESETS[args.preset]["embed_dim"]
    nbrs = _neighbors(S, k)
    gen = torch.Generator(device="cpu").manual_seed(0)
    if args.bench == "global_attention":
        # One global attention module of the aggregator (our layers: qkv, q/k LayerNorm, 2-D RoPE, proj).
        from sparse_vggt.layers.attention import Attention
        from sparse_vggt.layers.rope import RotaryPositionEmbedding2D
        from sparse_vggt.layers.sparse_attention import SparseContext, SparseGlobalAttention

        torch.manual_seed(0)
        attn = Attention(C, PRESETS[args.preset]["num_heads"], qk_norm=True, rope=RotaryPositionEmbedding2D(100.0))
        attn = attn.to(device).eval()
        ctx = SparseContext(memory_budget_mb=args.memory_mb, backend=args.backend, num_special=special)
        sparse_attn = SparseGlobalAttention(C, attn.num_heads, qk_norm=True, rope=attn.rope, context=ctx,
                                            num_special=special).to(device).eval()
        sparse_attn.load_state_dict(attn.state_dict())
        x = torch.randn(1, S * P, C, generator=gen).to(device)
        gy, gx = torch.meshgrid(torch.arange(Hh // 14), torch.arange(Ww // 14), indexing="ij")
        grid = torch.stack([gy.flatten(), gx.flatten()], -1) + 1
        pos = torch.cat([torch.zeros(special, 2, dtype=torch.long), grid]).repeat(S, 1)[None].to(device)
        if args.variant == "sparse":
            sets = NeighborSets.build(nbrs, S)
            call = lambda: _with(ctx.use(sets), lambda: sparse_attn(x, pos=pos))  # noqa: E731
        elif args.variant == "dense-math":
            call = lambda: _math_attention(attn, x, pos)  # noqa: E731
        else:
            call = lambda: attn(x, pos=pos)  # noqa: E731
    else:
        ctx = SparseContext(memory_budget_mb=args.memory_mb, backend=args.backend) if args.variant == "sparse" else None
        agg = _build_aggregator(args, ctx).to(device).eval()
        x = torch.rand(1, S, 3, Hh, Ww, generator=gen).to(device)
        if args.variant == "dense-math":
            raise SystemExit("dense-math is a global_attention variant only")
        if args.variant == "sparse":
            call = lambda: _with(ctx.use(NeighborSets.build(nbrs, S)), lambda: agg(x))  # noqa: E731
        else:
            call = lambda: agg(x)  # noqa: E731

    def run_once() -> float:
        from sparse_vggt.device import autocast

        with autocast(device, dtype):
            t0 = time.perf_counter()
            out = call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        del out
        return time.perf_counter() - t0

    first = run_once()  # warm-up: lazy initialisation and code pages are not measured
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _allocated_peak(run_once)
    times = sorted(run_once() for _ in range(max(1, args.repeats)))
    return {
        "bench": args.bench, "variant": args.variant, "seconds": times[len(times) // 2],
        "peak_bytes": int(peak), "first_call_seconds": first, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
        "frames": S, "neighbors": k, "tokens_per_frame": P, "embed_dim": C, "preset": args.preset,
        "heads": PRESETS[args.preset]["num_heads"], "depth": PRESETS[args.preset]["depth"],
        "image": f"{Ww}x{Hh}", "memory_mb": args.memory_mb, "backend": args.backend if args.variant == "sparse" else "",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
    }


def _spawn(args: argparse.Namespace, bench: str, variant: str, frames: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_child", "--bench", bench, "--variant", variant, "--frames", str(frames)]
    for name in ("device", "dtype", "neighbors", "preset", "tokens", "repeats", "memory_mb", "backend", "threads",
                 "reference"):
        value = getattr(args, name)
        if value not in (None, ""):
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"bench": bench, "variant": variant, "frames": frames, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _scaling(args: argparse.Namespace) -> dict[str, Any]:
    """``--scaling``: thread CPU time (``time.thread_time``) with 1 thread, dense and sparse interleaved in one
    process (each timed call alternates dense/sparse, so load from other jobs hits both alike), the minimum of
    ``--repeats`` runs per S, growth exponents between consecutive S, for one global attention module and the
    whole small aggregator (conv patch embed + frame/global blocks + kept layers)."""
    import math
    import time as _time

    import torch

    from sparse_vggt.layers.attention import Attention
    from sparse_vggt.layers.rope import RotaryPositionEmbedding2D
    from sparse_vggt.layers.neighbor_sets import NeighborSets
    from sparse_vggt.layers.sparse_attention import SparseContext, SparseGlobalAttention

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    Hh, Ww = _image_hw(args)
    special, C = 5, PRESETS[args.preset]["embed_dim"]
    P = special + (Hh // 14) * (Ww // 14)
    torch.manual_seed(0)
    attn = Attention(C, PRESETS[args.preset]["num_heads"], qk_norm=True, rope=RotaryPositionEmbedding2D(100.0)).eval()
    ctx = SparseContext(memory_budget_mb=args.memory_mb, num_special=special)
    sparse_attn = SparseGlobalAttention(C, attn.num_heads, qk_norm=True, rope=attn.rope, context=ctx,
                                        num_special=special).eval()
    sparse_attn.load_state_dict(attn.state_dict())
    dense_agg = _build_aggregator(args).eval()
    agg_ctx = SparseContext(memory_budget_mb=args.memory_mb)
    sparse_agg = _build_aggregator(args, agg_ctx).eval()

    def cpu(fn: Any) -> float:
        t0 = _time.thread_time()
        fn()
        return _time.thread_time() - t0

    rows = []
    for S in args.frames:
        nbrs = _neighbors(S, args.neighbors)
        sets = NeighborSets.build(nbrs, S)
        gen = torch.Generator().manual_seed(S)
        x = torch.randn(1, S * P, C, generator=gen)
        gy, gx = torch.meshgrid(torch.arange(Hh // 14), torch.arange(Ww // 14), indexing="ij")
        grid = torch.stack([gy.flatten(), gx.flatten()], -1) + 1
        pos = torch.cat([torch.zeros(special, 2, dtype=torch.long), grid]).repeat(S, 1)[None]
        images = torch.rand(1, S, 3, Hh, Ww, generator=gen)
        calls = {
            ("global_attention", "dense"): lambda: attn(x, pos=pos),
            ("global_attention", "sparse"): lambda: _with(ctx.use(sets), lambda: sparse_attn(x, pos=pos)),
            ("aggregator", "dense"): lambda: dense_agg(images),
            ("aggregator", "sparse"): lambda: _with(agg_ctx.use(sets), lambda: sparse_agg(images)),
        }
        best = {key: math.inf for key in calls}
        for key, fn in calls.items():  # warm-up
            fn()
        for _ in range(args.repeats):
            for key, fn in calls.items():  # interleaved: dense, sparse, dense, sparse
                best[key] = min(best[key], cpu(fn))
        for bench in ("global_attention", "aggregator"):
            d, sp = best[(bench, "dense")], best[(bench, "sparse")]
            rows.append({"bench": bench, "frames": S, "dense_s": d, "sparse_s": sp, "ratio": d / sp})
            print(f"{bench:16s} S={S:4d} dense {d:8.3f} s  sparse {sp:7.3f} s  {d / sp:5.1f}x", file=sys.stderr,
                  flush=True)
    for bench in ("global_attention", "aggregator"):
        mine = [r for r in rows if r["bench"] == bench]
        for a, b in zip(mine, mine[1:]):
            f = math.log(b["frames"] / a["frames"])
            b["dense_exponent"] = math.log(b["dense_s"] / a["dense_s"]) / f
            b["sparse_exponent"] = math.log(b["sparse_s"] / a["sparse_s"]) / f
    return {"mode": "scaling", "preset": args.preset, "tokens_per_frame": P, "neighbors": args.neighbors,
            "threads": 1, "repeats": args.repeats, "timer": "time.thread_time (min of repeats)",
            "machine": f"{platform.machine()} {platform.processor()}", "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--frames", type=int, nargs="+", default=[96])
    ap.add_argument("--neighbors", type=int, default=8)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--tokens", type=int, default=0, help="patches per frame (square grid); 0 = preset image")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-mb", dest="memory_mb", type=float, default=64.0, help="sparse chunk budget")
    ap.add_argument("--backend", default="auto", help="auto or a registered kernel (sparse_vggt.layers.kernels)")
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op CPU threads (0 = torch default); 1 keeps ratios stable on a shared machine")
    ap.add_argument("--benches", nargs="+", default=["global_attention", "aggregator"])
    ap.add_argument("--variants", nargs="+", default=["dense", "dense-math", "sparse"])
    ap.add_argument("--reference", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--scaling", action="store_true",
                    help="1-thread thread-CPU-time scaling, dense and sparse interleaved, min of --repeats")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bench", default="global_attention", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="dense", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.scaling:
        print(json.dumps(_scaling(args), indent=1))
        return
    if args._child:
        print(json.dumps(_child(args)))
        return
    rows = []
    for frames in args.frames:
        for bench in args.benches:
            for variant in args.variants:
                if bench != "global_attention" and variant == "dense-math":
                    continue
                row = _spawn(args, bench, variant, frames)
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
    # Ratios dense / sparse, per bench and frame count.
    by = {(r["bench"], r["variant"], r["frames"]): r for r in rows if "error" not in r}
    for (bench, variant, frames), r in list(by.items()):
        sp = by.get((bench, "sparse", frames))
        if sp and variant != "sparse":
            ratio = {"bench": bench, "variant": f"{variant}/sparse", "frames": frames, "neighbors": args.neighbors,
                     "device": r["device"], "seconds": None, "peak_bytes": None,
                     "speedup": r["seconds"] / sp["seconds"],
                     "memory_ratio": (r["peak_bytes"] / sp["peak_bytes"]) if sp["peak_bytes"] else None}
            rows.append(ratio)
            if args.json:
                print(json.dumps(ratio), flush=True)
    if not args.json:
        _table(rows)


def _table(rows: list[dict[str, Any]]) -> None:
    print(f"{'bench':18} {'variant':18} {'frames':>6} {'tok/fr':>6} {'seconds':>9} {'peak MiB':>9} {'speedup':>8} {'mem x':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['bench']:18} {r['variant']:18} {r['frames']:>6} error: {r['error']}")
            continue
        secs = f"{r['seconds']:.3f}" if r.get("seconds") is not None else ""
        peak = f"{r['peak_bytes'] / 2**20:.1f}" if r.get("peak_bytes") is not None else ""
        sp = f"{r['speedup']:.1f}x" if r.get("speedup") else ""
        mem = f"{r['memory_ratio']:.1f}x" if r.get("memory_ratio") else ""
        print(f"{r['bench']:18} {r['variant']:18} {r['frames']:>6} {r.get('tokens_per_frame', ''):>6} {secs:>9} {peak:>9} {sp:>8} {mem:>7}")


if __name__ == "__main__":
    main()
