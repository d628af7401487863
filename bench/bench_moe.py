"""Evaluation time of an MoE under quantized settings, relative to its unquantized self, in one run.

    python bench/bench_moe.py [--experts 8] [--top-k 2] [--hidden 256] [--layers 4] [--rounds 5]

A Mixtral-shaped model (random weights: time does not depend on them) is built once; perplexity of
random token windows is timed under every setting in interleaved rounds, and the median paired ratio
to W16A16 printed beside its budget. Weights are quantized once, every expert slice at patch time
(``patch s``); activation settings quantize each expert's routed tokens in the model's own experts
kernel (row-wise specs) or in quantlens' per-expert loop (per-tensor specs, ``W8A8-tensor``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantlens.evaluation.evaluate import perplexity  # noqa: E402
from quantlens.quantize.patch import quantize_, restore_  # noqa: E402

PER_TENSOR = {"name": "W8A8-tensor", "weights": {"bits": 8}, "activations": {"bits": 8, "granularity": "tensor"}}
BUDGETS = {"W8A8": 1.2, "W4A16": 1.02, "W4A16-g128": 1.02}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=4096, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=args.experts,
                        num_experts_per_tok=args.top_k, max_position_embeddings=args.seqlen)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(args.device).eval()
    windows = torch.randint(0, 4096, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(1))
    settings = ["W16A16", "W8A8", "W4A16", "W4A16-g128", PER_TENSOR]
    names = [s if isinstance(s, str) else s["name"] for s in settings]
    print(f"MoE {args.layers} layers × {args.experts} experts (top {args.top_k}), hidden {args.hidden}, "
          f"experts kernel {model.config._experts_implementation}, on {args.device}; {args.windows} windows × {args.seqlen}")
    perplexity(model, windows[:8], batch_size=8)  # warm-up
    times = {n: [] for n in names}
    patch_s: dict[str, float] = {}
    ppl: dict[str, float] = {}
    for _ in range(args.rounds):
        for s, n in zip(settings, names):
            t = time.perf_counter()
            quantize_(model, s)
            patch_s[n] = time.perf_counter() - t
            r = perplexity(model, windows, batch_size=8)
            times[n].append(r["seconds"])
            ppl[n] = r["ppl"]
            restore_(model)
    print(f"{'setting':<14}{'ppl':>10}{'median s':>10}{'× W16A16':>10}{'patch s':>9}{'budget':>10}")
    over = []
    for n in names:
        paired = statistics.median(t / b for t, b in zip(times[n], times["W16A16"]))
        budget = BUDGETS.get(n)
        mark = "" if budget is None else f"{budget:.2f}" + (" ok" if paired <= budget else " OVER")
        if budget is not None and paired > budget:
            over.append(n)
        print(f"{n:<14}{ppl[n]:>10.2f}{statistics.median(times[n]):>10.3f}{paired:>10.3f}{patch_s[n]:>9.3f}{mark:>10}")
    print("every budget met" if not over else f"over budget: {', '.join(over)}")


if __name__ == "__main__":
    main()
