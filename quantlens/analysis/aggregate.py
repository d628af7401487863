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

from quantlens.analysis.links import md_link, runs_link

if TYPE_CHECKING:
    from quantlens.analysis.paired import BootstrapSpec
    from quantlens.analysis.report import Report

NUMERIC = ("size_b", "w_bits", "a_bits", "kv_bits", "w_group_size", "transform_p", "clip_k", "seed", "seqlen")
QUALITY = ("lambada_acc", "wikitext2_ppl", "c4_ppl", "fineweb_ppl", "qerror_ppl", "lambada_nll")


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Strip the ``params.``/``metrics.``/``tags.`` prefixes, type the numbers, sort by model size."""
    if df.empty:
        return df
    out = df.rename(columns=lambda c: c.split(".", 1)[1] if c.startswith(("params.", "metrics.")) else c)
    out = out.rename(columns=lambda c: "tag_" + c[5:] if c.startswith("tags.") else c)
    for c in NUMERIC:
        if c in out:
            out[c] = pd.to_numeric(out[c], errors="coerce")
    if "base" not in out and "setting" in out:
        out["base"] = out["setting"]
    out["reference"] = reference_mask(out)
    if "end_time" in out:  # several sweeps may hold the same (model, setting): keep the newest
        out = out.sort_values("end_time").drop_duplicates(["model", "setting"], keep="last")
    return out.sort_values(["family", "size_b", "model", "setting"]).reset_index(drop=True)


def reference_mask(df: pd.DataFrame) -> pd.Series:
    """Which runs are the full-precision model: the ``reference`` param each run logs
    (:attr:`quantlens.quantize.settings.Setting.is_reference`). Runs logged before it existed: nothing
    quantized — weights, activations *and KV cache* at 16 bits — and nothing perturbed."""
    logged = df["reference"].astype(str).str.lower().map({"true": True, "false": False}) if "reference" in df else pd.Series(None, index=df.index, dtype=object)
    bits = lambda c: pd.to_numeric(df[c], errors="coerce").fillna(16) if c in df else pd.Series(16, index=df.index)  # noqa: E731
    pert = df["perturbation"].fillna("none") if "perturbation" in df else pd.Series("none", index=df.index)
    derived = (bits("w_bits") == 16) & (bits("a_bits") == 16) & (bits("kv_bits") == 16) & (pert == "none")
    return logged.where(logged.notna(), derived).astype(bool)


def reference_settings(df: pd.DataFrame) -> dict[str, str]:
    """model → the setting of its reference run (tidy frame): ``W16A16`` where several names of the
    full-precision model ran (runs of older versions), else the first by name."""
    out = {}
    for model, g in df[df["reference"]].groupby("model"):
        names = sorted(g["setting"])
        out[model] = "W16A16" if "W16A16" in names else names[0]
    return out


def metrics_present(df: pd.DataFrame) -> list[str]:
    return [m for m in QUALITY if m in df and df[m].notna().any()]


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    """Native quantization runs: no artificial perturbation, no clipping."""
    return df[(df.get("perturbation", "none") == "none") & (df.get("clip_k", 0).fillna(0) == 0)]


def to_markdown(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [floatfmt.format(v) if isinstance(v, float) else md_link(v) if _is_url(v) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _is_url(v: object) -> bool:
    return isinstance(v, str) and v.startswith(("http://", "https://"))


def _link(*frames: pd.DataFrame | pd.Series) -> str | None:
    """The MLflow compare link of these runs (rows of the tidy frame), None without run ids."""
    rows = pd.concat([f.to_frame().T if isinstance(f, pd.Series) else f for f in frames])
    return runs_link(rows)


# --- Tables ---------------------------------------------------------------------------------------
def results_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every run: model × setting with its quality metrics and perturbation statistics."""
    cols = ["model", "family", "size_b", "setting"] + metrics_present(df)
    cols += [c for c in ("weight_rel_error_mean", "activation_rel_error_mean", "weight_clipped_fraction") if c in df]
    return df[cols].copy()


def run_families(df: pd.DataFrame) -> pd.Series:
    """The format family of each run (``format`` param: int, cuberoot, power, nf, fp, mxfp, mxint, nvfp,
    km, mixed, none); runs logged before formats existed: int, or the power transform's twin."""
    p = pd.to_numeric(df["transform_p"], errors="coerce").fillna(1.0) if "transform_p" in df else pd.Series(1.0, index=df.index)
    derived = p.map(lambda v: "int" if v == 1.0 else "cuberoot" if abs(v - 1 / 3) < 1e-6 else "power")
    logged = df["format"] if "format" in df else pd.Series(None, index=df.index, dtype=object)
    return logged.where(logged.notna() & (logged != "none"), derived)


_MATCH = ("w_granularity", "a_granularity", "kv_granularity", "w_group_size")


def _config(row: pd.Series) -> str:
    kv = row.get("kv_bits", 16)
    kv = 16 if pd.isna(kv) else int(kv)
    return f"W{int(row['w_bits'])}A{int(row['a_bits'])}" + (f"KV{kv}" if kv < 16 else "")


