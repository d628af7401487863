"""Prefect tasks around the core: retries where a retry can help (download, IO), none elsewhere.

Models and tensors are passed between tasks in-process, so every task here has caching and result
persistence off: identity and skip-if-done come from run keys in MLflow (see flows/sweep.py).
"""

from __future__ import annotations

import os
import time
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from quantlens import evaluate as ev
from quantlens import models as qm
from quantlens.patch import full_report, quantize_
from quantlens.settings import ConfigError, Setting
from quantlens.sweep import DatasetEntry, EvalOptions, Hardware, ModelEntry


def _retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient download errors; a missing, gated or uncached-offline model is final."""
    try:
        state.result(raise_on_failure=True)
    except (qm.ModelUnavailable, ConfigError):
        return False
    except Exception:
        return True
    return False


@task(
    name="download-model",
    retries=3,
    retry_delay_seconds=[10, 30, 90],
    retry_condition_fn=_retry_unless_permanent,
    cache_policy=NONE,
    persist_result=False,
)
def download_model(entry: ModelEntry) -> tuple[qm.ModelInfo, qm.Snapshot]:
    info = qm.resolve_model(entry.ref, entry.hf_id)
    return info, qm.download(info, entry.revision)


@task(name="load-model", cache_policy=NONE, persist_result=False)
def load_model(snapshot: qm.Snapshot, hw: Hardware) -> tuple[Any, Any]:
    return qm.load_model(snapshot, device=hw.device, dtype=hw.dtype, placement=hw.placement)


@task(name="patch", cache_policy=NONE, persist_result=False)
def patch(model: Any, setting: Setting) -> None:
    quantize_(model, setting)


@task(name="evaluate", cache_policy=NONE, persist_result=False, retries=0)
def evaluate(model: Any, tokenizer: Any, dataset: DatasetEntry, opts: EvalOptions, model_name: str, setting: Setting) -> dict[str, float]:
    inject_fault(model_name, setting.name, dataset.name)
    kw: dict[str, Any] = {"path": dataset.path, "batch_size": opts.batch_size}
    if dataset.name == "lambada":
        kw.update(limit=dataset.limit, seqlen=dataset.seqlen)
    else:
        kw.update(seqlen=dataset.seqlen or opts.seqlen, max_windows=dataset.max_windows)
    r = ev.evaluate_dataset(model, tokenizer, dataset.name, **kw)
    prefix = dataset.name
    if dataset.name == "lambada":
        out = {"lambada_acc": r["acc"], "lambada_nll": r["nll"]}
    else:
        out = {f"{prefix}_ppl": r["ppl"], f"{prefix}_nll": r["nll"]}
    out.update({f"{prefix}_seconds": r["seconds"], f"{prefix}_tokens": r["tokens"]})
    return out


def perturbation_metrics(model: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
    rep = full_report(model)
    rows = rep.rows()
    metrics = rep.summary()
    w = [r for r in rows if r["kind"] == "weight"]
    if w:
        metrics["weight_alpha_mean"] = sum(r["alpha_mean"] for r in w) / len(w)
    return metrics, rows


def inject_fault(model: str, setting: str, dataset: str) -> None:
    """Fault injection for failure tests and drills: QUANTLENS_INJECT_FAULT="model:setting[:exit]".

    Matching evaluations raise (or, with ``:exit``, kill the process as a crash would). The
    variable is read at every call, so a rerun without it completes the sweep.
    """
    spec = os.environ.get("QUANTLENS_INJECT_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] in (model, "*") and parts[1] in (setting, "*"):
        if len(parts) > 2 and parts[2] == "exit":
            os._exit(137)
        if len(parts) > 2 and parts[2] == "sleep":
            time.sleep(3600)
        raise RuntimeError(f"injected fault in {model}/{setting}/{dataset} (QUANTLENS_INJECT_FAULT)")
