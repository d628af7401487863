"""Evaluation time of quantized settings relative to the unquantized model, in the same run.

    python bench/bench_quant.py [--model REF] [--settings W16A16 W4A16 W8A8] [--rounds 3] [--checkpoint DIR ...]
                                [--calibrate W4A16-g32-gptq W4A16-g32-awq] [--calib-samples 32]

Loads the model once, evaluates WikiText-2 perplexity under every setting in interleaved rounds
(so machine noise hits all settings alike) and prints the median paired ratio (and best-of-N), tokens/s, the ratio to
W16A16 and, on a GPU, the model FLOPs utilisation 2·params·tokens / time / peak. Released checkpoints
(``--checkpoint``; by default one GPTQ 4-bit g32 checkpoint of the model, written first) run as
``ckpt:<folder name>``: their patch time is the read and dequantization of every layer, their
evaluation a weight-only setting's.

``--model`` takes whatever a sweep takes (a registry name, a Hugging Face folder or id, a ``.gguf``
file: resolved and converted as the sweep's download task does; default: the shared tiny-opt).
Calibrated settings (GPTQ / AWQ: ``--calibrate``, and any ``-gptq`` / ``-awq`` name in ``--settings``)
are calibrated once, uncached, on ``--calib-samples`` windows of the bench's length — the windows
after the evaluated ones, as a sweep's calibration is disjoint from its evaluation — and the time is
printed in seconds and as a ratio to one W16A16 evaluation of the bench's windows (median over the
rounds). Those named in ``--settings`` are then evaluated with their calibrated weights like any other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantlens.evaluation.data import perplexity_windows  # noqa: E402
from quantlens.evaluation.evaluate import perplexity  # noqa: E402
from quantlens.model.loading import download, load_model, resolve_model  # noqa: E402
from quantlens.quantize.patch import quantize_, restore_  # noqa: E402

SHARED = Path(os.environ.get("QUANTLENS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16
# Budgets (× W16A16, paired in the same run): weights are quantized once, so weight-only formats cost
# nothing at evaluation; FP8 activations one cast per token; MX / NVFP4 activations blocks of 32 / 16.
BUDGETS = {"W4A16-nf4": 1.02, "W3A16-nf3": 1.02, "W4A16-fp4": 1.02, "W4A16-mxfp4": 1.02, "W4A16-nvfp4": 1.02,
           "W3A16-km": 1.02, "W4A16-km": 1.02, "W8A8-fp8": 1.08, "W4A4-mxfp4": 1.15, "W4A4-nvfp4": 1.15}
CHECKPOINT_BUDGET = 1.02  # a released checkpoint: dequantized once when patched, then a weight-only setting


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models" / "tiny-opt"))
    ap.add_argument("--text", default=str(SHARED / "wikitext2" / "test.txt"))
    ap.add_argument("--settings", nargs="+", default=["W16A16", "W4A16", "W8A8", "W4A16-nu", "W8A8-nu", *BUDGETS])
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-windows", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--checkpoint", nargs="*", default=None, help="released checkpoints of the model (default: one GPTQ W4 g32 written here)")
    ap.add_argument("--calibrate", nargs="*", default=["W4A16-g32-gptq", "W4A16-g32-awq"],
                    help="calibrated settings (GPTQ / AWQ) whose calibration is timed, not evaluated (none: --calibrate alone)")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows (of --seqlen tokens), after the evaluated ones")
    args = ap.parse_args()
    if args.settings[0] != "W16A16":
        args.settings.insert(0, "W16A16")

    from quantlens.quantize.settings import resolve_setting

    calibrate = list(dict.fromkeys([s for s in args.settings if resolve_setting(s).calibrated] + args.calibrate))
    for s in calibrate:
        if not resolve_setting(s).calibrated:
            ap.error(f"--calibrate {s}: not a calibrated setting (GPTQ / AWQ)")

    snapshot = download(resolve_model(args.model))  # as a sweep: registry name, folder, hub id, .gguf (converted once, cached)
    model, tok = load_model(snapshot, device=args.device)
    n_calib = args.calib_samples if calibrate else 0
    windows = perplexity_windows(tok, "wikitext2", args.seqlen, path=args.text, max_windows=args.max_windows + n_calib)
    calib_windows = windows[args.max_windows:args.max_windows + n_calib]
    windows = windows[:args.max_windows]
    if calibrate and calib_windows.shape[0] < args.calib_samples:
        sys.exit(f"calibration: {args.calib_samples} windows asked, {calib_windows.shape[0]} left after the {windows.shape[0]} "
                 "evaluated ones (lower --max-windows or --calib-samples)")
    n_params = sum(p.numel() for p in model.parameters())
    dev = next(model.parameters()).device
    print(f"model {args.model} ({n_params/1e6:.2f}M params; {snapshot.path}) on {dev} "
          f"{torch.cuda.get_device_name() if dev.type == 'cuda' else ''}; {windows.shape[0]} windows × {args.seqlen} tokens"
          f"; torch threads {torch.get_num_threads()}")

    import tempfile

    from quantlens.checkpoints.export import write_quantized
    from quantlens.checkpoints.released import describe, released_weights
    from quantlens.quantize.calibrate import calibrate_model

    folders = args.checkpoint if args.checkpoint is not None else [
        str(write_quantized(model, Path(tempfile.mkdtemp()) / "gptq-w4g32", "gptq", bits=4, group_size=32, sym=False))]
    released = {}
    for f in folders:
        r = describe(f)
        released[f"ckpt:{Path(f).name}"] = (r, resolve_setting({"name": Path(f).name, "checkpoint": f}).described(r.weights(), r.method, r.layout))
        BUDGETS[f"ckpt:{Path(f).name}"] = CHECKPOINT_BUDGET
    args.settings += list(released)

    def patch(s: str) -> None:
        if s in released:
            r, setting = released[s]
            weights, overrides, _ = released_weights(model, r)
            quantize_(model, setting, calibrated=weights, overrides=overrides)
        elif s in calibrated:
            quantize_(model, s, calibrated=calibrated[s])
        else:
            quantize_(model, s)

    perplexity(model, windows[:16], batch_size=args.batch_size)  # warm-up
    # Calibration, once per calibrated setting, uncached (calibrate_model, not calibrated_weights: the
    # sweep's cache would make a second run free), on the unpatched model, before the timed rounds.
    calibrated: dict[str, dict[str, torch.Tensor]] = {}
    calib_s: dict[str, float] = {}
    for s in calibrate:
        t = time.perf_counter()
        calibrated[s] = calibrate_model(model, resolve_setting(s), calib_windows, batch_size=args.batch_size or 8)
        calib_s[s] = time.perf_counter() - t
        print(f"  calibrated {s} in {calib_s[s]:.1f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {s: [] for s in args.settings}
    patch_s: dict[str, float] = {}
    ppl: dict[str, float] = {}
    for i in range(args.rounds):
        print(f"  round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for s in args.settings:
            t = time.perf_counter()
            patch(s)
            patch_s[s] = time.perf_counter() - t
            r = perplexity(model, windows, batch_size=args.batch_size)
            times[s].append(r["seconds"])
            ppl[s] = r["ppl"]
            restore_(model)
    # Primary figure: the median over rounds of the *paired* ratio (each setting against the W16A16
    # timing of the same round), robust to the slow drifts of a shared machine. Best-of-N beside it.
    base = min(times["W16A16"])
    peak = peak_flops()
    print(f"{'setting':<16}{'ppl':>10}{'median s':>10}{'tok/s':>10}{'× W16A16':>10}{'best-of-N ×':>13}{'patch s':>9}{'budget':>8}"
          + ("    MFU" if peak else ""))
    over = []
    for s in args.settings:
        paired = statistics.median(t / b for t, b in zip(times[s], times["W16A16"]))
        t = statistics.median(times[s])
        tps = windows.numel() / t
        budget = BUDGETS.get(s)
        mark = "" if budget is None else f"{budget:.2f}" + (" ok" if paired <= budget else " OVER")
        if budget is not None and paired > budget:
            over.append(s)
        line = f"{s:<16}{ppl[s]:>10.3f}{t:>10.3f}{tps:>10.0f}{paired:>10.3f}{min(times[s]) / base:>13.3f}{patch_s[s]:>9.3f}{mark:>10}"
        if peak:
            line += f"   {2 * n_params * tps / peak:>5.1%}"
        print(line)
    print("every budget met" if not over else f"over budget: {', '.join(over)}")
    if calibrate:
        eval_s = statistics.median(times["W16A16"])
        print(f"calibration, once per setting: {calib_windows.shape[0]} windows × {args.seqlen} tokens (after the evaluated ones), "
              f"not cached; ratio to one W16A16 evaluation of the {windows.shape[0]} windows ({eval_s:.3f} s, median)")
        print(f"{'setting':<20}{'seconds':>10}{'× W16A16 eval':>15}")
        for s in calibrate:
            print(f"{s:<20}{calib_s[s]:>10.2f}{calib_s[s] / eval_s:>15.2f}")


if __name__ == "__main__":
    main()
