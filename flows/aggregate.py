"""Aggregation flow: finished runs in MLflow → the paper's tables and figures (files + artifacts).

The report is a step that can fail part by part (:class:`quantlens.analysis.report.Report`): a
table or figure that raises is one line in the result, the others are written, and ``report.json``
records whether the report is complete and which runs it was built from — a rerun with nothing to
evaluate completes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from quantlens.analysis.aggregate import reference_settings, tidy, write_report
from quantlens.analysis.mechanism_report import write_mechanism_report
from quantlens.analysis.per_example import write_per_example_report
from quantlens.analysis.report import Report
from quantlens.tasks.tracking import Tracker


def report_fault(part: str) -> None:
    """Drill: ``QUANTLENS_INJECT_FAULT=report`` fails the report's first table (``results``),
    ``report:<part>`` the named part; read at every call, so a rerun without it completes the report."""
    spec = os.environ.get("QUANTLENS_INJECT_FAULT", "")
    if spec == "report" and part == "results" or spec == f"report:{part}":
        raise RuntimeError(f"injected fault in report part {part} (QUANTLENS_INJECT_FAULT)")


@task(name="read-per-example", cache_policy=NONE, persist_result=False)
def read_per_example(tracker: Tracker, runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, str], dict[str, str]]:
    """The per-example artifacts of ``runs`` (a tidy frame, one run per model and setting): (examples,
    residual, tokens, reference setting per model, family per model). The reference is the run whose
    setting is the full-precision model (:func:`reference_settings`); other runs of the same
    computation under older names are left out of the comparison. Runs logged before per-example
    storage simply contribute nothing."""
    examples, residual, tokens = [], [], []
    reference = reference_settings(runs)
    families: dict[str, str] = {}
    for _, row in runs.iterrows():
        model, setting = row["model"], row["setting"]
        families[model] = row.get("family", "")
        is_ref = reference.get(model) == setting
        if row["reference"] and not is_ref:
            continue  # the same computation as the reference, under another name
        for dataset, frame in tracker.read_frames(row["run_id"], "per_example").items():
            keys = {"model": model, "dataset": dataset}
            if "tokens" in frame:
                tokens.append(frame[["example_id", "tokens"]].assign(**keys))
            examples.append(frame[["example_id", "n_tokens", "nll"]].assign(setting=setting, **keys))
        if is_ref:
            for dataset, frame in tracker.read_frames(row["run_id"], "residual").items():
                residual.append(frame.assign(model=model, dataset=dataset))

    def cat(parts: list[pd.DataFrame]) -> pd.DataFrame:
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    return cat(examples), cat(residual), cat(tokens), reference, families


@task(name="read-mechanisms", cache_policy=NONE, persist_result=False)
def read_mechanisms(tracker: Tracker, runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The mechanism tables stored under ``mechanisms/<dataset>/`` of the runs, concatenated."""
    parts: dict[str, list[pd.DataFrame]] = {}
    for run_id in runs["run_id"]:
        for folder in tracker.list_artifacts(run_id, "mechanisms"):
            if folder.is_dir:
                for name, frame in tracker.read_frames(run_id, folder.path).items():
                    parts.setdefault(name, []).append(frame)
    return {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}


@flow(name="quantlens-aggregate", log_prints=True)
def aggregate_flow(
    experiment: str = "quantlens",
    sweep_id: str | None = None,
    out_dir: str = "results/all",
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Tables (CSV + Markdown) and figures (PNG) of FINISHED runs: one sweep's grid (the runs it
    created or reused), or the whole experiment (all sweeps) when ``sweep_id`` is None; logged as
    artifacts of ``parent_run_id``. Includes the per-example analysis of the second paper.

    Returns ``{"files": [...], "failed": ["<part>: <error>", ...], "complete": bool, "out_dir": ...}``."""
    log = get_run_logger()
    tracker = Tracker(experiment)
    df = tracker.runs_frame(sweep_id)
    report = Report(Path(out_dir), fault=report_fault)
    runs = report.compute("tidy", lambda: tidy(df), pd.DataFrame())  # one run per (model, setting), typed
    if not runs.empty:
        write_report(runs, out_dir, report)
        examples, residual, tokens, reference, families = read_per_example(tracker, runs)
        if not examples.empty:
            write_per_example_report(examples, residual, tokens, reference, out_dir, families, report=report)
        write_mechanism_report(read_mechanisms(tracker, runs), out_dir, report=report)
    run_ids = list(df["run_id"]) if not df.empty else []
    manifest = report.write_manifest(run_ids)
    files = [*report.files, manifest] if report.files else []
    if parent_run_id and files:
        tracker.log_files(parent_run_id, files, "report")
    for line in report.failed:
        log.info("report part failed: %s", line)  # the CLI prints these lines; workers log them
    log.info("aggregate: %d finished run(s) → %d file(s) in %s%s", len(df), len(files), Path(out_dir).resolve(),
             "" if report.complete else f", {len(report.failed)} part(s) failed")
    return {"files": [str(f) for f in files], "failed": list(report.failed), "complete": report.complete, "out_dir": str(Path(out_dir))}
