"""Typed settings: the one source of truth for what a quantization / perturbation setting is.

A :class:`Setting` says how weights and activations of the decoder-block linear layers are
perturbed. Names such as ``W8A8`` or ``W4A16-nu`` are parsed by :func:`resolve_setting`; the
paper's presets are listed in :data:`PRESETS`. Every invalid value raises :class:`ConfigError`
naming the offending field, before any model is touched.

A façade: the spec data live in :mod:`quantlens.quantize.spec`, the :class:`Setting` model and its
validation in :mod:`quantlens.quantize.setting`, the name grammar and presets in
:mod:`quantlens.quantize.names`, the MLflow parameter schema in :mod:`quantlens.quantize.params`.
"""

from __future__ import annotations

from quantlens.errors import ConfigError
from quantlens.quantize.names import (CALIBRATED_NAMES, FORMAT_NAMES, FP_GROUP, GPTQ_GROUP, MX_BLOCK, NF_BLOCK,
                                      NVFP_BLOCK, PRESET_NAMES, PRESETS, resolve_setting, setting_from_name)
from quantlens.quantize.params import flat_params
from quantlens.quantize.setting import Setting, format_validation_error, validated
from quantlens.quantize.spec import (NO_FP, NONUNIFORM_P, AWQSpec, CalibrationSpec, CheckpointSpec, Distribution,
                                     Element, Format, GPTQSpec, Granularity, KVGranularity, KVSpec, MagnitudeRule,
                                     PerturbSpec, QuantSpec, ScaleType, Target)

__all__ = [
    "CALIBRATED_NAMES", "FORMAT_NAMES", "FP_GROUP", "GPTQ_GROUP", "MX_BLOCK", "NF_BLOCK", "NVFP_BLOCK", "NO_FP",
    "NONUNIFORM_P", "PRESET_NAMES", "PRESETS", "AWQSpec", "CalibrationSpec", "CheckpointSpec", "ConfigError",
    "Distribution", "Element", "Format", "GPTQSpec", "Granularity", "KVGranularity", "KVSpec", "MagnitudeRule",
    "PerturbSpec", "QuantSpec", "ScaleType", "Setting", "Target", "flat_params", "format_validation_error",
    "resolve_setting", "setting_from_name", "validated",
]
