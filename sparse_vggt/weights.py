"""Checkpoint resolution and strict loading, shared by VGGT and MegaLoc.

``resolve_checkpoint`` turns a local file, a local directory or a Hugging Face repo id into a local file
(downloading only in that last case, never at import or model construction). ``load_state_dict_file`` reads
safetensors or a ``torch.load(weights_only=True)`` pickle. ``load_checkpoint_into`` checks names and shapes
first and raises `CheckpointMismatchError` naming every missing/unexpected key and shape mismatch.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import torch
from torch import nn

from .provenance import (  # noqa: F401 - re-exported: the provenance helpers used to live here
    DEFAULT_FILENAMES,
    STAGE_FILENAMES,
    _cached_file,
    _looks_like_repo_id,
    describe_weights,
    provenance,
    run_weights,
    weights_markdown,
)

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "module")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's tensors do not match the model's parameters (names or shapes)."""

    def __init__(self, missing: Sequence[str], unexpected: Sequence[str],
                 shapes: Sequence[tuple[str, tuple, tuple]], source: str = "checkpoint"):
        self.missing, self.unexpected, self.shapes = list(missing), list(unexpected), list(shapes)
        parts = [f"{source} does not match the model:"]

        def listing(keys: Sequence[str], limit: int = 20) -> str:
            more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        if self.missing:
            parts.append(f"  missing keys ({len(self.missing)}): {listing(self.missing)}")
        if self.unexpected:
            parts.append(f"  unexpected keys ({len(self.unexpected)}): {listing(self.unexpected)}")
        if self.shapes:
            shown = [f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.shapes]
            parts.append(f"  shape mismatches ({len(shown)}): {listing(shown)}")
        parts.append("  Check that the model configuration (preset / config arguments) matches the checkpoint.")
        super().__init__("\n".join(parts))


class WeightsUnavailableError(FileNotFoundError):
    """A checkpoint cannot be found locally and cannot be downloaded; the message says what to run instead."""


def random_weights_flags(stage: str) -> str:
    """The exact CLI flags that run ``stage`` (describe / reconstruct) with random weights."""
    return f"--set {stage}.model=random --set {stage}.allow_random_weights=true"


def _offline_reason() -> str | None:
    """Why the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE, no route), or None when it can.

    Probed with one short TCP connection so an offline machine fails in seconds instead of waiting for
    huggingface_hub's retries (about 50 s per file).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    return None if _hub_reachable() else "this machine cannot reach the Hugging Face Hub (offline?)"


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def unavailable_message(name: str, filenames: Sequence[str], reason: str, stage: str | None = None) -> str:
    """One short paragraph: what is missing, why, and the three ways forward (download, local path, random)."""
    stages = [stage] if stage else ["reconstruct", "describe"]
    key = f"{stages[0]}.model"
    random_cmd = " ".join(random_weights_flags(s) for s in stages)
    return (f"the checkpoint of the Hugging Face repo {name!r} ({' or '.join(filenames)}) is not in the local "
            f"cache and {reason}. "
            f"Either run `sparse-vggt weights fetch` where there is network access (pinned revision, sha256 "
            f"checked; `--dir DIR` for a shared folder; or `hf download {name} {filenames[-1]}`) and copy the "
            f"cache (~/.cache/huggingface) here, or pass a local file or directory with --set "
            f"{key}=/path/to/{filenames[-1]}, or run with RANDOM weights (meaningless geometry, for trying the "
            f"pipeline): {random_cmd}")


def resolve_checkpoint(name_or_path: str | Path, filenames: Sequence[str] = DEFAULT_FILENAMES,
                       revision: str | None = None, stage: str | None = None) -> Path:
    """Local file -> itself; directory -> the first of ``filenames`` in it; ``owner/name`` -> the Hugging Face
    cache, else a hub download of the first of ``filenames`` the repo has. Raises FileNotFoundError with what was
    tried; `WeightsUnavailableError` (short, with the commands to run) when offline. ``stage`` only words the
    message."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in filenames:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no checkpoint in directory {path}: looked for {', '.join(filenames)}")
    name = str(name_or_path)
    if not _looks_like_repo_id(name):
        raise FileNotFoundError(f"checkpoint {name!r} is neither an existing file, a directory, nor a Hugging Face "
                                "repo id like 'facebook/VGGT-1B'")
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    from .provision import pinned_revision

    pinned = revision is None and pinned_revision(name) is not None
    revision = revision or pinned_revision(name)  # what `sparse-vggt weights fetch` put in the cache
    cached = _cached_file(name, filenames, revision)
    if cached is None and pinned:  # a cache made by `hf download` (refs/main): used, its commit is recorded
        cached = _cached_file(name, filenames, None)
        if cached is not None:
            log.warning("%s: using the cached snapshot %s, not the pinned revision %s (run `sparse-vggt weights "
                        "fetch` to pin it)", name, cached.parent.name, revision)
    if cached is not None:
        return cached
    reason = _offline_reason()
    if reason:
        raise WeightsUnavailableError(unavailable_message(name, filenames, reason, stage))
    errors = []
    for filename in filenames:
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id=name, filename=filename, revision=revision))
        except LocalEntryNotFoundError as exc:  # (a subclass of EntryNotFoundError) the network went away
            raise WeightsUnavailableError(unavailable_message(
                name, filenames, "the download failed (offline?)", stage)) from exc
        except EntryNotFoundError as exc:
            errors.append(f"{filename}: not in the repo ({type(exc).__name__})")
        except Exception as exc:  # network, auth, missing repo: no point trying other file names
            raise FileNotFoundError(
                f"could not fetch {filename} from the Hugging Face repo {name!r}: {exc}. Without network access, "
                "download the file elsewhere and pass its local path or directory.") from exc
    raise FileNotFoundError(f"Hugging Face repo {name!r} has none of {', '.join(filenames)} ({'; '.join(errors)})")


