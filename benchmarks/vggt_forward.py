"""VGGT forward: wall time and peak memory of one dense forward (random weights).

Variants (same model, same input, one run): ``keep4`` = this implementation (the aggregator keeps only the
layers the heads read), ``keepall`` = every aggregator layer kept, as the reference did before 2026-05;
``dense`` = keep4 under its issue-17 name, ``sparse`` = the same model with sparse global attention
(`VGGT.with_sparse_attention`, ``--neighbors`` random neighbours per frame + self + frame 0). Every row also carries the
memory model's prediction (sparse_vggt.memory) for the same S. On CUDA/MPS the aggregator's weights are
stored in the compute dtype (``--weights auto``; ``float32`` keeps them full precision).

The issue-17 GPU run (dense vs sparse, 336x518, bf16, S = 100/200/500/1000, one process):

    python benchmarks/vggt_forward.py --device cuda --height 336 --width 518 --frames 100 200 500 1000 \
        --variants sparse dense --neighbors 10 --json
Peak memory: CUDA ``torch.cuda.max_memory_allocated``; CPU/MPS the process RSS sampled every 5 ms during
the forward (``peak_bytes``) and its increase over the RSS before the forward (``forward_bytes``).

    python benchmarks/vggt_forward.py --device cpu --preset vggt-1b --frames 2 --size 518 --json
    python benchmarks/vggt_forward.py --device cuda --frames 10 50 100 200 --size 518   # bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time

import psutil
import torch


class RssSampler:
    """Peak resident set size of this process while the context is open (polled in a thread)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.proc = interval, psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "RssSampler":
        self.before = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def run_once(model, images, device, dtype, chunk, keep_all: bool, neighbors=None) -> dict:
    from sparse_vggt.device import autocast

    agg = model.aggregator
    saved = agg.keep_layers
    agg.keep_layers = list(range(agg.depth)) if keep_all else saved
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with RssSampler() as rss, torch.inference_mode(), autocast(device, dtype):
            t0 = time.perf_counter()
            kwargs = {} if neighbors is None else {"neighbors": neighbors}
            out = model(images, head_chunk_frames=chunk, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            sec = time.perf_counter() - t0
        del out
    finally:
        agg.keep_layers = saved
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        return {"seconds": sec, "peak_bytes": peak, "forward_bytes": peak - base}
    return {"seconds": sec, "peak_bytes": rss.peak, "forward_bytes": rss.peak - rss.before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 CUDA, fp16 MPS, fp32 CPU")
    ap.add_argument("--preset", default="vggt-1b")
    ap.add_argument("--frames", type=int, nargs="+", default=[2])
    ap.add_argument("--size", type=int, default=518, help="square input side (multiple of 14)")
    ap.add_argument("--height", type=int, default=0, help="input height (default: --size)")
    ap.add_argument("--width", type=int, default=0, help="input width (default: --size)")
    ap.add_argument("--neighbors", type=int, default=10, help="k of the sparse variant")
    ap.add_argument("--weights", default="auto", help="aggregator weights dtype: auto | float32 | bfloat16 | float16")
    ap.add_argument("--chunk", type=int, default=8, help="frames per DPT-head chunk (0: all at once)")
    ap.add_argument("--variants", nargs="+", default=["keep4", "keepall"], choices=["keep4", "keepall", "dense", "sparse"])
    ap.add_argument("--warmup", action="store_true", help="one untimed forward first (small models)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import random

    from sparse_vggt import memory
    from sparse_vggt.device import select_device, select_dtype, select_weights_dtype
    from sparse_vggt.models.vggt import PRESETS, VGGT
    from sparse_vggt.layers.sparse_attention import SparseContext

    device = select_device(args.device)
    dtype = select_dtype(device, args.dtype)
    weights = select_weights_dtype(device, dtype, args.weights)
    height, width = args.height or args.size, args.width or args.size
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = VGGT.from_preset(args.preset).eval()  # full model (track head idle: no queries)
    model.set_weights_dtype(weights, device)
    build = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    sparse_model = model.with_sparse_attention(SparseContext())  # same parameter tensors, sparse global blocks
    rows = []
    for frames in args.frames:
        images = torch.rand(1, frames, 3, height, width, device=device)
        rng = random.Random(frames)
        nbrs = [rng.sample([j for j in range(frames) if j != i], min(args.neighbors, frames - 1))
                for i in range(frames)]
        if args.warmup:
            run_once(model, images, device, dtype, args.chunk or None, False)
        for variant in args.variants:
            sparse = variant == "sparse"
            res = run_once(sparse_model if sparse else model, images, device, dtype, args.chunk or None,
                           variant == "keepall", nbrs if sparse else None)
            predicted = memory.estimate(frames, height, width, args.neighbors if sparse else None, dtype, device,
                                        PRESETS[args.preset], weights_dtype=weights,
                                        head_chunk_frames=args.chunk or frames)
            res["predicted_peak_bytes"] = predicted.peak
            row = {"bench": "vggt_forward", "variant": variant, **res, "frames": frames, "size": args.size,
                   "height": height, "width": width, "weights_dtype": str(weights).replace("torch.", ""),
                   "preset": args.preset, "params": n_params, "device": device.type,
                   "dtype": str(dtype).replace("torch.", ""), "head_chunk_frames": args.chunk,
                   "build_seconds": round(build, 2), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "machine": platform.machine()}
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print(f"{'preset':10s} {'S':>4s} {'HxW':>9s} {'variant':8s} {'seconds':>9s} {'peak GiB':>9s} "
              f"{'forward GiB':>11s} {'time ratio':>10s} {'fwd-mem ratio':>13s}")
        base = {r["frames"]: r for r in rows if r["variant"] == rows[0]["variant"]}
        for r in rows:
            b = base[r["frames"]]
            print(f"{r['preset']:10s} {r['frames']:4d} {str(r['height']) + 'x' + str(r['width']):>9s} {r['variant']:8s} {r['seconds']:9.2f} "
                  f"{r['peak_bytes'] / 2**30:9.2f} {r['forward_bytes'] / 2**30:11.2f} "
                  f"{r['seconds'] / b['seconds']:10.2f} {r['forward_bytes'] / max(b['forward_bytes'], 1):13.2f}")


if __name__ == "__main__":
    main()
