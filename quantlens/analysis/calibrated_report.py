"""The lens on calibrated methods: does GPTQ (AWQ) win by a smaller Δ, or by where it puts it?

For every calibrated run (``method`` gptq or awq) of a model — calibrated in the sweep, or a released
checkpoint's (role ``gptq (checkpoint)`` …; its noise twins are the perturbation runs of the same
checkpoint) — the table sets beside it its round-to-nearest
twin (same grid, group size, activations and KV cache; else round-to-nearest at the same bits with
another granularity, said in its role) and the noise runs matched to either (a
weight perturbation with that run as its ``base``: the same variance per layer, placed at random),
with the mean relative weight error ‖Δ‖/‖W‖ and the quality metrics. GPTQ below RTN in quality
with a Δ as large or larger puts its error where it hurts less; noise matched to GPTQ that does as
well as GPTQ says the magnitude alone explains it. One table per model (``calibrated_lens.md``), with
a ``collapsed`` column (perplexity > 10× full precision), and one figure per model
(``fig_calibrated_lens_<model>.png``): the same rows, grouped by calibrated setting.

Which runs are methods is :func:`quantlens.analysis.aggregate.method_runs` — the same predicate that
keeps them out of the formats table (``uniform_vs_nonuniform``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from quantlens.analysis.rendering import to_markdown
from quantlens.analysis.runs import method_runs, metrics_present
from quantlens.analysis.plotting import ValueAxis, fmt_value, higher_is_better, pyplot, row_axis, rows_height, save_figure

_GRID = ("w_bits", "w_group_size", "w_symmetric", "a_bits", "a_granularity", "kv_bits")


def _same_grid(df: pd.DataFrame, row: pd.Series) -> pd.Series:
    keep = df["model"] == row["model"]
    for c in _GRID:
        if c in df:
            keep &= (df[c].astype(str) == str(row[c]))
    return keep


def calibrated_lens(df: pd.DataFrame) -> pd.DataFrame:
    """model, calibrated (the GPTQ or AWQ setting), role (gptq | awq | rtn | noise ~ gptq | … | noise ~ rtn), setting,
    weight_rel_error_mean and the quality metrics."""
    calibrated = method_runs(df)
    if "method" not in df or not calibrated.any():
        return pd.DataFrame()
    method = df["method"].fillna("rtn")
    pert = df.get("perturbation", pd.Series("none", index=df.index)).fillna("none")
    base = df.get("base", df["setting"]).fillna(df["setting"])
    metrics = metrics_present(df)
    integer = df.get("format", pd.Series("int", index=df.index)).fillna("int").isin(["int", "none"])  # RTN on the integer grid
    ckpt = df.get("checkpoint", pd.Series("", index=df.index)).fillna("").astype(str)
    rows = []
    for i, g in df[calibrated & (pert == "none")].iterrows():
        released = bool(ckpt[i])
        twin = df[_same_grid(df, g) & (method == "rtn") & (pert == "none") & integer]
        rtn = "rtn"
        if twin.empty:  # no run on the very grid: round-to-nearest at the same bits, another granularity
            same_bits = (df["model"] == g["model"]) & (method == "rtn") & (pert == "none") & integer
            for c in ("w_bits", "a_bits", "kv_bits"):
                if c in df:
                    same_bits &= df[c].astype(str) == str(g[c])
            twin, rtn = df[same_bits], "rtn (other granularity)"
        label = f"{g['method']} (checkpoint)" if released else g["method"]
        if not str(g.get("w_format", "int")).startswith(("int", "none", "nan")):
            rtn = f"{rtn} (int grid)"  # (a NormalFloat / FP checkpoint beside integer round-to-nearest)
        parts = [(label, g)]
        parts += [(rtn, r) for _, r in twin.iterrows()]
        same_model = df["model"] == g["model"]
        if released:  # noise matched to a checkpoint: a weight perturbation of the same checkpoint, on the same grid
            on_weights = pert.str.endswith(("-weights", "-both"))
            parts += [(f"noise ~ {label}", r) for _, r in df[same_model & on_weights & (ckpt == ckpt[i]) & _same_grid(df, g)].iterrows()]
        for ref, role in (((g["setting"], f"noise ~ {label}"),) if not released else ()) + tuple(
                (r["setting"], "noise ~ rtn") for _, r in twin.iterrows()):
            parts += [(role, r) for _, r in df[same_model & (pert != "none") & (base == ref)].iterrows()]
        for role, r in parts:
            rows.append({"model": g["model"], "calibrated": g["setting"], "role": role, "setting": r["setting"],
                         "weight_rel_error_mean": r.get("weight_rel_error_mean", float("nan")),
                         **{m: r.get(m, float("nan")) for m in metrics}, "collapsed": bool(r.get("collapsed", False))})
    return pd.DataFrame(rows)


def calibrated_markdown(table: pd.DataFrame) -> str:
    lines = ["# Calibrated methods through the lens of perturbation", "",
             "Does GPTQ (AWQ) win by a smaller Δ or by where it puts it? Each calibrated setting beside its round-to-nearest "
             "twin and noise of the same per-layer variance (a perturbation whose base is that run).", ""]
    for model, g in table.groupby("model", sort=False):
        lines += [f"## {model}", "", to_markdown(g.drop(columns=["model"])), ""]
    return "\n".join(lines)


def _kind(role: str) -> str:
    return "noise" if role.startswith("noise") else "rtn" if role.startswith("rtn") else "method"


_COLORS = {"method": "tab:blue", "rtn": "0.4", "noise": "tab:orange"}


def fig_calibrated_lens(table: pd.DataFrame, model: str, path: Path) -> Path | None:
    """One row per run of :func:`calibrated_lens` (the method, its round-to-nearest twin, noise matched
    to either), grouped by calibrated setting; one panel per quality metric and one for ‖Δ‖/‖W‖. Blue: the
    method, grey: round to nearest, orange: noise. A perplexity on a log axis where it spans more than
    10×, a collapsed run in a band at its end with its value."""
    t = table[table["model"] == model].reset_index(drop=True)
    if t.empty:
        return None
    metrics = [m for m in t.columns if m not in ("model", "calibrated", "role", "setting", "collapsed", "lambada_nll")
               and pd.api.types.is_numeric_dtype(t[m]) and t[m].notna().any()
               and (t[m].nunique() > 1 or m == "weight_rel_error_mean")]  # (a metric the same everywhere: Lambada 0 on tiny models)
    if not metrics:
        return None
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    coll = t["collapsed"].fillna(False).astype(bool).to_numpy() if "collapsed" in t else np.zeros(len(t), bool)
    labels = [(f"{r['setting']} ({r['role']})" if r["setting"] == r["calibrated"] else f"– {r['role']}: {r['setting']}")
              + (" (collapsed)" if c else "") for (_, r), c in zip(t.iterrows(), coll)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.8 + 3.6 * len(metrics), rows_height(len(t), 0.3, 1.4)), squeeze=False,
                             sharey=True)
    for j, (ax, m) in enumerate(zip(axes[0], metrics)):
        v = t[m].to_numpy(dtype=float)
        c = coll if m != "weight_rel_error_mean" else np.zeros(len(t), bool)  # (a collapsed run's ‖Δ‖ is an ordinary number)
        axis = ValueAxis(v, c, unbounded=not higher_is_better(m))
        y = row_axis(ax, labels)
        if j:
            ax.tick_params(labelleft=False)
        ax.scatter(axis.pos(v, c), y, color=[_COLORS[_kind(r)] for r in t["role"]], s=28, zorder=3)
        axis.mark(ax, y, v, c, axis="x")
        axis.apply(ax, "x")
        for sep in [i for i in range(1, len(t)) if t["calibrated"].iloc[i] != t["calibrated"].iloc[i - 1]]:
            ax.axhline(y[sep] + 0.5, color="0.75", lw=0.8)
        right = blended_transform_factory(ax.transAxes, ax.transData)
        for yi, x in zip(y, v):
            ax.text(1.02, yi, fmt_value(x), transform=right, fontsize=6.5, va="center")
        ax.set_title("‖Δ‖/‖W‖ (mean over layers)" if m == "weight_rel_error_mean" else m, fontsize=9)
        ax.set_xlabel("log scale" if axis.log else "", fontsize=7)
    keys = [Line2D([], [], marker="o", ls="", color=col, label=k) for k, col in
            (("the method (GPTQ, AWQ, a checkpoint)", _COLORS["method"]), ("round to nearest, same grid", _COLORS["rtn"]),
             ("noise of the same per-layer variance", _COLORS["noise"]))]
    fig.legend(handles=keys, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=7, frameon=False)
    return save_figure(fig, path, f"{model}: each calibrated method beside its round-to-nearest twin and matched noise", fontsize=10)
