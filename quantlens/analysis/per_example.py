"""Per-example analysis of quantization error (arXiv 2506.12044), from stored per-example tables.

Inputs, all long DataFrames (no model is run here):

- ``examples``: model, dataset, setting, example_id, n_tokens, nll — one row per example of each
  run (the ``per_example/<dataset>.parquet`` artifacts);
- ``residual``: model, dataset, example_id, layer, r_norm, z_norm, r_kurtosis — the full-precision
  run's residual-stream statistics (``residual/<dataset>.parquet``);
- ``tokens``: model, dataset, example_id, tokens — the examples' token ids (near-duplicate check);
- ``reference``: model → the setting that is the full-precision model (W16A16).

Computed, per model and dataset:

- error e(x) = NLL(x; setting) − NLL(x; reference), per example, examples aligned by id;
- for every pair of settings: Pearson and Spearman ρ between their error vectors, and the Jaccard
  index of their top-10 % error sets (chance ≈ 0.05);
- the residual predictor: Pearson ρ(S(l), e) per layer for each setting, S(l) the reference
  model's token-mean ‖r(l)‖₂ (and the same with z(l));
- D_large: the top 10 % of examples by error, greedily, skipping any example whose token 5-gram
  Jaccard with an already chosen one exceeds 0.1; D_ctrl: as many examples drawn (seeded) from the
  bottom 50 % by error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pandas as pd

from quantlens.analysis.aggregate import _plt, save_figure, to_markdown

if TYPE_CHECKING:
    from quantlens.analysis.report import Report

TOP_FRACTION = 0.1
DUP_JACCARD = 0.1
NGRAM = 5

PAPER_NOTE = (
    "How these settings differ from the paper's methods: the paper compares GPTQ, AWQ, NormalFloat and "
    "EfficientQAT (3–4 bit, calibrated or trained) on Qwen2.5-7B, Llama3-8B, Mistral-12B and Llama3-70B "
    "(avg ρ = 0.82 across 50 method pairs, 0.93 between variants of one method; top-10 % Jaccard 0.51; "
    "final-layer ρ(S, e) between −0.58 and −0.83). quantlens' settings are calibration-free: round-to-nearest "
    "uniform quantizers, their cube-root non-uniform twins, clipping and artificial noise matched to their "
    "error — variants of one family of methods, so expect correlations closer to the paper's within-method "
    "figure than to its cross-method one. An example here is a perplexity window (or a document of "
    "example_len tokens with `examples: documents`), not necessarily a 512-token FineWeb document."
)


# --- Pure statistics -------------------------------------------------------------------------------
def rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's ρ needs."""
    return pd.Series(x).rank(method="average").to_numpy()


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return float("nan")
    ac, bc = a - a.mean(), b - b.mean()
    den = math.sqrt(float((ac * ac).sum()) * float((bc * bc).sum()))
    return float((ac * bc).sum() / den) if den > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(rank(a), rank(b))


def top_set(ids: np.ndarray, err: np.ndarray, fraction: float = TOP_FRACTION) -> set[str]:
    """The ceil(fraction·N) examples with the largest error (ties broken by id, deterministic)."""
    k = max(1, math.ceil(fraction * len(err)))
    order = np.lexsort((ids, -err))
    return set(ids[order[:k]].tolist())


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else float("nan")


def ngrams(tokens: Iterable[int], n: int = NGRAM) -> set[tuple[int, ...]]:
    t = list(tokens)
    return {tuple(t[i : i + n]) for i in range(len(t) - n + 1)} if len(t) >= n else {tuple(t)}


def select_large(
    ids: np.ndarray, err: np.ndarray, tokens: dict[str, list[int]] | None, fraction: float = TOP_FRACTION,
    dup_jaccard: float = DUP_JACCARD,
) -> list[str]:
    """D_large: walk the examples by decreasing error, keep one unless its 5-gram Jaccard with an
    example already kept exceeds ``dup_jaccard``; stop at ceil(fraction·N) kept (or when exhausted)."""
    k = max(1, math.ceil(fraction * len(err)))
    order = np.lexsort((ids, -err))
    kept: list[str] = []
    kept_grams: list[set] = []
    for i in order:
        eid = str(ids[i])
        if tokens is not None and eid in tokens:
            g = ngrams(tokens[eid])
            if any(jaccard(g, h) > dup_jaccard for h in kept_grams):
                continue
            kept_grams.append(g)
        kept.append(eid)
        if len(kept) == k:
            break
    return kept


