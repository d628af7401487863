"""AWQ as a calibrated method: linears that read one input share one activation-aware scale
(:func:`quantlens.quantize.awq.awq_quantize`), with the setting's :class:`~quantlens.quantize.spec.AWQSpec`;
its grid limits are GPTQ's (an integer grid with an fp32 scale, per channel or group, no clipping)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from quantlens.quantize.methods.base import Calibrated, CalibratedMethod, Captured
from quantlens.quantize.spec import AWQSpec, QuantSpec

if TYPE_CHECKING:
    import torch


def supported(spec: QuantSpec) -> str | None:
    """Why AWQ cannot take ``spec`` (one line), or None: GPTQ's grid limits, in AWQ's name."""
    from quantlens.quantize.gptq import supported as why

    reason = why(spec)
    return reason.replace("GPTQ", "AWQ") if reason else None


def calibrate(weights: list["torch.Tensor"], inputs: Captured, spec: QuantSpec, options: AWQSpec,
              clippable: list[bool]) -> Calibrated:
    """The weights reading one input, AWQ-quantized with one scale; a weight is clipped when the
    options say so and it may be (``clippable``: not a query or key projection). Logs the α chosen."""
    from quantlens.quantize.awq import awq_quantize

    o = options
    qs, alpha = awq_quantize(weights, inputs.h, inputs.abs_mean, spec, grid=o.grid,
                             clip=[o.clip and c for c in clippable], max_shrink=o.max_shrink)
    return Calibrated(qs, {"alpha": alpha})


METHOD = CalibratedMethod(name="awq", option="awq", options=AWQSpec, supported=supported, calibrate=calibrate,
                          shares_input=True, describe="weights quantized by AWQ's activation-aware scales (the -awq suffix)",
                          names=("W4A16-awq", "W3A16-awq"), rank=1)
