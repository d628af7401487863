"""Prefect flows: sweep → one model subflow per model → explain → aggregate.

Importing the flows (CLI, workers, tests) turns Prefect's and MLflow's telemetry off unless
``QUANTLENS_TELEMETRY=1``: clusters without internet should not log failed telemetry calls.
"""

import os

if os.environ.get("QUANTLENS_TELEMETRY") != "1":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
