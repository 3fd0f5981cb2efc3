"""docs/EXTENDING.md, executed: each extension point as one new file plus one registration line.

Every test writes the new file exactly as the guide shows it (into a temporary folder on ``sys.path``, as a
plugin package would ship it), registers it with the one line the guide gives for code outside the library, and
checks that the pipeline really uses it. Inside the library the registration line is the module's entry in the
registry dict instead (``_BUILTIN`` / ``FORMATS`` / ``EXECUTORS``); both paths end in the same lookup.
"""

from __future__ import annotations

import importlib
import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_vggt.config import PipelineConfig
from sparse_vggt.demo import DEMO_PHOTOS, demo_config
from sparse_vggt.store import RunStore


def _plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str):
    folder = tmp_path / "plugins"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(folder))
    return importlib.import_module(name)


def _small_run(tmp_path: Path, photos: int = 4) -> tuple[Path, Path, PipelineConfig]:
    src = tmp_path / "photos"
    src.mkdir()
    for p in sorted(DEMO_PHOTOS.glob("*.jpg"))[:photos]:
        shutil.copy(p, src / p.name)
    cfg = demo_config()
    cfg.orchestration.executor = "local"
    cfg.orchestration.cluster_process = False
    return src, tmp_path / "run", cfg


RETRIEVAL_PLUGIN = '''
    """Colour-histogram retrieval descriptor (a stand-in for a real retrieval model)."""
    import numpy as np

    from sparse_vggt.scan import load_image
    from sparse_vggt.retrieval import DescribeInputs, Retrieval

    BINS = 8


    class ColourHistogram:
        dim, model_id, weights = 3 * BINS, "colour-histogram", {"weights": "none"}

        def __init__(self, inputs: DescribeInputs):
            self.root = inputs.photos_root()
            self.paths = inputs.table.column("path").to_pylist()

        def __call__(self, rows):
            out = []
            for r in rows:
                img = np.asarray(load_image(self.root / self.paths[int(r)]).convert("RGB"))
                hist = [np.histogram(img[..., c], bins=BINS, range=(0, 256))[0] for c in range(3)]
                out.append(np.concatenate(hist) / img[..., 0].size)
            return np.stack(out).astype(np.float32)

        def manifest(self, images, seconds):
            return {}


    ENTRY = Retrieval("colour-histogram", ColourHistogram,
                      plan=lambda cfg: (3 * BINS, "colour-histogram", {"weights": "none"}))
'''


def test_a_retrieval_descriptor_is_one_file_and_one_register_line(tmp_path, monkeypatch):
    from sparse_vggt import describe, graph, retrieval
    from sparse_vggt.scan import load_image, run as scan

    plugin = _plugin(tmp_path, monkeypatch, "colour_histogram", RETRIEVAL_PLUGIN)
    retrieval.register(plugin.ENTRY)  # the registration line
    photos, run, cfg = _small_run(tmp_path)
    cfg.describe.descriptor = "colour-histogram"
    try:
        scan(run, cfg, photos=photos)
        manifest = describe.run(run, cfg)
        graph_manifest = graph.run(run, cfg)
    finally:
        retrieval._LOADED.pop("colour-histogram", None)
    store = RunStore.open(run)
    arr = np.asarray(store.zarr["descriptors"][:], np.float32)
    paths = store.read_table("images").column("path").to_pylist()
    first = np.asarray(load_image(photos / paths[0]).convert("RGB"))
    expect = np.concatenate([np.histogram(first[..., c], bins=8, range=(0, 256))[0] for c in range(3)])
    assert manifest["model"] == "colour-histogram" and arr.shape == (4, 24)
    np.testing.assert_allclose(arr[0], expect / first[..., 0].size, atol=1e-3)  # fp16 storage
    assert graph_manifest["edges"] > 0


KERNEL_PLUGIN = '''
    """Sparse attention as one dense SDPA call with a frame mask: slow, but obviously right."""
    import torch
    import torch.nn.functional as F

    from sparse_vggt.layers.kernels import Kernel


    def attend(q, k, v, sets, P, num_special, scale, ctx, query_frames=None):
        frame = torch.arange(sets.num_frames * P, device=q.device) // P
        mask = sets.membership(q.device)[frame[:, None], frame[None, :]]
        if ctx.special_tokens_global:
            mask = mask | (torch.arange(sets.num_frames * P, device=q.device) % P < num_special)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


    KERNEL = Kernel("masked-dense", attend, all_queries=True)
'''