def uniform_vs_nonuniform(df: pd.DataFrame, examples: pd.DataFrame | None = None, spec: "BootstrapSpec | None" = None) -> pd.DataFrame:
    """The paper's table across the field's formats: per model and bit widths, every non-uniform
    family that was run (cube root, NF, FP, MX, NVFP4, codebook) beside the INT run at the same bits
    (the one with the same granularity where there is one, else the per-channel default), with Δ =
    format − INT and a compare link. With the runs' per-example tables (``examples``), each Δ of a
    dataset metric gets its paired bootstrap interval over the examples both runs have (``<metric> Δ lo``
    / ``hi``; accuracy: McNemar's exact ``<metric> p`` on the examples that flipped between the two)."""
    plain = _plain(df)
    if plain.empty or "w_bits" not in plain:
        return pd.DataFrame()
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
        nll_stat = "delta_example_nll" if dataset == "lambada" else "delta_nll"
        for metric, stat in ((f"{dataset}_ppl", "delta_ppl"), (f"{dataset}_nll", nll_stat)):
            if f"{metric} Δ" in out:
                out[f"{metric} Δ lo"], out[f"{metric} Δ hi"] = get(f"{stat}_lo"), get(f"{stat}_hi")
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
    return out


# --- Figures --------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: str | None = None, fontsize: float | None = None) -> Path:
    """How every report figure ends: a title, a tight layout, a 120-dpi PNG, the figure closed."""
    if title is not None:
        fig.suptitle(title, **({"fontsize": fontsize} if fontsize else {}))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def fig_metric_vs_size(df: pd.DataFrame, metric: str, path: Path) -> Path | None:
    """Figure 1: metric vs model size per family, one line per (native) setting."""
    plain = _plain(df).dropna(subset=[metric])
    if plain.empty:
        return None
    plt = _plt()
    fams = sorted(plain["family"].unique())
    fig, axes = plt.subplots(1, len(fams), figsize=(4.5 * len(fams), 3.6), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        sub = plain[plain["family"] == fam]
        for setting, g in sub.groupby("setting"):
            g = g.sort_values("size_b")
            ax.plot(g["size_b"], g[metric], marker="o", label=setting, linestyle="--" if (g["transform_p"] != 1).any() else "-")
        ax.set_xscale("log")
        ax.set_xlabel("parameters (B)")
        ax.set_title(fam)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
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
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for setting, g in sub.groupby("setting"):
        ax.scatter(g["weight_alpha_mean"], g["weight_delta_l2_mean"], label=setting, s=22)
    ax.set_xlabel("scale α (mean over layers)")
    ax.set_ylabel("‖Δ‖₂ (mean over layers)")
    ax.set_yscale("log")
    ax.set_title("α vs perturbation intensity (Figure 3)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fig_uniform_vs_nonuniform(table: pd.DataFrame, path: Path) -> Path | None:
    """Each format against INT at the same bits, per model and configuration (one panel per metric):
    paired bars with the difference written above each pair."""
    if table.empty:
        return None
    metrics = [c[: -len(" INT")] for c in table.columns if c.endswith(" INT")]
    # nothing to see in a metric that is the same everywhere (e.g. Lambada accuracy 0 on tiny models)
    metrics = [m for m in metrics if m != "lambada_nll" and pd.concat([table[f"{m} INT"], table[f"{m} format"]]).nunique() > 1]
    if not metrics:
        return None
    plt = _plt()
    labels = [f"{r['model']}\n{r['setting']}" for _, r in table.iterrows()]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6, 0.9 * len(table) + 2), 3.4 * len(metrics)), squeeze=False)
    x = range(len(table))
    for ax, m in zip(axes[:, 0], metrics):
        u, n = table[f"{m} INT"].to_numpy(dtype=float), table[f"{m} format"].to_numpy(dtype=float)
        ax.bar([i - 0.2 for i in x], u, width=0.4, label="INT at the same bits", color="tab:grey")
        ax.bar([i + 0.2 for i in x], n, width=0.4, label="non-uniform format", color="tab:blue")
        if f"{m} Δ lo" in table:  # the paired interval of Δ, drawn around the format's bar
            lo, hi = table[f"{m} Δ lo"].to_numpy(dtype=float), table[f"{m} Δ hi"].to_numpy(dtype=float)
            ok = ~np.isnan(lo)
            ax.errorbar([i + 0.2 for i in x if ok[i]], n[ok], yerr=[(n - (u + lo))[ok], ((u + hi) - n)[ok]], fmt="none",
                        ecolor="black", capsize=2, lw=0.8)
        for i, (a, b) in enumerate(zip(u, n)):
            ax.annotate(f"{b - a:+.3g}", (i, max(a, b)), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(list(x), labels, fontsize=6, rotation=45, ha="right")
        ax.set_ylabel(m)
        if m.endswith(("_ppl", "_nll")):
            lo = min(u.min(), n.min())
            ax.set_ylim(lo * 0.98, max(u.max(), n.max()) * 1.02)
        ax.legend(fontsize=7)
    return save_figure(fig, path, "Non-uniform formats vs INT at the same bits (Δ = format − INT; bars: paired interval)", fontsize=10)


def perturbation_summary(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Figure 4's numbers: per (model, base, perturbation): mean, std, min, max over seeds."""
    if "perturbation" not in df:
        return pd.DataFrame()
    pert = df[df["perturbation"] != "none"].dropna(subset=[metric])
    if pert.empty:
        return pd.DataFrame()
    g = pert.groupby(["model", "base", "perturbation"])[metric]
    out = g.agg(["mean", "std", "min", "max", "count"]).reset_index().rename(columns={"count": "seeds"})
    if "run_id" in df:  # the seeds' runs beside the native quantization they imitate
        out["compare"] = [_link(df[(df["model"] == r["model"]) & (df["setting"] == r["base"])],
                                pert[(pert["model"] == r["model"]) & (pert["base"] == r["base"]) & (pert["perturbation"] == r["perturbation"])])
                          for _, r in out.iterrows()]
    return out


def fig_perturbations(df: pd.DataFrame, metric: str, path: Path) -> Path | None:
    """Figure 4: metric under each artificial perturbation (mean ± spread over seeds), beside the
    unperturbed model and the native quantization it imitates."""
    summ = perturbation_summary(df, metric)
    if summ.empty:
        return None
    plt = _plt()
    models = list(summ["model"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(max(5, 1.2 * summ.shape[0] / len(models) + 3) * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        s = summ[summ["model"] == model]
        labels, vals, errs, colors = [], [], [], []
        base_run = df[(df["model"] == model) & df["reference"]]
        if not base_run.empty:
            labels.append("W16A16")
            vals.append(float(base_run[metric].iloc[0]))
            errs.append(0.0)
            colors.append("grey")
        for base in s["base"].unique():
            native = df[(df["model"] == model) & (df["setting"] == base)]
            if not native.empty:
                labels.append(f"{base} (native)")
                vals.append(float(native[metric].iloc[0]))
                errs.append(0.0)
                colors.append("black")
            for _, r in s[s["base"] == base].iterrows():
                labels.append(f"{base}+{r['perturbation']}")
                vals.append(r["mean"])
                errs.append(0.0 if pd.isna(r["std"]) else r["std"])
                colors.append("tab:blue")
        ax.bar(range(len(vals)), vals, yerr=errs, color=colors, capsize=3)
        ax.set_xticks(range(len(vals)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(metric)
        ax.set_title(model)
        if metric.endswith("_ppl"):
            lo = min(vals)
            ax.set_ylim(lo * 0.98, max(v + e for v, e in zip(vals, errs)) * 1.01)
    return save_figure(fig, path, f"{metric} under artificial perturbations, mean ± std over seeds (Figure 4)")


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
    cols = ["model", "base", "clip_k"] + [c for c in ("lambada_acc", "mean_ppl", "weight_clipped_fraction", "activation_clipped_fraction") if c in rows]
    if "run_id" in rows:  # every k of one (model, base) side by side
        rows["compare"] = rows.groupby(["model", "base"])["run_id"].transform(lambda ids: _link(rows.loc[ids.index]))
        cols.append("compare")
    return rows[cols].sort_values(["model", "base", "clip_k"]).reset_index(drop=True)


def fig_clipping(df: pd.DataFrame, path: Path) -> Path | None:
    """Figure 5: clipping at k·σ, k ∈ {3, 5, 10}: Lambada and mean WikiText-2/C4 perplexity."""
    summ = clipping_summary(df)
    if summ.empty:
        return None
    metrics = [m for m in ("lambada_acc", "mean_ppl") if m in summ and summ[m].notna().any()]
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for (model, base), g in summ.groupby(["model", "base"]):
            g = g.sort_values("clip_k")
            x = ["none" if k == 0 else f"{k:g}σ" for k in g["clip_k"]]
            ax.plot(x, g[m], marker="o", label=f"{model} {base}")
        ax.set_xlabel("clipping threshold")
        ax.set_ylabel(m)
        if m == "mean_ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, "Clipping outliers (Figure 5)")


def write_report(df: pd.DataFrame, out_dir: str | Path, report: "Report | None" = None, examples: pd.DataFrame | None = None,
                 spec: "BootstrapSpec | None" = None) -> list[Path]:
    """All tables (CSV + Markdown) and figures (PNG) the runs allow; returns the files written. Each
    table and figure is a part of ``report`` (:class:`~quantlens.analysis.report.Report`): one that
    fails is recorded there and the others are still written."""
    from quantlens.analysis.report import Report

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
    from quantlens.analysis.calibrated_report import calibrated_lens, calibrated_markdown

    format_report.write(df, report, plotted)
    lens = report.table("calibrated_lens", lambda: calibrated_lens(df), md=False)
    if not lens.empty:
        report.file("calibrated_lens.md", lambda path: path.write_text(calibrated_markdown(lens)))
    return report.files
