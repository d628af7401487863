"""Calibration-free fake quantization: pure functions over tensors.

Q(X) = X + Δ. Everything here returns the *dequantized* tensor (same shape and dtype as the
input), because the study measures what the perturbation Δ does, not how fast integer kernels run.

Granularity is expressed on the last dimension, which is the input dimension of an ``nn.Linear``
weight ``[out, in]`` and the hidden dimension of an activation ``[..., tokens, hidden]``:

- ``tensor``:  one scale for the whole tensor;
- ``channel``: one scale per row (weights: per output channel);
- ``token``:   one scale per row (activations: per token, computed at run time) — the same
  reduction as ``channel``, named for what the row is;
- ``group``:   one scale per ``group_size`` consecutive elements of the last dimension.

Math is done in float32 and cast back, so bf16/fp16 models get the same levels as fp32 ones.
The grids other than integers (NormalFloat, minifloats, MX and NVFP4 block scales, k-means codebooks)
are data in :mod:`quantlens.quantize.formats`; :func:`quantize` and :func:`fake_quantize` dispatch to them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from quantlens.quantize import formats
from quantlens.quantize.spec import QuantSpec

# A scale of zero (an all-zero group) would divide by zero; any positive value gives Q(0) = 0.
MIN_SCALE = formats._MIN_SCALE


@dataclass(frozen=True)
class QuantResult:
    """Dequantized tensor plus what the study logs about it."""

    xq: torch.Tensor
    scale: torch.Tensor  # [rows] (tensor: [1]); group: [rows, n_groups]. Symmetric: α / qmax
    alpha: torch.Tensor  # clipping range actually used per group (max|x| unless clipped)
    clipped_fraction: float  # fraction of elements outside the range (0 without clipping)
    spec: QuantSpec | None = None  # the spec applied (a llama.cpp k-quant's fallback type on rows it does not divide)


def qmax_symmetric(bits: int) -> int:
    """Largest integer level of symmetric b-bit quantization: 2^(b-1) − 1 (127 for 8 bits)."""
    return 2 ** (bits - 1) - 1


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``x`` as ``[rows, n_groups, group_len]`` so every scale reduces over the last dim."""
    if spec.granularity == "tensor":
        return x.reshape(1, 1, -1)
    last = x.shape[-1]
    if spec.granularity == "group":
        g = spec.group_size
        if last % g:
            raise ValueError(
                f"group_size: {g} does not divide the last dimension {last} of a tensor of shape "
                f"{tuple(x.shape)}"
            )
        return x.reshape(-1, last // g, g)
    return x.reshape(-1, 1, last)  # channel / token


def power_transform(x: torch.Tensor, p: float) -> torch.Tensor:
    """f(x) = sign(x)·|x|^p (p = 1/3 is the paper's cube root); one temporary, sign by copysign."""
    return x.abs().pow_(p).copysign_(x)


def inverse_power_transform(y: torch.Tensor, p: float) -> torch.Tensor:
    """f⁻¹(y) = sign(y)·|y|^(1/p). When 1/p is an odd integer (3 for the cube root) y^(1/p) keeps
    the sign by itself: one integer power, no abs/sign passes."""
    inv = 1.0 / p
    k = round(inv)
    if abs(inv - k) < 1e-9 and k % 2 == 1:
        return y.pow(k)
    return y.abs().pow_(inv).copysign_(y)


def _uniform(
    xg: torch.Tensor, spec: QuantSpec, alpha_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform quantization of grouped float32 ``xg``; returns (xq, scale, alpha, n_clipped).

    ``alpha_ratio`` < 1 shrinks the symmetric range to that fraction of max|x| (Figure 3's sweep).
    """
    if spec.symmetric:
        alpha = xg.abs().amax(dim=-1, keepdim=True)
        if alpha_ratio != 1.0:
            alpha = alpha * alpha_ratio
            n_clipped = (xg.abs() > alpha).sum()
        elif spec.clip_k is not None:
            sigma = xg.std(dim=-1, keepdim=True, unbiased=False)
            alpha = torch.minimum(alpha, spec.clip_k * sigma)
            n_clipped = (xg.abs() > alpha).sum()
        else:
            n_clipped = torch.zeros((), dtype=torch.long, device=xg.device)
        q = qmax_symmetric(spec.bits)
        scale = (alpha / q).clamp_min(MIN_SCALE)
        xq = torch.round(xg / scale).clamp_(-q, q).mul_(scale)
        return xq, scale, alpha, n_clipped

    lo = xg.amin(dim=-1, keepdim=True)
    hi = xg.amax(dim=-1, keepdim=True)
    if spec.clip_k is not None:
        mu = xg.mean(dim=-1, keepdim=True)
        sigma = xg.std(dim=-1, keepdim=True, unbiased=False)
        lo = torch.maximum(lo, mu - spec.clip_k * sigma)
        hi = torch.minimum(hi, mu + spec.clip_k * sigma)
        n_clipped = ((xg < lo) | (xg > hi)).sum()
    else:
        n_clipped = torch.zeros((), dtype=torch.long, device=xg.device)
    levels = 2**spec.bits - 1
    scale = ((hi - lo) / levels).clamp_min(MIN_SCALE)
    zero = torch.round(-lo / scale)
    xq = (torch.round(xg / scale) + zero).clamp_(0, levels).sub_(zero).mul_(scale)
    alpha = (hi - lo) / 2
    return xq, scale, alpha, n_clipped


def _is_plain_int(spec: QuantSpec) -> bool:
    return spec.format == "int" and spec.scale == "fp32"


def _outer_amax(xf: torch.Tensor, xg: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """NVFP4's second-level range: the amax of the whole tensor, or of each row (token), shaped to
    broadcast over ``xg`` [rows, groups, len]."""
    if spec.global_scale is None:
        return None
    if spec.global_scale == "tensor":
        return xf.abs().amax().reshape(1, 1, 1)
    return xg.abs().amax(dim=(1, 2), keepdim=True)


def _grid_quantize(xf: torch.Tensor, xg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q = s · grid(x / s) for the formats of :mod:`quantlens.quantize.formats` (float32, grouped);
    returns (xq, scale, alpha, n_clipped). A k-means codebook is fitted per row of ``xg`` instead."""
    zero = torch.zeros((), dtype=torch.long, device=xg.device)
    if spec.format == "km":
        rows = xg.reshape(-1, xg.shape[-1])
        c = formats.kmeans_rows(rows, 2**spec.bits)
        xq = formats.round_to_rows(rows, c).reshape(xg.shape)
        alpha = xg.abs().amax(dim=-1, keepdim=True)
        return xq, alpha, alpha, zero
    if spec.is_llama_cpp:  # llama.cpp's own quantizers, bit for bit: ggml.py, kquants.py
        xq, _, d = spec.ggml().quantize(xg.reshape(xg.shape[0], -1))
        return xq.reshape(xg.shape), d, xg.abs().amax(dim=-1, keepdim=True), zero
    grid = formats.grid_for(spec.format, spec.bits, spec.element)
    alpha = xg.abs().amax(dim=-1, keepdim=True)
    n_clipped = zero
    if spec.clip_k is not None:
        alpha = torch.minimum(alpha, spec.clip_k * xg.std(dim=-1, keepdim=True, unbiased=False))
        n_clipped = (xg.abs() > alpha).sum()
    scale, inv = formats.block_scale(alpha, grid, spec.scale, _outer_amax(xf, xg, spec))
    return grid.round(xg * inv).mul_(scale), scale, alpha, n_clipped


def state_spec(spec: QuantSpec, n: int) -> QuantSpec:
    """The spec a token mixer's state matrix gets, its rows ``n`` long (``include_mixer_states``: a
    conv kernel's 4 taps, Mamba-1's dt_proj's dt_rank): ``spec``, or — a group that does not tile
    the row (longer than it, or not dividing it: dt_rank 48 under g32) — one group a row, the row's
    own scale (llama.cpp's blocks are types: a Setting refuses them on states)."""
    if spec.granularity == "group" and (spec.group_size > n or n % spec.group_size):
        return spec.model_copy(update={"group_size": n})
    return spec


def quantize_state(w: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """A state matrix (``[channels, 1, taps]``, ``[channels, state]``) quantized row by row along
    its last dimension under :func:`state_spec`; ``xq`` in ``w``'s shape."""
    res = quantize(w.reshape(-1, w.shape[-1]), state_spec(spec, w.shape[-1]))
    return replace(res, xq=res.xq.reshape(w.shape))


def quantize(x: torch.Tensor, spec: QuantSpec, alpha_ratio: float = 1.0) -> QuantResult:
    """Fake-quantize ``x`` under ``spec``: uniform, non-uniform through f(x)=sign(x)|x|^p, or any
    format of :mod:`quantlens.quantize.formats` (NormalFloat, minifloats, MX, NVFP4, k-means).

    With ``spec.transform_p == 1`` the transform is the identity and is skipped, so the result is
    bit-identical to plain uniform quantization. ``alpha_ratio``: see :func:`_uniform` (integers only).
    """
    shape, dtype = x.shape, x.dtype
    spec = spec.for_row(x.shape[-1])
    xf = x.detach().to(torch.float32)
    if not _is_plain_int(spec):
        if alpha_ratio != 1.0:
            raise ValueError(f"alpha_ratio: only for integer grids with an fp32 scale, not {spec.label}")
        xq, scale, alpha, n_clipped = _grid_quantize(xf, _grouped(xf, spec), spec)
        xq = xq.reshape(shape)
    else:
        nonuniform = spec.transform_p != 1.0
        if nonuniform:
            xf = power_transform(xf, spec.transform_p)
        xg = _grouped(xf, spec)
        xq, scale, alpha, n_clipped = _uniform(xg, spec, alpha_ratio)
        xq = xq.reshape(shape)
        if nonuniform:
            xq = inverse_power_transform(xq, spec.transform_p)
    clipped = float(n_clipped) / max(x.numel(), 1) if spec.clip_k is not None or alpha_ratio != 1.0 else 0.0
    per_group = (lambda t: t.squeeze(-1)) if spec.granularity == "group" else (lambda t: t.reshape(-1))
    return QuantResult(
        xq=xq.to(dtype),
        scale=per_group(scale),
        alpha=per_group(alpha),
        clipped_fraction=clipped,
        spec=spec,
    )


def _fast_symmetric(xg: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric, unclipped quantization with the fewest passes (no clamp: |x|/s ≤ qmax by
    construction). Same levels as :func:`_uniform` up to the last float ulp of x·(1/s) versus x/s.
    (``abs().amax`` is ~6× faster on CPU than ``aminmax`` along a dim, measured on torch 2.13.)"""
    alpha = xg.abs().amax(dim=-1, keepdim=True)
    q = qmax_symmetric(bits)
    scale = (alpha / q).clamp_min_(MIN_SCALE)
    return (xg * scale.reciprocal()).round_().mul_(scale)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Q(x) only: the hot path used on activations at every forward (no statistics, no sync)."""
    shape, dtype = x.shape, x.dtype
    if not _is_plain_int(spec):
        xf = x.to(torch.float32)
        return _grid_quantize(xf, _grouped(xf, spec), spec)[0].reshape(shape).to(dtype)
    if spec.symmetric and spec.clip_k is None:
        xf = x.to(torch.float32)
        if not spec.nonuniform:
            return _fast_symmetric(_grouped(xf, spec), spec.bits).reshape(shape).to(dtype)
        # non-uniform: the same fast symmetric rounding on f(x), then f⁻¹ (W8A8-nu's hot path)
        xq = _fast_symmetric(_grouped(power_transform(xf, spec.transform_p), spec), spec.bits).reshape(shape)
        return inverse_power_transform(xq, spec.transform_p).to(dtype)
    xf = x.to(torch.float32)
    nonuniform = spec.transform_p != 1.0
    if nonuniform:
        xf = power_transform(xf, spec.transform_p)
    xq, _, _, _ = _uniform(_grouped(xf, spec), spec)
    xq = xq.reshape(shape)
    if nonuniform:
        xq = inverse_power_transform(xq, spec.transform_p)
    return xq.to(dtype)
