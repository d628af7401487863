"""Released compressed-tensors checkpoints (llm-compressor / vLLM) read through the compressed-tensors
library itself.

A config.json's ``quantization_config`` with ``quant_method: compressed-tensors`` says how each
targeted module's weight is stored; :func:`packed_modules` lists the stored keys of every such module
and :func:`dequantize` rebuilds one weight [out, in] from them with the library's own compressor for
the format (``BaseCompressor.get_value_from_registry(format).decompress``, compressed-tensors 0.20):
this module only maps config + tensors onto those calls.

Readable formats and the keys each module stores (``<module>.<name>``):

* ``pack-quantized`` (int1..8 packed densely in int32): ``weight_packed`` [out, ceil(in·bits/32)]
  int32, ``weight_scale`` [out, groups | 1] (the checkpoint's float dtype), ``weight_shape`` [2];
  asymmetric channel/group also ``weight_zero_point`` (packed int32 along dim 0); act-order
  (``actorder: group``) also ``weight_g_idx`` [in] (see below);
* ``float-quantized`` (FP8 e4m3): ``weight`` float8_e4m3fn and ``weight_scale`` [1] or [out, 1];
* ``naive-quantized`` / ``int-quantized`` (the library's same compressor: int8 or FP8 stored
  unpacked): ``weight``, ``weight_scale`` (+ ``weight_zero_point`` when asymmetric);
* ``nvfp4-pack-quantized`` (FP4 e2m1, two per uint8): ``weight_packed`` [out, in/2] uint8,
  ``weight_scale`` [out, in/16] float8_e4m3fn, ``weight_global_scale`` [1] float32.

Act-order: compressed-tensors 0.20 removed ``actorder: group`` (and its g_idx) from the library, so
such a config does not even validate there. Its weights are still readable with the library's own
code: every group of ``weight_g_idx`` holds exactly ``group_size`` columns (GPTQ's g_idx), so sorting
the columns by g_idx (the library's ``unpack_from_int32`` / ``pack_to_int32``) gives an ordinary
group-quantized tensor that the library's pack-quantized compressor decompresses; the columns are
then put back in place. Any other g_idx is refused.

Precision: the library dequantizes in the stored scale's dtype (bf16 scales → bf16 products) and
NVFP4 always to bf16 (its compressor unpacks to bf16); :func:`dequantize` returns that result as
float32 unchanged.

Refused with one-line :class:`ConfigError` naming the format: sparse formats, ``dense`` /
``fakequant`` (weights not compressed), MX formats, unknown names, transforms (SpinQuant/QuIP
rotations in ``transform_config``), block-wise or dynamic weight scales.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from quantlens.errors import ConfigError
from quantlens.checkpoints.layouts import Layout

__all__ = ["describe", "packed_modules", "dequantize", "READABLE_FORMATS"]

READABLE_FORMATS = ("pack-quantized", "float-quantized", "nvfp4-pack-quantized", "naive-quantized", "int-quantized")
_MIXED = "mixed-precision"
_WHY_NOT = {
    "dense": "its weights are stored uncompressed (original or fake-quantized), not as a released quantized checkpoint",
    "fakequant": "its weights are stored uncompressed (fake-quantized), not as a released quantized checkpoint",
    "sparse-bitmask": "a sparse format",
    "sparse-24-bitmask": "a sparse (2:4) format",
    "marlin-24": "a sparse (2:4 Marlin) format",
    "mxfp4-pack-quantized": "an MX format quantlens does not read from checkpoints",
    "mxfp6-pack-quantized": "an MX format quantlens does not read from checkpoints",
    "mxfp8-quantized": "an MX format quantlens does not read from checkpoints",
}
# weight tensors a compressed module may store (input_*/output_*/k_scale/v_scale are activation params)
_WEIGHT_PARAMS = ("weight_packed", "weight", "weight_scale", "weight_zero_point", "weight_shape",
                  "weight_g_idx", "weight_global_scale")
_ELEMENT = {8: "e4m3", 4: "e2m1"}
_GRANULARITY = {"tensor": "tensor", "channel": "channel", "group": "group", "tensor_group": "group"}


def _line(err: BaseException) -> str:
    """One line of an error: a pydantic ValidationError's field messages, else its first line."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        try:
            return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in errors())
        except Exception:
            pass
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _refuse(fmt: Any, why: str) -> ConfigError:
    return ConfigError(f"compressed-tensors format {fmt!r} is not readable: {why}")


