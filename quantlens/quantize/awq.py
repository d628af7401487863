"""AWQ (Lin et al., 2023, arXiv 2306.00978): activation-aware weight quantization. Salient input
channels — those with large activations — are protected by scaling them up before rounding:
Ŵ = Q(W·diag(s))·diag(s)⁻¹, i.e. the input is divided by s where the model would fold 1/s into the
previous operation (a norm or a linear). The scale s = mean|x|^α / √(max·min) per input channel is
searched over α ∈ {0, 1/n, …, (n−1)/n} to minimise the output error on calibration data.

The output error of a linear on the calibration inputs is read from the same Hessian GPTQ uses,
‖(Ŵ − W)X‖² ∝ tr(Δ H Δᵀ) with H = 2/n XᵀX, so the search needs no second forward. Linears that read
the same input (q/k/v, gate/up: one s in AWQ, as it folds into the one norm before them) share one
α: the sum of their errors is minimised. Round-to-nearest on the setting's integer grid, per group.
Pure tensor code; framework-free.
"""

from __future__ import annotations

import torch

from quantlens.quantize.quant import quantize
from quantlens.quantize.settings import QuantSpec


def scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-input-channel scale for one α: mean|x|^α, normalised by √(max·min) (as AWQ does)."""
    s = x_mean.clamp_min(1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def scaled_quantize(w: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Q(W·diag(s))·diag(s)⁻¹ (float32)."""
    wf = w.to(torch.float32)
    return quantize(wf * s, spec).xq / s


def _loss(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    d = wq - w.to(torch.float32)
    return float(torch.einsum("oi,ij,oj->", d, h, d))


@torch.no_grad()
def awq_quantize(weights: list[torch.Tensor], h: torch.Tensor, x_mean: torch.Tensor, spec: QuantSpec,
                 grid: int = 20) -> tuple[list[torch.Tensor], float]:
    """The AWQ-quantized (dequantized) copies of linears that share one input, and the α chosen.

    ``h``: their input's Hessian 2/n XᵀX; ``x_mean``: mean |x| per input channel. α = 0 is plain
    round-to-nearest (s = 1), so AWQ's error is never above it."""
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
    return [q.to(w.dtype) for q, w in zip(best[2], weights)], best[1]
