def __getattr__(name: str):  # lazy exports; MegaLoc added by the retrieval stage (issue 7)
    if name == "MegaLoc":
        from .megaloc import MegaLoc
        return MegaLoc
    raise AttributeError(f"module 'sparse_vggt.models' has no attribute {name!r}")
