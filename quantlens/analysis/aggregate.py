"""The paper's tables and figures from a table of finished runs (framework-free: pandas + matplotlib).

Input: the DataFrame ``mlflow.search_runs`` returns (columns ``params.*``, ``metrics.*``,
``tags.*``) or an already tidy one. Works on any subset of runs, across sweeps too; a figure whose
runs are absent is skipped, not faked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from quantlens.evaluation.data import DATASETS
from quantlens.analysis.links import runs_link
from quantlens.analysis.plotting import (COLLAPSED_COLOR, RING_LABEL, ValueAxis, fmt_value, higher_is_better,
                                         legend_outside, pyplot, row_axis, rows_height, save_figure, styles)
from quantlens.analysis.rendering import to_markdown
from quantlens.analysis.runs import (NUMERIC, QUALITY, collapsed_runs, method_runs, metrics_present, native_runs,  # noqa: F401 (re-exported)
                                     reference_mask, reference_settings, results_table, run_families, run_methods, tidy)

if TYPE_CHECKING:
    from quantlens.analysis.paired import BootstrapSpec
    from quantlens.analysis.report import Report


def _link(*frames: pd.DataFrame | pd.Series) -> str | None:
    """The MLflow compare link of these runs (rows of the tidy frame), None without run ids."""
    rows = pd.concat([f.to_frame().T if isinstance(f, pd.Series) else f for f in frames])
    return runs_link(rows)


# --- Tables ---------------------------------------------------------------------------------------
_MATCH = ("w_granularity", "a_granularity", "kv_granularity", "w_group_size")


def _config(row: pd.Series) -> str:
    kv = row.get("kv_bits", 16)
    kv = 16 if pd.isna(kv) else int(kv)
    return f"W{int(row['w_bits'])}A{int(row['a_bits'])}" + (f"KV{kv}" if kv < 16 else "")


def uniform_vs_nonuniform(df: pd.DataFrame, examples: pd.DataFrame | None = None, spec: "BootstrapSpec | None" = None) -> pd.DataFrame:
    """The paper's table across the field's formats: per model and bit widths, every non-uniform
    family that was run (cube root, NF, FP, MX, NVFP4, codebook) beside the INT run at the same bits
    (the one with the same granularity where there is one, else the per-channel default), with Δ =
    format − INT, whether either run collapsed (``INT collapsed``, ``format collapsed``) and a compare
    link. Number formats only: a method's runs (GPTQ, AWQ, a released checkpoint: :func:`method_runs`)
    are compared with their round-to-nearest twin in ``calibrated_lens``, not here. With the runs'
    per-example tables (``examples``), each Δ of a dataset metric gets its paired bootstrap interval
    over the examples both runs have (``<metric> Δ lo`` / ``hi``; a perplexity also the interval of the
    ratio format / INT, ``<metric> ratio lo`` / ``hi`` = exp of ΔNLL's; accuracy: McNemar's exact
    ``<metric> p`` on the examples that flipped between the two)."""
    plain = native_runs(df)
    if plain.empty or "w_bits" not in plain:
        return pd.DataFrame()
    plain = plain[~method_runs(plain)]
    plain = plain.assign(_family=run_families(plain), _config=plain.apply(_config, axis=1))
    plain = plain[~plain["reference"]]
    rows = []
    metrics = metrics_present(plain)
    for (model, config), g in plain.groupby(["model", "_config"], sort=False):
        ints = g[g["_family"] == "int"]
        if ints.empty:
            continue
        for _, fmt in g[g["_family"] != "int"].sort_values("setting").iterrows():
            same = ints
            for k in (k for k in _MATCH if k in ints):
                same = same[same[k] == fmt[k]]
            uni = (same if not same.empty else ints.sort_values("setting", key=lambda c: c.str.len())).iloc[0]
            row = {"model": model, "config": config, "family": fmt["_family"], "setting": fmt["setting"], "INT": uni["setting"]}
            for m in metrics:
                row[f"{m} INT"] = uni[m]
                row[f"{m} format"] = fmt[m]
                row[f"{m} Δ"] = fmt[m] - uni[m]  # format − INT: < 0 is better for ppl/nll, > 0 for acc
            row["INT collapsed"] = bool(uni.get("collapsed", False))
            row["format collapsed"] = bool(fmt.get("collapsed", False))
            link = _link(uni, fmt)
            if link:
                row["compare"] = link
            rows.append(row)
    out = pd.DataFrame(rows)
    if examples is not None and not examples.empty and not out.empty:
        out = _with_intervals(out, examples, spec)
    return out


def _with_intervals(table: pd.DataFrame, examples: pd.DataFrame, spec: "BootstrapSpec | None") -> pd.DataFrame:
    """``<dataset>_ppl Δ lo/hi`` and ``<dataset>_nll Δ lo/hi`` (paired bootstrap), ``lambada_acc p`` (McNemar)."""
    from quantlens.analysis.paired import BootstrapSpec
    from quantlens.analysis.paired_report import paired_pairs

    pairs = paired_pairs(examples, table.rename(columns={"INT": "against"})[["model", "setting", "against"]], spec or BootstrapSpec())
    if pairs.empty:
        return table
    out = table.copy()
    for dataset, g in pairs.groupby("dataset"):
        key = g.set_index(["model", "setting"])
        idx = list(zip(out["model"], out["setting"]))
        get = lambda col: [key[col].get(i, float("nan")) for i in idx]  # noqa: E731
        # each metric's own statistic: perplexity datasets log the token-weighted NLL, Lambada the mean
        # over passages of the target word's summed NLL
        nll_stat = DATASETS[dataset].paired_nll if dataset in DATASETS else "delta_nll"
        for metric, stat in ((f"{dataset}_ppl", "delta_ppl"), (f"{dataset}_nll", nll_stat)):
            if f"{metric} Δ" in out:
                out[f"{metric} Δ lo"], out[f"{metric} Δ hi"] = get(f"{stat}_lo"), get(f"{stat}_hi")
        if f"{dataset}_ppl Δ" in out:  # the ratio format / INT: what a log axis shows, tight even where INT collapsed
            out[f"{dataset}_ppl ratio lo"], out[f"{dataset}_ppl ratio hi"] = np.exp(get("delta_nll_lo")), np.exp(get("delta_nll_hi"))
        if f"{dataset}_acc Δ" in out and "mcnemar_p" in key:
            out[f"{dataset}_acc p"] = get("mcnemar_p")
    return out


def interval_markdown(table: pd.DataFrame) -> pd.DataFrame:
    """The table as people read it: each ``Δ`` with its interval in one cell, ``≈0`` where it covers 0."""
    out = table.copy()
    for c in [c for c in table.columns if c.endswith(" Δ") and f"{c} lo" in table]:
        out[c] = [f"{v:+.4g} [{lo:+.4g}, {hi:+.4g}]" + (" ≈0" if lo <= 0 <= hi else "") if pd.notna(lo) else f"{v:+.4g}"
                  for v, lo, hi in zip(table[c], table[f"{c} lo"], table[f"{c} hi"])]
        out = out.drop(columns=[f"{c} lo", f"{c} hi"])
    return out.drop(columns=[c for c in table.columns if c.endswith((" ratio lo", " ratio hi"))])


# --- Figures --------------------------------------------------------------------------------------
def _collapsed_of(frame: pd.DataFrame) -> np.ndarray:
    return frame["collapsed"].fillna(False).astype(bool).to_numpy() if "collapsed" in frame else np.zeros(len(frame), bool)


def _signed(v: float) -> str:
    return "nan" if pd.isna(v) else f"{v:+,.0f}" if abs(v) >= 1000 else f"{v:+.3g}"


def fig_metric_vs_size(df: pd.DataFrame, metric: str, path: Path) -> Path | None:
    """Figure 1: metric vs model size per family, one line per (native) setting; a log axis where the
    values span more than 10×, collapsed runs in a band at the top with their value."""
    plain = native_runs(df).dropna(subset=[metric])
    if plain.empty:
        return None
    plt = pyplot()
    fams = sorted(plain["family"].unique())
    settings = sorted(plain["setting"].unique())
    style = dict(zip(settings, styles(len(settings))))
    fig, axes = plt.subplots(1, len(fams), figsize=(4.8 * len(fams), 4.0), squeeze=False)
    handles: dict[str, object] = {}
    for ax, fam in zip(axes[0], fams):
        sub = plain[plain["family"] == fam]
        axis = ValueAxis(sub[metric], _collapsed_of(sub), unbounded=not higher_is_better(metric))
        for setting, g in sub.groupby("setting"):
            g = g.sort_values("size_b")
            color, marker = style[setting]
            nonuniform = "transform_p" in g and (g["transform_p"].fillna(1.0) != 1).any()
            (line,) = ax.plot(g["size_b"], axis.pos(g[metric], _collapsed_of(g)), marker=marker, color=color, ms=4, lw=1.2,
                              label=setting, linestyle="--" if nonuniform else "-")
            handles.setdefault(setting, line)
        ring = axis.mark(ax, sub["size_b"], sub[metric], _collapsed_of(sub))
        if ring is not None:
            handles.setdefault(ring.get_label(), ring)
        axis.apply(ax, "y")
        ax.set_xscale("log")
        ax.set_xlabel("parameters (B)")
        ax.set_title(fam)
        ax.set_ylabel(metric + (" (log scale)" if axis.log else ""))
        ax.grid(alpha=0.3)
    last = axes[0][-1]
    last.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6.5, frameon=False,
                ncol=1 + len(handles) // 25)
    return save_figure(fig, path, f"{metric} vs model size (Figure 1)")


def fig_alpha_vs_delta(df: pd.DataFrame, path: Path) -> Path | None:
    """Figure 3: scale α against perturbation intensity ‖Δ‖₂ (mean over layers), per run."""
    need = {"weight_alpha_mean", "weight_delta_l2_mean"}
    if not need <= set(df.columns):
        return None
    sub = df.dropna(subset=list(need))
    sub = sub[sub.get("perturbation", "none") == "none"]
    if "transform_p" in sub:  # α of a non-uniform quantizer lives in the transformed domain
        sub = sub[sub["transform_p"] == 1.0]
    if sub.empty:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    settings = sorted(sub["setting"].unique())
    for (setting, g), (color, marker) in zip(sub.groupby("setting"), styles(len(settings))):
        ax.scatter(g["weight_alpha_mean"], g["weight_delta_l2_mean"], label=setting, s=22, color=color, marker=marker)
    ax.set_xlabel("scale α (mean over layers)")
    ax.set_ylabel("‖Δ‖₂ (mean over layers)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    legend_outside(ax, fontsize=6.5)
    return save_figure(fig, path, "α vs perturbation intensity (Figure 3)", fontsize=10)


def _uniform_panel(ax, table: pd.DataFrame, m: str, labels: list[str], cu: np.ndarray, cf: np.ndarray, first: bool) -> bool:
    """One metric's panel of :func:`fig_uniform_vs_nonuniform`; whether it ringed a collapsed run."""
    from matplotlib.transforms import blended_transform_factory

    u, f = table[f"{m} INT"].to_numpy(dtype=float), table[f"{m} format"].to_numpy(dtype=float)
    lo = hi = None
    if f"{m} ratio lo" in table:
        lo, hi = u * table[f"{m} ratio lo"].to_numpy(dtype=float), u * table[f"{m} ratio hi"].to_numpy(dtype=float)
    elif f"{m} Δ lo" in table:
        lo, hi = u + table[f"{m} Δ lo"].to_numpy(dtype=float), u + table[f"{m} Δ hi"].to_numpy(dtype=float)
    extent = [] if lo is None else [x for a, b, c in zip(lo, hi, cf) if not c for x in (a, b)]
    axis = ValueAxis(np.concatenate([u, f]), np.concatenate([cu, cf]), unbounded=not higher_is_better(m), extent=extent)
    y = row_axis(ax, labels)
    if not first:
        ax.tick_params(labelleft=False)
    pu, pf = axis.pos(u, cu), axis.pos(f, cf)
    better = (f > u) if higher_is_better(m) else (f < u)
    for yi, a, b, good, same in zip(y, pu, pf, better, f == u):
        ax.plot([a, b], [yi, yi], color="0.6" if same else "tab:green" if good else "tab:red", lw=2, alpha=0.55, zorder=2)
    ax.scatter(pu, y, marker="o", color="0.4", s=24, zorder=3)
    ax.scatter(pf, y, marker="D", color="tab:blue", s=22, zorder=4)
    if lo is not None:
        ok = ~np.isnan(lo) & ~cf
        lo_c, hi_c = axis.clip(lo), axis.clip(hi)
        ax.errorbar((lo_c[ok] + hi_c[ok]) / 2, y[ok] - 0.22, xerr=(hi_c[ok] - lo_c[ok]) / 2, fmt="none", ecolor="black",
                    capsize=2, lw=0.8, zorder=3)
    rings = [axis.mark(ax, y, u, cu, axis="x"), axis.mark(ax, y, f, cf, axis="x")]
    axis.apply(ax, "x")
    for sep in [i for i in range(1, len(table)) if table["model"].iloc[i] != table["model"].iloc[i - 1]]:
        ax.axhline(y[sep] + 0.5, color="0.75", lw=0.8)
    right = blended_transform_factory(ax.transAxes, ax.transData)
    ax.text(1.02, len(table) - 0.45, "Δ", transform=right, fontsize=7, ha="left", va="bottom", weight="bold")
    d = table[f"{m} Δ"].to_numpy(dtype=float)
    zero = (table[f"{m} Δ lo"] <= 0) & (table[f"{m} Δ hi"] >= 0) if f"{m} Δ lo" in table else pd.Series(False, index=table.index)
    for yi, dv, z in zip(y, d, zero):
        ax.text(1.02, yi, _signed(dv) + (" ≈0" if z else ""), transform=right, fontsize=6.5, ha="left", va="center")
    ax.set_xlabel(m + (" (log scale)" if axis.log else ""))
    ax.set_title(m, fontsize=9)
    return any(r is not None for r in rings)


