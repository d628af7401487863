"""Tables and figures of the mechanism analyses (:mod:`quantlens.analysis.mechanisms`), from their stored
per-run tables (``mechanisms/<dataset>/{layer_error,early_exit,patching}.csv``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from matplotlib.ticker import MaxNLocator

from quantlens.analysis.plotting import ValueAxis, fmt_value, pyplot, row_axis, rows_height, save_figure
from quantlens.analysis.rendering import safe_name

if TYPE_CHECKING:
    from quantlens.analysis.report import Report

TABLES = ("layer_error", "early_exit", "patching")


def patching_table(patching: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 4: D_large perplexity per patched module, beside W16A16 (= ``all``) and the
    unpatched setting (``none``); ``recovered`` = the share of the gap closed by the patch."""
    rows = []
    for (model, dataset, setting), g in patching.groupby(["model", "dataset", "setting"], sort=True):
        g = g.set_index("patched")
        none, full = g.loc["none", "ppl"], g.loc["all", "ppl"]
        for patched, r in g.iterrows():
            gap = none - full
            rows.append({"model": model, "dataset": dataset, "setting": setting, "patched": patched, "layers": r["layers"],
                         "ppl": r["ppl"], "ppl_w16a16": full, "ppl_unpatched": none,
                         "recovered": (none - r["ppl"]) / gap if gap else float("nan"), "n_examples": r["n_examples"]})
    return pd.DataFrame(rows)


def fig_layer_error(layer_error: pd.DataFrame, model: str, path: Path) -> Path | None:
    """Per (dataset, setting): MSE of the MLP / attention outputs against layer (top) and the
    full-precision ‖h(l)‖ (bottom), D_large against D_ctrl."""
    sub = layer_error[layer_error["model"] == model]
    if sub.empty:
        return None
    plt = pyplot()
    combos = sorted(set(zip(sub["dataset"], sub["setting"])))
    fig, axes = plt.subplots(2, len(combos), figsize=(4.6 * len(combos), 6.4), squeeze=False, sharex="col")
    colors = {"large": "tab:red", "ctrl": "tab:blue"}
    for j, (ds, setting) in enumerate(combos):
        g = sub[(sub["dataset"] == ds) & (sub["setting"] == setting)]
        top, bottom = axes[0][j], axes[1][j]
        for set_name, h in g.groupby("set"):
            h = h.sort_values("layer")
            r = h[h["in_range"].astype(bool)]
            c = colors.get(set_name, "black")
            top.plot(r["layer"], r["mse_mlp"], marker="o", color=c, label=f"MLP, D_{set_name}")
            top.plot(r["layer"], r["mse_attention"], marker="s", ls="--", color=c, label=f"attention, D_{set_name}")
            bottom.plot(h["layer"], h["h_norm"], marker="o", color=c, label=f"D_{set_name}")
        top.set_yscale("log")
        ValueAxis(g["h_norm"], unbounded=True).apply(bottom, "y")  # ‖h(l)‖ grows by orders of magnitude in real models
        top.set_title(f"{ds} · {setting}", fontsize=9)
        top.set_ylabel("MSE(full precision, quantized)")
        bottom.set_ylabel("‖h(l)‖ (full precision, token mean)")
        bottom.set_xlabel("layer")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
        top.legend(fontsize=6)
        bottom.legend(fontsize=6)
    return save_figure(fig, path, f"{model}: error per layer, and ‖h(l)‖", fontsize=10)


