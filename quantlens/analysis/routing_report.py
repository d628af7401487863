"""The report's lens on routing (mixtures of experts; framework-free: pandas + matplotlib).

From each MoE run's ``routing/<dataset>.parquet`` (:mod:`quantlens.evaluation.routing`: per MoE
layer and expert, the expert's load, the layer's router flips against the reference, the expert's
‖Δ‖₂):

- ``router_flips``: model, dataset, setting, layer, flips — the fraction of tokens whose top-k
  expert set changed under the setting (0 for the reference against itself);
- ``expert_load``: model, dataset, setting, layer, expert, load, the reference's load beside it, and
  the expert's ‖Δ‖₂ — does a setting move tokens towards the experts it perturbs most?
- ``fig_router_flips_<model>``: flips by layer, one line per setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from quantlens.analysis.plotting import legend_outside, pyplot, save_figure, styles
from quantlens.analysis.rendering import safe_name

if TYPE_CHECKING:
    from quantlens.analysis.report import Report


def router_flips(routing: pd.DataFrame, reference: dict[str, str]) -> pd.DataFrame:
    if routing.empty:
        return pd.DataFrame()
    r = routing[routing["setting"] != routing["model"].map(reference)]
    t = r.groupby(["model", "dataset", "setting", "layer"], as_index=False)["flips"].first()
    return t.dropna(subset=["flips"]).sort_values(["model", "dataset", "setting", "layer"]).reset_index(drop=True)


def expert_load(routing: pd.DataFrame, reference: dict[str, str]) -> pd.DataFrame:
    if routing.empty:
        return pd.DataFrame()
    ref = routing[routing["setting"] == routing["model"].map(reference)]
    ref = ref[["model", "dataset", "layer", "expert", "load"]].rename(columns={"load": "load_reference"})
    cols = ["model", "dataset", "setting", "layer", "expert", "load"] + (["delta_l2"] if "delta_l2" in routing else [])
    out = routing[cols].merge(ref, on=["model", "dataset", "layer", "expert"], how="left")
    return out.sort_values(["model", "dataset", "setting", "layer", "expert"]).reset_index(drop=True)


def fig_router_flips(flips: pd.DataFrame, model: str, path: Path) -> Path | None:
    t = flips[flips["model"] == model]
    if t.empty:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    datasets = list(dict.fromkeys(t["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        sub = t[t["dataset"] == dataset]
        style = dict(zip(sorted(sub["setting"].unique()), styles(sub["setting"].nunique())))
        for setting, g in sub.groupby("setting", sort=False):
            color, marker = style[setting]
            ax.plot(g["layer"], g["flips"], marker=marker, color=color, ms=4, label=setting)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("router flips (fraction of tokens)")
        ax.set_ylim(bottom=0)
        ax.set_title(dataset)
        legend_outside(ax)
    return save_figure(fig, path, f"{model}: tokens routed to another expert set than at full precision", fontsize=10)


def write(routing: pd.DataFrame, reference: dict[str, str], report: "Report") -> None:
    if routing.empty:
        return
    flips = report.table("router_flips", lambda: router_flips(routing, reference))
    report.table("expert_load", lambda: expert_load(routing, reference), md=False)
    for model in sorted(flips["model"].unique()) if not flips.empty else []:
        report.figure(f"fig_router_flips_{safe_name(model)}", lambda path, m=model: fig_router_flips(flips, m, path))
