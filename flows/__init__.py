"""Prefect flows: the end-to-end reconstruction flow and the per-cluster flow used for farm dispatch."""

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sparse_vggt")
# quiet by default (before prefect is imported; an explicit setting wins): no telemetry from this process or the
# ephemeral server it starts, and no warning when a library logger logs outside a flow run
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