@dataclass(frozen=True)
class _Group:
    name: str
    scheme: Any  # compressed_tensors.quantization.QuantizationScheme
    format: str
    act_order: bool


@dataclass(frozen=True)
class _Parsed:
    groups: tuple[_Group, ...]  # the groups that quantize weights, in config order
    ignore: tuple[str, ...]
    kv_cache: Any


def _parse(qconfig: dict) -> _Parsed:
    if not isinstance(qconfig, dict):
        raise ConfigError(f"quantization_config must be a mapping, got {type(qconfig).__name__}")
    try:
        key = json.dumps(qconfig, sort_keys=True, default=str)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"quantization_config is not JSON-like: {_line(e)}") from None
    return _parse_cached(key)


@functools.lru_cache(maxsize=16)
def _parse_cached(key: str) -> _Parsed:
    qconfig = json.loads(key)
    _refuse_unreadable(qconfig)
    top = qconfig.get("format")
    from compressed_tensors.quantization import QuantizationArgs

    config_groups = qconfig.get("config_groups")
    if not isinstance(config_groups, dict) or not config_groups:
        raise ConfigError("quantization_config.config_groups is missing or empty")
    groups = [g for name, raw in config_groups.items() if (g := _group(name, raw, top)) is not None]
    if not groups:
        raise ConfigError("quantization_config quantizes no weights (only activations / KV cache): nothing to dequantize")
    kv = qconfig.get("kv_cache_scheme")
    try:
        kv = QuantizationArgs.model_validate(kv) if kv else None
    except Exception as e:
        raise ConfigError(f"quantization_config.kv_cache_scheme: {_line(e)}") from None
    return _Parsed(tuple(groups), tuple(qconfig.get("ignore") or ()), kv)


def _refuse_unreadable(qconfig: dict) -> None:
    """What the whole checkpoint cannot be read as: another method, sparsity, rotations, pruned experts, a format."""
    method = qconfig.get("quant_method", "compressed-tensors")
    if method != "compressed-tensors":
        raise ConfigError(f"quantization_config.quant_method is {method!r}, not 'compressed-tensors'")

    sparsity = qconfig.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        sfmt = sparsity["format"]
        raise _refuse(sfmt, _WHY_NOT.get(sfmt, "a sparsity format (sparsity_config)"))
    transforms = (qconfig.get("transform_config") or {}).get("config_groups") or {}
    if transforms:
        kinds = sorted({str(t.get("type")) if isinstance(t, dict) else "?" for t in transforms.values()})
        raise ConfigError(
            f"compressed-tensors checkpoint with transforms ({', '.join(kinds)}: SpinQuant/QuIP-style rotations"
            f" in transform_config) is not readable: its weights live in the rotated basis")

    if qconfig.get("moe_sparsity_config"):
        raise ConfigError("compressed-tensors checkpoint with moe_sparsity_config (pruned / replaced experts)"
                          " is not readable into the base model")

    top = qconfig.get("format")
    if top not in READABLE_FORMATS and top != _MIXED:
        raise _refuse(top, _WHY_NOT.get(top, f"unknown (readable: {', '.join(READABLE_FORMATS)})"))


