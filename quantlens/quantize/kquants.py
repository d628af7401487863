"""llama.cpp's k-quants (Q2_K … Q6_K) and IQ4_NL without an importance matrix, bit for bit, in torch.

Each function takes float32 weights ``x`` [rows, n] (n a multiple of the super-block, 256 for the
k-quants, 32 for IQ4_NL) and returns the dequantized float32 tensor exactly as llama.cpp's
``dequantize_row_*`` would produce it from the blocks its reference quantizer writes, together with
the stored integers (codes, sub-block scales and mins, the fp16 super-scales) as a dict.

They follow, step by step, ``ggml/src/ggml-quants.c`` (ggml-org/ggml d99724f, llama.cpp 2026-08):

- ``q2_k``: ``quantize_row_q2_K_ref`` — 16 sub-blocks of 16, ``make_qkx2_quants(16, 3, …, weights
  |x|, rmin −0.5, rdelta 0.1, 15 steps, use_mad)``; scales and mins to 4 bits against their maxima,
  fp16 ``d`` and ``dmin``; codes requantized with the stored scales.
- ``q3_k``: ``quantize_row_q3_K_ref`` — 16 sub-blocks of 16, ``make_q3_quants(16, 4, …, do_rmse)``
  (a weighted coordinate descent over the codes, 5 passes); scales to 6-bit signed against the scale
  of largest magnitude (−32 … 31), fp16 ``d``; codes requantized in −4 … 3.
- ``q4_k`` / ``q5_k``: ``quantize_row_q4_K_ref`` / ``quantize_row_q5_K_ref`` — 8 sub-blocks of 32,
  weights ``sqrt(mean x²) + |x|``, ``make_qkx2_quants(32, 15|31, …, rmin −1|−0.5, rdelta 0.1, 20|15
  steps)``; scales and mins to 6 bits, fp16 ``d`` and ``dmin``; codes requantized.
- ``q6_k``: ``quantize_row_q6_K_ref`` — 16 sub-blocks of 16, ``make_qx_quants(16, 32, …, rmse_type
  1)`` (19 scale candidates, weights x²); scales to int8 against the scale of largest magnitude
  (−128), fp16 ``d``; codes requantized in −32 … 31.
- ``iq4_nl``: ``quantize_row_iq4_nl_impl(32, 32, 16, …, kvalues_iq4nl, quant_weights NULL, ntry)``:
  a 16-entry non-uniform codebook per block of 32, weights x², the least-squares scale of the
  first assignment, then (``ntry`` = 7, what ``quantize_iq4_nl`` — llama-quantize's path without an
  imatrix — runs) 15 more candidate scales, and the codes re-assigned with the chosen scale;
  ``ntry`` = −1 is ``quantize_row_iq4_nl_ref`` (no search).

Bit-exactness needs C's float32 arithmetic in C's order: every sum is accumulated sequentially over
the sub-block (a Python loop over the 16/32 positions, all sub-blocks of the tensor at once), every
product is formed in the order the C expression writes it (``w*x*l`` is ``(w·x)·l``), no fused
multiply-add, ``nearest_int`` is round-half-even (``torch.round``), and a "first on ties" arg-max is
``argmax`` (which returns the first). ``bench/ggml_reference.py`` compiles ggml-quants.c and
checks every function here against it; tests/test_kquants.py checks the output against the
``gguf`` package's own dequantizers after packing into the GGUF block layout.
"""

from __future__ import annotations

from typing import Callable

import torch

QK_K = 256
QK4_NL = 32
GROUP_MAX_EPS = 1e-15
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

Result = tuple[torch.Tensor, dict[str, torch.Tensor]]


# --- C's arithmetic, vectorised over sub-blocks ------------------------------------------------------
def fp16(t: torch.Tensor) -> torch.Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(t))``: round to nearest even fp16, back to float32."""
    return t.to(torch.float16).to(torch.float32)


def sqrtf(t: torch.Tensor) -> torch.Tensor:
    """C's correctly rounded ``sqrtf``: through float64 (exact for float32 inputs). torch's own float32
    ``sqrt`` on CPU is off by an ulp on some inputs (measured: torch 2.x, e.g. sqrt(0.0009503078f))."""
    return torch.sqrt(t.to(torch.float64)).to(torch.float32)


def seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in C's order (``s = 0; for i: s += t[i]``), float32."""
    s = torch.zeros(t.shape[:-1], dtype=t.dtype, device=t.device)
    for i in range(t.shape[-1]):
        s = s + t[..., i]
    return s


