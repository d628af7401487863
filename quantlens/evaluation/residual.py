"""Residual-stream statistics of each example, reduced on the fly by forward hooks.

For every decoder block l (the second paper's notation, arXiv 2506.12044):

- r(l) = z(l−1) + Attn(Norm1(z(l−1))): the residual state the MLP reads, at the input of
  :attr:`quantlens.model.anatomy.Block.residual_site` — the MLP's norm in a pre-LN block (LLaMA
  ``post_attention_layernorm``, OPT ``final_layer_norm``), the norm after the attention's residual
  addition in a post-LN one (OPT-350m), ``pre_feedforward_layernorm`` in Gemma's sandwich, the MLP's
  input in OLMo-2, the block input z(l−1) in a parallel block (GPT-NeoX, Falcon): the anatomy's
  module doc says what r(l) means in each layout;
- z(l): the block output (its active stream, in a model that carries several: Gemma-3n's AltUp).

Per example and layer we keep the token-mean L2 norm S(l) = (1/T) Σ_t ‖r_t(l)‖₂, the same for
z(l), and the kurtosis of r(l) over the hidden dimension (Pearson's m4/m2², 3 for a Gaussian; axis
assumed: hidden dimension, averaged over tokens). Padding positions are excluded. Memory is
O(examples × layers): activations are reduced inside the hook and never kept.

Where r(l) is read comes from the model's anatomy (:mod:`quantlens.model.anatomy`); a block it does
not understand raises :class:`~quantlens.model.anatomy.ModelNotUnderstood`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantlens.model.anatomy import ModelNotUnderstood, anatomy


BlockNotUnderstood = ModelNotUnderstood  # (the name earlier versions raised)


class ResidualRecorder:
    """Context manager: hooks every block of ``model`` and fills ``[n_examples, n_layers]`` tables.

    The evaluator calls :meth:`begin_batch` with the example indices of each batch (and its
    attention mask when padded) before the forward.
    """

    def __init__(self, model: nn.Module, n_examples: int):
        body = anatomy(model)
        parts = body.parts
        self._stream = body.stream  # z(l): a block's output, its active stream where it carries several (Gemma-3n)
        self.n_layers = len(parts)
        self._residual_site = [b.residual_site for b in parts]  # r(l) is its input
        self._blocks = [b.module for b in parts]
        self.n_examples = n_examples
        self._index: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._tables: dict[str, torch.Tensor] = {}

    # --- statistics, pure -------------------------------------------------------------------------
    @staticmethod
    def norm_and_kurtosis(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-mean L2 norm and token-mean kurtosis per row of ``x`` [b, T, H] (fp32)."""
        x = x.float()
        norm = torch.linalg.vector_norm(x, dim=-1)  # [b, T]
        xc = x - x.mean(-1, keepdim=True)
        sq = xc.square()
        m2 = sq.mean(-1)
        kurt = sq.square().mean(-1) / m2.square().clamp_min(1e-30)
        return _token_mean(norm, mask), _token_mean(kurt, mask)

    @staticmethod
    def norm_only(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return _token_mean(torch.linalg.vector_norm(x.float(), dim=-1), mask)

    # --- hooks ------------------------------------------------------------------------------------
    def begin_batch(self, index: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self._index = index
        self._mask = mask

    def _batched(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(self._index), -1, x.shape[-1])

    def _store(self, name: str, layer: int, values: torch.Tensor) -> None:
        t = self._tables.get(name)
        if t is None:
            t = self._tables[name] = torch.full((self.n_examples, self.n_layers), float("nan"), dtype=torch.float32, device=values.device)
        idx = self._index.to(values.device)
        t[idx, layer] = values

    def __enter__(self) -> "ResidualRecorder":
        for layer, (residual_site, block) in enumerate(zip(self._residual_site, self._blocks)):

            def pre(module: nn.Module, args: tuple, layer: int = layer) -> None:
                x = self._batched(args[0])  # OPT flattens [b, T, H] to [b·T, H] before its second norm
                mask = None if self._mask is None else self._mask.to(x.device)
                n, k = self.norm_and_kurtosis(x, mask)
                self._store("r_norm", layer, n)
                self._store("r_kurtosis", layer, k)

            def post(module: nn.Module, args: tuple, output: Any, layer: int = layer) -> None:
                z = output[0] if isinstance(output, (tuple, list)) else output
                z = self._batched(self._stream(z))
                mask = None if self._mask is None else self._mask.to(z.device)
                self._store("z_norm", layer, self.norm_only(z, mask))

            self._handles.append(residual_site.register_forward_pre_hook(pre))
            self._handles.append(block.register_forward_hook(post))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def rows(self, example_ids: list[str]) -> dict[str, list[Any]]:
        """Long format: one row per (example, layer): example_id, layer, r_norm, z_norm, r_kurtosis."""
        if len(example_ids) != self.n_examples:
            raise ValueError(f"{len(example_ids)} example ids for {self.n_examples} examples")
        cols: dict[str, list[Any]] = {
            "example_id": [e for e in example_ids for _ in range(self.n_layers)],
            "layer": list(range(self.n_layers)) * self.n_examples,
        }
        for name in ("r_norm", "z_norm", "r_kurtosis"):
            t = self._tables.get(name)
            cols[name] = t.cpu().double().reshape(-1).tolist() if t is not None else [float("nan")] * (self.n_layers * self.n_examples)
        return cols


def _token_mean(v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return v.mean(-1)
    m = mask.to(v.dtype)
    return (v * m).sum(-1) / m.sum(-1).clamp_min(1)
