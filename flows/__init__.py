"""Prefect flows: the end-to-end reconstruction flow and the per-cluster flow used for farm dispatch."""

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sparse_vggt")
