"""Models. Imported lazily so that ``import sparse_vggt.models`` stays cheap."""


def __getattr__(name: str):
    if name == "MegaLoc":  # retrieval descriptor of the describe stage
        from .megaloc import MegaLoc
        return MegaLoc
    if name in ("VGGT", "PRESETS"):
        from . import vggt
        return getattr(vggt, name)
    if name == "Aggregator":
        from .aggregator import Aggregator
        return Aggregator
    raise AttributeError(f"module 'sparse_vggt.models' has no attribute {name!r}")
