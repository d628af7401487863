"""Prefect tasks around the core: retries where a retry can help (download, IO), none elsewhere.

Models and tensors are passed between tasks in-process, so every task here has caching and result
persistence off: identity and skip-if-done come from run keys in MLflow (see flows/sweep.py).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from quantlens.evaluation import evaluate as ev
from quantlens.evaluation.data import DATASETS, DOCUMENTS
from quantlens.paths import cache_dir
from quantlens.model import loading as qm
from quantlens.model import gguf
from quantlens.quantize.patch import full_report, quantize_, restore_
from quantlens.quantize.settings import ConfigError, Setting
from quantlens.pipeline.console import console_enabled, status, verbose
from quantlens.tasks.tracking import is_transient
from quantlens.pipeline.sweep import LM_EVAL, AnalysisOptions, DatasetEntry, EvalOptions, Hardware, ModelEntry


def _retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what a retry can fix (network, 5xx, lock contention); a missing, gated, invalid
    or uncached-offline model, or any programming error, fails at once."""
    try:
        state.result(raise_on_failure=True)
    except (qm.ModelUnavailable, ConfigError):
        return False
    except Exception as err:
        cause = err.__cause__ or err
        http = getattr(getattr(cause, "response", None), "status_code", None)
        return is_transient(cause) or (http is not None and http >= 500)
    return False


# downloads (models, released checkpoints): retried where a retry can help, results not persisted
_DOWNLOAD = dict(retries=3, retry_delay_seconds=[10, 30, 90], retry_condition_fn=_retry_unless_permanent, cache_policy=NONE,
                 persist_result=False)


@task(name="download-model", **_DOWNLOAD)
def download_model(entry: ModelEntry) -> tuple[qm.ModelInfo, qm.Snapshot]:
    info = entry.info()
    return info, qm.download(info, entry.revision)


@task(name="load-model", cache_policy=NONE, persist_result=False)
def load_model(snapshot: qm.Snapshot, hw: Hardware) -> tuple[Any, Any]:
    return qm.load_model(snapshot, device=hw.device, dtype=hw.dtype, placement=hw.placement)


def plan_params(cfg: Any, info: qm.ModelInfo, snapshot: qm.Snapshot, model: Any, planned: Any = None) -> dict[str, Any]:
    """The plan a model runs under, as run params: the placement it got, and the plan's estimate of
    its peak GPU memory and time (checked against ``peak_gpu_gib`` / ``eval_seconds``): the sweep
    plan's (``planned``), else made here from the downloaded checkpoint (a model known only after
    download, or a worker planning for its own device)."""
    import dataclasses

    from quantlens.pipeline import plan as P

    placement = getattr(model, "_quantlens_placement", cfg.hardware.placement)
    if planned is not None and planned.cached:  # (one planned from the registry: the checkpoint's own shape now)
        return dataclasses.replace(planned, placement=placement).params()
    try:
        est = P.estimate(info.name, P.shape_from_checkpoint(snapshot.path), P.detected_target(cfg.hardware.device),
                         P.workload(cfg))
    except Exception as err:  # a plan that cannot be made must not stop the evaluation
        get_run_logger().warning("%s: no plan estimate (%s)", info.name, err)
        return {"placement": placement}
    est.placement = placement
    return est.params()


