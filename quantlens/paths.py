"""Where quantlens keeps what it computes once (tokenized datasets, GGUF conversions, shapes)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$QUANTLENS_CACHE`` or ``~/.cache/quantlens``, created."""
    d = Path(os.environ.get("QUANTLENS_CACHE", Path.home() / ".cache" / "quantlens"))
    d.mkdir(parents=True, exist_ok=True)
    return d
