"""The GPU check: evaluation throughput, MFU and fake-quantization overhead on real model shapes.

    python bench/gpu_check.py [--out gpu_check.json] [--shapes opt-1.3b opt-6.7b llama-7b]
    python bench/gpu_check.py --smoke            # tiny shapes on CPU (the test suite runs this)

No downloads: each model is built from its config with random weights, directly on the device in
bf16 (fp32 on CPU). For every shape it evaluates the same random token windows under W16A16,
W4A16, W8A8 and W8A8-nu (weights quantized once, activations per forward), and — on the first
shape — W16A16 streamed from host memory, and W16A16 / W4A16 as ``placement: stream`` runs them
(saved to safetensors, each block read from the checkpoint and patched on the device, layer by
layer). Prints a table: tokens/s, MFU (2·N·T / time / peak dense bf16), the ratio of each setting
to W16A16 in the same run, stream ÷ single (host memory; checkpoint), peak device memory; writes the same as JSON. Sized to finish in a few minutes
on one H100 (the 6.7B/7B shapes dominate).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantlens.evaluation.evaluate import perplexity  # noqa: E402
from quantlens.quantize.patch import quantize_, restore_  # noqa: E402
from quantlens.model.streaming import disable_streaming, enable_streaming, load_streaming, transfer_bytes  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16
SHAPES = {  # name: (family, hidden, ffn, layers, heads)
    "opt-1.3b": ("opt", 2048, 8192, 24, 32),
    "opt-6.7b": ("opt", 4096, 16384, 32, 32),
    "llama-7b": ("llama", 4096, 11008, 32, 32),
    "tiny-opt": ("opt", 64, 256, 2, 4),
    "tiny-llama": ("llama", 64, 172, 2, 4),
}
SETTINGS = ["W16A16", "W4A16", "W8A8", "W8A8-nu"]


def build(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    family, hidden, ffn, layers, heads = SHAPES[name]
    if family == "opt":
        cfg = OPTConfig(hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                        word_embed_proj_dim=hidden, max_position_embeddings=2048, vocab_size=50272)
    else:
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=heads, max_position_embeddings=2048, vocab_size=32000)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def timed_eval(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    perplexity(model, windows, batch_size=batch_size, keep_examples=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (seconds)")
    ap.add_argument("--shapes", nargs="+", default=None)
    ap.add_argument("--windows", type=int, default=None, help="windows per evaluation (default 16; smoke 4)")
    ap.add_argument("--seqlen", type=int, default=None, help="default 2048; smoke 32")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shapes = args.shapes or (["tiny-opt", "tiny-llama"] if args.smoke else ["opt-1.3b", "opt-6.7b", "llama-7b"])
    n_win = args.windows or (4 if args.smoke else 16)
    seqlen = args.seqlen or (32 if args.smoke else 2048)
    bs = args.batch_size or (2 if args.smoke else 8)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)
    print(f"device {name}; {n_win} windows × {seqlen} tokens, batch {bs}, {dtype}")
    results = []
    for i, shape in enumerate(shapes):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = build(shape, device, dtype)
        n_params = sum(p.numel() for p in model.parameters())
        gen = torch.Generator().manual_seed(0)
        windows = torch.randint(0, model.config.vocab_size, (n_win, seqlen), generator=gen)
        timed_eval(model, windows[:bs], bs)  # warm-up (kernels, allocator)
        row: dict = {"shape": shape, "params_b": n_params / 1e9, "tokens": n_win * seqlen}
        base = None
        for s in SETTINGS:
            quantize_(model, s, keep_originals_on="same" if device.type == "cpu" else "cpu")
            secs = timed_eval(model, windows, bs)
            restore_(model)
            tps = n_win * seqlen / secs
            row[s] = {"seconds": secs, "tokens_per_s": tps, "mfu": 2 * n_params * tps / peak if peak else None}
            base = base or secs
            row[s]["x_w16a16"] = secs / base
        if i == 0:  # placement stream: blocks on the host, one at a time on the device, layer-wise
            model.to("cpu")
            enable_streaming(model, device)
            secs = timed_eval(model, windows, bs)
            disable_streaming(model)
            row["stream_x_single"] = secs / base
            # ... and as placement: stream loads it: blocks read from safetensors, patched on the device
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                del model
                streamed = load_streaming(tmp, device, dtype)
                for s in ("W16A16", "W4A16"):
                    quantize_(streamed, s)
                    transfer_bytes(streamed, reset=True)
                    secs = timed_eval(streamed, windows, bs)
                    row[f"stream_ckpt_{s}_x_single"] = secs / row[s]["seconds"]
                    row["stream_ckpt_bytes_moved"] = transfer_bytes(streamed)
                    restore_(streamed)
                model = streamed
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        results.append(row)
        del model
    head = f"{'shape':<12}{'params':>8}{'tok/s W16A16':>14}{'MFU':>7}" + "".join(f"{s + ' ×':>11}" for s in SETTINGS[1:])
    head += f"{'stream ×':>10}{'ckpt ×':>8}{'peak GB':>9}"
    print(head)
    for r in results:
        mfu = r["W16A16"]["mfu"]
        line = f"{r['shape']:<12}{r['params_b']:>7.2f}B{r['W16A16']['tokens_per_s']:>14.0f}{(f'{mfu:.1%}' if mfu else '-'):>7}"
        line += "".join(f"{r[s]['x_w16a16']:>11.3f}" for s in SETTINGS[1:])
        line += f"{r.get('stream_x_single', float('nan')):>10.2f}{r.get('stream_ckpt_W16A16_x_single', float('nan')):>8.2f}"
        line += f"{r['peak_memory_gb']:>9.1f}" if r["peak_memory_gb"] is not None else f"{'-':>9}"
        print(line)
    Path(args.out).write_text(json.dumps({"device": name, "dtype": str(dtype), "windows": n_win, "seqlen": seqlen,
                                          "batch_size": bs, "results": results}, indent=2))
    print(f"wrote {args.out}")
    mfus = [r["W16A16"]["mfu"] for r in results if r["W16A16"]["mfu"]]
    if device.type == "cuda" and mfus:  # the plan's time estimates on this GPU use what it measured
        from quantlens.model.footprint import record_calibration

        f = record_calibration(name, max(mfus))
        print(f"plan calibration: {name} reaches {max(mfus):.1%} of peak ({f})")


if __name__ == "__main__":
    main()
