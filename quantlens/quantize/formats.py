"""Number formats as data: the grid a b-bit quantizer rounds onto, and the rule that scales a group onto it.

A quantizer is two orthogonal pieces (the first paper's question — where should a b-bit grid put its
levels? — is a question about the first):

- a **grid** of representable values, in the unit where its largest magnitude is ``qmax``:
  symmetric integers (``qmax = 2^(b-1) − 1``), a **minifloat** (sign, ``ebits`` exponent and
  ``mbits`` mantissa bits, subnormals, round to nearest even, saturating at its largest normal),
  or a **codebook** (NormalFloat: quantiles of a normal, ``qmax = 1``). Each grid is a row of a
  table below, not a branch of code.
- a **scale rule**: the group's range α (max|x|, or k·σ clipped) maps onto ``qmax`` with a scale
  kept in ``fp32``, rounded to ``fp16``, rounded to **E4M3** (NVFP4's block scale, optionally
  over a second fp32 scale of the whole tensor or token), or the power of two **E8M0** of OCP
  microscaling: ``2^(⌊log2 α⌋ − emax)``, ``emax`` = the exponent of the grid's largest value.

Q(x) = s · grid(x / s). Codebooks fitted on the values themselves (k-means per row) have no scale:
:func:`kmeans_rows` fits 2^b centroids per row and :func:`round_to_rows` rounds onto them.
Everything is float32 and pure: shapes are ``[rows, groups, group_len]`` (see ``quant._grouped``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

# --- Minifloats ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Minifloat:
    """A sign bit, ``ebits`` exponent bits (bias 2^(ebits−1) − 1), ``mbits`` mantissa bits,
    subnormals; ``max`` is the largest finite value (E4M3 "fn": 448, no infinities)."""

    name: str
    ebits: int
    mbits: int
    max: float

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def bias(self) -> int:
        return 2 ** (self.ebits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal (subnormals share its quantum)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        return math.floor(math.log2(self.max))


MINIFLOATS: dict[str, Minifloat] = {
    m.name: m
    for m in (
        Minifloat("e4m3", 4, 3, 448.0),  # FP8 (OCP / NVIDIA "fn": the top mantissa of e=15 is NaN)
        Minifloat("e5m2", 5, 2, 57344.0),  # FP8, IEEE-like
        Minifloat("e2m3", 2, 3, 7.5),  # FP6 (OCP MX)
        Minifloat("e3m2", 3, 2, 28.0),  # FP6 (OCP MX)
        Minifloat("e2m1", 2, 1, 6.0),  # FP4: 0, 0.5, 1, 1.5, 2, 3, 4, 6
    )
}
DEFAULT_ELEMENT = {8: "e4m3", 6: "e2m3", 4: "e2m1"}  # the element a "FP<bits>" name means


def _exponent(a: torch.Tensor) -> torch.Tensor:
    """⌊log2 a⌋ of positive float32 ``a``, exactly, from the exponent bits (0 and fp32 subnormals: −127)."""
    return (a.contiguous().view(torch.int32) >> 23) - 127


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as float32 for integer ``e`` in [−126, 127], built from the exponent bits (exact)."""
    return ((e + 127) << 23).view(torch.float32)


_NATIVE = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}  # minifloats torch can cast to (CPU and GPU)


def round_minifloat(y: torch.Tensor, fmt: Minifloat, native: bool = True) -> torch.Tensor:
    """Nearest value of ``fmt`` to float32 ``y``: round half to even, subnormals, saturating at ±max.

    The quantum of |y| is 2^(e − mbits) with e = max(⌊log2|y|⌋, emin); y / quantum is exact (a
    power of two) and ``round`` is half-to-even, so the result equals a hardware RNE cast. FP8 uses
    torch's own cast (``native``; one kernel, the same values — tests/test_formats.py checks both)."""
    dtype = getattr(torch, _NATIVE.get(fmt.name, ""), None) if native else None
    if dtype is not None:
        return y.clamp(-fmt.max, fmt.max).to(dtype).to(torch.float32)
    eb = y.abs().view(torch.int32).bitwise_right_shift_(23).clamp_(fmt.emin + 127, fmt.emax + 128)  # biased exponent
    inv = eb.neg().add_(254 + fmt.mbits).bitwise_left_shift_(23).view(torch.float32)  # 2^(mbits − e)
    quantum = eb.sub_(fmt.mbits).bitwise_left_shift_(23).view(torch.float32)  # 2^(e − mbits)
    return inv.mul_(y).round_().mul_(quantum).clamp_(-fmt.max, fmt.max)


