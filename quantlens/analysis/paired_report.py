"""Paired intervals and exact tests in the report's comparisons (pandas over :mod:`quantlens.analysis.paired`).

- :func:`paired_vs_reference`: every setting against the full-precision run of its model, per dataset:
  Δ NLL and Δ perplexity with their bootstrap intervals over the same examples, whether the interval
  covers 0, and on datasets with a ``correct`` column the flips and McNemar's exact p.
- :func:`paired_pairs`: the same for chosen pairs (a format against INT at the same bits: the rows of
  ``uniform_vs_nonuniform``), Δ = a − b.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from quantlens.analysis.paired import BootstrapSpec, covers_zero, mcnemar_exact, paired_bootstrap
from quantlens.analysis.rendering import to_markdown
from quantlens.analysis.plotting import ValueAxis, collapsed_nll, pyplot, row_axis, rows_height, save_figure

PAIRED_COLUMNS = ["model", "dataset", "setting", "against", "n_examples", "delta_nll", "delta_nll_lo", "delta_nll_hi",
                  "delta_ppl", "delta_ppl_lo", "delta_ppl_hi", "covers_zero", "delta_example_nll", "delta_example_nll_lo",
                  "delta_example_nll_hi"]
FLIP_COLUMNS = ["broke", "fixed", "mcnemar_p"]


def _group_pairs(g: pd.DataFrame, model: str, dataset: str, pairs: list[tuple[str, str]], spec: BootstrapSpec) -> list[dict]:
    """Rows for ``pairs`` [(setting, against)] of one (model, dataset) frame of examples."""
    one = g.drop_duplicates(["example_id", "setting"])
    nll = one.pivot(index="example_id", columns="setting", values="nll")
    tok = one.groupby("example_id")["n_tokens"].first()
    has_correct = "correct" in one and one["correct"].notna().any()  # (a frame of several datasets: NaN elsewhere)
    corr = one.pivot(index="example_id", columns="setting", values="correct") if has_correct else None
    rows = []
    by_base: dict[str, list[str]] = {}
    for a, b in pairs:
        if a in nll and b in nll:
            by_base.setdefault(b, []).append(a)
    for b, partners in by_base.items():
        # partners complete on the baseline's examples go in one matrix product; the others one by one
        have = nll[b].notna()
        complete = nll.loc[have, partners].notna().all(axis=0)
        full = [a for a in partners if complete[a]]
        batches = ([full] if full else []) + [[a] for a in partners if a not in full]
        for cols in batches:
            rows_ok = have & nll[cols].notna().all(axis=1)
            ids = nll.index[rows_ok]
            if len(ids) == 0:
                continue
            st = paired_bootstrap(tok.loc[ids].to_numpy(), nll.loc[ids, b].to_numpy(), nll.loc[ids, cols].to_numpy(), spec,
                                  group=f"{model}|{dataset}")
            zero = covers_zero(st["delta_nll_lo"], st["delta_nll_hi"])
            for j, a in enumerate(cols):
                row = {"model": model, "dataset": dataset, "setting": a, "against": b, "n_examples": len(ids),
                       **{k: float(v[j]) for k, v in st.items()}, "covers_zero": bool(zero[j])}
                if corr is not None and a in corr and b in corr:
                    both = corr[a].notna() & corr[b].notna()
                    now, was = corr.loc[both, a] > 0.5, corr.loc[both, b] > 0.5
                    broke, fixed = int((was & ~now).sum()), int((~was & now).sum())
                    row.update(broke=broke, fixed=fixed, mcnemar_p=mcnemar_exact(broke, fixed))
                rows.append(row)
    return rows


def paired_pairs(examples: pd.DataFrame, pairs: pd.DataFrame, spec: BootstrapSpec = BootstrapSpec()) -> pd.DataFrame:
    """``pairs``: columns model, setting, against. One row per (model, dataset, pair) with examples."""
    rows: list[dict] = []
    if examples.empty or pairs.empty:
        return pd.DataFrame(columns=PAIRED_COLUMNS)
    wanted = {m: list(zip(p["setting"], p["against"])) for m, p in pairs.groupby("model")}
    for (model, dataset), g in examples.groupby(["model", "dataset"], sort=True):
        if model in wanted:
            rows += _group_pairs(g, model, dataset, wanted[model], spec)
    out = pd.DataFrame(rows)
    return out[[c for c in PAIRED_COLUMNS + FLIP_COLUMNS if c in out]] if rows else pd.DataFrame(columns=PAIRED_COLUMNS)


def paired_vs_reference(examples: pd.DataFrame, reference: dict[str, str], spec: BootstrapSpec = BootstrapSpec()) -> pd.DataFrame:
    """Every setting of each model against its reference run (``reference``: model → setting), and
    whether it collapsed there (``collapsed``: ΔNLL per token > ln 10, perplexity > 10× the reference's:
    :data:`quantlens.analysis.plotting.COLLAPSE_RATIO`)."""
    if examples.empty:
        return pd.DataFrame(columns=PAIRED_COLUMNS + ["collapsed"])
    pairs = [{"model": m, "setting": s, "against": reference[m]} for m, g in examples.groupby("model") if m in reference
             for s in sorted(set(g["setting"])) if s != reference[m]]
    out = paired_pairs(examples, pd.DataFrame(pairs, columns=["model", "setting", "against"]), spec)
    return out.assign(collapsed=collapsed_nll(out["delta_nll"]) if len(out) else pd.Series(dtype=bool))


def _interval(v: float, lo: float, hi: float, fmt: str = "{:+.4g}") -> str:
    mark = "" if lo > 0 or hi < 0 else " ≈0"
    return f"{fmt.format(v)} [{fmt.format(lo)}, {fmt.format(hi)}]{mark}"


def paired_markdown(table: pd.DataFrame, spec: BootstrapSpec) -> str:
    """``paired.md``: Δ with its interval per setting; ``≈0`` marks an interval that covers 0."""

    head = ["# Each setting against the full-precision model, on the same examples", "",
            f"Δ = setting − reference over the same examples, with the {spec.level:.0%} paired bootstrap interval "
            f"({spec.resamples} resamples of the examples, seed {spec.seed}); **≈0**: the interval covers 0 — not "
            "distinguishable from the noise of these examples. ΔNLL is token-weighted (Δ log perplexity). "
            "Accuracy: the examples that broke (right → wrong) and were fixed, McNemar's exact p. **collapsed**: ΔNLL "
            "above ln 10, a perplexity more than 10× the reference's. Bounds: `paired.csv`.", ""]
    if table.empty:
        return "\n".join(head)
    show = pd.DataFrame({
        "model": table["model"], "dataset": table["dataset"], "setting": table["setting"], "examples": table["n_examples"],
        "Δ nll [interval]": [_interval(v, lo, hi) for v, lo, hi in zip(table["delta_nll"], table["delta_nll_lo"], table["delta_nll_hi"])],
        "Δ ppl [interval]": [_interval(v, lo, hi) for v, lo, hi in zip(table["delta_ppl"], table["delta_ppl_lo"], table["delta_ppl_hi"])],
    })
    if "collapsed" in table:
        show["collapsed"] = np.where(table["collapsed"].fillna(False).astype(bool), "collapsed", "")
    if "mcnemar_p" in table:
        has = table["mcnemar_p"].notna()
        show["broke / fixed"] = np.where(has, table["broke"].fillna(0).astype(int).astype(str) + " / " + table["fixed"].fillna(0).astype(int).astype(str), "")
        show["McNemar p"] = [f"{p:.3g}" if ok else "" for p, ok in zip(table["mcnemar_p"], has)]
    return "\n".join(head) + to_markdown(show)


FOREST_MAX = 40  # settings drawn in one forest plot (the largest |Δ|); the CSV has every one


def fig_paired(table: pd.DataFrame, model: str, dataset: str, spec: BootstrapSpec, path) -> "object | None":
    """A forest plot: Δ NLL of each setting against the reference with its paired interval, red where
    it does not cover 0, grey where it does; the :data:`FOREST_MAX` largest |Δ|. ΔNLL is a log ratio:
    its axis stays linear; a collapsed setting (ΔNLL > ln 10) sits in a band at the right end with its
    value and interval written, so that its interval — as wide as the collapse is loud — does not
    squeeze the others."""
    t = table[(table["model"] == model) & (table["dataset"] == dataset)]
    if t.empty:
        return None
    t = t.reindex(t["delta_nll"].abs().sort_values(ascending=False).index)[:FOREST_MAX]
    plt = pyplot()
    coll = collapsed_nll(t["delta_nll"])
    d, lo, hi = (t[c].to_numpy(dtype=float) for c in ("delta_nll", "delta_nll_lo", "delta_nll_hi"))
    axis = ValueAxis(d, coll, unbounded=True, extent=[0.0] + list(lo[~coll]) + list(hi[~coll]), log=False)
    labels = [s + (" (collapsed)" if c else "") for s, c in zip(t["setting"], coll)]
    fig, ax = plt.subplots(figsize=(7.0, rows_height(len(t), 0.28, 1.6)))
    y = row_axis(ax, labels)
    zero = covers_zero(t["delta_nll_lo"], t["delta_nll_hi"])
    ok = ~coll
    ax.errorbar(d[ok], y[ok], xerr=[d[ok] - lo[ok], hi[ok] - d[ok]], fmt="none", ecolor="black", capsize=2, lw=0.8)
    ax.scatter(axis.pos(d, coll), y, c=np.where(zero, "tab:grey", "tab:red"), zorder=3, s=18)
    ax.axvline(0, color="grey", lw=0.8, linestyle=":")
    for yi, v, a, b in zip(y[coll], d[coll], lo[coll], hi[coll]):  # the collapsed: their numbers, in the band
        ax.annotate(f"{v:+.2f} [{a:+.2f}, {b:+.2f}]", (axis.pos([v], [True])[0], yi), xytext=(0, -6), textcoords="offset points",
                    fontsize=6, ha="center", va="top", color="tab:red")
    axis.apply(ax, "x", label="collapsed (ΔNLL > ln 10)")
    ax.set_xlabel("Δ NLL per token against the reference (paired interval)")
    return save_figure(fig, path, f"{model} · {dataset}: {spec.level:.0%} paired bootstrap intervals (grey: covers 0)", fontsize=9)
