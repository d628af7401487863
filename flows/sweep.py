"""The sweep: ``sweep`` → one ``model`` subflow per model → ``aggregate``.

Each model is downloaded and loaded once; every setting is applied to it in turn (patch, evaluate
each dataset, log, restore). Every (model revision, setting, datasets, eval options, code version)
has a run key; a key with a FINISHED MLflow run is skipped, so rerunning a sweep after a crash or a
failed step redoes only what did not finish. Runs left RUNNING by a dead attempt are marked FAILED.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from quantlens.model import gguf
from quantlens.pipeline.errors import AnalysisFailed, NotEvaluated, SweepIncomplete
from quantlens.pipeline.sweep_plan import ModelPlan, SweepPlan, build_plan, from_payload
from quantlens.quantize.patch import restore_
from quantlens.quantize.settings import ConfigError, Setting
from quantlens.pipeline.sweep import SweepConfig
from quantlens.pipeline.console import Progress, end_attempt, progress_for, say, start_attempt, status
from quantlens.tasks import steps
from quantlens.tasks.ledger import RunLedger
from quantlens.tasks.tracking import Tracker


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode:
            return "unknown"
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_tag(model: Any) -> str:
    import torch

    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return f"{dev.type}:{socket.gethostname()}"


def _attempt_id() -> str:
    return flow_run.get_id() or f"local-{uuid.uuid4().hex[:12]}"


def eval_params(cfg: SweepConfig, info: Any, revision: str, setting: Setting) -> dict[str, Any]:
    return {
        "model": info.name,
        "model_id": info.hf_id,
        "family": info.family,
        "size_b": info.size_b,
        "revision": revision,
        **(gguf.run_params(info.hf_id) if info.gguf else {}),
        "seqlen": cfg.eval.seqlen,
        "datasets": ",".join(d.name for d in cfg.datasets),
        **setting.flat_params(),
    }


@dataclass
class ModelResult:
    """What one model flow did: the settings it evaluated, those that failed (with why), how many were
    already FINISHED, the analyses it ran, and one row per setting for its Prefect table artifact."""

    model: str
    evaluated: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: int = 0
    explained: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def already_finished(self, setting: str, run_id: str) -> None:
        self.skipped += 1
        self.rows.append({"setting": setting, "state": "already finished", "run_id": run_id})


@dataclass
class _ModelRun:
    """What every evaluation of one loaded model shares."""

    cfg: SweepConfig
    info: Any
    revision: str
    parent_run_id: str
    ledger: RunLedger
    progress: Progress
    tags: dict[str, str]
    result: ModelResult
    plan: dict[str, Any]  # the plan this model runs under (placement, estimated peak): params of every run
    kl: Any = None  # steps.KLReference: the reference's top-k, for the KL error of the other settings
    checkpoints: dict[str, Any] = field(default_factory=dict)  # checkpoint setting → (folder, revision), or why it failed


def _note_done_elsewhere(mr: _ModelRun, s: Setting, run_id: str) -> None:
    mr.result.already_finished(s.name, run_id)
    if s.is_reference:  # finished by another attempt or shard: the KL error of the others is read from its run
        mr.kl = steps.KLReference(mr.ledger.tracker, run_id)
    line = f"{mr.progress.tick(False)} {mr.info.name}/{s.name}: FINISHED by another attempt (run {run_id})"
    get_run_logger().info(line)
    say(line)


def evaluate_setting(mr: _ModelRun, model: Any, tokenizer: Any, s: Setting, key: str) -> str | None:
    """Acquire the key, then patch → evaluate each dataset → log → restore. Returns the run that
    holds the key when another live attempt owns it (at the start, or — a race the claim at the
    finish settles — at the end: this run is then withdrawn), else None."""
    t0 = time.perf_counter()  # before acquiring: its cost counts as overhead
    got = mr.ledger.acquire(key, mr.parent_run_id, f"{s.name} · {mr.info.name}",
                            {**eval_params(mr.cfg, mr.info, mr.revision, s), **mr.plan}, mr.tags)
    if got.state == "done":
        _note_done_elsewhere(mr, s, got.run_id)
        return None
    if got.state == "busy":
        return got.run_id
    lease = got.lease
    try:
        with lease:
            steps.reset_peak_memory(model)
            calibrated, overrides = _external_weights(mr, model, tokenizer, s, lease.run_id)
            steps.patch(model, s, mr.cfg.hardware.originals, calibrated, overrides)
            metrics, tokens = _evaluate_datasets(mr, model, tokenizer, s, lease.run_id)
            pert, rows = _perturbation(mr, model, lease.run_id, overrides)
            if pert.get("coverage_targeted", 1.0) < 1.0:  # never a silent partial "W4": the run fails, saying how much
                raise RuntimeError(f"{s.name} quantized {pert['coverage_targeted']:.1%} of the weights it targets "
                                   f"({pert['coverage_block']:.1%} of the decoder blocks' weights)")
            eval_s = sum(v for k, v in metrics.items() if k.endswith("_seconds"))
            mr.ledger.tracker.log(lease.run_id, metrics={**pert, "eval_seconds": eval_s, "tokens_per_s": tokens / eval_s if eval_s else 0.0,
                                                         **steps.peak_memory(model)})
            mr.ledger.tracker.log_rows(lease.run_id, rows, "layer_stats.csv")
            # wall time of the whole run (patch, evaluation, logging): minus eval_seconds = overhead
            mr.ledger.tracker.log(lease.run_id, metrics={"wall_seconds": time.perf_counter() - t0})
        ended = lease.finish()  # the key claimed again: a racing claimant that owns it keeps it
        if ended.state == "busy":
            return ended.run_id
        if ended.state == "done":
            _note_done_elsewhere(mr, s, ended.run_id)
        else:
            _note_evaluated(mr, s, lease.run_id, metrics, pert, time.perf_counter() - t0)
    except Exception as err:
        _note_failed(mr, s, lease, err)
    finally:
        restore_(model)
    return None


def _external_weights(mr: _ModelRun, model: Any, tokenizer: Any, s: Setting, run_id: str) -> tuple[Any, Any]:
    """The weights a setting brings instead of round-to-nearest: a released checkpoint's (read, dequantized
    into this model) or a calibrated method's (GPTQ, AWQ: cached by model + setting + data); (None, None) else."""
    calibrated, overrides = None, None
    if s.checkpoint is not None:
        got_ckpt = mr.checkpoints.get(s.name)
        if isinstance(got_ckpt, BaseException):
            raise got_ckpt
        calibrated, overrides, cparams = steps.released(model, s, got_ckpt[0])
        mr.ledger.tracker.log(run_id, params={**cparams, "checkpoint_commit": got_ckpt[1]})
    if s.calibrated:
        calibrated, cparams = steps.calibrate(model, tokenizer, mr.cfg, s, mr.info.name)
        mr.ledger.tracker.log(run_id, params={k: v for k, v in cparams.items() if k != "calibration_cached"},
                              tags={"quantlens.calibration_cached": str(cparams["calibration_cached"]).lower()})
    return calibrated, overrides