def reset_peak_memory(model: Any) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory(model: Any) -> dict[str, float]:
    """Measured peak memory of the run: GPU (torch's allocator, all GPUs) or this process' RSS."""
    import resource

    import torch

    if torch.cuda.is_available() and any(p.is_cuda for p in model.parameters()):
        return {"peak_gpu_gib": max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


@task(name="patch", cache_policy=NONE, persist_result=False)
def patch(model: Any, setting: Setting, originals: str = "auto", calibrated: dict | None = None,
          overrides: dict | None = None) -> None:
    quantize_(model, setting, keep_originals_on=qm.choose_originals(model, originals), calibrated=calibrated,
              overrides=overrides)


@task(name="download-checkpoint", **_DOWNLOAD)
def download_checkpoint(setting: Setting) -> tuple[Setting, str, str]:
    """A checkpoint setting's released checkpoint, fetched (or found in the Hugging Face cache, or a
    local folder) like a model, and read: (the setting with what the checkpoint holds, its folder,
    its revision — the hub commit or a local folder's fingerprint)."""
    from quantlens.checkpoints.released import describe

    spec = setting.checkpoint
    try:
        info = qm.resolve_model(spec.source)
    except ConfigError as err:
        raise ConfigError(f"setting {setting.name}: checkpoint {spec.source!r}: {str(err).split(': ', 1)[-1]}") from None
    try:
        snap = qm.download(info, spec.revision)
    except qm.ModelUnavailable as err:
        raise qm.ModelUnavailable(f"setting {setting.name}: {str(err).replace('model ', 'checkpoint ', 1)}") from None
    r = describe(snap.path, f"setting {setting.name}: checkpoint {spec.source}")
    return setting.described(r.weights(), r.method, r.layout), snap.path, snap.revision


def planned_checkpoint(setting: Setting, released: Any) -> tuple[Setting, str, str]:
    """A checkpoint setting whose checkpoint the sweep's checks already read (``released``: a local
    folder or a cached hub snapshot): what :func:`download_checkpoint` returns, with nothing read again."""
    info = qm.resolve_model(setting.checkpoint.source)
    revision = qm.local_revision(info, setting.checkpoint.revision)
    if revision is None or (info.gguf is not None and not gguf.has_weights(released.folder)):
        return download_checkpoint(setting)  # (gone since the checks, or a GGUF file read from its header: fetched, converted)
    return setting.described(released.weights(), released.method, released.layout), released.folder, revision


def released(model: Any, setting: Setting, folder: str) -> tuple[dict, dict, dict[str, Any]]:
    """A checkpoint setting's weights for this model: (quantized weights by target name, float
    tensors the checkpoint changes, params)."""
    from quantlens.checkpoints.released import describe, released_weights

    t0 = time.perf_counter()
    weights, overrides, params = released_weights(model, describe(folder))
    get_run_logger().info("%s: %d quantized layer(s) read from %s in %.1fs%s", setting.name, len(weights), folder,
                          time.perf_counter() - t0,
                          f"; {params['checkpoint_full_precision_layers']} block linear(s) kept in 16 bits by the checkpoint"
                          if params["checkpoint_full_precision_layers"] else "")
    return weights, overrides, params


def calibration_windows(tokenizer: Any, cfg: Any, setting: Setting) -> tuple[Any, dict[str, Any]]:
    """The calibration windows of a calibrated setting ([samples, seqlen], drawn with the seed from
    :meth:`SweepConfig.calibration_source`) and the params that say what they are."""
    import torch

    from quantlens.evaluation.data import perplexity_windows

    spec = cfg.calibration_for(setting)
    d, path, first = cfg.calibration_source(spec)
    windows = perplexity_windows(tokenizer, d.name, spec.seqlen, path=path)[first:]
    if windows.shape[0] < spec.samples:
        raise ConfigError(f"calibration: {spec.samples} samples of {spec.seqlen} tokens asked, {windows.shape[0]} available in "
                          f"{d.name}{' (' + path + ')' if path else ''} after the evaluated windows")
    pick = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(spec.seed))[: spec.samples].sort().values
    params = {"calibration_dataset": d.name, "calibration_path": path or "hub", "calibration_samples": spec.samples,
              "calibration_seqlen": spec.seqlen, "calibration_seed": spec.seed,
              "calibration_windows": f"{'disjoint: from window ' + str(first) if not spec.path else 'all'} of {windows.shape[0] + first}"}
    return windows[pick], params


@task(name="calibrate", cache_policy=NONE, persist_result=False, retries=0, tags=["quantlens-eval"])
def calibrate(model: Any, tokenizer: Any, cfg: Any, setting: Setting, model_name: str) -> tuple[dict, dict[str, Any]]:
    """GPTQ's weights for ``setting`` on this model, layer by layer (one block on the device at a
    time), cached under quantlens' cache by model + setting + calibration tokens: a rerun, or the
    same setting in another sweep, calibrates nothing. Returns (weights by name, params)."""
    from quantlens.quantize.calibrate import calibrated_weights

    windows, params = calibration_windows(tokenizer, cfg, setting)
    t0 = time.perf_counter()
    weights, cached = calibrated_weights(model, setting, windows, batch_size=cfg.eval.batch_size or 8, cache_dir=cache_dir(),
                                         progress=_progress_logger(f"{model_name}/{setting.name}: calibrate (blocks)"))
    params.update(calibration_cached=cached)
    get_run_logger().info("%s/%s: %s in %.1fs", model_name, setting.name, "calibrated weights from the cache" if cached else
                          f"calibrated on {windows.shape[0]} × {windows.shape[1]} tokens", time.perf_counter() - t0)
    return weights, params


