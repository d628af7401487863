"""Evaluation datasets: Lambada (OpenAI), WikiText-2 raw test, C4 validation subset, FineWeb.

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

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: planning a sweep must not pay for it
    import torch

from quantlens.errors import ConfigError
from quantlens.paths import cache_dir  # noqa: F401  (importable from here as before)


DOCUMENTS = ("documents", "paper2")  # example units that are documents (paper2: the second paper's protocol)


LM_EVAL = "lm-eval"  # the dataset entry of lm-evaluation-harness tasks
HARNESS_FIELDS = ("tasks", "num_fewshot", "include_path")  # DatasetEntry fields only lm-eval takes
BYTES_PER_TOKEN = 4.0  # English text, BPE
LAMBADA_TOKENS = 90  # tokens of a Lambada passage, on average
HUB_LAMBADA = 5153  # passages of the hub's Lambada (OpenAI) test split
RELEASED_ROW = 512  # tokens of a released qerror row


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset, declared: a new dataset is one row of :data:`DATASETS` (callers ask the
    declaration — never the name — what an example is, what it needs and what it writes).

    ``kind`` is how its examples are scored: ``perplexity`` (text cut into windows or documents,
    token-level NLL), ``last-word`` (Lambada: the target word's NLL and accuracy), ``tokens``
    (released token-id rows, no tokenizer), ``tasks`` (lm-evaluation-harness)."""

    name: str
    kind: str
    loader: Callable[..., Any] | None
    doc: str
    documents: Callable[[str | None], Iterator[str]] | None = None  # for ``examples: documents``
    estimate: Callable[[Any, int], tuple[float, int]] | None = None  # (entry, eval seqlen) → (tokens, examples), not tokenized
    hub_tokens: int = 500_000  # tokens of its hub split (the estimate without a local path)
    unit: str | None = None  # an example's unit in the MLflow dataset profile; None: the entry's ``examples``
    columns: tuple[str, ...] = ()  # per-example columns beyond example_id, n_tokens, nll
    metrics: tuple[tuple[str, bool], ...] = (("ppl", False), ("nll", False))  # <name>_<metric>, higher is better
    paired_nll: str = "delta_nll"  # the paired statistic of its <name>_nll (token-weighted; Lambada: per passage)
    check: Callable[[Any], None] | None = None  # more rules on a DatasetEntry (ValueError, one line)

    @property
    def windowed(self) -> bool:
        """Text cut into windows (or documents) of a seqlen the sweep sets."""
        return self.kind == "perplexity"

    @property
    def takes_seqlen(self) -> bool:
        """A length the user may set (windows; Lambada's passages, capped)."""
        return self.kind in ("perplexity", "last-word")

    @property
    def text(self) -> bool:
        """Needs a tokenizer (released token ids do not)."""
        return self.kind != "tokens"

    @property
    def token_ids(self) -> bool:
        return self.kind == "tokens"

    @property
    def harness(self) -> bool:
        return self.kind == "tasks"

    @property
    def per_token(self) -> bool:
        """Scored token by token against the reference (KL error, router flips); not Lambada's last word."""
        return self.kind in ("perplexity", "tokens")

    @property
    def per_example_analysis(self) -> bool:
        """In the second paper's per-example analysis by default."""
        return self.kind in ("perplexity", "tokens")

    @property
    def row_tokens(self) -> int | None:
        """Tokens of every example where they are fixed (released rows)."""
        return RELEASED_ROW if self.kind == "tokens" else None


def _load_json_records(path: str | list[str]) -> list[dict[str, Any]]:
    from datasets import load_dataset

    files = [str(p) for p in (path if isinstance(path, list) else expand(path))]
    if all(f.endswith(".parquet") for f in files):
        return list(load_dataset("parquet", data_files=files, split="train"))
    return list(load_dataset("json", data_files=files, split="train"))


def expand(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".jsonl", ".json", ".gz", ".txt", ".raw", ".parquet"))
    else:
        files = sorted(p.parent.glob(p.name)) if any(c in p.name for c in "*?[") else [p]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"dataset path {path!r}: no such file")
    for f in files:
        if f.stat().st_size == 0:
            raise ConfigError(f"dataset path {path!r}: file {f.name} is empty")
    return files


def load_wikitext2_text(path: str | None = None) -> str:
    """WikiText-2 raw test as one string. Hub: rows joined by "\\n\\n" (GPTQ's protocol);
    local: the raw file as is (``wiki.test.raw``)."""
    if path is None:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        return "\n\n".join(rows)
    return "".join(f.read_text(encoding="utf-8") for f in expand(path))


def load_c4_text(path: str | None = None, n_docs: int = 1100) -> str:
    """The first ``n_docs`` documents of C4 en validation shard 0 joined by spaces (GPTQ's "c4-new")."""
    return " ".join(itertools.islice(iter_c4_docs(path), n_docs))


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
    for r in _load_json_records(path):
        yield r["text"]


