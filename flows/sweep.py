"""The sweep: ``sweep`` → one ``model`` subflow per model → ``aggregate``.

Each model is downloaded and loaded once; every setting is applied to it in turn (patch, evaluate
each dataset, log, restore). Every (model revision, setting, datasets, eval options, code version)
has a run key; a key with a FINISHED MLflow run is skipped, so rerunning a sweep after a crash or a
failed step redoes only what did not finish. Runs left RUNNING by a dead attempt are marked FAILED.
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from quantlens.models import resolve_model
from quantlens.patch import restore_
from quantlens.settings import ConfigError, Setting
from quantlens.sweep import SweepConfig, load_config, run_key, sweep_id
from tasks import steps
from tasks.tracking import Tracker, heartbeat_interval, sweep_tag


class AnalysisFailed(RuntimeError):
    """A mechanism analysis failed (its evaluation runs are unaffected). Rerun to redo only it."""


class SweepIncomplete(RuntimeError):
    """Some (model, setting) runs failed; the others finished and are logged. Rerun to redo them."""


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


@dataclass
class Progress:
    """Runs done/left and an ETA from the mean time of the runs evaluated so far."""

    total: int
    done: int = 0
    evaluated: int = 0
    started: float = field(default_factory=time.perf_counter)

    def tick(self, evaluated: bool) -> str:
        self.done += 1
        self.evaluated += int(evaluated)
        left = self.total - self.done
        if self.evaluated:
            eta = (time.perf_counter() - self.started) / self.evaluated * left
            eta_s = time.strftime("%H:%M:%S", time.gmtime(eta))
        else:
            eta_s = "?"
        return f"[{self.done}/{self.total}, {left} left, ETA {eta_s}]"


_PROGRESS: dict[str, Progress] = {}


def _attempt_id() -> str:
    return flow_run.get_id() or f"local-{uuid.uuid4().hex[:12]}"


def eval_params(cfg: SweepConfig, info: Any, revision: str, setting: Setting) -> dict[str, Any]:
    return {
        "model": info.name,
        "model_id": info.hf_id,
        "family": info.family,
        "size_b": info.size_b,
        "revision": revision,
        "seqlen": cfg.eval.seqlen,
        "datasets": ",".join(d.name for d in cfg.datasets),
        **setting.flat_params(),
    }


@dataclass
class _RunContext:
    cfg: SweepConfig
    info: Any
    revision: str
    sweep_id: str
    parent_run_id: str
    attempt: str
    device: str
    commit: str
    tracker: Tracker
    progress: Progress
    force: bool = False


def _finished_elsewhere(ctx: _RunContext, s: Setting, run_id: str, result: dict[str, Any]) -> None:
    """Another attempt finished this key: count its run as part of this sweep's grid."""
    ctx.tracker.log(run_id, tags={sweep_tag(ctx.sweep_id): "1"})
    get_run_logger().info("%s %s/%s: FINISHED by another attempt (run %s)", ctx.progress.tick(False), ctx.info.name, s.name, run_id)
    result["skipped"] += 1