def fig_early_exit(early_exit: pd.DataFrame, model: str, path: Path) -> Path | None:
    """Early-exit NLL of r(l) against layer: full precision (solid) and quantized (dashed), D_large
    (red) and D_ctrl (blue) — the paper's logit-lens figure."""
    sub = early_exit[(early_exit["model"] == model) & (early_exit["source"] == "r")]
    if sub.empty:
        return None
    plt = pyplot()
    combos = sorted(set(zip(sub["dataset"], sub["setting"])))
    fig, axes = plt.subplots(1, len(combos), figsize=(4.6 * len(combos), 3.8), squeeze=False)
    colors = {"large": "tab:red", "ctrl": "tab:blue"}
    for ax, (ds, setting) in zip(axes[0], combos):
        g = sub[(sub["dataset"] == ds) & (sub["setting"] == setting)]
        for (set_name, precision), h in g.groupby(["set", "precision"]):
            h = h.sort_values("layer")
            ax.plot(h["layer"], h["nll"], marker="o", color=colors.get(set_name, "black"),
                    ls="-" if precision == "full" else "--", label=f"D_{set_name}, {precision}")
        ax.set_xlabel("layer (r(l) decoded by the final norm and LM head)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("mean NLL")
        ax.set_title(f"{ds} · {setting}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return save_figure(fig, path, f"{model}: early exit", fontsize=10)


def fig_patching(table: pd.DataFrame, path: Path) -> Path | None:
    """D_large perplexity per patched module, one panel per (model, dataset, setting): a row per
    patched module, W16A16 (grey) and the unpatched setting (dashed) as lines, the perplexity and the
    share of the gap it closes written right of the panel; log where the values span more than 10×
    (a collapsed setting's patches do)."""
    if table.empty:
        return None
    plt = pyplot()
    from matplotlib.transforms import blended_transform_factory

    combos = sorted(set(zip(table["model"], table["dataset"], table["setting"])))
    ncols = min(2, len(combos))
    nrows = -(-len(combos) // ncols)
    most = max(int((~table["patched"].isin(["none", "all"])).groupby([table["model"], table["dataset"], table["setting"]]).sum().max()), 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, rows_height(most, 0.3, 1.8) * nrows), squeeze=False)
    for ax in axes.flat[len(combos):]:
        ax.set_visible(False)
    for ax, (model, ds, setting) in zip(axes.flat, combos):
        g = table[(table["model"] == model) & (table["dataset"] == ds) & (table["setting"] == setting)]
        g = g[~g["patched"].isin(["none", "all"])]
        full, none = g["ppl_w16a16"].iloc[0], g["ppl_unpatched"].iloc[0]
        axis = ValueAxis(g["ppl"], unbounded=True, extent=[full, none])
        y = row_axis(ax, list(g["patched"]))
        ax.scatter(g["ppl"], y, color="tab:blue", s=28, zorder=3)
        ax.axvline(full, color="grey", ls="-", label=f"W16A16 {fmt_value(full)}")
        ax.axvline(none, color="black", ls="--", label=f"{setting} unpatched {fmt_value(none)}")
        axis.apply(ax, "x")
        right = blended_transform_factory(ax.transAxes, ax.transData)
        rec = g["recovered"] if "recovered" in g else pd.Series(float("nan"), index=g.index)
        for yi, v, r in zip(y, g["ppl"], rec):
            ax.text(1.02, yi, fmt_value(v) + ("" if pd.isna(r) else f" ({r:.0%} recovered)"), transform=right, fontsize=6.5, va="center")
        ax.set_xlabel("D_large perplexity" + (" (log scale)" if axis.log else ""))
        ax.set_title(f"{model} · {ds} · {setting}", fontsize=9)
        ax.legend(fontsize=6, loc="lower center", bbox_to_anchor=(0.5, 1.06), ncol=2, frameon=False)
    return save_figure(fig, path, "Activation patching: restore one module's full-precision output in the layer range", fontsize=10)


def write_mechanism_report(tables: dict[str, pd.DataFrame], out_dir: str | Path, report: "Report | None" = None) -> list[Path]:
    """``tables``: layer_error / early_exit / patching, concatenated over runs (with model, dataset,
    setting columns). Writes ``layer_error.csv``, ``early_exit.csv``, ``patching.csv`` (+ .md) and
    the figures, each a part of ``report``; returns the files."""
    from quantlens.analysis.report import Report

    report = report or Report(Path(out_dir))
    if all(tables.get(t, pd.DataFrame()).empty for t in TABLES):
        return report.files
    frames = {name: report.table(name, lambda name=name: patching_table(tables[name]) if name == "patching" else tables.get(name))
              for name in TABLES if not tables.get(name, pd.DataFrame()).empty}
    models = sorted(set().union(*(set(f["model"]) for f in frames.values() if not f.empty)))
    for model in models:
        if not frames.get("layer_error", pd.DataFrame()).empty:
            report.figure(f"fig_layer_error_{safe_name(model)}", lambda path, model=model: fig_layer_error(frames["layer_error"], model, path))
        if not frames.get("early_exit", pd.DataFrame()).empty:
            report.figure(f"fig_early_exit_{safe_name(model)}", lambda path, model=model: fig_early_exit(frames["early_exit"], model, path))
    if not frames.get("patching", pd.DataFrame()).empty:
        report.figure("fig_patching", lambda path: fig_patching(frames["patching"], path))
    return report.files
