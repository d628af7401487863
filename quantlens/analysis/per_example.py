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

import itertools
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import pandas as pd

from quantlens.analysis.rendering import to_markdown
from quantlens.analysis.paired import LEVEL, BootstrapSpec, fisher_interval, mcnemar_exact
from quantlens.analysis.plotting import pyplot, save_figure
from quantlens.analysis.rendering import safe_name

if TYPE_CHECKING:
    from quantlens.analysis.report import Report

TOP_FRACTION = 0.1
DUP_JACCARD = 0.1
NGRAM = 5

PAPER_NOTE = (
    "How these settings relate to the paper's methods: the paper compares GPTQ, AWQ, NormalFloat and "
    "EfficientQAT (3–4 bit, calibrated or trained) on Qwen2.5-7B, Llama3-8B, Mistral-12B and Llama3-70B "
    "(avg ρ = 0.82 across 50 method pairs, 0.93 between variants of one method; top-10 % Jaccard 0.51; "
    "final-layer ρ(S, e) between −0.58 and −0.83). Most of quantlens' settings are calibration-free: round-to-nearest "
    "onto a grid — integers, their cube-root twins, NormalFloat (the paper's NF), minifloats, MX and NVFP4 "
    "blocks, k-means codebooks — with clipping and artificial noise matched to their error; a pair of two of them "
    "is cross-format, not cross-method. The paper's other methods are settings too: GPTQ and AWQ calibrated in the "
    "sweep (names ending `-gptq` / `-awq`) and released quantized checkpoints (GPTQ, AWQ, bitsandbytes, "
    "compressed-tensors; EfficientQAT's are released in the GPTQ layout). An example here is a perplexity window (or a "
    "document of example_len tokens with `examples: documents`), not necessarily a 512-token FineWeb document."
)


def setting_methods(settings: Iterable[str]) -> dict[str, str]:
    """setting → the method that made its weights (``gptq``, ``awq``), for the settings whose name says
    so (``W3A16-g32-gptq``); the others — round to nearest, or a name that is not a preset (a released
    checkpoint's) — are left out. The report's callers that know the runs' params pass ``methods``
    instead (:func:`write_per_example_report`), which names released checkpoints too."""
    from quantlens.quantize.settings import resolve_setting

    out = {}
    for s in settings:
        if "+" in s:  # a perturbation: noise, whatever its base
            continue
        try:
            method = resolve_setting(s).method
        except Exception:  # not a preset name: nothing to say from the name alone
            continue
        if method != "rtn":
            out[s] = method
    return out


def method_pairs(corr: pd.DataFrame, methods: dict[str, str]) -> pd.DataFrame:
    """The pairs of ``corr`` whose two settings both come from a method (``methods``: setting → method):
    ``kind`` = ``same method`` (the paper's "variants of one method", ρ 0.93) or ``cross-method`` (its 0.82)."""
    if corr.empty or not methods:
        return pd.DataFrame()
    both = corr[corr["setting_a"].isin(methods) & corr["setting_b"].isin(methods)]
    if both.empty:
        return pd.DataFrame()
    ma, mb = both["setting_a"].map(methods), both["setting_b"].map(methods)
    out = both.assign(method_a=ma, method_b=mb, kind=np.where(ma == mb, "same method", "cross-method"))
    cols = ["model", "dataset", "setting_a", "method_a", "setting_b", "method_b", "kind", "pearson", "jaccard_top10", "n_examples"]
    return out[cols].reset_index(drop=True)


def per_example_markdown(head: pd.DataFrame, corr: pd.DataFrame, methods: dict[str, str], from_names: bool = False) -> str:
    """``per_example.md``: what the settings are beside the paper's methods, the pairs of methods that ran
    (when two or more did), and the headline per model and dataset. ``from_names``: ``methods`` was read
    from the settings' names (:func:`setting_methods`), which cannot tell a released checkpoint."""
    lines = ["# Per-example analysis", "", PAPER_NOTE, "", "## Pairs of methods", ""]
    pairs = method_pairs(corr, methods)
    present = sorted({s for s in methods if s in set(corr.get("setting_a", [])) | set(corr.get("setting_b", []))})
    caveat = (" (read from the settings' names: a released checkpoint's setting is not recognised by its name alone)"
              if from_names else "")
    if present:
        said = f"Settings made by a method here{caveat}: " + ", ".join(f"`{s}` ({methods[s]})" for s in present) + "."
        if pairs.empty:
            lines += [said + " No two of them on one model and dataset: no pair of methods to set beside the paper's ρ.", ""]
        else:
            summary = pairs.groupby(["model", "dataset", "kind"], sort=True).agg(
                pairs=("pearson", "size"), mean_pearson=("pearson", "mean"), mean_jaccard_top10=("jaccard_top10", "mean")).reset_index()
            lines += [said + " Each pair of two of them (the paper: ρ 0.93 between variants of one method, 0.82 across methods):", "",
                      to_markdown(pairs), "Per model, dataset and kind:", "", to_markdown(summary)]
    else:
        lines += [f"No setting of these runs was made by a method (GPTQ, AWQ, a released checkpoint){caveat}: every pair "
                  "below is of round-to-nearest settings (or noise).", ""]
    lines += ["## Headline (per model and dataset)", "", to_markdown(head)]
    return "\n".join(lines)


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


