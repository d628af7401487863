"""GPTQ (Frantar et al., 2022, arXiv 2210.17323): quantize a weight matrix column by column, each
column's rounding error spread over the columns not yet quantized through the inverse Hessian of
the layer's reconstruction loss ‖WX − ŴX‖², H = 2/n · X Xᵀ over calibration inputs X.

The published algorithm, on an integer grid of :class:`~quantlens.quantize.settings.QuantSpec`
(symmetric or with a zero point, per channel or per group along the input features):

1. dead inputs (H_ii = 0) get H_ii = 1 and a zero weight column;
2. ``act_order``: columns in order of decreasing H_ii (groups are then formed in that order, as
   GPTQ's ``desc_act`` with its ``g_idx``); the order is undone at the end;
3. H += damp · mean(diag H) · I; U = the upper Cholesky factor of H⁻¹;
4. blocks of ``block`` columns: within a block each column is rounded with its group's scale (found
   when the group starts from its weights as of the block's start — what the reference code and
   AutoGPTQ / GPTQModel / llm-compressor do: a group that starts inside a block does not see that
   block's own updates), its error e = (w − q)/U_ii subtracted from the block's later columns
   (e ⊗ U_i,·); the block's errors then update every later column at once (the lazy batch update).

Per channel, the scale is found before dead columns are zeroed (as AutoGPTQ). Checked against
AutoGPTQ 0.7.1 and llm-compressor 0.14 by ``bench/gptq_vs_library.py``: bit for bit on the same
grid (asymmetric, or symmetric on the libraries' 2^b-level grid).

With H = I and no act-order nothing propagates and GPTQ is round-to-nearest exactly (a test).
Pure tensor code; framework-free.
"""

from __future__ import annotations

import torch

from quantlens.quantize.quant import MIN_SCALE, qmax_symmetric
from quantlens.quantize.spec import QuantSpec


def supported(spec: QuantSpec) -> str | None:
    """Why GPTQ cannot take ``spec`` (one line), or None."""
    if spec.format != "int" or spec.scale != "fp32" or spec.transform_p != 1.0:
        return f"GPTQ rounds on an integer grid with an fp32 scale, not {spec.label}"
    if spec.granularity not in ("channel", "group"):
        return f"GPTQ quantizes per channel or per group, not per {spec.granularity}"
    if spec.clip_k is not None:
        return "GPTQ with clipping is not a published variant"
    return None


def _params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row scale (and zero point) of the columns ``w`` [rows, cols], as round-to-nearest finds them."""
    if spec.symmetric:
        return (w.abs().amax(dim=1) / qmax_symmetric(spec.bits)).clamp_min(MIN_SCALE), None
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    scale = ((hi - lo) / (2**spec.bits - 1)).clamp_min(MIN_SCALE)
    return scale, torch.round(-lo / scale)


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """One column (or columns) rounded with fixed per-row parameters; exactly :func:`quant._uniform`'s levels."""
    s = scale.unsqueeze(-1) if w.dim() == 2 else scale
    if zero is None:
        q = qmax_symmetric(spec.bits)
        return torch.round(w / s).clamp_(-q, q).mul_(s)
    z = zero.unsqueeze(-1) if w.dim() == 2 else zero
    return (torch.round(w / s) + z).clamp_(0, 2**spec.bits - 1).sub_(z).mul_(s)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2/n · XᵀX of inputs ``x`` [..., in] (float64 accumulation is the caller's: see :class:`HessianAccumulator`)."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    return 2.0 / x.shape[0] * x.t() @ x


class HessianAccumulator:
    """H = 2/n Σ x xᵀ over every row seen (a running mean, float32, as GPTQ keeps it)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(columns, columns, device=device)
        self.abs_sum = torch.zeros(columns, device=device, dtype=torch.float64)  # Σ|x| per channel (AWQ's mean)
        self.n = 0

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).to(torch.float32)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.h.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.h.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h.addmm_(x.t(), x)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, *, damp: float = 0.01, block: int = 128,
                  act_order: bool = True) -> torch.Tensor:
    """The GPTQ-quantized (dequantized) copy of ``w`` [out, in], given the Hessian ``h`` [in, in]."""
    why = supported(spec)
    if why:
        raise ValueError(why)
    W = w.detach().to(torch.float32).clone()
    H = h.detach().to(torch.float32).clone()
    cols = W.shape[1]
    group = spec.group_size if spec.granularity == "group" else None
    if group is not None and cols % group:
        raise ValueError(f"GPTQ: group_size {group} does not divide the {cols} input features")
    scale, zero = _params(W, spec) if group is None else (None, None)  # (per channel: before dead columns are zeroed)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    block = max(block, group or 1) // (group or 1) * (group or 1)  # a block holds whole groups
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if group is not None and (i1 + i) % group == 0:
                scale, zero = _params(W[:, i1 + i:i1 + i + group], spec)  # as of the block's start (the reference's choice)
            col = W1[:, i]
            q = _round(col, scale, zero, spec)
            Q1[:, i] = q
            err = (col - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(w.dtype)


def reconstruction_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) = 2/n ‖(W − Ŵ)X‖²_F: the loss GPTQ minimises, from the Hessian alone."""
    d = (w.to(torch.float32) - wq.to(torch.float32))
    return float(torch.einsum("oi,ij,oj->", d, h.to(torch.float32), d))
