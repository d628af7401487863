"""AWQ checkpoints in the GEMM packing (AutoAWQ / transformers' ``quant_method: awq``): ``qweight``,
``qzeros`` and ``scales`` per linear, 4 bits (:func:`quantlens.checkpoints.packing.awq_dequantize`)."""

from __future__ import annotations

from quantlens.checkpoints import packing as P
from quantlens.checkpoints.layouts import Layout
from quantlens.errors import ConfigError


def describe(q: dict, what: str) -> dict:
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise ConfigError(f"{what}: AWQ version {version!r} (quantlens reads the GEMM packing)")
    bits = int(q.get("bits", q.get("w_bit", 4)))
    if bits != 4:
        raise ConfigError(f"{what}: AWQ GEMM with {bits} bits (its packing holds 4)")
    group = int(q.get("group_size", q.get("q_group_size", 128)))
    return dict(method="awq", layout="awq-gemm", bits=4, group_size=None if group in (-1, 0) else group,
                symmetric=not bool(q.get("zero_point", True)), act_order=False)


def packed_modules(keys: set[str], r) -> dict[str, list[str]]:
    """Module prefix → qweight, qzeros, scales."""
    out = {}
    for k in keys:
        if k.endswith(".qweight"):
            p = k[: -len(".qweight")]
            out[p] = [k, p + ".qzeros", p + ".scales"]
    return out


def dequantize(prefix: str, parts: dict, r):
    return P.awq_dequantize(parts[prefix + ".qweight"], parts[prefix + ".qzeros"], parts[prefix + ".scales"])


def weight_shape(prefix: str, shapes: dict, load, r) -> tuple[int, ...]:
    return (shapes[prefix + ".qweight"][1] * 8, shapes[prefix + ".qweight"][0])


LAYOUT = Layout("awq", "AWQ (GEMM)", describe, packed_modules, dequantize, weight_shape,
                legacy_file="quant_config.json", order=1)
