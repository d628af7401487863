"""One model anatomy: what a Hugging Face causal LM is made of, named once for every feature.

Patching, the KV cache, layer-wise streaming, residual statistics and the mechanism analyses all
ask :func:`anatomy` instead of looking modules up on their own (the habit of GPTQModel's model
definitions: the anatomy is data, everything generic reads it). For any supported model it names:

- ``embeddings`` (the input embedding) and ``project_in`` (OPT's ``word_embed_proj_dim`` →
  hidden projection, or None);
- ``blocks``: the decoder blocks, and for each (:class:`Block`) every weight in it, each in one
  role: its **attention** linears (the output projection named), its **MLP** linears (a dense MLP,
  or an MoE block's shared experts), its **experts** (:class:`Experts`: the fused 3-D expert tensors
  of transformers 5, with the layout the experts module declares, or DBRX's 2-D stacked ones), its
  **routers** (the MoE's gate, Qwen2-MoE's shared-expert gate), a mixture of attention heads' experts
  and routers (JetMoe's: :attr:`Block.attention_experts`), and its vectors (norms, biases, attention sinks, router score
  biases), plus where its residual stream is read (:attr:`Block.layout`);
- each block's **mixer** (:attr:`Block.mixer`): attention, or — in a hybrid — a token mixer of
  :data:`TOKEN_MIXERS` (a linear attention: Qwen3-Next's gated DeltaNet; a state-space model:
  Jamba's Mamba, the Mamba-2 of Bamba, Granite-4 and Falcon-H1; a short convolution: LFM2), named by
  the same ``attention_*`` fields; Falcon-H1's Mamba-2 runs beside its attention in every block
  (:attr:`Block.side_mixers`). A mixer's linears are quantized like attention linears (its output
  projection named), every other parameter of it (conv kernels, ``A_log``, ``D``, ``dt_bias``, gated
  norms, Mamba-1's ``dt_proj`` applied by its weight) a 16-bit state role (:attr:`Block.mixer_states`,
  counted among the block's weights); only attention keeps a KV cache;
- ``kv_route``: how the attention of the blocks that cache K/V (:meth:`Anatomy.kv_parts`) computes
  them — ``interface`` (transformers' ``ALL_ATTENTION_FUNCTIONS``: OPT, LLaMA, Qwen2, Mistral, …),
  ``bloom`` (BLOOM's fused QKV), or
  None with :attr:`Anatomy.kv_refusal` saying why (DeepSeek's MLA caches a compressed latent;
  Falcon computes its own attention): weights and activations work, KV-cache settings are refused;
- ``final_norm`` (or None: OPT-350m has none), ``project_out`` (or None) and ``lm_head``;
  :meth:`Anatomy.decode` maps a hidden state to logits as the model itself does: final norm if
  any, then ``project_out`` if any, then the head, then its logit scaling (Cohere, Falcon-H1, Granite) and Gemma's logit
  soft-capping if configured.

Found generically: blocks are the ``nn.ModuleList`` of same-typed modules (or one per
``config.layer_types`` entry: Jamba) holding the most parameters; the attention is the child named ``*attn*`` / ``*attention*`` that holds linears
(``nn.Linear`` or GPT-2's transposed ``Conv1D``); an experts module is one holding 3-D
``down_proj`` and ``gate_up_proj`` / ``up_proj`` parameters *and* declaring its layout
(``is_transposed``, ``has_gate``, ``is_concatenated``, ``has_bias``: transformers'
``use_experts_implementation``) or listed by class in :data:`KNOWN_EXPERTS` (Llama-4's; DBRX's,
whose row also names its tensors, the child holding them and how each is stored; JetMoe's, which
route themselves and apply each tensor to rows grouped by expert) — a layout
is never guessed from shapes. The routers are the MoE's children that project the hidden state to
the routing scores (:func:`_routers`), a score per identity expert too where the MoE has them
(:data:`IDENTITY_EXPERTS`: LongCat-Flash's zero experts, no weight of their own). Every matrix (≥ 2-D
parameter) of a block must be in one role, or the block is refused naming the tensor.

**Where the residual stream is** (:data:`LAYOUTS`, by the block's norm children). r(l) is the
residual state the MLP reads, read at the input of :attr:`Block.residual_site`; h(l) is what the
MLP's first layer sees (:attr:`Block.h_site`):

- ``pre-LN`` (LLaMA, BLOOM, OPT ≥ 1.3B, GPT-2, Qwen, Mistral, Phi-3, Nemotron, XGLM, Apertus,
  VaultGemma, the MoEs): r(l) = z(l−1) +
  Attn(·), the un-normalised stream at the input of the MLP's norm; h(l) its output (arXiv 2506.12044);
  DBRX keeps both norms and its attention in one sublayer (``norm_attn_norm.norm_2`` is the MLP's
  norm: its row names the norms by their dotted names, and the attention is the one the sublayer wraps);
- ``post-LN`` (OPT-350m, ``do_layer_norm_before=False``): r(l) is z(l−1) + Attn(z(l−1)) at the
  input of the norm that *follows* the attention's residual addition (the block's first norm); the
  stream the next block sees is normalised, so ‖r(l)‖ and ‖z(l)‖ are on other scales than in pre-LN
  models and the early exit of r(l) decodes an un-normalised state (no final norm to undo it);
- ``sandwich`` (Gemma-2, Gemma-3, GLM-4: norms before *and* after each sublayer): r(l) = z(l−1) +
  norm(Attn(·)) at the input of the MLP's norm (``pre_feedforward_layernorm``; GLM-4's
  ``post_attention_layernorm``);
- ``post-sublayer`` (OLMo-2: norms after attention and MLP, none before): r(l) = z(l−1) +
  norm(Attn(z(l−1))) is the MLP's input itself (h(l) = r(l));
- ``parallel`` (GPT-NeoX / Pythia with ``use_parallel_residual``, Falcon with ``parallel_attn``;
  GPT-J, Phi, Cohere, Cohere2 with one norm and no flag: their rows name the block classes):
  attention and MLP both read the block input, z(l) = z(l−1) + Attn(n₁(z)) + MLP(n₂(z)): r(l) *is*
  z(l−1), read at the input of the MLP's norm (a single shared norm, NeoX's second);
- ``shortcut`` (LongCat-Flash: each block two pre-LN passes, attention → dense MLP twice, its
  sublayers and norms in lists, unrolled to ``self_attn.0``, ``mlps.1``, ``input_layernorm.0`` …):
  a₁ = z(l−1) + Attn₀(n₁₀(z)); h(l) = n₂₀(a₁) feeds both the MoE and the first dense MLP;
  a₂ = a₁ + MLP₀(h(l)) + Attn₁(n₁₁(·)); z(l) = a₂ + MLP₁(n₂₁(a₂)) + MoE(h(l)), the MoE's output
  carried past the second pass (the shortcut). r(l) = a₁, read at the input of the MoE's norm
  (``post_attention_layernorm.0``); the second attention is a side mixer, the dense MLPs MLPs beside
  the MoE (:attr:`Block.side_mixers`, :attr:`Block.mlp_side`): their outputs are the block's
  contributions to the stream, as every other block's.
- ``shared`` (Zamba2's hybrid layers, :data:`COMPOSITE_BLOCKS`: a transformer block shared by
  several layers — one module a layer, its parameters tied — then a Mamba layer): t = Linear(MLP(n(
  Attn(n([z(l−1); e]))))) with e the embeddings, no residual inside the transformer; z(l) = z(l−1)
  + Mamba(n(z(l−1) + t)). r(l) = z(l−1) + t, read at the input of the Mamba's norm; h(l) the MLP's
  input (the output of ``pre_ff_layernorm``); the MLP's contribution is ``linear``'s output. The
  attention is the block's (its KV cache), the Mamba-2 a side mixer. A weight shared by several
  blocks is one matrix: counted once in the block matrices, quantized once, read once per block
  that holds it when streamed.
- ``altup`` (Gemma-3n, :data:`AUGMENTED_BLOCKS`, :data:`STREAMS`: four residual streams between
  blocks, ``[4, batch, tokens, hidden]``): AltUp predicts the streams from the block input; attention
  and LAuReL (a low-rank branch, a side mixer of kind ``none``) read the active stream normed; r(l) =
  (a + norm(Attn(n(a))) + LAuReL(n(a)))/√2 at the MLP's norm (``pre_feedforward_layernorm``), h(l)
  its output; AltUp corrects the four streams by the block's result and the per-layer input (gate
  and projection: an MLP beside the MLP) is added to the other three. z(l) is the active stream of
  the block output (:meth:`Anatomy.stream`); :meth:`Anatomy.decode` merges the four as the model
  does before its final norm. AltUp's router and 4-input coefficient maps are routers.

This module imports nothing else of quantlens: it is the bottom of the model side.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from quantlens.model.shape import ModelShape

KVRoute = Literal["interface", "bloom"]
Layout = Literal["pre-LN", "post-LN", "sandwich", "post-sublayer", "parallel", "shortcut", "shared", "altup"]
Mixer = Literal["attention", "linear attention", "ssm", "short conv", "none"]

# (XGLM: layer_norm; LFM2: embedding_norm, which its forward applies after the blocks despite the name)
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f", "layer_norm", "embedding_norm")
OUTPUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo")
BLOCKS_ATTR = "_quantlens_blocks"  # a streamed skeleton names its block list (its blocks hold no weights)
SHAPE_ATTR = "_quantlens_shape"  # ... and each placeholder parameter its shape in the checkpoint


@dataclass(frozen=True)
class LayoutRow:
    """One residual layout: the block's norm children (by name), the layout, the norm whose input is
    r(l) (None: the MLP's input), and the block classes it is for when the norm names alone do not
    say it (a parallel block with one norm and no config flag: its forward is read once, here)."""

    norms: frozenset[str]
    layout: Layout
    site: str | None
    families: str
    blocks: frozenset[str] = frozenset()  # empty: any block with these norms
    h: str | None = None  # the norm whose output is h(l), the MLP's input, where it is not ``site`` (Zamba2's)


def _row(norms: set[str], layout: Layout, site: str | None, families: str, blocks: tuple[str, ...] = (), h: str | None = None) -> LayoutRow:
    return LayoutRow(frozenset(norms), layout, site, families, frozenset(blocks), h)


# A pre-LN row becomes post-LN (OPT's do_layer_norm_before=False) or parallel (the config's
# use_parallel_residual / parallel_attn) by :func:`_layout`; a row with block classes is taken as it is.
LAYOUTS: tuple[LayoutRow, ...] = (
    _row({"input_layernorm", "post_attention_layernorm"}, "pre-LN", "post_attention_layernorm",
         "LLaMA, Qwen, Mistral, Phi-3, Nemotron, the MoEs"),
    _row({"self_attn_layer_norm", "final_layer_norm"}, "pre-LN", "final_layer_norm", "OPT, XGLM"),
    _row({"ln_1", "ln_2"}, "pre-LN", "ln_2", "GPT-2"),
    _row({"attention_layernorm", "feedforward_layernorm"}, "pre-LN", "feedforward_layernorm", "Apertus"),
    _row({"input_layernorm", "pre_ff_layernorm"}, "pre-LN", "pre_ff_layernorm", "Jamba, Bamba, Falcon-H1"),
    _row({"operator_norm", "ffn_norm"}, "pre-LN", "ffn_norm", "LFM2, LFM2-MoE"),
    _row({"norm"}, "pre-LN", "norm", "Mamba, Mamba-2, Falcon-Mamba, Nemotron-H: one sublayer a block, r(l) the stream it reads"),
    _row({"input_layernorm", "pre_feedforward_layernorm"}, "pre-LN", "pre_feedforward_layernorm", "VaultGemma"),
    _row({"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"},
         "sandwich", "pre_feedforward_layernorm", "Gemma-2, Gemma-3"),
    _row({"input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"},
         "sandwich", "post_attention_layernorm", "GLM-4 (post_attention_layernorm is the MLP's pre-norm)"),
    _row({"input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm"},
         "sandwich", "pre_mlp_layernorm", "AfMoE"),
    _row({"post_attention_layernorm", "post_feedforward_layernorm"}, "post-sublayer", None, "OLMo-2"),
    _row({"input_layernorm"}, "parallel", "input_layernorm", "Phi (phi-2), Cohere, Cohere2, Cohere2-MoE: one norm, no config flag",
         ("PhiDecoderLayer", "CohereDecoderLayer", "Cohere2DecoderLayer", "Cohere2MoeDecoderLayer")),
    _row({"input_layernorm"}, "parallel", "input_layernorm", "Falcon-7B: one norm for both, parallel_attn"),
    _row({"input_layernorm"}, "pre-LN", "input_layernorm", "Zamba2's Mamba layers: one sublayer, r(l) the stream it reads",
         ("Zamba2MambaDecoderLayer",)),
    # the shared transformer reads [z; embeddings], its output projected (linear) and added to the Mamba's input only
    _row({"mamba_decoder.input_layernorm", "shared_transformer.input_layernorm", "shared_transformer.pre_ff_layernorm"}, "shared",
         "mamba_decoder.input_layernorm", "Zamba2's hybrid layers: a shared transformer block, then a Mamba layer",
         ("Zamba2HybridLayer",), h="shared_transformer.pre_ff_layernorm"),
    # four streams between blocks (AltUp); the active one predicted, then attention and LAuReL on its normed value
    _row({"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
          "post_per_layer_input_norm"}, "altup", "pre_feedforward_layernorm",
         "Gemma-3n: AltUp's streams, LAuReL beside the attention, the per-layer input after the MLP", ("Gemma3nTextDecoderLayer",)),
    _row({"ln_1"}, "parallel", "ln_1", "GPT-J, CodeGen: one norm for both", ("GPTJBlock", "CodeGenBlock")),
    _row({"norm_1", "norm_2"}, "pre-LN", "norm_2", "MPT"),
    _row({"input_layernorm", "post_attention_layernorm", "post_norm1", "post_norm2"}, "sandwich", "post_attention_layernorm",
         "HyperCLOVAX (post_attention_layernorm is the MLP's pre-norm; post_norm1/2 after each sublayer)"),
    _row({"ln_attn", "ln_mlp"}, "parallel", "ln_mlp", "Falcon-40B's new decoder architecture"),
    # one sublayer norm_1 → attention → residual addition → norm_2, returning (r(l), h(l)); the MoE reads h(l)
    _row({"norm_attn_norm.norm_1", "norm_attn_norm.norm_2"}, "pre-LN", "norm_attn_norm.norm_2",
         "DBRX: its norms inside the attention's sublayer (norm_attn_norm)"),
    # two pre-LN passes, the MoE reading the first MLP's input and added at the block's end (module doc)
    _row({"input_layernorm.0", "post_attention_layernorm.0", "input_layernorm.1", "post_attention_layernorm.1"}, "shortcut",
         "post_attention_layernorm.0", "LongCat-Flash: its norms in lists, one per pass", ("LongcatFlashDecoderLayer",)),
)
PARALLEL_FLAGS = ("use_parallel_residual", "parallel_attn")


class ModelNotUnderstood(ValueError):
    """The model's structure is not one the anatomy understands; the message says what."""


# --- linear-like layers ---------------------------------------------------------------------------
def is_linear(m: nn.Module) -> bool:
    """``nn.Linear`` (and subclasses such as FalconLinear), or GPT-2's ``Conv1D`` (weight [in, out])."""
    return isinstance(m, nn.Linear) or is_conv1d(m)


def is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def in_features(m: nn.Module) -> int:
    """The input features of a linear-like layer or a router (a module with a 2-D ``weight``)."""
    return int(shape_of(m.weight)[0] if is_conv1d(m) else shape_of(m.weight)[-1])


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-block list: the ModuleList of same-typed blocks holding the most parameters.

    OPT: ``model.decoder.layers``; BLOOM, GPT-2, Falcon: ``transformer.h``; GPT-NeoX:
    ``gpt_neox.layers``; the LLaMA-likes and MoEs: ``model.layers``. DeepSeek's dense first blocks
    and its MoE blocks are one class: one list; a list of several classes is blocks when the config
    lists one type per entry (Jamba's mamba and attention layers: ``config.layer_types``).
    """
    known = getattr(model, BLOCKS_ATTR, None)
    if known is not None:
        return known, model.get_submodule(known)
    best: tuple[int, str, nn.ModuleList] | None = None
    types = getattr(getattr(model, "config", None), "layer_types", None) or ()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and (all(type(b) is type(mod[0]) for b in mod) or len(types) == len(mod)):
            n = sum(p.numel() for p in mod.parameters())
            if best is None or n > best[0]:
                best = (n, name, mod)
    if best is None:
        raise ModelNotUnderstood(f"{type(model).__name__}: no decoder block list (an nn.ModuleList of blocks) found")
    return best[1], best[2]


# What mixes tokens in a block, by the class names of its modules that hold linears (first match
# wins): quantlens understands blocks whose token mixers are attention or rows of TOKEN_MIXERS; a
# block list with any other is refused naming its layers.
MIXERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear attention", ("DeltaNet", "DeltaAttention")),  # Qwen3-Next, Qwen3.5, OLMo-hybrid, Kimi Linear
    ("ssm", ("Mamba", "Mixer")),  # Mamba, Mamba2, Falcon-Mamba, Jamba, Bamba, Zamba2, Nemotron-H, Falcon-H1, Granite-4
    ("short conv", ("ShortConv",)),  # LFM2
    ("attention", ("Attention",)),
)


def _mixer_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(kind, module) of every token mixer inside ``block`` (not the block itself: OLMo-hybrid's
    LinearAttentionDecoderLayer, Jamba's JambaMambaDecoderLayer), by class name, the innermost where
    one holds another (Zamba2's Zamba2MambaDecoderLayer inside its hybrid layer holds its
    Zamba2MambaMixer); a module holding no linear is no mixer (MambaRMSNorm)."""
    found = []
    for m in list(block.modules())[1:]:
        name = type(m).__name__
        kind = next((k for k, marks in MIXERS if any(x in name for x in marks)), None)
        if kind is not None and any(is_linear(x) for x in m.modules()):
            found.append((kind, m))
    ids = {id(m) for _, m in found}
    return [(k, m) for k, m in found if not any(id(x) in ids for x in list(m.modules())[1:])]


def _mixers(block: nn.Module) -> str:
    """The token mixers of one block (``ssm``, ``attention``, ``ssm+attention``, …; ``MLP only``)."""
    kinds = {k for k, _ in _mixer_modules(block)}
    return "+".join(k for k, _ in MIXERS if k in kinds) or "MLP only"


@dataclass(frozen=True)
class MixerRow:
    """A token mixer other than attention that quantlens understands (read from its forward in
    transformers): its linears are quantized like attention's (weights, and activations at their
    inputs) but for ``state_linears`` — linears its forward applies by their weight, never calling
    the module (Mamba-1's ``dt_proj``: ``dt_proj.weight @ dt``, its bias the scan's dt bias), whose
    input no hook can reach; those and every other parameter of it (convolution kernels, ``A_log``,
    ``D``, ``dt_bias``, gated norms) are 16-bit state roles (Block.mixer_states). It keeps no KV cache."""

    kind: str
    what: str
    state_linears: tuple[str, ...] = ()


_MAMBA1 = "in_proj → causal conv1d → x_proj → dt_proj (by its weight) → selective scan (A_log, D) → out_proj"
_MAMBA2 = "in_proj → causal conv1d → SSD scan (A_log, D, dt_bias) → gated RMSNorm (norm) → out_proj"
TOKEN_MIXERS: dict[str, MixerRow] = {
    # in_proj_qkvz, in_proj_ba → causal conv1d over q, k, v → gated delta rule (A_log, dt_bias) → gated
    # RMSNorm (norm) → out_proj
    "Qwen3NextGatedDeltaNet": MixerRow("linear attention", "Qwen3-Next's gated DeltaNet"),
    # in_proj_qkv, in_proj_z, in_proj_b, in_proj_a → the same conv1d, delta rule and gated norm → out_proj
    "Qwen3_5GatedDeltaNet": MixerRow("linear attention", "Qwen3.5's gated DeltaNet"),
    "Qwen3_5MoeGatedDeltaNet": MixerRow("linear attention", "Qwen3.5-MoE's gated DeltaNet"),
    # q/k/v_proj → one causal conv1d over q, k, v → gated delta rule (a_proj, b_proj; A_log, dt_bias) → gated RMSNorm
    # (o_norm, gate g_proj) → o_proj
    "OlmoHybridGatedDeltaNet": MixerRow("linear attention", "OLMo-hybrid's gated DeltaNet"),
    # q/k/v_proj → one causal conv1d → Kimi Delta Attention (b_proj; forget gate: A_log, dt_bias) → gated RMSNorm (o_norm,
    # gate g_a_proj → g_b_proj) → o_proj
    "KimiLinearDeltaAttention": MixerRow("linear attention", "Kimi Linear's delta attention (KDA)"),
    "BambaMixer": MixerRow("ssm", f"Bamba's Mamba-2: {_MAMBA2}"),
    "GraniteMoeHybridMambaLayer": MixerRow("ssm", f"Granite-4's Mamba-2: {_MAMBA2}"),
    "FalconH1Mixer": MixerRow("ssm", f"Falcon-H1's Mamba-2 (beside its attention): {_MAMBA2}"),
    "JambaMambaMixer": MixerRow("ssm", f"Jamba's Mamba: {_MAMBA1}, dt/B/C RMSNorms", ("dt_proj",)),
    "MambaMixer": MixerRow("ssm", f"Mamba: {_MAMBA1}", ("dt_proj",)),
    "FalconMambaMixer": MixerRow("ssm", f"Falcon-Mamba: {_MAMBA1}, B/C/dt RMS-normalised", ("dt_proj",)),
    "Mamba2Mixer": MixerRow("ssm", f"Mamba-2: {_MAMBA2}"),
    "Zamba2MambaMixer": MixerRow("ssm", f"Zamba2's Mamba-2: {_MAMBA2}"),
    "NemotronHMamba2Mixer": MixerRow("ssm", f"Nemotron-H's Mamba-2: {_MAMBA2}"),
    # in_proj → B·x gated → short causal conv (conv) → C· gated → out_proj
    "Lfm2ShortConv": MixerRow("short conv", "LFM2's gated short convolution: in_proj → conv → out_proj"),
    "Lfm2MoeShortConv": MixerRow("short conv", "LFM2-MoE's gated short convolution: in_proj → conv → out_proj"),
}


@dataclass(frozen=True)
class CompositeRow:
    """A block made of blocks (read from its forward in transformers): the children that are blocks
    of their own, whose sublayers are the block's (unrolled to ``shared_transformer.self_attn`` …),
    and the module whose output is its MLP's contribution where that is not the last MLP linear."""

    subblocks: tuple[str, ...]
    mlp_out: str
    what: str


COMPOSITE_BLOCKS: dict[str, CompositeRow] = {
    "Zamba2HybridLayer": CompositeRow(
        ("shared_transformer", "mamba_decoder"), "linear",
        "Zamba2: a transformer block shared by several layers (its parameters tied: one module a layer, one weight) reads "
        "[z; embeddings] — attention, then its MLP on the normed attention output, no residual of its own; `linear` "
        "projects its output into the Mamba layer's input; the Mamba layer adds its output to the stream"),
}


@dataclass(frozen=True)
class AugmentedRow:
    """A block with sublayers beside its attention and MLP (read from its forward in transformers):
    ``beside_mixer`` children read the attention's normalised input and add their last linear's output
    beside the attention's (side mixers that mix no tokens: their linears quantized as the attention's);
    ``beside_mlp`` linears (child names, in order) add the last one's output beside the MLP's (an MLP
    beside the MLP); ``routers`` children hold linears that compute mixing coefficients — the routers
    role, 16-bit unless a setting includes routers."""

    beside_mixer: tuple[str, ...]
    beside_mlp: tuple[str, ...]
    routers: tuple[str, ...]
    what: str


_NO_AUGMENT = AugmentedRow((), (), (), "")
AUGMENTED_BLOCKS: dict[str, AugmentedRow] = {
    "Gemma3nTextDecoderLayer": AugmentedRow(
        ("laurel",), ("per_layer_input_gate", "per_layer_projection"), ("altup",),
        "Gemma-3n: AltUp predicts four streams from the block input (its router and 4-input coefficient maps: routers), "
        "attention and LAuReL (a low-rank branch: linear_left, linear_right) read the active stream normed, the MLP "
        "follows; AltUp corrects the four streams by the result, and the per-layer input (per_layer_input_gate × the "
        "token's per-layer embedding → per_layer_projection) is added to the other three"),
}


def _understood_mixers(block: nn.Module) -> bool:
    """Whether every token mixer of ``block`` other than attention is a row of :data:`TOKEN_MIXERS`."""
    return all(type(m).__name__ in TOKEN_MIXERS for k, m in _mixer_modules(block) if k != "attention")


def _refuse_hybrid(model: nn.Module) -> None:
    """:class:`ModelNotUnderstood` naming the real cause when the model's largest block list (of any
    classes: Jamba's attention and mamba layers are two) has a block mixing tokens otherwise than by
    attention or a mixer of :data:`TOKEN_MIXERS`:
    ``OlmoHybrid…: hybrid blocks (linear attention, attention) are not supported yet: layers 0,2 are linear attention``."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return
    _, blocks = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    kinds = [_mixers(b) for b in blocks]
    if all(_understood_mixers(b) for b in blocks):
        return  # (attention not recognised by name is not this refusal's to say)
    order = list(dict.fromkeys(kinds))
    layers = {k: [i for i, x in enumerate(kinds) if x == k] for k in order if k != "attention"}
    where = "; ".join(f"layer{'s' if len(ix) > 1 else ''} {','.join(map(str, ix[:12]))}{',…' if len(ix) > 12 else ''} "
                      f"{'are' if len(ix) > 1 else 'is'} {k}" for k, ix in layers.items())
    unknown = sorted({type(m).__name__ for b in blocks for k, m in _mixer_modules(b) if k != "attention" and type(m).__name__ not in TOKEN_MIXERS})
    what = f"hybrid blocks ({', '.join(order)})" if len(order) > 1 else f"{order[0]} blocks"
    raise ModelNotUnderstood(f"{type(model).__name__}: {what} are not supported yet: {where} "
                             f"({', '.join(unknown)}: not in anatomy.TOKEN_MIXERS)")


def shape_of(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also for a streamed skeleton's empty placeholders (their checkpoint shape)."""
    return getattr(p, SHAPE_ATTR, p.shape)


def _attribute(module: nn.Module, dotted: str) -> Any:
    """``module``'s attribute by a dotted path (``input_linear.weight``: a child's tensor)."""
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _is_norm(m: nn.Module) -> bool:
    """A norm: its class name ends in Norm, or it is a LayerNorm (Nemotron's LayerNorm1P); never a
    module holding linears (DBRX's NormAttentionNorm wraps its attention)."""
    return (type(m).__name__.endswith("Norm") or isinstance(m, nn.LayerNorm)) and not any(is_linear(x) for x in m.modules())


def _sublayers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The block's children, a list of sublayers unrolled into its entries (LongCat-Flash's
    ``self_attn.0``, ``self_attn.1``, ``mlps.0``, ``input_layernorm.1`` …: one sublayer each, what
    the layout table and the mixers are read from), a block of :data:`COMPOSITE_BLOCKS` into its
    blocks' children (Zamba2's ``shared_transformer.self_attn``, ``mamba_decoder.mamba`` …)."""
    subblocks = COMPOSITE_BLOCKS[type(block).__name__].subblocks if type(block).__name__ in COMPOSITE_BLOCKS else ()
    children = [(f"{n}.{c}", x) if n in subblocks else (n, m) for n, m in block.named_children()
                for c, x in (m.named_children() if n in subblocks else [("", m)])]
    return [(f"{n}.{i}" if isinstance(m, nn.ModuleList) else n, x) for n, m in children
            for i, x in (enumerate(m) if isinstance(m, nn.ModuleList) else [(0, m)])]


def _norm_children(children: list[tuple[str, nn.Module]]) -> list[str]:
    """The names of a block's norm children (:func:`_sublayers`: LongCat's ``input_layernorm.0`` …) —
    or, a block with none of its own, those of the sublayer that holds its norms with its attention
    (DBRX's norm_attn_norm.norm_1, norm_attn_norm.norm_2: the layout table has rows for such names)."""
    norms = [n for n, m in children if _is_norm(m)]
    nested = [f"{n}.{c}" for n, m in children for c, x in m.named_children() if _is_norm(x) and any(is_linear(y) for y in m.modules())]
    return norms or nested  # (DBRX: norm_attn_norm holds norm_1, the attention and norm_2)


# --- experts ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Experts:
    """An MoE's routed experts as transformers stores them: each tensor holds one matrix per expert.

    Layout, as the experts module declares it (or :data:`KNOWN_EXPERTS` reads it from the module's
    forward): fused 3-D tensors ``[experts, out, in]`` (``is_transposed`` False) or ``[experts, in,
    out]``, or — ``stacked`` — 2-D ``[experts·rows, cols]`` with each expert's matrix a block of
    rows (DBRX's); a gated first projection ``gate_up_proj`` holds the gate's and the up
    projection's rows, concatenated ([gate; up]) or interleaved (gate₀, up₀, gate₁, …; gpt-oss),
    or the gate and up matrices are tensors of their own (DBRX's ``w1`` and ``v1``, both reading the
    expert's input). :meth:`matrices` gives every expert's matrices as ``[experts·parts, out, in]``
    (parts = 2 for a fused gated first projection: gate and up, each the matrix a dense MLP would
    hold), so that a quantizer's rows and groups run along each matrix's input dimension;
    :meth:`from_matrices` puts them back in the stored layout, exactly.
    """

    name: str  # qualified name of the experts module (the one called with the routed tokens)
    module: nn.Module
    num_experts: int
    first: str  # "gate_up_proj" (gated) or "up_proj"; the gate tensor where gate and up are apart (DBRX's w1)
    is_transposed: bool
    has_gate: bool
    is_concatenated: bool
    has_bias: bool
    dense: bool = False  # forward(rows): every expert gets every token's row, scaled by its score (Llama-4); else forward(hidden, top_k_index, top_k_weights)
    tensors: tuple[str, ...] = ()  # the expert tensors in forward order where not (first, down_proj): DBRX's gate w1, up v1, down w2
    holder: str = ""  # the child of the experts module that holds the tensors (DBRX's mlp); "": the module itself
    stacked: bool = False  # 2-D [experts·rows, cols] (DBRX), not 3-D [experts, rows, cols]
    transposed: tuple[str, ...] = ()  # tensors stored [in, out] per expert where is_transposed does not say it of all (DBRX's w2)
    act: str = "act_fn"  # the holder's activation module (DBRX's activation_fn)
    grouped: bool = False  # each tensor applied by its own child, called with the routed rows grouped by expert and their counts (JetMoe's ParallelExperts)
    owns_router: bool = False  # the module is the whole MoE: it routes its tokens itself, its router a child of it (JetMoe's MoE and MoA)

    @property
    def params(self) -> tuple[str, ...]:
        """The expert tensors in forward order: the first projection's, then the down projection's."""
        return self.tensors or (self.first, "down_proj")

    @property
    def down(self) -> str:
        return self.params[-1]

    @property
    def firsts(self) -> tuple[str, ...]:
        """The tensors that read the expert's input (one activation site, named by the first of them)."""
        return self.params[:-1]

    def input_of(self, attr: str) -> str:
        """The tensor whose name the input of ``attr`` goes by (activations, Hessians): the first
        tensor for the first projection's (DBRX's v1 reads w1's input), else ``attr`` itself."""
        return self.first if attr in self.firsts else attr

    @property
    def owner(self) -> nn.Module:
        """The module holding the tensors (the experts module, or its :attr:`holder` child)."""
        return self.module.get_submodule(self.holder) if self.holder else self.module

    def tensor(self, attr: str) -> nn.Parameter:
        """The stored tensor ``attr`` (a dotted name where each tensor sits in a child: JetMoe's ``input_linear.weight``)."""
        return _attribute(self.owner, attr)

    def qualified(self, attr: str) -> str:
        return f"{self.name}.{self.holder}.{attr}" if self.holder else f"{self.name}.{attr}"

    def parts(self, attr: str) -> int:
        """2 for a gated first projection fused in one tensor (gate and up rows: gate_up_proj, JetMoe's
        input_linear), else 1."""
        return 2 if attr == self.first and self.has_gate and len(self.firsts) == 1 else 1

    @property
    def takes_top_k(self) -> bool:
        """Called as ``forward(hidden, top_k_index, top_k_weights)``: its caller routes (every
        transformers 5 MoE but Llama-4's rows to every expert and the experts that route themselves)."""
        return not (self.dense or self.owns_router)

    def stored_transposed(self, attr: str) -> bool:
        """Whether each expert's matrix of ``attr`` is stored ``[in, out]`` (applied as x @ W)."""
        return self.is_transposed or attr in self.transposed

    def per_expert(self, w: torch.Tensor) -> torch.Tensor:
        """A stored tensor as ``[experts, rows, cols]`` (a stacked 2-D one viewed so)."""
        return w.reshape(self.num_experts, -1, w.shape[-1]) if self.stacked else w

    def stored(self, attr: str, j: int) -> torch.Tensor:
        """Expert ``j``'s matrix of ``attr`` as the model applies it ([out, in], or [in, out] where transposed)."""
        return self.per_expert(self.tensor(attr))[j]

    def in_features(self, attr: str) -> int:
        shape = shape_of(self.tensor(attr))
        rows, cols = (int(shape[0]) // self.num_experts, int(shape[1])) if self.stacked else (int(shape[1]), int(shape[2]))
        return rows if self.stored_transposed(attr) else cols

    def matrices(self, attr: str, w: torch.Tensor) -> torch.Tensor:
        """``w`` (stored layout) → ``[experts·parts, out, in]``."""
        m = self.per_expert(w)
        m = m.transpose(-1, -2) if self.stored_transposed(attr) else m  # [E, out, in]
        p = self.parts(attr)
        if p == 1:
            return m
        e, out, inp = m.shape
        if self.is_concatenated:
            return m.reshape(e * 2, out // 2, inp)
        return m.reshape(e, out // 2, 2, inp).transpose(1, 2).reshape(e * 2, out // 2, inp)

    def from_matrices(self, attr: str, m: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`matrices` (a contiguous tensor in the stored layout)."""
        p = self.parts(attr)
        if p == 2:
            ep, half, inp = m.shape
            e = ep // 2
            m = m.reshape(e, 2 * half, inp) if self.is_concatenated else m.reshape(e, 2, half, inp).transpose(1, 2).reshape(e, 2 * half, inp)
        out = (m.transpose(-1, -2) if self.stored_transposed(attr) else m).contiguous()
        return out.reshape(-1, out.shape[-1]) if self.stacked else out


LAYOUT_FLAGS = ("is_transposed", "has_gate", "is_concatenated", "has_bias")
ROW_FIELDS = ("dense", "tensors", "holder", "stacked", "transposed", "act", "grouped", "owns_router")  # what a KNOWN_EXPERTS row may add to the flags

# Experts modules that do not declare their layout (no use_experts_implementation), by class → their
# layout, read from their forward in transformers:
# - Llama-4's bmm(rows [E, T, H], gate_up_proj [E, H, 2I]).chunk(2) — transposed, gate then up —, then
#   down_proj [E, I, H]; every token's row reaches every expert, scaled by its router score (0 if not routed);
# - DBRX's experts(hidden, top_k_index, top_k_weights): its child mlp holds w1 (gate), v1 (up) and w2 (down),
#   each 2-D [E·F, H], expert j's matrix rows j·F … (j+1)·F; act(x @ w1ⱼᵀ) · (x @ v1ⱼᵀ) @ w2ⱼ — w2 applied as
#   stored, [in, out]; the number of experts is the module's num_experts (a stacked tensor does not say it);
# - JetMoe's MoE and MoA (mixture of attention heads) route their tokens themselves (router: a child), sort them by
#   expert and call input_linear, then output_linear (JetMoeParallelExperts: weight [E, out, in], forward(rows, counts)
#   applies F.linear(rowsⱼ, weight[j]) to each expert's block of rows); the MoE's input_linear holds [gate; up]
#   (chunk(2): act(gate) · up), the MoA's computes each expert's queries, its output_linear reads the attention's output.
_JETMOE = dict(is_transposed=False, is_concatenated=True, has_bias=False, tensors=("input_linear.weight", "output_linear.weight"),
               grouped=True, owns_router=True)
KNOWN_EXPERTS: dict[str, dict[str, Any]] = {
    "Llama4TextExperts": dict(is_transposed=True, has_gate=True, is_concatenated=True, has_bias=False, dense=True),
    "DbrxExperts": dict(is_transposed=False, has_gate=True, is_concatenated=False, has_bias=False, tensors=("w1", "v1", "w2"),
                        holder="mlp", stacked=True, transposed=("w2",), act="activation_fn"),
    "JetMoeMoE": dict(_JETMOE, has_gate=True, act="activation"),
    "JetMoeMoA": dict(_JETMOE, has_gate=False),
}


@dataclass(frozen=True)
class IdentityRow:
    """An MoE whose router also picks "zero-computation" experts: a token sent to one gets its own
    input back, times its routing weight, no weight matrix involved (LongCat-Flash's zero experts,
    read from LongcatFlashMoE.forward). The MoE hands such a slot to its experts module as a real
    expert's index with weight 0, so the slots chosen are read where the router returns them."""

    count: str  # the MoE's attribute giving how many (the router scores experts, then these)
    router: str  # the MoE's child whose forward returns the chosen slots [tokens, k] ...
    chosen: int  # ... as this element of its output tuple


IDENTITY_EXPERTS: dict[str, IdentityRow] = {"LongcatFlashMoE": IdentityRow("zero_expert_num", "router", 2)}
# Routers whose forward applies a child's weight by hand, never calling the child (LongCat's
# F.linear(x.float(), classifier.weight.float())), by class → that child: its input is the router's.
ROUTERS_BY_WEIGHT: dict[str, str] = {"LongcatFlashTopkRouter": "classifier"}


def identity_experts(moe: nn.Module | None) -> int:
    """How many identity experts the MoE module ``moe`` routes to beside its experts (:data:`IDENTITY_EXPERTS`; 0: none)."""
    row = IDENTITY_EXPERTS.get(type(moe).__name__)
    return int(getattr(moe, row.count) or 0) if row else 0


def chosen_slots(moe: nn.Module | None) -> tuple[nn.Module, int] | None:
    """Where an MoE with identity experts says which slots each token chose — (module, position of the
    [tokens, k] indices among its outputs), the identity experts numbered after the experts — else None
    (its experts module is told them: ``forward(hidden, top_k_index, top_k_weights)``)."""
    row = IDENTITY_EXPERTS.get(type(moe).__name__)
    return (moe.get_submodule(row.router), row.chosen) if row and identity_experts(moe) else None


def _fused_tensors(mod: nn.Module) -> tuple[str, str] | None:
    """transformers 5's fused 3-D expert tensors of a module, (gate_up_proj | up_proj, down_proj), or None."""
    own = dict(mod.named_parameters(recurse=False))
    down = own.get("down_proj")
    first = "gate_up_proj" if "gate_up_proj" in own else "up_proj" if "up_proj" in own else None
    if down is None or first is None or len(shape_of(down)) != 3 or len(shape_of(own[first])) != 3:
        return None
    return first, "down_proj"


def _experts_of(model_name: str, name: str, mod: nn.Module) -> Experts | None:
    """The :class:`Experts` of a module holding expert tensors (fused 3-D ones, or a row of
    :data:`KNOWN_EXPERTS` naming its own), None for any other module, :class:`ModelNotUnderstood`
    for fused tensors without a layout (declared, or in :data:`KNOWN_EXPERTS`)."""
    row = KNOWN_EXPERTS.get(type(mod).__name__)
    tensors = row["tensors"] if row is not None and "tensors" in row else _fused_tensors(mod)
    if tensors is None:
        return None
    layout = row or {f: getattr(mod, f) for f in LAYOUT_FLAGS if hasattr(mod, f)}
    missing = [f for f in LAYOUT_FLAGS if f not in layout]
    if missing:
        raise ModelNotUnderstood(
            f"{model_name}: experts module {name} ({type(mod).__name__}) holds fused 3-D expert tensors but does not declare "
            f"their layout ({', '.join(missing)}; transformers' use_experts_implementation) and is not in anatomy.KNOWN_EXPERTS: "
            "quantlens does not guess it from shapes")
    first = tensors[0]
    if "tensors" not in layout and bool(layout["has_gate"]) != (first == "gate_up_proj"):
        raise ModelNotUnderstood(f"{model_name}: experts module {name} declares has_gate={layout['has_gate']} but holds {first}")
    extra = {f: layout[f] for f in ROW_FIELDS if f in layout}
    count = int(mod.num_experts) if extra.get("stacked") else int(shape_of(_attribute(mod, tensors[-1]))[0])
    return Experts(name, mod, count, first, *(bool(layout[f]) for f in LAYOUT_FLAGS), **extra)


# --- one block --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SideMixer:
    """A token mixer running beside the block's main one on the same normalised input (Falcon-H1's
    Mamba-2 beside its attention: the block adds both outputs to the stream), or after it in a block
    of two passes (LongCat-Flash's second attention, ``self_attn.1``: the ``shortcut`` layout); kind
    ``none``: a per-token branch beside the attention that mixes no tokens (Gemma-3n's LAuReL,
    :data:`AUGMENTED_BLOCKS`)."""

    kind: Mixer
    name: str
    module: nn.Module
    linears: tuple[tuple[str, nn.Module], ...]
    out: nn.Module


@dataclass(frozen=True)
class Block:
    """One decoder block's parts (qualified names are the model's ``named_modules`` names)."""

    index: int
    name: str
    module: nn.Module
    layout: Layout
    residual_site: nn.Module  # its input is r(l) (module doc)
    h_site: tuple[nn.Module, Literal["input", "output"]]  # where h(l), the MLP's input, is read
    attention_name: str  # ("" and None below: a block of one MLP, Nemotron-H's; mixer "none")
    attention: nn.Module | None
    attention_linears: tuple[tuple[str, nn.Module], ...]  # qualified name, module (registration order)
    attention_out: nn.Module | None  # the output projection
    mlp_linears: tuple[tuple[str, nn.Module], ...]  # (leaf name, module): a dense MLP's, or an MoE's shared experts'
    mlp_module: nn.Module | None  # its output is the MLP's (the MoE block's) output (None: a block of one mixer, Mamba's)
    mlp_input: nn.Module | None  # its input is h(l): the first MLP linear, or the MoE block
    experts: tuple[Experts, ...] = ()
    routers: tuple[tuple[str, nn.Module], ...] = ()  # qualified name, module with a 2-D weight
    moe_name: str | None = None
    names: dict[int, str] = field(default_factory=dict)  # id(linear) → qualified name (attention, MLP)
    mixer: Mixer = "attention"  # the token mixer the attention_* fields name: attention, or a row of TOKEN_MIXERS
    mixer_states: tuple[tuple[str, nn.Parameter], ...] = ()  # the mixers' parameters outside their quantized linears: 16-bit
    side_mixers: tuple["SideMixer", ...] = ()  # token mixers beside the main one (Falcon-H1's Mamba-2 beside its attention)
    mlp_side: tuple[nn.Module, ...] = ()  # MLPs beside the MoE block, their outputs added to its (Granite-4's shared_mlp)
    attention_experts: tuple[Experts, ...] = ()  # experts inside the token mixer (JetMoe's mixture of attention heads)
    attention_routers: tuple[tuple[str, nn.Module], ...] = ()  # ... and their routers (qualified name, module)

    @property
    def state_matrices(self) -> tuple[tuple[str, nn.Parameter], ...]:
        """Its mixer states that are matrices (:meth:`Anatomy.state_matrices`)."""
        return tuple((n, p) for n, p in self.mixer_states if sum(1 for d in shape_of(p) if d > 1) >= 2)  # (Kimi's A_log [1, 1, heads, 1]: a vector)

    @property
    def is_moe(self) -> bool:
        """Whether its MLP is a mixture of experts (:attr:`experts`: the MLP's; a mixture of attention
        heads is :attr:`attention_experts`)."""
        return bool(self.experts)

    @property
    def all_experts(self) -> tuple[Experts, ...]:
        """Every experts module of the block: the attention's (JetMoe's), then the MLP's."""
        return (*self.attention_experts, *self.experts)

    @property
    def all_routers(self) -> tuple[tuple[str, nn.Module], ...]:
        return (*self.attention_routers, *self.routers)

    @property
    def identity_experts(self) -> int:
        """The MoE's identity experts beside its experts (:data:`IDENTITY_EXPERTS`: LongCat's zero experts)."""
        return identity_experts(self.mlp_module) if self.is_moe else 0

    def router_input(self, module: nn.Module) -> nn.Module:
        """The module called with router ``module``'s input: the router itself, or the module applying
        its weight by hand (:data:`ROUTERS_BY_WEIGHT`: LongCat's LongcatFlashTopkRouter for its classifier)."""
        return next((m for m in self.module.modules() if getattr(m, ROUTERS_BY_WEIGHT.get(type(m).__name__, ""), None) is module), module)

    @property
    def has_kv_cache(self) -> bool:
        """Whether its mixer caches K/V (attention); a linear attention keeps a recurrent state instead."""
        return self.mixer == "attention"

    @property
    def mlp(self) -> dict[str, nn.Module]:
        return dict(self.mlp_linears)

    @property
    def mixer_outs(self) -> tuple[nn.Module, ...]:
        """The modules whose outputs sum to what the token mixers add to the stream: the main mixer's
        output projection, then each side mixer's (Falcon-H1: attention's o_proj, Mamba-2's out_proj)."""
        return tuple(m for m in (self.attention_out, *(s.out for s in self.side_mixers)) if m is not None)

    @property
    def mlp_outs(self) -> tuple[nn.Module, ...]:
        """The modules whose outputs sum to what the MLP adds to the stream: the MLP (the MoE block),
        then any MLP beside it (Granite-4's shared_mlp)."""
        return tuple(m for m in (self.mlp_module, *self.mlp_side) if m is not None)

    @property
    def has_mlp(self) -> bool:
        return self.mlp_module is not None

    @property
    def first_mlp(self) -> tuple[str, nn.Module]:
        """The MLP's first layer (leaf name, module): the gate projection of a gated MLP, else the
        first MLP linear; an MoE block's experts (``experts``, the MoE block: its input is h(l))."""
        if self.is_moe:
            return "experts", self.mlp_input
        return next((k, m) for k, m in self.mlp_linears if m is self.mlp_input)  # (the gate, else the first: _mlp_parts)

    def first_mlp_weights(self) -> list[str]:
        """Qualified names of the weights of the MLP's first layer (what ``weights_16bit`` restores)."""
        if self.is_moe:
            return [e.qualified(a) for e in self.experts for a in e.firsts]
        return [self.names[id(self.first_mlp[1])]]

    @property
    def mixer_linears(self) -> tuple[tuple[str, nn.Module], ...]:
        """Every token mixer's quantized linears (qualified name, module): the main one's, then the side mixers'."""
        return (*self.attention_linears, *(nl for s in self.side_mixers for nl in s.linears))

    def linears(self) -> list[tuple[str, nn.Module]]:
        """Token-mixer then MLP linears (qualified names), in model order."""
        order = {id(m): i for i, m in enumerate(self.module.modules())}
        both = [*self.mixer_linears, *((self.names[id(m)], m) for _, m in self.mlp_linears)]
        return sorted(both, key=lambda nm: order[id(nm[1])])

    def weight_names(self) -> list[str]:
        """Every quantizable weight's name: linears, expert tensors, routers, state matrices (include_mixer_states)."""
        return ([n for n, _ in self.linears()] + [e.qualified(a) for e in self.all_experts for a in e.params]
                + [n for n, _ in self.all_routers] + [state_key(n) for n, _ in self.state_matrices])

    def describe(self) -> str:
        mlp = _compact(self.names[id(m)][len(self.name) + 1:] for _, m in self.mlp_linears)
        if not self.has_mlp:
            return "no MLP"
        if self.is_moe:
            e = self.experts[0]
            fused = ('concatenated' if e.is_concatenated else 'interleaved') if len(e.firsts) == 1 else f"gate and up apart: {', '.join(e.params)}"
            lay = (f"{'stacked ' if e.stacked else ''}{'transposed ' if e.is_transposed else ''}"
                   f"{'gated ' + fused if e.has_gate else 'ungated'}")
            ident = f" + {self.identity_experts} identity" if self.identity_experts else ""
            return (f"MoE: {e.num_experts}{ident} experts ({lay}{', biased' if e.has_bias else ''}), routers "
                    f"[{', '.join(n.rsplit('.', 1)[-1] for n, _ in self.routers)}]"
                    + (f", {'MLPs beside it' if self.mlp_side else 'shared experts'} [{mlp}]" if mlp else ""))
        side = [(n, m) for n, m in self.mlp_linears if n in AUGMENTED_BLOCKS.get(type(self.module).__name__, _NO_AUGMENT).beside_mlp]
        own = _compact(self.names[id(m)][len(self.name) + 1:] for _, m in self.mlp_linears if all(m is not x for _, x in side))
        routers = f", routers [{_compact(n[len(self.name) + 1:] for n, _ in self.routers)}]" if self.routers else ""
        if side:  # (Gemma-3n's per-layer input gate and projection)
            return f"MLP [{own}], beside it [{_compact(self.names[id(m)][len(self.name) + 1:] for _, m in side)}]{routers}"
        return f"MLP [{mlp}]{routers}"


def _compact(names: Any) -> str:
    """Linears by leaf name, for descriptions, a name met again counted (LongCat's two MLPs: ``gate_proj
    ×2``); a linear whose leaf is an index by the list holding it (Zamba2's ``linear_q_adapter_list ×4``:
    one LoRA adapter, two linears, per layer sharing the block)."""
    counts: dict[str, int] = {}
    for n in names:
        parts = n.split(".")
        at = next((i for i, x in enumerate(parts) if x.isdigit() and i > 0 and not parts[i - 1].isdigit()), None)
        key = parts[-1] if at is None or not parts[-1].isdigit() else parts[at - 1]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(k if c == 1 else f"{k} ×{c}" for k, c in counts.items())


def layout_row(kind: str, norm_names: list[str]) -> LayoutRow | None:
    """The row of :data:`LAYOUTS` for a block class with these norm children: one naming the class
    first, else one for any class."""
    rows = [r for r in LAYOUTS if r.norms == frozenset(norm_names) and (not r.blocks or kind in r.blocks)]
    return min(rows, key=lambda r: not r.blocks, default=None)


def _layout(model_name: str, kind: str, norm_names: list[str], config: Any) -> tuple[Layout, str | None, str | None]:
    """(layout, the norm whose input is r(l), the norm whose output is h(l) where not that one)."""
    row = layout_row(kind, norm_names)
    if row is None:
        raise ModelNotUnderstood(
            f"{model_name}: block {kind} has norms [{', '.join(norm_names) or 'none'}]: not a layout quantlens knows "
            f"(pre-LN, post-LN, sandwich, post-sublayer, parallel, shortcut, shared, altup), so the residual stream r(l) cannot be located")
    layout, site = row.layout, row.site
    if row.blocks:
        return layout, site, row.h
    if layout == "pre-LN":
        if getattr(config, "do_layer_norm_before", True) is False:
            return "post-LN", norm_names[0], None  # the norm after the attention's residual addition (OPT-350m)
        if any(getattr(config, f, False) for f in PARALLEL_FLAGS):
            return "parallel", site, None
    elif layout == "parallel" and not any(getattr(config, f, layout == "parallel") for f in PARALLEL_FLAGS if hasattr(config, f)):
        raise ModelNotUnderstood(f"{model_name}: block {kind} has norms [{', '.join(norm_names)}], a parallel block's, but its config "
                                 f"does not say its residual is parallel ({' / '.join(PARALLEL_FLAGS)}): r(l) cannot be located")
    return layout, site, row.h


def _block(model_name: str, index: int, name: str, block: nn.Module, config: Any) -> Block:
    kind = type(block).__name__
    children = _sublayers(block)
    norm_names = _norm_children(children)
    layout, site_name, h_norm = _layout(model_name, kind, norm_names, config)  # (h_norm: Zamba2's, at the shared MLP's norm)
    found = [e for n, m in block.named_modules(prefix=name) if (e := _experts_of(model_name, n, m)) is not None]
    mixers, attn_experts, attn_routers = _mixer_experts(name, block, _mixer_children(model_name, kind, name, children), found)
    (mixer, attn_name, attn_mod, attn_linears, attn_out, states), side = (mixers[0] if mixers else NO_MIXER), mixers[1:]
    states = (*states, *(x for *_, st in side for x in st))
    sides = tuple(SideMixer(k, f"{name}.{n}", m, lin, out) for k, n, m, lin, out, _ in side)

    augmented = AUGMENTED_BLOCKS.get(kind, _NO_AUGMENT)  # (Gemma-3n's LAuReL beside its attention)
    sides = (*sides, *(SideMixer("none", f"{name}.{c}", m, lin, lin[-1][1]) for c in augmented.beside_mixer
                       for m in [block.get_submodule(c)] for lin in [_linears_of(f"{name}.{c}", m)]))

    experts = [e for e in found if all(e is not x for x in attn_experts)]
    attn_ids = {id(x) for _, _, mod, *_ in mixers for x in mod.modules() if is_linear(x)}  # (state linears too: not the MLP's)
    attn_ids |= {id(x) for s in sides for _, x in s.linears}
    if len(experts) > 1:
        raise ModelNotUnderstood(f"{model_name}: block {kind} has {len(experts)} experts modules; expected one")
    moe_name, moe, routers = _moe_of(name, block, experts[0]) if experts else (None, None, [])
    routers = [*routers, *(nl for c in augmented.routers for nl in _linears_of(f"{name}.{c}", block.get_submodule(c)))]  # (AltUp's)
    router_ids = {id(m) for _, m in routers}
    mlp_linears = [(f"{name}.{n}", m) for n, m in block.named_modules()
                   if is_linear(m) and id(m) not in attn_ids and id(m) not in router_ids]
    if not mlp_linears and not experts and not mixers:
        raise ModelNotUnderstood(f"{model_name}: block {kind} has neither a token mixer (an attention child holding linear layers, "
                                 f"a mixer of anatomy.TOKEN_MIXERS) nor an MLP (children: {', '.join(n for n, _ in children)})")
    mlp = _mlp_keys(name, mlp_linears)
    names = {id(m): q for q, m in (*attn_linears, *(nl for s in sides for nl in s.linears), *mlp_linears)}

    mlp_input, mlp_module, mlp_side = _mlp_parts(kind, block, mlp, moe, children, names, attn_ids)
    residual_site, h_site = _sites(model_name, kind, block, site_name, h_norm, mlp_input)

    _check_accounted(model_name, name, block, (*attn_linears, *(nl for s in sides for nl in s.linears)), mlp_linears,
                     (*attn_experts, *experts), (*attn_routers, *routers), states)
    return Block(index, name, block, layout, residual_site, h_site, f"{name}.{attn_name}" if attn_name else "", attn_mod, attn_linears, attn_out,
                 mlp, mlp_module, mlp_input, tuple(experts), tuple(routers), moe_name, names, mixer, states, sides, mlp_side,
                 tuple(attn_experts), tuple(attn_routers))


def _mlp_parts(kind: str, block: nn.Module, mlp: tuple[tuple[str, nn.Module], ...], moe: nn.Module | None,
               children: list[tuple[str, nn.Module]], names: dict[int, str], attn_ids: set[int]
               ) -> tuple[nn.Module | None, nn.Module | None, tuple[nn.Module, ...]]:
    """(the module whose input is h(l), the one whose output is the MLP's, the MLPs beside it)."""
    if moe is not None:
        inside = {id(x) for x in moe.modules()}
        return moe, moe, tuple(m for _, m in children if id(m) not in inside and moe not in set(m.modules())
                               and any(id(x) in names for x in m.modules() if is_linear(x) and id(x) not in attn_ids))
    if not mlp:  # a block of one token mixer (Mamba; Nemotron-H's mixer blocks)
        return None, None, ()
    # the last MLP linear's output is the MLP's output (BLOOM's MLP module adds the residual itself)
    beside = AUGMENTED_BLOCKS.get(kind, _NO_AUGMENT).beside_mlp  # (Gemma-3n's per-layer input: an MLP beside the MLP)
    own = [(k, m) for k, m in mlp if k not in beside]
    gate = [m for k, m in own if "gate" in k]
    composite = COMPOSITE_BLOCKS.get(kind)  # (Zamba2's: the MLP's output goes on through its projection `linear`)
    out = block.get_submodule(composite.mlp_out) if composite else own[-1][1]
    return (gate[0] if gate else own[0][1]), out, ((block.get_submodule(beside[-1]),) if beside else ())


def _sites(model_name: str, kind: str, block: nn.Module, site_name: str | None, h_norm: str | None, mlp_input: nn.Module | None
           ) -> tuple[nn.Module, tuple[nn.Module, Literal["input", "output"]]]:
    """(the module whose input is r(l), where h(l) is read) for the block's layout row."""
    if site_name is not None:
        residual_site = block.get_submodule(site_name)
        return residual_site, (block.get_submodule(h_norm) if h_norm else residual_site, "output")
    if mlp_input is None:
        raise ModelNotUnderstood(f"{model_name}: block {kind} has no MLP and norms after its sublayers only: r(l) cannot be located")
    return mlp_input, (mlp_input, "input")  # post-sublayer: r(l) is the MLP's (the MoE block's) input


def _mlp_keys(name: str, mlp_linears: list[tuple[str, nn.Module]]) -> tuple[tuple[str, nn.Module], ...]:
    """The MLP linears by leaf name (``gate_proj``: what the patching variants ``mlp.<key>`` say), or —
    where two MLPs share leaf names (LongCat's mlps.0 and mlps.1) — by name inside the block."""
    leaves = [q.rsplit(".", 1)[-1] for q, _ in mlp_linears]
    unique = len(set(leaves)) == len(leaves)
    return tuple((leaf if unique else q[len(name) + 1:], m) for leaf, (q, m) in zip(leaves, mlp_linears))


def _moe_of(name: str, block: nn.Module, e: Experts) -> tuple[str, nn.Module, list[tuple[str, nn.Module]]]:
    """The MoE of experts ``e`` in block ``name``: its qualified name, its module — the one holding
    the router: the experts module's parent, or the experts module itself where it routes its own
    tokens (JetMoe's) — and its routers."""
    moe_name = e.name if e.owns_router else e.name.rsplit(".", 1)[0]
    moe = block.get_submodule(moe_name[len(name) + 1:])
    return moe_name, moe, _routers(moe_name, moe, e)


def _mixer_experts(name: str, block: nn.Module, mixers: list["_MixerParts"], found: list[Experts]
                   ) -> tuple[list["_MixerParts"], list[Experts], list[tuple[str, nn.Module]]]:
    """The experts inside a token mixer (JetMoe's mixture of attention heads: its query and output
    projections are experts, picked per token by the attention's own router) and their routers. Such a
    mixer's routers are no linears of it, and — its output projection an experts tensor, summed over
    the routed experts and biased inside it — the mixer module itself stands for its output
    (:attr:`Block.attention_out`: what it adds to the stream, its forward's first output)."""
    out, experts, routers = [], [], []
    for k, n, m, linears, o, states in mixers:
        own = [e for e in found if any(e.module is x for x in m.modules())]
        rs = [r for e in own for r in _moe_of(name, block, e)[2]]
        ids = {id(r) for _, r in rs}
        out.append((k, n, m, tuple(x for x in linears if id(x[1]) not in ids), m if own else o, states))
        experts += own
        routers += rs
    return out, experts, routers


_MixerParts = tuple[Mixer, str, Any, tuple[tuple[str, nn.Module], ...], Any, tuple[tuple[str, nn.Parameter], ...]]
NO_MIXER: _MixerParts = ("none", "", None, (), None, ())  # a block of one MLP (Nemotron-H's MLP and MoE blocks)


def _mixer_children(model_name: str, kind: str, name: str, children: list[tuple[str, nn.Module]]) -> list[_MixerParts]:
    """The block's token mixers — its ``*attn*`` / ``*attention*`` children holding linears and its
    children of :data:`TOKEN_MIXERS` — attention first (the one a KV cache reaches): each as (kind,
    child name, module, quantized linears by qualified name, output projection, 16-bit states).
    Several attentions only as the entries of one list, one per pass of the block (LongCat's
    self_attn.0, self_attn.1: the first is the block's attention, the second a side mixer)."""
    found = [_unwrapped(n, m) for n, m in children if (type(m).__name__ in TOKEN_MIXERS or type(m).__name__.endswith("Attention")
                                                      or "attn" in n.lower() or "attention" in n.lower())
             and any(is_linear(x) for x in m.modules())]
    out = [(*_mixer_of(f"{name}.{n}", m), n, m) for n, m in found]
    if len({n.split(".")[0] for k, _, _, n, _ in out if k == "attention"}) > 1:
        raise ModelNotUnderstood(f"{model_name}: block {kind} has {len(found)} attention children ({', '.join(n for n, _ in found)}); expected one")
    out.sort(key=lambda o: o[0] != "attention")
    parts = []
    for k, linears, states, n, m in out:
        outs = [x for q, x in linears if q.rsplit(".", 1)[-1] in OUTPUT_PROJ_NAMES]
        parts.append((k, n, m, linears, outs[0] if len(outs) == 1 else linears[-1][1], states))
    return parts


def _unwrapped(name: str, child: nn.Module) -> tuple[str, nn.Module]:
    """A sublayer that holds the attention between its norms (DBRX's norm_attn_norm: norm_1, attn,
    norm_2) stands for the one child of it holding linears — the attention its KV cache and its
    output projection belong to (``norm_attn_norm.attn``); any other child stands for itself."""
    if not any(_is_norm(x) for x in child.children()):
        return name, child
    inner = [(c, x) for c, x in child.named_children() if any(is_linear(y) for y in x.modules())]
    return (f"{name}.{inner[0][0]}", inner[0][1]) if len(inner) == 1 else (name, child)


def _linears_of(qualified: str, module: nn.Module) -> tuple[tuple[str, nn.Module], ...]:
    """A module's linears by qualified name, in registration order."""
    return tuple((f"{qualified}.{n}" if n else qualified, m) for n, m in module.named_modules() if is_linear(m))


def _mixer_of(qualified: str, mixer: nn.Module) -> tuple[Mixer, tuple[tuple[str, nn.Module], ...], tuple[tuple[str, nn.Parameter], ...]]:
    """A token mixer's kind, its quantized linears (qualified names) and — a row of
    :data:`TOKEN_MIXERS` — its 16-bit state parameters (conv kernels, A_log, D, dt_bias, gated norms,
    its state linears' weights) by qualified name."""
    row = TOKEN_MIXERS.get(type(mixer).__name__)
    state_linears = set(row.state_linears) if row else set()
    linears = tuple((f"{qualified}.{n}", m) for n, m in mixer.named_modules() if is_linear(m) and n not in state_linears)
    if row is None:
        return "attention", linears, ()
    own = {id(p) for _, m in linears for p in m.parameters(recurse=False)}
    return row.kind, linears, tuple((f"{qualified}.{n}", p) for n, p in mixer.named_parameters() if id(p) not in own)


def _own_matrix(m: nn.Module) -> torch.Tensor | None:
    w = m._parameters.get("weight")
    return w if w is not None and len(shape_of(w)) == 2 else None


def _routers(moe_name: str, moe: nn.Module, experts: Experts) -> list[tuple[str, nn.Module]]:
    """The modules of an MoE block that produce routing scores, found by what they are: beside the
    experts module, a child whose only matrix projects the hidden state to one score per expert (the
    router: Mixtral's ``gate``, gpt-oss' ``router``, Llama-4's ``router``, HunYuan's ``gate.wg`` — a
    linear inside a gate module with no weight of its own) or to one score (Qwen2-MoE's
    ``shared_expert_gate``, which weighs the shared expert). A child with several matrices is a
    shared expert (an MLP), never a router. An MoE with identity experts (:data:`IDENTITY_EXPERTS`)
    scores them too: its router has a row for each expert and each identity expert (LongCat's)."""
    out = []
    scored = experts.num_experts + identity_experts(moe)
    for cn, child in moe.named_children():
        if child is experts.module:
            continue
        scorers = [(n, m) for n, m in child.named_modules() if _own_matrix(m) is not None]
        if len(scorers) != 1:
            continue
        n, m = scorers[0]
        rows = int(shape_of(_own_matrix(m))[1 if is_conv1d(m) else 0])
        if rows in (scored, 1):
            out.append((f"{moe_name}.{cn}" + (f".{n}" if n else ""), m))
    return out


def first_names(named: Any) -> dict[str, str]:
    """Each name of (name, tensor) pairs → the first name holding the same tensor: a weight tied
    across blocks (Zamba2's shared transformer) is one matrix, named by its first block."""
    seen: dict[int, str] = {}
    return {n: seen.setdefault(id(p), n) for n, p in named}


def state_key(param_name: str) -> str:
    """A state matrix's name in reports and calibrated weights: its module's for a ``weight`` (a
    conv kernel, named as a linear is), else the parameter's (``…mixer.A_log``)."""
    return param_name.removesuffix(".weight")


def is_vector(name: str, p: torch.Tensor) -> bool:
    """A bias stored with unit dimensions is a vector, not a matrix to quantize (Ernie-4.5-MoE's
    per-expert ``e_score_correction_bias`` [1, experts]): at most one dimension longer than 1."""
    return name.endswith("bias") and sum(1 for d in shape_of(p) if d > 1) <= 1


def _check_accounted(model_name: str, name: str, block: nn.Module, attn_linears, mlp_linears, experts, routers, states) -> None:
    """Every matrix of the block is a linear's weight, an expert tensor, a router's weight or a linear
    attention's state parameter (its conv1d)."""
    known = {id(m.weight) for _, m in (*attn_linears, *mlp_linears, *routers)} | {id(p) for _, p in states}
    known |= {id(e.tensor(a)) for e in experts for a in e.params}
    known |= {id(b) for e in experts if e.has_bias for a in e.params if (b := getattr(e.owner, f"{a}_bias", None)) is not None}  # [experts, out]
    for pname, p in block.named_parameters(prefix=name):
        if len(shape_of(p)) >= 2 and id(p) not in known and not is_vector(pname, p):
            raise ModelNotUnderstood(f"{model_name}: block tensor {pname} {tuple(shape_of(p))} is neither a linear's weight, an "
                                     "expert tensor nor a router's weight: quantlens cannot account for it")


# --- the model --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamsRow:
    """A model carrying several residual streams between its blocks (``[streams, batch, tokens,
    hidden]``), by the class holding its blocks: the config field naming the active stream — the one
    each block's attention and MLP read, r(l) and z(l) —, the module list projecting every other stream
    back before the head, and the config field saying how many streams."""

    active: str
    unembed: str
    count: str


STREAMS: dict[str, StreamsRow] = {"Gemma3nTextModel": StreamsRow("altup_active_idx", "altup_unembed_projections", "altup_num_inputs")}


@dataclass(frozen=True)
class Streams:
    """The streams of a :data:`STREAMS` model: the active one's index and the projections of the others."""

    active: int
    unembed: nn.ModuleList

    def merge(self, h: torch.Tensor) -> torch.Tensor:
        """``[streams, batch, tokens, hidden]`` → ``[batch, tokens, hidden]`` as Gemma-3n's forward does
        after its last block: each other stream projected and rescaled to the first one's RMS, then all averaged."""
        target = torch.mean(h[0] ** 2, dim=-1, keepdim=True) ** 0.5
        out = [h[0]]
        for i in range(1, h.shape[0]):
            x = self.unembed[i - 1](h[i]).to(dtype=h.dtype, device=target.device)
            new = torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
            out.append(x * target / new)
        return torch.mean(torch.stack(out), dim=0)


@dataclass(frozen=True)
class Anatomy:
    model_type: str
    blocks_name: str
    blocks: nn.ModuleList
    parts: tuple[Block, ...]
    embeddings: nn.Module
    project_in: nn.Module | None
    final_norm: nn.Module | None
    project_out: nn.Module | None
    lm_head: nn.Module
    kv_route: KVRoute | None  # None: the KV cache of this attention cannot be quantized (kv_refusal says why)
    kv_refusal: str | None = None
    logit_softcap: float | None = None  # Gemma-2's final_logit_softcapping
    logit_scale: float | None = None  # the head's logits are multiplied by it: Cohere's logit_scale, Falcon-H1's lm_head_multiplier
    logit_divisor: float | None = None  # ... divided by it: Granite's logits_scaling
    streams: Streams | None = None  # several residual streams between the blocks (Gemma-3n's AltUp), else None

    @property
    def post_ln(self) -> bool:
        return self.parts[0].layout == "post-LN"

    @property
    def is_moe(self) -> bool:
        return any(b.is_moe for b in self.parts)

    def shape(self) -> ModelShape:
        """The model's shape read from its modules (what :func:`quantlens.model.footprint.model_shape`
        reads from its config): blocks, the width the attention's first projection reads, the head's
        rows, the routed experts of the largest MoE block."""
        head = self.lm_head.weight
        first = (self.parts[0].attention_linears or tuple(self.parts[0].linears()))[0][1]
        return ModelShape(layers=len(self.parts), hidden=in_features(first),
                          vocab=int(shape_of(head)[1] if is_conv1d(self.lm_head) else shape_of(head)[0]),
                          experts=max((e.num_experts for b in self.parts for e in b.experts), default=0))

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """hidden state → logits as the model does it: final norm (if any), project_out (if any),
        the head, its logit scaling (Cohere, Falcon-H1, Granite) and Gemma's soft-capping (if configured).
        A model of several streams (:attr:`streams`) merges a block output's streams first; one stream
        (r(l), an early exit) is decoded as it is."""
        if self.streams is not None and h.dim() == 4:
            h = self.streams.merge(h)
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        logits = self.lm_head(h)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logit_divisor is not None:
            logits = logits / self.logit_divisor
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def stream(self, z: torch.Tensor) -> torch.Tensor:
        """A block's output as the residual stream z(l): the active stream where the model carries several."""
        return z[self.streams.active] if self.streams is not None and z.dim() == 4 else z

    def block_linears(self) -> list[tuple[str, nn.Module]]:
        """Every linear-like layer of the decoder blocks' attention and MLPs (routers excluded), in
        model order (qualified name, module)."""
        return [nl for b in self.parts for nl in b.linears()]

    def experts(self) -> list[Experts]:
        """Every experts module, a mixture of attention heads' too (:attr:`Block.all_experts`)."""
        return [e for b in self.parts for e in b.all_experts]

    def routers(self) -> list[tuple[str, nn.Module]]:
        """Every router, a mixture of attention heads' too (:attr:`Block.all_routers`)."""
        return [r for b in self.parts for r in b.all_routers]

    def block_matrix_params(self) -> dict[str, nn.Parameter]:
        """Every weight matrix of the decoder blocks: each ≥ 2-D parameter but the experts' biases
        (gpt-oss' [experts, out]: one bias vector per expert), and every state parameter of a linear
        attention (:attr:`Block.mixer_states`, vectors too: what stays 16-bit there is counted).
        Qualified name → parameter; a matrix shared by several blocks (Zamba2's shared transformer)
        once, by its first name."""
        biases = {id(getattr(e.owner, f"{a}_bias")) for e in self.experts() if e.has_bias for a in e.params
                  if getattr(e.owner, f"{a}_bias", None) is not None}
        every = [(f"{b.name}.{n}", p) for b in self.parts for n, p in b.module.named_parameters()
                 if len(shape_of(p)) >= 2 and id(p) not in biases and not is_vector(n, p)] + self.mixer_states()
        first = first_names(every)
        return {n: p for n, p in every if first[n] == n}

    def block_matrix_roles(self) -> dict[str, str]:
        """The role of each of :meth:`block_matrix_params` a setting keeps 16-bit by default:
        ``routers`` (the MoE's routing projections), ``mixer states`` (a linear attention's or SSM's
        conv kernels, A_log, D, dt biases, gated norms); ``weights`` for every other one."""
        routers = {id(m.weight) for _, m in self.routers()}
        states = {id(p) for _, p in self.mixer_states()}
        return {n: "routers" if id(p) in routers else "mixer states" if id(p) in states else "weights"
                for n, p in self.block_matrix_params().items()}

    def kv_parts(self) -> tuple[Block, ...]:
        """The blocks whose mixer caches K/V (attention): what a KV setting reaches."""
        return tuple(b for b in self.parts if b.has_kv_cache)

    def mixer_states(self) -> list[tuple[str, nn.Parameter]]:
        """Every linear attention's state parameters (qualified name, parameter): kept 16-bit."""
        return [s for b in self.parts for s in b.mixer_states]

    def state_matrices(self) -> list[tuple[str, nn.Parameter]]:
        """The mixer states that are matrices (conv kernels [channels, 1, taps], Mamba-1's A_log
        [channels, state] and dt_proj): what ``include_mixer_states`` quantizes; the vectors (D,
        dt_bias, Mamba-2's A_log, norms, biases) stay 16-bit as every bias and norm does."""
        return [s for b in self.parts for s in b.state_matrices]

    def block_matrices(self) -> dict[str, int]:
        """:meth:`block_matrix_params` as qualified name → elements (a streamed skeleton's too)."""
        return {n: shape_of(p).numel() for n, p in self.block_matrix_params().items()}

    def _other_mixers(self) -> str:
        """A hybrid's token mixers other than attention, for :meth:`describe` ('' if none)."""
        out = []
        for kind in ("linear attention", "ssm", "short conv"):
            mains = [(p, p.attention_name, p.attention_linears) for p in self.parts if p.mixer == kind]
            sides = [(p, s.name, s.linears) for p in self.parts for s in p.side_mixers if s.kind == kind]
            if not mains + sides:
                continue
            p, name, linears = (mains + sides)[0]
            states = sorted({n[len(name) + 1:] for n, _ in p.mixer_states if n.startswith(name + ".")})
            out.append(f"{kind} {name.rsplit('.', 1)[-1]} in blocks {','.join(str(x[0].index) for x in mains + sides)} "
                       f"[{', '.join(n.rsplit('.', 1)[-1] for n, _ in linears)}; 16-bit {', '.join(states)}], ")
        return "".join(out)

    def describe(self) -> str:
        b = (self.kv_parts() or self.parts)[0]
        norm = "none" if self.final_norm is None else type(self.final_norm).__name__
        mlps = list(dict.fromkeys(p.describe() for p in self.parts))
        r = {"pre-LN": "r(l) = the stream at the MLP's norm", "post-LN": "r(l) = z(l−1) + Attn before the norm that follows it",
             "sandwich": "r(l) = the stream at the MLP's norm, after the attention's post-norm", "post-sublayer": "r(l) = the MLP's input (no norm before it)",
             "parallel": "r(l) = z(l−1): attention and MLP read the block input",
             "shortcut": "two attention → MLP passes, r(l) = the stream at the first MLP's norm, whose output the MoE reads",
             "shared": "a shared transformer block's output projected into the Mamba's input, r(l) = the stream at the Mamba's norm",
             "altup": f"{self.streams.unembed.__len__() + 1 if self.streams else '?'} streams between blocks (AltUp), r(l) = the active "
                      "one at the MLP's norm, after attention and LAuReL"}[b.layout]
        dense = sum(1 for p in self.parts if not p.is_moe)
        mix = f" ({dense} dense, {len(self.parts) - dense} MoE)" if self.is_moe and dense else ""
        return (f"{self.model_type}: {len(self.parts)} blocks{mix} at {self.blocks_name} ({b.layout}; {r}), "
                + (f"attention {b.attention_name[len(b.name) + 1:]} [{_compact(n[len(b.attention_name) + 1:] for n, _ in b.attention_linears)}] "
                   + "".join(f"then {s.name[len(b.name) + 1:]} " for s in b.side_mixers if s.kind == "attention")  # (LongCat's second pass)
                   + "".join(f"beside it {s.name[len(b.name) + 1:]} [{_compact(n[len(s.name) + 1:] for n, _ in s.linears)}] "
                             for s in b.side_mixers if s.kind == "none")  # (Gemma-3n's LAuReL)
                   + "".join(f"with {e.num_experts} experts [{', '.join(e.params)}] routed by [{', '.join(n.rsplit('.', 1)[-1] for n, _ in b.attention_routers)}] "
                             for e in b.attention_experts)
                   + f"via {self.kv_route or 'an attention the KV cache cannot reach'}, " if b.mixer == "attention" else "no attention, ")
                + f"{self._other_mixers()}{'; '.join(mlps)}, final norm {norm}"
                + (", project_in/out" if self.project_in is not None or self.project_out is not None else "")
                + (f", logits soft-capped at {self.logit_softcap}" if self.logit_softcap else ""))


def kv_route(attention: nn.Module) -> KVRoute | None:
    """How an attention module computes K/V: through transformers' attention interface (its module
    defines ``eager_attention_forward`` and uses ``ALL_ATTENTION_FUNCTIONS``), BLOOM's fused QKV
    (``_reshape``), or None (not understood)."""
    mod = sys.modules.get(type(attention).__module__)
    if mod is not None and hasattr(mod, "ALL_ATTENTION_FUNCTIONS") and getattr(mod, "eager_attention_forward", None) is not None:
        return "interface"
    if type(attention).__name__ == "BloomAttention" and hasattr(attention, "_reshape"):
        return "bloom"
    return None


# Attentions that hand the attention interface K/V tiled along the heads (``x.repeat(1, n, 1, 1)``, before
# the interface; GQA's repeat happens inside it), by class → the attribute giving n. The cache holds one copy
# (JetMoe's: each token's top_k attention experts share its one K/V projection, kv_proj).
KV_TILED: dict[str, str] = {"JetMoeAttention": "top_k"}


def kv_copies(attention: nn.Module) -> int:
    """How many tiled copies of the cached K/V heads the attention interface gets (:data:`KV_TILED`; 1: none)."""
    attr = KV_TILED.get(type(attention).__name__)
    return int(getattr(attention, attr)) if attr else 1


def _kv_refusal(attention: nn.Module, config: Any) -> str | None:
    """Why the KV cache of an attention on the interface is still not what quantlens would quantize."""
    if hasattr(attention, "kv_a_proj_with_mqa") or getattr(config, "kv_lora_rank", None):
        return (f"{type(attention).__name__} is multi-head latent attention (MLA): its cache holds the compressed latent "
                "(kv_lora_rank), not per-head K/V")
    return None


def _kv(model_name: str, parts: tuple[Block, ...], config: Any) -> tuple[KVRoute | None, str | None]:
    """The KV route of the attention blocks (a hybrid's linear-attention blocks keep no KV cache), or
    None and why (None: KV-cache settings fail, :mod:`quantlens.quantize.kv`)."""
    kv = [b for b in parts if b.has_kv_cache]
    if not kv:
        kinds = " and ".join(dict.fromkeys(b.mixer for b in parts if b.mixer != "none"))
        return None, f"{model_name} has no attention block (its {len(parts)} blocks mix tokens by {kinds}): no KV cache"
    routes = {kv_route(b.attention) for b in kv}
    route = routes.pop() if len(routes) == 1 else None
    refusal = _kv_refusal(kv[0].attention, config) if route is not None else (
        f"{type(kv[0].attention).__name__} ({kv[0].attention_name}) computes K/V in code quantlens cannot reach "
        "(neither transformers' attention interface nor BLOOM's)")
    seconds = [s.name for b in kv for s in b.side_mixers if s.kind == "attention"]
    if refusal is None and seconds:  # (LongCat's are MLA: refused above)
        refusal = f"{seconds[0]} is a block's second attention: the KV cache reaches each block's first one only"
    return (None, refusal) if refusal is not None else (route, None)


def anatomy(model: nn.Module) -> Anatomy:
    """The anatomy of ``model`` (see the module doc), or :class:`ModelNotUnderstood`."""
    what = type(model).__name__
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "") or what)
    if getattr(model, BLOCKS_ATTR, None) is None:
        _refuse_hybrid(model)
    blocks_name, blocks = find_decoder_blocks(model)
    parts = tuple(_block(what, i, f"{blocks_name}.{i}", b, config) for i, b in enumerate(blocks))
    parent = model.get_submodule(blocks_name.rsplit(".", 1)[0]) if "." in blocks_name else model
    found = [n for n in FINAL_NORM_NAMES if n in parent._modules or (hasattr(parent, n) and getattr(parent, n) is None)]
    if not found:
        raise ModelNotUnderstood(f"{what}: no final norm attribute ({', '.join(FINAL_NORM_NAMES)}) beside the blocks at {blocks_name}")
    final_norm = getattr(parent, found[0])  # None where the model has none (OPT-350m)
    if final_norm is not None and not _is_norm(final_norm):
        raise ModelNotUnderstood(f"{what}: {found[0]} beside the blocks is a {type(final_norm).__name__}, not a norm")
    head = model.get_output_embeddings()
    if head is None:
        raise ModelNotUnderstood(f"{what}: no LM head (get_output_embeddings() is None)")
    route, refusal = _kv(what, parts, config)
    return Anatomy(model_type, blocks_name, blocks, parts, model.get_input_embeddings(), getattr(parent, "project_in", None),
                   final_norm, getattr(parent, "project_out", None), head, route, refusal,
                   getattr(config, "final_logit_softcapping", None), *_logit_scaling(model, config), _streams(parent, config))


def _streams(parent: nn.Module, config: Any) -> Streams | None:
    """The streams of a :data:`STREAMS` model (by the class holding its blocks), else None."""
    row = STREAMS.get(type(parent).__name__)
    if row is None:
        return None
    unembed = getattr(parent, row.unembed)
    if len(unembed) != int(getattr(config, row.count)) - 1:
        raise ModelNotUnderstood(f"{type(parent).__name__}: {len(unembed)} {row.unembed} for {getattr(config, row.count)} streams")
    return Streams(int(getattr(config, row.active)), unembed)


# model type → the config field its forward multiplies the head's logits by (Cohere's is the model's logit_scale)
LOGIT_MULTIPLIERS = {"falcon_h1": "lm_head_multiplier", "hyperclovax": "logits_scaling"}


def _logit_scaling(model: nn.Module, config: Any) -> tuple[float | None, float | None]:
    """What the model's forward does to its head's logits, as it does it: multiplied by Cohere's
    ``logit_scale`` or a :data:`LOGIT_MULTIPLIERS` field (Falcon-H1's ``lm_head_multiplier``,
    HyperCLOVAX's muP ``logits_scaling``); divided by Granite's ``logits_scaling``."""
    scale = getattr(model, "logit_scale", None)
    field = LOGIT_MULTIPLIERS.get(str(getattr(config, "model_type", "")))
    if scale is None and field is not None:
        scale = getattr(config, field)
    divisor = getattr(config, "logits_scaling", None) if "granite" in str(getattr(config, "model_type", "")) else None
    return scale, divisor


def check_config(config: Any) -> Anatomy:
    """Build the model of ``config`` on the meta device (no memory, no weights) and return its
    anatomy, or raise :class:`ModelNotUnderstood`: what preflight calls before any evaluation."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as err:
        raise ModelNotUnderstood(f"{getattr(config, 'model_type', '?')}: not a causal LM transformers can build ({err})") from None
    except ImportError as err:  # (Gemma-3n's multimodal class: its vision tower needs timm)
        need = " ".join(str(err).split())[:200]
        raise ModelNotUnderstood(f"{getattr(config, 'model_type', '?')}: transformers cannot build it here: {need}") from None
    return anatomy(model)