def _evaluate_datasets(mr: _ModelRun, model: Any, tokenizer: Any, s: Setting, run_id: str) -> tuple[dict[str, float], float]:
    """Each dataset evaluated and logged as it finishes (nothing finished is lost): (metrics, tokens)."""
    metrics: dict[str, float] = {}
    tokens = 0.0
    for d in mr.cfg.datasets:
        status(f"{mr.progress.done}/{mr.progress.total} runs · {mr.info.name} · {s.name} · {d.name} …")
        m, frames = steps.evaluate(model, tokenizer, d, mr.cfg.eval, mr.info.name, s, mr.kl)
        tokens += m.get(f"{d.name}_tokens", 0.0)
        mr.ledger.tracker.log(run_id, metrics=m)
        mr.ledger.tracker.log_frames(run_id, frames)
        mr.ledger.tracker.log_inputs(run_id, steps.dataset_inputs(d, mr.cfg.eval, m))
        metrics.update(m)
    return metrics, tokens


def _perturbation(mr: _ModelRun, model: Any, run_id: str, overrides: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The measured perturbation (weight / activation error, coverage) and its per-layer rows."""
    pert, rows = steps.perturbation_metrics(model)
    folded = {k: v for k, v in (overrides or {}).items() if v.dim() == 1}  # (a GGUF's quantized embeddings are 2-D: not folded)
    if folded:  # AWQ's folded norms: the checkpoint's weights are in a rescaled basis, Ŵ − W is not their error
        pert = {k: v for k, v in pert.items() if not k.startswith("weight_")}
        rows = [r for r in rows if r["kind"] != "weight"]
        mr.ledger.tracker.log(run_id, tags={"quantlens.weight_error": "not comparable: the checkpoint rescales "
                                            f"{len(folded)} norm(s) and the weights after them"})
    return pert, rows


def coverage_note(pert: dict[str, float]) -> str:
    """What a run quantized, for its console line: all it targets, this share of the blocks'
    weights, what stayed 16-bit by role; on a hybrid, the blocks whose KV cache a KV setting reaches."""
    shown = ""
    if "coverage_block" in pert:
        shown += f", weights {pert['coverage_targeted']:.0%} of targeted / {pert['coverage_block']:.1%} of block"
        kept = [f"{k.removeprefix('coverage_16bit_').replace('_', ' ')} {v:.1%}" for k, v in pert.items()
                if k.startswith("coverage_16bit_") and v > 0]
        shown += f" (16-bit: {', '.join(kept)})" if kept else ""
    if pert.get("kv_cache_share", 1.0) < 1.0:
        n = int(pert["kv_cache_blocks"])
        shown += f", KV cache in {n} of {round(n / pert['kv_cache_share'])} blocks (the attention ones)"
    return shown


def _note_evaluated(mr: _ModelRun, s: Setting, run_id: str, metrics: dict[str, float], pert: dict[str, float],
                    seconds: float) -> None:
    mr.result.evaluated.append(s.name)
    mr.result.rows.append({"setting": s.name, "state": "evaluated", "run_id": run_id,
                           **{k: round(v, 4) for k, v in metrics.items() if k.endswith(("_ppl", "_acc"))}})
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.endswith(("_ppl", "_acc", "_router_flips")))
    shown += coverage_note(pert)
    line = f"{mr.progress.tick(True)} {mr.info.name}/{s.name}: {shown} ({seconds:.1f}s)"
    get_run_logger().info(line)
    say(line)


def _note_failed(mr: _ModelRun, s: Setting, lease: Any, err: Exception) -> None:
    why = f"{type(err).__name__}: {err}"
    lease.fail(why, traceback.format_exc())
    mr.result.failed.append(f"{s.name}: {why}")
    mr.result.rows.append({"setting": s.name, "state": "FAILED", "run_id": lease.run_id, "why": why[:200],
                           "failure_log": f"{mr.ledger.tracker.artifact_uri(lease.run_id)}/failure.log"})
    # ERROR records reach the console in quiet mode too: one line, the traceback is in MLflow
    get_run_logger().error(f"{mr.progress.tick(True)} {mr.info.name}/{s.name} FAILED: {why} "
                           f"(traceback: artifact failure.log of MLflow run {lease.run_id})")


@flow(name="quantlens-model", log_prints=True, validate_parameters=False)
def model_flow(plan: SweepPlan | dict[str, Any], model_index: int, parent_run_id: str, attempt: str,
               force: bool = False, shard: int | None = None) -> ModelResult:
    """Download → load once → for each setting: lease, patch, evaluate, log, restore → explain.

    ``plan``: the sweep's :class:`SweepPlan` (in this process), or its :meth:`SweepPlan.payload` for
    this model (a worker of the ``quantlens-model`` deployment). ``shard``: run only that shard of the
    model's settings (:meth:`ModelPlan.shard`)."""
    cfg, sid, mp = _model_plan(plan, model_index, shard)
    # a model flow on a worker outlives a tracking server's restart: it asks again for a while
    ledger = RunLedger(Tracker(cfg.experiment, wait=float(os.environ.get("QUANTLENS_MLFLOW_WAIT_S", "120"))), sid, attempt, force)
    progress = progress_for(attempt, len(mp.settings))
    info, snap = steps.download_model(mp.entry)
    described, checkpoints = _read_checkpoints(mp, info.name)  # (their revisions key the runs)
    keys = mp.keys(cfg, snap.revision)
    reused = _open_keys(ledger, keys, snap.revision, info.name, progress)
    result = ModelResult(info.name, skipped=len(reused),
                         rows=[{"setting": n, "state": "already finished", "run_id": r} for n, r in reused.items()])
    todo = sorted((s for s in mp.settings if s.name not in reused), key=lambda s: not s.is_reference)  # the reference first: the KL error needs it
    narrow = ledger.narrow(snap.revision)
    if not todo and not ledger.tracker.analysis_plan(cfg, keys, narrow, force):
        publish_model_table(ledger.tracker, info.name, result)
        return result
    model, tokenizer = steps.load_model(snap, cfg.hardware)
    tags = {"git_commit": git_commit(), "device": device_tag(model), "mlflow.source.git.commit": git_commit().removesuffix("-dirty"),
            "mlflow.source.name": "quantlens", "mlflow.source.type": "JOB"}
    ref_run = next((reused[s.name] for s in mp.settings if s.is_reference and s.name in reused), None)
    mr = _ModelRun(cfg, info, snap.revision, parent_run_id, ledger, progress, tags, result,
                   steps.plan_params(cfg, info, snap, model, mp.estimate), steps.KLReference(ledger.tracker, ref_run), checkpoints)
    _evaluate_all(mr, model, tokenizer, [described.get(s.name, s) for s in todo], keys)
    explain_model(ledger.tracker, cfg, info.name, model, keys, narrow, force, result)
    publish_model_table(ledger.tracker, info.name, result)
    return result


def _model_plan(plan: SweepPlan | dict[str, Any], index: int, shard: int | None = None) -> tuple[SweepConfig, str, ModelPlan]:
    if isinstance(plan, SweepPlan):
        mp = plan.models[index]
        return plan.config, plan.sweep_id, mp if shard is None else mp.shard(shard)
    cfg, sid, mp = from_payload(plan)
    if mp.index != index or mp.shard_index != shard:
        raise ConfigError(f"model_flow: the plan is of model {mp.index} shard {mp.shard_index}, not {index} shard {shard}")
    return cfg, sid, mp


def _open_keys(ledger: RunLedger, keys: dict[str, str], revision: str, model: str, progress: Progress) -> dict[str, str]:
    """Runs of this model already FINISHED (setting → run id), said on the console; dead runs of an
    earlier attempt marked FAILED."""
    log = get_run_logger()
    reused, reaped = ledger.open_keys(keys, revision)
    if reaped:
        log.warning("%s: marked %d run(s) of an earlier, unfinished attempt FAILED", model, reaped)
    for name, run_id in reused.items():
        log.info("%s %s/%s: already FINISHED (run %s), skipped", progress.tick(False), model, name, run_id)
    return reused


def _evaluate_all(mr: _ModelRun, model: Any, tokenizer: Any, todo: list[Setting], keys: dict[str, str]) -> None:
    """Every setting to do, in turn; keys another live attempt was evaluating are waited for at the
    end — the reference at once, since the others need it (their KL error, the analyses) — and
    taken over if that attempt dies or fails."""
    waiting = []
    for s in todo:
        owner = evaluate_setting(mr, model, tokenizer, s, keys[s.name])
        if owner is not None:
            get_run_logger().info("%s/%s: being evaluated by another attempt or shard (run %s): waiting for it %s",
                                  mr.info.name, s.name, owner, "now" if s.is_reference else "at the end")
            if s.is_reference:
                _wait_for_owners(mr, model, tokenizer, [(s, owner)], keys)
            else:
                waiting.append((s, owner))
    _wait_for_owners(mr, model, tokenizer, waiting, keys)


def _wait_for_owners(mr: _ModelRun, model: Any, tokenizer: Any, waiting: list[tuple[Setting, str]], keys: dict[str, str]) -> None:
    """Until every (setting, run holding its key) is done: read back when its owner finishes it,
    evaluated here when its owner dies or fails."""
    while waiting:
        time.sleep(mr.ledger.poll_interval())
        still = []
        for s, owner in waiting:
            state = mr.ledger.wait(owner)
            if state == "done":
                _note_done_elsewhere(mr, s, owner)
            elif state == "busy":
                still.append((s, owner))
            else:
                new_owner = evaluate_setting(mr, model, tokenizer, s, keys[s.name])
                if new_owner is not None:
                    still.append((s, new_owner))
        waiting = still


def _read_checkpoints(mp: ModelPlan, model_name: str) -> tuple[dict[str, Setting], dict[str, Any]]:
    """Each checkpoint setting's checkpoint — as the plan's checks read it, else downloaded (then its
    revision is known, which keys its run) and read: (setting name → the setting saying what it holds,
    name → (folder, revision) or why it cannot be had). One that cannot be had fails its own run, not the sweep."""
    described, found = {}, {}
    for s in (s for s in mp.settings if s.checkpoint is not None):
        try:
            if s.name in mp.checkpoints:
                d, folder, revision = steps.planned_checkpoint(s, mp.checkpoints[s.name])
            else:
                d, folder, revision = steps.download_checkpoint(s)
            described[s.name], found[s.name] = d, (folder, revision)
        except Exception as err:  # (already retried where a retry can help)
            found[s.name] = err
            get_run_logger().error("%s/%s: its checkpoint cannot be had: %s", model_name, s.name, err)
    return described, found


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from names like ``tiny-opt`` / a sweep id."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")[:100]


