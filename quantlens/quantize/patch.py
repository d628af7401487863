"""Apply a :class:`~quantlens.quantize.settings.Setting` to a Hugging Face causal LM, and undo it.

``quantize_(model, setting)`` (in the spirit of torchao's entry point) rewrites the weights of every
``nn.Linear`` inside the decoder blocks **once** (fake-quantized or perturbed), and registers a
forward pre-hook that quantizes/perturbs their *inputs* at every forward when the setting has an
activation spec. The original weight tensors are kept (on CPU when the model is on an accelerator),
or, with ``keep_originals_on="checkpoint"``, not kept at all and read back from the model's
safetensors; either way ``restore_(model)`` puts them back bit-exactly and one loaded model serves
a whole sweep.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from quantlens.model import streaming
from quantlens.model.anatomy import Experts, ModelNotUnderstood, anatomy, first_names, in_features, is_conv1d, shape_of, state_key
from quantlens.model.checkpoint import model_checkpoint
from quantlens.quantize import moe
from quantlens.quantize import kv, lens
from quantlens.quantize.mixtures import MIXTURES, block_roles
from quantlens.quantize.perturb import make_generator, perturb, shaped_noise, shaped_noise_rows
from quantlens.quantize.quant import fake_quantize, quantize, state_spec
from quantlens.quantize.settings import ConfigError, Setting, resolve_setting
from quantlens.quantize.spec import QuantSpec

_STATE_ATTR = "_quantlens_patch"


@dataclass
class LayerStats:
    """What quantizing one tensor did: the paper's perturbation intensity and scale."""

    layer: str
    kind: str  # "weight" or "activation"
    numel: int
    delta_l2: float  # ‖Δ‖₂ (activations: root of the summed squares over all forwards)
    rel_error: float  # ‖Δ‖₂ / ‖x‖₂
    alpha_mean: float  # mean range α over groups, in the quantizer's domain (after f for non-uniform); nan for noise
    alpha_max: float
    clipped_fraction: float
    format: str = ""  # weights: the format the tensor is stored in (a llama.cpp k-quant's fallback type where it took one)
    bits_per_weight: float = float("nan")  # weights: its stored bits per weight


@dataclass
class PatchReport:
    setting: str
    layers: list[LayerStats] = field(default_factory=list)
    # kind → summed [2, buckets] of quantlens.quantize.lens.magnitude_buckets over its tensors
    lens: dict[str, torch.Tensor] = field(default_factory=dict)
    coverage: dict[str, float] = field(default_factory=dict)  # coverage_targeted, coverage_block (_Coverage)

    def add_lens(self, kind: str, x: torch.Tensor, xq: torch.Tensor) -> None:
        b = lens.magnitude_buckets(x, xq)
        self.lens[kind] = self.lens[kind] + b if kind in self.lens else b

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.layers]

    def summary(self) -> dict[str, float]:
        """Aggregates per kind: mean ‖Δ‖₂, mean relative error, clipped fraction (element-weighted)."""
        out: dict[str, float] = {}
        for kind in ("weight", "activation", "key", "value"):
            rows = [s for s in self.layers if s.kind == kind]
            if not rows:
                continue
            n = sum(s.numel for s in rows)
            out[f"{kind}_delta_l2_mean"] = sum(s.delta_l2 for s in rows) / len(rows)
            out[f"{kind}_rel_error_mean"] = sum(s.rel_error for s in rows) / len(rows)
            out[f"{kind}_clipped_fraction"] = sum(s.clipped_fraction * s.numel for s in rows) / max(n, 1)
        stored = [s for s in self.layers if s.kind == "weight" and s.bits_per_weight == s.bits_per_weight]
        if stored:  # what the quantized weights take: a mixture's or a fallback's real bits, not the name's
            out["weight_bits_per_weight"] = sum(s.bits_per_weight * s.numel for s in stored) / sum(s.numel for s in stored)
        out.update(self.coverage)
        for kind, acc in self.lens.items():  # the lens: mean |Δ|/|x| by decile of |x| (d01 = smallest values)
            for i, v in enumerate(lens.bucket_means(acc), 1):
                out[f"{kind}_lens_d{i:02d}"] = v
        return out


