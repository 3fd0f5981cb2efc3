"""Measured vs predicted peak memory of one VGGT forward (sparse_vggt.memory), plus predictions at large S.

Each S runs in a child process of its own: build the model (random weights), make the images, reset the
peak-RSS counter (``/proc/self/clear_refs`` = 5), run one forward under inference_mode, read VmHWM. The
measured quantity is VmHWM minus the RSS just before the forward (weights, runtime and inputs already
resident), compared with the prediction for the same quantity: ``estimate().activations`` (which includes
the input images; they are created before the reset, so they are subtracted from the prediction here).
Children run with ``MALLOC_MMAP_THRESHOLD_=131072`` so that large tensors are mmapped and returned on free
(glibc's adaptive threshold otherwise keeps freed blocks in the heap and RSS stops tracking live tensors).

Width is the real one (embed dim 1024, DINOv2-L width, DPT features 256); ``--agg-depth``/``--dino-depth``
shorten the stacks to make CPU runs affordable: depth changes the weights, not the activation peak (only 4
layers are kept either way); ``--full`` runs the exact VGGT-1B configuration.

    python benchmarks/memory.py --json --frames 2 4 8 16
    python benchmarks/memory.py --json --full --frames 2
    python benchmarks/memory.py --json --dtype bfloat16 --weights bfloat16 --frames 2 4   # half precision
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

PREDICT_AT = (100, 200, 500, 1000)


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.full:
        return {"enable_track": False}
    return dict(depth=args.agg_depth, intermediate_layer_idx=tuple(range(args.agg_depth - 4, args.agg_depth)),
                patch_embed=dict(embed_dim=1024, depth=args.dino_depth, num_heads=16), camera_trunk_depth=1,
                enable_track=False)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from sparse_vggt.layers.sparse_attention import SparseContext
    from sparse_vggt.models.vggt import VGGT

    from sparse_vggt.device import autocast

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = VGGT(**spec["config"], sparse=SparseContext() if spec["neighbors"] is not None else None).eval()
    dtype = getattr(torch, spec.get("dtype", "float32"))
    model.set_weights_dtype(getattr(torch, spec.get("weights", "float32")))
    S, H, W = spec["frames"], spec["height"], spec["width"]
    images = torch.rand(S, 3, H, W)
    kwargs = {}
    if spec["neighbors"] is not None:
        k = min(spec["neighbors"], S - 1)
        kwargs["neighbors"] = [[(i + j) % S for j in range(1, k + 1)] for i in range(S)]
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
        out = model(images, **kwargs)
    seconds = time.perf_counter() - t0
    del out
    return {"rss_before": before, "hwm": _status("VmHWM"), "seconds": seconds}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        raise RuntimeError(f"child for S={spec['frames']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--height", type=int, default=336)
    ap.add_argument("--width", type=int, default=518)
    ap.add_argument("--neighbors", type=int, default=None, help="sparse k (default: dense)")
    ap.add_argument("--agg-depth", type=int, default=4)
    ap.add_argument("--dino-depth", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="the exact VGGT-1B configuration (slow on CPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute (CPU autocast)")
    ap.add_argument("--weights", default="float32", choices=["float32", "bfloat16"], help="aggregator weights")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    from sparse_vggt import memory

    config = model_config(args)
    rows = []
    for S in args.frames:
        spec = dict(config=config, frames=S, height=args.height, width=args.width, neighbors=args.neighbors,
                    threads=args.threads, dtype=args.dtype, weights=args.weights)
        got = run_child(spec)
        est = memory.estimate(S, args.height, args.width, args.neighbors, args.dtype, "cpu", config,
                              weights_dtype=args.weights)
        images = S * 3 * args.height * args.width * 4  # resident before the reset
        measured = got["hwm"] - got["rss_before"]
        predicted = est.activations - images
        rows.append({"frames": S, "measured_bytes": measured, "predicted_bytes": predicted,
                     "error": predicted / measured - 1, "phase": est.phase, "seconds": round(got["seconds"], 1),
                     "rss_before": got["rss_before"], "hwm": got["hwm"]})
        if not args.json:
            print(f"S={S:4d} measured {measured / 2**20:8.0f} MiB predicted {predicted / 2**20:8.0f} MiB "
                  f"({rows[-1]['error']:+.1%}) {got['seconds']:.0f} s", flush=True)
    big = {}
    for dt, dev in (("bfloat16", "cuda"), ("float32", "cpu")):
        for k in (None, 10):
            for S in PREDICT_AT:
                e = memory.estimate(S, args.height, args.width, k, dt, dev)
                big[f"{dev}-{dt}-{'dense' if k is None else f'k{k}'}-S{S}"] = e.as_dict()
    e1000 = memory.estimate(1000, args.height, args.width, 10, "bfloat16", "cuda")
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": config, "height": args.height, "width": args.width, "neighbors": args.neighbors,
        "dtype": args.dtype, "weights": args.weights,
        "measured_vs_predicted": rows,
        "predicted_vggt_1b": big,
        "vggt_1b_bf16_cuda_bytes_per_frame_beyond_weights": e1000.per_frame,
        "vggt_1b_bf16_cuda_S1000_peak_gb": e1000.peak / 2**30,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for name, e in big.items():
            print(f"{name:32s} peak {e['peak'] / 2**30:7.2f} GiB  per frame {e['per_frame'] / 1e6:6.1f} MB  "
                  f"({e['phase']})")


if __name__ == "__main__":
    main()