def publish_model_table(tracker: Tracker, model: str, result: ModelResult) -> None:
    """The model flow run's table artifact: each setting's state, headline metrics and MLflow run
    (a FAILED one with its failure.log). Publishing must never fail the flow."""
    try:
        from quantlens.analysis.links import run_url

        rows = [{**r, "mlflow": run_url(r["run_id"], tracker.experiment_id)} for r in result.rows]
        create_table_artifact(table=rows, key=artifact_key("quantlens-model", model),
                              description=f"**{model}**: {len(result.evaluated)} evaluated, {result.skipped} already finished, "
                                          f"{len(result.failed)} failed")
    except Exception as err:  # noqa: BLE001
        get_run_logger().warning("%s: no Prefect table artifact (%s)", model, err)


def explain_model(tracker: Tracker, cfg: SweepConfig, model_name: str, model: Any, keys: dict[str, str], narrow: str,
                  force: bool, result: ModelResult) -> None:
    """The mechanism analyses of ``cfg.analysis`` for one loaded model, logged as artifacts of each
    analysed setting's run (``mechanisms/<dataset>/{layer_error,early_exit,patching}.csv``)."""
    log = get_run_logger()
    failed: list[str] = []
    for setting, run, ref_run, datasets in tracker.analysis_plan(cfg, keys, narrow, force):
        ref_frames, q_frames = tracker.read_frames(ref_run, "per_example"), tracker.read_frames(run, "per_example")
        for d in datasets:
            if d not in ref_frames or d not in q_frames or "tokens" not in ref_frames[d]:
                log.warning("%s/%s: no per-example data for %s (runs of an older version?): not explained", model_name, setting.name, d)
                continue
            t0 = time.perf_counter()
            try:
                frames = steps.explain(model, setting, ref_frames[d], q_frames[d], cfg.analysis, model_name, d)
            except Exception as err:
                failed.append(f"{model_name}/{setting.name} (explain {d}): {type(err).__name__}: {err}")
                log.error(f"{model_name}/{setting.name}: explaining {d} FAILED: {type(err).__name__}: {err}")  # shown on the console too
                continue
            tracker.log_frames(run, {f"mechanisms/{d}/{k}.csv": v for k, v in frames.items()})
            p = frames["patching"].set_index("patched")["ppl"]
            result.explained.append(f"{setting.name}/{d}")
            line = (f"{model_name}/{setting.name}/{d} explained ({time.perf_counter() - t0:.1f}s): D_large ppl "
                    f"{p.get('none', float('nan')):.4g} quantized, {p.get('all', float('nan')):.4g} with every module at full "
                    f"precision, {p.get('mlp', float('nan')):.4g} with the MLP outputs patched")
            log.info(line)
            say(line)
    if failed:  # the model flow fails; a rerun redoes only the analyses without artifacts
        raise AnalysisFailed("; ".join(failed))


