"""What every dataset declaration is made of: :class:`DatasetInfo`, reading local files, tokenized
windows and documents (cached on disk), the token estimates the plan uses, and stable example ids.

Torch-free at import: planning a sweep reads declarations without paying for torch. The datasets
themselves are one module each in :mod:`quantlens.evaluation.datasets`; :mod:`quantlens.evaluation.data`
is their registry.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from quantlens.errors import ConfigError
from quantlens.paths import cache_dir

if TYPE_CHECKING:  # torch is imported where it is used: planning a sweep must not pay for it
    import torch

DOCUMENTS = ("documents", "paper2")  # example units that are documents (paper2: the second paper's protocol)
BYTES_PER_TOKEN = 4.0  # English text, BPE
LAMBADA_TOKENS = 90  # tokens of a Lambada passage, on average
HUB_LAMBADA = 5153  # passages of the hub's Lambada (OpenAI) test split
RELEASED_ROW = 512  # tokens of a released qerror row

Builder = Callable[["DatasetInfo", Any, Any, dict], Any]  # (info, model, tokenizer, options) → scoring.Windows / Continuations


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset, declared: a new dataset is one module of :mod:`quantlens.evaluation.datasets`
    defining ``DATASET = DatasetInfo(...)`` (callers ask the declaration — never the name — what an
    example is, what it needs and what it writes).

    ``kind`` is how its examples are scored: ``perplexity`` (text cut into windows or documents,
    token-level NLL), ``last-word`` (Lambada: the target word's NLL and accuracy), ``tokens``
    (released token-id rows, no tokenizer), ``tasks`` (lm-evaluation-harness). ``requests`` builds
    what :func:`quantlens.evaluation.scoring.loglikelihood` scores (None: lm-eval scores its own)."""

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
    requests: Builder | None = None
    rank: int = 100  # its place in listings (shipped datasets first, in the order users know them)

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

    def metric_names(self) -> list[str]:
        return [m for m, _ in self.metrics]


# --- Local files ------------------------------------------------------------------------------------
def expand(path: str) -> list[Path]:
    """The files a dataset ``path`` names: the file, a glob's matches or a folder's data files (sorted)."""
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


def load_records(path: str | list[str]) -> list[dict[str, Any]]:
    """Rows of local jsonl / json.gz / parquet files, through ``datasets.load_dataset``."""
    from datasets import load_dataset

    files = [str(p) for p in (path if isinstance(path, list) else expand(path))]
    if all(f.endswith(".parquet") for f in files):
        return list(load_dataset("parquet", data_files=files, split="train"))
    return list(load_dataset("json", data_files=files, split="train"))


def token_files(path: str) -> list[Path]:
    """The ``.pt`` files of a token-id dataset: the file itself, or every ``*.pt`` of a folder (sorted)."""
    p = Path(path).expanduser()
    files = sorted(p.glob("*.pt")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"dataset path {path!r}: no .pt file of token ids")
    return files


def source_fingerprint(info: DatasetInfo, path: str | None) -> str:
    """What the examples were read from: the hub split, or the local files' paths, sizes and times."""
    if path is None:
        return f"hub:{info.name}"
    files = token_files(path) if info.token_ids else expand(path)
    parts = [f"{f.resolve()}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# --- Token estimates (the plan: no tokenizer) ----------------------------------------------------------
def text_estimate(hub_tokens: int) -> Callable[[Any, int], tuple[float, int]]:
    """Windows (or documents) of a text corpus: its local files' bytes / 4, or ``hub_tokens``."""

    def estimate(d: Any, seqlen: int) -> tuple[float, int]:
        T = d.seqlen or seqlen
        total = sum(f.stat().st_size for f in expand(d.path)) / BYTES_PER_TOKEN if d.path else hub_tokens
        if d.examples in DOCUMENTS:
            T = (d.example_len or 512) + 1
        n = max(1, int(total // T))
        if d.max_windows:
            n = min(n, d.max_windows)
        return float(n * T), n

    return estimate


# --- Tokenized windows and documents ---------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def windows_of(tokenizer: Any, info: DatasetInfo, seqlen: int, *, path: str | None = None,
               max_windows: int | None = None, use_cache: bool = True) -> "torch.Tensor":
    """Non-overlapping ``[n, seqlen]`` windows of the whole text tokenized once (remainder dropped)."""
    if seqlen < 2:
        raise ConfigError(f"seqlen: must be at least 2, got {seqlen}")
    key = [tokenizer_fingerprint(tokenizer), info.name, source_fingerprint(info, path), seqlen, max_windows]
    return cached(f"{info.name}-{seqlen}", key, lambda: _windows(tokenizer, info, seqlen, path, max_windows), use_cache)


def cached(stem: str, key_parts: list[Any], build: Callable[[], "torch.Tensor"], use_cache: bool) -> "torch.Tensor":
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


def _windows(tokenizer: Any, info: DatasetInfo, seqlen: int, path: str | None, max_windows: int | None) -> "torch.Tensor":
    import torch

    text = info.loader(path)
    if not text.strip():
        raise ConfigError(f"dataset {info.name!r} ({path or 'hub'}): the text is empty")
    ids = torch.tensor(tokenizer(text, return_tensors=None)["input_ids"], dtype=torch.long)
    n = ids.numel() // seqlen
    if n == 0:
        raise ConfigError(
            f"seqlen: {seqlen} is larger than the whole {info.name} text ({ids.numel()} tokens): use a smaller seqlen"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen).contiguous()


def documents_of(tokenizer: Any, info: DatasetInfo, example_len: int, *, path: str | None = None,
                 max_examples: int | None = None, use_cache: bool = True, dedup: bool = False) -> "torch.Tensor":
    """``[n, example_len + 1]``: BOS + the first ``example_len`` tokens of each document with at
    least that many tokens, in source order; shorter documents are dropped. ``max_examples``
    stops reading after that many (a streamed hub source is read no further). ``dedup`` (the second
    paper's protocol): an example whose token 5-gram Jaccard with an earlier kept one exceeds 0.1 is
    dropped too (:class:`NearDuplicates`), before ``max_examples`` counts."""
    if info.documents is None:
        raise ConfigError(f"dataset {info.name!r}: has no documents (examples: documents works for the text corpora)")
    if example_len < 2:
        raise ConfigError(f"example_len: must be at least 2, got {example_len}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ConfigError(f"examples: documents prepends a BOS token, but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has none")
    key = ["docs", tokenizer_fingerprint(tokenizer), info.name, source_fingerprint(info, path), example_len, max_examples]
    key += ["dedup"] if dedup else []
    return cached(f"{info.name}-docs{example_len}" + ("-dedup" if dedup else ""), key,
                  lambda: _documents(tokenizer, info, example_len, bos, path, max_examples, dedup), use_cache)


def _documents(tokenizer: Any, info: DatasetInfo, example_len: int, bos: int, path: str | None,
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
        raise ConfigError(f"dataset {info.name!r} ({path or 'hub'}): no document has {example_len} tokens: use a smaller example_len")
    return torch.tensor(rows, dtype=torch.long)


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


def _atomic_save(t: "torch.Tensor", f: Path) -> None:
    import torch

    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    torch.save(t, tmp)
    tmp.replace(f)  # atomic: concurrent sweeps never read a half-written file


def example_ids(sequences: "Sequence[Sequence[int]] | torch.Tensor") -> list[str]:
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
