"""The composition matrix: every feature × every architecture of both papers' grids.

Architectures, built small from their Hugging Face config classes with random weights and saved as
safetensors: OPT (pre-LN), OPT-350m's shape (post-LN, ``word_embed_proj_dim`` < hidden:
project_in / project_out, no final norm), BLOOM, LLaMA, Llama-3 (GQA, llama3 rope scaling), Qwen2
(q/k/v bias, tied embeddings), Mistral (``head_dim`` ≠ hidden / heads).

Features, on each: quantized and perturbed settings (weights, activations, KV cache, clipping,
non-uniform; NVFP4, MX, NF, k-means and FP8 formats), per-example NLL and residual statistics, perplexity and Lambada-style requests, the
mechanism analysis, placements single / stream / device_map (CPU), and ``originals: checkpoint``.
Asserted: stream == single bit for bit, device_map == single, W16A16 == the Hugging Face loss,
restore bit-exact, KV16 is W16A16, and a model outside the anatomy fails in preflight in one line.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from packaging.version import Version

from conftest import MODELS
from quantlens.analysis.mechanisms import explain
from quantlens.evaluation.evaluate import lambada, perplexity
from quantlens.model.anatomy import ModelNotUnderstood, anatomy, check_config
from quantlens.model.loading import load_model
from quantlens.quantize.patch import current_setting, full_precision, full_report, quantize_, restore_
from quantlens.quantize.settings import ConfigError, resolve_setting


def _configs() -> dict[str, object]:
    import transformers as T

    common = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, max_position_embeddings=64)
    two = dict(common, num_hidden_layers=2)
    moe = dict(two, num_experts_per_tok=2)
    mla = dict(moe, moe_intermediate_size=32, intermediate_size=64, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
               kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
    return {
        "opt": T.OPTConfig(**common, ffn_dim=64, num_hidden_layers=3, word_embed_proj_dim=32),
        "opt-350m-shape": T.OPTConfig(**common, ffn_dim=64, num_hidden_layers=3, word_embed_proj_dim=16, do_layer_norm_before=False),
        "bloom": T.BloomConfig(vocab_size=96, hidden_size=32, n_layer=3, n_head=4),
        "llama": T.LlamaConfig(**common, intermediate_size=64, num_hidden_layers=3, num_key_value_heads=4),
        "llama3": T.LlamaConfig(**common, intermediate_size=64, num_hidden_layers=3, num_key_value_heads=2, rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 16}),
        "qwen2": T.Qwen2Config(**common, intermediate_size=64, num_hidden_layers=3, num_key_value_heads=2, tie_word_embeddings=True),
        "mistral": T.MistralConfig(**common, intermediate_size=64, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                                   sliding_window=None),
        # the dense families beyond the papers
        "qwen3": T.Qwen3Config(**two, intermediate_size=64, num_key_value_heads=2, head_dim=8),
        "gemma2": T.Gemma2Config(**two, intermediate_size=64, num_key_value_heads=2, head_dim=8, sliding_window=8),
        "gemma3": T.Gemma3TextConfig(**two, intermediate_size=64, num_key_value_heads=2, head_dim=8, sliding_window=8),
        "olmo2": T.Olmo2Config(**two, intermediate_size=64, num_key_value_heads=4),
        "gpt-neox": T.GPTNeoXConfig(**two, intermediate_size=64),
        "gpt2": T.GPT2Config(vocab_size=96, n_embd=32, n_head=4, n_positions=64, n_layer=2),
        "falcon": T.FalconConfig(vocab_size=96, hidden_size=32, num_attention_heads=4, num_hidden_layers=2),
        "phi3": T.Phi3Config(**two, intermediate_size=64, num_key_value_heads=2, pad_token_id=0),
        # norm layouts read from the layout table's rows (one small shape each)
        "gpt-j": T.GPTJConfig(vocab_size=96, n_embd=32, n_head=4, n_layer=2, n_positions=64, rotary_dim=4, bos_token_id=1,
                              eos_token_id=2),  # one norm, parallel
        "phi": T.PhiConfig(**two, intermediate_size=64),  # phi-2: one norm, parallel, no config flag
        "cohere": T.CohereConfig(**two, intermediate_size=64, num_key_value_heads=2, eos_token_id=2),  # the same
        "cohere2": T.Cohere2Config(**two, intermediate_size=64, num_key_value_heads=2, sliding_window=8, eos_token_id=2),
        "glm4": T.Glm4Config(**two, intermediate_size=64, num_key_value_heads=2, head_dim=8, pad_token_id=0),  # four norms
        "xglm": T.XGLMConfig(vocab_size=96, d_model=32, attention_heads=4, num_layers=2, ffn_dim=64, max_position_embeddings=64),
        "nemotron": T.NemotronConfig(**two, intermediate_size=64, num_key_value_heads=2),  # LayerNorm1P
        "apertus": T.ApertusConfig(**two, intermediate_size=64, num_key_value_heads=2),
        "vaultgemma": T.VaultGemmaConfig(**two, intermediate_size=64, num_key_value_heads=2, head_dim=8, sliding_window=8),
        "biogpt": T.BioGptConfig(**two, intermediate_size=64),  # OPT's norm names, its final norm is layer_norm
        # lighter: GPT-J's layout (CodeGen), pre-LN under other names with ALiBi and its own attention (MPT), Gemma-2's
        # sandwich under other names with muP multipliers on the residual and the logits (HyperCLOVAX)
        "codegen": T.CodeGenConfig(vocab_size=96, n_embd=32, n_head=4, n_layer=2, n_positions=64, rotary_dim=4),
        "mpt": T.MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=96, max_seq_len=64),
        "hyperclovax": T.HyperCLOVAXConfig(**two, intermediate_size=64, num_key_value_heads=2, use_post_norm=True, logits_scaling=0.5,
                                           residual_multiplier=0.8, embedding_multiplier=2.0),
        # mixtures of experts (transformers 5: fused 3-D expert tensors)
        "mixtral": T.MixtralConfig(**moe, intermediate_size=32, num_key_value_heads=2, num_local_experts=4),
        "qwen2-moe": T.Qwen2MoeConfig(**moe, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                      num_experts=4, num_key_value_heads=2),
        "qwen3-moe": T.Qwen3MoeConfig(**moe, intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_key_value_heads=2, head_dim=8),
        "deepseek-v2": T.DeepseekV2Config(**mla, q_lora_rank=None),
        "deepseek-v3": T.DeepseekV3Config(**mla, q_lora_rank=32, n_group=1, topk_group=1),
        "olmoe": T.OlmoeConfig(**moe, intermediate_size=32, num_experts=4, num_key_value_heads=4),
        "gpt-oss": T.GptOssConfig(**moe, intermediate_size=32, num_local_experts=4, num_key_value_heads=2, head_dim=8),
        # the router is mlp.gate.wg: a Linear inside a gate module that owns no weight
        "hunyuan-moe": T.HunYuanMoEV1Config(**two, intermediate_size=32, num_experts=4, moe_topk=2, num_key_value_heads=2, head_dim=8),
        # a dense first block; the router's per-expert e_score_correction_bias stored [1, experts]: a vector
        "ernie-4.5-moe": T.Ernie4_5_MoeConfig(**two, intermediate_size=64, moe_intermediate_size=32, moe_num_experts=4, moe_k=2,
                                              num_key_value_heads=2),
        # four norms (a sandwich read at pre_mlp_layernorm), gated attention, the router a Linear inside a router module
        "afmoe": T.AfmoeConfig(**moe, intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_dense_layers=1,
                               num_key_value_heads=2, head_dim=8),
        # one norm, parallel attention and MoE, no config flag
        "cohere2-moe": T.Cohere2MoeConfig(**moe, intermediate_size=64, num_experts=4, num_key_value_heads=2, sliding_window=8,
                                          eos_token_id=2),
        # experts that do not declare their layout (anatomy.KNOWN_EXPERTS): transposed, every token's row to every expert
        "llama4": T.Llama4TextConfig(**two, intermediate_size=32, intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1,
                                     interleave_moe_layer_step=2,  # Maverick's shape: a dense block, then an MoE one
                                     num_key_value_heads=2, head_dim=8),
        # its norms and attention in one sublayer (norm_attn_norm: r(l) read at norm_2), a fused Wqkv (clip_qkv set: transformers'
        # forward clamps by it), experts as 2-D tensors, expert by expert along dim 0, gate and up apart (anatomy.KNOWN_EXPERTS)
        "dbrx": T.DbrxConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=96,
                             attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                             ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2}),
        # a mixture of attention heads (experts for the query and output projections, its own router, one shared kv_proj
        # whose K/V reach the interface tiled top_k times) and an MoE MLP, both applying experts to rows grouped by
        # expert (anatomy.KNOWN_EXPERTS; heads = top_k × kv heads)
        "jetmoe": T.JetMoeConfig(**two, num_key_value_heads=2, kv_channels=16, intermediate_size=32, num_local_experts=4,
                                 num_experts_per_tok=2),
        # a hybrid: gated DeltaNet (linear attention: no KV cache, conv1d / A_log / dt_bias / norm kept 16-bit) and
        # gated full attention alternating, each block then an MoE with a shared expert and its gate
        "qwen3_next": T.Qwen3NextConfig(**dict(moe, num_hidden_layers=4), layer_types=["linear_attention", "full_attention"] * 2,
                                        num_key_value_heads=2, head_dim=8, intermediate_size=64, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=64, num_experts=4, linear_num_key_heads=2,
                                        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8),
        # Qwen3.5: the same mixers, its DeltaNet's projections split otherwise (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a), dense MLPs
        "qwen3.5": T.Qwen3_5TextConfig(**dict(common, num_hidden_layers=4), layer_types=["linear_attention", "full_attention"] * 2,
                                       num_key_value_heads=2, head_dim=8, intermediate_size=64, linear_num_key_heads=2,
                                       linear_num_value_heads=8, linear_key_head_dim=8, linear_value_head_dim=8),  # (in_proj_b/a: 8 rows, a GPTQ word)
        # state-space hybrids: Jamba (blocks of two classes: Mamba-1 with its dt_proj applied by weight, attention; MoE every
        # second block), Granite-4 (Mamba-2 and attention, an MoE with a shared MLP, logits divided by logits_scaling),
        # Falcon-H1 (Mamba-2 beside the attention in every block, muP multipliers on the head); LFM2-MoE's short convolutions
        "jamba": T.JambaConfig(**dict(common, num_hidden_layers=4), intermediate_size=64, num_key_value_heads=2, num_experts=4,
                               num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
                               attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8),
        "granite-4": T.GraniteMoeHybridConfig(**two, intermediate_size=32, shared_intermediate_size=64, num_local_experts=4,
                                              num_experts_per_tok=2, num_key_value_heads=2, layer_types=["mamba", "attention"],
                                              mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1, mamba_expand=2,
                                              mamba_chunk_size=16, logits_scaling=2.0),  # (in_proj: 152 rows, whole GPTQ words)
        "falcon-h1": T.FalconH1Config(**two, intermediate_size=64, num_key_value_heads=2, head_dim=8, mamba_n_heads=8, mamba_d_head=8,
                                      mamba_d_ssm=64, mamba_d_state=8, mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=16,
                                      lm_head_multiplier=0.5, embedding_multiplier=2.0),
        # state-space models without MLPs: Mamba (each block its norm and a Mamba-1 mixer), Nemotron-H (each block one sublayer:
        # Mamba-2, attention, an MLP, an MoE)
        "mamba": T.MambaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
                               time_step_rank=8),  # (x_proj: 24 rows, whole GPTQ words)
        "nemotron-h": T.NemotronHConfig(**dict(common, num_hidden_layers=4), intermediate_size=64, num_key_value_heads=2, head_dim=8,
                                        hybrid_override_pattern="M*-E", mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=8, n_groups=1,
                                        expand=2, chunk_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1),
        # linear attentions of their own: OLMo-hybrid's gated DeltaNet (pre-LN blocks) beside OLMo's post-sublayer attention
        # blocks (two block classes, two layouts); Kimi Linear's delta attention beside MLA, a dense first block, then MoEs
        "olmo-hybrid": T.OlmoHybridConfig(**dict(common, num_hidden_layers=4), intermediate_size=64, num_key_value_heads=2,
                                          pad_token_id=0, eos_token_id=1, bos_token_id=1, linear_num_key_heads=8,
                                          linear_num_value_heads=8, linear_key_head_dim=4, linear_value_head_dim=8),  # (a/b_proj: 8 rows)
        "kimi-linear": T.KimiLinearConfig(**dict(common, num_hidden_layers=4), intermediate_size=64, num_key_value_heads=4,
                                          moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, kv_lora_rank=32,
                                          qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, pad_token_id=0, eos_token_id=1,
                                          bos_token_id=1, linear_attn_config={"kda_layers": [1, 3], "full_attn_layers": [2, 4],
                                                                              "num_heads": 8, "head_dim": 32, "short_conv_kernel_size": 4}),
        # a transformer block shared by the hybrid layers (one module a layer, its parameters tied; per-layer LoRA adapters)
        # reading [z; embeddings], its output projected into the Mamba-2 layer's input (the `shared` layout)
        "zamba2": T.Zamba2Config(**dict(common, num_hidden_layers=4), intermediate_size=64, num_key_value_heads=4, mamba_headdim=8,
                                 n_mamba_heads=8, mamba_d_state=8, layers_block_type=["mamba", "hybrid"] * 2, num_mem_blocks=1,
                                 use_shared_attention_adapter=True, adapter_rank=32, chunk_size=16),
        # four residual streams between blocks (AltUp: its router and coefficient maps a routers role), LAuReL beside the
        # attention, per-layer inputs (a per-block slice of one tensor), the last two layers reusing earlier layers' K/V
        "gemma3n": T.Gemma3nTextConfig(**dict(common, num_hidden_layers=4), intermediate_size=64, num_key_value_heads=2, head_dim=8,
                                       sliding_window=8, hidden_size_per_layer_input=32, vocab_size_per_layer_input=96, laurel_rank=32,
                                       num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2,
                                       activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]),
        "lfm2-moe": T.Lfm2MoeConfig(**dict(common, num_hidden_layers=3), intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                    num_experts_per_tok=2, num_dense_layers=1, num_key_value_heads=2,
                                    layer_types=["conv", "full_attention", "conv"], conv_L_cache=3),
        # two passes a block (MLA → dense MLP, twice; the shortcut layout), an MoE reading the first pass's MLP input with
        # identity ("zero-computation") experts its router scores beside the real ones (anatomy.IDENTITY_EXPERTS)
        "longcat-flash": T.LongcatFlashConfig(**common, num_layers=2, num_key_value_heads=4, ffn_hidden_size=64, expert_ffn_hidden_size=32,
                                              n_routed_experts=4, zero_expert_num=2, moe_topk=2, q_lora_rank=16, kv_lora_rank=16,
                                              qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=8),  # (head_dim: the rope's)
    }


ARCHS = list(_configs())
# families whose mixer another architecture already carries through every feature, run lighter (suite time):
# Kimi Linear's delta attention (a linear attention, as Qwen3-Next's and OLMo-hybrid's) — its torch fallback is slow;
# JetMoe's (its experts' weights and inputs and its tiled K/V: tests/test_moe.py; every feature passed once, 37 s)
# LongCat-Flash's MLA (DeepSeek's, every feature) and fused experts (Mixtral's …): its own anatomy (two passes, identity
# experts) in test_longcat_flash_is_read_as_two_passes_with_identity_experts; CodeGen, MPT and HyperCLOVAX: layout rows
# whose layouts GPT-J, OPT/BLOOM (a residual added inside the MLP) and Gemma-2 carry through every feature
LIGHT = ("kimi-linear", "jetmoe", "longcat-flash", "codegen", "mpt", "hyperclovax")
MOE = ("mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v2", "deepseek-v3", "olmoe", "gpt-oss", "hunyuan-moe", "ernie-4.5-moe", "afmoe", "cohere2-moe", "llama4", "dbrx",
       "jetmoe",
       "qwen3_next", "jamba", "granite-4", "lfm2-moe", "nemotron-h", "kimi-linear", "longcat-flash")
# archs with routers kept 16-bit by default: the MoEs, and Gemma-3n (AltUp's router and coefficient maps)
ROUTED = (*MOE, "gemma3n")
# arch → each block's (main) token mixer (all others: attention); a hybrid keeps its mixers' states 16-bit
HYBRID = {"qwen3_next": ("linear attention", "attention") * 2, "qwen3.5": ("linear attention", "attention") * 2,
          "jamba": ("ssm", "attention") * 2, "granite-4": ("ssm", "attention"), "falcon-h1": ("attention",) * 2,  # (its Mamba-2: a side mixer)
          "lfm2-moe": ("short conv", "attention", "short conv"), "mamba": ("ssm", "ssm"), "zamba2": ("ssm", "attention") * 2,
          "nemotron-h": ("ssm", "attention", "none", "none"), "olmo-hybrid": ("linear attention",) * 3 + ("attention",),
          "kimi-linear": ("linear attention", "attention") * 2}  # (its MLP and MoE blocks mix no tokens)
LAYOUT = {"opt-350m-shape": "post-LN", "gemma2": "sandwich", "gemma3": "sandwich", "olmo2": "post-sublayer",
          "gpt-neox": "parallel", "falcon": "parallel", "gpt-j": "parallel", "codegen": "parallel", "hyperclovax": "sandwich", "phi": "parallel", "cohere": "parallel",
          "cohere2": "parallel", "glm4": "sandwich", "afmoe": "sandwich", "cohere2-moe": "parallel",
          "olmo-hybrid": "pre-LN+post-sublayer", "zamba2": "pre-LN+shared", "gemma3n": "altup", "longcat-flash": "shortcut"}  # (+: blocks of each layout)
# Models whose stream and single runs agree to float32 rounding, not bit for bit: Jamba's Mamba-1 computes
# dt_proj.weight @ x, a broadcast matmul whose CPU result depends on where its operands sit in memory
# (measured: 4 different results over 16 offsets of the same tensors), and a streamed block's tensors sit elsewhere
ALIGNMENT_SENSITIVE = {"jamba", "mamba"}
EXPERT_TENSORS = {"dbrx": 3, "jetmoe": 4}  # expert tensors per MoE block (others: gate_up_proj or up_proj, down_proj): DBRX's w1, v1, w2;
# JetMoe's input_linear and output_linear of its MoE and of its mixture of attention heads
KV_REFUSED = {"deepseek-v2": "multi-head latent attention", "deepseek-v3": "multi-head latent attention", "kimi-linear": "multi-head latent attention",
              "longcat-flash": "multi-head latent attention",
              "xglm": "computes K/V in code quantlens cannot reach", "mamba": "has no attention block"}  # (XGLM's attention is not on the shared interface)
# the only refusals: KV settings, in one line. Falcon computed K/V in its own attention code until
# transformers 5.25, which routes it through the shared attention interface the KV cache reaches.
if Version(transformers.__version__) < Version("5.25"):
    KV_REFUSED["falcon"] = "computes K/V in code quantlens cannot reach"
SETTINGS = [
    "W16A16",
    "W16A16KV16",  # the same computation as W16A16
    "W4A8",
    "W3A16-g16-nu",
    "W8A8-clip3",
    "W16A16KV4",
    "W4A8KV4-nu",
    {"name": "W4A8+noise", "base": "W4A8", "perturbation": {"target": "both", "seed": 3}},
    {"name": "W16A16KV4+noise", "base": "W16A16KV4", "perturbation": {"target": "kv", "rule": "proportional", "seed": 1}},
    # the field's formats (hidden 32, head_dim 8 or 16: blocks that divide them)
    "W4A4-nvfp4",
    "W4A8-mxfp",  # MXFP4 weights, MXFP8 activations
    "W4A16-g16-nf4",
    "W3A16-km",
    "W16A16KV8-fp8",
    {"name": "W4A4-nvfp4+noise", "base": "W4A4-nvfp4", "perturbation": {"target": "both", "distribution": "uniform", "seed": 2}},
]
FORMATS = ("W4A4-nvfp4", "W4A8-mxfp", "W4A16-g16-nf4", "W3A16-km", "W16A16KV8-fp8", "W4A4-nvfp4+noise")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """arch → a saved model folder (config, safetensors, a tokenizer so that load_model works)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for arch, cfg in _configs().items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # LayerNorm weights away from 1 and biases away from 0: nothing is trivially exact
            for n, p in model.named_parameters():
                if p.ndim == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(MODELS / "tiny-llama" / f, path / f)
        out[arch] = str(path)
    return out


