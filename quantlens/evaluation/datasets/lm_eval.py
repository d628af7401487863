"""lm-evaluation-harness tasks (any task or group by name), scored by lm-eval itself on the patched
model (:mod:`quantlens.evaluation.harness`): no requests here."""

from __future__ import annotations

from typing import Any

from quantlens.evaluation.sources import DatasetInfo

LM_EVAL = "lm-eval"  # the dataset entry of lm-evaluation-harness tasks
HARNESS_FIELDS = ("tasks", "num_fewshot", "include_path")  # DatasetEntry fields only lm-eval takes


def estimate(d: Any, seqlen: int) -> tuple[float, int]:
    """Each task's documents × its choices, ~100 tokens each (an estimate)."""
    n = (d.limit or 1000) * len(d.tasks or [])
    return float(n * 4 * 100), 0


def check(d: Any) -> None:
    if not d.tasks:
        raise ValueError(f"{d.name}: give tasks: [task or group names]")
    wrong = [k for k in ("path", "seqlen", "max_windows", "example_len") if getattr(d, k) is not None]
    if wrong:
        raise ValueError(f"{d.name}: {', '.join(wrong)} do not apply to lm-eval tasks (limit, num_fewshot, include_path do)")


DATASET = DatasetInfo(LM_EVAL, "tasks", None, "lm-evaluation-harness tasks (quantlens.evaluation.harness)", None,
                      estimate, check=check, rank=5)
