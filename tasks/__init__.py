"""Prefect tasks: one thin wrapper per pipeline stage (the library in ``sparse_vggt`` never imports Prefect).

Tasks pass run-directory paths, config dicts and small JSON manifests, never arrays or tensors.

This package is the one place that sets Prefect's environment for this project (flows/ imports it first, and
flows/deploy.py puts `LIBRARY_LOGGERS` into the workers' environment): it must run before prefect is imported.
"""

import os

# library log records (logger "sparse_vggt") show up in the Prefect UI next to the task logs
LIBRARY_LOGGERS = {"PREFECT_LOGGING_EXTRA_LOGGERS": "sparse_vggt"}
for _key, _value in {
    **LIBRARY_LOGGERS,
    # quiet by default (an explicit setting wins): no telemetry from this process or the ephemeral server it
    # starts, and no warning when a library logger logs outside a flow run
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}.items():
    os.environ.setdefault(_key, _value)