def _inputs(vocab: int) -> tuple[torch.Tensor, list[tuple[list[int], list[int]]]]:
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(1, vocab, (6, 24), generator=g)
    reqs = [(torch.randint(1, vocab, (int(n),), generator=g).tolist(), torch.randint(1, vocab, (int(k),), generator=g).tolist())
            for n, k in zip(torch.randint(4, 20, (7,), generator=g), torch.randint(1, 3, (7,), generator=g))]
    return windows, reqs


def _evaluate(model, setting, windows, reqs) -> dict[str, object]:
    s = resolve_setting(setting)
    quantize_(model, s)
    try:
        ppl = perplexity(model, windows, batch_size=4, residual=s.is_reference)
        lam = lambada(model, reqs, batch_size=3, residual=s.is_reference)
    finally:
        restore_(model)
    out = {"ppl": ppl["ppl"], "nll": ppl["per_example"]["nll"].to_numpy(), "acc": lam["acc"], "lam_nll": lam["per_example"]["nll"].to_numpy()}
    if s.is_reference:
        out["residual"] = ppl["residual"]
        out["lam_residual"] = lam["residual"]
    return out


def _same(a: dict, b: dict, what: str, exact: bool = True) -> None:
    """Bit for bit; ``exact=False``: to float32 rounding (rel 1e-5), for a model whose CPU kernels round by memory alignment."""
    for k in a:
        if isinstance(a[k], pd.DataFrame):
            pd.testing.assert_frame_equal(a[k], b[k], check_exact=exact, rtol=1e-5, obj=f"{what} {k}")
        elif isinstance(a[k], float):
            assert a[k] == (b[k] if exact else pytest.approx(b[k], rel=1e-5)), f"{what} {k}: {a[k]} != {b[k]}"
        else:
            assert (a[k] == b[k]).all() if exact else a[k] == pytest.approx(b[k], rel=1e-5), f"{what} {k}"


