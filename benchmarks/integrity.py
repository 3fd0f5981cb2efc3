"""Cost of the run directory's safety: unit verification and the writer-lock heartbeat.

* ``verify``: one synthetic cluster unit laid out like the reconstruct stage writes it (extrinsics, intrinsics,
  image_ids, depth_to_image, depth and depth_conf float16 at model resolution, one Zarr chunk per frame), filled
  with random values (incompressible: an upper bound on stored bytes). Timed: writing the marker (fsync of every
  file + manifest with CRC-32), the quick check (listing + stats), the full check (CRC-32 of every stored byte,
  page cache cold only if the OS dropped it) and, for scale, decoding every array as merge does.
* ``lock``: acquire + release of the writer lock (flock + owner record + heartbeat thread start/stop), and one
  heartbeat (owner record rewritten: temp file, fsync, rename, directory fsync). The heartbeat runs every
  ``SPARSE_VGGT_LOCK_HEARTBEAT_S`` (default 10 s) in a daemon thread, so its share of a run is
  heartbeat seconds / interval.

    python benchmarks/integrity.py                    # table
    python benchmarks/integrity.py --frames 128 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import peak_rss_bytes  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _time(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_verify(root: Path, frames: int, h: int, w: int, repeat: int) -> list[dict]:
    from sparse_vggt import store as store_mod
    from sparse_vggt.config import PipelineConfig
    from sparse_vggt.store import RunStore

    store = RunStore.create_or_open(root / "run", PipelineConfig())
    rng = np.random.default_rng(0)
    grp = store.group("clusters/0")
    n = frames
    store.write_array(grp, "extrinsics", rng.normal(size=(n, 3, 4)).astype(np.float32), chunks=(n, 3, 4))
    store.write_array(grp, "intrinsics", rng.normal(size=(n, 3, 3)).astype(np.float32), chunks=(n, 3, 3))
    store.write_array(grp, "image_ids", np.arange(n, dtype=np.int64), chunks=(n,))
    store.write_array(grp, "depth_to_image", rng.normal(size=(n, 2, 3)).astype(np.float32), chunks=(n, 2, 3))
    store.write_array(grp, "depth", rng.normal(size=(n, h, w)).astype(np.float16), chunks=(1, h, w))
    store.write_array(grp, "depth_conf", rng.normal(size=(n, h, w)).astype(np.float16), chunks=(1, h, w))
    stored = sum(p.stat().st_size for p in (store.zarr_path / "clusters/0").rglob("*") if p.is_file())
    mark = _time(lambda: store.mark_unit_complete("clusters/0", frames=n))
    quick = _time(lambda: store.verify_unit("clusters/0"), repeat)

    def full() -> None:
        store_mod._FULLY_VERIFIED.clear()
        assert store.verify_unit("clusters/0", full=True)

    full_s = _time(full, repeat)

    def decode() -> None:
        g = RunStore(store.root).group("clusters/0", create=False)
        for name in ("extrinsics", "intrinsics", "image_ids", "depth_to_image", "depth", "depth_conf"):
            np.asarray(g[name][...])

    decode_s = _time(decode, repeat)
    common = {"frames": n, "height": h, "width": w, "stored_bytes": stored, "peak_bytes": peak_rss_bytes()}
    return [{"bench": "verify", "variant": v, "seconds": round(s, 5), **common}
            for v, s in (("mark_complete", mark), ("quick_check", quick), ("full_check", full_s),
                         ("decode_all_arrays", decode_s))]


def bench_lock(root: Path, repeat: int) -> list[dict]:
    from sparse_vggt.lock import RunLock, check_filesystem

    run = root / "lockrun"
    fs = _time(lambda: check_filesystem(run))

    def cycle() -> None:
        RunLock(run, "bench", heartbeat_s=3600).acquire().release()

    acquire = _time(cycle, repeat)
    held = RunLock(run, "bench", heartbeat_s=3600).acquire()
    beats = 200
    t0 = time.perf_counter()
    for _ in range(beats):
        held.heartbeat()
    beat = (time.perf_counter() - t0) / beats
    held.release()
    from sparse_vggt.lock import HEARTBEAT_S

    return [
        {"bench": "lock", "variant": "filesystem_check", "seconds": round(fs, 5), "peak_bytes": peak_rss_bytes()},
        {"bench": "lock", "variant": "acquire_release", "seconds": round(acquire, 5), "peak_bytes": peak_rss_bytes()},
        {"bench": "lock", "variant": "heartbeat", "seconds": round(beat, 6), "interval_s": HEARTBEAT_S,
         "share_of_run": round(beat / HEARTBEAT_S, 7), "peak_bytes": peak_rss_bytes()},
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--height", type=int, default=392)
    ap.add_argument("--width", type=int, default=518)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir; point it at a share)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in args.frames:
            rows += bench_verify(Path(tmp) / f"v{n}", n, args.height, args.width, args.repeat)
        rows += bench_lock(Path(tmp), args.repeat)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'bench':8} {'variant':18} {'frames':>6} {'stored MB':>9} {'seconds':>9}  note")
    for r in rows:
        mb = f"{r['stored_bytes'] / 1e6:9.1f}" if "stored_bytes" in r else " " * 9
        note = f"{r['share_of_run'] * 100:.4f}% of a run at one beat per {r['interval_s']:g} s" \
            if "share_of_run" in r else ""
        print(f"{r['bench']:8} {r['variant']:18} {r.get('frames', ''):>6} {mb} {r['seconds']:9.4f}  {note}")


if __name__ == "__main__":
    main()
