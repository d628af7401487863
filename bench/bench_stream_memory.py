"""Host memory and transfers of ``placement: stream``, measured on CPU.

Random-init OPT models of one width with 4 and 16 layers are saved as sharded safetensors; each
(model, mode) runs a small sweep (W16A16, W4A16, W8A8 on the same windows) in a fresh process that
reports the most host memory it held above what the imports took (RSS after loading and after
each setting's evaluation, while the setting is applied) and the bytes of block weights brought to the compute device per setting:

- ``stream``: the model as ``placement: stream`` loads it now — a skeleton, each block read from
  the checkpoint when it runs, evaluation layer by layer;
- ``in-memory``: the whole model loaded into host memory, blocks copied per batch (what ``stream``
  did before): originals and quantized copies both live in RAM.

The growth of peak RSS from 4 to 16 layers is what the extra 12 blocks cost: in ``stream`` it must
stay under two blocks (tests/test_stream_memory.py runs ``--quick``).

    python bench/bench_stream_memory.py [--hidden 1024] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = ["W16A16", "W4A16", "W8A8"]


def make_model(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    """Save a random-init OPT; returns the bytes of one decoder block (fp32)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=layers,
                    num_attention_heads=max(1, hidden // 64), word_embed_proj_dim=hidden, max_position_embeddings=256)
    m = OPTForCausalLM(cfg).eval()
    block = sum(p.numel() * p.element_size() for p in m.model.decoder.layers[0].parameters())
    m.save_pretrained(folder, max_shard_size=f"{max(1, 3 * block // 2**20)}MB")  # a few blocks per shard
    return block


def child(folder: str, mode: str, windows: int, batch: int) -> None:
    """One sweep in this process; prints JSON with peak RSS and bytes moved per setting."""
    import torch

    from quantlens.evaluation.evaluate import perplexity
    from quantlens.model.loading import load_model
    from quantlens.quantize.patch import quantize_, restore_
    from quantlens.model.streaming import enable_streaming, transfer_bytes

    torch.set_num_threads(1)
    from transformers.models.opt import modeling_opt  # noqa: F401  (imported before the baseline, not counted)

    base = _rss()
    samples = []
    if mode == "stream":
        model, _ = load_model(folder, device="cpu", placement="stream")
    else:
        model, _ = load_model(folder, device="cpu", placement="single")
        enable_streaming(model, "cpu")  # blocks copied per batch, as stream did before
    samples.append(_rss())
    ids = torch.randint(0, model.config.vocab_size, (windows, 128), generator=torch.Generator().manual_seed(0))
    moved, ppl = {}, {}
    for st in SETTINGS:
        quantize_(model, st)
        transfer_bytes(model, reset=True)
        if mode == "stream":
            ppl[st] = perplexity(model, ids, batch_size=batch)["ppl"]
        else:  # a plain forward per batch: each block crosses once per batch
            with torch.inference_mode():
                for s in range(0, windows, batch):
                    model(input_ids=ids[s:s + batch], use_cache=False)
        moved[st] = transfer_bytes(model)
        samples.append(_rss())  # the setting applied, evaluated: originals and copies still held
        restore_(model)
    print(json.dumps({"peak_rss": max(samples) - base, "moved": moved, "ppl": ppl}))


def _rss() -> int:
    """Resident set size now (Linux /proc; elsewhere the peak so far)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _start(folder: Path, mode: str, windows: int, batch: int) -> subprocess.Popen:
    # glibc serves a freed-then-reallocated tensor of a few MB from its heap (its mmap threshold
    # grows up to 32 MB) and keeps the heap's pages: RSS then wanders by ~100 MB between identical
    # runs. Real blocks (hundreds of MB to GB) are always mmap-ed and returned; a fixed threshold
    # makes these small ones behave the same, so the figures measure what is held, not the allocator.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    return subprocess.Popen([sys.executable, __file__, "--child", str(folder), mode, str(windows), str(batch)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _collect(p: subprocess.Popen) -> dict:
    out, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(err[-3000:])
    return json.loads(out.strip().splitlines()[-1])


def run(hidden: int, vocab: int, windows: int, batch: int, root: Path) -> dict:
    out: dict = {"hidden": hidden, "layers": {}, "settings": SETTINGS, "windows": windows, "batch": batch}
    for layers in (4, 16):
        out["block_bytes"] = make_model(root / f"opt-h{hidden}-l{layers}", hidden, layers, vocab)
    procs = {}  # one process per measurement, all at once: each reports only its own memory
    for layers in (4, 16):
        for mode in ("stream", "in-memory"):
            procs[layers, mode] = _start(root / f"opt-h{hidden}-l{layers}", mode, windows, batch)
    for (layers, mode), p in procs.items():
        out["layers"].setdefault(layers, {})[mode] = _collect(p)
    for mode in ("stream", "in-memory"):
        out[f"growth_{mode}"] = out["layers"][16][mode]["peak_rss"] - out["layers"][4][mode]["peak_rss"]
    return out


def report(res: dict) -> str:
    mb = 2**20
    block = res["block_bytes"]
    lines = [f"random-init OPT, hidden {res['hidden']}, one block = {block / mb:.1f} MiB (fp32); sweep {', '.join(res['settings'])}; "
             f"{res['windows']} windows of 128 tokens, batch {res['batch']}",
             f"{'layers':>6} {'mode':>10} {'peak RSS MiB':>13} {'moved per setting (blocks)':>28}"]
    for layers, modes in res["layers"].items():
        for mode, r in modes.items():
            per = r["moved"][res["settings"][-1]] / block
            lines.append(f"{layers:>6} {mode:>10} {r['peak_rss'] / mb:>13.1f} {per:>28.1f}")
    for mode in ("stream", "in-memory"):
        g = res[f"growth_{mode}"]
        lines.append(f"growth 4 → 16 layers, {mode}: {g / mb:.1f} MiB = {g / block:.2f} blocks")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="hidden 512, 8 windows (the test)")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    hidden, vocab, windows = (512, 2048, 8) if a.quick else (a.hidden, 8192, 16)
    with tempfile.TemporaryDirectory() as tmp:
        res = run(hidden, vocab, windows, 4, Path(tmp))
    print(report(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