def _progress_logger(what: str):
    """Batch progress of one evaluation: a log line at every 10 % with ``--verbose`` (and on
    workers, where the logs are the display), else the console's live status line only."""
    log = get_run_logger()
    state = {"next": 0.1, "t0": time.perf_counter()}
    lines = verbose() or not console_enabled()

    def report(done: int, total: int) -> None:
        frac = done / total
        el = time.perf_counter() - state["t0"]
        eta = el / frac * (1 - frac) if frac else float("nan")
        status(f"{what}: {done}/{total} examples ({100 * frac:.0f}%), {done / el if el else 0:.1f} ex/s, ETA {eta:.0f}s")
        if lines and (frac >= state["next"] or done == total):
            log.info("%s: %d/%d (%.0f%%), %.0fs elapsed, ETA %.0fs", what, done, total, 100 * frac, el, eta)
            state["next"] = (int(frac * 10) + 1) / 10

    return report


def _evaluate_tasks(model: Any, tokenizer: Any, d: DatasetEntry, opts: EvalOptions,
                    residual: bool = False) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """lm-eval's tasks on the patched model: ``<task>_<metric>`` metrics, per-example tables, and
    each task's protocol (version, n-shot, limit) as ``<task>_version`` / ``<task>_n_shot`` /
    ``<task>_examples`` for its dataset input."""
    from quantlens.evaluation.harness import evaluate_tasks

    status(f"lm-eval: {', '.join(d.tasks or [])} …")
    r = evaluate_tasks(model, tokenizer, d.tasks or [], num_fewshot=d.num_fewshot, limit=d.limit, include_path=d.include_path,
                       batch_size=opts.batch_size, residual=residual)
    out = dict(r["metrics"])
    for task, info in r["tasks"].items():
        out[f"{task}_examples"] = float(info["examples"])
        if isinstance(info["version"], (int, float)):
            out[f"{task}_version"] = float(info["version"])
        if isinstance(info["n_shot"], (int, float)):
            out[f"{task}_n_shot"] = float(info["n_shot"])
    out[f"{LM_EVAL}_seconds"] = r["seconds"]
    frames = {f"per_example/{task}.parquet": frame for task, frame in r["per_example"].items()}
    frames.update({f"residual/{task}.parquet": frame for task, frame in r["residual"].items()})
    return out, frames


def dataset_inputs(d: DatasetEntry, opts: EvalOptions, metrics: dict[str, float]) -> list[dict[str, Any]]:
    """The MLflow dataset inputs of one entry: the dataset, or each lm-eval task with its protocol."""
    if not DATASETS[d.name].harness:
        return [dataset_input(d, opts, metrics)]
    import json

    from quantlens.evaluation.harness import lm_eval_version

    tasks = sorted(k[: -len("_examples")] for k in metrics if k.endswith("_examples"))
    out = []
    for t in tasks:
        profile = {"examples": int(metrics[f"{t}_examples"]), "version": metrics.get(f"{t}_version"),
                   "n_shot": metrics.get(f"{t}_n_shot"), "limit": d.limit, "lm_eval": lm_eval_version()}
        digest = hashlib.sha256(json.dumps([t, profile, d.include_path], sort_keys=True).encode()).hexdigest()[:8]
        out.append({"name": t, "digest": digest, "source_type": "local" if d.include_path else "hub",
                    "source": json.dumps({"uri": d.include_path or "lm-evaluation-harness", "task": t}),
                    "profile": json.dumps({k: v for k, v in profile.items() if v is not None}),
                    "schema": json.dumps({"columns": ["example_id", "doc_id", "n_tokens", "nll", "correct", "chosen"]})})
    return out


