"""Differences a reviewer can trust: paired statistics over the same examples (numpy only).

quantlens keeps the error of every example of every run, so two settings can be compared *on the same
examples* — what lm-evaluation-harness's unpaired stderr cannot do.

- :func:`paired_bootstrap`: a percentile bootstrap over examples of the token-weighted mean ΔNLL and
  of Δ perplexity, for many settings against one baseline at once. The resamples are drawn once per
  (model, dataset) — the same multiset of examples for every setting (common random numbers), so the
  intervals of two settings are comparable and the cost is one matrix product: counts [B, n] times
  the per-example token-weighted NLLs [n, settings]. A setting against itself has Δ = 0 in every
  resample: the interval is [0, 0].
- :func:`mcnemar_exact`: the two-sided exact McNemar test on the examples that flipped either way
  (b right → wrong, c wrong → right): p = min(1, 2·P(X ≤ min(b, c))), X ~ Binomial(b + c, ½).
- :func:`fisher_interval`: the interval of a Pearson ρ over n examples by Fisher's z,
  tanh(atanh ρ ± z_(1−α/2)/√(n − 3)).

Seeds: a group's resamples come from ``numpy.random.default_rng([seed, crc32(group)])``, so an interval
depends only on the seed and its own examples — not on which other models or datasets are in the report.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class BootstrapSpec:
    resamples: int = RESAMPLES
    level: float = LEVEL
    seed: int = 0


def resample_counts(n: int, resamples: int, seed: int, group: str = "") -> np.ndarray:
    """[resamples, n] integers: how often each of the n examples is drawn in each resample (each row
    sums to n) — a with-replacement bootstrap, as counts so that every statistic is a matrix product."""
    rng = np.random.default_rng([seed, zlib.crc32(group.encode())])
    idx = rng.integers(0, n, size=(resamples, n))
    flat = (idx + np.arange(resamples)[:, None] * n).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n)


def paired_bootstrap(n_tokens: np.ndarray, nll_base: np.ndarray, nll: np.ndarray, spec: BootstrapSpec = BootstrapSpec(),
                     group: str = "") -> dict[str, np.ndarray]:
    """Δ of each column of ``nll`` [n, k] (mean NLL per token of each example) against ``nll_base`` [n],
    over the same examples weighted by ``n_tokens`` [n]: ``delta_nll`` = token-weighted mean of
    NLL − NLL_base (= log ppl − log ppl_base), ``delta_ppl`` = ppl − ppl_base, each with its percentile
    interval (``*_lo``, ``*_hi``) at ``spec.level`` over ``spec.resamples`` resamples; ``delta_example_nll``:
    the Δ of the mean over examples of each one's summed NLL (n_tokens × nll: Lambada's ``nll`` metric, the
    NLL of the target word). Arrays of length k."""
    w = np.asarray(n_tokens, dtype=np.float64)
    base = np.asarray(nll_base, dtype=np.float64) * w
    x = np.asarray(nll, dtype=np.float64).reshape(len(w), -1) * w[:, None]
    tot = w.sum()
    point_nll = (x.sum(0) - base.sum()) / tot
    point_ppl = np.exp(x.sum(0) / tot) - math.exp(base.sum() / tot)
    c = resample_counts(len(w), spec.resamples, spec.seed, group).astype(np.float64)
    # one product for the tokens, the baseline and every setting: identical columns get identical sums
    sums = c @ np.column_stack([w, base, x])
    wt = sums[:, 0]  # [B] tokens of each resample
    lb = sums[:, 1] / wt  # [B] log ppl of the baseline
    lx = sums[:, 2:] / wt[:, None]  # [B, k]
    d_nll = lx - lb[:, None]
    d_ppl = np.exp(lx) - np.exp(lb)[:, None]
    n = len(w)
    d_sum = (sums[:, 2:] - sums[:, 1:2]) / n  # the mean over examples of each one's summed NLL (Lambada's nll metric)
    a = (1 - spec.level) / 2
    q = lambda v: np.quantile(v, [a, 1 - a], axis=0)  # noqa: E731
    (nl, nh), (pl, ph), (sl, sh) = q(d_nll), q(d_ppl), q(d_sum)
    return {"delta_nll": point_nll, "delta_nll_lo": nl, "delta_nll_hi": nh,
            "delta_ppl": point_ppl, "delta_ppl_lo": pl, "delta_ppl_hi": ph,
            "delta_example_nll": (x.sum(0) - base.sum()) / n, "delta_example_nll_lo": sl, "delta_example_nll_hi": sh}


def mcnemar_exact(broke: int, fixed: int) -> float:
    """Two-sided exact McNemar p of ``broke`` (right → wrong) against ``fixed`` (wrong → right) flips."""
    n, k = int(broke) + int(fixed), min(int(broke), int(fixed))
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def fisher_interval(r: np.ndarray, n: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of Pearson ρ's interval by Fisher's z (NaN where n ≤ 3 or ρ is NaN;
    ρ = ±1 stays at ±1)."""
    r = np.clip(np.asarray(r, dtype=np.float64), -1.0, 1.0)
    n = np.asarray(n, dtype=np.float64)
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.where(n > 3, 1 / np.sqrt(np.maximum(n - 3, 1)), np.nan)
        zr = np.arctanh(r)
        return np.tanh(zr - z * se), np.tanh(zr + z * se)


def covers_zero(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The intervals that contain 0: differences not distinguishable from the examples' noise."""
    return (np.asarray(lo) <= 0) & (np.asarray(hi) >= 0)
