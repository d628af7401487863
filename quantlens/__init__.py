"""quantlens: why quantization hurts an LLM, seen as a perturbation of weights and activations.

Core entry points (no Prefect, no MLflow): :func:`quantlens.quantize.patch.quantize_` /
:func:`quantlens.quantize.patch.restore_`, :func:`quantlens.quantize.quant.quantize`, :func:`quantlens.quantize.perturb.perturb`,
:func:`quantlens.quantize.settings.resolve_setting`, :func:`quantlens.evaluation.evaluate.evaluate_dataset`.
"""

__version__ = "0.1.0"
