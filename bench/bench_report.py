"""Cost of the per-example report as a function of the number of settings and of examples.

    python bench/bench_report.py [--settings 50 300 1000] [--examples 2 512 10000] [--pairwise-max 200]

Synthetic errors (W16A16 plus N seeded perturbation settings of one model, a few layers of residual
statistics, 128 random tokens per example), so that only the report is timed:

- ``pairs``: the pairwise statistics of every pair of settings (Pearson, Spearman, top-10 %
  Jaccard) as matrix operations (:func:`quantlens.analysis.per_example.error_correlation`), beside
  the per-pair loop they replaced (timed up to ``--pairwise-max`` settings; ratio printed);
- ``report``: the whole per-example report (tables, summaries, figures) written to a folder, with
  the size of ``error_correlation.md`` (the readable summary) and of the full pair CSV;
- ``stats``: the paired statistics inside it (every setting's bootstrap intervals against the
  reference, 1,000 resamples, and the Fisher intervals of every ρ), and their share of the report
  (budget: ≤ 5 % at 1,000 settings).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantlens.analysis import per_example as pe  # noqa: E402
from quantlens.analysis.paired import fisher_interval  # noqa: E402
from quantlens.analysis.paired_report import paired_vs_reference  # noqa: E402


def synthetic(n_settings: int, n_examples: int, layers: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.array([f"e{i:05d}" for i in range(n_examples)])
    hard = rng.gamma(2.0, 0.05, n_examples)  # examples that break under every setting (ρ > 0 between settings)
    settings = ["W16A16"] + [f"W8A8+gaussian-additive-both-s{s}" for s in range(n_settings)]
    nll = {"W16A16": 5 + rng.normal(0, 0.3, n_examples)}
    for s in settings[1:]:
        nll[s] = nll["W16A16"] + hard * rng.uniform(0.5, 1.5) + rng.normal(0, 0.02, n_examples)
    examples = pd.DataFrame({"model": "tiny-opt", "dataset": "wikitext2", "setting": np.repeat(settings, n_examples),
                             "example_id": np.tile(ids, len(settings)), "n_tokens": 127, "nll": np.concatenate([nll[s] for s in settings])})
    residual = pd.DataFrame({"model": "tiny-opt", "dataset": "wikitext2", "example_id": np.repeat(ids, layers),
                             "layer": np.tile(np.arange(layers), n_examples), "r_norm": rng.uniform(5, 10, n_examples * layers),
                             "z_norm": rng.uniform(5, 10, n_examples * layers), "r_kurtosis": 3.0})
    tokens = pd.DataFrame({"model": "tiny-opt", "dataset": "wikitext2", "example_id": ids,
                           "tokens": [list(rng.integers(0, 4096, 128)) for _ in ids]})
    bases = {s: "W8A8" for s in settings[1:]}
    return examples, residual, tokens, bases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", type=int, nargs="+", default=[50, 300, 1000])
    ap.add_argument("--examples", type=int, nargs="+", default=[2, 512])
    ap.add_argument("--pairwise-max", type=int, default=200, help="time the per-pair loop up to this many settings")
    args = ap.parse_args()
    print(f"{'settings':>8} {'examples':>8} {'pairs':>8} {'pairs s':>8} {'per-pair s':>10} {'ratio':>7} {'report s':>9} {'.md KB':>7} "
          f"{'.csv MB':>8} {'stats s':>8} {'stats %':>8}")
    for n_ex in args.examples:
        for n_set in args.settings:
            examples, residual, tokens, bases = synthetic(n_set, n_ex)
            err = pe.errors(examples, {"tiny-opt": "W16A16"})
            t = time.perf_counter()
            corr = pe.error_correlation(err)
            t_mat = time.perf_counter() - t
            t_loop = float("nan")
            if n_set <= args.pairwise_max:
                t = time.perf_counter()
                pe.error_correlation_pairwise(err)
                t_loop = time.perf_counter() - t
            with tempfile.TemporaryDirectory() as out:
                t = time.perf_counter()
                pe.write_per_example_report(examples, residual, tokens, {"tiny-opt": "W16A16"}, out, {"tiny-opt": "opt"}, bases=bases)
                t_rep = time.perf_counter() - t
                md = (Path(out) / "error_correlation.md").stat().st_size / 1024
                csv = (Path(out) / "error_correlation.csv").stat().st_size / 2**20
            t = time.perf_counter()
            paired_vs_reference(examples, {"tiny-opt": "W16A16"})
            fisher_interval(corr["pearson"].to_numpy(), corr["n_examples"].to_numpy())
            t_stats = time.perf_counter() - t
            print(f"{n_set:>8} {n_ex:>8} {len(corr):>8} {t_mat:>8.3f} {t_loop:>10.3f} {t_loop / t_mat:>6.0f}x {t_rep:>9.2f} {md:>7.1f} "
                  f"{csv:>8.2f} {t_stats:>8.2f} {100 * t_stats / t_rep:>7.1f}%")


if __name__ == "__main__":
    main()
