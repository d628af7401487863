"""One description of a model's shape, whether read from its config (:mod:`quantlens.model.footprint`)
or from its modules (:meth:`quantlens.model.anatomy.Anatomy.shape`), and the group-size check both
the patcher and the preflight make on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass(frozen=True)
class ModelShape:
    """The dimensions a config and the built modules agree on."""

    layers: int  # decoder blocks
    hidden: int  # the residual stream's width (what the attention's first projection reads)
    vocab: int  # rows of the LM head
    experts: int = 0  # routed experts of an MoE block (0: a dense model)


def group_misfit(group_size: int | Callable[[int], int], in_features: Iterable[tuple[str, int]]) -> tuple[str, int] | None:
    """The first (name, input features) that the group size does not divide, None when it divides all:
    a group of a quantized row must not straddle two rows. ``group_size`` may depend on the row's
    length (``lambda n: spec.for_row(n).group_size``: a llama.cpp k-quant's fallback type)."""
    size = group_size if callable(group_size) else (lambda _n: group_size)
    for name, n_in in in_features:
        if n_in % size(n_in):
            return name, n_in
    return None