def dataset_input(d: DatasetEntry, opts: EvalOptions, metrics: dict[str, float]) -> dict[str, Any]:
    """One dataset as an MLflow dataset input: the protocol that makes two runs comparable."""
    import json

    from quantlens.evaluation.data import source_fingerprint

    info = DATASETS[d.name]
    examples = int(metrics.get(f"{d.name}_examples", 0))
    profile = {"examples": examples, "unit": info.unit or d.examples,
               "seqlen": d.seqlen or opts.seqlen, "limit": d.limit, "max_windows": d.max_windows,
               "example_len": d.example_len if d.examples in DOCUMENTS else None}
    fingerprint = source_fingerprint(d.name, d.path)
    digest = hashlib.sha256(json.dumps([fingerprint, profile], sort_keys=True).encode()).hexdigest()[:8]
    return {"name": d.name, "digest": digest, "source_type": "local" if d.path else "hub",
            "source": json.dumps({"uri": d.path or DATASETS[d.name].doc, "fingerprint": fingerprint}),
            "profile": json.dumps({k: v for k, v in profile.items() if v is not None}),
            "schema": json.dumps({"columns": ["example_id", "n_tokens", "nll", *info.columns]})}


class KLReference:
    """The reference run's top-k log-probabilities per dataset (:mod:`quantlens.evaluation.kl`), for the
    KL error of every other setting of one loaded model: kept in memory when the reference is evaluated
    in this flow, else read once from its run's artifact ``kl_reference/<dataset>.pt`` (a rerun that
    evaluates only a failed setting). None where the reference has none (runs older than the KL error)."""

    def __init__(self, tracker: Any = None, run_id: str | None = None):
        self.tracker, self.run_id = tracker, run_id
        self.store: dict[str, Any] = {}

    def put(self, dataset: str, topk: Any) -> None:
        self.store[dataset] = topk

    def put_routing(self, dataset: str, sets: Any) -> None:
        self.store[f"routing/{dataset}"] = sets

    def get_routing(self, dataset: str) -> Any:
        """The reference's expert set of every token of an MoE (quantlens.evaluation.routing), or None."""
        key = f"routing/{dataset}"
        if key not in self.store and self.tracker is not None and self.run_id is not None:
            d = self.tracker.read_tensors(self.run_id, f"routing_reference/{dataset}.pt")
            self.store[key] = d["sets"] if d is not None else None
        return self.store.get(key)

    def get(self, dataset: str) -> Any:
        if dataset not in self.store and self.tracker is not None and self.run_id is not None:
            from quantlens.evaluation.kl import TopK

            d = self.tracker.read_tensors(self.run_id, f"kl_reference/{dataset}.pt")
            self.store[dataset] = TopK.from_dict(d) if d is not None else None
        return self.store.get(dataset)


def _dataset_options(info: Any, dataset: DatasetEntry, opts: EvalOptions, kl: "KLReference | None", reference: bool) -> dict[str, Any]:
    """evaluate_dataset's options for one entry as its declaration scores it: the entry's own
    options, and where it is scored token by token the KL reference (or its top-k, in the reference
    run) and an MoE's router flips against the reference's expert sets."""
    kw: dict[str, Any] = {"path": dataset.path, "batch_size": opts.batch_size, "limit": dataset.limit,
                          "seqlen": dataset.seqlen or opts.seqlen if info.windowed else dataset.seqlen,
                          "max_windows": dataset.max_windows, "examples": dataset.examples, "example_len": dataset.example_len}
    if kl is not None and info.per_token:
        from quantlens.evaluation.kl import TOP_K

        kw.update({"topk": TOP_K, "routing": True} if reference
                  else {"kl_reference": kl.get(dataset.name), "routing_reference": kl.get_routing(dataset.name)})
    return kw