def _near_duplicate(a: str, b: str, tokens: dict[str, list[int]], cache: dict, threshold: float) -> bool:
    """Whether two examples' n-gram Jaccard exceeds ``threshold``; n-grams and answers are cached
    (settings of one dataset share their top examples: each pair is compared once)."""
    key = (a, b) if a < b else (b, a)
    hit = cache.get(key)
    if hit is None:
        ga, gb = (cache.get(e) or cache.setdefault(e, ngrams(tokens[e])) for e in (a, b))
        hit = cache[key] = jaccard(ga, gb) > threshold
    return hit


def select_large(
    ids: np.ndarray, err: np.ndarray, tokens: dict[str, list[int]] | None, fraction: float = TOP_FRACTION,
    dup_jaccard: float = DUP_JACCARD, grams: dict | None = None,
) -> list[str]:
    """D_large: walk the examples by decreasing error, keep one unless its 5-gram Jaccard with an
    example already kept exceeds ``dup_jaccard``; stop at ceil(fraction·N) kept (or when exhausted).
    ``grams``: a cache of n-grams and near-duplicate answers, shared by the settings of one dataset."""
    k = max(1, math.ceil(fraction * len(err)))
    order = np.lexsort((ids, -err))
    kept: list[str] = []
    kept_with_tokens: list[str] = []
    grams = {} if grams is None else grams
    for i in order:
        eid = str(ids[i])
        if tokens is not None and eid in tokens:
            if any(_near_duplicate(eid, other, tokens, grams, dup_jaccard) for other in kept_with_tokens):
                continue
            kept_with_tokens.append(eid)
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


def flips(examples: pd.DataFrame, reference: dict[str, str]) -> pd.DataFrame:
    """What matters for accuracy, per (model, dataset, setting) with a ``correct`` column: examples
    the reference gets right and the setting wrong (``broke``), and back (``fixed``), over the
    examples both have; ``net`` = fixed − broke = the accuracy change × examples; ``mcnemar_p`` McNemar's
    exact two-sided p of broke against fixed (:func:`quantlens.analysis.paired.mcnemar_exact`)."""
    if "correct" not in examples:
        return pd.DataFrame()
    rows = []
    for (model, dataset), g in examples.dropna(subset=["correct"]).groupby(["model", "dataset"], sort=True):
        ref = reference.get(model)
        if ref is None or ref not in set(g["setting"]):
            continue
        wide = g.pivot_table(index="example_id", columns="setting", values="correct", aggfunc="first")
        base = wide[ref] > 0.5
        for setting in wide.columns:
            if setting == ref:
                continue
            both = wide[setting].notna() & wide[ref].notna()
            now, was = wide.loc[both, setting] > 0.5, base[both]
            rows.append({"model": model, "dataset": dataset, "setting": setting, "examples": int(both.sum()),
                         "acc_reference": float(was.mean()), "acc": float(now.mean()),
                         "broke": int((was & ~now).sum()), "fixed": int((~was & now).sum()),
                         "net": int((~was & now).sum() - (was & ~now).sum()),
                         "mcnemar_p": mcnemar_exact(int((was & ~now).sum()), int((~was & now).sum()))})
    return pd.DataFrame(rows)


def kl_error(examples: pd.DataFrame, err: pd.DataFrame) -> pd.DataFrame:
    """The KL error against the NLL error, per (model, dataset, setting) whose examples have a ``kl``
    column (the mean truncated KL(p_ref ‖ p) of each example, :mod:`quantlens.evaluation.kl`): the
    token-weighted mean KL, and Pearson / Spearman ρ between each example's KL and its error e(x)."""
    if "kl" not in examples or err.empty:
        return pd.DataFrame()
    kl = examples.dropna(subset=["kl"])[["model", "dataset", "setting", "example_id", "n_tokens", "kl"]]
    both = kl.merge(err[["model", "dataset", "setting", "example_id", "error"]], on=["model", "dataset", "setting", "example_id"])
    rows = []
    for (model, dataset, setting), g in both.groupby(["model", "dataset", "setting"], sort=True):
        rows.append({"model": model, "dataset": dataset, "setting": setting, "n_examples": len(g),
                     "mean_kl": float((g["kl"] * g["n_tokens"]).sum() / g["n_tokens"].sum()),
                     "pearson_kl_error": pearson(g["kl"].to_numpy(), g["error"].to_numpy()),
                     "spearman_kl_error": spearman(g["kl"].to_numpy(), g["error"].to_numpy())})
    return pd.DataFrame(rows)