def _uniform_legend(ringed: bool) -> list:
    """The legend handles of :func:`fig_uniform_vs_nonuniform`."""
    from matplotlib.lines import Line2D

    keys = [Line2D([], [], marker="o", color="0.4", ls="", label="INT at the same bits"),
            Line2D([], [], marker="D", color="tab:blue", ls="", label="non-uniform format"),
            Line2D([], [], color="black", lw=0.8, label="paired interval of the format (against INT)"),
            Line2D([], [], color="tab:green", lw=2, alpha=0.55, label="format better"),
            Line2D([], [], color="tab:red", lw=2, alpha=0.55, label="format worse")]
    if ringed:
        keys.append(Line2D([], [], marker="o", ls="", markersize=9, markerfacecolor="none", markeredgecolor=COLLAPSED_COLOR,
                           label=RING_LABEL))
    return keys


def fig_uniform_vs_nonuniform(table: pd.DataFrame, path: Path) -> Path | None:
    """Each format against INT at the same bits, one row per (model, format) and one panel per metric:
    INT (grey circle) and the format (blue diamond) joined by a line, green where the format is better;
    its paired interval under it (a perplexity: INT × the interval of the ratio format / INT); Δ =
    format − INT written right of the panel. Perplexity on a log axis where it spans more than 10×; a
    collapsed run in a band at the end of the axis with its value."""
    if table.empty:
        return None
    metrics = [c[: -len(" INT")] for c in table.columns if c.endswith(" INT")]
    # nothing to see in a metric that is the same everywhere (e.g. Lambada accuracy 0 on tiny models)
    metrics = [m for m in metrics if m != "lambada_nll" and pd.concat([table[f"{m} INT"], table[f"{m} format"]]).nunique() > 1]
    if not metrics:
        return None
    plt = pyplot()
    cu = table["INT collapsed"].fillna(False).astype(bool).to_numpy() if "INT collapsed" in table else np.zeros(len(table), bool)
    cf = table["format collapsed"].fillna(False).astype(bool).to_numpy() if "format collapsed" in table else np.zeros(len(table), bool)
    note = ["" if not (a or b) else " (both collapsed)" if a and b else " (INT collapsed)" if a else " (collapsed)" for a, b in zip(cu, cf)]
    labels = [f"{r['model']} · {r['setting']} vs {r['INT']}{n}" for (_, r), n in zip(table.iterrows(), note)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 + 4.4 * len(metrics), rows_height(len(table), 0.32, 1.4)),
                             squeeze=False, sharey=True)
    ringed = False
    for j, (ax, m) in enumerate(zip(axes[0], metrics)):
        ringed = _uniform_panel(ax, table, m, labels, cu, cf, first=not j) or ringed
    keys = _uniform_legend(ringed)
    fig.legend(handles=keys, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=7, frameon=False)
    return save_figure(fig, path, "Number formats vs INT at the same bits (Δ = format − INT; ≈0: the paired interval covers 0)",
                       fontsize=10)


