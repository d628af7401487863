"""Calibrated weight-quantization methods, one registered method per module (:mod:`.gptq`, :mod:`.awq`):
each module's ``METHOD`` (a :class:`~quantlens.quantize.methods.base.CalibratedMethod`) is found by
:mod:`quantlens.quantize.methods.registry`. Adding a method is one new module here (and its tests).
"""