def released_overlap(examples: pd.DataFrame, err: pd.DataFrame, sets: pd.DataFrame | None = None) -> pd.DataFrame:
    """Where examples carry ``released`` (the file of the second paper's release each came from, e.g.
    ``gptq3-large_error_seqs-10``): per (model, dataset, setting) and released D_large file, the Jaccard
    index of their D_large with ours — the top-m examples by our error among the n evaluated, m = |theirs|
    evaluated — beside its chance level m/(2n − m), and the share of our D_large (top 10 %, near-duplicates
    removed: ``sets``) that is in theirs."""
    if "released" not in examples:
        return pd.DataFrame()
    tags = examples.dropna(subset=["released"]).drop_duplicates(["model", "dataset", "example_id"])
    rows = []
    for (model, dataset, setting), g in err.groupby(["model", "dataset", "setting"], sort=True):
        t = tags[(tags["model"] == model) & (tags["dataset"] == dataset)].set_index("example_id")["released"]
        if t.empty:
            continue
        g = g[g["example_id"].isin(t.index)]
        n = len(g)
        ranked = g.sort_values(["error", "example_id"], ascending=[False, True])["example_id"].to_numpy()
        ours_large = set()
        if sets is not None and not sets.empty:
            s = sets[(sets["model"] == model) & (sets["dataset"] == dataset) & (sets["setting"] == setting) & (sets["set"] == "large")]
            ours_large = set(s["example_id"])
        for tag in sorted({x for x in t.unique() if "-large" in x}):
            theirs = set(t[t == tag].index) & set(g["example_id"])
            m = len(theirs)
            if m == 0 or n == 0:
                continue
            rows.append({"model": model, "dataset": dataset, "setting": setting, "released": tag, "n_examples": n, "theirs": m,
                         "jaccard": jaccard(set(ranked[:m]), theirs), "chance": m / (2 * n - m),
                         "ours_in_theirs": len(ours_large & theirs) / len(ours_large) if ours_large else float("nan")})
    return pd.DataFrame(rows)


PAIR_COLUMNS = ["model", "dataset", "setting_a", "setting_b", "pearson", "spearman", "jaccard_top10", "n_examples"]
INTERVAL_COLUMNS = ["pearson_lo", "pearson_hi"]