def select_control(ids: np.ndarray, err: np.ndarray, n: int, seed: int = 0) -> list[str]:
    """D_ctrl: ``n`` examples sampled without replacement (seeded) from the bottom 50 % by error."""
    order = np.lexsort((ids, err))
    bottom = ids[order[: max(1, len(err) // 2)]]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(bottom), size=min(n, len(bottom)), replace=False)
    return [str(bottom[i]) for i in sorted(pick)]


# --- Analysis ---------------------------------------------------------------------------------------
def errors(examples: pd.DataFrame, reference: dict[str, str]) -> pd.DataFrame:
    """Wide table per (model, dataset): index example_id, one column of e = NLL − NLL_ref per
    non-reference setting. Returned long: model, dataset, setting, example_id, error, nll_ref."""
    out = []
    for (model, dataset), g in examples.groupby(["model", "dataset"], sort=True):
        ref = reference.get(model)
        if ref is None or ref not in set(g["setting"]):
            continue
        wide = g.pivot_table(index="example_id", columns="setting", values="nll", aggfunc="first")
        base = wide[ref]
        for setting in wide.columns:
            if setting == ref:
                continue
            e = (wide[setting] - base).dropna()
            out.append(pd.DataFrame({"model": model, "dataset": dataset, "setting": setting,
                                     "example_id": e.index, "error": e.to_numpy(), "nll_ref": base.loc[e.index].to_numpy()}))
    cols = ["model", "dataset", "setting", "example_id", "error", "nll_ref"]
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)


def error_correlation(err: pd.DataFrame) -> pd.DataFrame:
    """Every unordered pair of settings per (model, dataset): pearson, spearman, jaccard_top10."""
    rows = []
    for (model, dataset), g in err.groupby(["model", "dataset"], sort=True):
        wide = g.pivot_table(index="example_id", columns="setting", values="error", aggfunc="first")
        settings = list(wide.columns)
        for i, a in enumerate(settings):
            for b in settings[i + 1 :]:
                pair = wide[[a, b]].dropna()
                rows.append(pair_stats(model, dataset, a, b, pair.index.to_numpy(), pair[a].to_numpy(), pair[b].to_numpy()))
    cols = ["model", "dataset", "setting_a", "setting_b", "pearson", "spearman", "jaccard_top10", "n_examples"]
    return pd.DataFrame(rows, columns=cols)


def pair_stats(model: str, dataset: str, a: str, b: str, ids: np.ndarray, ea: np.ndarray, eb: np.ndarray) -> dict:
    ids = ids.astype(str)
    return {
        "model": model, "dataset": dataset, "setting_a": a, "setting_b": b,
        "pearson": pearson(ea, eb), "spearman": spearman(ea, eb),
        "jaccard_top10": jaccard(top_set(ids, ea), top_set(ids, eb)), "n_examples": len(ids),
    }


def residual_predictor(err: pd.DataFrame, residual: pd.DataFrame, families: dict[str, str] | None = None) -> pd.DataFrame:
    """ρ(S(l), e) per (model, dataset, setting, layer): Pearson (``rho``) and Spearman on r(l), and
    Pearson on z(l) (``rho_z``); ``relative_depth`` = (layer + 1) / n_layers."""
    rows = []
    for (model, dataset), res in (residual.groupby(["model", "dataset"], sort=True) if not residual.empty else []):
        e_all = err[(err["model"] == model) & (err["dataset"] == dataset)]
        if e_all.empty:
            continue
        n_layers = int(res["layer"].max()) + 1
        r_wide = res.pivot_table(index="example_id", columns="layer", values="r_norm", aggfunc="first")
        z_wide = res.pivot_table(index="example_id", columns="layer", values="z_norm", aggfunc="first")
        for setting, e in e_all.groupby("setting", sort=True):
            e = e.set_index("example_id")["error"]
            common = e.index.intersection(r_wide.index)
            ev = e.loc[common].to_numpy()
            for layer in range(n_layers):
                s = r_wide.loc[common, layer].to_numpy()
                rows.append({
                    "model": model, "family": (families or {}).get(model, ""), "dataset": dataset, "setting": setting,
                    "layer": layer, "relative_depth": (layer + 1) / n_layers,
                    "rho": pearson(s, ev), "spearman": spearman(s, ev), "rho_z": pearson(z_wide.loc[common, layer].to_numpy(), ev),
                    "n_examples": len(common),
                })
    cols = ["model", "family", "dataset", "setting", "layer", "relative_depth", "rho", "spearman", "rho_z", "n_examples"]
    return pd.DataFrame(rows, columns=cols)


def d_sets(err: pd.DataFrame, tokens: pd.DataFrame | None, seed: int = 0) -> pd.DataFrame:
    """D_large and D_ctrl of every (model, dataset, setting): rows model, dataset, setting, set,
    example_id, error."""
    rows = []
    for (model, dataset, setting), g in err.groupby(["model", "dataset", "setting"], sort=True):
        tok = None
        if tokens is not None and not tokens.empty:
            t = tokens[(tokens["model"] == model) & (tokens["dataset"] == dataset)]
            tok = dict(zip(t["example_id"], t["tokens"]))
        ids, ev = g["example_id"].to_numpy().astype(str), g["error"].to_numpy()
        by_id = dict(zip(ids, ev))
        large = select_large(ids, ev, tok)
        ctrl = select_control(ids, ev, len(large), seed)
        for name, members in (("large", large), ("ctrl", ctrl)):
            for eid in members:
                rows.append({"model": model, "dataset": dataset, "setting": setting, "set": name, "example_id": eid, "error": by_id[eid]})
    return pd.DataFrame(rows, columns=["model", "dataset", "setting", "set", "example_id", "error"])


def headline(corr: pd.DataFrame, pred: pd.DataFrame) -> pd.DataFrame:
    """One line per (model, dataset): mean pairwise ρ and Jaccard, and the last layer's ρ(S, e)
    (mean over settings) — the figures the paper quotes."""
    rows = []
    keys = sorted(set(map(tuple, corr[["model", "dataset"]].to_numpy())) | set(map(tuple, pred[["model", "dataset"]].to_numpy())))
    for model, dataset in keys:
        c = corr[(corr["model"] == model) & (corr["dataset"] == dataset)]
        p = pred[(pred["model"] == model) & (pred["dataset"] == dataset)]
        last = p[p["layer"] == p["layer"].max()] if not p.empty else p
        rows.append({
            "model": model, "dataset": dataset, "pairs": len(c),
            "mean_pearson": c["pearson"].mean() if len(c) else float("nan"),
            "min_pearson": c["pearson"].min() if len(c) else float("nan"),
            "mean_jaccard_top10": c["jaccard_top10"].mean() if len(c) else float("nan"),
            "last_layer_rho_r": last["rho"].mean() if len(last) else float("nan"),
            "last_layer_rho_z": last["rho_z"].mean() if len(last) else float("nan"),
        })
    return pd.DataFrame(rows)


# --- Figures ----------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def fig_correlation_heatmap(corr: pd.DataFrame, model: str, path: Path) -> Path | None:
    """Pearson ρ between the error vectors of every pair of settings, one panel per dataset."""
    sub = corr[corr["model"] == model]
    if sub.empty:
        return None
    plt = _plt()
    datasets = sorted(sub["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.6), squeeze=False)
    first: list[str] | None = None
    for ax, ds in zip(axes[0], datasets):
        g = sub[sub["dataset"] == ds]
        names = sorted(set(g["setting_a"]) | set(g["setting_b"]))
        m = np.eye(len(names))
        pos = {n: i for i, n in enumerate(names)}
        for _, r in g.iterrows():
            i, j = pos[r["setting_a"]], pos[r["setting_b"]]
            m[i, j] = m[j, i] = r["pearson"]
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
        # the same settings as the panel on the left: its labels serve (no overlap)
        ax.set_yticks(range(len(names)), names if names != first else [""] * len(names), fontsize=6)
        first = first or names
        if len(names) <= 12:
            for i in range(len(names)):
                for j in range(len(names)):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=5)
        ax.set_title(f"{ds} (N={int(g['n_examples'].max())})", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="Pearson ρ of per-example errors")
    fig.suptitle(f"{model}: are the same examples hurt by every setting?", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def fig_predictor_vs_depth(pred: pd.DataFrame, path: Path) -> Path | None:
    """ρ(S(l), e) against relative depth, one panel per family: colour = setting, line style =
    dataset, marker = model; one legend for the figure."""
    if pred.empty:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D

    fams = sorted(pred["family"].fillna("").unique())
    settings = sorted(pred["setting"].unique())
    datasets = sorted(pred["dataset"].unique())
    models = sorted(pred["model"].unique())
    cmap = plt.get_cmap("tab10" if len(settings) <= 10 else "tab20")
    color = {s: cmap(i % cmap.N) for i, s in enumerate(settings)}
    style = {d: ls for d, ls in zip(datasets, ["-", "--", ":", "-."] * 4)}
    marker = {m: mk for m, mk in zip(models, ["o", "s", "^", "D", "v", "P", "X", "*"] * 8)}
    fig, axes = plt.subplots(1, len(fams), figsize=(4.4 * len(fams) + 2.6, 3.8), squeeze=False, sharey=True)
    for ax, fam in zip(axes[0], fams):
        sub = pred[pred["family"].fillna("") == fam]
        for (model, ds, setting), g in sub.groupby(["model", "dataset", "setting"], sort=True):
            g = g.sort_values("relative_depth")
            ax.plot(g["relative_depth"], g["rho"], color=color[setting], ls=style[ds], marker=marker[model], ms=3, lw=1, alpha=0.85)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("relative depth (layer / layers)")
        ax.set_title(f"{fam or 'other'}: {', '.join(sorted(sub['model'].unique()))}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_ylim(-1, 1)
    axes[0][0].set_ylabel("Pearson ρ(full-precision ‖r(l)‖, error)")
    handles = [Line2D([], [], color=color[s], lw=2, label=s) for s in settings]
    handles += [Line2D([], [], color="black", ls=style[d], label=d) for d in datasets]
    if len(models) > 1:
        handles += [Line2D([], [], color="black", ls="", marker=marker[m], label=m) for m in models]
    fig.legend(handles=handles, loc="center right", fontsize=6, frameon=False)
    fig.suptitle("Does the full-precision residual norm predict which examples break? (paper: −0.58 … −0.83 at the last layer)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / (4.4 * len(fams) + 2.6), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def worst_setting(err: pd.DataFrame, model: str, dataset: str) -> str | None:
    g = err[(err["model"] == model) & (err["dataset"] == dataset)]
    if g.empty:
        return None
    return str(g.groupby("setting")["error"].mean().idxmax())


def fig_error_vs_norm(err: pd.DataFrame, residual: pd.DataFrame, model: str, path: Path) -> Path | None:
    """Per-example error against the last layer's full-precision ‖r‖ (the setting with the largest
    mean error), one panel per dataset."""
    res = residual[residual["model"] == model]
    if res.empty:
        return None
    datasets = [d for d in sorted(res["dataset"].unique()) if worst_setting(err, model, d)]
    if not datasets:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        setting = worst_setting(err, model, ds)
        r = res[res["dataset"] == ds]
        last = r[r["layer"] == r["layer"].max()].drop_duplicates("example_id").set_index("example_id")["r_norm"]
        e = err[(err["model"] == model) & (err["dataset"] == ds) & (err["setting"] == setting)].set_index("example_id")["error"]
        common = e.index.intersection(last.index)
        ax.scatter(last.loc[common], e.loc[common], s=6, alpha=0.5)
        ax.set_xlabel("full-precision ‖r(L)‖ (token mean)")
        ax.set_ylabel(f"error e = ΔNLL ({setting})")
        ax.set_title(f"{ds}: ρ = {pearson(last.loc[common].to_numpy(), e.loc[common].to_numpy()):.2f}", fontsize=9)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, f"{model}: error against last-layer residual norm", fontsize=10)


# --- Report -------------------------------------------------------------------------------------------
def write_per_example_report(
    examples: pd.DataFrame,
    residual: pd.DataFrame,
    tokens: pd.DataFrame | None,
    reference: dict[str, str],
    out_dir: str | Path,
    families: dict[str, str] | None = None,
    seed: int = 0,
    report: "Report | None" = None,
) -> list[Path]:
    """Tables (CSV + Markdown), D_large/D_ctrl id lists and figures; returns the files written (each
    a part of ``report``: one that fails is recorded there, the others are still written)."""
    from quantlens.analysis.report import Report

    report = report or Report(Path(out_dir))
    err = report.compute("per_example_errors", lambda: errors(examples, reference), pd.DataFrame())
    if err.empty:
        return report.files
    corr = report.table("error_correlation", lambda: error_correlation(err))
    pred = report.table("residual_predictor", lambda: residual_predictor(err, residual, families))
    sets = report.compute("d_sets", lambda: d_sets(err, tokens, seed), pd.DataFrame())
    for (model, dataset), g in (sets.groupby(["model", "dataset"], sort=True) if not sets.empty else []):
        report.table(f"d_large_{_safe(model)}_{_safe(dataset)}", lambda g=g: g.drop(columns=["model", "dataset"]), md=False)
    head = report.table("per_example_headline", lambda: headline(corr, pred), md=False)
    report.file("per_example.md", lambda path: path.write_text("\n".join(
        ["# Per-example analysis", "", PAPER_NOTE, "", "## Headline (per model and dataset)", "", to_markdown(head)])))
    for model in sorted(err["model"].unique()):
        report.figure(f"fig_error_corr_{_safe(model)}", lambda path, model=model: fig_correlation_heatmap(corr, model, path))
        if not residual.empty:
            report.figure(f"fig_error_vs_norm_{_safe(model)}", lambda path, model=model: fig_error_vs_norm(err, residual, model, path))
    report.figure("fig_residual_predictor", lambda path: fig_predictor_vs_depth(pred, path))
    return report.files
