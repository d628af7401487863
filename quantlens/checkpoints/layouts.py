"""The checkpoint layouts quantlens reads, as a registry: one module of this package per layout,
each defining ``LAYOUT = Layout(...)``, found by :func:`layouts` (the package's modules are listed,
not named: adding a layout is one new file, like ``gptq.py``).

A layout answers the four questions :mod:`quantlens.checkpoints.released` asks of a checkpoint:
what grid its ``quantization_config`` describes, which stored tensors make each packed module, how
they dequantize to the float weight, and that weight's shape from the headers alone.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from quantlens.errors import ConfigError

Load = Callable[[Callable[[str], bool]], dict]  # which of a module's stored keys → those tensors, as stored (on the CPU)


@dataclass(frozen=True)
class Layout:
    quant_method: str  # quantization_config.quant_method naming it (lower case)
    reads: str  # what quantlens reads of it, for messages: "GPTQ (v1/v2)"
    describe: Callable[[dict, str], dict]  # (quantization_config, what) → the Released fields (method, layout, bits, …)
    packed_modules: Callable[[set[str], Any], dict[str, list[str]]]  # (stored keys, Released) → module → keys of its weight
    dequantize: Callable[[str, dict, Any], Any]  # (module, its stored tensors, Released) → float32 weight [out, in]
    weight_shape: Callable[[str, dict, Load, Any], "tuple[int, ...] | None"]  # (module, header shapes, load, Released)
    legacy_file: str | None = None  # its library's own file standing for quantization_config (AutoGPTQ's quantize_config.json)
    order: int = 100  # where it is listed in messages


@lru_cache(maxsize=1)
def layouts() -> dict[str, Layout]:
    """quant_method → layout, for every module of this package that defines ``LAYOUT``."""
    found = {}
    for info in pkgutil.iter_modules(_package_path()):
        module = importlib.import_module(f"{__package__}.{info.name}")
        lay = getattr(module, "LAYOUT", None)
        if isinstance(lay, Layout):
            found[lay.quant_method] = lay
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


def _package_path() -> list[str]:
    return list(importlib.import_module(__package__).__path__)


def reads() -> str:
    """What quantlens reads, every layout in one line."""
    return ", ".join(lay.reads for lay in layouts().values())


def layout(quant_method: str, what: str) -> Layout:
    """The layout of ``quant_method``, or one line naming what quantlens reads."""
    lay = layouts().get(quant_method)
    if lay is None:
        raise ConfigError(f"{what}: quantization format {quant_method or '(none)'!r} is not one quantlens reads ({reads()})")
    return lay
