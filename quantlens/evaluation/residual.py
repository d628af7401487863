"""Residual-stream statistics of each example, reduced on the fly by forward hooks.

For every decoder block l (the second paper's notation, arXiv 2506.12044):

- r(l) = z(l−1) + Attn(Norm1(z(l−1))): the residual state after attention = the input of the
  block's *second* norm (LLaMA ``post_attention_layernorm``, OPT ``final_layer_norm``, BLOOM
  ``post_attention_layernorm``);
- z(l): the block output.

Per example and layer we keep the token-mean L2 norm S(l) = (1/T) Σ_t ‖r_t(l)‖₂, the same for
z(l), and the kurtosis of r(l) over the hidden dimension (Pearson's m4/m2², 3 for a Gaussian; axis
assumed: hidden dimension, averaged over tokens). Padding positions are excluded. Memory is
O(examples × layers): activations are reduced inside the hook and never kept.

Blocks are understood generically: a block whose direct children include exactly two norm modules
(class name ending in ``Norm``, e.g. LayerNorm / LlamaRMSNorm) in registration order (first =
before attention, second = before the MLP). Anything else raises :class:`BlockNotUnderstood`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantlens.quantize.patch import find_decoder_blocks


class BlockNotUnderstood(ValueError):
    """The decoder block's structure does not show where r(l) is (no two norms)."""


def block_norms(block: nn.Module) -> tuple[str, str]:
    """Names of the (pre-attention, pre-MLP) norms of a decoder block."""
    norms = [n for n, m in block.named_children() if type(m).__name__.endswith("Norm")]
    if len(norms) != 2:
        raise BlockNotUnderstood(
            f"{type(block).__name__}: expected two norm modules as direct children (before attention and "
            f"before the MLP), found {', '.join(norms) or 'none'}: the residual stream r(l) cannot be located"
        )
    return norms[0], norms[1]


def post_norm_warning(model: nn.Module) -> str | None:
    """OPT-350m is post-LN: its second norm sees the block output, not r(l)."""
    if getattr(model.config, "do_layer_norm_before", True) is False:
        return "post-LN model (do_layer_norm_before=False): r(l) is the input of the second norm, which here follows the MLP"
    return None


class ResidualRecorder:
    """Context manager: hooks every block of ``model`` and fills ``[n_examples, n_layers]`` tables.

    The evaluator calls :meth:`begin_batch` with the example indices of each batch (and its
    attention mask when padded) before the forward.
    """

    def __init__(self, model: nn.Module, n_examples: int):
        _, blocks = find_decoder_blocks(model)
        self.n_layers = len(blocks)
        self._norm2 = [getattr(b, block_norms(b)[1]) for b in blocks]
        self._blocks = list(blocks)
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
        for layer, (norm2, block) in enumerate(zip(self._norm2, self._blocks)):

            def pre(module: nn.Module, args: tuple, layer: int = layer) -> None:
                x = self._batched(args[0])  # OPT flattens [b, T, H] to [b·T, H] before its second norm
                mask = None if self._mask is None else self._mask.to(x.device)
                n, k = self.norm_and_kurtosis(x, mask)
                self._store("r_norm", layer, n)
                self._store("r_kurtosis", layer, k)

            def post(module: nn.Module, args: tuple, output: Any, layer: int = layer) -> None:
                z = output[0] if isinstance(output, (tuple, list)) else output
                z = self._batched(z)
                mask = None if self._mask is None else self._mask.to(z.device)
                self._store("z_norm", layer, self.norm_only(z, mask))

            self._handles.append(norm2.register_forward_pre_hook(pre))
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
