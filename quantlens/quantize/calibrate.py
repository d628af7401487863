"""Calibrated weight quantization (GPTQ, AWQ), layer by layer: one decoder block on the device at a time.

As GPTQ's own pipeline: the calibration windows run up to the first block (its inputs are captured,
:mod:`quantlens.model.layerwise`); then for each block, every linear's input Hessian is accumulated
over all windows (forward pre-hooks), each linear is quantized by :func:`quantlens.quantize.gptq.gptq_quantize`
(or, for AWQ, :func:`quantlens.quantize.awq.awq_quantize`, linears reading one input sharing one scale:
the setting's method, :mod:`quantlens.quantize.methods`),
and the windows run through the block again *with its quantized weights*, so that the next block
calibrates on what it will see. A streamed model (``placement: stream``) reads each block from its
checkpoint once, so a 70B model calibrates on one GPU.

:func:`calibrated_weights` returns the quantized weights by name (on the CPU, in the model's dtype),
cached on disk under quantlens' cache (``calibrated/<key>.pt``), the key being the model's
checkpoint, the setting's identity and the calibration tokens: a second run with the same
model, setting and data calibrates nothing. The model itself is left as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from quantlens.model import streaming
from quantlens.model.anatomy import anatomy, in_features, is_conv1d, state_key
from quantlens.model.layerwise import hidden_of, with_hidden, capture_by_kind, layer_kinds
from quantlens.quantize.gptq import HessianAccumulator
from quantlens.quantize.methods import registry
from quantlens.quantize.methods.base import CalibratedMethod
from quantlens.quantize.quant import quantize_state
from quantlens.quantize.settings import ConfigError, Setting, resolve_setting

Progress = Callable[[int, int], None]


def cache_key(model: nn.Module, setting: Setting, samples: torch.Tensor) -> str:
    """What the calibrated weights depend on: the checkpoint (folder, file sizes and times), the
    setting's weight grid and GPTQ parameters (not its activations, KV cache or a perturbation built
    on them) and the calibration tokens."""
    source = getattr(model, "_quantlens_source", None)
    files = []
    if source is not None:
        for f in sorted(Path(source).glob("*.safetensors")):
            st = f.stat()
            files.append((f.name, st.st_size, int(st.st_mtime)))
    ident = setting.identity()
    what = {k: ident.get(k) for k in ("weights", "gptq", "awq")}  # (noise matched to it: the same calibration)
    if setting.include_mixer_states:  # (the states rounded in the pass: what the next blocks are calibrated on; absent: earlier keys)
        what["include_mixer_states"] = True
    for m in registry.chosen(setting):  # a method registered since: its options too
        what.setdefault(m.option, ident.get(m.option))
    ident = {"source": str(source), "files": files, "type": type(model).__name__, "setting": what,
             "tokens": hashlib.sha256(samples.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]


def calibrated_weights(model: nn.Module, setting: Setting | str | dict, samples: torch.Tensor, *, batch_size: int = 8,
                       cache_dir: Path | None = None, progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """(name → quantized weight, whether they came from the cache) for ``setting`` (a GPTQ setting)
    on calibration windows ``samples`` [n, T]."""
    setting = resolve_setting(setting)
    if not setting.calibrated:
        raise ConfigError(f"{setting.name}: not a calibrated setting")
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "calibrated" / f"{cache_key(model, setting, samples)}.pt"
        if path.is_file():
            return torch.load(path), True
    out = calibrate_model(model, setting, samples, batch_size=batch_size, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.replace(path)  # atomic: a failure mid-write leaves no half-file to trust
    return out, False


@dataclass
class _Windows:
    """The calibration batches at the current block: each one's captured call context (per layer kind)
    and hidden states, which :meth:`through` runs through a block."""

    contexts: list[dict]
    kinds: list[str | None]
    states: list[torch.Tensor]

    def through(self, block: nn.Module, i: int) -> list[torch.Tensor]:
        """Every calibration batch through block ``i``: its outputs, in order."""
        ys = []
        for j, h in enumerate(self.states):
            a, kw = with_hidden(*self.contexts[j][self.kinds[i]], h, block, i)
            y = block(*a, **kw)
            ys.append(y[0] if isinstance(y, tuple) else y)
        return ys


@dataclass
class _BlockInputs:
    """What one block's linears and experts read over every calibration batch: each linear's input
    statistics, the first input tensor each read (who shares an input: AWQ's groups), each expert's."""

    acc: dict[str, HessianAccumulator]
    reads: dict[str, torch.Tensor]
    experts: dict[str, "_ExpertHessians"]


@torch.no_grad()
def calibrate_model(model: nn.Module, setting: Setting, samples: torch.Tensor, *, batch_size: int = 8,
               progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """GPTQ (or AWQ: the setting's registered method) on every linear and expert of every decoder block,
    sequentially (module doc)."""
    from quantlens.quantize.patch import current_setting

    if current_setting(model) is not None:
        raise ValueError("calibrate an unpatched model (restore_ first)")
    method = registry.method(setting.method)
    body = anatomy(model)
    device = model.get_input_embeddings().weight.device
    blocks = body.blocks
    kinds = layer_kinds(model, blocks)
    streamed = streaming.streaming_device(model) is not None  # its blocks come to the device one at a time
    batches = [samples[s:s + batch_size] for s in range(0, samples.shape[0], batch_size)]
    contexts = [capture_by_kind(model, blocks[0], {"input_ids": b.to(device)}, kinds) for b in batches]
    windows = _Windows(contexts, kinds, [hidden_of(*c[kinds[0]]) for c in contexts])
    out: dict[str, torch.Tensor] = {}
    held = Counter(id(m.weight) for b in body.parts for _, m in b.linears())
    shared = _Shared({w for w, n in held.items() if n > 1})
    for i, part in enumerate(body.parts):
        with streaming.resident(model, i) if streamed else contextlib.nullcontext(blocks[i]) as block:
            out.update(_calibrate_block(windows, block, i, part, method, setting, device, shared))
        if progress:
            progress(i + 1, len(body.parts))
    for name, w in shared.later.items():
        if w not in shared.done:
            raise ConfigError(f"{setting.name}: {name} is a weight several blocks share, and no calibration window reached it")
        out[name] = shared.done[w]
    return out


@dataclass
class _Shared:
    """The linear weights several blocks hold (Zamba2's shared transformer: one parameter, a module in
    each block; its adapters, each read by one of them): each calibrated once, in the first block
    whose forward reads it, and that result everywhere it is held."""

    ids: set[int]
    done: dict[int, torch.Tensor] = field(default_factory=dict)  # id(weight) → its calibrated weight
    later: dict[str, int] = field(default_factory=dict)  # names met where no window read them → id(weight)


def _calibrate_block(windows: _Windows, block: nn.Module, i: int, part: Any, method: CalibratedMethod, setting: Setting,
                     device: torch.device, shared: _Shared) -> dict[str, torch.Tensor]:
    """Block ``i`` calibrated: its inputs read, its experts then linears quantized (in place while the
    windows run through it again, so that ``windows`` hold what the next block sees), then restored;
    a weight shared with earlier blocks takes the result it got there (:class:`_Shared`)."""
    linears = part.linears()
    seen = _read_inputs(windows, block, i, part, linears, device)
    out: dict[str, torch.Tensor] = {}
    originals: dict[str, tuple[Any, torch.Tensor]] = {}
    _quantize_experts(seen, method, setting, originals, out)
    fresh = []
    for n, m in linears:
        w = id(m.weight)
        if w in shared.done:
            originals[n] = (m.weight, m.weight.data)
            m.weight.data = shared.done[w].to(m.weight.device, m.weight.dtype)
            out[n] = shared.done[w]
        elif w in shared.ids and n not in seen.reads:
            shared.later[n] = w  # (an adapter of another layer: calibrated where its layer reads it)
        else:
            fresh.append((n, m))
    _quantize_linears(fresh, seen, method, setting, originals, out)
    shared.done |= {id(m.weight): out[n] for n, m in fresh if id(m.weight) in shared.ids}
    if setting.include_mixer_states:
        _quantize_states(part, setting, originals, out)
    windows.states = windows.through(block, i)  # the next block sees what the quantized block gives
    for p, w in originals.values():
        p.data = w
    return out


def _read_inputs(windows: _Windows, block: nn.Module, i: int, part: Any, linears: list[tuple[str, nn.Module]],
                 device: torch.device) -> _BlockInputs:
    """Every calibration batch through block ``i`` with hooks that record what each linear and expert reads."""
    seen = _BlockInputs({n: HessianAccumulator(in_features(m), device) for n, m in linears}, {},
                        {e.name: _ExpertHessians(e, device) for e in part.all_experts})  # per expert: its routed tokens (a mixture of attention heads too)

    def record(n: str, x: torch.Tensor) -> None:
        seen.reads.setdefault(n, x)  # (kept alive: who shares an input)
        seen.acc[n].add(x)

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: record(n, args[0])) for n, m in linears]
    for ex in seen.experts.values():
        hooks.append(ex.attach())
    try:
        windows.through(block, i)
    finally:
        for hk in hooks:
            hk.remove()
    return seen


def _quantize_experts(seen: _BlockInputs, method: CalibratedMethod, setting: Setting,
                      originals: dict[str, tuple[Any, torch.Tensor]], out: dict[str, torch.Tensor]) -> None:
    """Each expert tensor quantized in place (its original kept in ``originals``, its result in
    ``out``), those reading one input together: the first projection's (gate and up apart, DBRX's
    w1 and v1, as one fused gate_up_proj), then the down projection."""
    for ex in seen.experts.values():
        e = ex.e
        for group in (e.firsts, (e.down,)):
            for attr, q in zip(group, ex.quantized(group, setting.weights, method, method.options_of(setting))):
                p = e.tensor(attr)
                originals[e.qualified(attr)] = (p, p.data)
                p.data = q
                out[e.qualified(attr)] = q.to("cpu")


def _quantize_linears(linears: list[tuple[str, nn.Module]], seen: _BlockInputs, method: CalibratedMethod, setting: Setting,
                      originals: dict[str, tuple[Any, torch.Tensor]], out: dict[str, torch.Tensor]) -> None:
    """Each linear quantized in place by ``method`` — alone, or with those reading its input when the
    method shares one (its original kept in ``originals``, its result in ``out``)."""
    mods = dict(linears)
    options = method.options_of(setting)
    for group in _input_groups([n for n, _ in linears], seen.reads, method.shares_input):
        mats = [(mods[n].weight.data.t() if is_conv1d(mods[n]) else mods[n].weight.data) for n in group]
        qs = method.calibrate(mats, seen.acc[group[0]], setting.weights, options, [not _query_or_key(n) for n in group]).weights
        for n, q in zip(group, qs):
            m = mods[n]
            q = q.t().contiguous() if is_conv1d(m) else q
            originals[n] = (m.weight, m.weight.data)
            m.weight.data = q
            out[n] = q.to("cpu")


def _quantize_states(part: Any, setting: Setting, originals: dict[str, tuple[Any, torch.Tensor]], out: dict[str, torch.Tensor]) -> None:
    """The block's mixer state matrices (``include_mixer_states``) rounded to nearest, in place: no
    linear's input Hessian reaches a conv kernel or an A_log, so the method calibrates the linears
    only — on the inputs the block gave with its states in 16 bits, as GPTQ calibrates a block's
    linears on its float inputs — and the next blocks see the states quantized."""
    for name, p in part.state_matrices:
        originals[state_key(name)] = (p, p.data)
        p.data = quantize_state(p.data, setting.weights).xq
        out[state_key(name)] = p.data.to("cpu")


class _ExpertHessians:
    """Each expert's two input Hessians, from the tokens routed to it: the experts module runs
    quantlens' per-expert loop (:func:`quantlens.quantize.moe.per_expert_forward`) while attached."""

    def __init__(self, e: Any, device: torch.device):
        self.e, self.device = e, device
        self.acc: dict[tuple[int, str], HessianAccumulator] = {}

    def record(self, j: int, attr: str, x: torch.Tensor) -> None:
        if (j, attr) not in self.acc:
            self.acc[(j, attr)] = HessianAccumulator(x.shape[-1], self.device)
        self.acc[(j, attr)].add(x)

    def attach(self) -> Any:
        from quantlens.quantize import moe

        return moe.run_per_expert(self.e, lambda n, x: x, set(), self.record)

    def quantized(self, attrs: tuple[str, ...], spec: Any, method: CalibratedMethod, options: Any) -> list[torch.Tensor]:
        """The tensors ``attrs`` (those reading one input, its statistics recorded under the first's
        name) with every expert matrix GPTQ- (or AWQ-) quantized on its own routed tokens (an expert's
        gate and up matrices, one fused tensor or two, read one input: one AWQ scale); an expert no
        calibration token reached is rounded to nearest (its Hessian is empty)."""
        from quantlens.quantize.quant import quantize

        e = self.e
        mats = [e.matrices(a, e.tensor(a).data) for a in attrs]
        outs = [torch.empty_like(m) for m in mats]
        for j in range(e.num_experts):
            sl = [(t, i) for t, a in enumerate(attrs) for i in range(j * e.parts(a), (j + 1) * e.parts(a))]
            acc = self.acc.get((j, e.input_of(attrs[0])))
            if acc is None or acc.n == 0:
                for t, i in sl:
                    outs[t][i] = quantize(mats[t][i], spec).xq
                continue
            for idx in [sl] if method.shares_input else [[x] for x in sl]:
                qs = method.calibrate([mats[t][i] for t, i in idx], acc, spec, options, [True] * len(idx)).weights
                for (t, i), q in zip(idx, qs):
                    outs[t][i] = q
        return [e.from_matrices(a, o) for a, o in zip(attrs, outs)]


_QK = ("q_", "k_", "query", "key", "Wqkv")  # AutoAWQ's own test for the layers it does not clip


def _query_or_key(name: str) -> bool:
    """A linear whose output is a query or a key (q_proj, k_proj, a fused query_key_value): AWQ does
    not clip it (its error goes through the softmax), by AutoAWQ's test on the layer's name."""
    leaf = name.split(".", 3)[-1] if name.count(".") >= 3 else name  # (the name within its block)
    return any(k in leaf for k in _QK)


def _input_groups(names: list[str], reads: dict[str, torch.Tensor], share: bool) -> list[list[str]]:
    """Linears in groups that read one input tensor (q/k/v, gate/up) when ``share`` (AWQ), else one by one."""
    if not share:
        return [[n] for n in names]
    groups: list[list[str]] = []
    for n in names:
        same = next((g for g in groups if n in reads and reads.get(g[0]) is reads[n]), None)
        if same is None:
            groups.append([n])
        else:
            same.append(n)
    return groups
