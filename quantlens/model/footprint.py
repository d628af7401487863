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
  (``(8 + b)·largest linear``; an MoE's fused experts tensor is quantized expert matrix by matrix into
  a new tensor: ``+ 2b·largest experts tensor``);
- per sequence, in a forward: hidden states and their norms (``6·T·H·b``), the MLP's intermediate
  (``2·T·F·b``), eager attention scores where the family has no fused kernel (BLOOM's ALiBi:
  ``heads·T²·(b + 4)``), activation fake-quantization (``2·T·max_in·4``), and the LM head's logits
  with the loss' temporaries (``T·V·(2b + 4 + 4)``: the logits, the shifted copy, the fp32 cast unless fp32, log-softmax) —
  measured on CPU (peak RSS, ``tests/test_plan.py``) within 20 % of this;
- ``single``: ``W`` + the larger of (quantizing, a batch's forward);
- ``device_map`` over ``G`` GPUs: ``1.1·W/G`` (accelerate's balance) + a batch's forward;
- ``stream``: embeddings + head, two blocks (the current one and the next, arriving), quantizing
  one linear, the hidden states of every example kept between blocks (``Shape.kept`` values a token:
  Gemma-3n's four streams and per-layer inputs; on the GPU up to a quarter of
  its memory, the rest in pinned host memory), one batch's forward.

The batch is the one the evaluation picks (:func:`auto_batch`, the same function) unless
``eval.batch_size`` is set. A placement *fits* when its peak with one sequence per batch, plus
the CUDA context (:data:`CONTEXT_GIB`), stays under 95 % of the GPU.

A mixture of experts holds all its experts (``W`` counts every one; ``stream``'s two blocks are the
largest blocks, e.g. DeepSeek's MoE blocks rather than its dense first one); its MLP intermediate
``F`` is that of the top-k experts a token is routed to, plus the shared experts. A hybrid's blocks
are of several kinds (Qwen3.5's DeltaNet and attention blocks; Nemotron-H's Mamba-2, attention, MLP
and MoE ones), each counted as its kind.

Time: ``2·N·tokens`` FLOPs per setting (``N`` the parameters a token uses: an MoE's top-k experts,
shared experts and everything outside the experts) at :data:`DEFAULT_MFU` of the GPU's dense bf16
peak, or the share ``bench/gpu_check.py`` measured on that GPU (``<cache>/gpu_calibration.json``); ``stream`` adds
reading every weight from disk once per setting (:data:`DISK_GBPS`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from quantlens.model.shape import ModelShape

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


def _pythia(layers: int, hidden: int, heads: int, vocab: int = 50304) -> dict[str, Any]:
    return {"model_type": "gpt_neox", "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": 4 * hidden,
            "num_attention_heads": heads, "vocab_size": vocab, "max_position_embeddings": 2048, "rotary_pct": 0.25,
            "use_parallel_residual": True, "tie_word_embeddings": False}


def _llama4(experts: int, moe_step: int, max_pos: int) -> dict[str, Any]:
    """Llama-4's text model (its config.json's text_config): routed experts and one shared expert of
    8,192, the blocks between MoE blocks dense MLPs of 16,384."""
    return {**_llama(48, 5120, 8192, 40, 8, 202048, "llama4_text", max_pos, head_dim=128), "intermediate_size_mlp": 16384,
            "num_local_experts": experts, "num_experts_per_tok": 1, "interleave_moe_layer_step": moe_step, "attention_bias": False}


def _mamba_and_attention(layers: int, attention_at: tuple[int, ...]) -> list[str]:
    """A hybrid's layer_types as Granite-4's config.json lists them: Mamba blocks, attention at these."""
    return ["attention" if i in attention_at else "mamba" for i in range(layers)]


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
    # Mixtures of experts (their config.json; issue 25). Every expert counts in params (memory), the
    # top-k in active_params (time). The figures are quoted from the published configs as I know
    # them; the least certain are OLMoE's vocab (50304, the padded embedding) and DeepSeek-V2-Lite's
    # dense intermediate (10944, its first block only).
    "mixtral-8x7b": {**_llama(32, 4096, 14336, 32, 8, 32000, "mixtral", 32768),
                     "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen3-30b-a3b": {**_llama(48, 2048, 6144, 32, 4, 151936, "qwen3_moe", 40960, head_dim=128),
                      "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                      "decoder_sparse_step": 1, "mlp_only_layers": [], "attention_bias": False},
    "deepseek-v2-lite": {**_llama(27, 2048, 10944, 16, 16, 102400, "deepseek_v2", 163840),
                         "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2,
                         "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
                         "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                         "v_head_dim": 128, "attention_bias": False},
    "olmoe-1b-7b": {**_llama(16, 2048, 1024, 16, 16, 50304, "olmoe", 4096),
                    "num_experts": 64, "num_experts_per_tok": 8, "attention_bias": False},
    "gpt-oss-20b": {**_llama(24, 2880, 2880, 64, 8, 201088, "gpt_oss", 131072, head_dim=64),
                    "num_local_experts": 32, "num_experts_per_tok": 4, "attention_bias": True, "sliding_window": 128},
    # Hybrids and Llama-4 (their config.json, the text model of the multimodal ones). Llama-4: Scout's
    # 16 experts in every block, Maverick's 128 in every second one, a shared expert beside them. The
    # least certain figures: Llama-4's max_position_embeddings (Scout's 10M, Maverick's 1M context),
    # Nemotron-H's n_groups (8) and Granite-4.0-H-Tiny's attention indices (5, 15, 25, 35); the
    # Qwen3.5 and Granite ones are quoted from configs re-published by others, not read from the hub.
    "llama-4-scout-17b-16e": _llama4(16, 1, 10485760),
    "llama-4-maverick-17b-128e": _llama4(128, 2, 1048576),
    "qwen3.5-35b-a3b": {"model_type": "qwen3_5_moe_text", "num_hidden_layers": 40, "hidden_size": 2048, "num_attention_heads": 16,
                        "num_key_value_heads": 2, "head_dim": 256, "vocab_size": 248320, "max_position_embeddings": 262144,
                        "tie_word_embeddings": False, "attention_bias": False, "num_experts": 256, "num_experts_per_tok": 8,
                        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "full_attention_interval": 4,
                        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
                        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4},
    "nemotron-h-8b": {"model_type": "nemotron_h", "num_hidden_layers": 52, "hidden_size": 4096, "intermediate_size": 21504,
                      "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
                      "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072,
                      "max_position_embeddings": 8192, "tie_word_embeddings": False, "mamba_num_heads": 128, "mamba_head_dim": 64,
                      "ssm_state_size": 128, "n_groups": 8, "conv_kernel": 4, "expand": 2, "use_conv_bias": True, "use_bias": False,
                      "mlp_bias": False},
    "granite-4.0-h-tiny": {"model_type": "granitemoehybrid", "num_hidden_layers": 40, "hidden_size": 1536, "num_attention_heads": 12,
                           "num_key_value_heads": 4, "vocab_size": 100352, "max_position_embeddings": 131072,
                           "tie_word_embeddings": True, "attention_bias": False, "num_local_experts": 64, "num_experts_per_tok": 6,
                           "intermediate_size": 512, "shared_intermediate_size": 1024, "mamba_n_heads": 48, "mamba_d_head": 64,
                           "mamba_d_state": 128, "mamba_n_groups": 1, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_conv_bias": True,
                           "mamba_proj_bias": False, "layer_types": _mamba_and_attention(40, (5, 15, 25, 35))},
    # Zamba2: Mamba-2 layers, and two transformer blocks shared in turn by the 9 hybrid ones (counted once each)
    "zamba2-2.7b": {"model_type": "zamba2", "num_hidden_layers": 54, "hidden_size": 2560, "intermediate_size": 10240,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
                    "layers_block_type": ["hybrid" if i in (6, 12, 18, 24, 30, 36, 42, 47, 51) else "mamba" for i in range(54)],
                    "n_mamba_heads": 80, "mamba_headdim": 64, "mamba_d_state": 64, "mamba_ngroups": 1, "mamba_expand": 2,
                    "mamba_d_conv": 4, "num_mem_blocks": 2, "adapter_rank": 128, "use_shared_attention_adapter": False,
                    "add_bias_linear": False, "tie_word_embeddings": True},
    # The Pythia ladder (GPT-NeoX: fused query_key_value, biased linears and LayerNorms, untied
    # embed_out, rotary on a quarter of each head). Vocabularies padded: 50304, 50432 for 6.9b,
    # 50688 for 12b (these eight match the Pythia paper's parameter counts exactly); the 14m and 31m
    # dimensions (added to the suite later) are the least certain.
    **{f"pythia-{size}": _pythia(*dim) for size, dim in {
        "14m": (6, 128, 4), "31m": (6, 256, 8), "70m": (6, 512, 8), "160m": (12, 768, 12), "410m": (24, 1024, 16),
        "1b": (16, 2048, 8), "1.4b": (24, 2048, 16), "2.8b": (32, 2560, 32), "6.9b": (32, 4096, 32, 50432),
        "12b": (36, 5120, 40, 50688)}.items()},
}


# --- Shapes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What a model's memory and time depend on."""

    params: int
    layers: int
    hidden: int
    ffn: int  # the MLP's intermediate width a token's forward holds (an MoE: top-k experts' + the shared experts')
    vocab: int
    heads: int
    model_type: str
    max_positions: int | None
    block_params: int  # the largest decoder block (what stream holds two of)
    largest_linear: int  # elements of the largest weight matrix in a block (an MoE: one expert's gate, up or down included)
    linears: dict[str, int] = field(default_factory=dict)  # block linear weight → its input features
    source: str = "checkpoint"  # checkpoint | config | registry
    checkpoint_bytes: int = 0  # bytes on disk (0: unknown; estimated as 2·params)
    head_dim: int | None = None  # of the attention heads (what a KV block must divide)
    active_params: int = 0  # used per token: an MoE's top-k experts, shared experts and the rest (0: = params, dense)
    outside: int | None = None  # parameters outside the blocks (None: params − layers·block_params, equal blocks)
    largest_experts: int = 0  # elements of a block's largest fused experts tensor (transformers 5: gate_up_proj)
    experts: int = 0  # routed experts of an MoE block (0: a dense model)
    routers: dict[str, int] = field(default_factory=dict)  # router weights outside ``linears`` → input features (Gemma-3n's AltUp
    # maps, 4 wide: a group size is checked against them only where a setting includes routers)
    kept: int = 0  # values a token keeps between blocks in a layer-wise run (0: hidden; Gemma-3n: its four streams and per-layer inputs)

    @property
    def model_shape(self) -> ModelShape:
        """The dimensions this shares with the built modules (:meth:`quantlens.model.anatomy.Anatomy.shape`)."""
        return ModelShape(layers=self.layers, hidden=self.hidden, vocab=self.vocab, experts=self.experts)

    def __post_init__(self) -> None:
        if not self.active_params:
            object.__setattr__(self, "active_params", self.params)

    @property
    def outside_params(self) -> int:
        return self.outside if self.outside is not None else self.params - self.layers * self.block_params

    @property
    def blocks_params(self) -> int:
        """All the decoder blocks together."""
        return self.params - self.outside_params

    @property
    def max_in(self) -> int:
        return max(self.linears.values()) if self.linears else max(self.hidden, self.ffn)


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


# configs that name their dimensions their own way: DBRX (the MoE and attention fields nested in
# ffn_config, attn_config), LongCat-Flash (dense and expert widths, top-k)
_RENAMED = {
    "dbrx": {"d_model": "hidden_size", "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers",
             "max_seq_len": "max_position_embeddings", "ffn_config.ffn_hidden_size": "moe_intermediate_size",
             "ffn_config.moe_num_experts": "num_local_experts", "ffn_config.moe_top_k": "num_experts_per_tok",
             "attn_config.kv_n_heads": "num_key_value_heads"},
    "longcat_flash": {"ffn_hidden_size": "intermediate_size", "expert_ffn_hidden_size": "moe_intermediate_size",
                      "moe_topk": "num_experts_per_tok"},
}
# blocks that hold each sublayer more than once: LongCat-Flash's two attention + dense MLP passes
# (and their norms) beside one MoE
SUBLAYER_PASSES = {"longcat_flash": 2}


def _renamed(cfg: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """The config with its own names copied under the common ones (``part.field``: a nested config's)."""
    out = dict(cfg)
    for old, new in names.items():
        part, _, field_ = old.rpartition(".")
        src = (cfg.get(part) or {}) if part else cfg
        if field_ in src:
            out[new] = src[field_]
    return out


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A multimodal config's language model (Llama-4's and Qwen3.5's ``text_config``, of model type
    ``<model_type>_text``), else the config itself (DBRX's under the common names): the plan counts
    the text model."""
    if cfg.get("model_type") in _RENAMED:
        return _renamed(cfg, _RENAMED[cfg["model_type"]])
    text = cfg.get("text_config")
    if not isinstance(text, dict) or "hidden_size" in cfg:
        return cfg
    tied = {"tie_word_embeddings": cfg["tie_word_embeddings"]} if "tie_word_embeddings" in cfg else {}
    return {**tied, **text, "model_type": text.get("model_type") or f"{cfg.get('model_type')}_text"}


# the field of the dense MLP's width where it is not intermediate_size: Llama-4's intermediate_size is
# an expert's, Granite-4's blocks without experts hold only their shared MLP
_DENSE_WIDTH = {"llama4_text": "intermediate_size_mlp", "granitemoehybrid": "shared_intermediate_size"}


def _dense_width(cfg: dict[str, Any], t: str, hidden: int) -> int:
    """The dense MLP's intermediate width (LFM2 takes 2/3 of its configured one, × its multiplier,
    rounded up to block_multiple_of)."""
    if t in _DENSE_WIDTH:
        return int(_get(cfg, _DENSE_WIDTH[t], "intermediate_size"))
    if isinstance(cfg.get("intermediate_size"), list):  # one width per layer (Gemma-3n): the widest
        return max(int(w) for w in cfg["intermediate_size"])
    F = int(_get(cfg, "ffn_dim", "intermediate_size", "n_inner", "block_ff_dim", default=4 * hidden))
    if t == "lfm2" and cfg.get("block_auto_adjust_ff_dim", True):
        F = int(2 * F / 3)
        if cfg.get("block_ffn_dim_multiplier", 1.0) is not None:
            F, m = int(cfg.get("block_ffn_dim_multiplier", 1.0) * F), int(cfg.get("block_multiple_of", 256))
            F = m * ((F + m - 1) // m)
    return F


def dims(cfg: dict[str, Any]) -> dict[str, Any]:
    """A config's dimensions under one set of names (OPT, BLOOM, LLaMA-likes, GPT-style names);
    ``ffn``: the dense MLP's width."""
    hidden = int(_get(cfg, "hidden_size", "n_embd", "d_model"))
    heads = int(_get(cfg, "num_attention_heads", "n_head", "num_heads"))
    layers = _get(cfg, "num_hidden_layers", "n_layer", "num_layers")
    t = str(cfg.get("model_type", ""))
    return {
        "layers": int(layers) if layers is not None else len(_get(cfg, "layers_block_type", "hybrid_override_pattern")),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": int(_get(cfg, "num_key_value_heads", default=heads)),
        "head_dim": int(_get(cfg, "head_dim", default=hidden // heads)),
        "ffn": _dense_width(cfg, t, hidden),
        "vocab": int(_get(cfg, "vocab_size")),
        "max_pos": _get(cfg, "max_position_embeddings", "n_positions"),
        "type": t,
    }


def model_shape(cfg: dict[str, Any]) -> ModelShape:
    """The model's shape read from its config (what :meth:`quantlens.model.anatomy.Anatomy.shape`
    reads from its modules)."""
    cfg = text_config(cfg)
    d, moe = dims(cfg), moe_dims(cfg)
    return ModelShape(layers=d["layers"], hidden=d["hidden"], vocab=d["vocab"], experts=moe["experts"] if moe else 0)


LAYER_NORM_TYPES = ("opt", "bloom", "gpt2", "gpt_neox", "falcon")  # LayerNorm (weight + bias), biased linears
GATED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo2",
               "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss",
               "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "llama4_text", "granitemoehybrid", "jamba", "bamba",
               "falcon_h1", "lfm2", "lfm2_moe", "dbrx", "longcat_flash")
UNGATED_EXPERT_TYPES = ("nemotron_h",)  # relu² experts (and MLPs): up and down only; every other MoE's gated
# Qwen3-Next, Qwen3.5: gated DeltaNet blocks beside gated attention (q_proj also yields the output gate: 2× rows)
QWEN_HYBRID_TYPES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
HEAD_NORM_TYPES = ("qwen3", "qwen3_moe", *QWEN_HYBRID_TYPES, "lfm2", "lfm2_moe")  # q_norm, k_norm over one head
UNBIASED_ATTENTION_TYPES = ("mistral", "mixtral", "nemotron_h")  # attention_bias in the config, not read
TRANSPOSED_EXPERTS = ("gpt_oss", "llama4_text")  # fused experts stored [E, in, out]
ONE_NORM_TYPES = ("nemotron_h",)  # blocks of one sublayer (a mixer, an MLP or an MoE): one norm
LATENT_MOE_TYPES = ("nemotron_h",)  # experts may read a moe_latent_size projection of the hidden state

# Block kinds by transformers 5's names, the legacy ones of published config.json files mapped onto
# them (Granite-4's layer_types, Nemotron-H's hybrid_override_pattern letters): linear_attention is a
# DeltaNet or a Mamba, conv LFM2's short convolution, hybrid Falcon-H1's attention beside a Mamba,
# mlp / moe Nemotron-H's blocks without a token mixer; every other kind (full, sliding, chunked) an
# attention block.
_KIND_NAMES = {"mamba": "linear_attention", "attention": "full_attention", "M": "linear_attention",
               "*": "full_attention", "-": "mlp", "E": "moe"}
# configs that list their attention blocks instead, every other block the model's other mixer
_ATTENTION_AT = (("attn_layer_indices", "linear_attention"), ("full_attn_idxs", "conv"))  # Bamba, LFM2


def layer_kinds(cfg: dict[str, Any]) -> list[str]:
    """Each block's kind: the config's list (layer_types, layers_block_type, hybrid_override_pattern),
    else Jamba's attention period, Bamba's and LFM2's attention indices, Qwen3-Next's
    full_attention_interval, Falcon-H1's hybrid blocks; an attention block each otherwise."""
    L = dims(cfg)["layers"]
    listed = _get(cfg, "layers_block_type", "hybrid_override_pattern", "layer_types")
    if listed:
        return [_KIND_NAMES.get(k, k) for k in listed]
    if "attn_layer_period" in cfg:  # Jamba
        p, o = int(cfg["attn_layer_period"]), int(cfg.get("attn_layer_offset") or 0)
        return ["full_attention" if i % p == o else "linear_attention" for i in range(L)]
    for field_, other in _ATTENTION_AT:
        if field_ in cfg:
            at = set(cfg[field_] or [])
            return ["full_attention" if i in at else other for i in range(L)]
    if "linear_num_value_heads" in cfg:  # Qwen3-Next: every full_attention_interval-th block attends
        n = int(cfg.get("full_attention_interval") or 4)
        return ["linear_attention" if (i + 1) % n else "full_attention" for i in range(L)]
    return ["hybrid" if cfg.get("model_type") == "falcon_h1" else "full_attention"] * L


def _moe_layers(cfg: dict[str, Any], t: str, L: int) -> list[bool]:
    """Which blocks hold experts: DeepSeek's after first_k_dense_replace dense ones, LFM2-MoE's after
    num_dense_layers, Jamba's every expert_layer_period-th (from expert_layer_offset), Llama-4's
    moe_layers (else every interleave_moe_layer_step-th), Qwen-MoE's every decoder_sparse_step-th
    but its mlp_only_layers, Nemotron-H's moe blocks; Mixtral, OLMoE, gpt-oss, Granite-4: every one."""
    if t.startswith("deepseek"):
        return [i >= int(cfg.get("first_k_dense_replace") or 0) for i in range(L)]
    if t == "nemotron_h":
        return [k == "moe" for k in layer_kinds(cfg)]
    if "num_dense_layers" in cfg:
        return [i >= int(cfg["num_dense_layers"]) for i in range(L)]
    if "expert_layer_period" in cfg:
        p, o = int(cfg["expert_layer_period"]), int(cfg.get("expert_layer_offset") or 0)
        return [i % p == o for i in range(L)]
    if cfg.get("moe_layers") is not None:
        return [i in set(cfg["moe_layers"]) for i in range(L)]
    step = int(_get(cfg, "decoder_sparse_step", "interleave_moe_layer_step", default=1) or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    return [i not in dense and (i + 1) % step == 0 for i in range(L)]


def _shared_width(cfg: dict[str, Any], t: str, inter: int) -> int:
    """The shared experts' width, as one MLP: Nemotron-H's (its n_shared_experts names no width),
    Qwen's shared expert (with its 1-output gate), Granite-4's shared MLP, DeepSeek's n_shared
    experts, Llama-4's one shared expert as wide as a routed one."""
    for name in ("moe_shared_expert_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size"):
        if cfg.get(name):
            return int(cfg[name])
    if cfg.get("n_shared_experts"):
        return int(cfg["n_shared_experts"]) * inter
    return inter if t == "llama4_text" else 0


def moe_dims(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """A mixture of experts' dimensions (None: a dense model): routed experts, top-k, their
    intermediate size and input width (Nemotron-H's latent projection), the shared experts' width,
    which layers are MoE blocks, and the experts' layout (gated; gpt-oss' biased)."""
    cfg = text_config(cfg)
    experts = int(_get(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    if experts <= 0:
        return None
    d = dims(cfg)
    t, L = d["type"], d["layers"]
    moe_layers = _moe_layers(cfg, t, L)
    if not any(moe_layers):
        return None  # Nemotron-H without moe blocks: its config names experts all the same
    inter = int(_get(cfg, "moe_intermediate_size", "intermediate_size", default=d["ffn"]))
    latent = cfg.get("moe_latent_size") if t in LATENT_MOE_TYPES else None
    zero = int(cfg.get("zero_expert_num") or 0)  # LongCat-Flash's identity experts: routed to, no weights
    return {"experts": experts, "top_k": int(_get(cfg, "num_experts_per_tok", "experts_per_token", default=experts)),
            "router_rows": experts + zero, "real_share": experts / (experts + zero),
            "inter": inter, "shared": _shared_width(cfg, t, inter), "shared_gate": bool(cfg.get("shared_expert_intermediate_size")),
            "biased": t == "gpt_oss", "gated": t not in UNGATED_EXPERT_TYPES, "expert_in": int(latent or d["hidden"]),
            "latent": int(latent or 0), "moe_layers": moe_layers}


def _attention(cfg: dict[str, Any], d: dict[str, Any]) -> tuple[dict[str, tuple[int, int]], int, int]:
    """(the attention's linears: name → (out, in); its other parameters: biases, norms, sinks; head_dim)."""
    H, t, n = d["hidden"], d["type"], d["heads"]
    if cfg.get("kv_lora_rank"):  # DeepSeek's multi-head latent attention
        nope, rope, vh = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"]), int(cfg["v_head_dim"])
        r_kv, r_q, bias = int(cfg["kv_lora_rank"]), cfg.get("q_lora_rank"), bool(cfg.get("attention_bias"))
        lin: dict[str, tuple[int, int]] = {}
        extra = r_kv  # kv_a_layernorm
        if r_q:
            lin.update({"q_a_proj": (int(r_q), H), "q_b_proj": (n * (nope + rope), int(r_q))})
            extra += int(r_q) * (2 if bias else 1)  # q_a_layernorm (+ q_a_proj's bias)
        else:
            lin["q_proj"] = (n * (nope + rope), H)
        lin.update({"kv_a_proj_with_mqa": (r_kv + rope, H), "kv_b_proj": (n * (nope + vh), r_kv), "o_proj": (H, n * vh)})
        if bias:
            extra += r_kv + rope + H
        return lin, extra, math.gcd(nope + rope, vh)  # K rows are nope + rope wide, V rows v_head_dim
    q, kv = n * d["head_dim"], d["kv_heads"] * d["head_dim"]
    if t == "gpt_neox":  # fused query_key_value, then dense
        lin = {"query_key_value": (q + 2 * kv, H), "dense": (H, q)}
        return lin, (q + 2 * kv + H) if cfg.get("attention_bias", True) else 0, d["head_dim"]
    lin = {"q": (2 * q if t in QWEN_HYBRID_TYPES else q, H), "k": (kv, H), "v": (kv, H), "o": (H, q)}
    extra = 0
    if t in LAYER_NORM_TYPES and cfg.get("enable_bias", True):
        extra += q + 2 * kv + H
    elif t in ("qwen2", "qwen2_moe") or cfg.get("qkv_bias"):  # Qwen2(-MoE): q, k, v biased, o not
        extra += q + 2 * kv if cfg.get("qkv_bias", True) else 0
    elif cfg.get("attention_bias") and t not in UNBIASED_ATTENTION_TYPES:  # llama, qwen3(-moe), olmoe, gpt-oss: all four
        extra += sum(o for o, _ in lin.values())
    if t in HEAD_NORM_TYPES:
        extra += 2 * d["head_dim"]  # q_norm, k_norm over one head
    elif t in ("olmoe", "olmo2"):
        extra += q + kv  # q_norm, k_norm over all heads
    if t == "gpt_oss":
        extra += n  # attention sinks
    return lin, extra, d["head_dim"]


def _deltanet(cfg: dict[str, Any], H: int) -> tuple[dict[str, tuple[int, int]], int]:
    """Qwen3-Next's and Qwen3.5's gated DeltaNet: its linears (the output projection reads the value
    heads' width) and its other parameters: the causal conv1d over q, k, v, dt_bias, A_log, the gated
    norm over one value head."""
    nk, nv, vh = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"]), int(cfg["linear_value_head_dim"])
    kd, vd = nk * int(cfg["linear_key_head_dim"]), nv * vh
    if cfg.get("model_type") == "qwen3_next":
        lin = {"in_proj_qkvz": (2 * kd + 2 * vd, H), "in_proj_ba": (2 * nv, H), "out_proj": (H, vd)}
    else:
        lin = {"in_proj_qkv": (2 * kd + vd, H), "in_proj_z": (vd, H), "in_proj_b": (nv, H), "in_proj_a": (nv, H), "out_proj": (H, vd)}
    return lin, (2 * kd + vd) * int(cfg.get("linear_conv_kernel_dim") or 4) + 2 * nv + vh


# Mamba-2 fields: Granite-4's, Bamba's and Falcon-H1's mamba_* names, else Nemotron-H's
_MAMBA2_FIELDS = {"heads": ("mamba_n_heads", "mamba_num_heads"), "head_dim": ("mamba_d_head", "mamba_head_dim"),
                  "groups": ("mamba_n_groups", "n_groups"), "state": ("mamba_d_state", "ssm_state_size"),
                  "kernel": ("mamba_d_conv", "conv_kernel"), "expand": ("mamba_expand", "expand")}
# the flags of a Mamba-2's in_proj bias, out_proj bias and gated norm (None: always there), by model type
_MAMBA2_FLAGS = {"nemotron_h": ("use_bias", "use_bias", None), "falcon_h1": ("mamba_proj_bias", "projectors_bias", "mamba_rms_norm")}
_MAMBA2_DEFAULT_FLAGS = ("mamba_proj_bias", "mamba_proj_bias", None)


def _mamba2(cfg: dict[str, Any], H: int) -> tuple[dict[str, tuple[int, int]], int]:
    """A Mamba-2 mixer: in_proj (z, x, B, C, dt), out_proj from the inner width (Falcon-H1's
    mamba_d_ssm, else heads × head dim, else expand × hidden); the depthwise conv1d over x, B, C,
    dt_bias, A_log, D a head each, the gated norm over the inner width."""
    f = {k: _get(cfg, *names) for k, names in _MAMBA2_FIELDS.items()}
    nh, g, N = int(f["heads"]), int(f["groups"] or 1), int(f["state"])
    head_dim = f["head_dim"] if isinstance(f["head_dim"], int) else None  # (Granite's "auto" before transformers reads it)
    inner = int(cfg.get("mamba_d_ssm") or (nh * head_dim if head_dim else f["expand"] * H))
    conv = inner + 2 * g * N
    lin = {"in_proj": (inner + conv + nh, H), "out_proj": (H, inner)}
    in_bias, out_bias, norm = _MAMBA2_FLAGS.get(str(cfg.get("model_type")), _MAMBA2_DEFAULT_FLAGS)
    conv_bias = _get(cfg, "mamba_conv_bias", "use_conv_bias", default=True)
    extra = conv * int(f["kernel"] or 4) + (conv if conv_bias else 0) + 3 * nh + (inner if norm is None or cfg.get(norm) else 0)
    return lin, extra + (inner + conv + nh if cfg.get(in_bias) else 0) + (H if cfg.get(out_bias) else 0)


def _mamba1(cfg: dict[str, Any], H: int) -> tuple[dict[str, tuple[int, int]], int]:
    """Jamba's Mamba-1 mixer: in_proj (x, z), x_proj (dt, B, C), out_proj; the conv1d, dt_proj (applied
    by its weight: a state, not a linear the patcher quantizes), A_log, D, the dt / B / C norms."""
    inner, N, R = int(cfg["mamba_expand"]) * H, int(cfg["mamba_d_state"]), cfg.get("mamba_dt_rank", "auto")
    R = math.ceil(H / 16) if R == "auto" else int(R)
    lin = {"in_proj": (2 * inner, H), "x_proj": (R + 2 * N, inner), "out_proj": (H, inner)}
    extra = inner * int(cfg.get("mamba_d_conv") or 4) + (inner if cfg.get("mamba_conv_bias", True) else 0)
    extra += inner * R + inner + inner * N + inner + R + 2 * N  # dt_proj and its bias, A_log, D, norms
    return lin, extra + (2 * inner + H if cfg.get("mamba_proj_bias") else 0)


def _short_conv(cfg: dict[str, Any], H: int) -> tuple[dict[str, tuple[int, int]], int]:
    """LFM2's gated short convolution: in_proj (B, C, x), out_proj, the depthwise conv."""
    bias = bool(cfg.get("conv_bias"))
    return {"in_proj": (3 * H, H), "out_proj": (H, H)}, H * int(cfg.get("conv_L_cache") or 3) + (5 * H if bias else 0)


def _mixer(cfg: dict[str, Any], d: dict[str, Any], kind: str) -> tuple[dict[str, tuple[int, int]], int]:
    """A block's token mixer of this kind: its linears (name → (out, in), under the module's name)
    and all its parameters."""
    H, t = d["hidden"], d["type"]
    if kind == "hybrid":  # Falcon-H1: attention and a Mamba-2 side by side
        (a, n_a), (m, n_m) = _mixer(cfg, d, "full_attention"), _mixer(cfg, d, "linear_attention")
        return a | m, n_a + n_m
    if kind in ("mlp", "moe"):
        return {}, 0
    if kind == "conv":
        prefix, (lin, extra) = "conv.", _short_conv(cfg, H)
    elif kind == "linear_attention" and "linear_num_value_heads" in cfg:
        prefix, (lin, extra) = "linear_attn.", _deltanet(cfg, H)
    elif kind == "linear_attention" and (t == "jamba" or _get(cfg, "mamba_n_heads", "mamba_num_heads") is not None):
        prefix = "mixer." if t == "nemotron_h" else "mamba."
        lin, extra = _mamba1(cfg, H) if t == "jamba" else _mamba2(cfg, H)
    else:  # (a linear attention of another layout: counted as an attention, an estimate)
        prefix, (lin, extra, _) = "", _attention(cfg, d)
    return {prefix + k: v for k, v in lin.items()}, sum(o * i for o, i in lin.values()) + extra


def _dense_mlp(t: str, H: int, gated: bool, biased: bool, width: int, prefix: str = "") -> tuple[dict[str, tuple[int, int]], int]:
    """A dense MLP of this width: its linears (name → (out, in)) and its parameter count."""
    if t == "gpt_neox":
        lin = {"dense_h_to_4h": (width, H), "dense_4h_to_h": (H, width)}
    elif t == "granitemoehybrid":  # gate and up fused
        lin = {"input_linear": (2 * width, H), "output_linear": (H, width)}
    elif gated:
        lin = {"gate": (width, H), "up": (width, H), "down": (H, width)}
    else:
        lin = {"fc1": (width, H), "fc2": (H, width)}
    bias = sum(o for o, _ in lin.values()) if biased else 0
    return {prefix + k: v for k, v in lin.items()}, sum(o * i for o, i in lin.values()) + bias


def _outside_params(cfg: dict[str, Any], d: dict[str, Any], norm: int) -> int:
    """Parameters outside the blocks: embeddings, final norm, OPT's positions and projections, BLOOM's
    embedding norm, an untied LM head."""
    H, V, t = d["hidden"], d["vocab"], d["type"]
    E_ = int(cfg.get("word_embed_proj_dim") or H) if t == "opt" else H
    outside = V * E_ + norm  # embeddings, final norm
    if t == "opt":
        outside += (int(d["max_pos"] or 2048) + 2) * H + (2 * E_ * H if E_ != H else 0)
        if cfg.get("do_layer_norm_before") is False or cfg.get("_remove_final_layer_norm"):
            outside -= norm  # OPT-350m: post-LN, no final norm
    if t == "bloom":
        outside += norm  # word_embeddings_layernorm
    if not _get(cfg, "tie_word_embeddings", "tie_embedding", default=t in ("opt", "bloom", "gpt2", "lfm2", "lfm2_moe")):
        outside += V * E_  # an untied LM head (Pythia's embed_out)
    return outside


@dataclass(frozen=True)
class _Mlp:
    """One kind of block MLP: its linears (name → (out, in)), parameters, those a token uses, the
    intermediate width a token's forward holds, its largest matrix, its largest fused experts tensor."""

    linears: dict[str, Any]
    params: int
    active: int
    ffn: int
    largest: int
    experts_tensor: int = 0


def _moe_mlp(H: int, moe: dict[str, Any], dense_mlp: Any, biased: bool) -> _Mlp:
    """An MoE block's MLP: the routed experts (gated: gate and up fused, then down; Nemotron-H's up
    and down, through its latent projections), the router, the shared experts."""
    E, k, Fm, Fs, Hin = moe["experts"], moe["top_k"], moe["inter"], moe["shared"], moe["expert_in"]
    up = 2 * Fm if moe["gated"] else Fm
    expert = (up + Fm) * Hin + ((up + Hin) if moe["biased"] else 0)  # gpt-oss: with biases
    router = moe["router_rows"] * H + (E if moe["biased"] else 0)
    routed = round(k * moe["real_share"] * expert)  # a token's expected share (LongCat: some slots are identity experts)
    shared_lin, shared = dense_mlp(Fs, "shared_experts.") if Fs else ({}, 0)
    if moe["shared_gate"]:
        shared += H  # Qwen's shared_expert_gate: one output
        shared_lin["shared_expert_gate"] = (1, H)
    lat = moe["latent"]
    if lat:  # Nemotron-H: the experts read a projection of the hidden state, and write one back
        latent_lin = {"fc1_latent_proj": (lat, H), "fc2_latent_proj": (H, lat)}
        shared_lin.update(latent_lin)
        shared += 2 * lat * H + ((lat + H) if biased else 0)
    names = ("gate_up_proj", "down_proj") if moe["gated"] else ("up_proj", "down_proj")
    linears = {f"experts.{names[0]}": Hin, f"experts.{names[1]}": Fm, "router": H} | {n: i for n, (_, i) in shared_lin.items()}
    return _Mlp(linears, E * expert + router + shared, routed + router + shared, k * Fm + Fs,
                max([Fm * Hin] + [o * i for o, i in shared_lin.values()]), E * up * Hin)


def shape_from_config(cfg: dict[str, Any], source: str = "config") -> Shape:
    """Counts computed from a config's dimensions: exact (``tests/test_plan.py`` checks them against
    transformers' own models) for OPT, BLOOM, the LLaMA-likes, GPT-NeoX / Pythia, the mixtures of
    experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 with their latent attention and
    dense first blocks, gpt-oss, Llama-4's routed and shared experts between dense blocks) and the
    hybrids (Qwen3-Next's and Qwen3.5's DeltaNet, the Mamba-2 of Granite-4, Bamba, Falcon-H1 and
    Nemotron-H's one-sublayer blocks, Jamba's Mamba-1, LFM2's short convolutions), each block
    counted as its kind; DBRX and LongCat-Flash (two attention + MLP passes beside one MoE whose
    router also scores identity experts) under their own config names. An MoE's experts all count in ``params`` (memory), its top-k in
    ``active_params`` (time); ``block_params`` is the largest block."""
    cfg = text_config(cfg)
    d = dims(cfg)
    H, F, V, L, t = d["hidden"], d["ffn"], d["vocab"], d["layers"], d["type"]
    if t == "zamba2":
        return _zamba2_shape(cfg, d, source)
    if t == "gemma3n_text":
        return _gemma3n_shape(cfg, d, source)
    layer_norm = t in LAYER_NORM_TYPES
    biased = bool(layer_norm and cfg.get("enable_bias", True) or cfg.get("mlp_bias"))
    norm = 2 * H if layer_norm else H  # LayerNorm: weight + bias
    norms = norm * (1 if t in ONE_NORM_TYPES else 2)  # a block's norms
    head_dim = _attention(cfg, d)[2]
    dense_mlp = partial(_dense_mlp, t, H, t in GATED_TYPES, biased)

    kinds = layer_kinds(cfg)
    mixers = {k: _mixer(cfg, d, k) for k in dict.fromkeys(kinds)}
    moe = moe_dims(cfg)
    dense_lin, dense = dense_mlp(F)
    mlps = {"dense": _Mlp(dense_lin, dense, dense, F, max(o * i for o, i in dense_lin.values())), None: _Mlp({}, 0, 0, 0, 0)}
    if moe is not None:
        mlps["moe"] = _moe_mlp(H, moe, dense_mlp, biased)
    if t == "nemotron_h":  # one sublayer a block: its kind says which MLP, if any
        per_layer = [{"mlp": "dense", "moe": "moe"}.get(k) for k in kinds]
    else:
        per_layer = ["moe" if moe and moe["moe_layers"][i] else "dense" for i in range(L)]
    passes = SUBLAYER_PASSES.get(t, 1)  # (LongCat: each pass its norms, attention and dense MLP, beside the MoE)
    beside = dense if passes > 1 else 0
    blocks = [passes * (norms + mixers[k][1]) + mlps[m].params + passes * beside for k, m in zip(kinds, per_layer)]
    active = [passes * (norms + mixers[k][1]) + mlps[m].active + passes * beside for k, m in zip(kinds, per_layer)]

    linears: dict[str, Any] = {f"layers.*.{n}": v for lin, _ in mixers.values() for n, v in lin.items()}
    used = [m for m in dict.fromkeys(per_layer) if m is not None] + (["dense"] if beside and "dense" not in per_layer else [])
    for m in used:  # a dense MLP among MoE blocks: under the first dense block's index
        where = "*" if m == "moe" or "moe" not in used or m not in per_layer else str(per_layer.index(m))
        linears.update({f"layers.{where}.{n}": v for n, v in mlps[m].linears.items()})
    linears = {n: (v if isinstance(v, int) else v[1]) for n, v in linears.items()}
    largest = max([o * i for lin, _ in mixers.values() for o, i in lin.values()] + [mlps[m].largest for m in used])
    outside = _outside_params(cfg, d, norm)
    return Shape(params=sum(blocks) + outside, layers=L, hidden=H, ffn=max([mlps[m].ffn for m in used], default=0), vocab=V,
                 heads=d["heads"], model_type=t, max_positions=int(d["max_pos"]) if d["max_pos"] else None,
                 block_params=max(blocks), largest_linear=largest, linears=linears, source=source, head_dim=head_dim,
                 active_params=sum(active) + outside, outside=outside,
                 largest_experts=mlps["moe"].experts_tensor if moe else 0, experts=moe["experts"] if moe else 0)


def _zamba2_shape(cfg: dict[str, Any], d: dict[str, Any], source: str) -> Shape:
    """Zamba2 (anatomy's ``shared`` layout): a Mamba-2 layer in every block (its inner width
    ``mamba_expand`` × hidden, conv bias always, in/out bias ``add_bias_linear``, a gated norm); each
    hybrid block also a projection ``linear`` and one of ``num_mem_blocks`` transformer blocks, shared
    (its parameters counted once, in the first block holding it): attention on [z; embeddings]
    (``attention_hidden_size``, 2 × hidden), q/k/v LoRA adapters (``use_shared_attention_adapter``),
    a gated MLP with its gate_up adapters, one adapter of each per hybrid layer using the block."""
    H, F, V, t = d["hidden"], d["ffn"], d["vocab"], d["type"]
    kinds = [_KIND_NAMES.get(k, k) for k in cfg["layers_block_type"]]
    heads, kvh, r, mem = d["heads"], d["kv_heads"], int(cfg.get("adapter_rank") or 128), int(cfg.get("num_mem_blocks") or 1)
    A = int(cfg.get("attention_hidden_size") or 2 * H)
    hd = int(cfg.get("attention_head_dim") or A // heads)
    bias = bool(cfg.get("add_bias_linear"))
    nh, hp, N, g = int(cfg["n_mamba_heads"]), int(cfg["mamba_headdim"]), int(cfg["mamba_d_state"]), int(cfg.get("mamba_ngroups") or 1)
    inner = int(cfg.get("mamba_expand") or 2) * H
    conv = inner + 2 * g * N
    mamba_lin = {"mamba.in_proj": (inner + conv + nh, H), "mamba.out_proj": (H, inner)}
    mamba = sum(o * i for o, i in mamba_lin.values()) + (inner + conv + nh + H if bias else 0) + conv * int(cfg.get("mamba_d_conv") or 4) + conv
    mamba += 3 * nh + inner + H  # dt_bias, A_log, D; the gated norm; the layer's input norm
    attn = {"q_proj": (heads * hd, A), "k_proj": (kvh * hd, A), "v_proj": (kvh * hd, A), "o_proj": (H, heads * hd)}
    mlp = {"gate_up_proj": (2 * F, H), "down_proj": (H, F)}
    adapters = {"linear_q_adapter.0": (r, A), "linear_q_adapter.1": (A, r)} if cfg.get("use_shared_attention_adapter") else {}
    mlp_adapter = {"gate_up_proj_adapter.0": (r, H), "gate_up_proj_adapter.1": (2 * F, r)}
    hybrids = [i for i, k in enumerate(kinds) if k == "hybrid"]
    uses = [sum(1 for j in range(len(hybrids)) if j % mem == b) for b in range(mem)]  # adapter slots each shared block holds
    per_adapter = 3 * sum(o * i for o, i in adapters.values()) + sum(o * i for o, i in mlp_adapter.values())
    shared = [sum(o * i for o, i in (attn | mlp).values()) + (2 * F + H if bias else 0) + A + H + uses[b] * per_adapter for b in range(mem)]
    blocks = []
    for i, k in enumerate(kinds):
        j = hybrids.index(i) if k == "hybrid" else None
        blocks.append(mamba + (H * H + (shared[j] if j < mem else 0) if j is not None else 0))
    linears = {f"layers.*.{n}": v for n, v in {**mamba_lin, **(({"linear": (H, H)} | attn | mlp | adapters | mlp_adapter) if hybrids else {})}.items()}
    outside = _outside_params(cfg, d, H)
    params = sum(blocks) + outside
    return Shape(params=params, layers=len(kinds), hidden=H, ffn=F, vocab=V, heads=heads, model_type=t,
                 max_positions=int(d["max_pos"]) if d["max_pos"] else None, block_params=max(blocks),
                 largest_linear=max(o * i for o, i in linears.values()), linears={n: i for n, (_, i) in linears.items()},
                 source=source, head_dim=hd, active_params=params, outside=outside)


def _gemma3n_shape(cfg: dict[str, Any], d: dict[str, Any], source: str) -> Shape:
    """Gemma-3n's text model (anatomy's ``altup`` layout): per block an attention whose last
    ``num_kv_shared_layers`` blocks have no k/v projections (they reuse earlier K/V), a gated MLP of
    the block's own width, five norms, AltUp (its router, coefficient maps, router norm and output
    scale), LAuReL (rank ``laurel_rank``) and the per-layer input's gate and projection; outside, the
    per-layer embeddings and their projection, AltUp's stream projections in and out. AltUp's
    router and 4-input coefficient maps are routers (16-bit unless included): in ``Shape.routers``,
    which preflight checks against a group size only for a setting that includes routers."""
    H, V, L, t = d["hidden"], d["vocab"], d["layers"], d["type"]
    n, kvh, hd = d["heads"], d["kv_heads"], int(cfg.get("head_dim", 256))  # (defaults: Gemma3nTextConfig's)
    widths = cfg.get("intermediate_size", 16384)
    widths = [int(w) for w in widths] if isinstance(widths, list) else [int(widths)] * L
    A, R, P = int(cfg.get("altup_num_inputs", 4)), int(cfg.get("laurel_rank", 64)), int(cfg.get("hidden_size_per_layer_input", 256))
    first_shared = L - int(cfg.get("num_kv_shared_layers", 15))
    bias = bool(cfg.get("attention_bias"))  # q, k, v, o biased
    altup = A * A + A * A * A + A * H + 2 * H  # correction, prediction, router; router norm, output scale
    beside = 2 * R * H + H + 2 * P * H + 5 * H  # LAuReL and its norm; the per-layer gate and projection; five norms
    blocks = []
    for i, F in enumerate(widths):
        kv = 0 if i >= first_shared else 2 * kvh * hd * (H + bias) + hd  # k/v projections, k_norm (v_norm has no weight)
        blocks.append(2 * n * hd * H + hd + (n * hd + H) * bias + kv + 3 * F * H + altup + beside)
    lin = {"*.q": (n * hd, H), "*.k": (kvh * hd, H), "*.v": (kvh * hd, H), "*.o": (H, n * hd), "*.gate": (max(widths), H),
           "*.up": (max(widths), H), "*.laurel.linear_left": (R, H), "*.laurel.linear_right": (H, R),
           "*.per_layer_input_gate": (P, H), "*.per_layer_projection": (H, P)}
    lin |= {f"{'*' if len(set(widths)) == 1 else widths.index(F)}.down": (H, F) for F in dict.fromkeys(widths)}  # (a width a layer)
    Vp = int(cfg.get("vocab_size_per_layer_input", 262144))
    outside = V * H + H + Vp * L * P + L * P * H + P + 2 * (A - 1) * H * H  # + per-layer embeddings, projection and norm; AltUp in/out
    if not cfg.get("tie_word_embeddings", True):
        outside += V * H
    params = sum(blocks) + outside
    return Shape(params=params, layers=L, hidden=H, ffn=max(widths), vocab=V, heads=n, model_type=t,
                 max_positions=int(d["max_pos"]) if d["max_pos"] else None, block_params=max(blocks),
                 largest_linear=max(o * i for o, i in lin.values()), linears={f"layers.{k}": i for k, (_, i) in lin.items()},
                 source=source, head_dim=hd, active_params=params, outside=outside,
                 routers={"layers.*.altup.correction_coefs": A, "layers.*.altup.prediction_coefs": A, "layers.*.altup.modality_router": H},
                 kept=A * H + L * P)  # (layer-wise: the streams, and the per-layer inputs of every block)


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (names, dtypes, shapes): its first 8 + n bytes, no tensor read."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n <= 0 or n > 100 * 2**20:
            raise ValueError(f"{path.name}: not a safetensors file")
        return json.loads(fh.read(n))


_BLOCK = re.compile(r"(?:^|\.)(\d+)\.")
_ROUTERS_APART = re.compile(r"\.altup\.[a-z_]+\.weight$")  # Gemma-3n's AltUp linears: routers (Shape.routers)
_OUTSIDE_LISTS = re.compile(r"(?:^|\.)altup_(?:unembed_)?projections\.\d+\.")  # numbered, not blocks: Gemma-3n's stream projections
_EXPERT = re.compile(r"(\.experts\.)\d+\.")  # per-expert checkpoint keys: experts.<j>.gate_proj / w1 / …
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
# saved buffers that load as no parameter: rotary frequencies, old GPT-2 / GPT-NeoX causal masks,
# DeepSeek-V3's router score correction, LFM2-MoE's expert bias
_NOT_PARAMS = ("inv_freq", "masked_bias", "e_score_correction_bias", "expert_bias")
_NOT_LINEARS = ("dt_proj.weight",)
# a multimodal checkpoint's other towers: downloaded, never loaded by the causal LM (Llama-4's vision_model and
# multi_modal_projector, Gemma-3's vision_tower, Qwen-VL's visual, Gemma-3n's audio_tower and embed_vision)
_OTHER_TOWERS = re.compile(r"(?:^|\.)(?:vision_tower|vision_model|visual|audio_tower|audio_model|multi_modal_projector|mm_projector|"
                           r"embed_vision|embed_audio)\.")  # Mamba-1's dt_proj: applied by its weight, a state the patcher keeps 16-bit


def _header_entry(name: str, shp: list[int], dtype: str, transposed: bool) -> tuple[int, int | None]:
    """(parameters it loads as, input features when it is a block linear / expert weight, else None)."""
    count = math.prod(shp)
    if dtype == "BOOL" or name.endswith(_NOT_PARAMS) or (name.endswith(".bias") and len(shp) == 4):
        return 0, None
    if name.endswith("_scales") and dtype == "U8":
        return 0, None  # MXFP4 block scales (gpt-oss): dequantized into the weights at load time
    if name.endswith(_NOT_LINEARS) or (len(shp) == 3 and shp[1] == 1 and "conv" in name):
        return count, None  # a hybrid's state: dt_proj, a depthwise conv1d kernel [channels, 1, kernel]
    if _ROUTERS_APART.search(name):
        return count, None  # Gemma-3n's AltUp router and 4-input coefficient maps: Shape.routers
    if name.endswith("_blocks") and dtype == "U8" and len(shp) == 4:
        return 2 * count, 2 * shp[-2] * shp[-1]  # MXFP4 [experts, out, blocks, 16 bytes]: two values a byte
    if len(shp) == 2 and name.endswith(".weight") and "embed" not in name:
        return count, int(shp[1])  # an nn.Linear's [out, in] (per-expert keys included)
    if len(shp) == 3 and not name.endswith("bias"):  # fused experts: [E, out, in], gpt-oss [E, in, out]
        return count, int(shp[1] if transposed else shp[2])
    return count, None


def _matrix(name: str, shp: list[int], count: int) -> int:
    """Elements of the largest matrix a header entry holds: an expert tensor's one expert's gate,
    up or down (a fused ``gate_up`` holds two per expert), else the entry."""
    if len(shp) >= 3:
        return count // shp[0] // (2 if "gate_up" in name else 1)
    return count


def shape_from_checkpoint(folder: str | Path) -> Shape:
    """Exact counts from ``config.json`` and the safetensors headers; the config's computed counts
    when the folder has no safetensors (e.g. only a config was cached). Per-expert keys
    (``mlp.experts.0.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.0.w1.weight``) and
    fused ones (``mlp.experts.gate_up_proj``, gpt-oss' ``[E, in, out]`` and its MXFP4 ``_blocks``)
    give their input features; the block is the largest one; tensors of blocks beyond the config's
    layers (DeepSeek-V3's multi-token-prediction layer) and a multimodal checkpoint's vision and audio
    towers are downloaded but not loaded."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    computed = shape_from_config(cfg)
    if not files:
        return computed
    transposed = computed.model_type in TRANSPOSED_EXPERTS
    total = nbytes = 0
    blocks: dict[int, int] = {}
    linears: dict[str, int] = {}
    routers: dict[str, int] = {}
    largest = 0
    for f in files:
        for name, meta in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            shp, dtype = meta["shape"], meta.get("dtype", "F16")
            nbytes += math.prod(shp) * _DTYPE_BYTES.get(dtype, 2)
            if _OTHER_TOWERS.search(name):
                continue  # (its bytes downloaded: counted above)
            count, n_in = _header_entry(name, shp, dtype, transposed)
            if _ROUTERS_APART.search(name) and len(shp) == 2:
                routers[_BLOCK.sub(".*.", name, count=1)] = int(shp[1])
            m = None if _OUTSIDE_LISTS.search(name) else _BLOCK.search(name)
            if m is not None and int(m.group(1)) >= computed.layers:
                continue
            total += count
            if m is None:
                continue
            blocks[int(m.group(1))] = blocks.get(int(m.group(1)), 0) + count
            if n_in is not None:
                linears[_EXPERT.sub(r"\1*.", name)] = n_in
                largest = max(largest, _matrix(name, shp, count))
    if not blocks:  # blocks not numbered as expected: the computed split is the best we know
        block, outside, largest = computed.block_params, computed.outside_params, computed.largest_linear
    else:
        block, outside = max(blocks.values()), total - sum(blocks.values())
    return Shape(params=total, layers=computed.layers, hidden=computed.hidden, ffn=computed.ffn, vocab=computed.vocab,
                 heads=computed.heads, model_type=computed.model_type, max_positions=computed.max_positions,
                 block_params=block, largest_linear=largest or computed.largest_linear,
                 linears=linears or computed.linears, source="checkpoint", checkpoint_bytes=nbytes, head_dim=computed.head_dim,
                 active_params=max(1, total - (computed.params - computed.active_params)), outside=outside,
                 largest_experts=computed.largest_experts, experts=computed.experts,  # transformers 5 fuses per-expert keys: the config's size
                 routers=routers or computed.routers, kept=computed.kept)


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
    from quantlens.paths import cache_dir

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
    from quantlens.errors import ConfigError

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
    calibrated: int = 0  # GPTQ settings: each calibrated once (then cached)
    calibration_tokens: float = 0.0  # per calibrated setting: samples × seqlen
    methods: str = "GPTQ"  # the calibrated methods, as the plan names them
    released: int = 0  # released-checkpoint settings (of the models they name)
    released_bits: int = 4  # their widest weights (the download), when known


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
    calibration_seconds: float = 0.0  # every calibrated setting's GPTQ, once

    @property
    def weight_gb(self) -> float:
        return self.shape.params * (2 if self.dtype != "float32" else 4) / 1e9

    @property
    def seconds(self) -> float:
        return self.seconds_per_setting * self.settings + (self.calibration_seconds if math.isfinite(self.calibration_seconds) else 0.0)

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
    # a linear's fp32 copy and its quantized result; an MoE's expert tensor is quantized matrix by
    # matrix into a new fused tensor (and its matrices' copy): two of it beside one matrix's temporaries
    quantizing = (8 + b) * shape.largest_linear + 2 * b * shape.largest_experts
    block = shape.block_params * b
    outside = shape.outside_params * b
    fwd1 = _forward_bytes(shape, T, b, work.act_quant)
    block_fwd1 = _forward_bytes(shape, T, b, work.act_quant)  # one block's forward, or decoding a batch
    kept_all = work.examples * T * (shape.kept or shape.hidden) * b
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
    lin = shape.blocks_params * b  # the linears' originals (memory) ≈ the blocks
    originals_in_ram = work.originals == "memory" or (work.originals == "auto" and W <= host_ram_gib() * GIB / 4)
    host = {
        "single": (W + (lin if originals_in_ram else 0)) / GIB if target.kind == "cpu" else max(W, lin if originals_in_ram else 0) / GIB,
        "device_map": (lin if originals_in_ram else 2 * block) / GIB,
        "stream": (outside + 2 * block + max(0.0, kept_all - kept["stream"])) / GIB,
    }
    placement, why = _choose(work.placement, fits, W, target)
    flops = 2 * shape.active_params * work.tokens  # an MoE: the parameters a token uses (top-k experts)
    secs = flops / (target.tflops * 1e12 * target.mfu) if target.tflops else float("nan")
    notes = []
    if placement == "stream":
        secs += W / (DISK_GBPS * 1e9)
        notes.append(f"stream reads {W / 1e9:.0f} GB per setting (at {DISK_GBPS:g} GB/s)")
    calib = calibration_seconds(shape, target, work, placement == "stream")
    if work.calibrated:
        notes.append(f"calibration ({work.methods}, {work.calibration_tokens:,.0f} tokens): ≈ {format_duration(calib)} per calibrated setting "
                     f"× {work.calibrated}, once (then cached)")
    if work.released:
        packed = shape.params * work.released_bits / 8
        size = f"{packed / 1e9:.1f} GB" if packed >= 1e8 else f"{packed / 1e6:.1f} MB"
        notes.append(f"released checkpoint(s) × {work.released}: each downloaded once (≈ {size} at {work.released_bits} bits), "
                     "dequantized layer by layer as it is patched (streamed: as each block arrives)")
    return Estimate(model, shape, target, dtype, T, batch, peak, low, fits, host, placement, why, secs,
                    work.settings, cached, notes, calibration_seconds=calib * work.calibrated)


GPTQ_COLUMN_S = 1e-4  # the column loop's per-column cost (≈ 6 small kernels and Python per column): an assumed order, not measured on a GPU


def calibration_seconds(shape: Shape, target: Target, work: Workload, streamed: bool) -> float:
    """One GPTQ calibration: two passes of the calibration tokens through the blocks (Hessians, then
    the quantized block's outputs), the Cholesky inverse and column updates of every linear
    (≈ 4·out·in² each), the column loop's overhead, and on ``stream`` one more read of the weights."""
    if not work.calibrated:
        return 0.0
    if not target.tflops:
        return float("nan")
    fwd = 2 * 2 * shape.active_params * work.calibration_tokens
    ins = list(shape.linears.values()) or [shape.hidden]
    mean_in = sum(ins) / len(ins)
    solve = 4 * shape.layers * shape.block_params * mean_in
    loop = shape.layers * sum(ins) * GPTQ_COLUMN_S
    secs = (fwd + solve) / (target.tflops * 1e12 * target.mfu) + loop
    if streamed:
        secs += shape.params * 2 / (DISK_GBPS * 1e9)
    return secs


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


def format_duration(s: float) -> str:
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
    active = f" ({s.active_params / 1e9:.3g}B active)" if s.active_params != s.params else ""
    head = (f"{e.model}: {s.params / 1e9:.3g}B params{active}, {e.weight_gb:.3g} GB in {e.dtype} "
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
             f"≈ {format_duration(e.seconds_per_setting)} per setting, {format_duration(e.seconds)} for {e.settings}")
    return [head, line2] + [f"  note: {n}" for n in e.notes]


