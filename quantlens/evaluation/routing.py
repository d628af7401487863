"""The lens on routing: what a setting does to an MoE's choice of experts, token by token.

An MoE block sends each token to its top-k experts. Quantization perturbs the router's input (and,
with ``include_routers``, its weights), so a token may be sent elsewhere — a change no dense model
has. Per MoE layer, over the same tokens as the reference run:

- **router flips**: the fraction of tokens whose top-k expert *set* differs from the reference's
  (order inside the set does not count; 0 for the reference against itself);
- **expert load**: the share of the layer's routed slots (tokens × k) each expert received.

The top-k indices are read where every transformers MoE hands them over: the second argument of its
experts module (``experts(hidden, top_k_index, top_k_weights)``), so any router (softmax top-k,
DeepSeek's grouped, gpt-oss') is seen the same way — but where the MoE also routes to identity
experts (LongCat-Flash's zero experts, which its experts module gets renumbered as real experts with
weight 0): there the router's own output is read, the identity experts counted as experts after the
real ones (:func:`quantlens.model.anatomy.chosen_slots`). A token's set is kept as one 64-bit key (the
sum of fixed random 63-bit keys of its experts, wrapping): ``[examples, tokens, layers]`` int64 for
the reference, compared exactly in the other runs (a collision has probability ≈ 2⁻⁶³ per pair).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import nn

from quantlens.model.anatomy import anatomy, chosen_slots

_KEY_SEED = 20250612


def expert_keys(num_experts: int, device: torch.device | str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(_KEY_SEED)
    return torch.randint(0, 2**62, (num_experts,), generator=g, dtype=torch.int64).to(device)


def set_keys(top_k_index: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One key per token for its set of experts: Σ keys[e] over the top-k (order-free)."""
    return keys.to(top_k_index.device)[top_k_index.long()].sum(-1)


class RoutingRecorder:
    """Context manager: hooks every MoE block's experts module during an evaluation.

    ``reference``: the reference run's set keys ``[n, T, layers]`` (then flips are counted), or None
    (then the keys are kept: :attr:`sets`). Expert loads are always counted."""

    def __init__(self, model: nn.Module, n_examples: int, n_tokens: int, reference: torch.Tensor | None = None):
        body = anatomy(model)
        self.layers = [b.index for b in body.parts if b.is_moe]
        self.modules = [b.experts[0].module for b in body.parts if b.is_moe]
        # an experts module not told the top-k (Llama-4's gets every token's row; JetMoe's routes itself): its router says
        self.routers = [b.routers[0][1] if not b.experts[0].takes_top_k and b.routers else None for b in body.parts if b.is_moe]
        self.top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", 1) or 1
        # identity experts (LongCat's zero experts) are routed to like any: numbered after the experts, read from the router
        self.num_experts = [b.experts[0].num_experts + b.identity_experts for b in body.parts if b.is_moe]
        self.chosen = [chosen_slots(b.mlp_module) for b in body.parts if b.is_moe]
        self.n, self.t = n_examples, n_tokens
        if reference is not None and tuple(reference.shape) != (n_examples, n_tokens, len(self.layers)):
            raise ValueError(f"routing reference: keys of shape {tuple(reference.shape)}, not of these "
                             f"{n_examples} × {n_tokens} tokens × {len(self.layers)} MoE layers")
        self.reference = reference
        self.sets = torch.zeros(n_examples, n_tokens, len(self.layers), dtype=torch.int64) if reference is None else None
        self.flips = torch.zeros(n_examples, len(self.layers), dtype=torch.float64)
        self.load = [torch.zeros(e, dtype=torch.float64) for e in self.num_experts]
        self._index: torch.Tensor | None = None
        self._handles: list[Any] = []

    @property
    def active(self) -> bool:
        return bool(self.layers)

    def begin_batch(self, index: torch.Tensor) -> None:
        self._index = index

    def __enter__(self) -> "RoutingRecorder":
        for j, mod in enumerate(self.modules):
            keys = expert_keys(self.num_experts[j])
            router, chosen = self.routers[j], self.chosen[j]
            if chosen is not None:  # the slots as the router returns them (its experts module gets identity slots renumbered)
                self._handles.append(chosen[0].register_forward_hook(
                    lambda module, args, out, j=j, keys=keys, at=chosen[1]: self._record(j, out[at], keys)))
            elif router is None:  # forward(hidden, top_k_index, top_k_weights)
                self._handles.append(mod.register_forward_pre_hook(
                    lambda module, args, j=j, keys=keys: self._record(j, args[1], keys)))
            else:  # the router's logits ([tokens, experts], its second output where it returns scores too)
                k = getattr(router, "top_k", None) or self.top_k
                self._handles.append(router.register_forward_hook(
                    lambda module, args, out, j=j, keys=keys, k=k: self._record(
                        j, (out[1] if isinstance(out, tuple) else out).topk(k, dim=-1).indices, keys)))
        return self

    def _record(self, j: int, idx: torch.Tensor, keys: torch.Tensor) -> None:
        """One MoE layer's chosen experts for this batch's tokens: their load, and each token's set (or its flips)."""
        b = len(self._index)
        k = idx.shape[-1]
        self.load[j] += torch.bincount(idx.reshape(-1).long(), minlength=self.num_experts[j])[: self.num_experts[j]].double().cpu()
        got = set_keys(idx.reshape(b, -1, k), keys).cpu()
        if self.reference is None:
            self.sets[self._index, :, j] = got
        else:
            self.flips[self._index, j] = (got != self.reference[self._index, :, j]).double().sum(-1)

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def example_flips(self) -> torch.Tensor:
        """Per example: the fraction of its tokens whose expert set changed, averaged over MoE layers."""
        return (self.flips / self.t).mean(-1)

    def table(self) -> pd.DataFrame:
        """One row per (MoE layer, expert): ``load`` (share of the layer's routed slots) and the layer's
        ``flips`` (fraction of tokens whose set changed; NaN without a reference)."""
        rows = []
        for j, layer in enumerate(self.layers):
            total = float(self.load[j].sum())
            flips = float(self.flips[:, j].sum()) / (self.n * self.t) if self.reference is not None else float("nan")
            for e in range(self.num_experts[j]):
                rows.append({"layer": layer, "expert": e, "load": float(self.load[j][e]) / total if total else 0.0, "flips": flips})
        return pd.DataFrame(rows, columns=["layer", "expert", "load", "flips"])


def expert_deltas(model: nn.Module, layer_stats: list[Any]) -> pd.DataFrame:
    """‖Δ‖₂ of each expert's weights (its tensors together) per MoE layer, from a patch report's
    per-expert rows (``<experts>.<tensor>.<e>``, :func:`quantlens.quantize.patch.quantize_`)."""
    rows = []
    for b in anatomy(model).parts:
        for e in b.experts:
            d2 = [0.0] * e.num_experts
            seen = False
            for s in layer_stats:
                if s.kind == "weight" and s.layer.startswith(e.name + "."):
                    idx = s.layer.rsplit(".", 1)[-1]
                    if idx.isdigit():
                        d2[int(idx)] += s.delta_l2 ** 2
                        seen = True
            if seen:
                rows += [{"layer": b.index, "expert": j, "delta_l2": v ** 0.5} for j, v in enumerate(d2)]
    return pd.DataFrame(rows, columns=["layer", "expert", "delta_l2"])
