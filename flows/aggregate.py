"""Aggregation flow: finished runs in MLflow → the paper's tables and figures (files + artifacts).

The report is a step that can fail part by part (:class:`quantlens.analysis.report.Report`): a
table or figure that raises is one line in the result, the others are written, and ``report.json``
records whether the report is complete and which runs it was built from — a rerun with nothing to
evaluate completes it.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from quantlens.analysis.aggregate import reference_settings, run_methods, tidy, write_report
from quantlens.analysis.links import runs_link
from quantlens.analysis.paired import BootstrapSpec
from quantlens.analysis.mechanism_report import write_mechanism_report
from quantlens.analysis import routing_report
from quantlens.analysis.per_example import write_per_example_report
from quantlens.analysis.report import Report
from quantlens.pipeline.console import status
from quantlens.tasks.tracking import Tracker


READERS = 8  # concurrent artifact reads (MLflow server or store)


def report_fault(part: str) -> None:
    """Drill: ``QUANTLENS_INJECT_FAULT=report`` fails the report's first table (``results``),
    ``report:<part>`` the named part; read at every call, so a rerun without it completes the report."""
    spec = os.environ.get("QUANTLENS_INJECT_FAULT", "")
    if spec == "report" and part == "results" or spec == f"report:{part}":
        raise RuntimeError(f"injected fault in report part {part} (QUANTLENS_INJECT_FAULT)")


@dataclass
class RunTables:
    """What the report reads of the runs' artifacts (each run read once)."""

    examples: pd.DataFrame
    residual: pd.DataFrame
    tokens: pd.DataFrame
    reference: dict[str, str]  # model → the setting of its reference run
    families: dict[str, str]  # model → family
    mechanisms: dict[str, pd.DataFrame]  # layer_error / early_exit / patching, over runs
    routing: pd.DataFrame = field(default_factory=pd.DataFrame)  # MoE runs: model, setting, dataset, layer, expert, load, flips, delta_l2


def read_run_tables(tracker: Tracker, runs: pd.DataFrame) -> RunTables:
    """The per-example, residual and mechanism tables of ``runs`` (a tidy frame, one run per model
    and setting), :data:`READERS` runs at a time, each run's artifacts listed and read once. The
    reference is the run whose setting is the full-precision model (:func:`reference_settings`);
    other runs of that computation under older names are left out of the comparison. Runs logged
    before per-example storage simply contribute nothing."""
    examples, residual, tokens, mechanisms, routing = [], [], [], {}, []
    reference = reference_settings(runs)
    families = dict(zip(runs["model"], runs["family"].fillna(""))) if "family" in runs else {}
    wanted = [row for _, row in runs.iterrows() if not row["reference"] or reference.get(row["model"]) == row["setting"]]

    def read(row: pd.Series) -> tuple[pd.Series, dict[str, dict[str, pd.DataFrame]]]:
        folders = ["per_example", "mechanisms", "routing"] + (["residual"] if reference.get(row["model"]) == row["setting"] else [])
        return row, tracker.read_tables(row["artifact_uri"], folders)

    with ThreadPoolExecutor(max_workers=READERS) as pool:  # artifact reads are I/O: a bounded pool
        for done, (row, tables) in enumerate(pool.map(read, wanted), 1):
            model, setting = row["model"], row["setting"]
            for folder, frames in tables.items():
                for name, frame in frames.items():
                    keys = {"model": model, "dataset": name}
                    if folder == "per_example":
                        if "tokens" in frame:
                            tokens.append(frame[["example_id", "tokens"]].assign(**keys))
                        cols = ["example_id", "n_tokens", "nll"] + [c for c in ("correct", "kl", "released", "router_flips") if c in frame]
                        examples.append(frame[cols].assign(setting=setting, **keys))
                    elif folder == "residual":
                        residual.append(frame.assign(**keys))
                    elif folder == "routing":
                        routing.append(frame.assign(setting=setting, **keys))
                    elif folder.startswith("mechanisms/"):
                        mechanisms.setdefault(name, []).append(frame)
            status(f"report: reading the runs' tables, {done}/{len(wanted)} runs")

    def cat(parts: list[pd.DataFrame]) -> pd.DataFrame:
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    return RunTables(cat(examples), cat(residual), cat(tokens), reference, families, {k: cat(v) for k, v in mechanisms.items()},
                     cat(routing))


def build_report(
    experiment: str = "quantlens",
    sweep_id: str | None = None,
    out_dir: str = "results/all",
    parent_run_id: str | None = None,
    read: Callable[[Tracker, pd.DataFrame], RunTables] = read_run_tables,
    log: Any = None,
    statistics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tables (CSV + Markdown) and figures (PNG) of FINISHED runs: one sweep's grid (the runs it
    created or reused), or the whole experiment (all sweeps) when ``sweep_id`` is None; logged as
    artifacts of ``parent_run_id``. Includes the per-example analysis of the second paper. Plain
    code (``quantlens aggregate`` calls it without starting Prefect); :func:`aggregate_flow` is the
    same as a flow of a sweep. ``statistics``: the bootstrap's resamples, level and seed (the sweep's
    ``analysis.statistics``; default 1000, 95 %, 0).

    Returns ``{"files": [...], "failed": ["<part>: <error>", ...], "complete": bool, "out_dir": ...}``."""
    log = log or logging.getLogger("quantlens.aggregate")
    tracker = Tracker(experiment)
    df = tracker.runs_frame(sweep_id)
    report = Report(Path(out_dir), fault=report_fault, progress=status)
    runs = report.compute("tidy", lambda: tidy(df), pd.DataFrame())  # one run per (model, setting), typed
    spec = BootstrapSpec(**(statistics or {}))
    if not runs.empty:
        tables = read(tracker, runs)  # first: the run tables' paired intervals enter the comparisons
        write_report(runs, out_dir, report, examples=tables.examples, spec=spec)
        if not tables.examples.empty:
            write_per_example_report(tables.examples, tables.residual, tables.tokens, tables.reference, out_dir, tables.families,
                                     report=report, bases=dict(zip(runs["setting"], runs["base"])), spec=spec,
                                     methods=run_methods(runs),
                                     links=lambda model, settings: runs_link(runs[(runs["model"] == model) & runs["setting"].isin(settings)]))
        write_mechanism_report(tables.mechanisms, out_dir, report=report)
        routing_report.write(tables.routing, tables.reference, report)
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


@flow(name="quantlens-aggregate", log_prints=True)
def aggregate_flow(
    experiment: str = "quantlens",
    sweep_id: str | None = None,
    out_dir: str = "results/all",
    parent_run_id: str | None = None,
    statistics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`build_report` as a flow (a sweep's last step): reading the runs is a task of it."""
    read = task(name="read-run-tables", cache_policy=NONE, persist_result=False)(read_run_tables)
    return build_report(experiment, sweep_id, out_dir, parent_run_id, read=read, log=get_run_logger(), statistics=statistics)
