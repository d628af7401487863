"""Activation quantization inside an MoE's experts: each expert's inputs are the tokens routed to it.

A dense MLP's linears see every token; an expert sees the tokens the router sent it, so "A8" on an
MoE quantizes, per expert, (1) the routed tokens entering its first projection and (2) its
intermediate activation entering ``down_proj``. Two routes, one meaning:

- **row-wise specs** (per token, per group of a token — every activation spec but ``tensor``, and
  perturbations matched per token): a token's quantization does not depend on the other tokens an
  expert sees, so it is applied where the model's own experts implementation (transformers'
  ``ALL_EXPERTS_FUNCTIONS``: grouped_mm, batched_mm, eager) already has the rows — a pre-hook on
  the experts module (the token states, before they are gathered per expert) and a wrapper of the
  module's ``_apply_gate`` (or a hook on its ``act_fn``): the intermediate state of every routed
  token, just before ``down_proj``. The fast kernels stay.
- **per-tensor specs** and perturbations matched over a batch: the scale (or the noise's std)
  belongs to one expert's routed tokens, so the module's forward becomes quantlens' per-expert
  loop (:func:`per_expert_forward`, the eager algorithm of transformers over the declared layout),
  which quantizes each expert's rows as one tensor.

Experts modules that compute their gate inline, outside transformers' interface (those listed in
:data:`quantlens.model.anatomy.KNOWN_EXPERTS`: Llama-4's ``Llama4TextExperts``, where every token's
row reaches every expert, scaled by its router score, 0 where not routed; DBRX's ``DbrxExperts``,
its gate and up matrices tensors of their own), always run quantlens' loop (:func:`dense_forward`:
each expert over its non-zero rows; :func:`per_expert_forward`) when their inputs are quantized;
with no activation spec the model's own forward runs. Where gate and up are apart, both read the
expert's one input site (named by the gate tensor), quantized once, as a fused ``gate_up_proj``'s is.
Experts that apply each tensor by a child called with the routed rows already sorted by expert
(``grouped`` rows: JetMoe's MoE and its mixture of attention heads, whose output projection reads the
attention's output, not an MLP's) keep their own forward: a pre-hook on each child splits its rows
expert by expert (:func:`grouped_inputs`). An MoE's identity experts (LongCat-Flash's zero experts:
:data:`quantlens.model.anatomy.IDENTITY_EXPERTS`) hold no weight and add their input back: nothing
to quantize; the slots routed to them reach the experts module as a real expert's index with weight
0, which the kernels compute and discard and the per-expert loop skips.

Both are removed by the handles :func:`attach` returns; the weights are not touched here
(:mod:`quantlens.quantize.patch` quantizes expert tensors once, slice by slice).
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from quantlens.model.anatomy import Experts

Transform = Callable[[str, torch.Tensor], torch.Tensor]  # (site name, rows) → quantized rows


class _Handle:
    def __init__(self, undo: Callable[[], None]):
        self._undo = undo

    def remove(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None


def needs_per_expert(setting: Any) -> bool:
    """A per-tensor activation spec, or activation noise matched over a batch: the statistic is one
    expert's routed tokens, so the per-expert loop runs."""
    a = setting.activations
    if a is None:
        return False
    batch_noise = setting.perturbs_activations() and setting.perturbation.match == "batch"
    return a.granularity == "tensor" or batch_noise


