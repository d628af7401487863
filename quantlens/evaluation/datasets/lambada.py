"""Lambada (OpenAI): each passage's last word after its context — accuracy (every target token the
greedy argmax) and the word's NLL, scored as continuations the way lm-evaluation-harness splits them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantlens.errors import ConfigError
from quantlens.evaluation.sources import HUB_LAMBADA, LAMBADA_TOKENS, DatasetInfo, expand, load_records

if TYPE_CHECKING:
    from quantlens.evaluation.scoring import Continuations


def load_lambada(path: str | None = None, limit: int | None = None) -> list[tuple[str, str]]:
    """(context, target word) pairs of the OpenAI Lambada test set (5,153 passages)."""
    if path is None:
        from datasets import load_dataset

        records = list(load_dataset("EleutherAI/lambada_openai", "default", split="test"))
    else:
        records = load_records(path)
    out = []
    for r in records[:limit] if limit else records:
        if r.get("context") is not None and r.get("continuation") is not None:
            out.append((r["context"], r["continuation"].strip()))
        else:
            ctx, _, word = r["text"].rpartition(" ")
            out.append((ctx, word))
    if not out:
        raise ConfigError(f"lambada dataset {path!r}: no examples")
    return out


def lambada_requests(tokenizer: Any, examples: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, target ids) per example, split as lm-evaluation-harness does: tokenize the
    whole passage and the context; the target is what the whole adds after the context."""
    contexts = [c for c, _ in examples]
    wholes = [f"{c} {w}" for c, w in examples]
    ctx_ids = tokenizer(contexts)["input_ids"]
    whole_ids = tokenizer(wholes)["input_ids"]
    out = []
    for (c, w), ci, wi in zip(examples, ctx_ids, whole_ids):
        if wi[: len(ci)] == ci and len(wi) > len(ci):
            out.append((ci, wi[len(ci) :]))
        else:  # tokenizer merged across the boundary: fall back to encoding the word on its own
            out.append((ci, tokenizer(" " + w, add_special_tokens=False)["input_ids"]))
    return out


_CACHE: dict[tuple, tuple[Any, list]] = {}  # (id(tokenizer), path, limit) → (tokenizer kept alive, requests)


def requests(info: DatasetInfo, model: Any, tokenizer: Any, kw: dict[str, Any]) -> "Continuations":
    """Options: ``path``, ``limit`` (the first N passages), ``seqlen`` (a context's cap; default the model's positions)."""
    from quantlens.evaluation.scoring import Continuations

    key = (id(tokenizer), kw.get("path"), kw.get("limit"))
    if key not in _CACHE:  # a sweep evaluates the same passages under every setting
        _CACHE.clear()
        _CACHE[key] = (tokenizer, lambada_requests(tokenizer, load_lambada(kw.get("path"), kw.get("limit"))))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    max_length = kw.get("seqlen") or getattr(model.config, "max_position_embeddings", None) or 2048
    return Continuations(_CACHE[key][1], pad_id=pad, max_length=max_length)


def estimate(d: Any, seqlen: int) -> tuple[float, int]:
    n = sum(sum(1 for _ in open(f, "rb")) for f in expand(d.path)) if d.path else HUB_LAMBADA
    n = min(n, d.limit or n)
    return float(n * LAMBADA_TOKENS), n


DATASET = DatasetInfo("lambada", "last-word", load_lambada, "Lambada (OpenAI) last-word accuracy", None, estimate,
                      unit="passage", columns=("correct",), metrics=(("acc", True), ("nll", False)),
                      paired_nll="delta_example_nll", requests=requests, rank=3)
