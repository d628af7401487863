"""lm-eval tasks in a sweep vs lm-eval's own CLI: one model load for 6 settings against 6 CLI runs.

    python bench/bench_harness.py [--model PATH] [--limit 200]

quantlens evaluates the task on the model it loaded once, patching each setting in place;
lm-eval's CLI (``lm_eval --model hf``) loads the model (and imports itself) on every run, and has no
quantized settings, so its 6 runs are the full-precision model. Prints both wall times and the ratio.
The task is written from the shared Lambada file (multiple choice: the last word against three
distractors), so the benchmark runs offline.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
SETTINGS = ["W16A16", "W8A8", "W4A16", "W4A8", "W3A16", "W4A16-nu"]


def main() -> None:
    from test_harness import write_tasks  # the offline task the tests use

    data = Path(os.environ.get("QUANTLENS_SHARED_DATA", REPO.parent / "shared" / "data"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(data / "models" / "tiny-opt"))
    ap.add_argument("--limit", type=int, default=200)
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = write_tasks(Path(tempfile.mkdtemp()) / "tasks")
    task = "ql_lambada_mc"

    t0 = time.perf_counter()
    from quantlens.evaluation.harness import evaluate_tasks
    from quantlens.model.loading import load_model
    from quantlens.quantize.patch import quantize_, restore_

    model, tok = load_model(args.model, device="auto", placement="single")
    accs = {}
    for s in SETTINGS:
        quantize_(model, s)
        try:
            accs[s] = evaluate_tasks(model, tok, [task], limit=args.limit, include_path=str(tasks))["metrics"][f"{task}_acc"]
        finally:
            restore_(model)
    ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in SETTINGS:
        subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={args.model}", "--tasks", task, "--include_path", str(tasks),
                        "--limit", str(args.limit), "--batch_size", "8", "--device", "cuda" if _cuda() else "cpu"],
                       check=True, capture_output=True, text=True)
    theirs = time.perf_counter() - t0
    print(f"{'setting':<10}{task}_acc")
    for s, a in accs.items():
        print(f"{s:<10}{a:.4f}")
    print(f"quantlens, one load, {len(SETTINGS)} settings: {ours:.1f} s | lm-eval CLI, {len(SETTINGS)} runs: {theirs:.1f} s | "
          f"ratio {theirs / ours:.2f}× (limit {args.limit}, {Path(args.model).name})")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