def perturbation_summary(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Figure 4's numbers: per (model, base, perturbation): mean, std, min, max over seeds, and whether
    a seed collapsed."""
    if "perturbation" not in df:
        return pd.DataFrame()
    pert = df[df["perturbation"] != "none"].dropna(subset=[metric])
    if pert.empty:
        return pd.DataFrame()
    g = pert.groupby(["model", "base", "perturbation"])[metric]
    out = g.agg(["mean", "std", "min", "max", "count"]).reset_index().rename(columns={"count": "seeds"})
    if "collapsed" in pert:
        out = out.merge(pert.groupby(["model", "base", "perturbation"])["collapsed"].any().reset_index(), on=["model", "base", "perturbation"])
    if "run_id" in df:  # the seeds' runs beside the native quantization they imitate
        out["compare"] = [_link(df[(df["model"] == r["model"]) & (df["setting"] == r["base"])],
                                pert[(pert["model"] == r["model"]) & (pert["base"] == r["base"]) & (pert["perturbation"] == r["perturbation"])])
                          for _, r in out.iterrows()]
    return out


def fig_perturbations(df: pd.DataFrame, metric: str, path: Path) -> Path | None:
    """Figure 4: metric under each artificial perturbation (mean ± std over seeds), beside the
    unperturbed model and the native quantization it imitates: one row each, the value written right
    of the panel; log axis and collapsed band as every figure."""
    summ = perturbation_summary(df, metric)
    if summ.empty:
        return None
    plt = pyplot()
    from matplotlib.transforms import blended_transform_factory

    models = list(summ["model"].unique())
    panels = []
    for model in models:
        s = summ[summ["model"] == model]
        labels, vals, errs, colors, coll = [], [], [], [], []
        base_run = df[(df["model"] == model) & df["reference"]]
        if not base_run.empty:
            labels.append(f"{base_run['setting'].iloc[0]} (full precision)")
            vals.append(float(base_run[metric].iloc[0]))
            errs.append(0.0)
            colors.append("0.5")
            coll.append(False)
        for base in s["base"].unique():
            native = df[(df["model"] == model) & (df["setting"] == base)]
            if not native.empty:
                labels.append(f"{base} (native)")
                vals.append(float(native[metric].iloc[0]))
                errs.append(0.0)
                colors.append("black")
                coll.append(bool(_collapsed_of(native)[0]))
            for _, r in s[s["base"] == base].iterrows():
                labels.append(f"{base}+{r['perturbation']} ({int(r['seeds'])} seed{'s' if r['seeds'] > 1 else ''})")
                vals.append(r["mean"])
                errs.append(0.0 if pd.isna(r["std"]) else r["std"])
                colors.append("tab:blue")
                coll.append(bool(r.get("collapsed", False)))
        panels.append((model, labels, np.asarray(vals, float), np.asarray(errs, float), colors, np.asarray(coll, bool)))
    n = max(len(p[1]) for p in panels)
    fig, axes = plt.subplots(1, len(models), figsize=(6.8 * len(models), rows_height(n, 0.34, 1.4)), squeeze=False)
    for ax, (model, labels, vals, errs, colors, coll) in zip(axes[0], panels):
        ok = ~coll
        axis = ValueAxis(vals, coll, unbounded=not higher_is_better(metric), extent=list((vals - errs)[ok]) + list((vals + errs)[ok]))
        y = row_axis(ax, labels)
        pos = axis.pos(vals, coll)
        ax.errorbar(pos[ok], y[ok], xerr=errs[ok], fmt="none", ecolor="black", capsize=3, lw=0.8, zorder=2)
        ax.scatter(pos, y, color=colors, s=30, zorder=3)
        axis.mark(ax, y, vals, coll, axis="x")
        axis.apply(ax, "x")
        right = blended_transform_factory(ax.transAxes, ax.transData)
        for yi, v, e in zip(y, vals, errs):
            ax.text(1.02, yi, fmt_value(v) + (f" ± {e:.2g}" if e else ""), transform=right, fontsize=6.5, va="center")
        ax.set_xlabel(metric + (" (log scale)" if axis.log else ""))
        ax.set_title(model, fontsize=9)
    return save_figure(fig, path, f"{metric} under artificial perturbations, mean ± std over seeds (Figure 4)", fontsize=10)


def clipping_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Figure 5's numbers: per model and base setting, metrics vs k (k = 0: no clipping)."""
    if "clip_k" not in df:
        return pd.DataFrame()
    clipped = df[(df["clip_k"] > 0) & (df.get("perturbation", "none") == "none")]
    if clipped.empty:
        return pd.DataFrame()
    bases = clipped["base"].unique()
    rows = df[(df["perturbation"] == "none") & ((df["clip_k"] > 0) & df["base"].isin(bases) | df["setting"].isin(bases))].copy()
    ppl_cols = [c for c in ("wikitext2_ppl", "c4_ppl") if c in rows and rows[c].notna().any()]
    if ppl_cols:
        rows["mean_ppl"] = rows[ppl_cols].mean(axis=1)
    cols = ["model", "base", "clip_k"] + [c for c in ("lambada_acc", "mean_ppl", "weight_clipped_fraction", "activation_clipped_fraction",
                                                      "collapsed") if c in rows]
    if "run_id" in rows:  # every k of one (model, base) side by side
        rows["compare"] = rows.groupby(["model", "base"])["run_id"].transform(lambda ids: _link(rows.loc[ids.index]))
        cols.append("compare")
    return rows[cols].sort_values(["model", "base", "clip_k"]).reset_index(drop=True)


def fig_clipping(df: pd.DataFrame, path: Path) -> Path | None:
    """Figure 5: clipping at k·σ, k ∈ {3, 5, 10}: Lambada and mean WikiText-2/C4 perplexity (log where
    it spans more than 10×, collapsed runs in a band with their value)."""
    summ = clipping_summary(df)
    if summ.empty:
        return None
    metrics = [m for m in ("lambada_acc", "mean_ppl") if m in summ and summ[m].notna().any()]
    plt = pyplot()
    ks = sorted(summ["clip_k"].unique())
    where = {k: i for i, k in enumerate(ks)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    pairs = list(summ.groupby(["model", "base"]).groups)
    style = dict(zip(pairs, styles(len(pairs))))
    for ax, m in zip(axes[0], metrics):
        t = summ.dropna(subset=[m])
        axis = ValueAxis(t[m], _collapsed_of(t), unbounded=not higher_is_better(m))
        for (model, base), g in t.groupby(["model", "base"]):
            g = g.sort_values("clip_k")
            color, marker = style[(model, base)]
            ax.plot(g["clip_k"].map(where), axis.pos(g[m], _collapsed_of(g)), marker=marker, color=color, label=f"{model} {base}")
        axis.mark(ax, t["clip_k"].map(where), t[m], _collapsed_of(t))  # (a ring carries its label into the legend)
        axis.apply(ax, "y")
        ax.set_xticks(range(len(ks)), ["none" if k == 0 else f"{k:g}σ" for k in ks])
        ax.set_xlabel("clipping threshold")
        ax.set_ylabel(m + (" (log scale)" if axis.log else ""))
        ax.grid(alpha=0.3)
    legend_outside(axes[0][-1], sources=list(axes[0][:-1]))
    return save_figure(fig, path, "Clipping outliers (Figure 5)")


def write_report(df: pd.DataFrame, out_dir: str | Path, report: "Report | None" = None, examples: pd.DataFrame | None = None,
                 spec: "BootstrapSpec | None" = None) -> list[Path]:
    """All tables (CSV + Markdown) and figures (PNG) the runs allow; returns the files written. Each
    table and figure is a part of ``report`` (:class:`~quantlens.analysis.report.Report`): one that
    fails is recorded there and the others are still written."""
    from quantlens.analysis.report import Report, safe_name

    report = report or Report(Path(out_dir))
    df = report.compute("tidy", lambda: tidy(df), pd.DataFrame())  # (idempotent: a tidy frame passes through)
    if df.empty:
        return report.files
    report.table("results", lambda: results_table(df))
    uvn = report.table("uniform_vs_nonuniform", lambda: uniform_vs_nonuniform(df, examples, spec), md=False)
    if not uvn.empty:
        report.file("uniform_vs_nonuniform.md", lambda path: path.write_text(to_markdown(interval_markdown(uvn))))
    report.table("clipping", lambda: clipping_summary(df))
    metrics = metrics_present(df)
    for m in metrics:
        report.table(f"perturbations_{m}", lambda m=m: perturbation_summary(df, m))
    plotted = [m for m in metrics if m != "lambada_nll"]
    for m in plotted:
        report.figure(f"fig1_{m}_vs_size", lambda path, m=m: fig_metric_vs_size(df, m, path))
    report.figure("fig3_alpha_vs_delta", lambda path: fig_alpha_vs_delta(df, path))
    for m in plotted:
        report.figure(f"fig4_perturbations_{m}", lambda path, m=m: fig_perturbations(df, m, path))
    report.figure("fig5_clipping", lambda path: fig_clipping(df, path))
    report.figure("fig_uniform_vs_nonuniform", lambda path: fig_uniform_vs_nonuniform(uvn, path))
    from quantlens.analysis import format_report
    from quantlens.analysis.calibrated_report import calibrated_lens, calibrated_markdown, fig_calibrated_lens

    format_report.write(df, report, plotted)
    lens = report.table("calibrated_lens", lambda: calibrated_lens(df), md=False)
    if not lens.empty:
        report.file("calibrated_lens.md", lambda path: path.write_text(calibrated_markdown(lens)))
        for model in lens["model"].unique():
            report.figure(f"fig_calibrated_lens_{safe_name(model)}", lambda path, model=model: fig_calibrated_lens(lens, model, path))
    return report.files
