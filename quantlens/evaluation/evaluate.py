"""Evaluation of a dataset on the model as it is now: each dataset's declaration builds its requests,
:func:`quantlens.evaluation.scoring.loglikelihood` scores them, the requests turn scores into the result.

Every evaluation also returns its examples (``result["per_example"]``, a DataFrame): one row per
window / document / passage with ``example_id``, ``n_tokens`` (predicted tokens) and ``nll`` (mean
NLL per predicted token), Lambada also ``correct``; so the token-weighted mean of ``nll`` is
log(ppl). With ``residual=True`` the same forwards also fill the full-precision residual-stream
statistics of :mod:`quantlens.evaluation.residual` (``result["residual"]``, long format, one row per example
and layer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantlens.evaluation.data import dataset_info
from quantlens.evaluation.kl import TopK
from quantlens.evaluation.scoring import Continuations, Progress, Windows, input_device, loglikelihood

__all__ = ["evaluate_dataset", "input_device", "lambada", "perplexity"]


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int | None = None,
    progress: Progress | None = None,
    residual: bool = False,
    keep_examples: bool = True,
    topk: int = 0,
    kl_reference: "TopK | None" = None,
    routing: bool = False,
    routing_reference: torch.Tensor | None = None,
) -> dict[str, Any]:
    """ppl = exp(mean next-token NLL over all predicted tokens of all ``[n, seqlen]`` windows.

    Each window is one example (``per_example``); ``residual`` also records the residual-stream
    statistics. ``keep_examples=False`` leaves the per-example table out (benchmarks only). ``topk`` > 0 (the
    reference run) also keeps every predicted token's top-``topk`` log-probabilities and tail mass
    (``result["topk"]``, :class:`quantlens.evaluation.kl.TopK`); with ``kl_reference`` (those of the
    reference, same windows) each example also gets its mean truncated KL(p_ref ‖ p) (a ``kl`` column).
    ``routing`` (an MoE; :mod:`quantlens.evaluation.routing`): each MoE layer's expert load
    (``result["routing"]``) and, for the reference, every token's expert set (``result["routing_sets"]``);
    with ``routing_reference`` (those sets) the router flips: a ``router_flips`` column and table column."""
    return _windows(model, Windows(windows), batch_size=batch_size, progress=progress, residual=residual, topk=topk,
                    kl_reference=kl_reference, routing=routing, routing_reference=routing_reference, keep_examples=keep_examples)


def _windows(model: nn.Module, w: Windows, keep_examples: bool = True, **kw: Any) -> dict[str, Any]:
    if (max_pos := getattr(model.config, "max_position_embeddings", None)) and w.seqlen > max_pos:
        raise ValueError(f"seqlen: {w.seqlen} exceeds the model's max_position_embeddings {max_pos}")
    out = w.result(loglikelihood(model, w, **kw))
    if not keep_examples:
        for k in ("per_example", "example_tokens"):
            out.pop(k)
    return out


def lambada(
    model: nn.Module,
    requests: list[tuple[list[int], list[int]]],
    *,
    pad_id: int = 0,
    batch_size: int | None = None,
    max_length: int | None = None,
    progress: Progress | None = None,
    residual: bool = False,
) -> dict[str, Any]:
    """Last-word accuracy (every target token is the greedy argmax) and mean last-word NLL.

    Requests are (context ids, target ids), sorted by length and right-padded per batch; a context
    longer than ``max_length`` loses its oldest tokens. Each passage is one example
    (``per_example``: its NLL per target token and ``correct``); ``residual`` records the
    residual-stream statistics over its real (unpadded) input tokens.
    """
    max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    c = Continuations(requests, pad_id=pad_id, max_length=max_length)
    return c.result(loglikelihood(model, c, batch_size=batch_size, progress=progress, residual=residual, greedy=True))


def evaluate_dataset(model: nn.Module, tokenizer: Any, name: str, **kw: Any) -> dict[str, Any]:
    """Evaluate one registered dataset; keyword options: seqlen, path, max_windows/limit,
    batch_size, progress, residual, ``examples="documents"`` with ``example_len``, and for the KL error
    ``topk`` (the reference) / ``kl_reference`` (the others; perplexity datasets), and for the router
    flips of an MoE ``routing`` (the reference) / ``routing_reference`` (the others). Options a
    dataset does not take are ignored."""
    info = dataset_info(name)
    if info.requests is None:
        raise ValueError(f"dataset {name}: scored by lm-evaluation-harness (quantlens.evaluation.harness), not here")
    reqs = info.requests(info, model, tokenizer, kw)
    score = {k: kw[k] for k in ("batch_size", "progress", "residual") if kw.get(k) is not None}
    if reqs.per_token:
        score.update({k: kw[k] for k in ("topk", "kl_reference", "routing", "routing_reference") if kw.get(k) is not None})
        return _windows(model, reqs, **score)
    return reqs.result(loglikelihood(model, reqs, greedy=True, **score))
