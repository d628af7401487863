"""KV-cache fake quantization: keys and values as a cache would hold them, per head.

What is quantized is the attention's K and V in the ``[batch, heads, tokens, head_dim]`` layout in
which the cache stores them: keys *after* the rotary embedding where the model applies one
(LLaMA, Qwen2, Mistral), values as stored, before any grouped-query repetition (JetMoe tiles its K/V
heads top_k times before the interface: one copy is quantized, then tiled, :data:`quantlens.model.anatomy.KV_TILED`). Two routes:

- models whose attention calls transformers' pluggable attention interface
  (``ALL_ATTENTION_FUNCTIONS``: OPT, LLaMA and most current models) — the registered functions
  (sdpa, flash…, and eager) are wrapped once per process; the wrapper acts only on attention
  modules that carry a KV state (so unpatched models, or other models in the process, are
  untouched) and passes K/V through :func:`quantize_kv` before the original function;
- BLOOM, which computes its own attention (fused ``query_key_value``, ALiBi): its ``_reshape``
  (fused QKV → query, key, value per head) is wrapped on each attention module.

Any other attention raises :class:`AttentionNotUnderstood` before a weight changes. A hybrid's
linear-attention blocks (Qwen3-Next's gated DeltaNet) cache no K/V: only its attention blocks are reached.
Perturbations with ``target: kv`` replace the error by noise of the same std **per token and
head** (each row of head_dim), so the magnitude never depends on what else is in the batch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from quantlens.model.anatomy import Anatomy, ModelNotUnderstood, anatomy, kv_copies
from quantlens.quantize.perturb import make_generator, shaped_noise_rows
from quantlens.quantize.quant import fake_quantize
from quantlens.quantize.spec import KVSpec, PerturbSpec

_STATE = "_quantlens_kv"
_WRAPPED = "_quantlens_kv_wrapped"


class AttentionNotUnderstood(ModelNotUnderstood):
    """The model's attention is neither on transformers' attention interface nor BLOOM's."""


def quantize_kv(x: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    """Fake-quantize a K or V tensor ``[batch, heads, tokens, head_dim]`` under ``spec``."""
    row = spec.row_spec()
    if spec.granularity == "token":
        return fake_quantize(x, row)
    if spec.granularity == "head":
        b, h, t, d = x.shape
        return fake_quantize(x.reshape(b, h, 1, t * d), row).reshape(b, h, t, d)
    return fake_quantize(x.transpose(-1, -2), row).transpose(-1, -2)  # channel: over the tokens


@dataclass
class KVState:
    """Per attention module: the spec, optional perturbation, and Δ statistics of K and V."""

    name: str
    spec: KVSpec
    perturbation: PerturbSpec | None
    stats_forwards: int
    enabled: bool = True
    seen: int = 0
    acc: dict[str, list[float]] = field(default_factory=dict)  # "key"/"value" → [Σ Δ², Σ x², numel, n_rows, Σ α]
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    copies: int = 1  # K/V reach the interface tiled this many times along the heads (anatomy.KV_TILED: JetMoe's)

    def apply(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as the cache would hold them: a tiled attention's one copy quantized (and
        perturbed) once, then tiled again, so every copy carries the same error, as a cache's would."""
        if not self.enabled:
            return key, value
        record = self.seen < self.stats_forwards
        self.seen += 1
        if self.copies > 1:
            heads = key.shape[1] // self.copies
            return (self._one("key", key[:, :heads], record).repeat(1, self.copies, 1, 1),
                    self._one("value", value[:, :heads], record).repeat(1, self.copies, 1, 1))
        return self._one("key", key, record), self._one("value", value, record)

    def _one(self, which: str, x: torch.Tensor, record: bool) -> torch.Tensor:
        xq = quantize_kv(x, self.spec)
        if self.perturbation is not None:
            gen = self.generators.get(which)
            if gen is None:
                gen = self.generators[which] = make_generator(self.perturbation.seed, f"{self.name}:{which}")
            delta_std = (xq.float() - x.float()).std(-1, unbiased=False, keepdim=True)  # per token and head
            xq = (x.float() + shaped_noise_rows(x, delta_std, self.perturbation, gen)).to(x.dtype)
        if record:
            xf = x.detach().float()
            d2 = float((xq.float() - xf).square().sum())
            acc = self.acc.setdefault(which, [0.0, 0.0, 0.0, 0.0, 0.0])
            acc[0] += d2
            acc[1] += float(xf.square().sum())
            acc[2] += float(xf.numel())
            rows = xf.reshape(-1, xf.shape[-1])
            acc[3] += float(rows.shape[0])
            acc[4] += float(rows.abs().amax(-1).sum())
        return xq


# --- route 1: transformers' attention interface ------------------------------------------------------
def _wrap(fn: Callable) -> Callable:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kw: Any) -> Any:
        state: KVState | None = getattr(module, _STATE, None)
        if state is not None:
            key, value = state.apply(key, value)
        return fn(module, query, key, value, *args, **kw)

    setattr(attention, _WRAPPED, fn)
    return attention


