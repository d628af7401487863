"""Figure 3: perturbation intensity ‖Δ‖₂ as a function of the scale α, on a model's own weights.

For each decoder-block linear weight and each ratio r, quantize with α = r·max|x| per group
(r < 1 clips the largest values) and measure ‖Δ‖₂. Pure tensor work on the weights: no data,
no forward pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantlens.quantize.patch import target_linears, weight_stats
from quantlens.quantize.quant import quantize
from quantlens.quantize.settings import QuantSpec, resolve_setting


@torch.no_grad()
def alpha_sweep(model: nn.Module, bits: list[int], ratios: list[float], granularity: str = "channel") -> list[dict]:
    """Rows (bits, ratio, delta_l2_mean, rel_error_mean, clipped_fraction) averaged over layers."""
    layers = target_linears(model, resolve_setting("W8A16"))
    rows = []
    for b in bits:
        spec = QuantSpec(bits=b, granularity=granularity)
        for r in ratios:
            stats = []
            for name, mod in layers:
                w = mod.weight.detach()
                res = quantize(w, spec, alpha_ratio=r)
                stats.append(weight_stats(name, w, res.xq, res.alpha, res.clipped_fraction))
            n = len(stats)
            rows.append({"bits": b, "alpha_ratio": r, "delta_l2_mean": sum(x.delta_l2 for x in stats) / n,
                         "rel_error_mean": sum(x.rel_error for x in stats) / n,
                         "clipped_fraction": sum(x.clipped_fraction for x in stats) / n})
    return rows


def plot_alpha_sweep(rows: list[dict], path: str | Path, title: str = "") -> Path:
    from quantlens.analysis.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for b in sorted({r["bits"] for r in rows}):
        pts = [r for r in rows if r["bits"] == b]
        ax.plot([p["alpha_ratio"] for p in pts], [p["delta_l2_mean"] for p in pts], marker="o", label=f"{b}-bit")
    ax.set_xlabel("scale α / max|x|  (< 1 clips)")
    ax.set_ylabel("‖Δ‖₂ (mean over layers)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"α vs perturbation intensity (Figure 3){' — ' + title if title else ''}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)