@flow(name="quantlens-sweep", log_prints=True, validate_parameters=False)
def sweep_flow(
    config: str | dict[str, Any] | SweepPlan,
    force: bool = False,
    aggregate: bool = True,
    results_dir: str = "results",
    dispatch: str | None = None,
) -> dict[str, Any]:
    """Run every (model, setting) of the plan, skipping what already FINISHED, then aggregate.

    ``config``: the plan (:func:`~quantlens.pipeline.sweep_plan.build_plan`, as the CLI makes it), or
    a YAML path / dict to plan here (a deployment's parameter). ``dispatch``: a deployment of
    :func:`model_flow` (``"quantlens-model/gpu"``) to fan the models out to its work pool, one flow run
    per model (concurrency is the pool's/deployment's limit); None runs them here, one after the other.
    """
    log = get_run_logger()
    plan = config if isinstance(config, SweepPlan) else build_plan(config)  # checked up front: a bad config costs no model load
    cfg, sid = plan.config, plan.sweep_id
    tracker = Tracker(cfg.experiment)  # an unreachable store fails here, before any evaluation
    parent = tracker.parent_run(sid, cfg.name, {"config_name": cfg.name, "n_models": len(cfg.models), "n_settings": len(plan.settings)})
    tracker.describe_sweep(parent, cfg.model_dump(mode="json"), plan.description(), git_commit())
    attempt = _attempt_id()
    start_attempt(attempt, plan.steps)
    model_failures = _run_models(plan, dispatch, parent, attempt, force)
    summary = _summary(tracker, sid, parent, attempt, plan.grid_size, model_failures)
    summary["report_failed"] = []
    if aggregate:
        from quantlens.flows.aggregate import aggregate_flow

        agg = aggregate_flow(experiment=cfg.experiment, sweep_id=sid, out_dir=str(Path(results_dir) / sid), parent_run_id=parent,
                             statistics=cfg.analysis.statistics.model_dump())
        summary["artifacts"], summary["report_failed"], summary["report_dir"] = agg["files"], agg["failed"], agg["out_dir"]
    failed, report_failed = summary["failed"], summary["report_failed"]
    publish_sweep(tracker, plan, parent, summary)
    tracker.finish(parent, "FAILED" if failed or report_failed else "FINISHED")
    end_attempt(attempt)
    log.info("sweep %s: %d evaluated, %d already done, %d failed, %d not run", sid, summary["evaluated"], summary["skipped"],
             len(failed), summary["not_run"])
    if failed or report_failed:
        raise SweepIncomplete(_incomplete(summary))
    return summary