# --- Codebooks ------------------------------------------------------------------------------------------

# bitsandbytes' NF4 table (QLoRA): 16 quantiles of N(0, 1), normalised to [−1, 1], with an exact 0.
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


# FLUTE's NF3 (HanGuo97/flute, nf_utils.get_values_pivots): the same construction, evaluated in float32.
NF3 = (-1.0, -0.4786290228366852, -0.21714170277118683, 0.0, 0.16093012690544128, 0.3379150927066803,
       0.5626168251037598, 1.0)


@lru_cache(maxsize=None)
def normal_float(bits: int) -> tuple[float, ...]:
    """The 2^b NormalFloat levels: QLoRA's construction at any width (NF4 is bitsandbytes' table).

    2^(b−1) positive quantiles Φ⁻¹(linspace(δ, ½, 2^(b−1)+1)[:-1]), 2^(b−1) − 1 negative ones
    −Φ⁻¹(linspace(δ, ½, 2^(b−1))[:-1]) and an exact zero, divided by the largest, with δ =
    1 − ½(1/32 + 1/30) = 0.9677 (QLoRA's offset, which FLUTE's NF3 keeps): asymmetric, so
    that 0 is a level and ±1 are both levels."""
    if bits in (3, 4):
        return NF3 if bits == 3 else NF4
    half = 2 ** (bits - 1)
    offset = 1 - 0.5 * (1 / 32 + 1 / 30)
    ndtri = lambda p: torch.special.ndtri(torch.tensor(p, dtype=torch.float64))  # noqa: E731
    pos = ndtri([offset + (0.5 - offset) * i / half for i in range(half)])
    neg = -ndtri([offset + (0.5 - offset) * i / (half - 1) for i in range(half - 1)]) if half > 1 else torch.zeros(0, dtype=torch.float64)
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return tuple(float(t) for t in (v / v.abs().max()).to(torch.float32))


