"""Aggregation flow: finished runs in MLflow → the paper's tables and figures (files + artifacts)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from quantlens.analysis.aggregate import write_report
from quantlens.analysis.mechanism_report import write_mechanism_report
from quantlens.analysis.per_example import write_per_example_report
from quantlens.tasks.tracking import Tracker


def is_reference(row: pd.Series) -> bool:
    """The full-precision run of a model: nothing quantized, nothing perturbed."""
    return (str(row.get("params.w_bits")) == "16" and str(row.get("params.a_bits")) == "16"
            and row.get("params.perturbation", "none") in ("none", None))


@task(name="read-per-example", cache_policy=NONE, persist_result=False)
def read_per_example(tracker: Tracker, runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, str], dict[str, str]]:
    """The per-example artifacts of ``runs``: (examples, residual, tokens, reference setting per
    model, family per model). Runs logged before per-example storage simply contribute nothing."""
    examples, residual, tokens = [], [], []
    reference: dict[str, str] = {}
    families: dict[str, str] = {}
    if "end_time" in runs:  # across sweeps one (model, setting) may have several runs: the newest counts
        runs = runs.sort_values("end_time").drop_duplicates(["params.model", "params.setting"], keep="last")
    for _, row in runs.iterrows():
        model, setting = row["params.model"], row["params.setting"]
        families[model] = row.get("params.family", "")
        ref = is_reference(row)
        if ref:
            reference[model] = setting
        for dataset, frame in tracker.read_frames(row["run_id"], "per_example").items():
            keys = {"model": model, "dataset": dataset}
            if "tokens" in frame:
                tokens.append(frame[["example_id", "tokens"]].assign(**keys))
            examples.append(frame[["example_id", "n_tokens", "nll"]].assign(setting=setting, **keys))
        if ref:
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
) -> list[str]:
    """Tables (CSV + Markdown) and figures (PNG) of FINISHED runs: one sweep's grid (the runs it
    created or reused), or the whole experiment (all sweeps) when ``sweep_id`` is None; logged as
    artifacts of ``parent_run_id``. Includes the per-example analysis of the second paper."""
    log = get_run_logger()
    tracker = Tracker(experiment)
    df = tracker.runs_frame(sweep_id)
    files = write_report(df, out_dir)
    if not df.empty:
        examples, residual, tokens, reference, families = read_per_example(tracker, df)
        if not examples.empty:
            files += write_per_example_report(examples, residual, tokens, reference, out_dir, families)
        files += write_mechanism_report(read_mechanisms(tracker, df), out_dir)
    if parent_run_id and files:
        tracker.log_files(parent_run_id, files, "report")
    log.info("aggregate: %d finished run(s) → %d file(s) in %s", len(df), len(files), Path(out_dir).resolve())
    return [str(f) for f in files]