@pytest.mark.parametrize("arch", LIGHT)
def test_a_lighter_family_runs_stream_equal_to_single(arch, folders):
    """W16A16 is Hugging Face's loss; W16A16 and W4A8 (perplexity and Lambada-style requests) stream == single."""
    single, _ = load_model(folders[arch], device="cpu", dtype="float32", placement="single")
    stream, _ = load_model(folders[arch], device="cpu", dtype="float32", placement="stream")
    assert {b.layout for b in anatomy(single).parts} == set(LAYOUT.get(arch, "pre-LN").split("+"))
    windows, reqs = _inputs(single.config.vocab_size)
    with torch.no_grad():
        hf = float(single(input_ids=windows, labels=windows).loss)
    for setting in ("W16A16", "W4A8"):
        r = _evaluate(single, setting, windows, reqs)
        _same(r, _evaluate(stream, setting, windows, reqs), f"{arch}/{setting} stream vs single")
        if setting == "W16A16":
            assert r["nll"].mean() == pytest.approx(hf, rel=1e-6)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in LIGHT])
def test_every_feature_on_every_architecture(arch, folders):
    path = folders[arch]
    single, _ = load_model(path, device="cpu", dtype="float32", placement="single")
    stream, _ = load_model(path, device="cpu", dtype="float32", placement="stream")
    windows, reqs = _inputs(single.config.vocab_size)
    body = anatomy(single)
    assert {b.layout for b in body.parts} == set(LAYOUT.get(arch, "pre-LN").split("+")), body.describe()
    if arch == "opt-350m-shape":
        assert body.post_ln and body.final_norm is None and body.project_in is not None and body.project_out is not None
        assert body.parts[0].residual_site is single.model.decoder.layers[0].self_attn_layer_norm
    else:
        assert not body.post_ln and body.final_norm is not None
    assert body.is_moe == (arch in MOE)
    assert tuple(b.mixer for b in body.parts) == HYBRID.get(arch, ("attention",) * len(body.parts))
    kv_refused = KV_REFUSED.get(arch)

    # W16A16 is the model itself: its NLL is Hugging Face's own loss
    with torch.no_grad():
        hf = float(single(input_ids=windows, labels=windows).loss)
    results = {}
    for setting in SETTINGS:
        s = resolve_setting(setting)
        if kv_refused and s.kv is not None:  # refused in one line, before a weight changes
            with pytest.raises(ModelNotUnderstood, match=f"^KV-cache settings cannot be applied: .*{kv_refused}"):
                quantize_(single, s)
            assert current_setting(single) is None
            continue
        results[s.name] = r = _evaluate(single, setting, windows, reqs)
        _same(r, _evaluate(stream, setting, windows, reqs), f"{arch}/{s.name} stream vs single", exact=arch not in ALIGNMENT_SENSITIVE)
        assert torch.isfinite(torch.tensor(r["nll"])).all()
    assert results["W16A16"]["nll"].mean() == pytest.approx(hf, rel=1e-6)
    for name in ("W4A8", "W16A16KV4", "W4A8+noise", "W16A16KV4+noise", "W3A16-g16-nu", *FORMATS):
        if name in results:
            assert (results[name]["nll"] != results["W16A16"]["nll"]).any(), f"{arch}/{name} changed nothing"
    if not kv_refused:
        _same(results["W16A16"], results["W16A16KV16"], f"{arch}: KV16 is W16A16")
        # the KV cache of every attention block is quantized, and nothing else (a hybrid's linear attention caches no K/V)
        kv_report = quantize_(single, "W16A16KV4")
        try:
            perplexity(single, windows[:2], batch_size=2)
            kv_layers = {s.layer for s in full_report(single).layers if s.kind in ("key", "value")}
        finally:
            restore_(single)
        attending = [b for b in body.parts if b.mixer == "attention"]
        assert kv_layers == {f"{b.attention_name}.{w}" for b in attending for w in ("key", "value")}
        # how many blocks have a KV cache: what the console says of a hybrid ("KV cache in 2 of 4 blocks")
        assert kv_report.coverage == {"kv_cache_blocks": len(attending), "kv_cache_share": len(attending) / len(body.parts)}

    # every weight the setting targets is quantized: on an MoE, every row of every expert slice takes ≤ 2^4 values
    for model in (single, stream):
        quantize_(model, "W4A16")
        try:
            w4 = perplexity(model, windows, batch_size=4)["per_example"]["nll"].to_numpy()
            cov = full_report(model).summary()
            assert cov["coverage_targeted"] == 1.0, cov
            assert (cov["coverage_block"] < 1.0) == (arch in ROUTED or arch in HYBRID), cov  # routers, a linear attention's states: 16-bit
            if model is single and arch in MOE:
                experts = [(e, a) for e in body.experts() for a in e.params]
                assert len(experts) == EXPERT_TENSORS.get(arch, 2) * sum(b.is_moe for b in body.parts)
                for e, a in experts:
                    rows = e.matrices(a, e.tensor(a).data).reshape(-1, e.in_features(a))
                    assert max(len(torch.unique(r)) for r in rows) <= 16, f"{e.name}.{a}"
                with full_precision(model, [e.qualified(a) for e, a in experts], activations=False):
                    w4_experts16 = perplexity(model, windows, batch_size=4)["per_example"]["nll"].to_numpy()
                assert (w4_experts16 != w4).any(), "the experts' quantization changed nothing"
        finally:
            restore_(model)
        if model is single:
            w4_single = w4
    assert (w4 == w4_single).all() if arch not in ALIGNMENT_SENSITIVE else w4 == pytest.approx(w4_single, rel=1e-5)

    # residual statistics: every layer, every example, finite
    res = results["W16A16"]["residual"]
    assert len(res) == 6 * len(body.parts) and res[["r_norm", "z_norm", "r_kurtosis"]].notna().all().all()

    # the mechanism analysis, on a plain model and on a streamed one (per-batch forwards there)
    sets = {"large": windows[:3].tolist(), "ctrl": windows[3:].tolist()}
    explained = {}
    for placement, model in (("single", single), ("stream", stream)):
        quantize_(model, "W4A8", keep_originals_on="same")
        try:
            explained[placement] = explain(model, sets, layers="all", batch_size=2)
        finally:
            restore_(model)
    for table in ("layer_error", "early_exit", "patching"):
        pd.testing.assert_frame_equal(getattr(explained["single"], table), getattr(explained["stream"], table),
                                      check_exact=arch not in ALIGNMENT_SENSITIVE, rtol=1e-5)
    patching = explained["single"].patching.set_index("patched")["nll"]
    ex = explained["single"].per_example
    full = (ex[ex["set"] == "large"]["nll_full"]).mean()
    assert patching["all"] == pytest.approx(full, rel=1e-6)  # every module restored = the full-precision model
    early = explained["single"].early_exit
    last_z = early[(early["set"] == "large") & (early["precision"] == "full") & (early["source"] == "z")]
    assert last_z[last_z["layer"] == len(body.parts) - 1]["nll"].iloc[0] == pytest.approx(full, rel=1e-6)  # decoding z(L) is the model

    # originals: checkpoint restores bit for bit (an MoE's experts: fused from the per-expert matrices it stores)
    mixed = "W4A8-nu" if kv_refused else "W4A8KV4-nu"
    before = {k: v.clone() for k, v in single.state_dict().items()}
    quantize_(single, mixed, keep_originals_on="checkpoint")
    restore_(single)
    after = single.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # device_map on CPU computes what single computes
    dm, _ = load_model(path, device="cpu", dtype="float32", placement="device_map")
    for setting in ("W16A16", "W4A8"):
        _same(results[setting], _evaluate(dm, setting, windows, reqs), f"{arch}/{setting} device_map", exact=arch not in ALIGNMENT_SENSITIVE)