def attach(target: Any, transform: Transform, bypass: set[str], per_expert: bool) -> list[_Handle]:
    """Quantize the inputs of one expert tensor (``target``: a :class:`quantlens.quantize.patch.Target`
    of kind ``experts``): its first projection's (``gate_up_proj`` / ``up_proj``) or ``down_proj``'s."""
    e: Experts = target.experts
    mod = e.module
    name = target.name
    if e.grouped:
        return [grouped_inputs(e, (target.attr,), transform, bypass, per_expert)]
    if per_expert or not uses_kernel(e):
        if target.attr != e.first:
            return []  # the loop quantizes both inputs: installed once, with the first tensor
        return [run_per_expert(e, transform, bypass)]
    if target.attr == e.first:
        def pre(module: nn.Module, args: tuple) -> tuple | None:
            if name in bypass:
                return None
            return (transform(name, args[0]), *args[1:])

        return [mod.register_forward_pre_hook(pre)]
    if e.has_gate:
        inner = mod._apply_gate  # the class's (or gpt-oss's own) gating, bound

        def gate(x: torch.Tensor) -> torch.Tensor:
            out = inner(x)
            return out if name in bypass else transform(name, out)

        mod._apply_gate = gate
        return [_Handle(lambda: mod.__dict__.pop("_apply_gate", None))]

    def act(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        return None if name in bypass else transform(name, out)

    return [mod.act_fn.register_forward_hook(act)]


def uses_kernel(e: Experts) -> bool:
    """The module runs transformers' experts interface, whose rows the hooks reach (a gated one
    through ``_apply_gate``); one that computes its gate inline (Llama-4's) runs quantlens' loop."""
    return not e.dense and (not e.has_gate or hasattr(e.module, "_apply_gate"))


def run_per_expert(e: Experts, transform: Transform, bypass: set[str],
                   record: Callable[[int, str, torch.Tensor], None] | None = None) -> _Handle:
    """Make the experts module run :func:`per_expert_forward` (:func:`dense_forward` for experts
    that take every token's row) until the handle is removed; grouped experts (JetMoe's) already
    apply each expert to its own rows: their inputs are split expert by expert (:func:`grouped_inputs`)."""
    if e.grouped:
        return grouped_inputs(e, e.params, transform, bypass, True, record)
    mod = e.module
    names = (e.qualified(e.first), e.qualified(e.down))
    if e.dense:
        mod.forward = types.MethodType(lambda self, rows: dense_forward(e, rows, transform, names, bypass, record), mod)
    else:
        mod.forward = types.MethodType(lambda self, h, idx, w: per_expert_forward(e, h, idx, w, transform, names, bypass, record), mod)
    return _Handle(lambda: mod.__dict__.pop("forward", None))


def grouped_inputs(e: Experts, attrs: tuple[str, ...], transform: Transform, bypass: set[str], per_expert: bool,
                   record: Callable[[int, str, torch.Tensor], None] | None = None) -> _Handle:
    """Quantize the inputs of the grouped experts' tensors ``attrs`` where the model applies them:
    each tensor's child (JetMoe's ParallelExperts) is called with the routed rows sorted by expert and
    the count of each, so a pre-hook on it has each expert's rows — the routed tokens at the first
    projection (the MoA's queries too), the gated state at the MoE's output_linear, the attention's
    output at the MoA's. Expert by expert where a statistic is one expert's (``per_expert``) or
    ``record`` sees each expert's input (GPTQ's Hessians); else all rows at once (a row-wise spec
    quantizes each row alike either way)."""
    handles = [e.owner.get_submodule(a.rsplit(".", 1)[0]).register_forward_pre_hook(
        _grouped_hook(e.qualified(a), e.input_of(a), transform, bypass, per_expert, record)) for a in attrs]
    return _Handle(lambda: [h.remove() for h in handles])


def _grouped_hook(name: str, attr: str, transform: Transform, bypass: set[str], per_expert: bool,
                  record: Callable[[int, str, torch.Tensor], None] | None) -> Callable:
    """The pre-hook of one grouped tensor's child, ``forward(rows, counts)``: ``rows`` through ``transform``
    under ``name`` (each expert's block of them on its own where asked), ``record(j, attr, rowsⱼ)``."""
    def pre(module: nn.Module, args: tuple) -> tuple | None:
        rows, counts = args[0], args[1]
        if record is None and (name in bypass or not per_expert):
            return None if name in bypass else (transform(name, rows), *args[1:])
        out = []
        for j, x in enumerate(rows.split(list(counts), 0)):
            if len(x) and name not in bypass:
                x = transform(name, x)
            if len(x) and record is not None:
                record(j, attr, x)
            out.append(x)
        return (torch.cat(out, 0), *args[1:])

    return pre


def _gate(e: Experts, ys: list[torch.Tensor]) -> torch.Tensor:
    """act(gate) · up from the first projection's outputs (one per tensor of :attr:`Experts.firsts`):
    gate and up apart (DBRX's w1, v1), or one fused output — the module's own ``_apply_gate`` where it
    has one, else the concatenated halves [gate; up] (Llama-4's layout in :data:`KNOWN_EXPERTS`)."""
    if len(ys) == 2:
        return getattr(e.owner, e.act)(ys[0]) * ys[1]
    if hasattr(e.module, "_apply_gate"):
        return e.module._apply_gate(ys[0])
    gate, up = ys[0].chunk(2, dim=-1)
    return up * getattr(e.owner, e.act)(gate)


def _expert(e: Experts, j: int, x: torch.Tensor, transform: Transform, names: tuple[str, str], bypass: set[str],
            record: Callable[[int, str, torch.Tensor], None] | None) -> torch.Tensor:
    """Expert ``j`` on its routed rows ``x``, both inputs through ``transform`` (biases, gate, post-norm as declared);
    ``record`` sees the first input once, under the first tensor's name (gate and up apart read it both)."""
    m = e.module
    first_in, down_in = names
    if first_in not in bypass:
        x = transform(first_in, x)
    if record is not None:
        record(j, e.first, x)
    ys = [_project(x, e.stored(a, j), _bias(e, a, j), e.stored_transposed(a)) for a in e.firsts]
    y = _gate(e, ys) if e.has_gate else getattr(e.owner, e.act)(ys[0])
    if down_in not in bypass:
        y = transform(down_in, y)
    if record is not None:
        record(j, e.down, y)
    y = _project(y, e.stored(e.down, j), _bias(e, e.down, j), e.stored_transposed(e.down))
    if getattr(m, "has_post_expert_norm", False):
        y = m.post_expert_norm(y)
    return y


def _bias(e: Experts, attr: str, j: int) -> torch.Tensor | None:
    """Expert ``j``'s bias of tensor ``attr`` (``<attr>_bias`` [experts, out]), None where unbiased."""
    b = getattr(e.owner, f"{attr}_bias", None) if e.has_bias else None
    return None if b is None else b[j]


def dense_forward(e: Experts, rows: torch.Tensor, transform: Transform, names: tuple[str, str], bypass: set[str],
                  record: Callable[[int, str, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Llama-4's experts forward (``rows``: [experts·tokens, hidden], each token's row scaled by its
    router score, 0 where the token is not routed), one expert at a time over the rows routed to it
    (the non-zero ones: a row the router did not send gives 0, as in the model's bmm)."""
    x = rows.view(e.num_experts, -1, rows.shape[-1])
    out = torch.zeros_like(x)
    for j in range(e.num_experts):
        routed = x[j].ne(0).any(-1).nonzero().squeeze(-1)
        if len(routed):
            out[j, routed] = _expert(e, j, x[j, routed], transform, names, bypass, record).to(out.dtype)
    return out.view(-1, rows.shape[-1])


def _project(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x @ Wᵀ for one expert's stored matrix ([out, in], or [in, out] when transposed)."""
    y = x @ w if transposed else F.linear(x, w)
    return y if bias is None else y + bias


def per_expert_forward(e: Experts, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                       transform: Transform, names: tuple[str, str], bypass: set[str],
                       record: Callable[[int, str, torch.Tensor], None] | None = None) -> torch.Tensor:
    """The experts' forward, one expert at a time over the tokens routed to it, with each expert's
    two inputs passed through ``transform`` as one tensor (transformers' eager algorithm, read from
    the declared layout: gated or not, concatenated or interleaved, transposed, biased). ``record(j,
    tensor name, input)`` sees each expert's two inputs (GPTQ's per-expert Hessians). ``hidden`` may
    keep its batch dimensions (DBRX's experts get [batch, tokens, hidden]): the result has its shape.
    A slot of weight 0 adds nothing and routes no token (LongCat's identity experts reach the experts
    module so, as a real expert's index): no expert runs it, nor do its statistics see it."""
    shape = hidden.shape
    hidden = hidden.reshape(-1, shape[-1])
    out = torch.zeros_like(hidden)
    k = top_k_index.shape[-1]
    flat = torch.where(top_k_weights.reshape(-1) != 0, top_k_index.reshape(-1), e.num_experts)  # (sorted past the last expert)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=e.num_experts).tolist()
    tokens = order // k
    weights = top_k_weights.reshape(-1)[order]
    start = 0
    for j, n in enumerate(counts[: e.num_experts]):
        if n == 0:
            continue
        rows = tokens[start:start + n]
        y = _expert(e, j, hidden[rows], transform, names, bypass, record)
        out.index_add_(0, rows, (y * weights[start:start + n, None]).to(out.dtype))
        start += n
    return out.view(shape)
