"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers' ``quant_method: gptq``): ``qweight``,
``qzeros``, ``scales`` and, with act-order, ``g_idx`` per linear, in the v1 or v2 zero-point layout
(:func:`quantlens.checkpoints.packing.gptq_dequantize`)."""

from __future__ import annotations

from quantlens.checkpoints import packing as P
from quantlens.checkpoints.layouts import Layout
from quantlens.errors import ConfigError


def describe(q: dict, what: str) -> dict:
    bits = int(q.get("bits", 4))
    if bits not in P.PACK_BITS:
        raise ConfigError(f"{what}: GPTQ with {bits} bits (quantlens reads 2, 3, 4 and 8)")
    fmt = str(q.get("checkpoint_format", q.get("format", "gptq"))).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"{what}: GPTQ checkpoint_format {fmt!r} is repacked for a kernel (quantlens reads 'gptq' and 'gptq_v2')")
    group = int(q.get("group_size", 128))
    return dict(method="gptq", layout="gptq-v2" if fmt == "gptq_v2" else "gptq-v1", bits=bits,
                group_size=None if group in (-1, 0) else group, symmetric=bool(q.get("sym", True)),
                act_order=bool(q.get("desc_act", False)))


def packed_modules(keys: set[str], r) -> dict[str, list[str]]:
    """Module prefix → qweight, qzeros, scales (and g_idx where stored)."""
    out = {}
    for k in keys:
        if k.endswith(".qweight"):
            p = k[: -len(".qweight")]
            out[p] = [k, p + ".qzeros", p + ".scales"] + ([p + ".g_idx"] if p + ".g_idx" in keys else [])
    return out


def dequantize(prefix: str, parts: dict, r):
    return P.gptq_dequantize(parts[prefix + ".qweight"], parts[prefix + ".qzeros"], parts[prefix + ".scales"],
                             parts.get(prefix + ".g_idx"), r.bits, v1=r.layout == "gptq-v1")


def weight_shape(prefix: str, shapes: dict, load, r) -> tuple[int, ...]:
    return (shapes[prefix + ".scales"][1], shapes[prefix + ".qweight"][0] * 32 // r.bits)


LAYOUT = Layout("gptq", "GPTQ (v1/v2)", describe, packed_modules, dequantize, weight_shape,
                legacy_file="quantize_config.json", order=0)