def _group(name: str, raw: Any, top: str | None) -> "_Group | None":
    """One config group as a readable weight scheme; None for an activation-only group."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    act_order = False
    try:
        if isinstance(raw, list):  # a preset name mapped to its targets
            scheme = preset_name_to_scheme(name, raw)
        else:
            raw = json.loads(json.dumps(raw))
            weights = raw.get("weights")
            if isinstance(weights, dict) and (weights.get("actorder") is True
                                              or str(weights.get("actorder")).lower() in ("group", "dynamic")):
                act_order = True  # removed from the library in 0.20: g_idx is handled here (module doc)
                weights["actorder"] = None
            scheme = QuantizationScheme.model_validate(raw)
    except Exception as e:  # pydantic ValidationError, KeyError of an unknown preset, ValueError
        fmt = raw.get("format", top) if isinstance(raw, dict) else top
        raise _refuse(fmt, f"config group {name!r} does not validate: {_line(e)}") from None
    if scheme.weights is None:
        return None  # activation-only group
    fmt = scheme.format if scheme.format is not None else (None if top == _MIXED else top)
    if fmt is None:
        import torch.nn as nn

        fmt = infer_module_format(nn.Linear, scheme)
    fmt = getattr(fmt, "value", fmt)
    if fmt not in READABLE_FORMATS:
        raise _refuse(fmt, _WHY_NOT.get(fmt, f"unknown (readable: {', '.join(READABLE_FORMATS)})"))
    _check(name, fmt, scheme.weights, act_order)
    return _Group(name, scheme, fmt, act_order)


def _check(name: str, fmt: str, w: Any, act_order: bool) -> None:
    """Refuse weight args the format's compressor (or quantlens's description) cannot take."""
    where = f"config group {name!r}"
    if w.dynamic:
        raise _refuse(fmt, f"{where} has dynamic weight scales (nothing stored to dequantize with)")
    if w.strategy not in ("tensor", "channel", "group", "tensor_group"):
        raise _refuse(fmt, f"{where} has weight strategy {w.strategy!r} (readable: tensor, channel, group)")
    is_int, is_fp = w.type == "int", w.type == "float"
    if fmt == "pack-quantized":
        ok = is_int and 1 <= w.num_bits <= 8 and w.strategy != "tensor_group"
    elif fmt == "float-quantized":
        ok = is_fp and w.num_bits == 8 and w.strategy != "tensor_group"
    elif fmt in ("naive-quantized", "int-quantized"):
        ok = ((is_int and w.num_bits <= 8) or (is_fp and w.num_bits == 8)) and w.strategy != "tensor_group"
    else:  # nvfp4-pack-quantized
        ok = is_fp and w.num_bits == 4 and w.group_size == 16 and w.strategy in ("group", "tensor_group")
    if not ok:
        raise _refuse(fmt, f"{where} stores {w.type}{w.num_bits} weights with strategy {w.strategy!r}"
                           f"{f', group_size {w.group_size}' if w.group_size else ''}, which this format does not hold")
    if is_fp and not w.symmetric:
        raise _refuse(fmt, f"{where} has asymmetric float weights")
    if act_order and not (fmt == "pack-quantized" and w.strategy in ("group", "channel")):
        raise _refuse(fmt, f"{where} has actorder 'group' (weight_g_idx), only read for pack-quantized group weights")


def _args_summary(a: Any) -> dict:
    fp = a.type == "float"
    return {"bits": a.num_bits, "num_format": "fp" if fp else "int", "element": _ELEMENT.get(a.num_bits) if fp else None,
            "granularity": _GRANULARITY.get(a.strategy, a.strategy),
            "group_size": a.group_size if a.group_size and a.group_size > 0 else None,
            "global_scale": "tensor" if a.strategy == "tensor_group" else None,
            "symmetric": a.symmetric, "dynamic": a.dynamic}


def _scale_name(fmt: str, a: Any) -> str:
    dtype = a.scale_dtype
    if fmt == "nvfp4-pack-quantized" and dtype is None:
        return "e4m3"  # the NVFP4 compressor's default block-scale dtype
    names = {torch.float8_e4m3fn: "e4m3", torch.float16: "fp16", torch.uint8: "e8m0"}
    return names.get(dtype, "fp32")


def describe(qconfig: dict) -> dict:
    """From a config.json's ``quantization_config`` (quant_method 'compressed-tensors'): a summary used
    for run params and for the quantlens weights spec (the first weight-quantizing config group; with
    several different weight schemes ``"mixed": True``). ``scale`` is "e4m3" for NVFP4's block scale,
    the config's ``scale_dtype`` where it names one, else "fp32": int and FP8 checkpoints store their
    scales in the model's float dtype (usually bf16), which the config does not say; :func:`dequantize`
    uses the stored tensors as they are. Raises ConfigError (one line) for anything it cannot read."""
    parsed = _parse(qconfig)
    first = parsed.groups[0]
    w = first.scheme.weights
    summary = _args_summary(w)
    kinds = {(g.format, json.dumps(g.scheme.weights.model_dump(mode="json"), sort_keys=True), g.act_order)
             for g in parsed.groups}
    acts = first.scheme.input_activations
    return {
        "format": first.format,
        "bits": w.num_bits,
        "num_format": summary["num_format"],
        "element": summary["element"],
        "group_size": summary["group_size"],
        "granularity": _GRANULARITY[w.strategy],
        "symmetric": w.symmetric,
        "scale": _scale_name(first.format, w),
        "global_scale": "tensor" if w.strategy == "tensor_group" else None,
        "act_order": first.act_order,
        "ignore": list(parsed.ignore),
        "activations": None if acts is None else _args_summary(acts),
        "kv_cache": None if parsed.kv_cache is None else _args_summary(parsed.kv_cache),
        "targets": list(first.scheme.targets),
        "mixed": len(kinds) > 1,
    }


def _targets_module(module: str, targets: Iterable[str]) -> bool:
    """A target names the module (exact or ``re:``), or is a class name ('Linear', ...) that names
    cannot be checked against: the stored keys then decide (as the library's own key matching does)."""
    from compressed_tensors.utils.match import match_name

    for t in targets:
        if t.startswith("re:") or "." in t:
            if match_name(module, t):
                return True
        elif t == module or t[:1].isupper():
            return True
    return False


def _ignored(module: str, ignore: Iterable[str]) -> bool:
    from compressed_tensors.utils.match import match_name

    return any(match_name(module, ign) for ign in ignore)


def _required(group: _Group) -> tuple[str, ...]:
    """The weight tensors the library's compressor reads for this group (its compression_param_names,
    less activation params and NVFP4's global scale where the strategy has none), + weight_g_idx."""
    from compressed_tensors.compressors import BaseCompressor

    names = BaseCompressor.get_value_from_registry(group.format).compression_param_names(group.scheme)
    names = [n for n in names if n.startswith("weight")]
    if group.scheme.weights.strategy != "tensor_group":
        names = [n for n in names if n != "weight_global_scale"]
    if group.act_order:
        names.append("weight_g_idx")
    return tuple(names)


def _group_for(module: str, present: set[str], parsed: _Parsed) -> _Group | None:
    for g in parsed.groups:
        if _targets_module(module, g.scheme.targets) and set(_required(g)) <= present:
            return g
    return None


def packed_modules(keys: Iterable[str], qconfig: dict) -> dict[str, list[str]]:
    """The modules whose weight is stored compressed: module prefix → every stored key its weight is
    rebuilt from (the format's keys: module doc; a stored weight_g_idx / weight_zero_point the scheme
    does not read is listed too, so that no key of the module is left over). Norms, embeddings and
    unquantized or ignored layers are not listed; activation params (input_scale, ...) neither."""
    parsed = _parse(qconfig)
    params: dict[str, set[str]] = {}
    for k in keys:
        module, _, name = k.rpartition(".")
        if name in _WEIGHT_PARAMS and module:
            params.setdefault(module, set()).add(name)
    out: dict[str, list[str]] = {}
    for module, present in params.items():
        compressed = bool(present & {"weight_packed", "weight_scale"})
        if not compressed or _ignored(module, parsed.ignore):
            continue
        group = _group_for(module, present, parsed)
        if group is None:
            raise ConfigError(f"{module}: stored {sorted(present)} match no config group of the quantization_config")
        names = list(_required(group)) + sorted(present & {"weight_g_idx", "weight_zero_point"} - set(_required(group)))
        out[module] = [f"{module}.{n}" for n in names]
    return out


def _sort_by_g_idx(state: dict, g_idx: torch.Tensor, args: Any) -> tuple[torch.Tensor | None, dict]:
    """Columns sorted by group (a permutation ``perm``) and the state dict of that column order."""
    from compressed_tensors.compressors.pack_quantized import pack_to_int32, unpack_from_int32

    shape = [int(s) for s in state["weight_shape"]]
    cols = shape[-1]
    g = g_idx.to(torch.long).reshape(-1)
    if g.numel() != cols:
        raise ConfigError(f"weight_g_idx has {g.numel()} entries for {cols} input features")
    if bool((g < 0).all()):
        return None, state  # never set (no act-order)
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], torch.arange(cols) // args.group_size):
        raise ConfigError(f"weight_g_idx does not put exactly group_size={args.group_size} columns in each group;"
                          " only GPTQ act-order g_idx is readable")
    if torch.equal(perm, torch.arange(cols)):
        return None, state
    q = unpack_from_int32(state["weight_packed"], args.num_bits, torch.Size(shape))
    state = dict(state)
    state["weight_packed"] = pack_to_int32(q[:, perm].contiguous(), args.num_bits)
    return perm, state