@lru_cache(maxsize=64)
def _codebook_tensors(values: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.tensor(values, dtype=torch.float32, device=device)
    return v, (v[1:] + v[:-1]) / 2


def round_to_codebook(y: torch.Tensor, values: tuple[float, ...]) -> torch.Tensor:
    """Nearest entry of a sorted codebook (a tie goes to the lower entry)."""
    v, mid = _codebook_tensors(values, y.device)
    return v[torch.bucketize(y, mid)]


def round_to_rows(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest of each row's own sorted centroids: ``x`` [rows, n], ``centroids`` [rows, k]."""
    mid = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return centroids.gather(1, torch.searchsorted(mid.contiguous(), x.contiguous()))


def kmeans_rows(x: torch.Tensor, k: int, iters: int = 30, chunk_rows: int = 4096) -> torch.Tensor:
    """``k`` centroids per row of ``x`` [rows, n] by Lloyd's algorithm in one dimension (sorted, so
    assignment is a search over midpoints), started at the row's (i + ½)/k quantiles: deterministic,
    no random seed needed. Stops when no assignment changes; an empty cluster keeps its centroid.
    Rows are processed ``chunk_rows`` at a time to bound memory."""
    out = []
    for xs in x.split(chunk_rows):
        n = xs.shape[1]
        srt = xs.sort(-1).values
        pos = ((torch.arange(k, device=xs.device, dtype=torch.float64) + 0.5) * n / k).long().clamp_(max=n - 1)
        c = srt[:, pos].contiguous()
        prev = None
        for _ in range(iters):
            idx = torch.searchsorted(((c[:, 1:] + c[:, :-1]) / 2).contiguous(), srt)
            if prev is not None and torch.equal(idx, prev):
                break
            prev = idx
            sums = torch.zeros_like(c).scatter_add_(1, idx, srt)
            cnt = torch.zeros_like(c).scatter_add_(1, idx, torch.ones_like(srt))
            c = torch.where(cnt > 0, sums / cnt.clamp_min(1), c).sort(-1).values
        out.append(c)
    return torch.cat(out)


# --- Grids ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """The representable values of one format, in the unit where the largest is ``qmax``."""

    name: str
    qmax: float
    minifloat: Minifloat | None = None
    codebook: tuple[float, ...] | None = None

    @property
    def emax(self) -> int:
        """Exponent of the largest value: the E8M0 scale is 2^(⌊log2 α⌋ − emax) (OCP MX)."""
        return math.floor(math.log2(self.qmax))

    def round(self, y: torch.Tensor) -> torch.Tensor:
        if self.minifloat is not None:
            return round_minifloat(y, self.minifloat)
        if self.codebook is not None:
            return round_to_codebook(y, self.codebook)
        return torch.round(y).clamp_(-self.qmax, self.qmax)


def int_grid(bits: int) -> Grid:
    return Grid(f"int{bits}", float(2 ** (bits - 1) - 1))


def grid_for(fmt: str, bits: int, element: str | None) -> Grid:
    """The grid of a spec's ``format`` (``int``, ``fp``, ``nf``) at ``bits``."""
    if fmt == "fp":
        m = MINIFLOATS[element or DEFAULT_ELEMENT[bits]]
        return Grid(f"fp{m.bits}-{m.name}", m.max, minifloat=m)
    if fmt == "nf":
        return Grid(f"nf{bits}", 1.0, codebook=normal_float(bits))
    return int_grid(bits)


# --- Scale rules ------------------------------------------------------------------------------------------
E4M3 = MINIFLOATS["e4m3"]
E4M3_TINY = 2.0**-6  # smallest normal E4M3: NVFP4 block scales are clamped to [2^-6, 448] (torchao)
_FP16_MIN, _FP16_MAX = 2.0**-24, 65504.0
_MIN_SCALE = 1e-12
_MIN_RANGE = 1e-38  # an all-zero block (bitsandbytes clamps absmax there too)


def block_scale(alpha: torch.Tensor, grid: Grid, rule: str, outer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale s mapping a group's range α onto ``grid.qmax`` under ``rule``, and the factor the
    group is multiplied by to land on the grid (1/s, formed as the reference libraries form it), float32.

    ``fp32``: α/qmax (bitsandbytes' blockwise absmax for NF4); ``fp16``: α/qmax rounded to fp16
    (saturating); ``e8m0``: 2^(⌊log2 α⌋ − emax), exponent clamped to [−127, 127], 2^−127 for an
    all-zero block (OCP MX, torchao's FLOOR mode); ``e4m3``: α/qmax rounded to E4M3 within
    [2^−6, 448], or with ``outer`` (the amax of the tensor or token, NVFP4's second level)
    t = outer/(448·qmax), s8 = E4M3(α/qmax / t) and s = t·s8, the group multiplied by (1/t)/s8."""
    if rule == "e8m0":
        e = (_exponent(alpha) - grid.emax).clamp_(-127, 127)
        s = torch.where(e > -127, _pow2(e.clamp(min=-126)), torch.full_like(alpha, 2.0**-127))
        return s, _pow2((-e).clamp(max=127))
    raw = alpha / grid.qmax
    if rule == "fp16":
        s = raw.clamp(_FP16_MIN, _FP16_MAX).to(torch.float16).to(torch.float32)
        return s, s.reciprocal()
    if rule == "e4m3":
        if outer is None:
            s = round_minifloat(raw.clamp(E4M3_TINY, E4M3.max), E4M3)
            return s, s.reciprocal()
        t = (outer / (E4M3.max * grid.qmax)).clamp_min(_MIN_SCALE)
        s8 = round_minifloat((raw / t).clamp_(E4M3_TINY, E4M3.max), E4M3)
        return t * s8, t.reciprocal() / s8
    s = raw.clamp_min(_MIN_RANGE)
    return s, s.reciprocal()