def load_fineweb_text(path: str | None = None, n_docs: int = 1000) -> str:
    """The first ``n_docs`` FineWeb documents joined by blank lines (windows protocol)."""
    return "\n\n".join(itertools.islice(iter_fineweb_docs(path), n_docs))


def iter_c4_docs(path: str | None = None) -> Iterator[str]:
    if path is None:
        from datasets import load_dataset

        ds = load_dataset(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
        )
        yield from ds["text"]
        return
    for r in _load_json_records(path):
        yield r["text"]


_WIKI_ARTICLE = re.compile(r"^ = [^=].* = $", re.M)


def iter_wikitext2_docs(path: str | None = None) -> Iterator[str]:
    """WikiText-2 articles: the text split at its top-level headings (`` = Title = ``)."""
    text = load_wikitext2_text(path)
    starts = [m.start() for m in _WIKI_ARTICLE.finditer(text)] or [0]
    for a, b in zip(starts, starts[1:] + [len(text)]):
        doc = text[a:b].strip()
        if doc:
            yield doc


def load_lambada(path: str | None = None, limit: int | None = None) -> list[tuple[str, str]]:
    """(context, target word) pairs of the OpenAI Lambada test set (5,153 passages)."""
    if path is None:
        from datasets import load_dataset

        records = list(load_dataset("EleutherAI/lambada_openai", "default", split="test"))
    else:
        records = _load_json_records(path)
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


def token_files(path: str) -> list[Path]:
    """The ``.pt`` files of a token-id dataset: the file itself, or every ``*.pt`` of a folder (sorted)."""
    p = Path(path).expanduser()
    files = sorted(p.glob("*.pt")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"dataset path {path!r}: no .pt file of token ids")
    return files


def load_token_rows(path: str, limit: int | None = None) -> tuple["torch.Tensor", list[str]]:
    """The second paper's released examples (terarachang/QError ``data/<model>/<method>-{large,nonlarge}_error_seqs-10.pt``):
    each file a ``[rows, tokens]`` integer tensor of token ids, one example a row, evaluated as it is (no
    tokenizer). Rows of every file in order (``limit``: the first N of each), and the stem of the file each
    row came from (which released set it is in)."""
    import torch

    rows, tags = [], []
    for f in token_files(path):
        try:
            t = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError(f"dataset path {path!r}: {f.name} is not a torch file of token ids ({type(err).__name__})") from None
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.is_floating_point() or t.is_complex() or t.numel() == 0:
            what = f"a tensor of shape {tuple(t.shape)} and dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ConfigError(f"dataset path {path!r}: {f.name} holds {what}, not a [rows, tokens] tensor of token ids")
        if rows and t.shape[1] != rows[0].shape[1]:
            raise ConfigError(f"dataset path {path!r}: {f.name} has rows of {t.shape[1]} tokens, {token_files(path)[0].name} of {rows[0].shape[1]}")
        t = t[:limit] if limit else t
        rows.append(t.to(torch.long))
        tags += [f.stem] * t.shape[0]
    return torch.cat(rows), tags


