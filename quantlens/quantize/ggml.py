"""llama.cpp's legacy block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and IQ4_NL as data, and their rounding, bit for bit.

Each type is one row of :data:`GGML_TYPES`: blocks of 32 weights along a row, an fp16 scale ``d``
(and for the ``_1`` types an fp16 minimum ``m``), and the integer codes llama.cpp stores. The
dequantized value is ``fp16(d) · q`` (``_0``) or ``fp16(d) · q + fp16(m)`` (``_1``), computed in
float32 exactly as ggml's ``dequantize_row_*`` does. The scale is formed in float32 from the
block, the codes from ``id = 1/d`` (0 for an all-zero block, whose values all dequantize to 0) —
not from the fp16-rounded ``d``, as in llama.cpp. The rules, per ``rule``:

- ``absmax`` (``quantize_row_q8_0_ref``): ``d = max|x| / 127``, ``q = roundf(x · id)`` (half away
  from zero), q ∈ [−127, 127];
- ``signed_max`` (``quantize_row_q4_0_ref``, ``quantize_row_q5_0_ref``): ``max`` is the signed value of
  largest magnitude (the first one on a tie), ``d = max / −2^(b−1)``, ``q = min(2^b − 1,
  (int)(x · id + 2^(b−1) + ½)) − 2^(b−1)``: the largest magnitude lands on −2^(b−1), the level
  with no positive twin;
- ``minmax`` (``quantize_row_q4_1_ref``, ``quantize_row_q5_1_ref``): ``d = (max − min) / (2^b − 1)``,
  ``m = min``, ``q = min(2^b − 1, (int)((x − min) · id + ½))``.

IQ4_NL and the k-quants (Q2_K … Q6_K, super-blocks of 256) are rows of the same table; their
quantizers, with llama-quantize's scale searches, are :mod:`quantlens.quantize.kquants`. A k-quant
whose super-block does not divide a row is written in its fallback type, as llama-quantize does.

Bits per weight are a block's bytes over its weights (ggml's ``type_size / blck_size``): Q4_0 4.5,
Q4_1 5.0, Q5_0 5.5, Q5_1 6.0, Q8_0 8.5, IQ4_NL 4.5, Q2_K 2.625, Q3_K 3.4375, Q4_K 4.5, Q5_K 5.5, Q6_K 6.5625. tests/test_ggml_quants.py checks every type against the
``gguf`` package's reference (llama.cpp's gguf-py) bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32  # QK8_0 = QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK4_NL
QK_K = 256  # a k-quant's super-block


@dataclass(frozen=True)
class GGMLType:
    """One llama.cpp type, as ggml's ``type_traits`` declare it: its name, code bits, scale rule, the
    block its scales cover (``block``: 32, or a k-quant's super-block of 256), the bytes a block takes
    (``type_size``), whether it stores a minimum, the llama.cpp function it follows, and — for a
    k-quant — the type llama-quantize writes instead for a row that does not divide into super-blocks
    (``llama_tensor_get_type``'s fallback)."""

    name: str
    bits: int
    rule: str  # absmax | signed_max | minmax | iq4nl | kquant
    follows: str
    block: int = BLOCK
    type_size: int = 0
    minimum: bool = False
    fallback: str | None = None

    @property
    def symmetric(self) -> bool:
        return not self.minimum

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: a block's bytes over its weights (Q4_0 4.5, Q4_K 4.5, Q6_K 6.5625)."""
        return self.type_size * 8 / self.block

    @property
    def scale_rule(self) -> str:
        if self.rule == "kquant":  # sub-blocks, and the bits of their scales (and mins) under the fp16 super-scale
            sub = 32 if self.name in ("q4_k", "q5_k") else 16
            bits = {"q2_k": 4, "q6_k": 8}.get(self.name, 6)
            return f"{self.block // sub}x{sub}, {bits}-bit scales{'+mins' if self.minimum else ''}, fp16 d"
        return {"absmax": "d=max|x|/127", "signed_max": f"d=max/-{2 ** (self.bits - 1)}",
                "minmax": f"d=(max-min)/{2 ** self.bits - 1},m=min",
                "iq4nl": "kvalues, d=lsq search"}[self.rule] + " fp16"

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dequantized float32 ``x`` [rows, n] (n a multiple of ``block``), its stored integer codes and
        the fp16 scale of each block: [rows, n/block, 1]."""
        xg = x.reshape(x.shape[0], -1, self.block).to(torch.float32)
        if self.rule in ("kquant", "iq4nl"):
            from quantlens.quantize import kquants

            y, parts = kquants.KQUANTS[self.name](xg.reshape(-1, self.block))
            return y.reshape(x.shape), parts["q"].reshape(x.shape), parts["d"].reshape(*xg.shape[:2], 1)
        xq, q, d = quantize_blocks(xg, self)
        return xq.reshape(x.shape), q.reshape(x.shape), d


GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("q8_0", 8, "absmax", "quantize_row_q8_0_ref", type_size=34),
        GGMLType("q4_0", 4, "signed_max", "quantize_row_q4_0_ref", type_size=18),
        GGMLType("q4_1", 4, "minmax", "quantize_row_q4_1_ref", type_size=20, minimum=True),
        GGMLType("q5_0", 5, "signed_max", "quantize_row_q5_0_ref", type_size=22),
        GGMLType("q5_1", 5, "minmax", "quantize_row_q5_1_ref", type_size=24, minimum=True),
        GGMLType("iq4_nl", 4, "iq4nl", "quantize_iq4_nl (ntry 7: llama-quantize without an imatrix)", type_size=18),
        GGMLType("q2_k", 2, "kquant", "quantize_row_q2_K_ref", QK_K, 84, True, "q4_0"),
        GGMLType("q3_k", 3, "kquant", "quantize_row_q3_K_ref", QK_K, 110, False, "q4_0"),
        GGMLType("q4_k", 4, "kquant", "quantize_row_q4_K_ref", QK_K, 144, True, "q5_0"),
        GGMLType("q5_k", 5, "kquant", "quantize_row_q5_K_ref", QK_K, 176, True, "q5_1"),
        GGMLType("q6_k", 6, "kquant", "quantize_row_q6_K_ref", QK_K, 210, False, "q8_0"),
    )
}


def ggml_type(bits: int, symmetric: bool, fmt: str = "ggml", block: int = BLOCK) -> GGMLType:
    """The type a spec (format ``ggml``, ``bits``, ``symmetric``, its ``block``) means: q{bits}_0 or
    q{bits}_1 on blocks of 32, a k-quant q{bits}_k on super-blocks of 256; format ``iq4nl``: IQ4_NL."""
    if fmt == "iq4nl":
        return GGML_TYPES["iq4_nl"]
    found = [t for t in GGML_TYPES.values() if (t.bits, t.symmetric, t.block, t.rule == "iq4nl") == (bits, symmetric, block, False)]
    if not found:
        known = ", ".join(f"{t.name} ({t.bits} bits, {'symmetric' if t.symmetric else 'with a minimum'}, blocks of {t.block})"
                          for t in GGML_TYPES.values() if t.rule != "iq4nl")
        raise ValueError(f"llama.cpp has no type of {bits} bits, {'symmetric' if symmetric else 'with a minimum'}, "
                         f"on blocks of {block} (types: {known})")
    return found[0]


def type_for_row(t: GGMLType, n: int) -> GGMLType:
    """The type llama-quantize writes for rows of ``n`` weights: ``t``, or its fallback when a
    k-quant's super-block does not divide the row (``tensor_type_fallback``, llama.cpp since 2026-03:
    Q2_K, Q3_K → Q4_0; Q4_K → Q5_0; Q5_K → Q5_1; Q6_K → Q8_0 — SmolLM2's 576-wide rows). Where 32
    does not divide the row either llama.cpp keeps it in F16; quantlens refuses the setting instead
    (a partial "W4" is never silent)."""
    if n % t.block and t.fallback is not None:
        return GGML_TYPES[t.fallback]
    return t


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``id = d ? 1/d : 0`` in float32, as llama.cpp forms it."""
    return torch.where(d == 0, torch.zeros_like(d), d.reciprocal())


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """The float32 value of ``t`` stored as fp16 (round to nearest even, as ``GGML_FP32_TO_FP16``)."""
    return t.to(torch.float16).to(torch.float32)


def _roundf(y: torch.Tensor) -> torch.Tensor:
    """C's ``roundf`` (half away from zero) exactly, as gguf's ``np_roundf`` forms it: no ``|y| + ½`` rounding up."""
    a = y.abs()
    f = a.floor()
    return (a - f).mul_(2).floor_().add_(f).mul_(y.sign())


def _signed_max(xg: torch.Tensor) -> torch.Tensor:
    """The signed value of largest magnitude of each block (the first one on a tie, as llama.cpp's loop)."""
    return xg.gather(-1, xg.abs().argmax(dim=-1, keepdim=True))


def quantize_blocks(xg: torch.Tensor, t: GGMLType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dequantized float32 ``xg`` [rows, groups, 32] under llama.cpp's type ``t``, its integer codes
    (as stored: unsigned for q4/q5, int8 values for q8_0, as float32) and the fp16 ``d`` per block."""
    if t.rule == "absmax":
        d = xg.abs().amax(dim=-1, keepdim=True) / 127
        q = _roundf(xg * _inverse(d))
        return q * _fp16(d), q, _fp16(d)
    half, top = 2 ** (t.bits - 1), 2**t.bits - 1
    if t.rule == "signed_max":
        d = _signed_max(xg) / -half
        q = (xg * _inverse(d)).add_(half + 0.5).trunc_().clamp_(0, top)
        return (q - half) * _fp16(d), q, _fp16(d)
    lo, hi = xg.amin(dim=-1, keepdim=True), xg.amax(dim=-1, keepdim=True)
    d = (hi - lo) / top
    q = (xg - lo).mul_(_inverse(d)).add_(0.5).trunc_().clamp_(0, top)
    return (q * _fp16(d)).add_(_fp16(lo)), q, _fp16(d)
