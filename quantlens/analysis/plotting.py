"""The report's shared plotting choices, in one place: how a figure shows numbers that span orders of
magnitude, and how it is saved (framework-free: numpy + matplotlib).

- **Collapse** (:data:`COLLAPSE_RATIO`). A run has *collapsed* when its perplexity is more than 10×
  its model's full-precision perplexity on the same data — the same rule as a token-weighted ΔNLL
  above ln 10 ≈ 2.30 (:func:`collapsed_ppl`, :func:`collapsed_nll`). Such a number says "broken" and
  little more (SmolLM2-135M: W3A16 11,670 and W4A4 13,190 against 38.6). The tables keep it and flag it
  (a ``collapsed`` column); a figure draws it in a grey band at the end of its axis, with its value
  written beside it (:class:`ValueAxis`), so that it does not flatten the runs that still work.
- **Log axes** (:data:`LOG_SPAN`). A positive, unbounded quantity — perplexity, an MSE, ‖Δ‖, a norm —
  whose values span more than 10× goes on a log axis, with plain numbers as tick labels; bounded
  quantities (accuracy, fractions, ρ) and differences (ΔNLL, itself a log ratio) stay linear.
- **Labels that do not collide.** One setting per row with the values on a horizontal axis (names
  read left of the axis, never rotated), legends outside the axes, a colour and marker per line that
  no other line has (:func:`styles`).
- Every figure ends in :func:`save_figure`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

COLLAPSE_RATIO = 10.0  # perplexity above this × the full-precision model's: the run has collapsed
COLLAPSE_NLL = math.log(COLLAPSE_RATIO)  # the same rule on a token-weighted ΔNLL
LOG_SPAN = 10.0  # a positive, unbounded axis whose values span more than this ratio is drawn in log
COLLAPSED_COLOR = "tab:red"
RING_LABEL = "collapsed run (ppl > 10× full precision)"
BAND_COLOR = "0.92"


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: str | None = None, fontsize: float | None = None, layout: bool = True) -> Path:
    """How every report figure ends: a title, a tight layout (``layout=False``: the figure placed its
    axes itself, e.g. around a shared colorbar), a 120-dpi PNG cropped to what is drawn (legends and
    labels outside the axes included), the figure closed."""
    if title is not None:
        fig.suptitle(title, **({"fontsize": fontsize} if fontsize else {}))
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return Path(path)


# --- what a number means ------------------------------------------------------------------------------
def is_perplexity(metric: str) -> bool:
    """A perplexity-like metric (``wikitext2_ppl``, ``mean_ppl``, ``ppl``): positive, unbounded, read as ratios."""
    return metric == "ppl" or metric.endswith("_ppl")


def higher_is_better(metric: str) -> bool:
    return metric.endswith("_acc")


def collapsed_ppl(values: Any, reference: Any) -> np.ndarray:
    """Whether each perplexity is more than :data:`COLLAPSE_RATIO` × its reference (False where either is missing)."""
    v, r = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.asarray(v > COLLAPSE_RATIO * r) & np.isfinite(v) & np.isfinite(r)


def collapsed_nll(delta: Any) -> np.ndarray:
    """Whether each token-weighted ΔNLL against the full-precision model is above ln :data:`COLLAPSE_RATIO`."""
    d = np.asarray(delta, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.asarray(d > COLLAPSE_NLL) & np.isfinite(d)


def wants_log(values: Iterable[float]) -> bool:
    """Positive values spanning more than :data:`LOG_SPAN`."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    return len(v) > 1 and bool((v > 0).all()) and v.max() > LOG_SPAN * v.min()


