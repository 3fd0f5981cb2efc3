"""Prefect tasks: one thin wrapper per pipeline stage (the library in ``sparse_vggt`` never imports Prefect).

Tasks pass run-directory paths, config dicts and small JSON manifests, never arrays or tensors.
"""

import os

# library log records (logger "sparse_vggt") show up in the Prefect UI next to the task logs
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sparse_vggt")