def test_a_model_outside_the_anatomy_fails_in_one_line():
    from transformers import CTRLConfig, LlamaConfig

    with pytest.raises(ModelNotUnderstood, match=r"^CTRLLMHeadModel: block EncoderLayer has norms \[layernorm1, layernorm2\]: not a layout "
                                                 r"quantlens knows \(pre-LN, post-LN, sandwich, post-sublayer, parallel, shortcut, shared, altup\)"):
        check_config(CTRLConfig(n_layer=2, n_embd=32, n_head=4, dff=64, vocab_size=96))
    assert check_config(_configs()["opt-350m-shape"]).post_ln
    # a matrix the anatomy cannot account for is refused by name, never skipped
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=96, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                                         num_hidden_layers=2))
    model.model.layers[1].mlp.adapter = torch.nn.Parameter(torch.zeros(4, 32))
    with pytest.raises(ModelNotUnderstood, match=r"block tensor model.layers.1.mlp.adapter \(4, 32\) is neither a linear's weight"):
        anatomy(model)


def test_fused_experts_without_a_declared_layout_are_refused():
    """A layout is read from the experts module, never guessed from shapes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_configs()["mixtral"])
    experts = model.model.layers[0].mlp.experts
    del experts.is_transposed
    with pytest.raises(ModelNotUnderstood, match=r"experts module model.layers.0.mlp.experts .* does not declare their layout \(is_transposed"):
        anatomy(model)


def _stream_equals_single(single, stream, setting, weights: dict, windows, what: str) -> None:
    """``setting`` with its given weights (``weights[placement]``) on the single and the streamed
    model: every targeted weight quantized, the per-window NLLs bit for bit equal (``what``: arch/setting)."""
    results = {}
    for p, m in (("single", single), ("stream", stream)):
        quantize_(m, setting, calibrated=weights[p])
        try:
            results[p] = {"nll": perplexity(m, windows, batch_size=4)["per_example"]["nll"].to_numpy()}
            assert full_report(m).summary()["coverage_targeted"] == 1.0
        finally:
            restore_(m)
    _same(results["single"], results["stream"], f"{what} stream vs single", exact=what.split("/")[0] not in ALIGNMENT_SENSITIVE)


@pytest.mark.parametrize("arch", ARCHS)
def test_calibrated_methods_on_every_architecture(arch, folders):
    """GPTQ (with A8 on top) and AWQ on every architecture, experts included: calibrated layer by layer
    on a single model and on a streamed one (blocks read from the checkpoint) to the same weights bit
    for bit, then evaluated stream == single, every targeted weight quantized."""
    from quantlens.quantize.calibrate import calibrate_model

    path = folders[arch]
    single, _ = load_model(path, device="cpu", dtype="float32", placement="single")
    stream, _ = load_model(path, device="cpu", dtype="float32", placement="stream")
    windows, reqs = _inputs(single.config.vocab_size)
    calib = torch.randint(1, single.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(9))
    for name in ("W4A8-g16-gptq", "W3A16-g16-awq"):
        s = resolve_setting(name)
        got = {p: calibrate_model(m, s, calib, batch_size=2) for p, m in (("single", single), ("stream", stream))}
        assert got["single"].keys() == got["stream"].keys()
        assert all(torch.equal(got["single"][k], got["stream"][k]) for k in got["single"]), f"{arch}/{name}: stream calibrated otherwise"
        _stream_equals_single(single, stream, s, got, windows, f"{arch}/{name}")


def _all_targets(model):
    from quantlens.quantize.patch import targets

    return targets(model, resolve_setting({"name": "all", "weights": {"bits": 4}, "include_routers": True, "include_lm_head": True}))


@pytest.mark.parametrize("arch", ARCHS)
def test_released_checkpoints_on_every_architecture(arch, folders, tmp_path):
    """A GPTQ checkpoint (4 bits, g16, act-order; experts one matrix each under the names save_pretrained
    writes; GPT-2's Conv1D as its [out, in] matrix) read into the single and the streamed model alike,
    alone and with A8 on top: every layer the checkpoint packs is read (experts fused back through the
    conversion mapping), stream == single bit for bit, restore exact."""
    from quantlens.checkpoints.export import write_quantized
    from quantlens.checkpoints.released import describe, released_weights

    path = folders[arch]
    single, _ = load_model(path, device="cpu", dtype="float32", placement="single")
    stream, _ = load_model(path, device="cpu", dtype="float32", placement="stream")
    windows, _ = _inputs(single.config.vocab_size)
    r = describe(write_quantized(single, tmp_path / "gptq", "gptq", bits=4, group_size=16, sym=False, act_order=True))
    read = {p: released_weights(m, r) for p, m in (("single", single), ("stream", stream))}
    weights, overrides, params = read["single"]
    assert overrides == {} and read["stream"][1] == {}
    assert weights.keys() == read["stream"][0].keys() and all(torch.equal(weights[k], read["stream"][0][k]) for k in weights)
    body = anatomy(single)
    experts = {e.qualified(a) for e in body.experts() for a in e.params}
    fused_on_disk = arch in ("gpt-oss", "llama4", "granite-4", "dbrx", "jetmoe")  # (their checkpoints hold the fused tensors: no per-expert matrix to pack)
    expected = {n for n, _ in body.block_linears()} | (set() if fused_on_disk else experts)
    assert set(weights) == expected, set(expected) ^ set(weights)  # every linear and every expert tensor, from the checkpoint
    assert params["checkpoint_full_precision_layers"] == (len(experts) if fused_on_disk else 0)
    own = {n: t.param.detach() for n, t in ((t.name, t) for t in _all_targets(single))}
    for name in weights:  # each read weight is the model's own, 4-bit-rounded (a transposed or shifted one is not)
        rel = float((weights[name] - own[name]).norm() / own[name].norm())
        assert 0 < rel < 0.2, (name, rel)
    before = {k: v.detach().clone() for k, v in single.state_dict().items()}
    for setting in ({"name": "ck", "checkpoint": str(r.folder)},
                    {"name": "ck-A8", "checkpoint": str(r.folder), "activations": {"bits": 8, "granularity": "token"}}):
        s = resolve_setting(setting).described(r.weights(), r.method, r.layout)
        _stream_equals_single(single, stream, s, {p: read[p][0] for p in read}, windows, f"{arch}/{s.name}")
    assert all(torch.equal(v, single.state_dict()[k]) for k, v in before.items())


def _measured_coverage(before: dict[str, torch.Tensor], model) -> float:
    """coverage_block measured from the weights: the elements of the block matrices that changed tensors hold."""
    mats = anatomy(model).block_matrix_params()
    changed = sum(p.numel() for n, p in mats.items() if not torch.equal(before[n], p.detach()))
    return changed / sum(p.numel() for p in mats.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_every_named_weight_is_quantized_and_routers_stay_16_bit_unless_included(arch):
    """Every linear and expert tensor the anatomy names is quantized by W4 (its weights change); an
    MoE's routers (found by what they are: the modules producing the routing scores) keep their
    16-bit weights, and take ≤ 2^4 values a row with include_routers; coverage_block is what the
    weights show (1.0 for a dense model)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[arch]).eval()
    body = anatomy(model)
    routers = body.routers()
    with torch.no_grad():  # (AfMoE initialises its router to zeros: nothing to see a 4-bit grid on)
        for p in body.block_matrix_params().values():
            p.normal_(0, 0.1)
    assert bool(routers) == (arch in ROUTED)
    assert all(n.startswith(b.moe_name) for b in body.parts if b.is_moe for n, _ in b.routers)
    before = {n: p.detach().clone() for n, p in body.block_matrix_params().items()}
    was = {id(p): before[n] for n, p in body.block_matrix_params().items()}  # (a weight shared by several blocks: Zamba2's, one matrix)
    states = {id(p) for _, p in body.state_matrices()}
    vectors = [n for n, p in body.mixer_states() if id(p) not in states]  # (D, dt_bias, norms: 16-bit under every setting)
    assert bool(states) == (arch in HYBRID), body.mixer_states()  # (every hybrid has a conv kernel or an A_log matrix)
    for include, with_states in ((False, False), (True, False)) + (((False, True),) if arch in HYBRID else ()):
        s = resolve_setting({"name": "w4", "weights": {"bits": 4}, "include_routers": include, "include_mixer_states": with_states})
        report = quantize_(model, s)
        try:
            for n, m in routers:
                w = m.weight.detach()
                assert torch.equal(w, was[id(m.weight)]) != include, f"{arch}: router {n}"
                if include:
                    assert max(len(torch.unique(r)) for r in w.reshape(w.shape[0], -1)) <= 16, n
            for n, m in body.block_linears():
                assert not torch.equal(m.weight.detach(), was[id(m.weight)]), f"{arch}: linear {n} not quantized"
            for e in body.experts():
                for a in e.params:
                    assert not torch.equal(e.tensor(a).detach(), before[e.qualified(a)]), f"{arch}: {e.qualified(a)}"
            for n, p in body.mixer_states():  # conv kernels, A_log, dt_bias, norms: 16-bit, counted in the block; the
                w = p.detach()                 # matrices among them 4-bit (≤ 16 values a row of taps) with include_mixer_states
                assert torch.equal(w, before[n]) != (with_states and id(p) in states), f"{arch}: {n}"
                if with_states and id(p) in states:
                    assert max(len(torch.unique(r)) for r in w.reshape(-1, w.shape[-1])) <= 16, n
            cov = report.coverage
            assert cov["coverage_targeted"] == 1.0
            assert cov["coverage_block"] == pytest.approx(_measured_coverage(before, model), abs=1e-12)
            assert (cov["coverage_block"] == 1.0) == ((include or arch not in ROUTED) and arch not in HYBRID), cov
            kept = {k: v for k, v in cov.items() if k.startswith("coverage_16bit_")}  # what stayed 16-bit, by role
            want = {"coverage_16bit_routers": arch in ROUTED and not include,
                    "coverage_16bit_mixer_states": arch in HYBRID and (not with_states or bool(vectors))}
            assert set(kept) == {k for k, on in want.items() if on}, cov
            assert cov["coverage_block"] + sum(kept.values()) == pytest.approx(1.0, abs=1e-12), cov
        finally:
            restore_(model)