def _run_models(plan: SweepPlan, dispatch: str | None, parent: str, attempt: str, force: bool) -> list[str]:
    """Every model flow, here one after the other or dispatched to a deployment; what failed outside
    the runs (a model that cannot be had, an analysis), one line each."""
    if dispatch:
        return _dispatch(plan, dispatch, parent, attempt, force)
    failures = []
    for part in (p for mp in plan.models for p in mp.parts()):  # shards here run in turn
        state = model_flow(plan, part.index, parent, attempt, force, part.shard_index, return_state=True)
        if not state.is_completed():
            failures.append(f"{part.label}: (model flow) {state.message}")
    return failures


def _incomplete(summary: dict[str, Any]) -> str:
    failed, report_failed = summary["failed"], summary["report_failed"]
    lines = [f"{summary['evaluated']} evaluated, {summary['skipped']} already finished, {len(failed)} run(s) failed, "
             f"{summary['not_run']} not run" + (" (rerun the same command to redo only these): " + "; ".join(failed) if failed else "")]
    if report_failed:
        lines.append(f"report incomplete in {summary['report_dir']}/ ({len(report_failed)} part(s) failed; the evaluations are kept, "
                     "rerun the same command to complete it):")
        lines += [f"  {line}" for line in report_failed]
    return "\n".join(lines)


