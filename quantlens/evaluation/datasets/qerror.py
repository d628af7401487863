"""The second paper's released examples (terarachang/QError): D_large / D_ctrl token-id rows, each
row one example scored as it is (no tokenizer), the file it came from in a ``released`` column."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantlens.errors import ConfigError
from quantlens.evaluation.sources import RELEASED_ROW, DatasetInfo, token_files

if TYPE_CHECKING:
    import torch

    from quantlens.evaluation.scoring import Windows


def load_token_rows(path: str, limit: int | None = None) -> tuple["torch.Tensor", list[str]]:
    """``data/<model>/<method>-{large,nonlarge}_error_seqs-10.pt``: each file a ``[rows, tokens]``
    integer tensor of token ids. Rows of every file in order (``limit``: the first N of each), and
    the stem of the file each row came from (which released set it is in)."""
    import torch

    rows, tags = [], []
    for f in token_files(path):
        t = _read(path, f)
        if rows and t.shape[1] != rows[0].shape[1]:
            raise ConfigError(f"dataset path {path!r}: {f.name} has rows of {t.shape[1]} tokens, {token_files(path)[0].name} of {rows[0].shape[1]}")
        t = t[:limit] if limit else t
        rows.append(t.to(torch.long))
        tags += [f.stem] * t.shape[0]
    return torch.cat(rows), tags


def _read(path: str, f: Any) -> "torch.Tensor":
    import torch

    try:
        t = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"dataset path {path!r}: {f.name} is not a torch file of token ids ({type(err).__name__})") from None
    if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.is_floating_point() or t.is_complex() or t.numel() == 0:
        what = f"a tensor of shape {tuple(t.shape)} and dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ConfigError(f"dataset path {path!r}: {f.name} holds {what}, not a [rows, tokens] tensor of token ids")
    return t


def requests(info: DatasetInfo, model: Any, tokenizer: Any, kw: dict[str, Any]) -> "Windows":
    """Options: ``path`` (a .pt file or a folder of them), ``limit`` (the first N rows of each)."""
    from quantlens.evaluation.scoring import Windows

    rows, tags = load_token_rows(kw["path"], kw.get("limit"))
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(rows.max()) >= vocab:
        raise ValueError(f"dataset {info.name}: token id {int(rows.max())} is outside the model's vocabulary of {vocab}")
    return Windows(rows, {"released": tags})


def estimate(d: Any, seqlen: int) -> tuple[float, int]:
    """Released rows: [rows, tokens] int64 files, their sizes say how many (8 bytes a token)."""
    total = sum(f.stat().st_size for f in token_files(d.path)) / 8
    rows = d.limit * len(token_files(d.path)) if d.limit else int(total // RELEASED_ROW)
    return float(min(total, rows * RELEASED_ROW)), max(1, rows)


def check(d: Any) -> None:
    if not d.path:
        raise ValueError(f"{d.name}: give path: a .pt file (or a folder of them) of the released token ids "
                         "(terarachang/QError data/<model>/<method>-{large,nonlarge}_error_seqs-10.pt)")
    wrong = [k for k in ("seqlen", "max_windows", "example_len") if getattr(d, k) is not None]
    if wrong or d.examples != "windows":
        raise ValueError(f"{d.name}: {', '.join(wrong or ['examples'])} do not apply: each row is one example as released "
                         "(limit takes the first N rows of each file)")


DATASET = DatasetInfo("qerror", "tokens", load_token_rows,
                      "the second paper's released D_large / D_ctrl token ids (terarachang/QError), perplexity per row",
                      None, estimate, unit="released rows", columns=("released",), check=check, requests=requests, rank=4)
