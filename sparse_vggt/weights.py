"""Checkpoint resolution and strict loading, shared by VGGT and MegaLoc.

``resolve_checkpoint`` turns a local file, a local directory or a Hugging Face repo id into a local file
(downloading only in that last case, never at import or model construction). ``load_state_dict_file`` reads
safetensors or a ``torch.load(weights_only=True)`` pickle. ``load_checkpoint_into`` checks names and shapes
first and raises `CheckpointMismatchError` naming every missing/unexpected key and shape mismatch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_FILENAMES = ("model.safetensors", "model.pt")
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


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and "\\" not in name


def resolve_checkpoint(name_or_path: str | Path, filenames: Sequence[str] = DEFAULT_FILENAMES,
                       revision: str | None = None) -> Path:
    """Local file -> itself; directory -> the first of ``filenames`` in it; ``owner/name`` -> hub download of
    the first of ``filenames`` the repo has. Raises FileNotFoundError with what was tried."""
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
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    errors = []
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id=name, filename=filename, revision=revision))
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