def signed_max(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude over the last dim, the first one on a tie (``if (ax > amax)``)."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def _int(t: torch.Tensor) -> torch.Tensor:
    """An integer-valued float tensor with −0 made +0, as C's ints convert (``round(−0.4)`` is −0 in torch)."""
    return t + 0.0


def div(a: float, t: torch.Tensor) -> torch.Tensor:
    """``a / t`` as C divides: one correctly rounded float32 division. (``a / t`` with a Python number on
    the left is ``t.reciprocal() * a`` in torch: two roundings, an ulp off; ``1 / t`` alone is exact.)"""
    return torch.full_like(t, a) / t


def _safe(den: torch.Tensor) -> torch.Tensor:
    """A denominator with zeros replaced by one: the lanes it guards are masked out afterwards."""
    return torch.where(den == 0, torch.ones_like(den), den)


# --- The scale searches ----------------------------------------------------------------------------------
def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)`` for every row of ``x`` [B, n]: the
    symmetric scale (the largest magnitude on −nmax, then 18 nudged candidates, each the weighted
    least-squares fit with weights x²) and the codes L = l + nmax, l ∈ [−nmax, nmax − 1]."""
    mx = signed_max(x)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)[:, None]
    w = x * x

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        l = torch.round(iscale * x).clamp_(-nmax, nmax - 1)
        return l, seq_sum(w * x * l), seq_sum(w * l * l)

    l, sumlx, suml2 = fit(torch.tensor(-nmax, dtype=torch.float32) / mx)
    scale = torch.where(suml2 != 0, sumlx / _safe(suml2), torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        nudged = torch.tensor(nmax, dtype=torch.float32) + torch.tensor(0.1, dtype=torch.float32) * step
        lc, slx, sl2 = fit(-nudged / mx)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        l = torch.where(better[:, None], lc, l)
        scale = torch.where(better, slx / _safe(sl2), scale)
        best = torch.where(better, scale * slx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0.0, l + nmax)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: the codes of the largest magnitude on −nmax,
    then up to 5 passes of coordinate descent (each code moved to the value that maximises
    (Σwxl)²/Σwl² given the others, weights x², accepted only if that ratio grows), in C's order."""
    mx = signed_max(x)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)[:, None]
    w = x * x
    L = torch.round(torch.tensor(-nmax, dtype=torch.float32) / mx * x).clamp_(-nmax, nmax - 1)
    sumlx, suml2 = seq_sum(w * x * L), seq_sum(w * L * L)
    for _ in range(5):  # a pass that changes nothing leaves the state as it is: running all 5 is the same
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = torch.round(xi * sl2 / torch.where(slx > 0, slx, torch.ones_like(slx))).clamp_(-nmax, nmax - 1)
            slx2 = slx + wi * xi * new
            sl22 = sl2 + wi * new * new
            take = (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / _safe(suml2), torch.zeros_like(sumlx))
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0.0, L + nmax)


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants``: an asymmetric fit ``scale·L + min`` (min ≤ 0) of each row of ``x`` [B, n]
    with weights ``w``: the min/max fit, then ``nstep + 1`` candidate ranges, each refitted by weighted
    least squares (scale and min together), kept when its weighted error (squared, or absolute with
    ``use_mad``) is lower. Returns (scale, −min, L)."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    lo = x.amin(dim=1).clamp(max=0.0)
    hi = x.amax(dim=1)
    flat = hi == lo
    sum_w, sum_x = seq_sum(w), seq_sum(w * x)

    def err(scale: torch.Tensor, mn: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        diff = scale[:, None] * L + mn[:, None] - x
        return seq_sum(w * (diff.abs() if use_mad else diff * diff))

    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    iscale = div(nmax, span)
    scale = 1 / iscale
    L = torch.round(iscale[:, None] * (x - lo[:, None])).clamp_(0, nmax)
    best = err(scale, lo, L)
    mn = lo
    for step in range(nstep + 1):
        span = torch.where(flat, torch.ones_like(hi), hi - mn)
        iscale = (f32(rmin) + f32(rdelta) * step + nmax) / span
        La = torch.round(iscale[:, None] * (x - mn[:, None])).clamp_(0, nmax)
        sum_l, sum_l2, sum_xl = seq_sum(w * La), seq_sum(w * La * La), seq_sum(w * La * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / _safe(D)
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / _safe(D)
        pos = this_min > 0
        this_min = torch.where(pos, 0.0, this_min)
        this_scale = torch.where(pos, sum_xl / _safe(sum_l2), this_scale)
        cur = err(this_scale, this_min, La)
        take = (D > 0) & (cur < best) & ~flat
        L = torch.where(take[:, None], La, L)
        best, scale, mn = torch.where(take, cur, best), torch.where(take, this_scale, scale), torch.where(take, this_min, mn)
    return torch.where(flat, 0.0, scale), torch.where(flat, -lo, -mn), torch.where(flat[:, None], 0.0, _int(L))


# --- The types --------------------------------------------------------------------------------------------
def _super_blocks(x: torch.Tensor, sub: int, qk: int = QK_K) -> torch.Tensor:
    """``x`` [rows, n] as [rows·n/qk · qk/sub, sub]: every sub-block a row, super-blocks in order."""
    if x.shape[-1] % qk:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of {qk}")
    return x.reshape(-1, sub).to(torch.float32).contiguous()


def _requantize(x: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, L: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Codes from the stored per-sub-block scale ``d`` (and min ``dm``): ``nearest_int((x + dm)/d)``
    clamped to [lo, hi], shifted to unsigned; a sub-block whose ``d`` is 0 keeps ``L``."""
    num = x if dm is None else x + dm[:, None]
    q = _int(torch.round(num / _safe(d)[:, None]).clamp_(lo, hi) - lo)
    return torch.where((d == 0)[:, None], L, q)


def _asymmetric(x: torch.Tensor, sub: int, bits_sc: int, fit: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], nmax: int) -> Result:
    """The k-quants with a min (Q2_K, Q4_K, Q5_K): sub-block scales and mins against their maxima on
    ``2^bits_sc − 1`` levels, fp16 ``d``/``dmin``, codes requantized; y = d·sc·q − dmin·m."""
    xs = _super_blocks(x, sub)
    nsub = QK_K // sub
    scales, mins, L = fit(xs)
    scales, mins = scales.reshape(-1, nsub), mins.reshape(-1, nsub)
    top = 2**bits_sc - 1
    max_scale = scales.amax(dim=1).clamp(min=0.0)
    max_min = mins.amax(dim=1).clamp(min=0.0)
    inv_s = torch.where(max_scale > 0, div(top, _safe(max_scale)), 0.0)
    inv_m = torch.where(max_min > 0, div(top, _safe(max_min)), 0.0)
    sc = _int(torch.round(inv_s[:, None] * scales).clamp_(max=top))
    m = _int(torch.round(inv_m[:, None] * mins).clamp_(max=top))
    d, dmin = fp16(max_scale / top), fp16(max_min / top)
    ds = (d[:, None] * sc).reshape(-1)
    dms = (dmin[:, None] * m).reshape(-1)
    q = _requantize(xs, ds, dms, L, 0, nmax)
    y = ds[:, None] * q - dms[:, None]
    return y.reshape(x.shape), {"q": q, "sc": sc, "m": m, "d": d, "dmin": dmin}


def q4_k(x: torch.Tensor) -> Result:
    """``quantize_row_q4_K_ref`` then ``dequantize_row_q4_K``."""
    return _asymmetric(x, 32, 6, lambda xs: _qkx2_rms(xs, 15, -1.0, 20), 15)


def q5_k(x: torch.Tensor) -> Result:
    """``quantize_row_q5_K_ref`` then ``dequantize_row_q5_K``."""
    return _asymmetric(x, 32, 6, lambda xs: _qkx2_rms(xs, 31, -0.5, 15), 31)


def q2_k(x: torch.Tensor) -> Result:
    """``quantize_row_q2_K_ref`` then ``dequantize_row_q2_K``."""
    return _asymmetric(x, 16, 4, lambda xs: make_qkx2_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, True), 3)


def _qkx2_rms(xs: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """Q4_K / Q5_K's weights ``sqrtf(Σx²/32) + |x|`` and their ``make_qkx2_quants`` call."""
    av = sqrtf(seq_sum(xs * xs) / 32)
    return make_qkx2_quants(xs, av[:, None] + xs.abs(), nmax, rmin, 0.1, nstep, False)


def _symmetric(x: torch.Tensor, fit: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], eps: float,
               nsc: int, lo_sc: int, hi_sc: int, zero_sc: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q3_K / Q6_K: 16 sub-blocks of 16, each scale against the scale of largest magnitude mapped onto
    −``nsc`` (stored in [lo_sc, hi_sc]), fp16 ``d = 1/iscale``; a super-block whose largest scale is
    below ``eps`` has d = 0 and every scale ``zero_sc`` (what its zeroed bytes decode to). Returns (sub-blocks, codes L from
    the fit, stored scales, d per super-block, d·sc per sub-block)."""
    xs = _super_blocks(x, 16)
    scales, L = fit(xs)
    scales = scales.reshape(-1, 16)
    max_scale = signed_max(scales)
    nz = ~(max_scale.abs() < eps) if eps else max_scale != 0
    iscale = torch.tensor(-float(nsc), dtype=torch.float32) / _safe(max_scale)
    sc = torch.where(nz[:, None], _int(torch.round(iscale[:, None] * scales).clamp_(lo_sc, hi_sc)), zero_sc)
    d = torch.where(nz, fp16(1 / iscale), 0.0)
    return xs, L, sc, d, nz, (d[:, None] * sc).reshape(-1)


def q6_k(x: torch.Tensor) -> Result:
    """``quantize_row_q6_K_ref`` then ``dequantize_row_q6_K`` (y = d·sc·q, q ∈ [−32, 31])."""
    xs, L, sc, d, nz, ds = _symmetric(x, lambda v: make_qx_quants(v, 32), GROUP_MAX_EPS, 128, -128, 127, 0.0)
    nz = nz.repeat_interleave(16)  # an all-zero super-block is written as zeros (memset)
    q = torch.where(nz[:, None], _requantize(xs, ds, None, L, -32, 31), 0.0)
    y = ds[:, None] * (q - 32)
    return y.reshape(x.shape), {"q": q, "sc": sc, "d": d}


def q3_k(x: torch.Tensor) -> Result:
    """``quantize_row_q3_K_ref`` then ``dequantize_row_q3_K`` (y = d·(sc−32)·q, q ∈ [−4, 3], the
    sub-block scale stored as 6 unsigned bits sc + 32)."""
    xs, L, sc, d, _, _ = _symmetric(x, lambda v: make_q3_quants(v, 4), 0.0, 32, -32, 31, -32.0)
    ds = (d[:, None] * sc).reshape(-1)
    q = _requantize(xs, ds, None, L, -4, 3)
    y = ds[:, None] * (q - 4)
    return y.reshape(x.shape), {"q": q, "sc": sc + 32, "d": d}


def best_index_iq4nl(y: torch.Tensor) -> torch.Tensor:
    """``best_index_int8(16, kvalues_iq4nl, y)``: the entry whose midpoints bracket ``y`` (compared
    at twice the scale, ``y + y >= v[j−1] + v[j]``, exact in float32)."""
    v = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=y.device)
    return torch.bucketize(y + y, v[1:] + v[:-1], right=True)


def iq4_nl(x: torch.Tensor, ntry: int = 7) -> Result:
    """``quantize_row_iq4_nl_impl(32, 32, 16, …, quant_weights NULL, ntry)`` then
    ``dequantize_row_iq4_nl`` (y = fp16(d)·kvalues[L])."""
    xs = _super_blocks(x, QK4_NL, QK4_NL)
    v = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=xs.device)
    w = xs * xs
    mx = signed_max(xs)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)

    def fit(idv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        L = best_index_iq4nl(idv[:, None] * xs)
        q = v[L]
        return L, seq_sum(w * q * xs), seq_sum(w * q * q)

    d0 = (-mx if ntry > 0 else mx) / v[0]
    L, sumqx, sumq2 = fit(1 / d0)
    d = torch.where(sumq2 > 0, sumqx / _safe(sumq2), 0.0)
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        _, sqx, sq2 = fit((itry + v[0]) / mx)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = torch.where(better, sqx / _safe(sq2), d)
        best = torch.where(better, d * sqx, best)
    d = torch.where(zero, 0.0, d)
    if ntry > 0:
        L = best_index_iq4nl(torch.where(d != 0, 1 / _safe(d), 0.0)[:, None] * xs)
    else:
        L = torch.where(zero[:, None], 0, L)
    dh = fp16(d)
    return (dh[:, None] * v[L]).reshape(x.shape), {"q": L, "d": dh}


KQUANTS: dict[str, Callable[[torch.Tensor], Result]] = {
    "q2_k": q2_k, "q3_k": q3_k, "q4_k": q4_k, "q5_k": q5_k, "q6_k": q6_k, "iq4_nl": iq4_nl,
}