# Retrying an evaluation cannot help (deterministic code, same inputs): no retries. The tag lets a
# Prefect tag concurrency limit cap evaluations (`prefect concurrency-limit create quantlens-eval 8`).
@task(name="evaluate", cache_policy=NONE, persist_result=False, retries=0, tags=["quantlens-eval"])
def evaluate(
    model: Any, tokenizer: Any, dataset: DatasetEntry, opts: EvalOptions, model_name: str, setting: Setting,
    kl: KLReference | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of one dataset, and its per-example tables: ``per_example/<dataset>.parquet`` always,
    and in the full-precision (baseline) run also ``residual/<dataset>.parquet``, the tokens of
    each example (a ``tokens`` column, for the analysis' near-duplicate check) and, on perplexity
    datasets, ``kl_reference/<dataset>.pt`` (each token's top-k log-probabilities: the KL error of
    the other settings, a ``kl`` column and the ``<dataset>_kl`` metric, is computed against it)."""
    inject_fault(model_name, setting.name, dataset.name)
    info = DATASETS[dataset.name]
    if info.harness:
        return _evaluate_tasks(model, tokenizer, dataset, opts, residual=setting.is_reference)
    reference = setting.is_reference
    kw = _dataset_options(info, dataset, opts, kl, reference)
    r = ev.evaluate_dataset(model, tokenizer, dataset.name, residual=reference,
                            progress=_progress_logger(f"{model_name}/{setting.name}/{dataset.name}"), **kw)
    prefix = dataset.name
    out = {f"{prefix}_{m}": r[m] for m in info.metric_names()}  # Lambada: accuracy and the word's NLL, no perplexity
    out.update({f"{prefix}_seconds": r["seconds"], f"{prefix}_tokens": r["tokens"], f"{prefix}_examples": float(len(r["per_example"]))})
    examples = r["per_example"]
    frames: dict[str, Any] = {}
    if "kl" in examples:
        out[f"{prefix}_kl"] = float((examples["kl"] * examples["n_tokens"]).sum() / examples["n_tokens"].sum())
    if "topk" in r:
        frames[f"kl_reference/{prefix}.pt"] = r["topk"].to_dict()
        kl.put(dataset.name, r["topk"])
    if "routing_sets" in r:
        frames[f"routing_reference/{prefix}.pt"] = {"sets": r["routing_sets"]}
        kl.put_routing(dataset.name, r["routing_sets"])
    if "routing" in r:  # per MoE layer and expert: load, the layer's flips, the expert's ‖Δ‖₂
        from quantlens.evaluation.routing import expert_deltas
        from quantlens.quantize.patch import full_report

        deltas = expert_deltas(model, full_report(model).layers)
        routing = r["routing"].merge(deltas, on=["layer", "expert"], how="left") if not deltas.empty else r["routing"].assign(delta_l2=float("nan"))
        frames[f"routing/{prefix}.parquet"] = routing
        if "router_flips" in examples:
            out[f"{prefix}_router_flips"] = float(r["routing"].groupby("layer")["flips"].first().mean())
    if reference:
        toks = r["example_tokens"]
        examples = examples.assign(tokens=[list(map(int, t)) for t in (toks.tolist() if hasattr(toks, "tolist") else toks)])
        frames[f"residual/{prefix}.parquet"] = r["residual"]
    frames[f"per_example/{prefix}.parquet"] = examples
    return out, frames


@task(name="explain", cache_policy=NONE, persist_result=False, retries=0, tags=["quantlens-eval"])
def explain(
    model: Any, setting: Setting, reference: pd.DataFrame, quantized: pd.DataFrame, opts: AnalysisOptions,
    model_name: str, dataset: str,
) -> dict[str, pd.DataFrame]:
    """Layer error, early exit and activation patching of ``setting`` on D_large / D_ctrl of one
    dataset, chosen from the two runs' per-example tables (``reference`` holds the tokens)."""
    from quantlens.analysis import mechanisms, per_example

    inject_fault(model_name, f"explain-{setting.name}", dataset)
    examples = pd.concat([reference.assign(setting="reference"), quantized.assign(setting=setting.name)])
    examples = examples.assign(model=model_name, dataset=dataset)
    err = per_example.errors(examples[["model", "dataset", "setting", "example_id", "n_tokens", "nll"]], {model_name: "reference"})
    tokens = reference[["example_id", "tokens"]].assign(model=model_name, dataset=dataset)
    sets = per_example.d_sets(err, tokens)
    by_id = dict(zip(reference["example_id"], reference["tokens"]))
    chosen = {name: [list(by_id[e]) for e in g["example_id"]] for name, g in sets.groupby("set")}
    quantize_(model, setting, keep_originals_on="same")  # both weight versions on the device
    try:
        ex = mechanisms.explain(model, chosen, layers=opts.layers, batch_size=opts.batch_size,
                                progress=_progress_logger(f"{model_name}/{setting.name}/{dataset}: explain"))
    finally:
        restore_(model)
    keys = {"model": model_name, "dataset": dataset, "setting": setting.name}
    return {name: frame.assign(**keys)[[*keys, *frame.columns]] for name, frame in
            (("layer_error", ex.layer_error), ("early_exit", ex.early_exit), ("patching", ex.patching))}


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