def test_an_attention_kernel_is_one_file_and_one_register_line(tmp_path, monkeypatch):
    from sparse_vggt.layers import kernels
    from sparse_vggt.layers.sparse_attention import SparseContext
    from sparse_vggt.models import VGGT

    plugin = _plugin(tmp_path, monkeypatch, "masked_dense", KERNEL_PLUGIN)
    kernels.register_kernel(plugin.KERNEL)  # the registration line
    try:
        torch.manual_seed(0)
        reference = VGGT.from_preset("tiny", sparse=SparseContext(backend="sdpa", special_tokens_global=True)).eval()
        model = reference.with_sparse_attention(SparseContext(backend="masked-dense", special_tokens_global=True))
        images = torch.rand(5, 3, 42, 56, generator=torch.Generator().manual_seed(1))
        neighbors = [[1], [0, 2], [1, 3], [2, 4], [3]]
        with torch.no_grad():
            want, got = reference(images, neighbors=neighbors), model(images, neighbors=neighbors)
        for key in ("pose_enc", "depth", "world_points"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
        assert "masked-dense" in kernels.backend_names()
    finally:
        kernels._LOADED.pop("masked-dense", None)


FORMAT_PLUGIN = '''
    """cameras.json: every registered image's world-to-camera pose and intrinsics, per merge component."""
    import json


    def write(ctx):
        cams = {ctx.run.names[int(i)]: {"extrinsics": E.tolist(), "intrinsics": K.tolist()}
                for i, E, K in zip(ctx.image_ids, ctx.extrinsics, ctx.intrinsics)}
        path = ctx.run.out / f"cameras{ctx.suffix}.json"
        path.write_text(json.dumps(cams, indent=1))
        return {"cameras_json": path.name}
'''


def test_an_export_format_is_one_file_and_one_registry_line(tmp_path, monkeypatch):
    from sparse_vggt import export, merge
    from sparse_vggt import synthetic as syn
    from sparse_vggt.export import formats

    plugin = _plugin(tmp_path, monkeypatch, "cameras_json", FORMAT_PLUGIN)
    monkeypatch.setitem(formats.FORMATS, "cameras_json",
                        formats.ExportFormat(plugin.write, per_component=True))  # the registration line
    n = 24
    scene = syn.make_ring_scene(n, seed=3)
    graph = (np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(n, np.int64))
    cfg = PipelineConfig()
    cfg.merge.colors = False
    cfg.export.plots = False
    run = syn.write_run(tmp_path / "run", scene, graph, syn.ring_clusters(n, 2, overlap=6), config=cfg)
    merge.run(run.root, cfg)
    manifest = export.run(run.root, cfg)
    cams = json.loads((run.root / "export" / "cameras.json").read_text())
    assert manifest["components"][0]["cameras_json"] == "cameras.json"
    assert len(cams) == manifest["components"][0]["images"] > 0
    assert all(np.asarray(c["intrinsics"]).shape == (3, 3) for c in cams.values())


EXECUTOR_PLUGIN = '''
    """Units on a thread pool, steps inline: the shape of a Ray or Dask executor (their futures instead of threads)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from sparse_vggt.local_executor import LocalExecutor
    from sparse_vggt.lock import writer_lock
    from sparse_vggt.scheduler import run_pipeline, validate_parameters


    class ThreadExecutor:
        def __init__(self, cfg, workers=2):
            self.local = LocalExecutor(cfg)  # how to run one step or one unit in this process
            self.work = self.local.work
            self.workers = workers
            self.units = []

        def run_name(self):
            return "threads"

        def call(self, step, run_dir, config, *args):
            return self.local.call(step, run_dir, config, *args)

        def map(self, kind, run_dir, config, ids):
            def one(uid):
                self.units.append((kind, uid))
                return next(self.local.map(kind, run_dir, config, [uid]))

            with ThreadPoolExecutor(self.workers) as pool:
                for done in as_completed([pool.submit(one, uid) for uid in ids]):
                    yield done.result()

        def notify(self, what, run_dir, **info):
            pass


    def run_threads(photos, run_dir, cfg, force=False):
        photos, run_dir = str(photos), str(run_dir)
        with writer_lock(run_dir, f"run {photos} {run_dir}"):
            cfg, _ = validate_parameters(photos, run_dir, cfg.to_dict(), force)
            return run_pipeline(photos, run_dir, cfg, ThreadExecutor(cfg), force)
'''


def test_an_executor_is_one_file_and_one_registry_line(tmp_path, monkeypatch):
    from sparse_vggt import scheduler

    _plugin(tmp_path, monkeypatch, "thread_executor", EXECUTOR_PLUGIN)
    monkeypatch.setitem(scheduler.EXECUTORS, "threads", "thread_executor:run_threads")  # the registration line
    photos, run, cfg = _small_run(tmp_path)
    cfg.orchestration.executor = "threads"
    report = scheduler.load_runner(cfg.orchestration.executor)(photos, run, cfg)
    assert report["flow_run"] == "threads"
    assert report["stages_executed"]["reconstruct-cluster"] >= 1
    store = RunStore.open(run)
    assert all(store.meta()["stages"][s].get("finished") for s in ("scan", "reconstruct", "merge", "export"))
    # the same run with the local executor computes the same cluster poses (threads change the order only)
    cfg.orchestration.executor = "local"
    scheduler.load_runner("local")(photos, tmp_path / "run_local", cfg)
    local = RunStore.open(tmp_path / "run_local")
    for cid in store.zarr["clusters"].group_keys():
        np.testing.assert_array_equal(store.zarr["clusters"][cid]["extrinsics"][:],
                                      local.zarr["clusters"][cid]["extrinsics"][:])


def test_the_guide_shows_exactly_the_files_these_tests_run():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "EXTENDING.md").read_text()
    blocks = {b.split("\n", 1)[0][2:].strip(): b.split("\n", 1)[1]
              for b in guide.split("```python\n")[1:] for b in [b.split("```", 1)[0]]}
    for name, source in (("colour_histogram.py", RETRIEVAL_PLUGIN), ("masked_dense.py", KERNEL_PLUGIN),
                         ("cameras_json.py", FORMAT_PLUGIN), ("thread_executor.py", EXECUTOR_PLUGIN)):
        assert blocks[name].strip() == textwrap.dedent(source).strip(), f"docs/EXTENDING.md {name} differs"
