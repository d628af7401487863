"""The report's comparison of number formats: metric against bits per family, and the first paper's
lens per format (framework-free: pandas + matplotlib).

- ``formats_vs_bits``: per model, every family that was run (INT, cube root, NF, FP, MX, NVFP4,
  codebook) at each weight width — weight-only runs (activations at 16 bits) and runs that quantize
  activations at the weights' width (W4A4, W8A8) as two regimes, with a ``collapsed`` column; number
  formats only (a method's runs — GPTQ, AWQ, a released checkpoint — are in ``calibrated_lens``); the
  figure ``fig_formats_<metric>`` draws one line per family and regime, the full-precision model as a
  dotted line, a log axis where the values span more than 10× and collapsed runs in a band at the top.
- ``format_lens``: the mean relative perturbation |Δ|/|x| by decile of |x| (d01 = the smallest
  10 % of the values), of the weights and, from the sampled forwards, of the activations, per run
  (:mod:`quantlens.quantize.lens`); ``fig_format_lens_<model>`` draws one line per setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from quantlens.analysis.runs import method_runs, metrics_present, native_runs, run_families
from quantlens.analysis.plotting import ValueAxis, higher_is_better, legend_outside, pyplot, save_figure, styles
from quantlens.analysis.rendering import safe_name
from quantlens.quantize.ggml import GGML_TYPES

if TYPE_CHECKING:
    from quantlens.analysis.report import Report

DECILES = [f"d{i:02d}" for i in range(1, 11)]


def formats_vs_bits(df: pd.DataFrame) -> pd.DataFrame:
    """model, family, regime (``weights`` | ``weights+activations``), bits, setting, the metrics and
    ``collapsed``; one run per point (the shortest setting name: the format's default granularity), KV
    settings and methods' runs left out."""
    plain = native_runs(df)
    if plain.empty or "w_bits" not in plain:
        return pd.DataFrame()
    kv = plain["kv_bits"].fillna(16) if "kv_bits" in plain else 16
    sub = plain[(~plain["reference"]) & (kv == 16) & (plain["w_bits"] < 16) & ~method_runs(plain)]
    sub = sub.assign(**_at_stored_bits(sub, run_families(sub)))
    a = sub["a_bits"].fillna(16)
    sub = sub.assign(regime=a.where(a == 16, -1).map({16: "weights", -1: "weights+activations"}))
    sub = sub[(a == 16) | (a == sub["w_bits"])]
    if sub.empty:
        return pd.DataFrame()
    sub = sub.assign(_len=sub["setting"].str.len()).sort_values(["_len", "setting"])
    sub = sub.drop_duplicates(["model", "family", "regime", "w_bits"]).rename(columns={"w_bits": "bits"})
    cols = ["model", "family", "regime", "bits", "setting"] + metrics_present(sub) + (["collapsed"] if "collapsed" in sub else [])
    return sub[cols].sort_values(["model", "regime", "family", "bits"]).reset_index(drop=True)


def _at_stored_bits(sub: pd.DataFrame, families: pd.Series) -> dict[str, pd.Series]:
    """Each run at the bits per weight it measured on the model (``weight_bits_per_weight``: block
    scales, a k-quant's fallback rows and a mixture's higher types counted); runs logged before it:
    llama.cpp's types at their type's (``w_format`` in :data:`GGML_TYPES`: Q4_0 4.5 … Q8_0 8.5), the
    others at ``w_bits``. llama.cpp's types are four lines: q*_0, q*_1, the k-quants and the mixtures."""
    if (not families.isin(["ggml", "iq4nl"]).any() or "w_format" not in sub) and "weight_bits_per_weight" not in sub:
        return {"family": families}
    if "w_format" not in sub:
        sub = sub.assign(w_format="")
    ggml = families == "ggml"
    variant = sub["w_format"].astype(str).str.extract(r"(_[01k](?:_m)?)$", expand=False).fillna("")
    bpw = sub["w_format"].map(lambda f: GGML_TYPES[f].bits_per_weight if f in GGML_TYPES else None)
    at_bpw = families.isin(["ggml", "iq4nl"])
    bits = sub["w_bits"].where(~at_bpw, bpw)
    if "weight_bits_per_weight" in sub:  # every family where its runs measured it (int4 in groups of 32 is 5.0)
        bits = sub["weight_bits_per_weight"].round(3).where(sub["weight_bits_per_weight"].notna(), bits)
    return {"family": families.where(~ggml, "llama.cpp q" + variant), "w_bits": bits}


def fig_formats_vs_bits(table: pd.DataFrame, df: pd.DataFrame, metric: str, path: Path) -> Path | None:
    """One panel per model: ``metric`` against bits, one line per family (dashed: activations too), a
    colour per family shared by every panel and one legend; log where the values span more than 10×,
    collapsed runs in a band at the top with their value."""
    if table.empty or metric not in table or table[metric].notna().sum() == 0:
        return None
    plt = pyplot()
    models = list(dict.fromkeys(table["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.8), squeeze=False)
    ref = df[df["reference"]] if "reference" in df else df.iloc[0:0]
    families = sorted(table["family"].unique())
    style = dict(zip(families, styles(len(families))))
    handles: dict[str, object] = {}
    for ax, model in zip(axes[0], models):
        t = table[table["model"] == model].dropna(subset=[metric])
        coll = t["collapsed"].fillna(False).astype(bool).to_numpy() if "collapsed" in t else np.zeros(len(t), bool)
        r = ref[ref["model"] == model][metric].dropna() if metric in ref else pd.Series(dtype=float)
        axis = ValueAxis(t[metric], coll, unbounded=not higher_is_better(metric), extent=list(r[:1]))
        t = t.assign(_pos=axis.pos(t[metric], coll))
        for (family, regime), g in t.groupby(["family", "regime"]):
            g = g.sort_values("bits")
            color, marker = style[family]
            label = f"{family}" + ("" if regime == "weights" else " (W=A)")
            (line,) = ax.plot(g["bits"], g["_pos"], marker=marker, color=color, linestyle="-" if regime == "weights" else "--", label=label)
            handles.setdefault(label, line)
        if not r.empty:
            handles.setdefault("16-bit", ax.axhline(float(r.iloc[0]), color="grey", linestyle=":", label="16-bit"))
        ring = axis.mark(ax, t["bits"], t[metric], coll)
        if ring is not None:
            handles.setdefault(ring.get_label(), ring)
        axis.apply(ax, "y")
        ticks = sorted(t["bits"].unique())
        if all(float(b).is_integer() for b in ticks):  # nominal widths: a tick each; stored bits per weight: a plain axis
            ax.set_xticks(ticks)
        ax.set_xlabel("bits per weight (stored)" if "weight_bits_per_weight" in df else "bits (weights)")
        ax.set_ylabel(metric + (" (log scale)" if axis.log else ""))
        ax.set_title(model)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return save_figure(fig, path, f"{metric} against bits, one line per format family")


def format_lens(df: pd.DataFrame) -> pd.DataFrame:
    """model, setting, family, kind (weight | activation) and the mean |Δ|/|x| per decile of |x|."""
    plain = native_runs(df)
    rows = []
    for kind in ("weight", "activation"):
        cols = [f"{kind}_lens_{d}" for d in DECILES]
        if not set(cols) <= set(plain.columns):
            continue
        sub = plain.dropna(subset=cols)
        sub = sub.assign(family=run_families(sub))
        for _, r in sub.iterrows():
            rows.append({"model": r["model"], "setting": r["setting"], "family": r["family"], "kind": kind,
                         **{d: r[f"{kind}_lens_{d}"] for d in DECILES}})
    return pd.DataFrame(rows)


def fig_format_lens(lens: pd.DataFrame, model: str, path: Path) -> Path | None:
    """The first paper's "small values suffer most", for every grid: |Δ|/|x| by decile of |x|."""
    t = lens[lens["model"] == model]
    if t.empty:
        return None
    plt = pyplot()
    kinds = list(dict.fromkeys(t["kind"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.4 * len(kinds), 4.2), squeeze=False)
    x = list(range(1, 11))
    settings = sorted(t["setting"].unique())
    style = dict(zip(settings, styles(len(settings))))  # one colour and marker per setting, the same in both panels
    for ax, kind in zip(axes[0], kinds):
        for _, r in t[t["kind"] == kind].iterrows():
            color, marker = style[r["setting"]]
            ax.plot(x, [r[d] for d in DECILES], marker=marker, ms=3, color=color, label=f"{r['setting']} ({r['family']})")
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xlabel(f"decile of |x| ({kind}s; 1 = smallest 10 %)")
        ax.set_ylabel("mean |Δ| / |x|")
        ax.set_title(f"{kind}s")
        ax.grid(alpha=0.3)
        legend_outside(ax, fontsize=6)
    return save_figure(fig, path, f"{model}: relative perturbation by magnitude, per format (the first paper's lens)")


def write(df: pd.DataFrame, report: "Report", metrics: list[str]) -> None:
    """The formats parts of the report: ``formats_vs_bits``, ``format_lens`` and their figures."""
    fvb = report.table("formats_vs_bits", lambda: formats_vs_bits(df))
    for m in metrics:
        report.figure(f"fig_formats_{m}", lambda path, m=m: fig_formats_vs_bits(fvb, df, m, path))
    lens = report.table("format_lens", lambda: format_lens(df))
    for model in (lens["model"].unique() if not lens.empty else []):
        report.figure(f"fig_format_lens_{safe_name(model)}", lambda path, model=model: fig_format_lens(lens, model, path))
