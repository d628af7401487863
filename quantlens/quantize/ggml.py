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

IQ4_NL (``quantize_row_iq4_nl_ref``): see :func:`_iq4_nl`.

Bits per weight count the stored codes and the fp16 ``d`` (and ``m``) of each block: Q4_0 4.5,
Q4_1 5.0, Q5_0 5.5, Q5_1 6.0, Q8_0 8.5. tests/test_ggml_quants.py checks every type against the
``gguf`` package's reference (llama.cpp's gguf-py) bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32  # QK8_0 = QK4_0 = QK4_1 = QK5_0 = QK5_1


@dataclass(frozen=True)
class GGMLType:
    """One llama.cpp block type: its name, code bits, scale rule and the llama.cpp function it follows."""

    name: str
    bits: int
    rule: str  # absmax | signed_max | minmax
    follows: str

    @property
    def symmetric(self) -> bool:
        return self.rule != "minmax"

    @property
    def bits_per_weight(self) -> float:
        """Codes plus the fp16 scale (and fp16 minimum) of each block of 32."""
        return self.bits + 16 * (1 if self.symmetric else 2) / BLOCK

    @property
    def scale_rule(self) -> str:
        return {"absmax": "d=max|x|/127", "signed_max": f"d=max/-{2 ** (self.bits - 1)}",
                "minmax": f"d=(max-min)/{2 ** self.bits - 1},m=min",
                "iq4nl": "kvalues, d=lsq"}[self.rule] + " fp16"


GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("q8_0", 8, "absmax", "quantize_row_q8_0_ref"),
        GGMLType("q4_0", 4, "signed_max", "quantize_row_q4_0_ref"),
        GGMLType("q4_1", 4, "minmax", "quantize_row_q4_1_ref"),
        GGMLType("q5_0", 5, "signed_max", "quantize_row_q5_0_ref"),
        GGMLType("q5_1", 5, "minmax", "quantize_row_q5_1_ref"),
        GGMLType("iq4_nl", 4, "iq4nl", "quantize_row_iq4_nl_ref"),
    )
}
# IQ4_NL's non-uniform 16-value codebook (ggml-common.h's kvalues_iq4nl), in the unit of d
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a block with max|x| below this is all zero (d = 0)


def ggml_type(bits: int, symmetric: bool, fmt: str = "ggml") -> GGMLType:
    """The type a spec (format ``ggml``, ``bits``, ``symmetric``) means: q{bits}_0 or q{bits}_1;
    format ``iq4nl``: IQ4_NL."""
    name = "iq4_nl" if fmt == "iq4nl" else f"q{bits}_{0 if symmetric else 1}"
    if name not in GGML_TYPES:
        raise ValueError(f"llama.cpp has no type {name} (legacy types: {', '.join(GGML_TYPES)})")
    return GGML_TYPES[name]


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
    if t.rule == "iq4nl":
        return _iq4_nl(xg)
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


def _best_index(al: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """ggml-quants.c's ``best_index_int8``: the nearest codebook entry, a tie going to the upper one."""
    mu = torch.searchsorted(values, al, right=True).clamp_(1, len(values) - 1)
    return torch.where(al - values[mu - 1] < values[mu] - al, mu - 1, mu)


def _iq4_nl(xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_row_iq4_nl_ref`` (``quantize_row_iq4_nl_impl`` with no importance weights and
    ``ntry = -1``): codes from ``d0 = max / −127`` (``max`` the signed value of largest magnitude), then
    the least-squares scale ``d = Σ w·q·x / Σ w·q²`` with ``w = x²``, summed in float32 in the
    source's order (no fused multiply-add), stored fp16; the codes are not recomputed from ``d``."""
    values = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=xg.device)
    mx = _signed_max(xg)
    empty = mx.abs() < GROUP_MAX_EPS
    idx = _best_index(xg * (mx / values[0]).where(~empty, torch.ones_like(mx)).reciprocal(), values)
    q = values[idx]
    sumqx = torch.zeros_like(mx)
    sumq2 = torch.zeros_like(mx)
    for j in range(xg.shape[-1]):
        x, qj = xg[..., j : j + 1], q[..., j : j + 1]
        w = x * x
        sumqx = sumqx + w * qj * x
        sumq2 = sumq2 + w * qj * qj
    d = _fp16(torch.where(empty, torch.zeros_like(mx), sumqx / sumq2))
    return q * d, idx.to(torch.float32), d