def _dispatch(plan: SweepPlan, deployment: str, parent: str, attempt: str, force: bool) -> list[str]:
    """One flow run of the model deployment per model, all at once, each given its part of the plan;
    wait for all of them."""
    from prefect.deployments import run_deployment

    log = get_run_logger()
    runs: list[tuple[str, Any]] = []
    for mp in (p for m in plan.models for p in m.parts()):  # a sharded model: one flow run per shard
        shard = {"shard": mp.shard_index} if mp.shard_index is not None else {}
        fr = run_deployment(
            name=deployment,
            parameters={"plan": plan.payload(mp.index, mp.shard_index), "model_index": mp.index, "parent_run_id": parent,
                        "attempt": attempt, "force": force, **shard},
            job_variables={"gpus": mp.entry.gpus} if mp.entry.gpus > 1 else None,  # big models ask for more GPUs
            tags=["quantlens", f"gpus-{mp.entry.gpus}"],
            timeout=0,  # submit all, then wait: the pool runs as many as it has GPUs for
            as_subflow=True,
        )
        log.info("dispatched %s to %s (flow run %s)", mp.label, deployment, fr.id)
        runs.append((mp.label, fr.id))
    return _wait_for(dict(runs))


def _wait_for(pending: dict[str, Any]) -> list[str]:
    """Poll the dispatched flow runs (model ref → flow run id) until all are final; the failures."""
    from prefect.client.orchestration import get_client

    failures = []
    with get_client(sync_client=True) as client:
        while pending:
            for ref, fid in list(pending.items()):
                state = client.read_flow_run(fid).state
                if state is not None and state.is_final():
                    if not state.is_completed():
                        failures.append(f"{ref}: (model flow {fid}) {state.name}: {state.message}")
                    del pending[ref]
            if pending:
                time.sleep(5)
    return failures


