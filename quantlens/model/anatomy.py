"""One model anatomy: what a Hugging Face causal LM is made of, named once for every feature.

Patching, the KV cache, layer-wise streaming, residual statistics and the mechanism analyses all
ask :func:`anatomy` instead of looking modules up on their own (the habit of GPTQModel's model
definitions: the anatomy is data, everything generic reads it). For any supported model it names:

- ``embeddings`` (the input embedding) and ``project_in`` (OPT's ``word_embed_proj_dim`` →
  hidden projection, or None);
- ``blocks``: the decoder blocks, and for each (:class:`Block`) its two norms, its attention module
  with its linears (the last is the output projection), its MLP linears (registration order; the
  last is the MLP output), and where the residual stream is read;
- ``kv_route``: how the attention computes K/V — ``interface`` (transformers'
  ``ALL_ATTENTION_FUNCTIONS``: OPT, LLaMA, Qwen2, Mistral, …), ``bloom`` (BLOOM's fused QKV), or
  None (any other attention: weights and activations work, KV-cache settings are refused);
- ``final_norm`` (or None: OPT-350m has none), ``project_out`` (or None) and ``lm_head``;
  :meth:`Anatomy.decode` maps a hidden state to logits as the model itself does: final norm if
  any, then ``project_out`` if any, then the head.

Found generically: blocks are the ``nn.ModuleList`` of same-typed modules holding the most
parameters; a block's norms are its two direct children whose class name ends in ``Norm``; its
attention is the child named ``*attn*`` / ``*attention*`` that holds linears; its MLP linears are
its other linears; final norm and projections are attributes of the blocks' parent with one of a
few known names. A small registry (:data:`POST_LN`) holds the exceptions that a module tree does not
show. Anything else raises :class:`ModelNotUnderstood` naming what was not understood — preflight
calls :func:`check_config` on the model's config (meta device, no weights) before any evaluation.

**Pre-LN and post-LN.** The residual state after attention, r(l) = z(l−1) + Attn(·), is read at the
input of :attr:`Block.residual_norm`, the norm that follows the attention's residual addition and
whose output feeds the MLP (h(l)). In a pre-LN block (LLaMA, BLOOM, OPT ≥ 1.3B) that is the
block's second norm: r(l) is the un-normalised residual stream, as in arXiv 2506.12044. In a
post-LN block (OPT-350m, ``do_layer_norm_before=False``) it is the *first* norm, applied after the
attention's residual addition: r(l) is still z(l−1) + Attn(z(l−1)) before normalisation, but the
stream the next block sees is normalised (z(l) is a norm's output), so the norms of r(l) and z(l)
are on different scales than in pre-LN models and the early exit of r(l) decodes an un-normalised
state (the model has no final norm to undo it).

This module imports nothing else of quantlens: it is the bottom of the model side.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

KVRoute = Literal["interface", "bloom"]

# Exceptions a module tree does not show: model_type → is the block post-LN for this config?
POST_LN = {"opt": lambda config: getattr(config, "do_layer_norm_before", True) is False}
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f")
BLOCKS_ATTR = "_quantlens_blocks"  # a streamed skeleton names its block list (its blocks hold no weights)


class ModelNotUnderstood(ValueError):
    """The model's structure is not one the anatomy understands; the message says what."""


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-block list: the ModuleList of same-typed blocks holding the most parameters.

    OPT: ``model.decoder.layers``; BLOOM: ``transformer.h``; LLaMA/Qwen2/Mistral: ``model.layers``.
    """
    known = getattr(model, BLOCKS_ATTR, None)
    if known is not None:
        return known, model.get_submodule(known)
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and all(type(b) is type(mod[0]) for b in mod):
            n = sum(p.numel() for p in mod.parameters())
            if best is None or n > best[0]:
                best = (n, name, mod)
    if best is None:
        raise ModelNotUnderstood(f"{type(model).__name__}: no decoder block list (an nn.ModuleList of blocks) found")
    return best[1], best[2]


def _is_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("Norm")


@dataclass(frozen=True)
class Block:
    """One decoder block's parts (qualified names are the model's ``named_modules`` names)."""

    index: int
    name: str
    module: nn.Module
    norm1: nn.Module  # the first norm child: before attention (pre-LN), after its residual add (post-LN)
    norm2: nn.Module  # the second: before the MLP (pre-LN), after the MLP's residual add (post-LN)
    attention_name: str
    attention: nn.Module
    attention_linears: tuple[tuple[str, nn.Linear], ...]  # registration order; the last is the output projection
    mlp_linears: tuple[tuple[str, nn.Linear], ...]  # (leaf name, module); the last is the MLP output
    post_ln: bool
    names: dict[int, str] = field(default_factory=dict)  # id(linear) → qualified name

    @property
    def residual_norm(self) -> nn.Module:
        """The norm whose input is r(l) (the residual after attention) and whose output h(l) feeds
        the MLP: the second norm of a pre-LN block, the first of a post-LN one (module doc)."""
        return self.norm1 if self.post_ln else self.norm2

    @property
    def attention_out(self) -> nn.Linear:
        return self.attention_linears[-1][1]

    @property
    def mlp(self) -> dict[str, nn.Linear]:
        return dict(self.mlp_linears)

    @property
    def mlp_out(self) -> nn.Linear:
        return self.mlp_linears[-1][1]

    @property
    def first_mlp(self) -> tuple[str, nn.Linear]:
        """The gate projection of a gated MLP, else the first MLP linear (fc1, dense_h_to_4h)."""
        gate = [(k, m) for k, m in self.mlp_linears if "gate" in k]
        return gate[0] if gate else self.mlp_linears[0]


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
    post_ln: bool
    kv_route: KVRoute | None  # None: the KV cache of this attention cannot be quantized

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """hidden state → logits as the model does it: final norm (if any), project_out (if any), head."""
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return self.lm_head(h)

    def block_linears(self) -> list[tuple[str, nn.Linear]]:
        """Every nn.Linear inside the decoder blocks, in model order (qualified name, module)."""
        return [(n, m) for b in self.parts for n, m in b.module.named_modules(prefix=b.name) if isinstance(m, nn.Linear)]

    def describe(self) -> str:
        b = self.parts[0]
        norm = "none" if self.final_norm is None else type(self.final_norm).__name__
        return (f"{self.model_type}: {len(self.parts)} blocks at {self.blocks_name} ({'post' if self.post_ln else 'pre'}-LN), "
                f"attention {b.attention_name.rsplit('.', 1)[-1]} [{', '.join(n.rsplit('.', 1)[-1] for n, _ in b.attention_linears)}] "
                f"via {self.kv_route or 'an attention the KV cache cannot reach'}, MLP [{', '.join(k for k, _ in b.mlp_linears)}], final norm {norm}"
                + (", project_in/out" if self.project_in is not None or self.project_out is not None else ""))


def _qualified(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _block(model_name: str, index: int, name: str, block: nn.Module, post_ln: bool) -> Block:
    kind = type(block).__name__
    children = list(block.named_children())
    norms = [m for _, m in children if _is_norm(m)]
    if len(norms) != 2:
        raise ModelNotUnderstood(
            f"{model_name}: block {kind} has {len(norms)} norm modules as direct children "
            f"({', '.join(n for n, m in children if _is_norm(m)) or 'none'}); expected two (before attention and "
            "before the MLP): the residual stream r(l) cannot be located")
    attn = [(n, m) for n, m in children
            if ("attn" in n.lower() or "attention" in n.lower()) and any(isinstance(x, nn.Linear) for x in m.modules())]
    if len(attn) != 1:
        raise ModelNotUnderstood(f"{model_name}: block {kind} has no attention child holding nn.Linear layers "
                                 f"(children: {', '.join(n for n, _ in children)}; found {len(attn)})")
    attn_name, attn_mod = attn[0]
    attn_linears = tuple((f"{name}.{attn_name}.{n}", m) for n, m in attn_mod.named_modules() if isinstance(m, nn.Linear))
    attn_ids = {id(m) for _, m in attn_linears}
    mlp_linears = [(f"{name}.{n}", m) for n, m in block.named_modules() if isinstance(m, nn.Linear) and id(m) not in attn_ids]
    if not mlp_linears:
        raise ModelNotUnderstood(f"{model_name}: block {kind} has no MLP linears outside its attention")
    mlp = tuple((q.rsplit(".", 1)[-1], m) for q, m in mlp_linears)
    names = {id(m): q for q, m in (*attn_linears, *mlp_linears)}
    return Block(index, name, block, norms[0], norms[1], f"{name}.{attn_name}", attn_mod, attn_linears, mlp, post_ln, names)


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


def anatomy(model: nn.Module) -> Anatomy:
    """The anatomy of ``model`` (see the module doc), or :class:`ModelNotUnderstood`."""
    what = type(model).__name__
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "") or what)
    blocks_name, blocks = find_decoder_blocks(model)
    post_ln = bool(POST_LN.get(model_type, lambda c: getattr(c, "do_layer_norm_before", True) is False)(config))
    parts = tuple(_block(what, i, f"{blocks_name}.{i}", b, post_ln) for i, b in enumerate(blocks))
    parent = model.get_submodule(blocks_name.rsplit(".", 1)[0]) if "." in blocks_name else model
    final_norm: nn.Module | None = None
    found = [n for n in FINAL_NORM_NAMES if n in parent._modules or (hasattr(parent, n) and getattr(parent, n) is None)]
    if not found:
        raise ModelNotUnderstood(f"{what}: no final norm attribute ({', '.join(FINAL_NORM_NAMES)}) beside the blocks at {blocks_name}")
    final_norm = getattr(parent, found[0])  # None where the model has none (OPT-350m)
    if final_norm is not None and not _is_norm(final_norm):
        raise ModelNotUnderstood(f"{what}: {found[0]} beside the blocks is a {type(final_norm).__name__}, not a norm")
    head = model.get_output_embeddings()
    if head is None:
        raise ModelNotUnderstood(f"{what}: no LM head (get_output_embeddings() is None)")
    routes = {kv_route(b.attention) for b in parts}
    route = routes.pop() if len(routes) == 1 else None  # None: KV-cache settings fail (quantlens.quantize.kv)
    return Anatomy(model_type, blocks_name, blocks, parts, model.get_input_embeddings(), getattr(parent, "project_in", None),
                   final_norm, getattr(parent, "project_out", None), head, post_ln, route)


def check_config(config: Any) -> Anatomy:
    """Build the model of ``config`` on the meta device (no memory, no weights) and return its
    anatomy, or raise :class:`ModelNotUnderstood`: what preflight calls before any evaluation."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as err:
        raise ModelNotUnderstood(f"{getattr(config, 'model_type', '?')}: not a causal LM transformers can build ({err})") from None
    return anatomy(model)
