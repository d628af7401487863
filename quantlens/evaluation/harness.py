"""Any lm-evaluation-harness task on the model already loaded and patched for a setting.

lm-eval (``lm_eval``, imported only here and only when a sweep has tasks) evaluates through its
``HFLM`` wrapper around *our* model object: no reload per setting, the patched weights and
activation quantizers are what it runs. Its numbers are its own — ``simple_evaluate`` on the same
patched model gives the same values (tested).

Metrics: ``<task>_<metric>`` with lm-eval's metric names, the filter appended unless it is
``none`` (``hellaswag_acc``, ``hellaswag_acc_norm``, ``gsm8k_exact_match_strict-match``), each with
``_stderr`` beside it; groups (``mmlu``) appear as lm-eval aggregates them.

Per example (one row per document), as for the other datasets:

- ``example_id``: the first 16 hex digits of lm-eval's ``doc_hash`` (SHA-256 of the document), the
  same in every setting, run and sweep;
- ``nll``: the negative log-likelihood of the *gold* continuation divided by its number of tokens,
  as lm-eval encodes it after the context (``HFLM._encode_pair``: the continuation's tokens when
  context + continuation are tokenized together, trailing context spaces moved to the
  continuation) — for multiple choice the gold choice, for loglikelihood tasks the target;
- ``n_tokens``: those tokens; ``correct``: 0/1 (``acc`` for multiple choice, greedy match for
  loglikelihood tasks, ``exact_match`` for generation tasks); ``chosen``: the index of the choice
  with the highest log-likelihood (multiple choice only, else -1).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator

import pandas as pd


_MANAGERS: dict[str | None, Any] = {}


@contextlib.contextmanager
def sequential_bootstrap() -> Iterator[None]:
    """lm-eval bootstraps the stderr of perplexity-like metrics in a ``multiprocessing.Pool`` of
    *forked* workers; forked from a process with live threads (Prefect's, MLflow's heartbeats,
    torch's) a worker can inherit a held lock and hang forever — seen here in a sweep. Its
    ``DISABLE_MULTIPROC`` switch runs the same resamples (same seeds per chunk, the same value)
    in this process instead."""
    old = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old


def task_manager(include_path: str | None = None) -> Any:
    """lm-eval's task index (seconds to build: every task YAML is read), once per process and path."""
    if include_path not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[include_path] = TaskManager(include_path=include_path) if include_path else TaskManager()
    return _MANAGERS[include_path]


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    include_path: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    residual: bool = False,
) -> dict[str, Any]:
    """``{"metrics": {...}, "per_example": {task: DataFrame}, "tasks": {task: {version, n_shot,
    examples, output_type}}, "residual": {task: DataFrame}, "seconds": s}`` of lm-eval's tasks on
    ``model`` as it is now. ``residual`` (the reference run): each document's gold context +
    continuation, as lm-eval tokenized it, is run once more through our own batched forward to
    record the residual-stream statistics (:mod:`quantlens.evaluation.residual`) under the same
    example ids, and the per-example table gets its tokens (for the near-duplicate check)."""
    import time

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from quantlens.evaluation.evaluate import input_device

    t0 = time.perf_counter()
    dev = device or str(input_device(model))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or 8, device=dev)
    with sequential_bootstrap():
        r = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                    task_manager=task_manager(include_path), log_samples=True, bootstrap_iters=100000)
    metrics = task_metrics(r["results"])
    frames, info, resid = {}, {}, {}
    for task, samples in r.get("samples", {}).items():
        cfg = r["configs"].get(task, {})
        kind = cfg.get("output_type", "")
        frames[task] = per_example(samples, kind, lm)
        info[task] = {"version": r["versions"].get(task), "n_shot": r["n-shot"].get(task),
                      "examples": len(samples), "output_type": kind}
        if residual and kind in ("multiple_choice", "loglikelihood"):
            frames[task], resid[task] = _with_residual(model, tokenizer, lm, samples, kind, frames[task], batch_size)
    return {"metrics": metrics, "per_example": frames, "tasks": info, "residual": resid, "seconds": time.perf_counter() - t0}


def _with_residual(model: Any, tokenizer: Any, lm: Any, samples: list[dict[str, Any]], kind: str, frame: pd.DataFrame,
                   batch_size: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    from quantlens.evaluation.evaluate import lambada

    reqs = []
    for s in samples:
        ctx, cont = s["arguments"][_gold(s["target"]) if kind == "multiple_choice" else 0][:2]
        c, t = lm._encode_pair(ctx, cont)
        reqs.append((list(c), list(t)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = lambada(model, reqs, pad_id=pad, batch_size=batch_size, residual=True)
    ids = dict(zip(out["per_example"]["example_id"], frame["example_id"]))  # token hash → document hash, in order
    res = out["residual"].assign(example_id=lambda d: d["example_id"].map(ids))
    return frame.assign(tokens=[c + t for c, t in reqs]), res


def task_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results`` → ``<task>_<metric>[_<filter>]`` (``none`` filter dropped)."""
    out = {}
    for task, res in results.items():
        for key, value in res.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            name = f"{task}_{metric}" + ("" if filt == "none" else f"_{filt}")
            if math.isfinite(float(value)):
                out[name] = float(value)
    return out


def _gold(target: Any) -> int:
    if isinstance(target, (list, tuple)):
        return int(target[0])
    return int(target)


def per_example(samples: list[dict[str, Any]], output_type: str, lm: Any) -> pd.DataFrame:
    """One row per document (see the module doc for each column's definition)."""
    rows = []
    for s in samples:
        resps = s.get("filtered_resps") or []
        args = s.get("arguments") or []
        chosen, nll, n_tok = -1, float("nan"), 0
        if output_type == "multiple_choice":
            lls = [float(x[0]) for x in resps]
            gold = _gold(s["target"])
            chosen = max(range(len(lls)), key=lls.__getitem__)
            ctx, cont = args[gold][0], args[gold][1]
            n_tok = len(lm._encode_pair(ctx, cont)[1])
            nll = -lls[gold] / max(1, n_tok)
            correct = float(s.get("acc", float(chosen == gold)))
        elif output_type == "loglikelihood":
            ll, greedy = resps[0]
            ctx, cont = args[0][0], args[0][1]
            n_tok = len(lm._encode_pair(ctx, cont)[1])
            nll = -float(ll) / max(1, n_tok)
            correct = float(s.get("acc", float(bool(greedy))))
        else:  # generation and rolling loglikelihood: what the task scores
            correct = float(s.get("exact_match", s.get("acc", float("nan"))))
        rows.append({"example_id": str(s["doc_hash"])[:16], "doc_id": int(s["doc_id"]), "n_tokens": n_tok, "nll": nll,
                     "correct": correct, "chosen": chosen})
    return pd.DataFrame(rows)
