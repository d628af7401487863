"""The dataset registry: every module of :mod:`quantlens.evaluation.datasets` declares one dataset
(``DATASET``), found by listing the package — WikiText-2 raw test, C4 validation subset, FineWeb,
Lambada (OpenAI), the second paper's released rows, lm-evaluation-harness tasks.

Each loader goes through ``datasets.load_dataset`` — from the hub by default, or from local files
given as ``path`` (text, jsonl, json.gz or parquet), so every test runs offline on ``shared/data``.
Tokenized perplexity windows are cached on disk, keyed by tokenizer + dataset + seqlen.

Examples (the unit of the per-example analysis): a perplexity *window* by default, or a *document*
(``examples: documents``): BOS + the first ``example_len`` tokens of each document that has at least
that many, shorter documents dropped (the second paper's protocol). Every example has a stable id,
a hash of its tokens (:func:`example_ids`), so the same example has the same id in every setting,
run and sweep.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from quantlens.errors import ConfigError
from quantlens.evaluation import datasets as _package
from quantlens.evaluation import sources
from quantlens.evaluation.datasets.lambada import lambada_requests, load_lambada  # noqa: F401  (importable from here)
from quantlens.evaluation.datasets.lm_eval import HARNESS_FIELDS, LM_EVAL  # noqa: F401
from quantlens.evaluation.datasets.qerror import load_token_rows  # noqa: F401
from quantlens.evaluation.datasets.wikitext2 import load_wikitext2_text  # noqa: F401
from quantlens.evaluation.sources import (  # noqa: F401  (the vocabulary of datasets, one import for callers)
    BYTES_PER_TOKEN, DOCUMENTS, HUB_LAMBADA, LAMBADA_TOKENS, RELEASED_ROW, DatasetInfo, NearDuplicates, cache_dir,
    documents_of, drop_near_duplicates, example_ids, expand, token_files, tokenizer_fingerprint, windows_of,
)

if TYPE_CHECKING:
    import torch


def discover() -> dict[str, DatasetInfo]:
    """Every ``DATASET`` of the datasets package, by rank then name."""
    found = []
    for m in pkgutil.iter_modules(_package.__path__):
        info = getattr(importlib.import_module(f"{_package.__name__}.{m.name}"), "DATASET", None)
        if isinstance(info, DatasetInfo):
            found.append(info)
    return {d.name: d for d in sorted(found, key=lambda d: (d.rank, d.name))}


DATASETS: dict[str, DatasetInfo] = discover()
HUB_TOKENS = {name: info.hub_tokens for name, info in DATASETS.items() if info.windowed}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ConfigError(f"dataset {name!r}: unknown (known: {', '.join(DATASETS)})")
    return DATASETS[name]


def source_fingerprint(name: str, path: str | None) -> str:
    """What dataset ``name``'s examples were read from (:func:`quantlens.evaluation.sources.source_fingerprint`)."""
    return sources.source_fingerprint(dataset_info(name), path)


def perplexity_windows(tokenizer: Any, name: str, seqlen: int, *, path: str | None = None,
                       max_windows: int | None = None, use_cache: bool = True) -> "torch.Tensor":
    """Non-overlapping ``[n, seqlen]`` windows of dataset ``name``'s whole text tokenized once (remainder dropped)."""
    return windows_of(tokenizer, dataset_info(name), seqlen, path=path, max_windows=max_windows, use_cache=use_cache)


def document_examples(tokenizer: Any, name: str, example_len: int, *, path: str | None = None,
                      max_examples: int | None = None, use_cache: bool = True, dedup: bool = False) -> "torch.Tensor":
    """``[n, example_len + 1]`` documents of dataset ``name`` (:func:`quantlens.evaluation.sources.documents_of`)."""
    info = dataset_info(name)
    if info.documents is None:
        with_docs = ", ".join(n for n, d in DATASETS.items() if d.documents)
        raise ConfigError(f"dataset {name!r}: has no documents (examples: documents works for {with_docs})")
    return documents_of(tokenizer, info, example_len, path=path, max_examples=max_examples, use_cache=use_cache, dedup=dedup)
