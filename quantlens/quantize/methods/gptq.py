"""GPTQ as a calibrated method: each linear (and expert matrix) alone, from its input Hessian
(:func:`quantlens.quantize.gptq.gptq_quantize`), with the setting's :class:`~quantlens.quantize.spec.GPTQSpec`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from quantlens.quantize.methods.base import Calibrated, CalibratedMethod, Captured
from quantlens.quantize.spec import GPTQSpec, QuantSpec

if TYPE_CHECKING:
    import torch


def supported(spec: QuantSpec) -> str | None:
    """Why GPTQ cannot take ``spec`` (one line), or None."""
    from quantlens.quantize.gptq import supported as why

    return why(spec)


def calibrate(weights: list["torch.Tensor"], inputs: Captured, spec: QuantSpec, options: GPTQSpec,
              clippable: list[bool]) -> Calibrated:
    """Each weight GPTQ-quantized on the Hessian of its input (GPTQ does not clip)."""
    from quantlens.quantize.gptq import gptq_quantize

    o = options
    return Calibrated([gptq_quantize(w, inputs.h, spec, damp=o.damp, block=o.block, act_order=o.act_order) for w in weights])


METHOD = CalibratedMethod(name="gptq", option="gptq", options=GPTQSpec, supported=supported, calibrate=calibrate,
                          describe="weights quantized by GPTQ on calibration data (the -gptq suffix)",
                          names=("W4A16-gptq", "W3A16-gptq"), rank=0)
