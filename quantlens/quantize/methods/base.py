"""What a calibrated weight-quantization method is (:class:`CalibratedMethod`): its name, the
:class:`~quantlens.quantize.setting.Setting` field holding its options, which weight grids it takes,
how it quantizes one group of linears from the statistics of their captured inputs, and what it
logs (:class:`Calibrated`). :mod:`quantlens.quantize.calibrate` runs it layer by layer.

Light on purpose: no torch at import (a setting is validated through the registry before any model
is touched); a method's tensor code is imported when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from pydantic import BaseModel

from quantlens.quantize.spec import QuantSpec

if TYPE_CHECKING:
    import torch


class Captured(Protocol):
    """The statistics of a layer group's captured inputs X (calibration tokens): the Hessian
    H = 2/n XᵀX and the mean |x| per input channel (:class:`quantlens.quantize.gptq.HessianAccumulator`)."""

    @property
    def h(self) -> "torch.Tensor": ...

    @property
    def abs_mean(self) -> "torch.Tensor": ...


@dataclass(frozen=True)
class Calibrated:
    """A method's result for one group of weights: their quantized (dequantized) copies, in order,
    and what it chose on the way (AWQ: its ``alpha``), for the log."""

    weights: list["torch.Tensor"]
    logged: dict[str, float] = field(default_factory=dict)


Calibrate = Callable[[list["torch.Tensor"], Captured, QuantSpec, Any, list[bool]], Calibrated]


@dataclass(frozen=True)
class CalibratedMethod:
    """One calibrated method.

    ``name``: as the ``method`` param logs it (and the ``-<name>`` suffix of a setting name);
    ``option``: the Setting field that holds its options (set: the setting uses this method);
    ``options``: their model (:class:`~quantlens.quantize.spec.GPTQSpec`, …);
    ``supported``: why it cannot take a weights spec (one line, naming the method), or None;
    ``calibrate``: (weights [out, in] reading one input, their captured inputs, the weights spec, the
    options, per weight whether it may be clipped) → :class:`Calibrated`;
    ``shares_input``: linears that read one input tensor are calibrated together (AWQ's one scale);
    otherwise each weight alone;
    ``describe``: the Setting field's description (``quantlens list-settings``, errors);
    ``names``: setting names listed as examples (``W4A16-<name>``); ``group``: the weights' group size
    a ``-<name>`` setting name takes unless ``-g`` says otherwise; ``rank``: its place in listings."""

    name: str
    option: str
    options: type[BaseModel]
    supported: Callable[[QuantSpec], str | None]
    calibrate: Calibrate
    shares_input: bool = False
    describe: str = ""
    names: tuple[str, ...] = ()
    group: int = 128
    rank: int = 100

    def options_of(self, setting: Any) -> Any:
        """This method's options in ``setting`` (None: the setting does not use it)."""
        return getattr(setting, self.option, None)