def _text_estimate(d: Any, seqlen: int) -> tuple[float, int]:
    T = d.seqlen or seqlen
    total = sum(f.stat().st_size for f in expand(d.path)) / BYTES_PER_TOKEN if d.path else DATASETS[d.name].hub_tokens
    if d.examples in DOCUMENTS:
        T = (d.example_len or 512) + 1
    n = max(1, int(total // T))
    if d.max_windows:
        n = min(n, d.max_windows)
    return float(n * T), n


def _passages_estimate(d: Any, seqlen: int) -> tuple[float, int]:
    n = sum(sum(1 for _ in open(f, "rb")) for f in expand(d.path)) if d.path else HUB_LAMBADA
    n = min(n, d.limit or n)
    return float(n * LAMBADA_TOKENS), n


def _rows_estimate(d: Any, seqlen: int) -> tuple[float, int]:
    """Released rows: [rows, tokens] int64 files, their sizes say how many (8 bytes a token)."""
    total = sum(f.stat().st_size for f in token_files(d.path)) / 8
    rows = d.limit * len(token_files(d.path)) if d.limit else int(total // RELEASED_ROW)
    return float(min(total, rows * RELEASED_ROW)), max(1, rows)


def _tasks_estimate(d: Any, seqlen: int) -> tuple[float, int]:
    """Each task's documents × its choices, ~100 tokens each (an estimate)."""
    n = (d.limit or 1000) * len(d.tasks or [])
    return float(n * 4 * 100), 0


def _check_rows(d: Any) -> None:
    if not d.path:
        raise ValueError(f"{d.name}: give path: a .pt file (or a folder of them) of the released token ids "
                         "(terarachang/QError data/<model>/<method>-{large,nonlarge}_error_seqs-10.pt)")
    wrong = [k for k in ("seqlen", "max_windows", "example_len") if getattr(d, k) is not None]
    if wrong or d.examples != "windows":
        raise ValueError(f"{d.name}: {', '.join(wrong or ['examples'])} do not apply: each row is one example as released "
                         "(limit takes the first N rows of each file)")


def _check_tasks(d: Any) -> None:
    if not d.tasks:
        raise ValueError(f"{d.name}: give tasks: [task or group names]")
    wrong = [k for k in ("path", "seqlen", "max_windows", "example_len") if getattr(d, k) is not None]
    if wrong:
        raise ValueError(f"{d.name}: {', '.join(wrong)} do not apply to lm-eval tasks (limit, num_fewshot, include_path do)")


DATASETS: dict[str, DatasetInfo] = {
    "wikitext2": DatasetInfo("wikitext2", "perplexity", load_wikitext2_text, "WikiText-2 raw test, perplexity", iter_wikitext2_docs,
                             _text_estimate, hub_tokens=290_000),  # test text, tokens (OPT tokenizer)
    "c4": DatasetInfo("c4", "perplexity", load_c4_text, "C4 en validation subset, perplexity", iter_c4_docs,
                      _text_estimate, hub_tokens=550_000),
    "fineweb": DatasetInfo("fineweb", "perplexity", load_fineweb_text, "FineWeb (sample-10BT) documents, perplexity", iter_fineweb_docs,
                           _text_estimate, hub_tokens=900_000),
    "lambada": DatasetInfo("lambada", "last-word", load_lambada, "Lambada (OpenAI) last-word accuracy", None, _passages_estimate,
                           unit="passage", columns=("correct",), metrics=(("acc", True), ("nll", False)),
                           paired_nll="delta_example_nll"),
    "qerror": DatasetInfo("qerror", "tokens", load_token_rows,
                          "the second paper's released D_large / D_ctrl token ids (terarachang/QError), perplexity per row",
                          None, _rows_estimate, unit="released rows", columns=("released",), check=_check_rows),
    LM_EVAL: DatasetInfo(LM_EVAL, "tasks", None, "lm-evaluation-harness tasks (quantlens.evaluation.harness)", None,
                         _tasks_estimate, check=_check_tasks),
}
HUB_TOKENS = {name: info.hub_tokens for name, info in DATASETS.items() if info.windowed}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ConfigError(f"dataset {name!r}: unknown (known: {', '.join(DATASETS)})")
    return DATASETS[name]


# --- Tokenization and windows --------------------------------------------------------------
def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def source_fingerprint(name: str, path: str | None) -> str:
    if path is None:
        return f"hub:{name}"
    files = token_files(path) if dataset_info(name).kind == "tokens" else expand(path)
    parts = [f"{f.resolve()}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def perplexity_windows(
    tokenizer: Any,
    name: str,
    seqlen: int,
    *,
    path: str | None = None,
    max_windows: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Non-overlapping ``[n, seqlen]`` windows of the whole test text tokenized once (remainder dropped)."""
    if seqlen < 2:
        raise ConfigError(f"seqlen: must be at least 2, got {seqlen}")
    return _cached(f"{name}-{seqlen}", [tokenizer_fingerprint(tokenizer), name, source_fingerprint(name, path), seqlen, max_windows],
                   lambda: _windows(tokenizer, name, seqlen, path, max_windows), use_cache)


def _cached(stem: str, key_parts: list[Any], build: Callable[[], "torch.Tensor"], use_cache: bool) -> "torch.Tensor":
    """Token tensors cached on disk under ``<cache>/windows/<stem>-<hash of key_parts>.pt`` (atomic writes)."""
    import torch

    key = hashlib.sha256("|".join(map(str, key_parts)).encode()).hexdigest()[:24]
    f = cache_dir() / "windows" / f"{stem}-{key}.pt"
    if use_cache and f.is_file():
        return torch.load(f)
    out = build()
    if use_cache:
        _atomic_save(out, f)
    return out


def _windows(tokenizer: Any, name: str, seqlen: int, path: str | None, max_windows: int | None) -> "torch.Tensor":
    import torch

    text = dataset_info(name).loader(path)
    if not text.strip():
        raise ConfigError(f"dataset {name!r} ({path or 'hub'}): the text is empty")
    ids = torch.tensor(tokenizer(text, return_tensors=None)["input_ids"], dtype=torch.long)
    n = ids.numel() // seqlen
    if n == 0:
        raise ConfigError(
            f"seqlen: {seqlen} is larger than the whole {name} text ({ids.numel()} tokens): use a smaller seqlen"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen).contiguous()


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


def document_examples(
    tokenizer: Any,
    name: str,
    example_len: int,
    *,
    path: str | None = None,
    max_examples: int | None = None,
    use_cache: bool = True,
    dedup: bool = False,
) -> torch.Tensor:
    """``[n, example_len + 1]``: BOS + the first ``example_len`` tokens of each document with at
    least that many tokens, in source order; shorter documents are dropped. ``max_examples``
    stops reading after that many (a streamed hub source is read no further). ``dedup`` (the second
    paper's protocol): an example whose token 5-gram Jaccard with an earlier kept one exceeds 0.1 is
    dropped too (:func:`drop_near_duplicates`), before ``max_examples`` counts."""
    info = dataset_info(name)
    if info.documents is None:
        raise ConfigError(f"dataset {name!r}: has no documents (examples: documents works for {', '.join(n for n, d in DATASETS.items() if d.documents)})")
    if example_len < 2:
        raise ConfigError(f"example_len: must be at least 2, got {example_len}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ConfigError(f"examples: documents prepends a BOS token, but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has none")
    key = ["docs", tokenizer_fingerprint(tokenizer), name, source_fingerprint(name, path), example_len, max_examples] + (["dedup"] if dedup else [])
    return _cached(f"{name}-docs{example_len}" + ("-dedup" if dedup else ""), key,
                   lambda: _documents(tokenizer, info, name, example_len, bos, path, max_examples, dedup), use_cache)


DUP_NGRAM, DUP_JACCARD = 5, 0.1  # the second paper's near-duplicate rule


def _grams(ids: Sequence[int], n: int = DUP_NGRAM) -> set[tuple[int, ...]]:
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


class NearDuplicates:
    """Greedy near-duplicate filter: :meth:`keep` says whether a sequence's token n-gram Jaccard with
    every sequence kept so far is at most ``threshold`` (and then keeps it). Candidates come from an
    index of the kept n-grams, so only sequences sharing an n-gram are compared."""

    def __init__(self, n: int = DUP_NGRAM, threshold: float = DUP_JACCARD):
        self.n, self.threshold = n, threshold
        self.kept: list[set] = []
        self.index: dict[tuple[int, ...], list[int]] = {}

    def keep(self, ids: Sequence[int]) -> bool:
        g = _grams(ids, self.n)
        shared: dict[int, int] = {}
        for gram in g:
            for j in self.index.get(gram, ()):
                shared[j] = shared.get(j, 0) + 1
        for j, inter in shared.items():
            if inter / (len(g) + len(self.kept[j]) - inter) > self.threshold:
                return False
        for gram in g:
            self.index.setdefault(gram, []).append(len(self.kept))
        self.kept.append(g)
        return True


def drop_near_duplicates(rows: Sequence[Sequence[int]], n: int = DUP_NGRAM, threshold: float = DUP_JACCARD) -> list[int]:
    """Indices of the rows kept by :class:`NearDuplicates`, in order."""
    f = NearDuplicates(n, threshold)
    return [i for i, r in enumerate(rows) if f.keep(list(r))]


def _documents(tokenizer: Any, info: DatasetInfo, name: str, example_len: int, bos: int, path: str | None,
               max_examples: int | None, dedup: bool = False) -> "torch.Tensor":
    import torch

    rows: list[list[int]] = []
    seen = NearDuplicates() if dedup else None
    for doc in info.documents(path):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= example_len and (seen is None or seen.keep(ids[:example_len])):
            rows.append([bos] + ids[:example_len])
            if max_examples is not None and len(rows) >= max_examples:
                break
    if not rows:
        raise ConfigError(f"dataset {name!r} ({path or 'hub'}): no document has {example_len} tokens: use a smaller example_len")
    return torch.tensor(rows, dtype=torch.long)


def _atomic_save(t: torch.Tensor, f: Path) -> None:
    import torch
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    torch.save(t, tmp)
    tmp.replace(f)  # atomic: concurrent sweeps never read a half-written file


def example_ids(sequences: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
    """Stable id of each example: the first 16 hex digits of BLAKE2b over its token ids (int64).

    Equal tokens give equal ids in every setting, run and sweep; an exact repeat inside one dataset
    gets ``~1``, ``~2``… appended (in order), so ids stay unique.
    """
    import torch

    out, seen = [], {}
    for seq in sequences:
        t = seq if isinstance(seq, torch.Tensor) else torch.tensor(list(seq), dtype=torch.long)
        h = hashlib.blake2b(t.to(torch.long).contiguous().numpy().tobytes(), digest_size=8).hexdigest()
        k = seen.get(h, 0)
        seen[h] = k + 1
        out.append(h if k == 0 else f"{h}~{k}")
    return out