@pytest.mark.parametrize("arch", ["jamba", "falcon-h1", "lfm2-moe"])  # (Mamba-1, a side Mamba-2, a short conv)
def test_mixer_states_are_quantized_when_a_setting_asks(arch, folders):
    """include_mixer_states: the hybrid's state matrices (Mamba-1's conv kernel, A_log and dt_proj;
    a DeltaNet's or a short convolution's conv kernel; Falcon-H1's side Mamba-2's) quantized as rows
    of taps — with RTN, with a weight perturbation, and beside GPTQ (which calibrates the linears and
    rounds the states), the streamed model equal to the single one; llama.cpp's block types refused."""
    from quantlens.quantize.calibrate import cache_key, calibrate_model

    single, _ = load_model(folders[arch], device="cpu", dtype="float32", placement="single")
    stream, _ = load_model(folders[arch], device="cpu", dtype="float32", placement="stream")
    windows, reqs = _inputs(single.config.vocab_size)
    states = [n for n, _ in anatomy(single).state_matrices()]
    base = _evaluate(single, "W4A8", windows, reqs)
    for setting in ({"name": "W4A8+states", "base": "W4A8", "include_mixer_states": True},
                    {"name": "W4A8+states+noise", "base": "W4A8", "include_mixer_states": True, "perturbation": {"target": "weights", "seed": 4}}):
        s = {**resolve_setting(setting["base"]).model_dump(exclude={"name", "base"}), **setting}
        r = _evaluate(single, s, windows, reqs)
        _same(r, _evaluate(stream, s, windows, reqs), f"{arch}/{setting['name']} stream vs single", exact=arch not in ALIGNMENT_SENSITIVE)
        assert not np.array_equal(r["nll"], base["nll"]), f"{arch}: the states changed nothing"
        report = quantize_(single, s)
        restore_(single)
        rows = {x.layer for x in report.layers}
        assert {n.removesuffix(".weight") for n in states} <= rows, rows
    s = resolve_setting({**resolve_setting("W4A8-g16-gptq").model_dump(exclude={"name"}), "name": "gptq+states", "include_mixer_states": True})
    calib = torch.randint(1, single.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(9))
    got = {p: calibrate_model(m, s, calib, batch_size=2) for p, m in (("single", single), ("stream", stream))}
    assert {n.removesuffix(".weight") for n in states} <= got["single"].keys() == got["stream"].keys()
    assert cache_key(single, s, calib) != cache_key(single, resolve_setting("W4A8-g16-gptq"), calib)  # (not the states-free weights)
    assert all(torch.equal(got["single"][k], got["stream"][k]) for k in got["single"])
    _stream_equals_single(single, stream, s, got, windows, f"{arch}/gptq+states")
    with pytest.raises(ConfigError, match=r"include_mixer_states: llama.cpp's types are blocks"):
        resolve_setting({**resolve_setting("W4A16-q4_0").model_dump(exclude={"name"}), "name": "q4_0", "include_mixer_states": True})