def load_state_dict_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch pickle loaded with ``weights_only=True``
    (unwrapping a ``{"state_dict": ...}`` / ``{"model": ...}`` container)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except RuntimeError:  # old (non-zip) serialisation cannot be memory-mapped
        state = torch.load(path, map_location=map_location, weights_only=True)
    for key in _WRAPPER_KEYS:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise `CheckpointMismatchError` unless ``state`` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(missing, unexpected, shapes, source)


def load_checkpoint_into(model: nn.Module, checkpoint: str | Path | Mapping[str, torch.Tensor],
                         map_location: str | torch.device = "cpu") -> nn.Module:
    """Strictly load a checkpoint (path or state dict) into ``model``.

    A model built on the meta device receives the checkpoint tensors themselves (``assign=True``: no second
    copy); otherwise values are copied into the existing parameters (keeping their dtype/device).
    """
    source = "checkpoint" if isinstance(checkpoint, Mapping) else f"checkpoint {checkpoint}"
    state = checkpoint if isinstance(checkpoint, Mapping) else load_state_dict_file(checkpoint, map_location)
    check_state_dict(model, state, source)
    on_meta = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(state, strict=True, assign=on_meta)
    if on_meta:
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"tensors left uninitialised after loading: {left[:10]}")
    return model




def check_weights_available(config: Any, stages: Sequence[str] = ("describe", "reconstruct")) -> None:
    """Before a long run: every configured checkpoint of ``stages`` is a local file, a cached hub file, or
    downloadable now. Raises one `WeightsUnavailableError` naming every unavailable checkpoint (offline) and the
    flags for each way forward, or FileNotFoundError for a bad path; ``model = "random"`` and retrieval
    descriptors without a checkpoint (bring-your-own descriptors) need none."""
    from .retrieval import for_config

    missing: list[tuple[str, str, str]] = []  # (stage, model, reason)
    for stage in stages:
        sub = getattr(config, stage)
        if sub.model == "random" or (stage == "describe" and not for_config(sub).checkpoint_files):
            continue
        try:
            resolve_checkpoint(sub.model, STAGE_FILENAMES[stage], stage=stage)
        except WeightsUnavailableError as exc:
            missing.append((stage, sub.model, str(exc)))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{stage}.model: {exc}. Fix the path, or run with RANDOM weights (meaningless "
                                    f"geometry): {random_weights_flags(stage)}") from exc
    if len(missing) == 1:
        raise WeightsUnavailableError(missing[0][2])
    if missing:
        reason = _offline_reason() or "the download failed (offline?)"
        names = ", ".join(f"{stage}.model={model!r}" for stage, model, _ in missing)
        downloads = "; ".join(f"`hf download {model} {STAGE_FILENAMES[stage][-1]}`" for stage, model, _ in missing)
        flags = " ".join(random_weights_flags(stage) for stage, _, _ in missing)
        raise WeightsUnavailableError(
            f"no checkpoint for {names}: not in the local Hugging Face cache and {reason}. Either run "
            f"`sparse-vggt weights fetch` where there is network access, or download them ({downloads}) and copy the cache (~/.cache/huggingface) here, or pass "
            f"local files with --set <stage>.model=/path/to/file, or run with RANDOM weights (meaningless "
            f"geometry, for trying the pipeline): {flags}")
