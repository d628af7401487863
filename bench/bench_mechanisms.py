"""Cost of the mechanism analyses (layer error, early exit, activation patching) as a multiple of
one plain evaluation of the same examples, in the same run.

    python bench/bench_mechanisms.py [--model PATH] [--setting W3A16] [--examples 32] [--rounds 3]

D_large and D_ctrl are stood in for by two sets of ``--examples`` WikiText-2 windows each; the
plain evaluation is the quantized model's perplexity over those same windows. Patching runs on
D_large only (one forward per patch variant), so the multiple grows with the number of variants
and, through the early exit, with the LM head's share of the model (large on small models).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantlens.evaluation.data import perplexity_windows  # noqa: E402
from quantlens.evaluation.evaluate import perplexity  # noqa: E402
from quantlens.analysis.mechanisms import block_parts, explain, layer_range, patch_variants  # noqa: E402
from quantlens.model.loading import load_model  # noqa: E402
from quantlens.quantize.patch import quantize_, restore_  # noqa: E402

SHARED = Path(os.environ.get("QUANTLENS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models" / "tiny-opt"))
    ap.add_argument("--text", default=str(SHARED / "wikitext2" / "test.txt"))
    ap.add_argument("--setting", default="W3A16")
    ap.add_argument("--layers", default="upper_half")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--examples", type=int, default=32, help="per set (D_large and D_ctrl)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    model, tok = load_model(args.model, device=args.device)
    w = perplexity_windows(tok, "wikitext2", args.seqlen, path=args.text, max_windows=2 * args.examples)
    sets = {"large": w[: args.examples].tolist(), "ctrl": w[args.examples :].tolist()}
    quantize_(model, args.setting, keep_originals_on="same")
    parts = block_parts(model)
    n_var = len(patch_variants(parts, layer_range(args.layers, len(parts))))
    print(f"model {args.model} ({len(parts)} layers) on {next(model.parameters()).device}, {args.setting}; "
          f"{args.examples} + {args.examples} windows × {args.seqlen}; {n_var} patch variants; layers {args.layers}")
    plain, full = [], []
    perplexity(model, w[:8], batch_size=args.batch_size)  # warm-up
    for _ in range(args.rounds):
        t = time.perf_counter()
        perplexity(model, w, batch_size=args.batch_size)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        explain(model, sets, layers=args.layers, batch_size=args.batch_size)
        full.append(time.perf_counter() - t)
    restore_(model)
    ratio = statistics.median(f / p for f, p in zip(full, plain))
    print(f"{'plain evaluation':<28}{statistics.median(plain):>9.3f} s")
    print(f"{'whole analysis':<28}{statistics.median(full):>9.3f} s   = {ratio:.1f}× plain (paired median of {args.rounds})")


if __name__ == "__main__":
    main()