# --- Which weights --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One weight a setting rewrites: a linear-like layer's (``nn.Linear``, GPT-2's transposed
    ``Conv1D``, a router), one fused expert tensor (every expert's slice of it), an embedding, or a
    token mixer's state matrix (``include_mixer_states``: ``attr`` names it on its module)."""

    name: str  # qualified name: a module's, or ``<experts>.<tensor>`` for an expert tensor
    module: nn.Module
    kind: str  # "linear" | "router" | "experts" | "embedding" | "state" (a token mixer's state matrix: include_mixer_states)
    experts: Experts | None = None
    attr: str = "weight"
    spec: QuantSpec | None = None  # its own weights spec (a llama.cpp mixture's type for it; a state's row-long group); None: the setting's
    site: nn.Module | None = None  # the module called with its input where the module itself never is (LongCat's router, Block.router_input)

    @property
    def param(self) -> nn.Parameter:
        return self.experts.tensor(self.attr) if self.experts is not None else getattr(self.module, self.attr)

    @property
    def in_features(self) -> int:
        """Its rows' length: a linear's input features (a state matrix's last dimension: a conv kernel's taps)."""
        if self.kind == "state":
            return int(shape_of(self.param)[-1])
        return self.experts.in_features(self.attr) if self.experts is not None else in_features(self.module)

    @property
    def param_name(self) -> str:
        """Its parameter's qualified name (in the model and its checkpoint)."""
        return self.name if self.kind == "experts" or self.attr != "weight" else f"{self.name}.weight"


def targets(model: nn.Module, setting: Setting) -> list[Target]:
    """What ``setting`` acts on, from the model's anatomy: every attention and MLP linear of the
    decoder blocks (shared experts included), every expert tensor, the routers if
    ``include_routers``, the mixers' state matrices if ``include_mixer_states``, the LM head if
    ``include_lm_head`` (embeddings: :func:`quantize_`). A weight several blocks hold (Zamba2's
    shared transformer) is a target under each block's name, rewritten once."""
    body = anatomy(model)
    out = [Target(n, m, "linear") for n, m in body.block_linears()]
    out += [Target(e.qualified(a), e.owner, "experts", e, a) for e in body.experts() for a in e.params]
    if setting.include_routers:
        out += [Target(n, m, "router", site=b.router_input(m)) for b in body.parts for n, m in b.all_routers]
    if setting.include_mixer_states and setting.weights is not None:
        out += [_state_target(model, n, setting.weights) for n, _ in body.state_matrices()]
    if setting.include_lm_head:
        out.append(Target(_qualified_name(model, body.lm_head), body.lm_head, "linear"))
    if not out:
        raise ModelNotUnderstood(f"{type(model).__name__}: no linear layers or experts inside the decoder blocks {body.blocks_name!r}")
    if setting.weights is not None and setting.weights.mixture is not None:
        return _mixed(model, body, setting.weights, out)
    return out


def _state_target(model: nn.Module, name: str, spec: QuantSpec) -> Target:
    """A token mixer's state matrix (``…conv1d.weight`` [channels, 1, taps], Mamba-1's ``A_log``) as
    a target: its rows along its last dimension, a group longer than a row that row (a conv kernel's
    4 taps under one scale; llama.cpp's fixed blocks are refused by the group check instead)."""
    owner, attr = name.rsplit(".", 1)
    module = model.get_submodule(owner)
    own = state_spec(spec, int(shape_of(getattr(module, attr))[-1]))
    return Target(state_key(name), module, "state", attr=attr, spec=own if own is not spec else None)


def _mixed(model: nn.Module, body: Any, spec: QuantSpec, out: list[Target]) -> list[Target]:
    """Each target with the type llama.cpp's mixture gives it (:mod:`quantlens.quantize.mixtures`)."""
    mix = MIXTURES[spec.mixture]
    roles = {_qualified_name(model, body.lm_head): ("output", 0)}
    cfg = getattr(model, "config", None)
    big_gqa = len(body.parts) == 80 and getattr(cfg, "num_key_value_heads", None) not in (None, getattr(cfg, "num_attention_heads", None))
    for b in body.parts:
        linears = b.linears()
        attention = {id(m) for _, m in b.attention_linears}
        block = block_roles([n for n, m in linears if id(m) in attention], b.names.get(id(b.attention_out), ""),
                            [n for n, m in linears if id(m) not in attention], [e.qualified(e.params[-1]) for e in b.experts])
        roles.update({n: (r, b.index) for n, r in block.items()})
    return [replace(t, spec=spec.of_type(mix.type_of(*roles.get(t.name, ("other", 0)), len(body.parts), big_gqa))) for t in out]


def target_linears(model: nn.Module, setting: Setting) -> list[tuple[str, nn.Module]]:
    """The linear-like targets (qualified name, module): every target but the expert tensors and state matrices."""
    return [(t.name, t.module) for t in targets(model, setting) if t.kind not in ("experts", "state")]


def _qualified_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _check_compatible(layers: list[Target], setting: Setting) -> None:
    """Fail before any weight changes when a group size does not divide a layer's input dim."""
    for kind, spec in (("weights", setting.weights), ("activations", setting.activations)):
        if spec is None or spec.granularity != "group" or (kind == "weights" and setting.checkpoint is not None):
            continue  # (a checkpoint's weights spec describes it: its own blocks were checked against the model when read)
        from quantlens.model.shape import group_misfit

        rows = ((t.name, t.in_features) for t in layers if t.kind != "state")  # (a state's group always tiles its row: state_spec)
        misfit = group_misfit(lambda n: spec.for_row(n).group_size, rows)
        if misfit is not None:
            name, n_in = misfit
            raise ConfigError(
                f"invalid setting {setting.name!r}: {kind}.group_size: {spec.for_row(n_in).group_size} does not divide "
                f"in_features={n_in} of layer {name!r}"
            )


# --- Activation hook --------------------------------------------------------------------------
class _ActivationState:
    """Per-patch state shared by the input hooks of all layers.

    q/k/v projections receive the *same* input tensor object: the memo quantizes it once.
    """

    def __init__(self, setting: Setting, stats_forwards: int):
        self.setting = setting
        self.stats_forwards = stats_forwards  # statistics are sampled over this many forwards a layer
        self.stats_seen: dict[str, int] = {}
        self.last_in: torch.Tensor | None = None
        self.last_version = -1
        self.last_out: torch.Tensor | None = None
        self.acc: dict[str, list[torch.Tensor]] = {}  # layer -> [Σ Δ², Σ x², n_clipped, Σ α, n_rows, numel]
        self.bypass: set[str] = set()  # layers temporarily at full precision (see full_precision)
        self.valid: torch.Tensor | None = None  # [batch, tokens] mask of the current forward (padding = 0)
        self.lens: torch.Tensor | None = None  # summed lens.magnitude_buckets of the sampled forwards

    def transform(self, name: str, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        version = _version(x)
        if x is self.last_in and version == self.last_version:
            return self.last_out
        spec = self.setting.activations
        xq = fake_quantize(x, spec)
        valid = self.valid_rows(x)
        if self.setting.perturbs_activations():
            p = self.setting.perturbation
            delta = xq.to(torch.float32) - x.to(torch.float32)
            if p.match == "token":  # per row: the same for a token whatever the batch around it
                xq = (x.to(torch.float32) + shaped_noise_rows(x, delta.std(-1, unbiased=False, keepdim=True), p, gen)).to(x.dtype)
            else:  # over the real tokens of this batch
                rows = valid if valid is not None else torch.ones(x.numel() // x.shape[-1], dtype=torch.bool, device=x.device)
                target = delta.reshape(-1, x.shape[-1])[rows].std(unbiased=False)
                xq = (x.to(torch.float32) + shaped_noise_rows(x, target, p, gen, valid=rows)).to(x.dtype)
        seen = self.stats_seen.get(name, 0)
        if seen < self.stats_forwards:
            self.stats_seen[name] = seen + 1
            self._accumulate(name, x, xq, valid)
        self.last_in, self.last_version, self.last_out = x, version, xq
        return xq

    def valid_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """Which rows (tokens) of ``x`` are real, from the evaluator's attention mask; None = all."""
        if self.valid is None:
            return None
        rows = self.valid.reshape(-1).to(x.device, torch.bool)
        return rows if rows.numel() * x.shape[-1] == x.numel() else None

    def _accumulate(self, name: str, x: torch.Tensor, xq: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        if valid is not None:  # statistics over the real tokens only
            x, xq = x.reshape(-1, x.shape[-1])[valid], xq.reshape(-1, xq.shape[-1])[valid]
        xf = x.detach().to(torch.float32)
        d2 = (xq.to(torch.float32) - xf).square().sum()
        x2 = xf.square().sum()
        spec = self.setting.activations
        alpha = xf.abs().amax(dim=-1)  # per token; clipping rows are rare, stats ignore clip_k here
        clipped = torch.zeros((), device=x.device)
        if spec.clip_k is not None:
            thr = spec.clip_k * xf.std(dim=-1, keepdim=True, unbiased=False)
            clipped = (xf.abs() > thr).sum().to(torch.float32)
            alpha = torch.minimum(alpha, thr.squeeze(-1))
        b = lens.magnitude_buckets(xf, xq, max_samples=lens.ACTIVATION_SAMPLES)
        self.lens = b if self.lens is None else self.lens + b
        vals = [d2, x2, clipped, alpha.sum(), torch.tensor(float(alpha.numel()), device=x.device), torch.tensor(float(x.numel()), device=x.device), alpha.max()]
        prev = self.acc.get(name)
        if prev is None:
            self.acc[name] = vals
        else:
            self.acc[name] = [p + v for p, v in zip(prev[:-1], vals[:-1])] + [torch.maximum(prev[-1], vals[-1])]

    def stats(self) -> list[LayerStats]:
        out = []
        for name, v in self.acc.items():
            d2, x2, clipped, asum, nrows, numel, amax = (float(t) for t in v)
            out.append(
                LayerStats(
                    layer=name,
                    kind="activation",
                    numel=int(numel),
                    delta_l2=d2**0.5,
                    rel_error=(d2 / x2) ** 0.5 if x2 > 0 else 0.0,
                    alpha_mean=asum / max(nrows, 1),
                    alpha_max=amax,
                    clipped_fraction=clipped / max(numel, 1),
                )
            )
        return out


def _version(x: torch.Tensor) -> int:
    """In-place edits bump the version counter; inference tensors have none (and are never edited)."""
    return -1 if x.is_inference() else x._version


def _make_hook(state: _ActivationState, name: str, gen: torch.Generator | None):
    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if name in state.bypass:
            return None
        return (state.transform(name, args[0], gen), *args[1:])

    return hook


class _Stored:
    """An original weight not kept in memory: the tensor ``key`` of the model's checkpoint."""

    def __init__(self, checkpoint: Any, source: Any):
        self.checkpoint, self.source = checkpoint, source  # a key, or a Fused recipe (an MoE's experts)

    def read(self, like: torch.Tensor) -> torch.Tensor:
        return self.checkpoint.read([self.source], like.device, like.dtype)[0]


def _original(orig: "torch.Tensor | _Stored", like: torch.Tensor) -> torch.Tensor:
    if isinstance(orig, _Stored):
        return orig.read(like)
    return orig if orig.device == like.device else orig.to(like.device)


@dataclass
class _PatchState:
    setting: Setting
    originals: dict[str, tuple[nn.Parameter, "torch.Tensor | _Stored"]]
    handles: list[Any]
    activations: _ActivationState | None
    report: PatchReport
    kv: list[Any] = field(default_factory=list)  # quantlens.quantize.kv.KVState per attention module
    # placement: stream reads block weights when they run: their setting is applied then (apply_deferred)
    deferred: dict[int, "Target"] = field(default_factory=dict)  # id(parameter) → its target
    full_precision: set[str] = field(default_factory=set)  # deferred names read as they are (full_precision())
    seen: set[str] = field(default_factory=set)  # deferred names whose statistics are in the report
    coverage: "_Coverage | None" = None
    calibrated: dict[str, torch.Tensor] | None = None  # a calibrated setting's weights (GPTQ, AWQ, a checkpoint's), by name
    overridden: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)  # other parameters set, and their own data
    first: dict[str, str] = field(default_factory=dict)  # each target's name → the first name of its weight (Zamba2's shared ones)


@dataclass
class _Coverage:
    """How much of what a setting targets it changed, and how much of the decoder blocks' weights.

    ``targeted``: the weights the setting rewrites (or, for an activation-only setting, the layers
    whose inputs it quantizes), name → elements; ``touched``: those actually changed so far (a
    streamed block's weights count when they first arrive); ``block_total``: the elements of every
    matrix of the decoder blocks — what the config leaves out on purpose (routers, by default) is
    the difference between the two fractions."""

    targeted: dict[str, int]
    touched: dict[str, int]
    in_blocks: set[str]
    block_total: int
    left: dict[str, int] = field(default_factory=dict)  # a weight setting's untargeted block matrices: role → elements
    kv_blocks: tuple[int, int] | None = None  # a KV setting's (blocks whose cache it quantizes, blocks): a hybrid's attention ones

    @classmethod
    def of(cls, model: nn.Module, setting: Setting, layers: list["Target"], originals: dict, deferred: dict,
           kv_states: list[Any]) -> "_Coverage":
        numel = lambda p: streaming.full_numel(model, p)  # noqa: E731 — a streamed placeholder: its checkpoint shape
        body = anatomy(model)
        matrices = body.block_matrix_params()  # (shapes of a streamed skeleton's placeholders included)
        block_params = {id(p) for p in matrices.values()}
        block_total = sum(numel(p) for p in matrices.values())
        left: dict[str, int] = {}
        if setting.weights is not None:
            targeted = {n: numel(p) for n, (p, _) in originals.items()} | {t.name: numel(t.param) for t in deferred.values()}
            touched = {n: numel(p) for n, (p, _) in originals.items()}
            ids = {n: id(p) for n, (p, _) in originals.items()} | {t.name: id(t.param) for t in deferred.values()}
        elif setting.activations is not None:
            first = first_names((t.name, t.param) for t in layers)  # a weight shared by several blocks (Zamba2's): once
            once = [t for t in layers if first[t.name] == t.name]
            targeted = {t.name: numel(t.param) for t in once}
            touched = dict(targeted)
            ids = {t.name: id(t.param) for t in once}
        else:
            targeted, touched, ids = {}, {}, {}
        if setting.weights is not None:  # what the setting leaves 16-bit, by role (routers, mixer states, …)
            aimed, roles = set(ids.values()), body.block_matrix_roles()
            for n, p in matrices.items():
                if id(p) not in aimed:
                    left[roles[n]] = left.get(roles[n], 0) + numel(p)
        kv_blocks = (len(kv_states), len(body.parts)) if setting.kv is not None else None
        return cls(targeted, touched, {n for n, i in ids.items() if i in block_params}, block_total, left, kv_blocks)

    def arrived(self, name: str, n: int) -> None:
        self.touched[name] = n

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.kv_blocks is not None:  # a hybrid's KV setting reaches its attention blocks only: how many
            out |= {"kv_cache_blocks": float(self.kv_blocks[0]), "kv_cache_share": self.kv_blocks[0] / max(self.kv_blocks[1], 1)}
        if not self.targeted:
            return out
        out |= {"coverage_targeted": sum(self.touched.values()) / max(sum(self.targeted.values()), 1),
                "coverage_block": sum(v for n, v in self.touched.items() if n in self.in_blocks) / max(self.block_total, 1)}
        return out | {f"coverage_16bit_{role.replace(' ', '_')}": n / max(self.block_total, 1) for role, n in sorted(self.left.items())}


# --- Entry points -----------------------------------------------------------------------------
def weight_stats(name: str, w: torch.Tensor, wq: torch.Tensor, alpha: torch.Tensor | None, clipped: float,
                 spec: Any = None) -> LayerStats:
    """‖Δ‖₂, ‖Δ‖/‖w‖, α and clipped fraction of one weight tensor and its quantized/perturbed copy,
    and the format it was stored in (``spec``: its label and bits per weight)."""
    d = wq.to(torch.float32) - w.to(torch.float32)
    dn = float(d.norm())
    wn = float(w.to(torch.float32).norm())
    return LayerStats(
        layer=name,
        kind="weight",
        numel=w.numel(),
        delta_l2=dn,
        rel_error=dn / wn if wn > 0 else 0.0,
        alpha_mean=float(alpha.mean()) if alpha is not None else float("nan"),
        alpha_max=float(alpha.max()) if alpha is not None else float("nan"),
        clipped_fraction=clipped,
        format=spec.label if spec is not None else "",
        bits_per_weight=spec.bits_per_weight if spec is not None else float("nan"),
    )


def _new_matrix(name: str, w: torch.Tensor, setting: Setting, spec: QuantSpec | None = None) -> tuple[torch.Tensor, LayerStats]:
    """One [out, in] matrix quantized (or perturbed) under ``spec`` (default: the setting's weight spec)."""
    spec = spec or setting.weights
    if setting.perturbs_weights():
        p = setting.perturbation
        wq = perturb(w, spec, p, make_generator(p.seed, name))
        return wq, weight_stats(name, w, wq, None, 0.0)
    res = quantize(w, spec)
    return res.xq, weight_stats(name, w, res.xq, res.alpha, res.clipped_fraction, res.spec)


def _new_tensor(t: Target, w: torch.Tensor, setting: Setting, calibrated: dict[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, list[LayerStats]]:
    """A target's weight quantized under the setting, as its module stores it, and its statistics.

    Conv1D weights are [in, out]: quantized as the [out, in] matrix they are. Expert tensors are
    quantized slice by slice — each expert's gate, up and down matrix on its own, exactly as the
    dense MLP's linears would be (rows and groups along each matrix's input features, one tensor
    scale per matrix); statistics are per expert (``<experts>.<tensor>.<e>``). A calibrated setting
    (GPTQ, AWQ) or a released checkpoint takes its weights from ``calibrated``
    (:mod:`quantlens.quantize.calibrate`, :mod:`quantlens.checkpoints.released`)."""
    if setting.external_weights:
        if calibrated is None or t.name not in calibrated:
            raise ConfigError(f"{setting.name}: no calibrated weight for {t.name} (calibrate the model first: "
                              "quantlens.quantize.calibrate.calibrated_weights)")
        wq = calibrated[t.name].to(w.device, w.dtype)
        if wq.shape != w.shape:
            raise ConfigError(f"{setting.name}: the calibrated weight of {t.name} is {tuple(wq.shape)}, the model's {tuple(w.shape)}")
        if setting.perturbs_weights():  # noise with the variance of the method's own error on this layer, where the noise puts it
            p = setting.perturbation
            std = (wq.to(torch.float32) - w.to(torch.float32)).std(unbiased=False)
            wq = (w.to(torch.float32) + shaped_noise(w, std, p, make_generator(p.seed, t.name))).to(w.dtype)
        return wq, [weight_stats(t.name, w, wq, None, 0.0)]
    if t.kind == "experts":
        e = t.experts
        mats = e.matrices(t.attr, w)
        parts = e.parts(t.attr)
        out = torch.empty_like(mats)
        per: list[LayerStats] = []
        for i in range(mats.shape[0]):
            out[i], st = _new_matrix(f"{t.name}.{i // parts}" + (f".{('gate', 'up')[i % parts]}" if parts > 1 else ""), mats[i], setting, t.spec)
            per.append(st)
        stats = [_merged(f"{t.name}.{j}", per[j * parts:(j + 1) * parts]) for j in range(e.num_experts)]
        return e.from_matrices(t.attr, out), stats
    if is_conv1d(t.module):
        wq, st = _new_matrix(t.name, w.t().contiguous(), setting, t.spec)
        return wq.t().contiguous(), [st]
    if t.kind == "state":  # [channels, 1, taps] → rows of taps
        wq, st = _new_matrix(t.name, w.reshape(-1, w.shape[-1]), setting, t.spec)
        return wq.reshape(w.shape), [st]
    wq, st = _new_matrix(t.name, w, setting, t.spec)
    return wq, [st]


def _merged(name: str, parts: list[LayerStats]) -> LayerStats:
    """One expert's statistics from those of its matrices (gate and up: one row, as in the report)."""
    if len(parts) == 1:
        return LayerStats(**{**asdict(parts[0]), "layer": name})
    d2 = sum(s.delta_l2 ** 2 for s in parts)
    w2 = sum((s.delta_l2 / s.rel_error) ** 2 for s in parts if s.rel_error > 0)
    n = sum(s.numel for s in parts)
    return LayerStats(layer=name, kind="weight", numel=n, delta_l2=d2 ** 0.5, rel_error=(d2 / w2) ** 0.5 if w2 > 0 else 0.0,
                      alpha_mean=sum(s.alpha_mean for s in parts) / len(parts), alpha_max=max(s.alpha_max for s in parts),
                      clipped_fraction=sum(s.clipped_fraction * s.numel for s in parts) / max(n, 1),
                      format="+".join(dict.fromkeys(s.format for s in parts)),
                      bits_per_weight=sum(s.bits_per_weight * s.numel for s in parts) / max(n, 1))


def quantize_(
    model: nn.Module,
    setting: Setting | str | dict,
    *,
    keep_originals_on: str = "auto",
    activation_stats_forwards: int = 4,
    calibrated: dict[str, torch.Tensor] | None = None,
    overrides: dict[str, torch.Tensor] | None = None,
) -> PatchReport:
    """Apply ``setting`` to ``model`` in place and return per-layer statistics.

    Weights are rewritten once here; activation quantization/perturbation runs in forward
    pre-hooks. A model that is already patched is restored first, so calling this repeatedly with
    different settings is how a sweep reuses one loaded model. ``keep_originals_on``: ``"auto"``
    keeps the 16-bit originals on CPU when the model lives elsewhere, ``"cpu"`` always,
    ``"same"`` next to the weights, ``"checkpoint"`` nowhere: :func:`restore_` reads them again
    from the safetensors the model was loaded from (no host memory for originals; see
    :func:`quantlens.model.loading.choose_originals`). Activation statistics are measured on the first
    ``activation_stats_forwards`` forwards of each layer (0 = none), so the hot path stays cheap.

    ``calibrated``: the weights of a calibrated setting (GPTQ, AWQ) or of a released checkpoint, by
    target name; a checkpoint setting rewrites exactly the layers it holds (its coverage of the
    blocks says what it kept in 16 bits). ``overrides``: other parameters, by name, set for the
    setting and restored with the weights (the norms AWQ's checkpoints fold their scales into).
    """
    setting = resolve_setting(setting)
    restore_(model)
    layers = targets(model, setting)
    _check_compatible(layers, setting)
    if setting.kv is not None:
        kv.check_supported(model)  # an attention that is not understood fails before any weight changes
    report = PatchReport(setting=setting.name)
    ckpt = _originals_checkpoint(model) if keep_originals_on == "checkpoint" else None
    params = dict(model.named_parameters()) if overrides else {}
    weight_targets = _weight_targets(model, setting, layers, calibrated, overrides, params)
    streamed = _streaming_device(model)
    with torch.no_grad():
        originals, deferred = _rewrite_weights(model, setting, weight_targets, calibrated, ckpt, keep_originals_on, streamed,
                                               report)
        overridden = _override(params, overrides)
    handles, act_state = _attach_activations(setting, layers, streamed, activation_stats_forwards)
    if deferred:  # the streamed blocks' weights get the setting as they arrive on the device
        streaming.on_arrival(model, apply_deferred)
    kv_states = []
    if setting.kv is not None:
        kv_states = kv.attach(model, setting.kv, setting.perturbation if setting.perturbs_kv() else None, activation_stats_forwards)
    state = _PatchState(setting, originals, handles, act_state, report, kv_states, deferred, calibrated=calibrated,
                        overridden=overridden, first=first_names((t.name, t.param) for t in layers))
    state.coverage = _Coverage.of(model, setting, layers, originals, deferred, kv_states)
    report.coverage = state.coverage.metrics()
    setattr(model, _STATE_ATTR, state)
    return report


def _originals_checkpoint(model: nn.Module) -> Any:
    """The checkpoint :func:`restore_` reads the originals from (``keep_originals_on="checkpoint"``)."""
    ckpt = model_checkpoint(model)
    if ckpt is None:
        raise ConfigError("originals: checkpoint needs a model loaded from a folder with safetensors (load_model); "
                          "use originals: memory")
    return ckpt


def _weight_targets(model: nn.Module, setting: Setting, layers: list[Target], calibrated: dict[str, torch.Tensor] | None,
                    overrides: dict[str, torch.Tensor] | None, params: dict[str, nn.Parameter]) -> list[Target]:
    """The weights ``setting`` rewrites: its targets, a checkpoint's own layers, the embeddings; every
    override, a checkpoint's weights and every calibrated weight checked before anything changes."""
    weight_targets: list[Target] = list(layers) if setting.weights else []
    for name, value in (overrides or {}).items():  # checked before anything changes
        if name not in params or tuple(params[name].shape) != tuple(value.shape):
            raise ConfigError(f"{setting.name}: no parameter {name} {tuple(value.shape)} in the model to override")
    if setting.checkpoint is not None:  # the layers the checkpoint quantized (routers or the head too, if it did)
        wide = targets(model, setting.model_copy(update={"include_routers": True, "include_lm_head": True}))
        weight_targets = [t for t in wide if calibrated is not None and t.name in calibrated]
        if not weight_targets:
            raise ConfigError(f"{setting.name}: no weights of the checkpoint given (checkpoints.released.released_weights)")
        if overrides and setting.perturbs_weights():
            raise ConfigError(f"{setting.name}: the checkpoint changes {len(overrides)} float tensor(s) besides its quantized "
                              f"weights ({next(iter(overrides))}: AWQ folds its scales into them), so Ŵ − W is not its weight "
                              "error: the lens needs a checkpoint that keeps the model's other tensors (or an in-sweep -awq)")
    if setting.include_embeddings and setting.weights:
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if not (setting.include_lm_head and head is not None and head.weight is emb.weight):
            weight_targets.append(Target(_qualified_name(model, emb), emb, "embedding"))

    if setting.calibrated:  # every weight calibrated, checked before any changes
        missing = [t.name for t in weight_targets if calibrated is None or t.name not in calibrated]
        if missing:
            raise ConfigError(f"{setting.name}: no calibrated weights for {len(missing)} layer(s) ({missing[0]}, …): calibrate the "
                              "model first (quantlens.quantize.calibrate.calibrated_weights) and pass calibrated=")
    return weight_targets


def _rewrite_weights(model: nn.Module, setting: Setting, weight_targets: list[Target], calibrated: dict[str, torch.Tensor] | None,
                     ckpt: Any, keep_originals_on: str, streamed: torch.device | None, report: PatchReport
                     ) -> tuple[dict[str, tuple[nn.Parameter, "torch.Tensor | _Stored"]], dict[int, Target]]:
    """Each target weight rewritten in place (its statistics in ``report``): (originals by name, the
    streamed weights deferred until their block arrives, by id of the parameter)."""
    originals: dict[str, tuple[nn.Parameter, torch.Tensor | _Stored]] = {}
    deferred: dict[int, Target] = {}
    for t in weight_targets:
        param = t.param
        if any(param is p for p, _ in originals.values()):
            continue  # tied weight already done
        if streamed is not None and param.numel() == 0:
            deferred.setdefault(id(param), t)  # read from the checkpoint when its block runs: patched then (a shared one: by its first name)
            continue
        w = param.data
        wq, stats = _new_tensor(t, w, setting, calibrated)
        originals[t.name] = (param, _kept_original(model, t, w, ckpt, keep_originals_on))
        report.add_lens("weight", w, wq)
        param.data = wq
        report.layers.extend(stats)
    return originals, deferred


def _kept_original(model: nn.Module, t: Target, w: torch.Tensor, ckpt: Any, keep_originals_on: str) -> "torch.Tensor | _Stored":
    """Where target ``t``'s original weight ``w`` is kept for :func:`restore_` (``keep_originals_on``)."""
    if ckpt is not None:
        kinds = (type(model).__name__, str(getattr(model.config, "model_type", "")))
        source = ckpt.source(t.param_name, kinds, tuple(w.shape)) or \
            ckpt.source(_param_name(model, t.param), kinds, tuple(w.shape))  # (a tied head: its embedding)
        if source is None:
            raise ConfigError(f"originals: checkpoint: {t.name} is not in {ckpt.folder}")
        return _Stored(ckpt, source)
    keep = "cpu" if keep_originals_on == "cpu" or (keep_originals_on == "auto" and w.device.type != "cpu") else "same"
    return w.to("cpu") if keep == "cpu" else w


def _override(params: dict[str, nn.Parameter], overrides: dict[str, torch.Tensor] | None) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """The ``overrides`` set in place (names and shapes checked before): each parameter and its own data."""
    overridden = []
    if overrides:
        for name, value in overrides.items():  # (names and shapes checked above)
            param = params[name]
            overridden.append((param, param.data))
            param.data = value.to(param.device, param.dtype)
    return overridden


def _attach_activations(setting: Setting, layers: list[Target], streamed: torch.device | None,
                        activation_stats_forwards: int) -> tuple[list[Any], _ActivationState | None]:
    """The activation quantization / perturbation hooks on every target layer: (handles, their state)."""
    handles: list[Any] = []
    act_state = None
    if setting.activations is not None:
        act_state = _ActivationState(setting, activation_stats_forwards)
        p = setting.perturbation
        for t in layers:
            gen = None
            if setting.perturbs_activations():
                dev = (streamed or _device_of(t.module)) if p.rng == "device" else "cpu"
                gen = make_generator(p.seed, t.name + ":act", dev)
            if t.kind == "state":
                continue  # (a state is applied inside its mixer: no input of its own to quantize)
            if t.kind == "experts":
                handles.extend(moe.attach(t, lambda name, x, g=gen, st=act_state: st.transform(name, x, g), act_state.bypass,
                                          moe.needs_per_expert(setting)))
            else:
                handles.append((t.site or t.module).register_forward_pre_hook(_make_hook(act_state, t.name, gen)))
    return handles, act_state


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _param_name(model: nn.Module, param: nn.Parameter) -> str:
    return next(n for n, p in model.named_parameters(remove_duplicate=False) if p is param)


def _streaming_device(model: nn.Module) -> torch.device | None:
    """The device of a model whose blocks are read from the checkpoint when they run, else None."""
    return streaming.streaming_device(model) if streaming.is_lazy(model) else None


def apply_deferred(model: nn.Module, block: nn.Module) -> None:
    """Patch a streamed block's weights as they arrive on the device (called by quantlens.model.streaming):
    the setting's quantizer or perturbation, exactly as :func:`quantize_` applies it to a loaded
    model; statistics go to the report the first time each weight is seen."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None or not state.deferred:
        return
    with torch.no_grad():
        for param in block.parameters():
            t = state.deferred.get(id(param))
            if t is None or t.name in state.full_precision:
                continue
            wq, stats = _new_tensor(t, param.data, state.setting, state.calibrated)
            if t.name not in state.seen:
                state.seen.add(t.name)
                state.report.layers.extend(stats)
                state.report.add_lens("weight", param.data, wq)
                state.coverage.arrived(t.name, param.numel())
            param.data = wq


def set_valid_tokens(model: nn.Module, mask: torch.Tensor | None) -> None:
    """Tell the activation hooks which tokens of the next forwards are real (``[batch, tokens]``,
    0 = padding): activation statistics and ``match: batch`` perturbations then ignore padding."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is not None and state.activations is not None:
        state.activations.valid = mask


def activation_report(model: nn.Module) -> list[LayerStats]:
    """Activation statistics accumulated over the forwards since the model was patched."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None or state.activations is None:
        return []
    return state.activations.stats()


def full_report(model: nn.Module) -> PatchReport:
    """Weight statistics from patch time plus activation statistics accumulated so far."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return PatchReport(setting="W16A16")
    acts = state.activations
    merged = dict(state.report.lens, **({"activation": acts.lens} if acts is not None and acts.lens is not None else {}))
    return PatchReport(setting=state.report.setting, layers=state.report.layers + activation_report(model) + kv_report(state.kv),
                       lens=merged, coverage=state.coverage.metrics() if state.coverage else {})


def kv_report(states: list[Any]) -> list[LayerStats]:
    """‖Δ‖₂, relative error and mean α of K and V per attention module (first forwards)."""
    out = []
    for st in states:
        for which, (d2, x2, numel, rows, asum) in st.acc.items():
            out.append(LayerStats(layer=f"{st.name}.{which}", kind=which, numel=int(numel), delta_l2=d2**0.5,
                                  rel_error=(d2 / x2) ** 0.5 if x2 > 0 else 0.0, alpha_mean=asum / max(rows, 1),
                                  alpha_max=float("nan"), clipped_fraction=0.0))
    return out


def reset_activation_stats(model: nn.Module) -> None:
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is not None and state.activations is not None:
        state.activations.acc.clear()
        state.activations.stats_seen.clear()
        state.activations.lens = None


def restore_(model: nn.Module) -> None:
    """Undo :func:`quantize_`: original weights back (bit-exact), hooks removed. No-op if unpatched."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return
    for h in state.handles:
        h.remove()
    if state.kv:
        kv.detach(model)
    with torch.no_grad():
        for param, orig in state.originals.values():
            param.data = _original(orig, param.data)
        for param, own in state.overridden:
            param.data = own
    if state.activations is not None:
        state.activations.last_in = state.activations.last_out = None
    delattr(model, _STATE_ATTR)


def patched_layers(model: nn.Module) -> set[str]:
    """Qualified names of the layers the current setting changes (weights, activations or both)."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return set()
    weights = set(state.originals) | {t.name for t in state.deferred.values()}
    shared = {n for n, f in state.first.items() if f in weights}  # a weight several blocks hold: under each block's name
    return weights | shared | ({t.name for t in targets(model, state.setting)} if state.activations else set())


@contextmanager
def full_precision(model: nn.Module, layers: Iterable[str] | None = None, *, activations: bool = True) -> Iterator[None]:
    """Run a patched model with its 16-bit originals, then switch back: the two weight versions of
    one model, swapped by pointer (no re-quantization, bit-exact both ways).

    ``layers``: qualified names of the patched linears to switch (default: all of them) — a weight
    several blocks hold (Zamba2's shared transformer) is switched in every block that holds it;
    ``activations``: also bypass their activation quantization (False: weights only). No-op on an
    unpatched model. Originals kept on the CPU (a model on a GPU, ``keep_originals_on="auto"``)
    are copied to the device at each switch: patch with ``keep_originals_on="same"`` to switch often.
    """
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        yield
        return
    names = patched_layers(model)
    chosen = names if layers is None else set(layers)
    unknown = chosen - names
    if unknown:
        raise KeyError(f"full_precision: not patched layers: {', '.join(sorted(unknown))}")
    if state.overridden and layers is not None:
        raise ConfigError(f"{state.setting.name}: the checkpoint rescales {len(state.overridden)} norm(s) and the weights after "
                          "them (AWQ's folded scales), so some layers at full precision beside the others is no model at all: "
                          "mechanism analyses need a checkpoint that keeps the model's other tensors")
    swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
    weights = {state.first.get(n, n) for n in chosen}  # (a shared weight by its first name)
    streamed_fp = weights & {t.name for t in state.deferred.values()} - state.full_precision  # read as they are while inside
    bypassed = set()
    kv_off: list[Any] = []
    try:
        with torch.no_grad():
            for name in weights & set(state.originals):
                param, orig = state.originals[name]
                swapped.append((param, param.data))
                param.data = _original(orig, param.data)
            for param, own in state.overridden:  # (all layers: the model's own norms too)
                swapped.append((param, param.data))
                param.data = own
        state.full_precision |= streamed_fp
        if activations and state.activations is not None:
            bypassed = chosen - state.activations.bypass
            state.activations.bypass |= bypassed
            state.activations.last_in = state.activations.last_out = None
        kv_off = [st for st in state.kv if st.enabled] if layers is None and activations else []
        for st in kv_off:
            st.enabled = False
        yield
    finally:
        state.full_precision -= streamed_fp
        for st in kv_off:
            st.enabled = True
        with torch.no_grad():
            for param, quantized in swapped:
                param.data = quantized
        if state.activations is not None:
            state.activations.bypass -= bypassed
            state.activations.last_in = state.activations.last_out = None


def current_setting(model: nn.Module) -> Setting | None:
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    return state.setting if state else None