def error_correlation(err: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """Every unordered pair of settings per (model, dataset): pearson, spearman, jaccard_top10, as
    matrix operations over the (examples × settings) error matrix (:func:`pair_matrix`), and the
    interval of each Pearson ρ by Fisher's z at ``level`` (``pearson_lo``, ``pearson_hi``)."""
    parts = []
    for (model, dataset), g in err.groupby(["model", "dataset"], sort=True):
        wide = g.pivot_table(index="example_id", columns="setting", values="error", aggfunc="first")
        parts.append(pair_matrix(wide).assign(model=model, dataset=dataset))
    if not parts:
        return pd.DataFrame(columns=PAIR_COLUMNS + INTERVAL_COLUMNS)
    out = pd.concat(parts, ignore_index=True)[PAIR_COLUMNS]
    out["pearson_lo"], out["pearson_hi"] = fisher_interval(out["pearson"].to_numpy(), out["n_examples"].to_numpy(), level)
    return out


def error_correlation_pairwise(err: pd.DataFrame) -> pd.DataFrame:
    """The definition :func:`error_correlation` computes, pair by pair (each pair on the examples both
    settings have, :func:`pair_stats`): the reference it is tested and benchmarked against."""
    rows = []
    for (model, dataset), g in err.groupby(["model", "dataset"], sort=True):
        wide = g.pivot_table(index="example_id", columns="setting", values="error", aggfunc="first")
        for a, b in itertools.combinations(list(wide.columns), 2):
            pair = wide[[a, b]].dropna()
            rows.append(pair_stats(model, dataset, a, b, pair.index.to_numpy(), pair[a].to_numpy(), pair[b].to_numpy()))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def pair_matrix(wide: pd.DataFrame) -> pd.DataFrame:
    """All pairs of the columns of ``wide`` (index: example ids, one column of errors per setting).

    Settings with an error for every example (the usual case) are done at once: Pearson ρ = ZᵀZ of
    the centred, unit-norm columns; Spearman the same on average ranks; the top-10 % sets as a
    boolean matrix T, |A ∩ B| = TᵀT and Jaccard = |A ∩ B| / (2k − |A ∩ B|). A pair with a setting
    that misses examples is computed on the examples both have (:func:`pair_stats`), as before —
    ranks and top sets depend on which examples are shared. Rows: setting_a, setting_b (column
    order, a before b), pearson, spearman, jaccard_top10, n_examples."""
    names = [str(c) for c in wide.columns]
    ids = wide.index.to_numpy().astype(str)
    x = wide.to_numpy(dtype=np.float64)
    complete = ~np.isnan(x).any(axis=0)
    full = np.flatnonzero(complete)
    out = []
    if len(full) > 1:
        xf = x[:, full]
        pear = _corr_columns(xf)
        spear = _corr_columns(wide.iloc[:, full].rank(method="average").to_numpy(dtype=np.float64))
        k = max(1, math.ceil(TOP_FRACTION * len(ids)))
        top = np.zeros(xf.shape, dtype=np.float64)
        for j in range(xf.shape[1]):
            top[np.lexsort((ids, -xf[:, j]))[:k], j] = 1.0
        inter = top.T @ top
        jac = inter / (2 * k - inter)
        ia, ib = np.triu_indices(len(full), 1)
        out.append(pd.DataFrame({"a": full[ia], "b": full[ib], "pearson": pear[ia, ib], "spearman": spear[ia, ib],
                                 "jaccard_top10": jac[ia, ib], "n_examples": len(ids)}))
    rest = []
    for i, j in itertools.combinations(range(len(names)), 2):
        if complete[i] and complete[j]:
            continue
        both = ~np.isnan(x[:, i]) & ~np.isnan(x[:, j])
        s = pair_stats("", "", names[i], names[j], ids[both], x[both, i], x[both, j])
        rest.append({"a": i, "b": j, **{c: s[c] for c in ("pearson", "spearman", "jaccard_top10", "n_examples")}})
    if rest:
        out.append(pd.DataFrame(rest))
    if not out:
        return pd.DataFrame(columns=["setting_a", "setting_b", "pearson", "spearman", "jaccard_top10", "n_examples"])
    pairs = pd.concat(out, ignore_index=True).sort_values(["a", "b"], ignore_index=True)
    label = np.array(names, dtype=object)
    return pd.DataFrame({"setting_a": label[pairs["a"].to_numpy()], "setting_b": label[pairs["b"].to_numpy()],
                         "pearson": pairs["pearson"].to_numpy(dtype=np.float64), "spearman": pairs["spearman"].to_numpy(dtype=np.float64),
                         "jaccard_top10": pairs["jaccard_top10"].to_numpy(dtype=np.float64), "n_examples": pairs["n_examples"].to_numpy(dtype=np.int64)})


def _corr_columns(x: np.ndarray) -> np.ndarray:
    """Pearson ρ between every pair of columns of a complete matrix (NaN for a constant column or
    fewer than two rows, as :func:`pearson`)."""
    if x.shape[0] < 2:
        return np.full((x.shape[1], x.shape[1]), np.nan)
    xc = x - x.mean(axis=0)
    norm = np.sqrt((xc * xc).sum(axis=0))
    z = np.divide(xc, norm, out=np.full_like(xc, np.nan), where=norm > 0)
    return z.T @ z


def pair_stats(model: str, dataset: str, a: str, b: str, ids: np.ndarray, ea: np.ndarray, eb: np.ndarray) -> dict:
    ids = ids.astype(str)
    return {
        "model": model, "dataset": dataset, "setting_a": a, "setting_b": b,
        "pearson": pearson(ea, eb), "spearman": spearman(ea, eb),
        "jaccard_top10": jaccard(top_set(ids, ea), top_set(ids, eb)), "n_examples": len(ids),
    }


def residual_predictor(err: pd.DataFrame, residual: pd.DataFrame, families: dict[str, str] | None = None) -> pd.DataFrame:
    """ρ(S(l), e) per (model, dataset, setting, layer): Pearson (``rho``) and Spearman on r(l), and
    Pearson on z(l) (``rho_z``); ``relative_depth`` = (layer + 1) / n_layers. Each setting on the
    examples it shares with the residual table; all settings of a layer at once (:func:`_corr_with`)."""
    parts = []
    for (model, dataset), res in (residual.groupby(["model", "dataset"], sort=True) if not residual.empty else []):
        e_all = err[(err["model"] == model) & (err["dataset"] == dataset)]
        if e_all.empty:
            continue
        n_layers = int(res["layer"].max()) + 1
        r_wide = res.pivot_table(index="example_id", columns="layer", values="r_norm", aggfunc="first")
        z_wide = res.pivot_table(index="example_id", columns="layer", values="z_norm", aggfunc="first")
        e_wide = e_all.pivot_table(index="example_id", columns="setting", values="error", aggfunc="first")
        e_wide = e_wide.loc[e_wide.index.intersection(r_wide.index)]
        settings = [str(c) for c in e_wide.columns]
        ev = e_wide.to_numpy(dtype=np.float64)
        present = ~np.isnan(ev)
        e_ranks = e_wide.rank(method="average").to_numpy(dtype=np.float64)  # complete columns; others below
        for layer in range(n_layers):
            s = r_wide.loc[e_wide.index, layer].to_numpy(dtype=np.float64)
            z = z_wide.loc[e_wide.index, layer].to_numpy(dtype=np.float64)
            rho, rho_z = _corr_with(s, ev, present), _corr_with(z, ev, present)
            spear = _corr_with(pd.Series(s).rank(method="average").to_numpy(), e_ranks, present)
            for j in np.flatnonzero(~present.all(axis=0)):  # a setting missing examples: ranks over what it has
                m = present[:, j]
                spear[j] = spearman(s[m], ev[m, j])
            parts.append(pd.DataFrame({
                "model": model, "family": (families or {}).get(model, ""), "dataset": dataset, "setting": settings,
                "layer": layer, "relative_depth": (layer + 1) / n_layers, "rho": rho, "spearman": spear, "rho_z": rho_z,
                "n_examples": present.sum(axis=0),
            }))
    cols = ["model", "family", "dataset", "setting", "layer", "relative_depth", "rho", "spearman", "rho_z", "n_examples"]
    if not parts:
        return pd.DataFrame(columns=cols)
    return pd.concat(parts, ignore_index=True).sort_values(["model", "dataset", "setting", "layer"], ignore_index=True)[cols]


def _corr_with(v: np.ndarray, x: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Pearson ρ of the vector ``v`` with every column of ``x``, each over the rows where that
    column is present (:func:`pearson` on those rows: NaN for fewer than two or no variance)."""
    out = np.full(x.shape[1], np.nan)
    full = present.all(axis=0)
    if full.any() and len(v) >= 2:
        out[full] = _corr_columns(np.column_stack([v, x[:, full]]))[0, 1:]
    for j in np.flatnonzero(~full):
        m = present[:, j]
        out[j] = pearson(v[m], x[m, j])
    return out


def d_sets(err: pd.DataFrame, tokens: pd.DataFrame | None, seed: int = 0) -> pd.DataFrame:
    """D_large and D_ctrl of every (model, dataset, setting): rows model, dataset, setting, set,
    example_id, error."""
    rows = []
    toks: dict[tuple[str, str], tuple[dict | None, dict]] = {}  # (model, dataset) → (tokens, n-gram cache)
    for (model, dataset, setting), g in err.groupby(["model", "dataset", "setting"], sort=True):
        if (model, dataset) not in toks:
            tok = None
            if tokens is not None and not tokens.empty:
                t = tokens[(tokens["model"] == model) & (tokens["dataset"] == dataset)]
                tok = dict(zip(t["example_id"], t["tokens"]))
            toks[(model, dataset)] = (tok, {})
        tok, grams = toks[(model, dataset)]
        ids, ev = g["example_id"].to_numpy().astype(str), g["error"].to_numpy()
        by_id = dict(zip(ids, ev))
        large = select_large(ids, ev, tok, grams=grams)
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


# --- Readable summaries -------------------------------------------------------------------------------
SEED = re.compile(r"-s\d+$")
HEATMAP_MAX = 40  # settings (after collapsing seeds) drawn in a heatmap; the CSV has every pair


def seed_family(setting: str) -> str:
    """The setting a seeded perturbation is one draw of: its name without the ``-s<seed>`` suffix
    (``W8A8+gaussian-additive-both-s3`` → ``W8A8+gaussian-additive-both``); others are their own."""
    return SEED.sub("", setting)


def _collapsed(corr: pd.DataFrame) -> pd.DataFrame:
    """Pairs of seed families (mean, std and count of ρ over their member pairs; a family against
    itself = its seeds against each other) per (model, dataset)."""
    fam = {s: seed_family(s) for s in set(corr["setting_a"]) | set(corr["setting_b"])}  # once per name, not per pair
    c = corr.assign(a=corr["setting_a"].map(fam), b=corr["setting_b"].map(fam))
    swap = c["a"] > c["b"]
    c.loc[swap, ["a", "b"]] = c.loc[swap, ["b", "a"]].to_numpy()
    g = c.groupby(["model", "dataset", "a", "b"], sort=True)
    extra = {"pearson_lo": ("pearson_lo", "mean"), "pearson_hi": ("pearson_hi", "mean")} if "pearson_lo" in c else {}
    return g.agg(pearson=("pearson", "mean"), pearson_std=("pearson", "std"), jaccard_top10=("jaccard_top10", "mean"),
                 pairs=("pearson", "size"), **extra).reset_index()


Links = Callable[[str, list[str]], "str | None"]  # (model, settings) → MLflow compare link of their runs


def correlation_summary(corr: pd.DataFrame, bases: dict[str, str] | None = None, top: int = 5, links: Links | None = None) -> str:
    """``error_correlation.md``: what a reader wants of the pair table, at any grid size — per model
    and dataset the headline, the most and least correlated pairs (seeds of one perturbation
    collapsed to mean ± std), and each setting against its own family: seeds against each other,
    a perturbation against the native quantization it imitates (``bases``: setting → base).
    ``links``: each headline and pair gets the MLflow compare link of its runs."""
    lines = ["# Error correlation between settings", "",
             "Pearson ρ of per-example errors (NLL − NLL of W16A16), with its interval by Fisher's z. Seeds of one "
             "perturbation are collapsed (`-s<seed>`: mean ± std over their pairs). Every pair, with the bounds: "
             "`error_correlation.csv`.", ""]
    fams = _collapsed(corr)
    for (model, dataset), g in corr.groupby(["model", "dataset"], sort=True):
        f = fams[(fams["model"] == model) & (fams["dataset"] == dataset)]
        every = sorted(set(g["setting_a"]) | set(g["setting_b"]))
        link = links(model, every) if links else None
        lines += [f"## {model} · {dataset}", "",
                  f"{len(g)} pairs of {len(every)} settings, {int(g['n_examples'].max())} examples; "
                  f"ρ mean {g['pearson'].mean():.3f}, median {g['pearson'].median():.3f}, min {g['pearson'].min():.3f}; "
                  f"top-10 % Jaccard mean {g['jaccard_top10'].mean():.3f}." + (f" [Compare these runs in MLflow]({link})" if link else ""), ""]
        between = f[f["a"] != f["b"]].dropna(subset=["pearson"])
        members = lambda fam: [s for s in every if seed_family(s) == fam or s == fam]  # noqa: E731
        cols = ["a", "b", "ρ", "jaccard_top10"] + (["compare"] if links else [])
        ci = lambda x: zip(x["pearson_lo"], x["pearson_hi"]) if "pearson_lo" in x else ((float("nan"),) * 2 for _ in range(len(x)))  # noqa: E731
        show = lambda x: x.assign(**{"ρ": [f"{m:.3f}" + ((f" [{lo:.3f}, {hi:.3f}]" if pd.notna(lo) else "") if n == 1 else f" ± {s:.3f} ({n} pairs)")  # noqa: E731
                                              for m, s, n, (lo, hi) in zip(x["pearson"], x["pearson_std"].fillna(0), x["pairs"], ci(x))],
                                     **({"compare": [links(model, members(a) + members(b)) for a, b in zip(x["a"], x["b"])]} if links else {})})[cols]
        if len(between):
            lines += ["Most correlated:", "", to_markdown(show(between.nlargest(top, "pearson"))),
                      "Least correlated:", "", to_markdown(show(between.nsmallest(top, "pearson")))]
        own = f[(f["a"] == f["b"]) & (f["pairs"] > 0)]
        rows = [{"setting": r["a"], "against": "its other seeds", "ρ": f"{r['pearson']:.3f} ± {0 if pd.isna(r['pearson_std']) else r['pearson_std']:.3f}",
                 "pairs": int(r["pairs"])} for _, r in own.iterrows()]
        if bases:
            pairs = g.assign(fa=g["setting_a"].map(seed_family), fb=g["setting_b"].map(seed_family))
            for fam in sorted({seed_family(s) for s in set(g["setting_a"]) | set(g["setting_b"])}):
                members = [s for s in bases if seed_family(s) == fam and bases[s] != s]
                base = bases.get(members[0]) if members else None
                if base is None:
                    continue
                m = pairs[((pairs["fa"] == fam) & (pairs["setting_b"] == base)) | ((pairs["fb"] == fam) & (pairs["setting_a"] == base))]
                if len(m):
                    rows.append({"setting": fam, "against": f"{base} (native)",
                                 "ρ": f"{m['pearson'].mean():.3f} ± {0 if len(m) < 2 else m['pearson'].std():.3f}", "pairs": len(m)})
        if rows:
            lines += ["Each setting against its own family:", "", to_markdown(pd.DataFrame(rows))]
    return "\n".join(lines)


# --- Figures ----------------------------------------------------------------------------------------
def collapsed_settings(paired: pd.DataFrame) -> dict[tuple[str, str], set[str]]:
    """(model, dataset) → the settings that collapsed there: the ``collapsed`` column of the paired table
    (:func:`quantlens.analysis.paired_report.paired_vs_reference`: token-weighted ΔNLL above ln 10, a
    perplexity more than 10× the reference's)."""
    out: dict[tuple[str, str], set[str]] = {}
    if paired.empty or "collapsed" not in paired:
        return out
    for _, r in paired[paired["collapsed"].fillna(False).astype(bool)].iterrows():
        out.setdefault((r["model"], r["dataset"]), set()).add(r["setting"])
    return out


def fig_correlation_heatmap(corr: pd.DataFrame, model: str, path: Path,
                            collapsed: dict[tuple[str, str], set[str]] | None = None) -> Path | None:
    """Pearson ρ between the error vectors of every pair of settings, one panel per dataset. Seeds
    of one perturbation are collapsed into their family (mean ρ; the diagonal is then the mean ρ
    between its seeds); past :data:`HEATMAP_MAX` families the first ones by name are drawn and the
    title says how many (every pair is in the CSV). A setting that collapsed on that dataset
    (``collapsed``: :func:`collapsed_settings`) has a cross on its diagonal cell: its errors are all
    large, its ρ says little."""
    sub = corr[corr["model"] == model]
    if sub.empty:
        return None
    plt = pyplot()
    fams = _collapsed(sub)
    datasets = sorted(sub["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.6), squeeze=False)
    first: list[str] | None = None
    for ax, ds in zip(axes[0], datasets):
        g = fams[fams["dataset"] == ds]
        every = sorted(set(g["a"]) | set(g["b"]))
        names = every[:HEATMAP_MAX]
        pos = {n: i for i, n in enumerate(names)}
        m = np.eye(len(names))
        shown = g[g["a"].isin(pos) & g["b"].isin(pos)]
        ia, ib = shown["a"].map(pos).to_numpy(), shown["b"].map(pos).to_numpy()
        m[ia, ib] = m[ib, ia] = shown["pearson"].to_numpy()
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
        # the same settings as the panel on the left: its labels serve (no overlap)
        ax.set_yticks(range(len(names)), names if names != first else [""] * len(names), fontsize=6)
        first = first or names
        broken = {seed_family(s) for s in (collapsed or {}).get((model, ds), set())}
        crossed = [i for i, n in enumerate(names) if n in broken]  # collapsed on this dataset: a cross on its diagonal cell
        if crossed:
            ax.scatter(crossed, crossed, marker="x", color="black", s=18, lw=1.0, zorder=3)
        if len(names) <= 12:
            for i in range(len(names)):
                for j in range(len(names)):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=5)
        n_ex = int(sub[sub["dataset"] == ds]["n_examples"].max())
        more = f", {len(names)} of {len(every)} settings" if len(every) > len(names) else ""
        ax.set_title(f"{ds} (N={n_ex}{more})" + ("\n×: collapsed (ppl > 10× full precision)" if crossed else ""), fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="Pearson ρ of per-example errors (seeds: mean)")
    return save_figure(fig, path, f"{model}: are the same examples hurt by every setting?", fontsize=10, layout=False)


def fig_predictor_vs_depth(pred: pd.DataFrame, path: Path) -> Path | None:
    """ρ(S(l), e) against relative depth, one panel per family: colour = setting, line style =
    dataset, marker = model; one legend for the figure."""
    if pred.empty:
        return None
    # seeds of one perturbation: one line, their mean ρ
    pred = (pred.assign(setting=pred["setting"].map(seed_family), family=pred["family"].fillna(""))
            .groupby(["family", "model", "dataset", "setting", "relative_depth"], as_index=False)["rho"].mean())
    plt = pyplot()
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
    handles = [Line2D([], [], color=color[s], lw=2, label=s) for s in settings[:HEATMAP_MAX]]
    if len(settings) > HEATMAP_MAX:
        handles.append(Line2D([], [], color="none", label=f"… {len(settings) - HEATMAP_MAX} more (residual_predictor.csv)"))
    handles += [Line2D([], [], color="black", ls=style[d], label=d) for d in datasets]
    if len(models) > 1:
        handles += [Line2D([], [], color="black", ls="", marker=marker[m], label=m) for m in models]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=6, frameon=False,
               ncol=1 + len(handles) // 30)
    return save_figure(fig, path, "Does the full-precision residual norm predict which examples break? "
                       "(paper: −0.58 … −0.83 at the last layer)", fontsize=9)


def worst_setting(err: pd.DataFrame, model: str, dataset: str, collapsed: set[str] | frozenset = frozenset()) -> str | None:
    """The setting with the largest mean error that has not collapsed (``collapsed``: a collapsed one
    is broken on every example alike and says nothing about which examples break); the largest of all
    if every setting collapsed."""
    g = err[(err["model"] == model) & (err["dataset"] == dataset)]
    if g.empty:
        return None
    mean = g.groupby("setting")["error"].mean()
    working = mean[~mean.index.isin(list(collapsed))]
    return str((working if not working.empty else mean).idxmax())


def fig_error_vs_norm(err: pd.DataFrame, residual: pd.DataFrame, model: str, path: Path,
                      collapsed: dict[tuple[str, str], set[str]] | None = None) -> Path | None:
    """Per-example error against the last layer's full-precision ‖r‖ (the setting with the largest
    mean error that has not collapsed: :func:`worst_setting`, ``collapsed`` from
    :func:`collapsed_settings`), one panel per dataset."""
    res = residual[residual["model"] == model]
    if res.empty:
        return None
    broken = lambda ds: (collapsed or {}).get((model, ds), set())  # noqa: E731
    datasets = [d for d in sorted(res["dataset"].unique()) if worst_setting(err, model, d, broken(d))]
    if not datasets:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        setting = worst_setting(err, model, ds, broken(ds))
        r = res[res["dataset"] == ds]
        last = r[r["layer"] == r["layer"].max()].drop_duplicates("example_id").set_index("example_id")["r_norm"]
        e = err[(err["model"] == model) & (err["dataset"] == ds) & (err["setting"] == setting)].set_index("example_id")["error"]
        common = e.index.intersection(last.index)
        ax.scatter(last.loc[common], e.loc[common], s=6, alpha=0.5)
        ax.set_xlabel("full-precision ‖r(L)‖ (token mean)")
        ax.set_ylabel("error e = ΔNLL per example")
        ax.set_title(f"{ds} · {setting}: ρ = {pearson(last.loc[common].to_numpy(), e.loc[common].to_numpy()):.2f}", fontsize=9)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, f"{model}: error against last-layer residual norm\n(the setting with the largest mean error "
                       "that has not collapsed)", fontsize=10)


# --- Report -------------------------------------------------------------------------------------------
def _write_paired(report: "Report", examples: pd.DataFrame, reference: dict[str, str], spec: BootstrapSpec) -> pd.DataFrame:
    """The paired comparisons against the reference: table, summary and one figure per (model, dataset)."""
    from quantlens.analysis.paired_report import paired_markdown, paired_vs_reference

    paired = report.table("paired", lambda: paired_vs_reference(examples, reference, spec), md=False)
    report.file("paired.md", lambda path: path.write_text(paired_markdown(paired, spec)))
    from quantlens.analysis.paired_report import fig_paired

    for (model, dataset) in (paired[["model", "dataset"]].drop_duplicates().itertuples(index=False) if not paired.empty else []):
        report.figure(f"fig_paired_{safe_name(model)}_{safe_name(dataset)}", lambda path, m=model, d=dataset: fig_paired(paired, m, d, spec, path))
    return paired


def _write_d_sets(report: "Report", examples: pd.DataFrame, err: pd.DataFrame, tokens: pd.DataFrame | None, seed: int) -> None:
    """D_large / D_ctrl: their overlap with the paper's release and one id list per (model, dataset)."""
    sets = report.compute("d_sets", lambda: d_sets(err, tokens, seed), pd.DataFrame())
    report.table("released_overlap", lambda: released_overlap(examples, err, sets))  # our D_large against the paper's release
    for (model, dataset), g in (sets.groupby(["model", "dataset"], sort=True) if not sets.empty else []):
        report.table(f"d_large_{safe_name(model)}_{safe_name(dataset)}", lambda g=g: g.drop(columns=["model", "dataset"]), md=False)


def _linked_headline(corr: pd.DataFrame, pred: pd.DataFrame, links: Links | None) -> pd.DataFrame:
    h = headline(corr, pred)
    if links and not h.empty:  # every setting of the model that entered the pairs, side by side in MLflow
        h["compare"] = [links(m, sorted(set(c["setting_a"]) | set(c["setting_b"])))
                        for m, c in ((m, corr[(corr["model"] == m) & (corr["dataset"] == d)]) for m, d in zip(h["model"], h["dataset"]))]
    return h


def write_per_example_report(
    examples: pd.DataFrame,
    residual: pd.DataFrame,
    tokens: pd.DataFrame | None,
    reference: dict[str, str],
    out_dir: str | Path,
    families: dict[str, str] | None = None,
    seed: int = 0,
    report: "Report | None" = None,
    bases: dict[str, str] | None = None,
    links: Links | None = None,
    spec: BootstrapSpec | None = None,
    methods: dict[str, str] | None = None,
) -> list[Path]:
    """Tables (CSV + Markdown), D_large/D_ctrl id lists and figures; returns the files written (each
    a part of ``report``: one that fails is recorded there, the others are still written). The
    Markdown files are summaries people read at any grid size; the CSVs hold every pair and layer.
    ``bases``: setting → the setting it was derived from (a perturbation's native quantization);
    ``methods``: setting → the method that made its weights (gptq, awq, a released checkpoint's) for
    those a method made — from the runs' ``method`` / ``checkpoint`` params; None: from the names
    (:func:`setting_methods`, which cannot name a released checkpoint)."""
    from quantlens.analysis.report import Report

    report = report or Report(Path(out_dir))
    err = report.compute("per_example_errors", lambda: errors(examples, reference), pd.DataFrame())
    if err.empty:
        return report.files
    spec = spec or BootstrapSpec()
    corr = report.table("error_correlation", lambda: error_correlation(err, spec.level), md=False)
    paired = _write_paired(report, examples, reference, spec)
    report.table("flips", lambda: flips(examples, reference))
    report.table("kl_error", lambda: kl_error(examples, err))  # the KL error beside the NLL error, per setting  # correct at the reference, wrong under the setting, and back  # every pair: a file to load, not to read
    report.file("error_correlation.md", lambda path: path.write_text(correlation_summary(corr, bases, links=links)))
    pred = report.table("residual_predictor", lambda: residual_predictor(err, residual, families), md=False)
    report.file("residual_predictor.md", lambda path: path.write_text(
        "# ρ(S(L), e) at the last layer (every layer: residual_predictor.csv)\n\n"
        + to_markdown(pred[pred["layer"] == pred.groupby(["model", "dataset"])["layer"].transform("max")])))
    _write_d_sets(report, examples, err, tokens, seed)
    head = report.table("per_example_headline", lambda: _linked_headline(corr, pred, links), md=False)
    from_names = methods is None
    methods = setting_methods(err["setting"].unique()) if from_names else methods
    report.file("per_example.md", lambda path: path.write_text(per_example_markdown(head, corr, methods, from_names)))
    broken = collapsed_settings(paired)
    for model in sorted(err["model"].unique()):
        report.figure(f"fig_error_corr_{safe_name(model)}", lambda path, model=model: fig_correlation_heatmap(corr, model, path, broken))
        if not residual.empty:
            report.figure(f"fig_error_vs_norm_{safe_name(model)}", lambda path, model=model: fig_error_vs_norm(err, residual, model, path, broken))
    report.figure("fig_residual_predictor", lambda path: fig_predictor_vs_depth(pred, path))
    return report.files