def _evaluate_one(ctx: _RunContext, model: Any, tokenizer: Any, s: Setting, key: str, result: dict[str, Any]) -> str | None:
    """Claim the key, then patch → evaluate each dataset → log → restore. Returns the owning run
    id when another live attempt holds the key (nothing was evaluated), else None."""
    log = get_run_logger()
    name = ctx.info.name
    t0 = time.perf_counter()  # before start_eval: its cost counts as overhead
    run_id = ctx.tracker.start_eval(
        ctx.parent_run_id,
        f"{name}/{s.name}",
        eval_params(ctx.cfg, ctx.info, ctx.revision, s),
        {"sweep_id": ctx.sweep_id, sweep_tag(ctx.sweep_id): "1", "run_key": key, "git_commit": ctx.commit, "device": ctx.device, "attempt": ctx.attempt},
    )
    owner = ctx.tracker.claim(key, run_id, ctx.force)
    if owner is not None:
        ctx.tracker.discard(run_id)
        if owner[0] == "FINISHED":
            _finished_elsewhere(ctx, s, owner[1], result)
            return None
        return owner[1]
    try:
        with ctx.tracker.heartbeat(run_id):
            steps.patch(model, s)
            metrics: dict[str, float] = {}
            tokens = 0.0
            for d in ctx.cfg.datasets:
                m, frames = steps.evaluate(model, tokenizer, d, ctx.cfg.eval, name, s)
                tokens += m.get(f"{d.name}_tokens", 0.0)
                ctx.tracker.log(run_id, metrics=m)  # per dataset: nothing finished is lost
                ctx.tracker.log_frames(run_id, frames)
                metrics.update(m)
            pert, rows = steps.perturbation_metrics(model)
            eval_s = sum(v for k, v in metrics.items() if k.endswith("_seconds"))
            ctx.tracker.log(run_id, metrics={**pert, "eval_seconds": eval_s, "tokens_per_s": tokens / eval_s if eval_s else 0.0})
            ctx.tracker.log_rows(run_id, rows, "layer_stats.csv")
            # wall time of the whole run (patch, evaluation, logging): minus eval_seconds = overhead
            ctx.tracker.log(run_id, metrics={"wall_seconds": time.perf_counter() - t0})
        ctx.tracker.finish(run_id, "FINISHED")
        result["evaluated"].append(s.name)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.endswith(("_ppl", "_acc")))
        log.info("%s %s/%s: %s (%.1fs)", ctx.progress.tick(True), name, s.name, shown, time.perf_counter() - t0)
    except Exception as err:
        ctx.tracker.mark_failed(run_id, f"{type(err).__name__}: {err}"[:4000])
        result["failed"].append(f"{s.name}: {type(err).__name__}: {err}")
        log.error("%s %s/%s FAILED: %s", ctx.progress.tick(True), name, s.name, err)
    finally:
        restore_(model)
    return None


@flow(name="quantlens-model", log_prints=True, validate_parameters=False)
def model_flow(config: dict[str, Any], model_index: int, parent_run_id: str, attempt: str, force: bool = False) -> dict[str, Any]:
    """Download → load once → for each setting not yet FINISHED: patch, evaluate, log, restore."""
    log = get_run_logger()
    cfg = SweepConfig.model_validate(config)
    entry = cfg.models[model_index]
    settings = cfg.expanded_settings()
    sid = sweep_id(cfg)
    # In-process the sweep registered the whole grid; on a worker this model's settings are the total.
    progress = _PROGRESS.setdefault(attempt, Progress(total=len(settings)))
    tracker = Tracker(cfg.experiment)

    info, snap = steps.download_model(entry)
    keys = {s.name: run_key(snap.revision, entry.ref, s, cfg) for s in settings}
    narrow = f"params.revision = '{snap.revision}'"
    done = {} if force else tracker.finished_keys(list(keys.values()), narrow)
    stale = tracker.fail_stale(list(keys.values()), attempt, narrow)
    if stale:
        log.warning("%s: marked %d run(s) of an earlier, unfinished attempt FAILED", info.name, stale)
    todo = [s for s in settings if keys[s.name] not in done]
    for s in settings:
        if keys[s.name] in done:
            tracker.log(done[keys[s.name]], tags={sweep_tag(sid): "1"})  # reused: part of this sweep's grid
            log.info("%s %s/%s: already FINISHED (run %s), skipped", progress.tick(False), info.name, s.name, done[keys[s.name]])
    result: dict[str, Any] = {"model": info.name, "evaluated": [], "failed": [], "skipped": len(settings) - len(todo), "explained": []}
    if not todo and not tracker.analysis_plan(cfg, keys, narrow, force):
        return result

    model, tokenizer = steps.load_model(snap, cfg.hardware)
    ctx = _RunContext(cfg, info, snap.revision, sid, parent_run_id, attempt, device_tag(model), git_commit(), tracker, progress, force)
    deferred: list[tuple[Setting, str]] = []
    for s in todo:
        owner = _evaluate_one(ctx, model, tokenizer, s, keys[s.name], result)
        if owner is not None:
            deferred.append((s, owner))
            log.info("%s/%s: being evaluated by another attempt (run %s): waiting for it at the end", info.name, s.name, owner)
    # Keys another live attempt was evaluating: wait for it; take over if it dies or fails.
    while deferred:
        time.sleep(min(5.0, heartbeat_interval()))
        still = []
        for s, owner in deferred:
            status, stale = tracker.run_status(owner)
            if status == "FINISHED":
                _finished_elsewhere(ctx, s, owner, result)
                continue
            if status == "RUNNING" and not stale:
                still.append((s, owner))
                continue
            if status == "RUNNING":
                tracker.mark_failed(owner, "stale: its attempt stopped (no heartbeat)")
            new_owner = _evaluate_one(ctx, model, tokenizer, s, keys[s.name], result)
            if new_owner is not None:
                still.append((s, new_owner))
        deferred = still
    explain_model(tracker, cfg, info.name, model, keys, narrow, force, result)
    return result


