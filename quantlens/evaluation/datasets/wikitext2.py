"""WikiText-2 raw test: perplexity over windows of the whole text, or its articles as documents."""

from __future__ import annotations

import re
from typing import Iterator

from quantlens.evaluation.corpus import text_requests
from quantlens.evaluation.sources import DatasetInfo, expand, text_estimate


def load_wikitext2_text(path: str | None = None) -> str:
    """WikiText-2 raw test as one string. Hub: rows joined by "\\n\\n" (GPTQ's protocol);
    local: the raw file as is (``wiki.test.raw``)."""
    if path is None:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        return "\n\n".join(rows)
    return "".join(f.read_text(encoding="utf-8") for f in expand(path))


_WIKI_ARTICLE = re.compile(r"^ = [^=].* = $", re.M)


def iter_wikitext2_docs(path: str | None = None) -> Iterator[str]:
    """WikiText-2 articles: the text split at its top-level headings (`` = Title = ``)."""
    text = load_wikitext2_text(path)
    starts = [m.start() for m in _WIKI_ARTICLE.finditer(text)] or [0]
    for a, b in zip(starts, starts[1:] + [len(text)]):
        doc = text[a:b].strip()
        if doc:
            yield doc


DATASET = DatasetInfo("wikitext2", "perplexity", load_wikitext2_text, "WikiText-2 raw test, perplexity", iter_wikitext2_docs,
                      text_estimate(290_000), hub_tokens=290_000, requests=text_requests, rank=0)  # test text, tokens (OPT tokenizer)
