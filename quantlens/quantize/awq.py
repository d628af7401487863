"""AWQ (Lin et al., 2023, arXiv 2306.00978): activation-aware weight quantization. Salient input
channels — those with large activations — are protected by scaling them up before rounding:
Ŵ = Q(W·diag(s))·diag(s)⁻¹, i.e. the input is divided by s where the model would fold 1/s into the
previous operation (a norm or a linear). The scale s = mean|x|^α / √(max·min) per input channel is
searched over α ∈ {0, 1/n, …, (n−1)/n} to minimise the output error on calibration data.

The output error of a linear on the calibration inputs is read from the same Hessian GPTQ uses,
‖(Ŵ − W)X‖² ∝ tr(Δ H Δᵀ) with H = 2/n XᵀX, so the search needs no second forward. Linears that read
the same input (q/k/v, gate/up: one s in AWQ, as it folds into the one norm before them) share one
α: the sum of their errors is minimised. Round-to-nearest on the setting's integer grid, per group.

Then, as AutoAWQ's ``auto_clip``, each scaled weight's groups are clipped: per output row and group,
the range ±r·max|w| with r ∈ {1, 1 − 1/n, …} down to ``1 − max_shrink`` that minimises the group's
own output error d_g H_gg d_gᵀ (H of the scaled input, x/s); not for the query and key projections
(their error goes through the softmax: AutoAWQ skips them too). Pure tensor code; framework-free.
"""

from __future__ import annotations

import torch

from quantlens.quantize.quant import quantize
from quantlens.quantize.spec import QuantSpec


def scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-input-channel scale for one α: mean|x|^α, normalised by √(max·min) (as AWQ does)."""
    s = x_mean.clamp_min(1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def scaled_quantize(w: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Q(W·diag(s))·diag(s)⁻¹ (float32)."""
    wf = w.to(torch.float32)
    return quantize(wf * s, spec).xq / s


def _group_errors(d: torch.Tensor, h: torch.Tensor, group: int) -> torch.Tensor:
    """[rows, groups]: d_g H_gg d_gᵀ of each row's groups (the block-diagonal part of tr(ΔHΔᵀ))."""
    rows, cols = d.shape
    n = cols // group
    hb = h.reshape(n, group, n, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [groups, g, g]
    dg = d.reshape(rows, n, group)
    return torch.einsum("rgi,gij,rgj->rg", dg, hb, dg)


@torch.no_grad()
def clip_search(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """The weight ``w`` [out, in] clipped per row and group at the ±r·max|w| (r from 1 down to
    1 − ``max_shrink`` in steps of 1/``grid``) whose quantization has the smallest output error on
    the inputs of Hessian ``h`` (AutoAWQ's auto_clip, from the Hessian). r = 1 is no clipping."""
    wf = w.to(torch.float32)
    group = spec.group_size if spec.granularity == "group" else wf.shape[1]
    rows, cols = wf.shape
    amax = wf.reshape(rows, cols // group, group).abs().amax(-1)  # [rows, groups]
    best_err, best_r = None, torch.ones_like(amax)
    for i in range(int(max_shrink * grid)):
        r = 1 - i / grid
        lim = (amax * r).repeat_interleave(group, dim=1)
        err = _group_errors(quantize(torch.maximum(torch.minimum(wf, lim), -lim), spec).xq - wf, h, group)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    lim = (amax * best_r).repeat_interleave(group, dim=1)
    return torch.maximum(torch.minimum(wf, lim), -lim)


def _loss(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    d = wq - w.to(torch.float32)
    return float(torch.einsum("oi,ij,oj->", d, h, d))


@torch.no_grad()
def awq_quantize(weights: list[torch.Tensor], h: torch.Tensor, x_mean: torch.Tensor, spec: QuantSpec,
                 grid: int = 20, clip: list[bool] | None = None, max_shrink: float = 0.5) -> tuple[list[torch.Tensor], float]:
    """The AWQ-quantized (dequantized) copies of linears that share one input, and the α chosen.

    ``h``: their input's Hessian 2/n XᵀX; ``x_mean``: mean |x| per input channel. α = 0 is plain
    round-to-nearest (s = 1), so the scale search's error is never above it. ``clip``: per weight,
    whether its groups are then clipped (:func:`clip_search`; None: none is)."""
    hf = h.to(torch.float32)
    best: tuple[float, float, list[torch.Tensor]] | None = None
    for i in range(grid):
        alpha = i / grid
        s = scales(x_mean.to(torch.float32), alpha)
        qs = [scaled_quantize(w, s, spec) for w in weights]
        loss = sum(_loss(w, q, hf) for w, q in zip(weights, qs))
        if best is None or loss < best[0]:
            best = (loss, alpha, qs)
    assert best is not None
    qs = best[2]
    if clip and any(clip):
        s = scales(x_mean.to(torch.float32), best[1])
        hs = hf / (s[:, None] * s[None, :])  # the Hessian of the scaled input x / s
        qs = [quantize(clip_search(w.to(torch.float32) * s, hs, spec, grid, max_shrink), spec).xq / s if c else q
              for w, q, c in zip(weights, qs, clip)]
    return [q.to(w.dtype) for q, w in zip(qs, weights)], best[1]
