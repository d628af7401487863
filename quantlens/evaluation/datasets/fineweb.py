"""FineWeb (the hub's ``sample-10BT``, streamed): perplexity over windows, or its documents."""

from __future__ import annotations

import itertools
from typing import Iterator

from quantlens.evaluation.corpus import text_requests
from quantlens.evaluation.sources import DatasetInfo, load_records, text_estimate

FINEWEB_HUB = ("HuggingFaceFW/fineweb", "sample-10BT")


def iter_fineweb_docs(path: str | None = None) -> Iterator[str]:
    """FineWeb documents in order: the hub sample (``sample-10BT``, streamed: nothing is downloaded
    beyond what is read) or local jsonl / json.gz / parquet files with a ``text`` column."""
    if path is None:
        from datasets import load_dataset

        name, config = FINEWEB_HUB
        for r in load_dataset(name, name=config, split="train", streaming=True):
            yield r["text"]
        return
    for r in load_records(path):
        yield r["text"]


def load_fineweb_text(path: str | None = None, n_docs: int = 1000) -> str:
    """The first ``n_docs`` FineWeb documents joined by blank lines (windows protocol)."""
    return "\n\n".join(itertools.islice(iter_fineweb_docs(path), n_docs))


DATASET = DatasetInfo("fineweb", "perplexity", load_fineweb_text, "FineWeb (sample-10BT) documents, perplexity", iter_fineweb_docs,
                      text_estimate(900_000), hub_tokens=900_000, requests=text_requests, rank=2)
