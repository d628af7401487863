"""A model's footprint before any GPU time: its size, the peak memory of each placement, the
placement ``auto`` picks and why, host RAM, and the time per setting (the plan of
:mod:`quantlens.pipeline.plan`; ``placement: auto`` and the evaluation's batch use it too).

Framework-free and torch-free (planning a 66B grid on a laptop imports neither). Every number comes
from a model's *shape*, read without loading a weight:

- a local folder or cached snapshot: ``config.json`` and the safetensors headers (exact counts,
  every linear's shape);
- a config only: the counts computed from its dimensions;
- neither (an uncached hub model, offline): the registry's dimensions (:data:`REGISTRY_CONFIGS`),
  marked "not cached".

The memory model (bytes; ``b`` = bytes per element of the evaluation dtype, ``B`` sequences of ``T``
tokens per batch) — what the evaluation code actually allocates:

- weights ``W = params·b``; while a linear is quantized, its fp32 copy and the quantized result
  (``(8 + b)·largest linear``);
- per sequence, in a forward: hidden states and their norms (``6·T·H·b``), the MLP's intermediate
  (``2·T·F·b``), eager attention scores where the family has no fused kernel (BLOOM's ALiBi:
  ``heads·T²·(b + 4)``), activation fake-quantization (``2·T·max_in·4``), and the LM head's logits
  with the loss' temporaries (``T·V·(2b + 4 + 4)``: the logits, the shifted copy, the fp32 cast unless fp32, log-softmax) —
  measured on CPU (peak RSS, ``tests/test_plan.py``) within 20 % of this;
- ``single``: ``W`` + the larger of (quantizing, a batch's forward);
- ``device_map`` over ``G`` GPUs: ``1.1·W/G`` (accelerate's balance) + a batch's forward;
- ``stream``: embeddings + head, two blocks (the current one and the next, arriving), quantizing
  one linear, the hidden states of every example kept between blocks (on the GPU up to a quarter of
  its memory, the rest in pinned host memory), one batch's forward.

The batch is the one the evaluation picks (:func:`auto_batch`, the same function) unless
``eval.batch_size`` is set. A placement *fits* when its peak with one sequence per batch, plus
the CUDA context (:data:`CONTEXT_GIB`), stays under 95 % of the GPU.

Time: ``2·N·tokens`` FLOPs per setting at :data:`DEFAULT_MFU` of the GPU's dense bf16 peak, or the
share ``bench/gpu_check.py`` measured on that GPU (``<cache>/gpu_calibration.json``); ``stream`` adds
reading every weight from disk once per setting (:data:`DISK_GBPS`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTEXT_GIB = 0.75  # CUDA context + allocator slack outside torch's counted peak
USABLE = 0.95  # share of a GPU's memory a plan may fill
DEFAULT_MFU = 0.35  # share of dense bf16 peak a batched HF forward reaches (bench/gpu_check.py measures it)
DISK_GBPS = 2.0  # checkpoint read bandwidth assumed for stream (NVMe, page cache cold)
CPU_GFLOPS_PER_CORE = 30.0  # fp32, what a CPU forward reaches per core
GIB = 2**30

# name: (memory GiB, dense bf16 TFLOP/s (fp16 where no bf16), bf16 support)
GPUS: dict[str, tuple[float, float, bool]] = {
    "B200": (180, 2250, True),
    "H200": (141, 989, True),
    "H100": (80, 989, True),
    "A100-80GB": (80, 312, True),
    "A100-40GB": (40, 312, True),
    "A100": (80, 312, True),
    "L40S": (48, 362, True),
    "A10G": (24, 70, True),
    "A10": (24, 125, True),
    "L4": (24, 121, True),
    "RTX4090": (24, 165, True),
    "V100": (32, 125, False),
    "T4": (16, 65, False),
}
UNKNOWN_GPU_TFLOPS = 312.0  # --gpu-memory without --gpu: time planned as on an A100


def _opt(layers: int, hidden: int, heads: int, proj: int | None = None) -> dict[str, Any]:
    return {"model_type": "opt", "num_hidden_layers": layers, "hidden_size": hidden, "ffn_dim": 4 * hidden,
            "num_attention_heads": heads, "vocab_size": 50272, "max_position_embeddings": 2048,
            "word_embed_proj_dim": proj or hidden, "tie_word_embeddings": True, "enable_bias": True}


def _bloom(layers: int, hidden: int, heads: int) -> dict[str, Any]:
    return {"model_type": "bloom", "n_layer": layers, "hidden_size": hidden, "n_head": heads, "vocab_size": 250880,
            "tie_word_embeddings": True}


def _llama(layers: int, hidden: int, ffn: int, heads: int, kv: int | None = None, vocab: int = 32000,
           model_type: str = "llama", max_pos: int = 2048, head_dim: int | None = None, bias: bool = False) -> dict[str, Any]:
    out = {"model_type": model_type, "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn,
           "num_attention_heads": heads, "num_key_value_heads": kv or heads, "vocab_size": vocab,
           "max_position_embeddings": max_pos, "tie_word_embeddings": False}
    if head_dim:
        out["head_dim"] = head_dim
    if bias:
        out["qkv_bias"] = True
    return out


# The registry's models, by their published configs: planning needs no download.
REGISTRY_CONFIGS: dict[str, dict[str, Any]] = {
    "opt-350m": {**_opt(24, 1024, 16, proj=512), "do_layer_norm_before": False},
    "opt-1.3b": _opt(24, 2048, 32), "opt-2.7b": _opt(32, 2560, 32), "opt-6.7b": _opt(32, 4096, 32),
    "opt-13b": _opt(40, 5120, 40), "opt-30b": _opt(48, 7168, 56), "opt-66b": _opt(64, 9216, 72),
    "bloom-560m": _bloom(24, 1024, 16), "bloom-1b1": _bloom(24, 1536, 16), "bloom-1b7": _bloom(24, 2048, 16),
    "bloom-3b": _bloom(30, 2560, 32), "bloom-7b1": _bloom(30, 4096, 32),
    "llama-7b": _llama(32, 4096, 11008, 32), "llama-13b": _llama(40, 5120, 13824, 40),
    "llama-30b": _llama(60, 6656, 17920, 52), "llama-65b": _llama(80, 8192, 22016, 64),
    "qwen2.5-7b": _llama(28, 3584, 18944, 28, 4, 152064, "qwen2", 131072, bias=True),
    "llama-3-8b": _llama(32, 4096, 14336, 32, 8, 128256, max_pos=8192),
    "mistral-nemo-12b": _llama(40, 5120, 14336, 32, 8, 131072, "mistral", 131072, head_dim=128),
    "llama-3-70b": _llama(80, 8192, 28672, 64, 8, 128256, max_pos=8192),
}


# --- Shapes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What a model's memory and time depend on."""

    params: int
    layers: int
    hidden: int
    ffn: int
    vocab: int
    heads: int
    model_type: str
    max_positions: int | None
    block_params: int  # one decoder block
    largest_linear: int  # elements of the largest linear weight in a block
    linears: dict[str, int] = field(default_factory=dict)  # block linear weight → its input features
    source: str = "checkpoint"  # checkpoint | config | registry
    checkpoint_bytes: int = 0  # bytes on disk (0: unknown; estimated as 2·params)
    head_dim: int | None = None  # of the attention heads (what a KV block must divide)

    @property
    def outside_params(self) -> int:
        return self.params - self.layers * self.block_params

    @property
    def max_in(self) -> int:
        return max(self.linears.values()) if self.linears else max(self.hidden, self.ffn)


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def dims(cfg: dict[str, Any]) -> dict[str, Any]:
    """A config's dimensions under one set of names (OPT, BLOOM, LLaMA-likes, GPT-style names)."""
    hidden = int(_get(cfg, "hidden_size", "n_embd", "d_model"))
    heads = int(_get(cfg, "num_attention_heads", "n_head", "num_heads"))
    return {
        "layers": int(_get(cfg, "num_hidden_layers", "n_layer", "num_layers")),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": int(_get(cfg, "num_key_value_heads", default=heads)),
        "head_dim": int(_get(cfg, "head_dim", default=hidden // heads)),
        "ffn": int(_get(cfg, "ffn_dim", "intermediate_size", "n_inner", default=4 * hidden)),
        "vocab": int(_get(cfg, "vocab_size")),
        "max_pos": _get(cfg, "max_position_embeddings", "n_positions"),
        "type": str(cfg.get("model_type", "")),
    }


def shape_from_config(cfg: dict[str, Any], source: str = "config") -> Shape:
    """Counts computed from a config's dimensions (exact for OPT, BLOOM and the LLaMA-likes)."""
    d = dims(cfg)
    H, F, V, L, t = d["hidden"], d["ffn"], d["vocab"], d["layers"], d["type"]
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    gated = t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
    biased = t in ("opt", "bloom", "gpt2", "gpt_neox", "falcon") and cfg.get("enable_bias", True)
    norm = 2 * H if t in ("opt", "bloom", "gpt2", "gpt_neox", "falcon") else H  # LayerNorm: weight + bias
    linears = {"q": (q, H), "k": (kv, H), "v": (kv, H), "o": (H, q)}
    linears.update({"gate": (F, H), "up": (F, H), "down": (H, F)} if gated else {"fc1": (F, H), "fc2": (H, F)})
    block = sum(o * i for o, i in linears.values()) + 2 * norm
    if biased:
        block += sum(o for o, _ in linears.values())
    elif t == "qwen2" or cfg.get("qkv_bias") or cfg.get("attention_bias"):
        block += q + 2 * kv
    E = int(cfg.get("word_embed_proj_dim") or H) if t == "opt" else H
    outside = V * E + norm  # embeddings, final norm
    if t == "opt":
        outside += (int(d["max_pos"] or 2048) + 2) * H + (2 * E * H if E != H else 0)
        if cfg.get("do_layer_norm_before") is False or cfg.get("_remove_final_layer_norm"):
            outside -= norm  # OPT-350m: post-LN, no final norm
    if t == "bloom":
        outside += norm  # word_embeddings_layernorm
    if not cfg.get("tie_word_embeddings", t in ("opt", "bloom", "gpt2")):
        outside += V * E
    return Shape(params=L * block + outside, layers=L, hidden=H, ffn=F, vocab=V, heads=d["heads"], model_type=t,
                 max_positions=int(d["max_pos"]) if d["max_pos"] else None, block_params=block,
                 largest_linear=max(o * i for o, i in linears.values()),
                 linears={f"layers.*.{n}": i for n, (_, i) in linears.items()}, source=source, head_dim=d["head_dim"])


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (names, dtypes, shapes): its first 8 + n bytes, no tensor read."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n <= 0 or n > 100 * 2**20:
            raise ValueError(f"{path.name}: not a safetensors file")
        return json.loads(fh.read(n))


_BLOCK = re.compile(r"(?:^|\.)(\d+)\.")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def shape_from_checkpoint(folder: str | Path) -> Shape:
    """Exact counts from ``config.json`` and the safetensors headers; the config's computed counts
    when the folder has no safetensors (e.g. only a config was cached)."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    computed = shape_from_config(cfg)
    if not files:
        return computed
    total = nbytes = block0 = 0
    linears: dict[str, int] = {}
    largest = 0
    for f in files:
        for name, meta in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            count = math.prod(meta["shape"])
            total += count
            nbytes += count * _DTYPE_BYTES.get(meta.get("dtype", "F16"), 2)
            m = _BLOCK.search(name)
            if m is None:
                continue
            if m.group(1) == "0":
                block0 += count
            shp = meta["shape"]
            if len(shp) == 2 and name.endswith(".weight") and "embed" not in name:
                linears[name] = int(shp[1])
                largest = max(largest, count)
    if block0 == 0:  # blocks not numbered as expected: the computed split is the best we know
        block0, largest = computed.block_params, computed.largest_linear
    return Shape(params=total, layers=computed.layers, hidden=computed.hidden, ffn=computed.ffn, vocab=computed.vocab,
                 heads=computed.heads, model_type=computed.model_type, max_positions=computed.max_positions,
                 block_params=block0, largest_linear=largest or computed.largest_linear,
                 linears=linears or computed.linears, source="checkpoint", checkpoint_bytes=nbytes, head_dim=computed.head_dim)


# --- Targets --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """The machine a plan is for."""

    kind: str  # cuda | cpu | mps
    name: str
    memory_gib: float  # per GPU (cpu: host RAM)
    count: int = 1
    tflops: float = 0.0  # dense peak in the plan's dtype
    bf16: bool = True
    mfu: float = DEFAULT_MFU
    calibrated: bool = False
    here: bool = True  # this machine (not --gpu / --gpu-memory)

    def describe(self) -> str:
        if self.kind == "cpu":
            return f"CPU ({self.name}, {self.memory_gib:.0f} GiB RAM)"
        how = "measured by bench/gpu_check.py" if self.calibrated else "assumed"
        return (f"{self.count}× {self.name} ({self.memory_gib:g} GiB each{'' if self.here else ', planned'}; "
                f"time at {self.mfu:.0%} of {self.tflops:g} TFLOP/s, {how})")


def calibration_file() -> Path:
    """Where ``bench/gpu_check.py`` records the share of peak each GPU reached (quantlens' cache)."""
    from quantlens.evaluation.data import cache_dir

    return cache_dir() / "gpu_calibration.json"


def record_calibration(gpu_name: str, mfu: float) -> Path:
    """Remember the share of peak ``gpu_name`` reached (``bench/gpu_check.py`` calls this)."""
    f = calibration_file()
    try:
        table = json.loads(f.read_text())
    except (OSError, ValueError):
        table = {}
    table[gpu_name] = round(float(mfu), 4)
    f.write_text(json.dumps(table, indent=1, sort_keys=True))
    return f


def _calibration(name: str) -> float | None:
    f = calibration_file()
    try:
        table = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    for key, mfu in table.items():
        if key.lower() in name.lower() or name.lower() in key.lower():
            return float(mfu)
    return None


def gpu_by_name(name: str) -> tuple[str, float, float, bool] | None:
    """A GPU name (``H100``, ``NVIDIA A100-SXM4-80GB``, ``a10g``) → (name, GiB, TFLOP/s, bf16)."""
    norm = name.upper().replace(" ", "").replace("NVIDIA", "").replace("GEFORCE", "")
    for key in sorted(GPUS, key=len, reverse=True):  # longest names first: A100-80GB before A100
        k = key.replace("-", "")
        if k in norm.replace("-", "").replace("SXM4", "").replace("PCIE", "").replace("SXM", ""):
            mem, tf, bf = GPUS[key]
            if key == "A100" and "40GB" in norm:
                mem = 40
            return key, mem, tf, bf
    return None


def host_ram_gib() -> float:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB
    except (ValueError, OSError, AttributeError):
        return float("nan")


def planned_target(gpu: str | None = None, gpu_memory: float | None = None, gpus: int | None = None) -> Target:
    """The machine named by ``--gpu`` / ``--gpu-memory`` / ``--gpus`` (a machine other than this one)."""
    from quantlens.quantize.settings import ConfigError

    if gpu is not None:
        found = gpu_by_name(gpu)
        if found is None:
            raise ConfigError(f"--gpu: unknown GPU {gpu!r} (known: {', '.join(GPUS)}); give --gpu-memory GiB instead")
        name, mem, tf, bf = found
    else:
        name, mem, tf, bf = "GPU", 0.0, UNKNOWN_GPU_TFLOPS, True
    if gpu_memory is not None:
        mem = gpu_memory
    cal = _calibration(name) if gpu is not None else None
    return Target("cuda", name, float(mem), gpus or 1, tf, bf, cal or DEFAULT_MFU, cal is not None, here=False)


def detected_target(device: str) -> Target:
    """This machine, as ``hardware.device`` will use it (torch imported: call only after preflight
    has decided the device is valid)."""
    import torch

    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda and torch.cuda.is_available():
        idx = int(device.split(":")[1]) if ":" in device else 0
        props = torch.cuda.get_device_properties(idx)
        found = gpu_by_name(props.name)
        tf = found[2] if found else UNKNOWN_GPU_TFLOPS
        cal = _calibration(props.name)
        return Target("cuda", props.name, props.total_memory / GIB, torch.cuda.device_count(), tf,
                      torch.cuda.is_bf16_supported(), cal or DEFAULT_MFU, cal is not None)
    cores = os.cpu_count() or 1
    return Target("cpu", f"{cores} cores", host_ram_gib(), 1, cores * CPU_GFLOPS_PER_CORE / 1000, True, 0.5)


# --- The estimate ---------------------------------------------------------------------------------
def auto_batch(free_bytes: float, seqlen: int, vocab: int, hidden: int) -> int:
    """The evaluation's batch on a GPU with ``free_bytes`` free (what :mod:`quantlens.evaluation.evaluate`
    uses): fp32 logits with the loss' temporaries and activations per sequence, 60 % of free memory, 1–64."""
    per_seq = seqlen * (vocab * 4 * 3 + hidden * 2 * 24)
    return int(max(1, min(64, 0.6 * free_bytes // per_seq)))


def dtype_bytes(dtype: str, target: Target) -> tuple[str, int]:
    if dtype == "auto":
        if target.kind == "cuda":
            return ("bfloat16", 2) if target.bf16 else ("float16", 2)
        return "float32", 4
    return dtype, {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


@dataclass
class Workload:
    """What the sweep asks of every model."""

    seqlen: int
    tokens: float  # per setting, all datasets
    examples: int  # perplexity examples kept between blocks by stream
    settings: int
    batch_size: int | None = None
    act_quant: bool = False
    dtype: str = "auto"
    placement: str = "auto"
    originals: str = "auto"


@dataclass
class Estimate:
    model: str
    shape: Shape
    target: Target
    dtype: str
    seqlen: int
    batch: dict[str, int]  # placement → batch it would run with
    peak_gib: dict[str, float]  # placement → peak GPU memory (torch's count) with that batch
    min_gib: dict[str, float]  # placement → peak with one sequence per batch
    fits: dict[str, bool]
    host_gib: dict[str, float]
    placement: str  # the one the run uses (auto resolved)
    why: str
    seconds_per_setting: float
    settings: int
    cached: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def weight_gb(self) -> float:
        return self.shape.params * (2 if self.dtype != "float32" else 4) / 1e9

    @property
    def seconds(self) -> float:
        return self.seconds_per_setting * self.settings

    def params(self) -> dict[str, Any]:
        """What an MLflow run records of the plan it ran under."""
        return {"placement": self.placement, "plan.peak_gpu_gib": round(self.peak_gib[self.placement], 3),
                "plan.batch_size": self.batch[self.placement], "plan.seconds_per_setting": round(self.seconds_per_setting, 1),
                "plan.target": self.target.name}


def _forward_bytes(s: Shape, T: int, b: int, act_quant: bool, logits: bool = True) -> float:
    per_seq = 6 * T * s.hidden * b + 2 * T * s.ffn * b
    if s.model_type == "bloom":  # eager ALiBi attention: [heads, T, T] scores and fp32 softmax
        per_seq += s.heads * T * T * (b + 4)
    if act_quant:
        per_seq += 2 * T * s.max_in * 4
    if logits:
        per_seq += T * s.vocab * _logit_bytes(b)
    return per_seq


def _logit_bytes(b: int) -> int:
    """Per logit: the head's output and its shifted copy (``2b``), the fp32 cast unless already fp32,
    log-softmax (4)."""
    return 2 * b + 4 + (0 if b == 4 else 4)


def estimate(model: str, shape: Shape, target: Target, work: Workload, cached: bool = True) -> Estimate:
    dtype, b = dtype_bytes(work.dtype, target)
    T = min(work.seqlen, shape.max_positions or work.seqlen)
    mem = target.memory_gib * GIB * USABLE - CONTEXT_GIB * GIB if target.kind == "cuda" else target.memory_gib * GIB
    W = shape.params * b
    quantizing = (8 + b) * shape.largest_linear
    block = shape.block_params * b
    outside = shape.outside_params * b
    fwd1 = _forward_bytes(shape, T, b, work.act_quant)
    block_fwd1 = _forward_bytes(shape, T, b, work.act_quant)  # one block's forward, or decoding a batch
    kept_all = work.examples * T * shape.hidden * b
    G = max(1, target.count)
    resident = {"single": W, "device_map": 1.1 * W / G, "stream": outside + 2 * block}
    kept = {"single": 0.0, "device_map": 0.0, "stream": min(kept_all, mem / 4) if target.kind == "cuda" else kept_all}
    batch, peak, low, fits = {}, {}, {}, {}
    for p in ("single", "device_map", "stream"):
        base = resident[p] + kept[p]
        one = fwd1 if p != "stream" else block_fwd1
        if work.batch_size:
            B = work.batch_size
        elif target.kind == "cuda":
            B = auto_batch(max(0.0, mem - base), T, shape.vocab, shape.hidden)
        else:
            B = 8
        batch[p] = B
        low[p] = (base + max(quantizing, one)) / GIB
        peak[p] = (base + max(quantizing, B * one)) / GIB
        fits[p] = target.kind != "cuda" or (base + max(quantizing, one)) <= mem
    if G == 1:
        fits["device_map"] = fits["single"]  # one GPU: device_map is single
    lin = shape.layers * shape.block_params * b  # the linears' originals (memory) ≈ the blocks
    originals_in_ram = work.originals == "memory" or (work.originals == "auto" and W <= host_ram_gib() * GIB / 4)
    host = {
        "single": (W + (lin if originals_in_ram else 0)) / GIB if target.kind == "cpu" else max(W, lin if originals_in_ram else 0) / GIB,
        "device_map": (lin if originals_in_ram else 2 * block) / GIB,
        "stream": (outside + 2 * block + max(0.0, kept_all - kept["stream"])) / GIB,
    }
    placement, why = _choose(work.placement, fits, W, target)
    flops = 2 * shape.params * work.tokens
    secs = flops / (target.tflops * 1e12 * target.mfu) if target.tflops else float("nan")
    notes = []
    if placement == "stream":
        secs += W / (DISK_GBPS * 1e9)
        notes.append(f"stream reads {W / 1e9:.0f} GB per setting (at {DISK_GBPS:g} GB/s)")
    return Estimate(model, shape, target, dtype, T, batch, peak, low, fits, host, placement, why, secs,
                    work.settings, cached, notes)


def _choose(asked: str, fits: dict[str, bool], W: float, target: Target) -> tuple[str, str]:
    if target.kind != "cuda":
        return (asked if asked != "auto" else "single"), "on the CPU, the model lives in host memory"
    if asked != "auto":
        return asked, "as configured"
    gib = W / GIB
    if fits["single"]:
        return "single", f"{gib:.1f} GiB of weights fit one {target.memory_gib:g} GiB GPU"
    if fits["device_map"]:
        return "device_map", f"{gib:.1f} GiB of weights need {target.count} GPUs of {target.memory_gib:g} GiB"
    many = "" if target.count == 1 else f" or {target.count} of them"
    return "stream", f"{gib:.1f} GiB of weights exceed one {target.memory_gib:g} GiB GPU{many}: blocks streamed from the checkpoint"


def placement_error(e: Estimate) -> str | None:
    """A configured placement that cannot fit the GPU: what to do instead (None: it fits)."""
    p = e.placement
    if e.target.kind != "cuda" or e.fits.get(p, True):
        return None
    others = [q for q in ("device_map", "stream") if q != p and e.fits[q]]
    hint = f"use placement: {' or '.join(others)}" if others else "no placement fits this GPU"
    where = f"{e.target.count} GPU(s) of" if p == "device_map" else "one"
    return (f"model {e.model}: placement: {p} needs ≈ {e.min_gib[p]:.1f} GiB (weights {e.weight_gb:.1f} GB in {e.dtype}) "
            f"and {where} {e.target.name} has {e.target.memory_gib:g} GiB: {hint}")


def _dur(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def format_estimate(e: Estimate) -> list[str]:
    """Two lines per model: size and where it comes from; placements, the choice, RAM and time."""
    s = e.shape
    src = {"checkpoint": "checkpoint headers", "config": "config", "registry": "registry"}[s.source]
    head = (f"{e.model}: {s.params / 1e9:.3g}B params, {e.weight_gb:.3g} GB in {e.dtype} "
            f"[{src}{'' if e.cached else ', not cached'}]")
    parts = []
    for p in ("single", "device_map", "stream"):
        if p == "device_map" and e.target.count == 1 and e.target.kind == "cuda":
            continue
        if e.target.kind != "cuda" and p != "single":
            continue
        mark = "" if e.fits[p] else " ✗"
        parts.append(f"{p} {e.peak_gib[p]:.1f} GiB (batch {e.batch[p]}){mark}")
    line2 = (f"  peak {' · '.join(parts)} → {e.placement}: {e.why}; host RAM ≈ {e.host_gib[e.placement]:.1f} GiB; "
             f"≈ {_dur(e.seconds_per_setting)} per setting, {_dur(e.seconds)} for {e.settings}")
    return [head, line2] + [f"  note: {n}" for n in e.notes]


