"""Penn Treebank (test split): perplexity over windows of its sentences joined by spaces — GPTQ's
third perplexity corpus ("ptb-new"), beside WikiText-2 and C4."""

from __future__ import annotations

from quantlens.evaluation.corpus import text_requests
from quantlens.evaluation.sources import DatasetInfo, expand, load_records, text_estimate

PTB_HUB = ("ptb_text_only", "penn_treebank")


def load_ptb_text(path: str | None = None) -> str:
    """The test sentences joined by single spaces (GPTQ's ``ptb-new``). Hub: ``ptb_text_only``;
    local: ``ptb.test.txt`` (one sentence a line) or jsonl / parquet files with a ``sentence`` column."""
    if path is None:
        from datasets import load_dataset

        name, config = PTB_HUB
        return " ".join(load_dataset(name, config, split="test")["sentence"])
    files = expand(path)
    if all(f.suffix in (".txt", ".raw") for f in files):
        lines = [line.strip() for f in files for line in f.read_text(encoding="utf-8").splitlines()]
    else:
        lines = [r["sentence"].strip() for r in load_records([str(f) for f in files])]
    return " ".join(line for line in lines if line)


DATASET = DatasetInfo("ptb", "perplexity", load_ptb_text, "Penn Treebank test sentences, perplexity (GPTQ's ptb-new)", None,
                      text_estimate(100_000), hub_tokens=100_000, requests=text_requests)