def _eager_for(module: nn.Module) -> Callable | None:
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _install_interface_wrappers() -> None:
    """Wrap every registered attention function once (idempotent)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name in list(ALL_ATTENTION_FUNCTIONS.keys()):
        fn = ALL_ATTENTION_FUNCTIONS[name]
        if not hasattr(fn, _WRAPPED):
            ALL_ATTENTION_FUNCTIONS[name] = _wrap(fn)


def _eager_dispatch(module: nn.Module, *args: Any, **kw: Any) -> Any:
    return _wrap(_eager_for(module))(module, *args, **kw)


# --- route 2: BLOOM ------------------------------------------------------------------------------------
def _wrap_bloom(module: nn.Module) -> None:
    original = module._reshape

    def reshape(fused_qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = original(fused_qkv)
        state: KVState | None = getattr(module, _STATE, None)
        if state is not None:
            k, v = state.apply(k, v)
        return q, k, v

    module._reshape = reshape  # instance attribute: shadows the method, removed by detach


# --- attach / detach -------------------------------------------------------------------------------------
def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention module of each decoder block that caches K/V (qualified name, module), from the
    model's anatomy: a hybrid's linear-attention blocks keep none."""
    return [(b.attention_name, b.attention) for b in anatomy(model).kv_parts()]


def check_supported(model: nn.Module) -> Anatomy:
    """The model's anatomy, or :class:`AttentionNotUnderstood` when it found no K/V route."""
    body = anatomy(model)
    if body.kv_route is None:
        raise AttentionNotUnderstood(f"KV-cache settings cannot be applied: {body.kv_refusal}")
    return body


def attach(model: nn.Module, spec: KVSpec, perturbation: PerturbSpec | None = None, stats_forwards: int = 4) -> list[KVState]:
    """Quantize (or perturb) the KV cache of every attention block from the next forward on (a
    hybrid's linear-attention blocks have none)."""
    body = check_supported(model)
    bloom = body.kv_route == "bloom"
    _install_interface_wrappers()
    _ensure_eager(model)
    states = []
    for b in body.kv_parts():
        name, m = b.attention_name, b.attention
        st = KVState(name, spec, perturbation, stats_forwards, copies=kv_copies(m))
        setattr(m, _STATE, st)
        if bloom and "_reshape" not in m.__dict__:
            _wrap_bloom(m)
        states.append(st)
    return states


def _ensure_eager(model: nn.Module) -> None:
    """The eager path is the module's own function, not in the registry: register a dispatcher."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if getattr(model.config, "_attn_implementation", None) == "eager" and "eager" not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS["eager"] = _eager_dispatch


def detach(model: nn.Module) -> None:
    for _, m in attention_modules(model):
        if hasattr(m, _STATE):
            delattr(m, _STATE)
        if "_reshape" in m.__dict__:
            del m.__dict__["_reshape"]