def fmt_value(v: float) -> str:
    """A number as a label: thousands with separators (13,190), else 4 significant digits."""
    if not np.isfinite(v):
        return "nan"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def styles(n: int) -> list[tuple[Any, str]]:
    """``n`` (colour, marker) pairs, no two alike up to 80 (10 or 20 colours and 8 markers, cycled
    together: neighbours differ in both)."""
    import matplotlib

    colors = matplotlib.colormaps["tab20"].colors if n > 10 else matplotlib.colormaps["tab10"].colors
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"] if n > 1 else ["o"]
    return [(colors[i % len(colors)], markers[(i + i // 40) % len(markers)]) for i in range(n)]


def legend_outside(ax, fontsize: float = 7, title: str | None = None, sources: Sequence = (), **kw) -> None:
    """The axes' legend to their right, never over the data, with the entries of ``sources`` (other
    axes of the figure) too, each label once; several columns past 24 entries."""
    entries: dict[str, Any] = {}
    for a in [*sources, ax]:
        for h, label in zip(*a.get_legend_handles_labels()):
            entries.setdefault(label, h)
    handles, labels = list(entries.values()), list(entries)
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=fontsize, frameon=False,
                  ncol=1 + len(handles) // 25, title=title, title_fontsize=fontsize, **kw)


def log_ticks(axis) -> None:
    """Plain numbers (40, 100, 1,000) on a log axis; 1, 2, 3 and 5 of each decade where it spans less than two."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    if lo > 0 and hi / lo < 100:  # (1, 2, 3, 5): no two labels closer than log10(5/3) — 50 and 60 collided
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v)))
    axis.set_minor_formatter(NullFormatter())


def tick_label(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 10 and float(v).is_integer() else f"{v:g}"


# --- one value axis -----------------------------------------------------------------------------------
class ValueAxis:
    """The value axis of one panel: log or linear, and where collapsed values go.

    ``values``: everything the panel draws on this axis (with ``extent``: intervals, reference lines
    that must stay in view); ``collapsed``: which of ``values`` belong to collapsed runs; ``unbounded``:
    a quantity without a ceiling (perplexity, ΔNLL): only such an axis moves collapsed values into a band
    past the others (a bounded one — accuracy — marks them with a ring instead); ``log``: None = by
    :data:`LOG_SPAN` on all the values, collapsed ones included.

    :meth:`pos` gives where each value is drawn (a collapsed one: the middle of the band),
    :meth:`apply` sets scale, limits and the band, :meth:`mark` writes each collapsed value beside its marker."""

    def __init__(self, values: Sequence[float], collapsed: Sequence[bool] | None = None, unbounded: bool = True,
                 extent: Sequence[float] = (), log: bool | None = None):
        v = np.asarray(values, dtype=float)
        c = np.zeros(len(v), bool) if collapsed is None else np.asarray(collapsed, dtype=bool)
        self.log = wants_log(list(v) + list(extent)) if log is None else log
        self.band: tuple[float, float] | None = None
        self.limits: tuple[float, float] | None = None
        kept = np.concatenate([v[~c], np.asarray(extent, dtype=float)])
        kept = kept[np.isfinite(kept) & ((kept > 0) if self.log else True)]
        if unbounded and c.any() and len(kept):
            t, inv = (np.log10, lambda x: 10 ** x) if self.log else (lambda x: x, lambda x: x)
            lo, hi = t(kept.min()), t(kept.max())
            r = hi - lo or (abs(hi) * 0.2 if not self.log else 0.3) or 1.0
            cap = hi + 0.08 * r
            edge = cap + 0.42 * r
            self.band = (inv(cap), inv(edge))
            self.limits = (inv(lo - 0.06 * r), inv(edge))
            self._mid = inv(cap + 0.5 * (edge - cap))
        self.collapsed = c

    def pos(self, values: Sequence[float], collapsed: Sequence[bool] | None = None) -> np.ndarray:
        """Where to draw ``values``: a collapsed one beyond the others, in the band."""
        v = np.asarray(values, dtype=float).copy()
        if self.band is not None and collapsed is not None:
            c = np.asarray(collapsed, dtype=bool)
            v[c & np.isfinite(v)] = self._mid
        return v

    def clip(self, values: Sequence[float]) -> np.ndarray:
        """Values (interval ends) kept inside the drawn range: at most the start of the band."""
        v = np.asarray(values, dtype=float)
        if self.band is not None:
            v = np.minimum(v, self.band[0])
        if self.log:
            v = np.where(v > 0, v, np.nan)
        return v

    def apply(self, ax, axis: str = "y", label: str = "collapsed (ppl > 10× full precision)") -> None:
        if self.log:
            (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        if self.band is not None:
            (ax.set_ylim if axis == "y" else ax.set_xlim)(*self.limits)
            span = ax.axhspan if axis == "y" else ax.axvspan
            span(*self.band, color=BAND_COLOR, zorder=0, lw=0)
            if axis == "y":
                ax.text(0.01, self.band[1], label, transform=ax.get_yaxis_transform(), ha="left", va="top", fontsize=6,
                        color=COLLAPSED_COLOR)
            else:
                ax.text(self._mid, 1.0, label.replace(" (", "\n("), transform=ax.get_xaxis_transform(), ha="center",
                        va="bottom", fontsize=6, color=COLLAPSED_COLOR)
        which = ax.yaxis if axis == "y" else ax.xaxis
        if self.log:
            log_ticks(which)
        if self.band is not None:  # no tick inside the band: what is drawn there is not at that value
            from matplotlib.ticker import FuncFormatter

            cap = self.band[0]
            which.set_major_formatter(FuncFormatter(lambda v, _: "" if v > cap else tick_label(v)))

    def mark(self, ax, others: Sequence[float], values: Sequence[float], collapsed: Sequence[bool], axis: str = "y",
             prefix: str = "") -> Any:
        """Each collapsed value: in the band, its number written beside the marker (several at one place
        stacked); without a band (a bounded axis), a red ring around the point — returned, for a legend."""
        v, c = np.asarray(values, dtype=float), np.asarray(collapsed, dtype=bool)
        o = np.asarray(others, dtype=float)
        if not c.any():
            return None
        if self.band is None:
            xs, ys = (o[c], v[c]) if axis == "y" else (v[c], o[c])
            return ax.scatter(xs, ys, s=90, facecolors="none", edgecolors=COLLAPSED_COLOR, lw=1.2, zorder=5, label=RING_LABEL)
        seen: dict[float, int] = {}
        last = np.nanmax(o) if np.isfinite(o).any() else None
        for other, value in zip(o[c], v[c]):
            k = seen.get(round(float(other), 9), 0)
            seen[round(float(other), 9)] = k + 1
            text = f"{prefix}{fmt_value(value)}"
            if axis == "y":  # stacked text beside the point: to its right, to its left at the right end
                left = len(set(np.round(o[np.isfinite(o)], 9))) > 1 and other == last
                ax.annotate(text, (other, self._mid), xytext=(-5 if left else 5, 7 - 8 * k), textcoords="offset points", fontsize=6,
                            color=COLLAPSED_COLOR, va="center", ha="right" if left else "left", zorder=6)
            else:  # under the marker, inside its row
                ax.annotate(text, (self._mid, other), xytext=(0, -7), textcoords="offset points", fontsize=6,
                            color=COLLAPSED_COLOR, va="top", ha="center", zorder=6)
        return None


def row_axis(ax, labels: Sequence[str], fontsize: float = 7) -> np.ndarray:
    """Rows top to bottom for one setting each: y positions, the labels left of the axis."""
    y = np.arange(len(labels))[::-1].astype(float)
    ax.set_yticks(y, list(labels), fontsize=fontsize)
    ax.set_ylim(-0.7, len(labels) - 0.3)
    ax.grid(axis="x", alpha=0.3)
    return y


def rows_height(n: int, per_row: float = 0.3, extra: float = 1.6) -> float:
    return per_row * n + extra
