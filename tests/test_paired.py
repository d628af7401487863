"""Paired statistics: exact values by hand, the bootstrap against a plain per-resample loop."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd
import pytest

from quantlens.analysis.paired import BootstrapSpec, fisher_interval, mcnemar_exact, paired_bootstrap, resample_counts
from quantlens.analysis.paired_report import paired_markdown, paired_pairs, paired_vs_reference


def test_mcnemar_exact_by_hand():
    # b = 2, c = 8: P(X ≤ 2 | n = 10, ½) = (1 + 10 + 45) / 1024, two-sided ×2
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024)
    assert mcnemar_exact(8, 2) == mcnemar_exact(2, 8)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def test_fisher_interval_by_hand():
    lo, hi = fisher_interval(np.array([0.5]), np.array([28]))  # se = 1/√25
    z = 1.959963984540054
    assert lo[0] == pytest.approx(math.tanh(math.atanh(0.5) - z / 5)) and hi[0] == pytest.approx(math.tanh(math.atanh(0.5) + z / 5))
    lo, hi = fisher_interval(np.array([0.3]), np.array([3]))
    assert np.isnan(lo[0]) and np.isnan(hi[0])


def _data(n=200, seed=0):
    g = np.random.default_rng(seed)
    tok = g.integers(50, 200, n).astype(float)
    base = g.normal(3.0, 0.5, n)
    return tok, base


def test_bootstrap_equals_a_plain_loop_over_resampled_indices():
    tok, base = _data()
    other = np.stack([base + np.random.default_rng(1).normal(0.05, 0.1, len(base)), base - 0.01], axis=1)
    spec = BootstrapSpec(resamples=300, seed=7)
    st = paired_bootstrap(tok, base, other, spec, group="m|d")
    rng = np.random.default_rng([7, zlib.crc32(b"m|d")])
    idx = rng.integers(0, len(tok), size=(300, len(tok)))
    d = np.array([[(tok[i] * (other[i, j] - base[i])).sum() / tok[i].sum() for j in range(2)] for i in idx])
    assert np.allclose(st["delta_nll_lo"], np.quantile(d, 0.025, axis=0)) and np.allclose(st["delta_nll_hi"], np.quantile(d, 0.975, axis=0))
    exact = (tok[:, None] * (other - base[:, None])).sum(0) / tok.sum()
    assert np.allclose(st["delta_nll"], exact)
    ppl = np.exp((tok[:, None] * other).sum(0) / tok.sum()) - np.exp((tok * base).sum() / tok.sum())
    assert np.allclose(st["delta_ppl"], ppl)
    ex = ((tok[:, None] * other) - (tok * base)[:, None]).mean(0)  # Lambada's metric: the mean of each example's summed NLL
    assert np.allclose(st["delta_example_nll"], ex)
    d2 = np.array([[(tok[i] * (other[i, j] - base[i])).mean() for j in range(2)] for i in idx])
    assert np.allclose(st["delta_example_nll_lo"], np.quantile(d2, 0.025, axis=0))
    assert (st["delta_nll_lo"] <= st["delta_nll"] + 1e-12).all() and (st["delta_nll"] <= st["delta_nll_hi"] + 1e-12).all()
    assert st["delta_nll_lo"][0] > 0  # a shift of +0.05 on 200 examples: the interval excludes 0
    assert resample_counts(len(tok), 300, 7, "m|d").sum(1).tolist() == [len(tok)] * 300


def test_a_setting_against_itself_is_zero_with_zero_width_and_seeds_reproduce():
    tok, base = _data()
    st = paired_bootstrap(tok, base, base[:, None], BootstrapSpec(resamples=200, seed=3))
    assert st["delta_nll_lo"][0] == 0 == st["delta_nll_hi"][0] and st["delta_ppl_lo"][0] == 0 == st["delta_ppl_hi"][0]
    other = (base + np.random.default_rng(2).normal(0, 0.2, len(base)))[:, None]
    a = paired_bootstrap(tok, base, other, BootstrapSpec(resamples=200, seed=3))
    b = paired_bootstrap(tok, base, other, BootstrapSpec(resamples=200, seed=3))
    c = paired_bootstrap(tok, base, other, BootstrapSpec(resamples=200, seed=4))
    assert a["delta_nll_lo"][0] == b["delta_nll_lo"][0] and a["delta_nll_lo"][0] != c["delta_nll_lo"][0]


def test_paired_tables_with_flips_and_missing_examples():
    tok, base = _data(60)
    rows = []
    for s, shift in (("W16A16", 0.0), ("W4A16", 0.2), ("W3A16", 0.6)):
        for i in range(60):
            rows.append({"model": "m", "dataset": "lambada", "setting": s, "example_id": f"e{i}", "n_tokens": tok[i],
                         "nll": base[i] + shift, "correct": float((i % 3 == 0) if s == "W16A16" else (i % 4 == 0))})
    ex = pd.DataFrame(rows)
    ex = ex[~((ex["setting"] == "W3A16") & (ex["example_id"] == "e5"))]  # one example missing under W3A16
    t = paired_vs_reference(ex, {"m": "W16A16"}, BootstrapSpec(resamples=100))
    assert set(t["setting"]) == {"W4A16", "W3A16"}
    w3 = t.set_index("setting").loc["W3A16"]
    assert w3["n_examples"] == 59 and w3["delta_nll"] == pytest.approx(0.6) and not w3["covers_zero"]
    was, now = np.arange(60) % 3 == 0, np.arange(60) % 4 == 0
    keep = np.arange(60) != 5
    broke, fixed = int((was & ~now & keep).sum()), int((~was & now & keep).sum())
    assert (w3["broke"], w3["fixed"]) == (broke, fixed) and w3["mcnemar_p"] == pytest.approx(mcnemar_exact(broke, fixed))
    pair = paired_pairs(ex, pd.DataFrame([{"model": "m", "setting": "W3A16", "against": "W4A16"}]), BootstrapSpec(resamples=100))
    assert pair.iloc[0]["delta_nll"] == pytest.approx(0.4)
    both = pd.concat([ex, ex.assign(dataset="wikitext2", correct=float("nan"))])  # a dataset without accuracy beside it
    t2 = paired_vs_reference(both, {"m": "W16A16"}, BootstrapSpec(resamples=100))
    assert t2[t2["dataset"] == "wikitext2"]["mcnemar_p"].isna().all() and t2[t2["dataset"] == "lambada"]["mcnemar_p"].notna().all()
    md = paired_markdown(t, BootstrapSpec(resamples=100))
    assert "McNemar p" in md and "[+0.6, +0.6]" in md