def test_more_hybrids_are_understood():
    """Bamba (Mamba-2 and attention: the mixer of Granite-4, config-derived layer types) and LFM2
    (dense, its final norm named embedding_norm): each mixer's linears quantized, its states 16-bit."""
    import transformers as T

    c = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_hidden_layers=4, num_key_value_heads=2)
    bamba = check_config(T.BambaConfig(**c, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, attn_layer_indices=[1, 3]))
    assert [b.mixer for b in bamba.parts] == ["ssm", "attention"] * 2 and len(bamba.kv_parts()) == 2
    assert {n.rsplit(".", 1)[-1] for n, _ in bamba.parts[0].attention_linears} == {"in_proj", "out_proj"}
    assert {n.split("mamba.")[-1] for n, _ in bamba.parts[0].mixer_states} == {"A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias", "norm.weight"}
    lfm2 = check_config(T.Lfm2Config(**c, layer_types=["conv", "full_attention", "conv", "full_attention"]))
    assert [b.mixer for b in lfm2.parts] == ["short conv", "attention"] * 2 and lfm2.final_norm is not None
    assert [n.split("conv.", 1)[-1] for n, _ in lfm2.parts[0].mixer_states] == ["conv.weight"]


def test_hybrid_models_are_refused_naming_their_layer_types(monkeypatch):
    """A block list mixing tokens otherwise than by attention with a mixer quantlens has no row for is
    refused in preflight in one line naming the layers and the mixer, not a norm or block-list symptom
    (Zamba2's adapter list taken for its blocks; Jamba's "no decoder block list"): Zamba2 without its row."""
    import quantlens.model.anatomy as A

    monkeypatch.delitem(A.TOKEN_MIXERS, "Zamba2MambaMixer")
    with pytest.raises(ModelNotUnderstood, match=r"^Zamba2ForCausalLM: hybrid blocks \(ssm, ssm\+attention\) are not supported yet: "
                                                 r"layers 0,2 are ssm; layers 1,3 are ssm\+attention \(Zamba2MambaMixer: not in "
                                                 r"anatomy.TOKEN_MIXERS\)$") as err:
        check_config(_configs()["zamba2"])
    assert "\n" not in str(err.value)