def sweep_markdown(cfg: SweepConfig, sid: str, summary: dict[str, Any], runs: Any, comparisons: list[tuple[str, str]],
                   failures: list[dict[str, str]]) -> str:
    """What the sweep found, for the Prefect UI: counts, the headline table with MLflow links, the
    main comparisons, failures with their failure.log, and where the report is."""
    from quantlens.analysis.aggregate import metrics_present, to_markdown
    from quantlens.analysis.links import runs_link

    lines = [f"# {cfg.name} · sweep `{sid}`", "",
             f"**{summary['evaluated']} evaluated**, {summary['skipped']} already finished, **{len(summary['failed'])} failed**, "
             f"{summary['not_run']} not run.", ""]
    if not runs.empty:
        metrics = metrics_present(runs)
        if metrics:
            head = metrics[1] if metrics[0] == "lambada_acc" and len(metrics) > 1 and metrics[1].endswith("_ppl") else metrics[0]
            table = runs.pivot_table(index="setting", columns="model", values=head, aggfunc="first", sort=False)
            table = table.reset_index()
            shown = table.head(40)
            lines += [f"## {head} per setting and model" + (f" (first 40 of {len(table)} settings)" if len(table) > 40 else ""), "",
                      to_markdown(shown), ""]
            lines += ["Each model's runs side by side in MLflow: " + ", ".join(
                f"[{m}]({runs_link(runs[runs['model'] == m])})" for m in dict.fromkeys(runs["model"])), ""]
    if comparisons:
        lines += ["## Comparisons in MLflow", ""] + [f"- [{t}]({u})" for t, u in comparisons[:20]] + [""]
    if failures:
        lines += ["## Failed runs", ""] + [f"- {f['what']}: {f['why']} — traceback: `{f['log']}`" for f in failures] + [""]
    if summary.get("report_dir"):
        lines += [f"Report (tables and figures): `{Path(summary['report_dir']).resolve()}/`, also the artifacts `report/` of the "
                  f"sweep's MLflow parent run `{summary['parent_run_id']}`."]
    return "\n".join(lines)


def publish_sweep(tracker: Tracker, plan: SweepPlan, parent: str, summary: dict[str, Any]) -> None:
    """The parent run's description gains the sweep's main comparisons; the sweep flow run gets a
    markdown artifact of what it found. Publishing must never fail the sweep."""
    cfg, sid = plan.config, plan.sweep_id
    try:
        from quantlens.analysis.aggregate import tidy
        from quantlens.analysis.links import main_comparisons

        runs = tidy(tracker.runs_frame(sid))
        comparisons = main_comparisons(runs)
        if comparisons:
            tracker.log(parent, tags={"mlflow.note.content": plan.description() + "\n\n**Comparisons**\n\n"
                                      + "\n".join(f"- [{t}]({u})" for t, u in comparisons[:20])})
        failures = [{"what": f"{r.data.params.get('model')}/{r.data.params.get('setting')}",
                     "why": r.data.tags.get("quantlens.failure", "FAILED")[:200], "log": f"{r.info.artifact_uri}/failure.log"}
                    for r in tracker.sweep_runs(sid, "FAILED") if r.data.tags.get("attempt") == summary.get("attempt")]
        create_markdown_artifact(markdown=sweep_markdown(cfg, sid, summary, runs, comparisons, failures),
                                 key=artifact_key("quantlens-sweep", cfg.name), description=f"sweep {sid}: what it found")
    except Exception as err:  # noqa: BLE001
        get_run_logger().warning("sweep %s: summary not published (%s)", sid, err)


