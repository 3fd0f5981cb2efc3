"""One configuration object for the whole pipeline.

Every knob of every stage lives here, grouped by stage, with its default and a one-line reason. A config is
loaded from TOML (sections = stage names), overridden from the CLI with ``--set section.field=value``, and
written into ``run.json`` so a run directory always records how it was made.

Fields marked ``runtime=True`` in their metadata (device, worker counts, dispatch mode, ...) change how a
run executes but not what it computes; they are ignored when an existing run is reopened with a different
config, so moving a run from a laptop to the farm does not need ``--force``.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
import logging

from .models.inputs import MEGALOC_INPUT, VGGT_INPUT


log = logging.getLogger(__name__)

# old key -> new key: old configs and run.json files keep loading (with a warning)
RENAMED_SECTIONS = {"ingest": "scan"}
RENAMED = {"graph.k": "graph.retrieval_neighbors", "partition.k": "partition.attention_neighbors"}

# fields whose value must be one of a fixed set (devices, dtypes and registries are checked where they are resolved)
CHOICES: dict[str, tuple[Any, ...]] = {
    "graph.method": ("auto", "exact", "pca", "faiss"),
    "graph.verify_features": ("sift", "orb"),
    "reconstruct.preprocess_mode": ("crop", "pad"),
    "reconstruct.attention": ("sparse", "dense"),
    "reconstruct.weights_dtype": ("auto", "float32"),
    "reconstruct.depth_dtype": ("float16", "float32"),
    "export.images": ("link", "copy", "none"),
    "export.camera_model": ("PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV"),
    "export.shared_camera": ("image", "folder", "size"),
    "export.focal_prior": ("predicted", "exif"),
    "orchestration.dispatch": ("local", "pool"),
}


def _runtime(default: Any, doc: str = "") -> Any:
    return field(default=default, metadata={"runtime": True, "doc": doc})


@dataclass
class ScanConfig:
    """Photo discovery and validation (`sparse-vggt scan`)."""

    extensions: list[str] = field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".heic", ".heif", ".webp", ".tif", ".tiff"]
    )  # matched case-insensitively
    min_side: int = 64  # images whose shorter upright side is below this are skipped ("too small")
    chunk_size: int = 256  # kept images per descriptor batch/Zarr chunk; one describe unit per chunk
    follow_symlinks: bool = False  # false: folder links are not entered; file links leaving the folder are skipped
    # images with more pixels (width x height) are skipped as "too large"; default = Pillow's Image.MAX_IMAGE_PIXELS.
    # At most 2 x Pillow's limit (the largest image Pillow decodes at all), since every stage reads with Pillow
    max_image_pixels: int = 89_478_485
    decode_check: bool = True  # fully decode every image to reject truncated files (costs ~1 decode per image)
    progress_every: int = 256  # rows per resumable progress flush of the scan


@dataclass
class ModelConfig:
    """The model block both model stages share: which checkpoint, which architecture, where it runs.

    ``describe`` and ``reconstruct`` inherit it, so the same keys mean the same thing in both sections (each
    section sets its own defaults).
    """

    model: str = ""  # hub repo id, local dir/file, or "random" (tests, demo)
    preset: str = ""  # architecture preset of the model
    device: str = _runtime("auto", "auto | cuda[:i] | mps | cpu")
    allow_random_weights: bool = False  # must be true to run without a real checkpoint (a loud warning is logged)


@dataclass
class DescribeConfig(ModelConfig):
    """Global descriptors for retrieval (`sparse-vggt describe`)."""

    model: str = "gberton/MegaLoc"  # hub repo id, local dir/file, or "random" (tests, demo)
    image_size: int = MEGALOC_INPUT.size  # square resize side before the backbone (multiple of 14)
    batch_size: int = 16
    dtype: str = _runtime("auto", "auto | float32 | float16 | bfloat16")
    descriptors_file: str = ""  # bring-your-own descriptors: .npy (+ names) or .parquet keyed by image name
    preset: str = "megaloc"  # architecture preset: "megaloc" (ViT-B/14 + SALAD) or "tiny" for tests
    descriptor: str = "megaloc"  # retrieval descriptor (sparse_vggt.retrieval): megaloc | file (= descriptors_file)


@dataclass
class GraphConfig:
    """Covisibility graph from descriptors and priors (`sparse-vggt graph`)."""

    retrieval_neighbors: int = 10  # retrieval neighbours per image: its k nearest by descriptor cosine
    min_similarity: float = 0.0  # cosine similarity below which a retrieved pair is dropped
    mutual: bool = False  # keep only mutual kNN pairs (else union symmetrisation)
    method: str = "auto"  # auto | exact | pca | faiss: candidate search strategy
    pca_dim: int = 256  # reduced dimension for candidate search (pca)
    candidates: int = 64  # candidates per query kept from the reduced search, re-ranked exactly
    block_size: int = 4096  # query/database rows per block; bounds memory to block_size^2 floats
    sequence_neighbors: int = 0  # link each image to this many next images in capture-time/file order
    gps_radius_m: float = 0.0  # add pairs closer than this (0 = off)
    gps_max_distance_m: float = 0.0  # drop pairs farther apart than this even if they look alike (0 = off)
    verify: bool = False  # geometric verification of candidate pairs (SIFT + RANSAC fundamental matrix; needs
    # OpenCV: pip install "sparse-vggt[verify]")
    verify_features: str = "sift"  # sift | orb
    verify_max_side: int = 640  # images are downscaled to this longer side for verification
    verify_min_inliers: int = 20  # pairs with fewer RANSAC inliers are removed
    verify_workers: int = _runtime(0, "processes for verification; 0 = cpu count")
    gps_neighbors: int = 10  # at most this many nearest GPS neighbours within gps_radius_m per image
    pca_sample: int = 10000  # descriptors sampled to fit the PCA of the reduced candidate search
    recall_sample: int = 256  # queries checked against exact search to measure recall (0 = off)
    min_recall: float = 0.95  # recall@k below this is a warning (log, manifest, report)
    seed: int = 0  # PCA / recall sampling
    memory_mb: int = _runtime(2048, "descriptors are cached in RAM (fp16) if they fit in about this much")


@dataclass
class PartitionConfig:
    """Connected, overlapping, bounded clusters (`sparse-vggt partition`).

    max_cluster_frames=128: a conservative fixed default for a 16 GB Apple-Silicon worker. "auto" derives the
    largest cluster from ``reconstruct.memory_gb`` with the memory model (sparse_vggt.memory: aggregator
    weights in fp16 on MPS/CUDA, 21-32 MB per frame from 336x518 to 518x518 px; 16 GB MPS at 518x518: 281
    frames with 15 % headroom); an explicit number wins.
    """

    max_cluster_frames: int | str = 128  # core + overlap frames per cluster; never exceeded. "auto": the largest
    # cluster whose predicted forward peak (sparse_vggt.memory) fits reconstruct.memory_gb
    min_overlap_frames: int = 8  # shared frames between touching clusters
    # neighbours each frame attends to in sparse global attention (its strongest graph edges inside the cluster;
    # the clusters.parquet "neighbors" column)
    attention_neighbors: int = 10
    balance_tolerance: float = 0.15  # allowed core size imbalance (METIS ufactor-style)
    reconstruct_singletons: bool = False  # isolated images become 1-frame clusters (else reported, skipped)
    min_component_frames: int = 2  # components smaller than this are reported and not reconstructed
    seed: int = 0

    def problems(self) -> list[str]:
        """Why these settings cannot give bounded, overlapping clusters (empty: they can)."""
        out = []
        if self.min_overlap_frames < 1:
            out.append(f"partition.min_overlap_frames={self.min_overlap_frames} must be >= 1: clusters that "
                       "share no frame cannot be merged")
        if isinstance(self.max_cluster_frames, str):
            if self.max_cluster_frames != "auto":
                out.append(f"partition.max_cluster_frames={self.max_cluster_frames!r}: use a number or 'auto'")
        elif self.max_cluster_frames < 2 * self.min_overlap_frames:
            out.append(f"partition.max_cluster_frames={self.max_cluster_frames} < 2 * min_overlap_frames="
                       f"{self.min_overlap_frames}: a cluster could be all overlap. Raise max_cluster_frames or "
                       "lower min_overlap_frames (e.g. --set partition.min_overlap_frames="
                       f"{max(1, self.max_cluster_frames // 2)}).")
        if self.attention_neighbors < 1:
            out.append(f"partition.attention_neighbors={self.attention_neighbors} must be >= 1 (frames each "
                       "frame attends to inside a cluster)")
        if not (0.0 < self.balance_tolerance <= 1.0):
            out.append(f"partition.balance_tolerance={self.balance_tolerance} must be in (0, 1]")
        if self.min_component_frames < 1:
            out.append(f"partition.min_component_frames={self.min_component_frames} must be >= 1")
        return out


@dataclass
class ReconstructConfig(ModelConfig):
    """Per-cluster VGGT inference (`sparse-vggt reconstruct`)."""

    model: str = "facebook/VGGT-1B"  # hub repo id, local dir/file, or "random" (tests, demo)
    preset: str = "vggt-1b"  # architecture preset: "vggt-1b" or "tiny" (tests, demo)
    image_size: int = VGGT_INPUT.size  # width after resize (multiple of 14)
    preprocess_mode: str = "crop"  # crop | pad (as the reference load_and_preprocess_images)
    attention: str = "sparse"  # sparse | dense global attention
    special_tokens_global: bool = False  # every frame also attends to all frames' camera/register tokens
    # dtype and the attention kernel change the numbers a cluster produces (bf16 vs fp32, flex vs sdpa rounding),
    # so they are result-affecting: changing them on a finished reconstruct stage needs --force
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    head_chunk_frames: int = _runtime(8, "frames per chunk in the DPT heads (0: all at once)")
    attention_memory_mb: int = _runtime(1024, "memory budget for one chunk of gathered keys/values")
    # kernel of sparse global attention: auto (CUDA: a one-time timed probe of the registered kernels; else sdpa)
    # | sdpa | flex | any kernel registered in sparse_vggt.layers.kernels. Result-affecting: kernels differ in
    # rounding.
    attention_backend: str = "auto"
    depth_dtype: str = "float16"  # storage dtype of depth / depth_conf
    # memory of one reconstruct worker (its GPU, or RAM for CPU/MPS), in GB; sizes clusters
    # when partition.max_cluster_frames = "auto". 0: the memory of the machine running the partition stage.
    memory_gb: float = 0.0
    # aggregator weights: auto (compute dtype on CUDA/MPS, fp32 on CPU) | float32. Result-affecting, like dtype.
    weights_dtype: str = "auto"
    seed: int = 0  # seed for random-initialised weights


@dataclass
class MergeConfig:
    """Sim(3) alignment of clusters and fusion (`sparse-vggt merge`).

    Residual thresholds are relative to the depth of the point (|x_a - S x_b| / depth_a): VGGT depth errors grow
    with depth and every cluster has its own scale, so relative residuals are the scale-free choice.
    """

    grid_stride: int = 0  # pixel stride of the correspondence grid on shared frames; 0 = auto (~grid_points per frame)
    grid_points: int = 2048  # target correspondences per shared frame when grid_stride = 0
    max_pair_frames: int = 16  # shared frames used per cluster pair (evenly chosen; bounds hub pairs)
    min_confidence_quantile: float = 0.3  # drop pixels below this depth_conf quantile (per frame)
    ransac_iterations: int = 256  # upper bound: RANSAC stops once a 99.9%-sure all-inlier triple was drawn
    inlier_threshold: float = 0.15  # RANSAC/IRLS inlier residual, relative to the point's depth
    huber_delta: float = 0.05  # IRLS Huber scale, relative to depth
    irls_iterations: int = 10
    min_inlier_ratio: float = 0.3  # pairwise edges below this are rejected
    min_correspondences: int = 100  # pairwise edges with fewer valid correspondences are rejected
    max_rmse: float = 0.1  # relative inlier RMSE above which an edge is rejected
    # shared frames' cameras must agree with the point alignment (depth and pose come from different heads):
    max_camera_rotation_deg: float = 5.0  # median rotation disagreement above which an edge is rejected
    max_camera_center_rel: float = 0.1  # median centre disagreement / cluster median depth above which it is rejected
    max_nonfinite_fraction: float = 0.5  # clusters with more non-finite depth pixels are excluded
    optimize: bool = True  # Sim(3) pose-graph optimisation after the spanning-tree initialisation
    max_iterations: int = 50  # Levenberg-Marquardt iterations of the pose graph
    fuse: bool = True  # fuse a point cloud (else poses only)
    fuse_confidence_quantile: float = 0.5  # points below this per-frame confidence quantile are not fused
    fuse_stride: int = 4  # pixel stride when fusing points
    voxel_size: float = 0.0  # 0 = automatic (scene extent / 1000)
    depth_consistency: bool = True  # drop overlap-frame pixels whose depths disagree across clusters
    depth_consistency_tolerance: float = 0.05  # relative depth disagreement tolerated (vs the median over clusters)
    colors: bool = True  # colour points from the photos (sparse_vggt.scan.load_image)
    seed: int = 0  # RANSAC sampling


@dataclass
class ExportConfig:
    """COLMAP, PLY, GLB and report (`sparse-vggt export`)."""

    colmap_text: bool = False  # also write cameras.txt/images.txt/points3D.txt
    ply: bool = True
    glb: bool = True
    max_points: int = 2_000_000  # cap on exported points (uniform subsample)
    max_track_points: int = 200_000  # cap on COLMAP points3D with tracks
    frustum_scale: float = 0.0  # 0 = automatic (2% of scene extent)
    # drop-in COLMAP workspace: export/images + export/sparse/<k> + pairs.txt
    images: str = "link"  # link | copy | none: how export/images/ is made (EXIF-rotated/HEIC: upright copies)
    camera_model: str = "PINHOLE"  # PINHOLE | SIMPLE_PINHOLE | SIMPLE_RADIAL | RADIAL | OPENCV
    shared_camera: str = "image"  # image (one camera per image) | folder (per folder and size) | size (per size)
    focal_prior: str = "predicted"  # predicted | exif: start from the photo's EXIF focal where it has one
    bundle_adjust: bool = False  # pycolmap bundle adjustment of poses and points after export
    ba_refine_focal: bool = True  # let bundle adjustment refine the focal length too
    ba_refine_distortion: bool = False  # and the distortion of SIMPLE_RADIAL / RADIAL / OPENCV cameras
    ba_max_iterations: int = 100  # Ceres iterations of the bundle adjustment
    pairs: bool = True  # export/pairs.txt: the covisibility graph for hloc / COLMAP pair matching
    plots: bool = True  # export/plots/*.png and the plots in report.md (matplotlib)
    rerun: bool = False  # export/recording.rrd for the Rerun viewer (pip install "sparse-vggt[rerun]")


@dataclass
class OrchestrationConfig:
    """How the stages are run (never affects results): which executor, where its units go, retries, OOM splits."""

    executor: str = _runtime("prefect", "prefect (flows/, the UI and the farm) | local (this process, no Prefect)")
    dispatch: str = _runtime("local", "prefect executor: local (tasks on this machine) | pool (flow runs on "
                                      "the work pool)")
    work_pool: str = _runtime("mac-mini", "Prefect work pool for pool dispatch")
    cluster_deployment: str = _runtime("reconstruct-cluster/mac-mini", "deployment run per cluster in pool mode")
    retries: int = _runtime(2, "retries for transient task errors")
    retry_delay_s: float = _runtime(10.0, "first retry delay; doubles each retry")
    oom_split: bool = _runtime(True, "split a cluster in two and retry on out-of-memory")
    max_oom_splits: int = _runtime(4, "how many times a cluster may be halved")
    accelerator_tag: str = _runtime("accelerator", "tag concurrency-limited to one model per accelerator")
    poll_interval_s: float = _runtime(1.0, "pool mode: seconds between state polls of a dispatched cluster run")
    # local dispatch runs each cluster's model in a child process (one persistent worker that keeps the model
    # loaded), so an out-of-memory SIGKILL costs that cluster (split and retried), not the run
    cluster_process: bool = _runtime(True, "local dispatch: run cluster models in a child worker process")
    # pool mode runs describe units on the workers too, keeps each model resident per worker, and bounds the flow
    # runs in flight
    describe_deployment: str = _runtime("describe-chunks/mac-mini", "pool mode: deployment run per describe unit")
    describe_chunks_per_run: int = _runtime(4, "pool mode: ingest chunks per describe flow run")
    clusters_per_run: int = _runtime(0, "pool mode: clusters per flow run (amortises the idle gap between a "
                                        "worker's flow runs; the model stays resident per worker either way); "
                                        "0 = auto: ceil(pending / (4 x in-flight limit)), between 1 and 16")
    max_in_flight: int = _runtime(0, "pool mode: most flow runs in flight; 0 = 2 per online worker (min 1)")
    run_timeout_s: float = _runtime(3600.0, "pool mode: a flow run still running this long after it started is "
                                            "cancelled and retried")
    start_timeout_s: float = _runtime(1800.0, "pool mode: a flow run no worker started this long after "
                                              "submission is cancelled and retried")
    resident_idle_s: float = _runtime(120.0, "pool mode: a worker's resident model process exits after this "
                                             "many idle seconds")
    unit_timeout_s: float = _runtime(0.0, "a unit (cluster, describe chunks) running longer than this in its model "
                                           "process is taken as hung: the process is killed and restarted and the "
                                           "unit retried; 0 = derived: 600 s + unit_timeout_per_frame_s x frames")
    unit_timeout_per_frame_s: float = _runtime(30.0, "per-frame part of the derived unit time limit (generous: a "
                                                     "1B-model cluster frame takes seconds on a Mac)")


@dataclass
class PipelineConfig:
    scan: ScanConfig = field(default_factory=ScanConfig)
    describe: DescribeConfig = field(default_factory=DescribeConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)

    # ---- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], validate: bool = True) -> "PipelineConfig":
        """A config from nested tables (a TOML file, ``run.json``, a flow parameter); checked unless told not."""
        cfg = cls()
        for section, values in (data or {}).items():
            section = _section_name(section)
            if section not in _sections():
                raise ConfigError(f"unknown config section [{section}]; known: {', '.join(_sections())}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section [{section}] must be a table, got {type(values).__name__}")
            for name, value in values.items():
                cfg.set(f"{section}.{name}", value)
        return cfg.validate() if validate else cfg

    @classmethod
    def from_toml(cls, path: str | Path, validate: bool = True) -> "PipelineConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        return cls.from_dict(data, validate=validate)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # ---- overrides ---------------------------------------------------------------------------------
    def set(self, dotted: str, value: Any) -> None:
        """Set ``section.field`` to ``value``, coercing strings from the CLI to the field's type."""
        if "." not in dotted:
            raise ConfigError(f"override {dotted!r} must look like section.field (e.g. graph.retrieval_neighbors)")
        if dotted.split(".", 1)[0] in RENAMED_SECTIONS:
            old, rest = dotted.split(".", 1)
            dotted = f"{_section_name(old)}.{rest}"
        if dotted in RENAMED:
            new = RENAMED[dotted]
            log.warning("config key %s is now called %s; please rename it in your config", dotted, new)
            dotted = new
        section, name = dotted.split(".", 1)
        if section not in _sections():
            raise ConfigError(f"unknown config section {section!r}; known: {', '.join(_sections())}")
        sub = getattr(self, section)
        types = _field_types(type(sub))
        if name not in types:
            raise ConfigError(f"unknown field {section}.{name}; known: {', '.join(sorted(types))}")
        setattr(sub, name, _coerce(value, types[name], dotted))

    def apply_overrides(self, overrides: list[str] | None) -> "PipelineConfig":
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"--set {item!r} must look like section.field=value")
            key, raw = item.split("=", 1)
            self.set(key.strip(), raw.strip())
        return self

    def validate(self) -> "PipelineConfig":
        """Reject values no stage can use, all at once, before any work starts; returns self.

        Called whenever a config is loaded (file, ``--set``, flow parameter, run.json), so stages and flows do
        not re-check. Values that depend on the machine (``max_cluster_frames="auto"``, device availability,
        registered kernels, descriptors and executors) are checked where they are resolved.
        """
        problems = self.problems()
        if problems:
            raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
        return self

    def problems(self) -> list[str]:
        """Every reason `validate` would refuse this config (empty: none)."""
        problems = [f"{key}={getattr(getattr(self, key.split('.')[0]), key.split('.')[1])!r}: use one of "
                    f"{', '.join(repr(c) for c in choices)}"
                    for key, choices in CHOICES.items()
                    if getattr(getattr(self, key.split(".")[0]), key.split(".")[1]) not in choices]
        for section in ("describe", "reconstruct"):
            sub = getattr(self, section)
            own_file = section == "describe" and bool(sub.descriptors_file)
            if sub.model == "random" and not sub.allow_random_weights and not own_file:
                problems.append(f"{section}.model='random' needs {section}.allow_random_weights=true (tests, "
                                f"demos); otherwise point {section}.model at a checkpoint")
            if sub.image_size <= 0 or sub.image_size % 14:
                problems.append(f"{section}.image_size={sub.image_size} must be a positive multiple of 14 "
                                "(the ViT patch size)")
        problems += self.partition.problems()
        orch = self.orchestration
        if orch.dispatch == "pool" and "/" not in orch.cluster_deployment:
            problems.append(f"orchestration.cluster_deployment={orch.cluster_deployment!r} must be "
                            "'FLOW/DEPLOYMENT' (see `sparse-vggt deploy`)")
        if orch.retries < 0 or orch.retry_delay_s < 0 or orch.max_oom_splits < 0:
            problems.append("orchestration.retries, retry_delay_s and max_oom_splits must be >= 0")
        if orch.poll_interval_s <= 0:
            problems.append("orchestration.poll_interval_s must be > 0")
        if self.graph.retrieval_neighbors < 1:
            problems.append(f"graph.retrieval_neighbors={self.graph.retrieval_neighbors} must be >= 1")
        return problems

    def result_affecting(self) -> dict[str, dict[str, Any]]:
        """The config without runtime-only fields: what must match to reuse a run directory."""
        out: dict[str, dict[str, Any]] = {}
        for section in _sections():
            sub = getattr(self, section)
            out[section] = {
                f.name: getattr(sub, f.name)
                for f in dataclasses.fields(sub)
                if not f.metadata.get("runtime", False)
            }
        return out

    def diff(self, other: "PipelineConfig") -> list[str]:
        """Result-affecting fields that differ, as 'section.field: old -> new' lines."""
        a, b = self.result_affecting(), other.result_affecting()
        lines = []
        for section in a:
            for name in a[section]:
                if a[section][name] != b[section][name]:
                    lines.append(f"{section}.{name}: {a[section][name]!r} -> {b[section][name]!r}")
        return lines


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which field and why."""


def _section_name(section: str) -> str:
    """The current name of a config section (old names load with a warning)."""
    if section in RENAMED_SECTIONS:
        log.warning("config section [%s] is now called [%s]; please rename it in your config", section,
                    RENAMED_SECTIONS[section])
        return RENAMED_SECTIONS[section]
    return section


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(PipelineConfig)]


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, name: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):  # e.g. int | str: first fit
        errors = []
        for member in typing.get_args(typ):
            try:
                return _coerce(value, member, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    try:
        if origin is list:
            (item_type,) = typing.get_args(typ) or (str,)
            if isinstance(value, str):
                value = _parse_literal(value)
                if isinstance(value, str):
                    value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError("expected a list")
            return [_coerce(v, item_type, name) for v in value]
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on"}:
                return True
            if isinstance(value, str) and value.lower() in {"false", "0", "no", "off"}:
                return False
            raise TypeError("expected true/false")
        if typ is int:
            if isinstance(value, bool):
                raise TypeError("expected an integer")
            if isinstance(value, float) and not value.is_integer():
                raise TypeError("expected an integer")
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise TypeError("expected a number")
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot use {value!r} ({exc})") from exc
    return value


def _parse_literal(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults, then the TOML file (if any), then ``--set`` overrides, in that order."""
    cfg = PipelineConfig.from_toml(path, validate=False) if path else PipelineConfig()
    return cfg.apply_overrides(overrides).validate()
