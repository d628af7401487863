"""C4 en validation (GPTQ's "c4-new" subset): perplexity over windows, or its documents."""

from __future__ import annotations

import itertools
from typing import Iterator

from quantlens.evaluation.corpus import text_requests
from quantlens.evaluation.sources import DatasetInfo, load_records, text_estimate


def iter_c4_docs(path: str | None = None) -> Iterator[str]:
    if path is None:
        from datasets import load_dataset

        ds = load_dataset(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
        )
        yield from ds["text"]
        return
    for r in load_records(path):
        yield r["text"]


def load_c4_text(path: str | None = None, n_docs: int = 1100) -> str:
    """The first ``n_docs`` documents of C4 en validation shard 0 joined by spaces (GPTQ's "c4-new")."""
    return " ".join(itertools.islice(iter_c4_docs(path), n_docs))


DATASET = DatasetInfo("c4", "perplexity", load_c4_text, "C4 en validation subset, perplexity", iter_c4_docs,
                      text_estimate(550_000), hub_tokens=550_000, requests=text_requests, rank=1)
