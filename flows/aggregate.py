"""Aggregation flow: finished runs in MLflow → the paper's tables and figures (files + artifacts)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from quantlens.aggregate import write_report
from tasks.tracking import Tracker


@flow(name="quantlens-aggregate", log_prints=True)
def aggregate_flow(
    experiment: str = "quantlens",
    sweep_id: str | None = None,
    out_dir: str = "results/all",
    parent_run_id: str | None = None,
) -> list[str]:
    """Tables (CSV + Markdown) and figures (PNG) of FINISHED runs: one sweep's grid (the runs it
    created or reused), or the whole experiment (all sweeps) when ``sweep_id`` is None; logged as
    artifacts of ``parent_run_id``."""
    log = get_run_logger()
    tracker = Tracker(experiment)
    df = tracker.runs_frame(sweep_id)
    files = write_report(df, out_dir)
    if parent_run_id and files:
        tracker.log_files(parent_run_id, files, "report")
    log.info("aggregate: %d finished run(s) → %d file(s) in %s", len(df), len(files), Path(out_dir).resolve())
    return [str(f) for f in files]
