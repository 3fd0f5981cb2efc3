"""The cost of sparsity: dense vs sparse VGGT on a scene with reference poses (default: the fox fixture).

For every k in ``--ks`` (``all`` = dense global attention) one forward of the same frames: pose AUC@30
against the reference model (sparse_vggt.evaluate, pairwise relative rotation/translation errors), wall time
and peak memory (CUDA: allocator peak; CPU: the process's VmHWM after a reset, minus the RSS before).
With real weights this is the command that shows what sparse attention costs in accuracy:

    python benchmarks/quality.py --model facebook/VGGT-1B --ks 4 8 16 all --json

``--model random`` (with ``--preset tiny``) runs the mechanics only: its AUC numbers mean nothing (random
weights), and the output says so. Neighbours come from ``--neighbors``: ``megaloc`` (retrieval, as the
pipeline does; needs MegaLoc weights), ``sequence`` (the k nearest frames in capture order) or ``reference``
(the k nearest reference camera centres: an upper bound that a real collection does not have).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak(device: Any) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    clear = Path("/proc/self/clear_refs")
    if clear.exists():
        clear.write_text("5")
    return _status("VmRSS")


def _peak(device: Any, before: int) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _status("VmHWM") - before


def neighbor_lists(kind: str, k: int, names: list[str], ref_centers: np.ndarray | None, images: Any,
                   model: Any) -> list[list[int]]:
    S = len(names)
    k = min(k, S - 1)
    if kind == "sequence":
        return [sorted(range(S), key=lambda j: (abs(j - i), j))[1:k + 1] for i in range(S)]
    if kind == "reference":
        if ref_centers is None:
            raise SystemExit("--neighbors reference needs every frame in the reference model")
        d = np.linalg.norm(ref_centers[:, None] - ref_centers[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        return np.argsort(d, axis=1)[:, :k].tolist()
    from sparse_vggt.neighbors import retrieve_neighbors

    return retrieve_neighbors(images, k, retrieval=model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scene", default=str(ROOT / "tests" / "fixtures" / "fox"),
                    help="directory with images/ and a COLMAP reference model in sparse/0")
    ap.add_argument("--model", default="facebook/VGGT-1B", help="checkpoint source, or 'random' (mechanics only)")
    ap.add_argument("--preset", default=None, help="architecture preset (default vggt-1b; 'tiny' with random)")
    ap.add_argument("--frames", type=int, default=0, help="first N images (0: all)")
    ap.add_argument("--image-size", type=int, default=518)
    ap.add_argument("--ks", nargs="+", default=["4", "8", "16", "all"])
    ap.add_argument("--neighbors", choices=["megaloc", "sequence", "reference"], default="megaloc")
    ap.add_argument("--retrieval", default=None, help="MegaLoc checkpoint source (default gberton/MegaLoc)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from sparse_vggt.device import select_device, select_dtype
    from sparse_vggt.evaluate import camera_centers, evaluate_poses, load_colmap_poses
    from sparse_vggt.models.vggt import VGGT
    from sparse_vggt.preprocess import preprocess_images
    from sparse_vggt.reconstruct import decode_cameras
    from sparse_vggt.layers.sparse_attention import SparseContext

    if args.threads:
        torch.set_num_threads(args.threads)
    scene = Path(args.scene)
    paths = sorted(p for p in (scene / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if args.frames:
        paths = paths[:args.frames]
    if len(paths) < 3:
        raise SystemExit(f"{scene}/images has {len(paths)} images; need >= 3")
    names = [p.name for p in paths]
    ref_names, ref_ext, _ = load_colmap_poses(scene / "sparse" / "0")
    ref_index = {n: i for i, n in enumerate(ref_names)}
    ref_centers = (camera_centers(ref_ext[[ref_index[n] for n in names]]) if all(n in ref_index for n in names)
                   else None)
    images, to_image = preprocess_images(paths, args.image_size, "crop")
    device = select_device(args.device)
    dtype = select_dtype(device, args.dtype)
    random_weights = args.model == "random"
    if random_weights:
        torch.manual_seed(0)
        model = VGGT.from_preset(args.preset or "tiny")
    else:
        model = VGGT.from_pretrained(args.model, preset=args.preset)
    model.eval()
    retrieval = None
    if args.neighbors == "megaloc" and any(k != "all" for k in args.ks):
        from sparse_vggt.models.megaloc import MegaLoc

        retrieval = (MegaLoc.from_preset("tiny") if random_weights and hasattr(MegaLoc, "from_preset")
                     else MegaLoc.from_pretrained(args.retrieval or "gberton/MegaLoc")).to(device).eval()

    rows = []
    h, w = images.shape[-2:]
    for k in args.ks:
        dense = k == "all"
        # The sparse model shares the dense model's parameter tensors (built per k, after predict() has moved them).
        runner = model if dense else model.with_sparse_attention(SparseContext())
        if dense:
            kwargs: dict[str, Any] = {}
        else:
            kwargs = {"neighbors": neighbor_lists(args.neighbors, int(k), names, ref_centers, images.to(device),
                                                  retrieval)}
        before = _reset_peak(device)
        t0 = time.perf_counter()
        out = runner.predict(images, device=str(device), dtype=str(dtype).replace("torch.", ""), **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = _peak(device, before)
        extri, _ = decode_cameras(out["pose_enc"][0], (h, w), to_image)
        metrics = evaluate_poses(names, extri, ref_names, ref_ext)
        rows.append({"k": k, "auc30": metrics["auc30"], "rra_5": metrics["rra"].get("5"), "seconds": seconds,
                     "peak_bytes": peak, "ate_rel_extent": metrics["ate_rel_extent"]})
        del out, runner
    result = {"scene": str(scene), "frames": len(paths), "image_hw": [h, w], "model": args.model,
              "random_weights": random_weights, "neighbors": args.neighbors, "device": str(device),
              "dtype": str(dtype), "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    if random_weights:
        result["note"] = "RANDOM WEIGHTS: mechanics only, the AUC numbers mean nothing"
    if args.json:
        print(json.dumps(result, indent=1))
        return
    if random_weights:
        print(result["note"])
    print(f"{'k':>5} {'AUC@30':>8} {'seconds':>8} {'peak MB':>9}")
    for r in rows:
        print(f"{r['k']:>5} {r['auc30']:8.3f} {r['seconds']:8.2f} {r['peak_bytes'] / 1e6:9.0f}")


if __name__ == "__main__":
    main()