def dequantize(prefix: str, tensors: dict[str, torch.Tensor], qconfig: dict) -> torch.Tensor:
    """The module's weight [out_features, in_features] as float32, rebuilt from its stored tensors
    (keys as in :func:`packed_modules`, full or local names) by the compressed-tensors library's
    compressor for the format: ``BaseCompressor.get_value_from_registry(format).decompress(state,
    scheme)``; act-order g_idx as in the module doc."""
    from compressed_tensors.compressors import BaseCompressor

    parsed = _parse(qconfig)
    local = {(k[len(prefix) + 1:] if k.startswith(prefix + ".") else k): v for k, v in tensors.items()}
    group = _group_for(prefix, set(local), parsed)
    if group is None:
        raise ConfigError(f"{prefix}: tensors {sorted(local)} match no config group of the quantization_config")
    args = group.scheme.weights
    state = {n: local[n] for n in _required(group) if n != "weight_g_idx"}
    if group.format == "float-quantized" and state["weight"].dtype != torch.float8_e4m3fn:
        raise ConfigError(f"{prefix}.weight is {state['weight'].dtype}, float-quantized stores float8_e4m3fn")
    if group.format == "nvfp4-pack-quantized" and state["weight_packed"].dtype != torch.uint8:
        raise ConfigError(f"{prefix}.weight_packed is {state['weight_packed'].dtype}, NVFP4 packs into uint8")
    perm = None
    if "weight_g_idx" in local and args.strategy == "group" and group.format == "pack-quantized":
        perm, state = _sort_by_g_idx(state, local["weight_g_idx"], args)
    compressor = BaseCompressor.get_value_from_registry(group.format)
    try:
        weight = compressor.decompress(state, group.scheme)["weight"]
    except (ValueError, RuntimeError, AssertionError, KeyError, IndexError) as e:
        raise ConfigError(f"{prefix}: {group.format} decompression failed: {_line(e)}") from None
    if perm is not None:
        restored = torch.empty_like(weight)
        restored[:, perm] = weight
        weight = restored
    return weight.to(torch.float32)