def test_kv_settings_on_a_hybrid_without_attention_blocks_are_refused_in_one_line():
    """A linear attention caches no K/V: Qwen3-Next's blocks all linear attention leave a KV setting nothing to
    quantize, and it is refused before a weight changes (weights and activations still work)."""
    from transformers import AutoModelForCausalLM

    cfg = _configs()["qwen3_next"]
    cfg.layer_types = ["linear_attention"] * cfg.num_hidden_layers
    assert check_config(cfg).kv_route is None
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(ModelNotUnderstood, match=r"^KV-cache settings cannot be applied: Qwen3NextForCausalLM has no attention "
                                                 r"block \(its 4 blocks mix tokens by linear attention\): no KV cache$"):
        quantize_(model, "W4A8KV4")
    assert current_setting(model) is None
    quantize_(model, "W4A8")
    restore_(model)


def test_blocks_of_other_shapes_are_refused_naming_why():
    """A block with two attention children that are not one list of passes (LongCat's self_attn.0 and
    .1 are) is refused saying so, in one line; one whose norms sit inside a sublayer is read by the
    layout table (DBRX's norm_attn_norm: r(l) at norm_2's input, the attention the sublayer wraps)."""
    import copy

    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_config(_configs()["llama"])
    llama.model.layers[0].cross_attn = copy.deepcopy(llama.model.layers[0].self_attn)
    with pytest.raises(ModelNotUnderstood, match=r"^LlamaForCausalLM: block LlamaDecoderLayer has 2 attention children "
                                                 r"\(self_attn, cross_attn\); expected one$"):
        anatomy(llama)
    dbrx = check_config(_configs()["dbrx"]).parts[0]
    assert (dbrx.layout, dbrx.attention_name, dbrx.residual_site) == ("pre-LN", "transformer.blocks.0.norm_attn_norm.attn",
                                                                      dbrx.module.norm_attn_norm.norm_2)


