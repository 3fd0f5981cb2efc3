"""Which weights produced a run: random, or which checkpoint file and hub revision (no torch, no network).

Recorded in the describe/reconstruct stage manifests (run.json) and shown in every report: ``export/report.md``
and the flow's report artifact get the section `weights_markdown` writes; `sparse-vggt status` prints one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

DEFAULT_FILENAMES = ("model.safetensors", "model.pt")
STAGE_FILENAMES = {"describe": ("model.safetensors",), "reconstruct": ("model.safetensors", "model.pt")}


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and "\\" not in name


def _cached_file(name: str, filenames: Sequence[str], revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    from .provision import hub_cache_dir  # HF_HUB_CACHE read now, not at huggingface_hub's import

    for filename in filenames:
        hit = try_to_load_from_cache(repo_id=name, filename=filename, revision=revision,
                                     cache_dir=str(hub_cache_dir()))
        if isinstance(hit, (str, os.PathLike)) and Path(hit).is_file():
            return Path(hit)
    return None


# ------------------------------------------------------------------------------------------------------------
# provenance: which weights produced a run (recorded in manifests, shown in every report)


def _hub_revision(path: Path) -> tuple[str | None, str | None]:
    """(repo id, commit) of a file inside the Hugging Face cache (``models--org--name/snapshots/<commit>/``)."""
    parts = path.parts
    for k in range(len(parts) - 2):
        if parts[k].startswith("models--") and parts[k + 1] == "snapshots":
            return parts[k][len("models--"):].replace("--", "/"), parts[k + 2]
    return None, None


def provenance(model: str, filenames: Sequence[str] = DEFAULT_FILENAMES, preset: str | None = None,
               seed: int | None = None, revision: str | None = None) -> dict[str, Any]:
    """What a stage's ``model`` setting resolves to, without any network access: ``{"weights": "random", ...}``
    or ``{"weights": "checkpoint", "source", "file", "revision", "bytes"}`` (revision: the hub commit of a cached
    file, else the requested revision)."""
    if model == "random":
        return {"weights": "random", "preset": preset, "seed": seed}
    from .provision import lock_entry_for, pinned_revision

    revision = revision or pinned_revision(str(model))
    out: dict[str, Any] = {"weights": "checkpoint", "source": str(model), "preset": preset}
    path = Path(model).expanduser()
    found: Path | None = None
    if path.is_file():
        found = path
    elif path.is_dir():
        found = next((path / f for f in filenames if (path / f).is_file()), None)
    elif _looks_like_repo_id(str(model)):
        try:
            found = _cached_file(str(model), filenames, revision) or _cached_file(str(model), filenames, None)
        except Exception:  # noqa: BLE001 - provenance must never fail a stage
            found = None
    if found is not None:
        _, commit = _hub_revision(found)  # snapshots/<commit>/<file> (before following the symlink into blobs/)
        out.update(file=str(found), bytes=found.stat().st_size, revision=commit or revision)
        entry = lock_entry_for(found)  # checksum verified by `sparse-vggt weights fetch` (no re-hashing here)
        out["sha256"] = entry.get("sha256") if entry else None
    else:
        out.update(file=None, revision=revision)
    return out


def describe_weights(prov: Mapping[str, Any] | None) -> str:
    """One line for reports: 'RANDOM (preset tiny, seed 0)' or 'checkpoint facebook/VGGT-1B @ <rev> (<file>)'."""
    if not prov:
        return "unknown (not recorded)"
    kind = prov.get("weights")
    if kind == "random":
        return f"RANDOM weights (preset {prov.get('preset')}, seed {prov.get('seed')}): results are meaningless"
    if kind == "file":
        return f"descriptors read from {prov.get('file')} (no model)"
    rev, sha = prov.get("revision"), prov.get("sha256")
    return (f"checkpoint {prov.get('source')}" + (f" @ {rev}" if rev else "") + (f" sha256 {sha}" if sha else "")
            + (f" ({prov.get('file')}, {prov.get('bytes')} bytes)" if prov.get("file") else ""))


def run_weights(meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model stage, the weights a run used, from run.json (the stage manifests' provenance, else the
    recorded config for runs made before provenance was recorded, or stages not finished yet)."""
    stages, config = meta.get("stages", {}) or {}, meta.get("config", {}) or {}
    out: dict[str, dict[str, Any]] = {}
    for stage in ("describe", "reconstruct"):
        w = (stages.get(stage, {}) or {}).get("manifest", {}).get("weights")
        if isinstance(w, list):  # several provenances (clusters made by different checkpoints)
            w = {"weights": "mixed", "sources": w}
        if not w:
            sub = config.get(stage, {}) or {}
            model = sub.get("model")
            if stage == "describe" and sub.get("descriptors_file"):
                w = {"weights": "file", "file": sub["descriptors_file"]}
            elif model:
                w = provenance(model, STAGE_FILENAMES[stage], preset=sub.get("preset"),
                               seed=sub.get("seed", 0 if stage == "describe" else None))
                w["from_config"] = True
        if w:
            out[stage] = w
    return out


def weights_markdown(meta: Mapping[str, Any]) -> str:
    """The 'Model weights' section of a Markdown report: random or real, checkpoint file and revision."""
    weights = run_weights(meta)
    random = [s for s, w in weights.items() if w.get("weights") == "random"]
    lines = ["## Model weights", ""]
    if random:
        lines += [f"**{' and '.join(random)} ran with RANDOM weights: every pose, depth and point is meaningless.**",
                  ""]
    for stage, w in weights.items():
        if w.get("weights") == "mixed":
            text = "several: " + "; ".join(describe_weights(x) for x in w.get("sources", []))
        else:
            text = describe_weights(w)
        lines.append(f"- **{stage}**: {text}")
    return "\n".join(lines) + "\n"
