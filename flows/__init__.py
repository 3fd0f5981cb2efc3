"""Prefect flows: the end-to-end flow, the farm workers' unit flows, the scheduled flow and the deployments.

``tasks`` is imported first: it sets Prefect's environment (library loggers, no telemetry) before prefect loads.
"""

import tasks  # noqa: F401