def test_longcat_flash_is_read_as_two_passes_with_identity_experts():
    """LongCat-Flash (the shortcut layout): r(l) where the MoE's norm reads the first pass's stream, the
    second attention a side mixer, both dense MLPs beside the MoE. Its router scores 4 experts and 2
    identity experts and applies its classifier by weight: with include_routers its input is quantized
    where LongcatFlashTopkRouter reads it. The per-expert loop is the model's MoE exactly, running only
    the slots sent to real experts (identity slots reach the experts module as expert indices of weight
    0); routing counts the identity experts as experts 4 and 5; KV settings are refused (MLA); patching
    every sublayer's output is the full-precision model."""
    from transformers import AutoModelForCausalLM

    from quantlens.evaluation.routing import RoutingRecorder
    from quantlens.quantize import moe

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()["longcat-flash"]).eval().requires_grad_(False)
    b, layer = anatomy(model).parts[0], model.model.layers[0]
    norm = layer.post_attention_layernorm[0]
    assert (b.layout, b.residual_site, b.h_site, b.attention, b.mlp_module) == ("shortcut", norm, (norm, "output"), layer.self_attn[0], layer.mlp)
    assert [s.module for s in b.side_mixers] == [layer.self_attn[1]] and b.mlp_side == tuple(layer.mlps)
    assert b.routers == (("model.layers.0.mlp.router.classifier", layer.mlp.router.classifier),) and b.identity_experts == 2
    with pytest.raises(ModelNotUnderstood, match=r"^KV-cache settings cannot be applied: LongcatFlashMLA is multi-head latent attention"):
        quantize_(model, "W4A8KV4")
    ids = torch.randint(1, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    slots, rows = [], []
    ref = model(input_ids=ids).logits
    hooks = [layer.mlp.router.register_forward_hook(lambda m, args, out: slots.append(out[2])),
             moe.run_per_expert(b.experts[0], lambda n, x: x, set(), lambda j, attr, x: rows.append(len(x)) if attr == "down_proj" else None)]
    assert torch.equal(model(input_ids=ids).logits, ref)
    for h in hooks:
        h.remove()
    assert sum(rows) == int((slots[0] < 4).sum()) < slots[0].numel()  # identity slots skipped
    with RoutingRecorder(model, 4, 16) as rec:
        rec.begin_batch(torch.arange(4))
        model(input_ids=ids)
    load = rec.table().query("layer == 0")["load"].to_numpy()
    assert load.tolist() == (torch.bincount(slots[0].reshape(-1), minlength=6).double() / slots[0].numel()).tolist()
    a8 = {"bits": 8, "granularity": "token"}
    quantize_(model, resolve_setting({"name": "r", "weights": {"bits": 4}, "activations": a8, "include_routers": True}))
    try:
        model(input_ids=ids)
        inputs = {s.layer for s in full_report(model).layers if s.kind != "weight"}
        assert {"model.layers.0.mlp.router.classifier", "model.layers.1.mlp.router.classifier"} <= inputs
    finally:
        restore_(model)
    quantize_(model, "W4A8", keep_originals_on="same")
    try:
        ex = explain(model, {"large": ids[:2].tolist(), "ctrl": ids[2:].tolist()}, layers="all", batch_size=2)
    finally:
        restore_(model)
    patching = ex.patching.set_index("patched")["nll"]
    assert patching["all"] == pytest.approx(ex.per_example.query("set == 'large'")["nll_full"].mean(), rel=1e-6)
    assert {"attention", "mlp", "mlp.mlps.0.gate_proj", "mlp.mlps.1.down_proj", "experts.input"} <= set(patching.index)


def test_zamba2s_shared_block_is_one_set_of_weights_read_where_each_layer_uses_it(folders):
    """Zamba2 (the shared layout): the hybrid layers' transformer modules hold one set of tied
    parameters — counted once among the block matrices, quantized once (its statistics one row a
    weight) and read once per block when streamed; r(l) at the Mamba's norm, h(l) at the shared MLP's
    norm, its contribution `linear`'s output. GPTQ calibrates each shared weight once, in the first
    block that reads it: a layer's adapter where that layer uses it (no dead-input zeros), one result
    under every name."""
    from quantlens.quantize.calibrate import calibrate_model

    single, _ = load_model(folders["zamba2"], device="cpu", dtype="float32", placement="single")
    stream, _ = load_model(folders["zamba2"], device="cpu", dtype="float32", placement="stream")
    body, layers = anatomy(single), single.model.layers
    b = body.parts[1]
    assert (b.layout, b.residual_site, b.h_site, b.mlp_module, b.mlp_input) == (
        "shared", layers[1].mamba_decoder.input_layernorm, (layers[1].shared_transformer.pre_ff_layernorm, "output"), layers[1].linear,
        layers[1].shared_transformer.feed_forward.gate_up_proj)
    assert b.attention is layers[1].shared_transformer.self_attn and [s.module for s in b.side_mixers] == [layers[1].mamba_decoder.mamba]
    assert len(body.kv_parts()) == 2 and layers[1].shared_transformer.self_attn.q_proj.weight is layers[3].shared_transformer.self_attn.q_proj.weight
    every = {id(p): p for p in single.model.layers.parameters() if p.ndim >= 2}  # (PyTorch's own dedup of the tied parameters)
    mats = [p for p in body.block_matrix_params().values() if p.ndim >= 2]  # (its vectors: the Mamba's A_log, D, …)
    assert len(mats) == len(every) and {id(p) for p in mats} == set(every)
    q = layers[3].shared_transformer.self_attn.q_proj.weight
    w = q.detach().clone()
    report = quantize_(single, "W4A16")
    try:
        assert not any(r.layer.startswith("model.layers.3.shared_transformer") for r in report.layers if r.kind == "weight")
        with full_precision(single, ["model.layers.3.shared_transformer.self_attn.q_proj"]):  # by a later block's name: the one weight
            assert torch.equal(q, w) and torch.equal(layers[1].shared_transformer.self_attn.q_proj.weight, w)
        assert not torch.equal(q, w)
    finally:
        restore_(single)
    s = resolve_setting("W4A8-g16-gptq")
    calib = torch.randint(1, single.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(9))
    got = calibrate_model(single, s, calib, batch_size=2)
    for n, m in body.block_linears():
        assert torch.equal(got[n], got[next(x for x, y in body.block_linears() if y.weight is m.weight)]), n  # one result a weight
    slot = "shared_transformer.self_attn.linear_q_adapter_list.1.0"  # layer 3's adapter, held by layer 1's module too
    assert torch.equal(got[f"model.layers.1.{slot}"], got[f"model.layers.3.{slot}"])
    assert (got[f"model.layers.1.{slot}"] != 0).any(dim=0).all(), "calibrated where no input reached it: dead columns zeroed"
    streamed = calibrate_model(stream, s, calib, batch_size=2)
    assert got.keys() == streamed.keys() and all(torch.equal(got[k], streamed[k]) for k in got)


def test_gemma3ns_four_streams_are_read_and_merged_as_the_model_does(folders):
    """Gemma-3n (the altup layout): r(l) is the active stream at the MLP's norm, z(l) the block
    output's active stream; LAuReL is a side branch beside the attention, the per-layer gate and
    projection an MLP beside the MLP, AltUp's three linears routers; decoding a block output merges the
    four streams exactly as the model's forward does (the last block's output decodes to the model's
    logits, bit for bit); layer-wise runs pass block i the slice the model passes it."""
    from quantlens.evaluation.residual import ResidualRecorder
    from quantlens.model.layerwise import capture_block_inputs, with_hidden

    model, _ = load_model(folders["gemma3n"], device="cpu", dtype="float32", placement="single")
    body, layers = anatomy(model), model.model.layers
    b = body.parts[0]
    assert (b.layout, b.residual_site, b.h_site, b.mlp_module, b.mlp_side) == (
        "altup", layers[0].pre_feedforward_layernorm, (layers[0].pre_feedforward_layernorm, "output"), layers[0].mlp.down_proj,
        (layers[0].per_layer_projection,))
    assert [(s.kind, s.module, s.out) for s in b.side_mixers] == [("none", layers[0].laurel, layers[0].laurel.linear_right)]
    assert [m for _, m in b.routers] == [layers[0].altup.correction_coefs, layers[0].altup.prediction_coefs, layers[0].altup.modality_router]
    assert body.streams is not None and body.streams.active == 0 and body.streams.unembed is model.model.altup_unembed_projections
    assert [len(p.attention_linears) for p in body.parts] == [4, 4, 2, 2]  # (the last two reuse earlier layers' K/V: no k/v_proj)

    ids = torch.randint(1, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(4))
    seen: dict[int, tuple] = {}
    hooks = [blk.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, (a, kw)), with_kwargs=True) for i, blk in enumerate(layers)]
    hooks.append(layers[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out)))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    assert seen["out"].shape == (4, 3, 20, 32)
    with torch.no_grad():
        assert torch.equal(body.decode(seen["out"]), logits)
        args, kwargs = capture_block_inputs(model, layers[0], {"input_ids": ids})
        for i, blk in enumerate(layers):
            a, _ = with_hidden(args, kwargs, seen[i][0][0], blk, i)
            assert torch.equal(a[2], seen[i][0][2]), f"block {i}'s per-layer input"
        rec = ResidualRecorder(model, 3)
        rec.begin_batch(torch.arange(3))
        with rec:
            model(input_ids=ids)
    z = seen["out"][0].float()
    assert torch.tensor(rec.rows(["a", "b", "c"])["z_norm"][3::4]).tolist() == pytest.approx(z.norm(dim=-1).mean(-1).tolist(), rel=1e-6)


def test_a_model_transformers_cannot_build_here_is_refused_in_one_line(monkeypatch):
    """Gemma-3n's published checkpoints are of its multimodal class, whose vision tower needs timm:
    without it transformers raises ImportError while building; preflight gets a one-line refusal."""
    from transformers import AutoModelForCausalLM

    def needs_timm(*args, **kwargs):
        raise ImportError("\nTimmWrapperModel requires the timm library but it was not found in your environment.\n  pip install timm")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", needs_timm)
    with pytest.raises(ModelNotUnderstood, match=r"^gemma3n_text: transformers cannot build it here: TimmWrapperModel requires "
                                                 r"the timm library but it was not found in your environment\. pip install timm$"):
        check_config(_configs()["gemma3n"])