def _summary(tracker: Tracker, sid: str, parent: str, attempt: str, grid: int, model_failures: list[str]) -> dict[str, Any]:
    """What this attempt did, read back from MLflow (the same whether models ran here or on workers):
    evaluated (FINISHED by this attempt), skipped (FINISHED before it and reused), failed, and
    not run (settings of models that failed before evaluating them)."""
    mine = tracker.attempt_runs(attempt)
    evaluated = sum(1 for r in mine if r.info.status == "FINISHED")
    failed = [
        f"{r.data.params.get('model')}/{r.data.params.get('setting')}: {r.data.tags.get('quantlens.failure', r.info.status)}"
        for r in mine
        if r.info.status == "FAILED"
    ]
    mine_ids = {r.info.run_id for r in mine}
    reused = {r.data.tags.get("run_key") for r in tracker.sweep_runs(sid, "FINISHED") if r.info.run_id not in mine_ids}
    skipped = len(reused)
    return {
        "sweep_id": sid,
        "attempt": attempt,
        "parent_run_id": parent,
        "evaluated": evaluated,
        "skipped": skipped,
        "failed": failed + model_failures,
        "not_run": max(0, grid - evaluated - skipped - len(failed)),
    }


@flow(name="quantlens-explain", log_prints=True, validate_parameters=False)
def explain_flow(config: str | dict[str, Any] | SweepPlan, force: bool = False, results_dir: str = "results") -> dict[str, Any]:
    """Only the mechanism analyses of ``config.analysis`` (layer error, early exit, patching), on
    evaluations already FINISHED; then the sweep's report. ``force`` redoes analyses already done."""
    plan = config if isinstance(config, SweepPlan) else build_plan(config)
    cfg, sid = plan.config, plan.sweep_id
    if not cfg.analysis.mechanisms:
        raise ConfigError("analysis.mechanisms: empty, nothing to explain (e.g. analysis: {mechanisms: [W3A16]})")
    tracker = Tracker(cfg.experiment)
    explained: list[str] = []
    for mp in plan.models:
        explained += _explain_one(tracker, plan, mp, force)
    from quantlens.flows.aggregate import aggregate_flow

    parent = tracker.parent_run(sid, cfg.name, {"config_name": cfg.name, "n_models": len(cfg.models), "n_settings": len(plan.settings)})
    agg = aggregate_flow(experiment=cfg.experiment, sweep_id=sid, out_dir=str(Path(results_dir) / sid), parent_run_id=parent,
                         statistics=cfg.analysis.statistics.model_dump())
    tracker.finish(parent, "FINISHED" if agg["complete"] else "FAILED")
    return {"sweep_id": sid, "explained": explained, "artifacts": agg["files"], "report_failed": agg["failed"]}


def _explain_one(tracker: Tracker, plan: SweepPlan, mp: ModelPlan, force: bool) -> list[str]:
    """One model's analyses still to do (its evaluations must have FINISHED): ``model/setting/dataset`` each."""
    cfg = plan.config
    info, snap = steps.download_model(mp.entry)
    keys = mp.keys(cfg, snap.revision)
    wanted = [n for n in [plan.reference.name, *cfg.analysis.mechanisms] if n in keys]  # (a model's `settings` may leave some out)
    if wanted == [plan.reference.name]:
        return []
    narrow = RunLedger.narrow(snap.revision)
    finished = tracker.finished_keys([keys[n] for n in wanted], narrow)
    missing = [n for n in wanted if keys[n] not in finished]
    if missing:
        raise NotEvaluated(f"{info.name}: {', '.join(missing)} not evaluated yet: run `quantlens run` on this config first")
    if not tracker.analysis_plan(cfg, keys, narrow, force):
        get_run_logger().info("%s: every analysis already done (--force redoes them)", info.name)
        return []
    model, _ = steps.load_model(snap, cfg.hardware)
    result = ModelResult(info.name)
    explain_model(tracker, cfg, info.name, model, keys, narrow, force, result)
    return [f"{info.name}/{e}" for e in result.explained]
