"""Links into the MLflow UI: one click from a question ("is W4A16-nu better than W4A16 on each
model?") to the page that answers it — MLflow's compare view of exactly those runs (metrics and
parameters side by side with a diff switch, parallel coordinates).

Framework-free (no MLflow import): a link is a URL built from run and experiment ids. The UI is the
tracking server itself for an ``http(s)`` ``MLFLOW_TRACKING_URI``; for a local store it is what
``quantlens ui --port P`` serves on ``http://127.0.0.1:P`` (``QUANTLENS_UI_URL`` overrides both).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Iterable
from urllib.parse import quote

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_PORT = 5000  # quantlens ui's default


def ui_base(port: int | None = None) -> str:
    """The MLflow UI's address: the tracking server for an http(s) ``MLFLOW_TRACKING_URI``, else
    ``http://127.0.0.1:<port>`` (what ``quantlens ui --port`` serves); ``QUANTLENS_UI_URL`` overrides."""
    forced = os.environ.get("QUANTLENS_UI_URL")
    if forced:
        return forced.rstrip("/")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return f"http://127.0.0.1:{port or DEFAULT_PORT}"


def _json(ids: Iterable[str]) -> str:
    return quote(json.dumps([str(i) for i in ids], separators=(",", ":")), safe="[],")


def compare_url(run_ids: Iterable[str], experiment_ids: Iterable[str], base: str | None = None) -> str:
    """MLflow's compare view of ``run_ids`` (in that order)."""
    runs = list(dict.fromkeys(str(r) for r in run_ids if r))
    exps = sorted({str(e) for e in experiment_ids if e})
    return f"{base or ui_base()}/#/compare-runs?runs={_json(runs)}&experiments={_json(exps)}"


def run_url(run_id: str, experiment_id: str, base: str | None = None) -> str:
    return f"{base or ui_base()}/#/experiments/{experiment_id}/runs/{run_id}"


def md_link(url: str, text: str = "compare") -> str:
    return f"[{text}]({url})"


def runs_link(runs: "pd.DataFrame", base: str | None = None) -> str | None:
    """The compare link of a frame's runs (columns ``run_id``, ``experiment_id``); None without ids."""
    if runs.empty or "run_id" not in runs:
        return None
    exps = runs["experiment_id"] if "experiment_id" in runs else []
    return compare_url(runs["run_id"].dropna(), exps, base)


def select_runs(df: "pd.DataFrame", settings: list[str], models: list[str] | None = None) -> "pd.DataFrame":
    """The runs of ``settings`` (a tidy frame: the newest FINISHED run per model and setting), every
    model unless ``models``; ordered by setting as given, then by model (family, size). Raises
    ``KeyError`` naming what is not there."""
    import pandas as pd

    have = sorted(set(df["setting"])) if "setting" in df else []
    missing = [s for s in settings if s not in have]
    if missing:
        raise KeyError(f"no FINISHED run of {', '.join(missing)} (settings with runs: {', '.join(have) or 'none'})")
    if models:
        known = sorted(set(df["model"]))
        absent = [m for m in models if m not in known]
        if absent:
            raise KeyError(f"no FINISHED run of model {', '.join(absent)} (models with runs: {', '.join(known)})")
        df = df[df["model"].isin(models)]
    order = {s: i for i, s in enumerate(settings)}
    out = df[df["setting"].isin(settings)].copy()
    out["_o"] = out["setting"].map(order)
    models_order = list(dict.fromkeys(df["model"]))
    out["_m"] = out["model"].map({m: i for i, m in enumerate(models_order)})
    return out.sort_values(["_m", "_o"]).drop(columns=["_o", "_m"]).reset_index(drop=True) if len(out) else pd.DataFrame(columns=df.columns)


def main_comparisons(runs: "pd.DataFrame", base: str | None = None) -> list[tuple[str, str]]:
    """(title, compare link) of a sweep's main questions, from its tidy runs frame: each uniform
    setting against its non-uniform twin(s) across models, each base setting against its clipped
    and perturbed variants, and every setting of each model."""
    if runs.empty or "run_id" not in runs:
        return []
    out = []
    names = list(dict.fromkeys(runs["setting"]))
    models = list(dict.fromkeys(runs["model"]))
    for s in names:
        twins = [t for t in names if t != s and t.startswith((s + "-nu", s + "-p"))]
        if twins:
            sel = runs[runs["setting"].isin([s, *twins])]
            out.append((f"{s} vs {', '.join(twins)} on {sel['model'].nunique()} model(s)", runs_link(sel, base)))
    if "base" in runs:
        for b in dict.fromkeys(runs["base"]):
            variants = runs[(runs["base"] == b) & (runs["setting"] != b)]
            if len(variants) and (runs["setting"] == b).any():
                sel = runs[(runs["base"] == b) | (runs["setting"] == b)]
                out.append((f"{b} against its clipped / perturbed variants ({len(variants)} run(s))", runs_link(sel, base)))
    for m in models:
        sel = runs[runs["model"] == m]
        out.append((f"every setting of {m} ({len(sel)} runs)", runs_link(sel, base)))
    return [(t, u) for t, u in out if u]
