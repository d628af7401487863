"""Text corpora as requests: the text cut into ``[n, seqlen]`` windows, or (``examples: documents``)
BOS + the first ``example_len`` tokens of each long-enough document — every next token scored.
One builder serves every text corpus declared in :mod:`quantlens.evaluation.datasets`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantlens.evaluation.sources import DOCUMENTS, DatasetInfo, documents_of, windows_of

if TYPE_CHECKING:
    from quantlens.evaluation.scoring import Windows


def text_requests(info: DatasetInfo, model: Any, tokenizer: Any, kw: dict[str, Any]) -> "Windows":
    """Options: ``path``, ``seqlen`` (capped at the model's positions), ``max_windows``, ``examples``
    (``windows``, ``documents``, ``paper2``: documents with near-duplicates dropped), ``example_len``."""
    from quantlens.evaluation.scoring import Windows

    max_pos = getattr(model.config, "max_position_embeddings", None)
    if kw.get("examples") in DOCUMENTS:
        example_len = kw.get("example_len") or 512
        if max_pos and example_len + 1 > max_pos:
            raise ValueError(f"example_len: {example_len} + BOS exceeds the model's max_position_embeddings {max_pos}")
        rows = documents_of(tokenizer, info, example_len, path=kw.get("path"), max_examples=kw.get("max_windows"),
                            dedup=kw.get("examples") == "paper2")
    else:
        seqlen = kw.get("seqlen") or 2048
        seqlen = min(seqlen, max_pos) if max_pos else seqlen
        rows = windows_of(tokenizer, info, seqlen, path=kw.get("path"), max_windows=kw.get("max_windows"))
    return Windows(rows)
