"""Rendering helpers every report module shares: markdown tables and report file names.

The bottom of the analysis report modules: it imports none of them, so that they can all import it
without importing each other in a circle.
"""

from __future__ import annotations

import pandas as pd

from quantlens.analysis.links import md_link


def to_markdown(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [floatfmt.format(v) if isinstance(v, float) else md_link(v) if _is_url(v) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _is_url(v: object) -> bool:
    return isinstance(v, str) and v.startswith(("http://", "https://"))


def safe_name(name: str) -> str:
    """A model or dataset name as part of a report file's name (``fig_paired_<model>_<dataset>.png``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
