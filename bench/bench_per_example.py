"""Cost of the per-example analysis' data against plain evaluation, in the same run.

    python bench/bench_per_example.py [--model PATH] [--rounds 7] [--max-windows 1024]

Three modes over the same WikiText-2 windows, interleaved round by round (machine noise hits them
alike), each timed end to end (evaluation + building the tables + writing them as parquet, as the
sweep logs them):

- ``plain``: the summed NLL only (what evaluation cost before per-example storage);
- ``per-example``: + the NLL of every window, its id, the table written to parquet;
- ``+ residual``: + the full-precision residual-stream statistics (hooks on every block).

Prints the median of the paired ratios against ``plain`` (goals: ≤ 1.02× and ≤ 1.05×).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantlens.evaluation.data import perplexity_windows  # noqa: E402
from quantlens.evaluation.evaluate import perplexity  # noqa: E402
from quantlens.model.loading import load_model  # noqa: E402

SHARED = Path(os.environ.get("QUANTLENS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def run(model: torch.nn.Module, windows: torch.Tensor, mode: str, bs: int | None, out: Path) -> float:
    t = time.perf_counter()
    r = perplexity(model, windows, batch_size=bs, keep_examples=mode != "plain", residual=mode == "+ residual")
    if mode != "plain":
        r["per_example"].to_parquet(out / "per_example.parquet", index=False)
    if mode == "+ residual":
        r["residual"].to_parquet(out / "residual.parquet", index=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models" / "tiny-opt"))
    ap.add_argument("--text", default=str(SHARED / "wikitext2" / "test.txt"))
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-windows", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    model, tok = load_model(args.model, device=args.device)
    windows = perplexity_windows(tok, "wikitext2", args.seqlen, path=args.text, max_windows=args.max_windows)
    print(f"model {args.model} on {next(model.parameters()).device}; {windows.shape[0]} windows × {args.seqlen} tokens, {args.rounds} rounds")
    modes = ["plain", "per-example", "+ residual"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as d:
        perplexity(model, windows[:16], batch_size=args.batch_size, residual=True)  # warm-up
        for i in range(args.rounds):
            for m in modes[i % 3:] + modes[: i % 3]:  # rotate the order: no mode always runs first
                times[m].append(run(model, windows, m, args.batch_size, Path(d)))
    print(f"{'mode':<14}{'median s':>10}{'× plain (paired median)':>26}{'best-of-N ×':>13}")
    for m in modes:
        paired = statistics.median(t / b for t, b in zip(times[m], times["plain"]))
        print(f"{m:<14}{statistics.median(times[m]):>10.3f}{paired:>26.3f}{min(times[m]) / min(times['plain']):>13.3f}")


if __name__ == "__main__":
    main()
