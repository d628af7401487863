"""quantlens: why quantization hurts an LLM, seen as a perturbation of weights and activations.

Core entry points (no Prefect, no MLflow): :func:`quantlens.patch.quantize_` /
:func:`quantlens.patch.restore_`, :func:`quantlens.quant.quantize`, :func:`quantlens.perturb.perturb`,
:func:`quantlens.settings.resolve_setting`, :func:`quantlens.evaluate.evaluate_dataset`.
"""

__version__ = "0.1.0"
