"""The calibrated methods by name (:data:`METHODS`): every module of :mod:`quantlens.quantize.methods`
that defines ``METHOD`` is registered when the registry is first read, and :func:`register` adds
one more (a test's, a plugin's). :func:`method` is the one lookup by name; :func:`chosen` the
methods a setting asks for (by their options field).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from quantlens.errors import ConfigError
from quantlens.quantize.methods.base import CalibratedMethod

METHODS: dict[str, CalibratedMethod] = {}
_NOT_METHODS = ("base", "registry")
_found = False


def register(m: CalibratedMethod) -> CalibratedMethod:
    """Make ``m`` known by its name (replacing a method of that name)."""
    METHODS[m.name] = m
    return m


def known() -> dict[str, CalibratedMethod]:
    """Every registered method by name, the package's own modules first found."""
    global _found
    if not _found:
        _found = True
        from quantlens.quantize import methods as package  # (its __path__: the folders listed)

        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in _NOT_METHODS:
                mod = importlib.import_module(f"{__package__}.{info.name}")
                if isinstance(getattr(mod, "METHOD", None), CalibratedMethod):
                    METHODS.setdefault(mod.METHOD.name, mod.METHOD)
    return METHODS


def ranked() -> list[CalibratedMethod]:
    """Every registered method in listing order."""
    return sorted(known().values(), key=lambda m: (m.rank, m.name))


def option_fields() -> dict[str, tuple[Any, Any]]:
    """The :class:`~quantlens.quantize.setting.Setting` fields of the registered methods' options
    (``create_model`` form): a method's options are a field of every setting, None unless it is used."""
    from pydantic import Field

    return {m.option: (m.options | None, Field(None, description=m.describe or f"weights quantized by {m.name}"))
            for m in ranked()}


def options(setting: Any) -> dict[str, Any]:
    """Each registered method's options in ``setting`` (None where unused), by option field."""
    return {m.option: m.options_of(setting) for m in ranked()}


def method(name: str) -> CalibratedMethod:
    """The calibrated method called ``name``; an unknown name is one ConfigError naming the known ones."""
    methods = known()
    if name not in methods:
        raise ConfigError(f"unknown calibrated method {name!r}: known are {', '.join(sorted(methods))}")
    return methods[name]


def chosen(setting: Any) -> list[CalibratedMethod]:
    """The methods whose options ``setting`` sets (valid: at most one), in the order of the setting's fields."""
    by_option = {m.option: m for m in known().values()}
    fields = type(setting).model_fields if hasattr(type(setting), "model_fields") else by_option
    return [by_option[f] for f in fields if f in by_option and by_option[f].options_of(setting) is not None]