def explain_model(tracker: Tracker, cfg: SweepConfig, model_name: str, model: Any, keys: dict[str, str], narrow: str,
                  force: bool, result: dict[str, Any]) -> None:
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
                log.error("%s/%s: explaining %s FAILED: %s", model_name, setting.name, d, err)
                continue
            tracker.log_frames(run, {f"mechanisms/{d}/{k}.csv": v for k, v in frames.items()})
            p = frames["patching"].set_index("patched")["ppl"]
            result["explained"].append(f"{setting.name}/{d}")
            log.info("%s/%s/%s explained (%.1fs): D_large ppl %.4g quantized, %.4g with every module at full precision, "
                     "%.4g with the MLP outputs patched", model_name, setting.name, d, time.perf_counter() - t0,
                     p.get("none", float("nan")), p.get("all", float("nan")), p.get("mlp", float("nan")))
    if failed:  # the model flow fails; a rerun redoes only the analyses without artifacts
        raise AnalysisFailed("; ".join(failed))


@flow(name="quantlens-sweep", log_prints=True, validate_parameters=False)
def sweep_flow(
    config: str | dict[str, Any],
    force: bool = False,
    aggregate: bool = True,
    results_dir: str = "results",
    dispatch: str | None = None,
) -> dict[str, Any]:
    """Run every (model, setting) of the config, skipping what already FINISHED, then aggregate.

    ``dispatch``: a deployment of :func:`model_flow` (``"quantlens-model/gpu"``) to fan the models
    out to its work pool, one flow run per model (concurrency is the pool's/deployment's limit);
    None runs them here, one after the other.
    """
    log = get_run_logger()
    cfg = load_config(config)  # validated up front: a bad config costs no model load
    for m in cfg.models:
        resolve_model(m.ref, m.hf_id)  # unknown names / bad directories fail before any work
    tracker = Tracker(cfg.experiment)  # an unreachable store fails here, before any evaluation
    sid = sweep_id(cfg)
    settings = cfg.expanded_settings()
    parent = tracker.parent_run(sid, cfg.name, {"config_name": cfg.name, "n_models": len(cfg.models), "n_settings": len(settings)})
    tracker.log(parent, tags={"git_commit": git_commit()})
    attempt = _attempt_id()
    _PROGRESS[attempt] = Progress(total=len(cfg.models) * len(settings))
    model_failures: list[str] = []
    if dispatch:
        model_failures = _dispatch(cfg, dispatch, parent, attempt, force)
    else:
        for i in range(len(cfg.models)):
            state = model_flow(cfg.model_dump(), i, parent, attempt, force, return_state=True)
            if not state.is_completed():
                model_failures.append(f"{cfg.models[i].ref}: (model flow) {state.message}")
    summary = _summary(tracker, sid, parent, attempt, len(cfg.models) * len(settings), model_failures)
    if aggregate:
        from flows.aggregate import aggregate_flow

        summary["artifacts"] = aggregate_flow(experiment=cfg.experiment, sweep_id=sid, out_dir=str(Path(results_dir) / sid), parent_run_id=parent)
    failed = summary["failed"]
    tracker.finish(parent, "FAILED" if failed else "FINISHED")
    _PROGRESS.pop(attempt, None)
    log.info("sweep %s: %d evaluated, %d already done, %d failed", sid, summary["evaluated"], summary["skipped"], len(failed))
    if failed:
        raise SweepIncomplete(f"{len(failed)} run(s) failed (rerun the same command to redo only these): " + "; ".join(failed))
    return summary