# --- as a released-checkpoint layout (quantlens.checkpoints.layouts) -------------------------------
def released_fields(q: dict, what: str) -> dict:
    """The :class:`~quantlens.checkpoints.released.Released` fields of a compressed-tensors checkpoint."""
    d = describe(q)
    gran = d.get("granularity")
    r = dict(method="compressed-tensors", layout=f"ct-{d['format']}" + ("+mixed" if d.get("mixed") else ""), bits=int(d["bits"]),
             group_size=d.get("group_size") if gran == "group" else None, symmetric=bool(d.get("symmetric", True)),
             act_order=bool(d.get("act_order", False)), num_format=d.get("num_format", "int"), element=d.get("element"))
    if gran == "tensor" and r["num_format"] == "int":
        raise ConfigError(f"{what}: compressed-tensors with one integer scale per tensor is not a grid quantlens describes")
    return r


def _weight_shape(prefix: str, shapes: dict, load, r) -> tuple[int, ...] | None:
    """From the stored ``weight_shape`` tensor where the format keeps one, else the stored weight's."""
    ws = next(iter(load(lambda k: k.endswith("weight_shape")).values()), None)
    return tuple(int(d) for d in ws.tolist()) if ws is not None else shapes.get(prefix + ".weight")


LAYOUT = Layout("compressed-tensors", "compressed-tensors (pack-quantized, float-quantized, nvfp4-pack-quantized)",
                released_fields, lambda keys, r: packed_modules(keys, r.qconfig),
                lambda prefix, parts, r: dequantize(prefix, parts, r.qconfig).to(torch.float32), _weight_shape, order=2)