def _dispatch(cfg: SweepConfig, deployment: str, parent: str, attempt: str, force: bool) -> list[str]:
    """One flow run of the model deployment per model, all at once; wait for all of them."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    log = get_run_logger()
    runs: list[tuple[str, Any]] = []
    for i, m in enumerate(cfg.models):
        fr = run_deployment(
            name=deployment,
            parameters={"config": cfg.model_dump(), "model_index": i, "parent_run_id": parent, "attempt": attempt, "force": force},
            job_variables={"gpus": m.gpus} if m.gpus > 1 else None,  # big models ask for more GPUs
            tags=["quantlens", f"gpus-{m.gpus}"],
            timeout=0,  # submit all, then wait: the pool runs as many as it has GPUs for
            as_subflow=True,
        )
        log.info("dispatched %s to %s (flow run %s)", m.ref, deployment, fr.id)
        runs.append((m.ref, fr.id))
    failures = []
    pending = dict(runs)
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


def _summary(tracker: Tracker, sid: str, parent: str, attempt: str, grid: int, model_failures: list[str]) -> dict[str, Any]:
    """What this attempt did, read back from MLflow (the same whether models ran here or on workers)."""
    mine = tracker.attempt_runs(attempt)
    evaluated = sum(1 for r in mine if r.info.status == "FINISHED")
    failed = [
        f"{r.data.params.get('model')}/{r.data.params.get('setting')}: {r.data.tags.get('quantlens.failure', r.info.status)}"
        for r in mine
        if r.info.status == "FAILED"
    ]
    return {
        "sweep_id": sid,
        "parent_run_id": parent,
        "evaluated": evaluated,
        "skipped": grid - evaluated - len(failed),
        "failed": failed + model_failures,
    }


class NotEvaluated(RuntimeError):
    """``quantlens explain`` needs the evaluations it explains: they are not FINISHED yet."""


@flow(name="quantlens-explain", log_prints=True, validate_parameters=False)
def explain_flow(config: str | dict[str, Any], force: bool = False, results_dir: str = "results") -> dict[str, Any]:
    """Only the mechanism analyses of ``config.analysis`` (layer error, early exit, patching), on
    evaluations already FINISHED; then the sweep's report. ``force`` redoes analyses already done."""
    log = get_run_logger()
    cfg = load_config(config)
    if not cfg.analysis.mechanisms:
        raise ConfigError("analysis.mechanisms: empty, nothing to explain (e.g. analysis: {mechanisms: [W3A16]})")
    tracker = Tracker(cfg.experiment)
    settings = cfg.expanded_settings()
    ref = next(s.name for s in settings if s.is_baseline and s.perturbation is None)
    sid = sweep_id(cfg)
    explained: list[str] = []
    for entry in cfg.models:
        info, snap = steps.download_model(entry)
        keys = {s.name: run_key(snap.revision, entry.ref, s, cfg) for s in settings}
        narrow = f"params.revision = '{snap.revision}'"
        finished = tracker.finished_keys([keys[n] for n in [ref, *cfg.analysis.mechanisms]], narrow)
        missing = [n for n in [ref, *cfg.analysis.mechanisms] if keys[n] not in finished]
        if missing:
            raise NotEvaluated(f"{info.name}: {', '.join(missing)} not evaluated yet: run `quantlens run` on this config first")
        if not tracker.analysis_plan(cfg, keys, narrow, force):
            log.info("%s: every analysis already done (--force redoes them)", info.name)
            continue
        model, tokenizer = steps.load_model(snap, cfg.hardware)
        result: dict[str, Any] = {"explained": []}
        explain_model(tracker, cfg, info.name, model, keys, narrow, force, result)
        explained += [f"{info.name}/{e}" for e in result["explained"]]
        del model
    from flows.aggregate import aggregate_flow

    parent = tracker.parent_run(sid, cfg.name, {"config_name": cfg.name, "n_models": len(cfg.models), "n_settings": len(settings)})
    files = aggregate_flow(experiment=cfg.experiment, sweep_id=sid, out_dir=str(Path(results_dir) / sid), parent_run_id=parent)
    tracker.finish(parent, "FINISHED")
    return {"sweep_id": sid, "explained": explained, "artifacts": files}
