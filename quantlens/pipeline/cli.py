"""``quantlens`` command line: run a sweep, aggregate, list what exists.

The user layer: it imports Prefect and MLflow (through ``quantlens.flows`` / ``quantlens.tasks``)
only inside the commands that need them, after setting the quiet-console environment.

    quantlens run configs/demo.yaml [--dry-run] [--force] [-v]
    quantlens explain configs/demo.yaml [--force]     # only the mechanism analyses (config: analysis)
    quantlens aggregate [--experiment NAME] [--sweep-id ID] [--out DIR]
    quantlens compare W4A16 W4A16-nu [--experiment NAME] [--model M ...] [--sweep-id ID] [--port P]
    quantlens list-settings | list-models | list-datasets
    quantlens ui            # the MLflow UI on the default local store
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from quantlens.errors import ConfigError


def _print_plan(plan: list[Any], header: str) -> None:
    print(header)
    for r in plan:
        state = {"todo": "todo" if r.key else "todo (revision known after download)", "done": "done",
                 "running": f"running elsewhere (run {r.run_id})", "failed": "todo (failed last time)"}[r.state]
        print(f"  {r.model:<24} {r.setting:<40} {state}")
    n_done = sum(1 for r in plan if r.state == "done")
    print(f"{n_done} done, {len(plan) - n_done} to run")


def _check_prefect() -> None:
    """A Prefect API named by PREFECT_API_URL must answer and accept our credentials before the
    flow starts (unset: Prefect's local ephemeral server, nothing to check)."""
    if os.environ.get("PREFECT_API_URL"):
        from quantlens.pipeline.credentials import check_prefect

        check_prefect(os.environ["PREFECT_API_URL"])


def cmd_run(args: argparse.Namespace) -> int:
    from quantlens.pipeline.sweep_plan import build_plan
    from quantlens.tasks.ledger import RunLedger
    from quantlens.tasks.tracking import Tracker

    # the config, the grid, the device, models, group sizes, placement memory, data files, disk: one line, seconds
    plan = build_plan(args.config, _planned_target(args), planning=args.dry_run)
    tracker = Tracker(plan.config.experiment)  # an unreachable store fails here, before Prefect starts
    runs = RunLedger(tracker, plan.sweep_id, attempt="plan", force=args.force).plan(plan)
    for alias, kept in plan.aliases.items():
        print(f"{alias}: the same computation as {kept}, evaluated once as {kept}", file=sys.stderr)
    if args.dry_run:
        print("\n".join(plan.lines()))
        per = "" if len(runs) == len(plan.models) * len(plan.settings) else "up to "
        _print_plan(runs, f"sweep {plan.sweep_id}: {len(plan.models)} model(s) × {per}{len(plan.settings)} setting(s) = "
                          f"{len(runs)} run(s); datasets: {', '.join(d.name for d in plan.config.datasets)}")
        return 0
    _check_prefect()  # the dry run needs no Prefect
    if not args.force and _nothing_to_do(plan, runs, tracker, os.path.join(args.results, plan.sweep_id)):
        return 0
    todo = sum(1 for r in runs if r.state != "done")
    print("\n".join(plan.lines()), file=sys.stderr)
    print(f"sweep {plan.sweep_id}: {len(runs)} run(s), {len(runs) - todo} already done, {todo} to evaluate", file=sys.stderr)
    return _run_sweep(plan, args)


def _planned_target(args: argparse.Namespace) -> Any:
    """The machine ``--gpu`` / ``--gpu-memory`` / ``--gpus`` plan for (a dry run only); None: this one."""
    if not (args.gpu or args.gpu_memory or args.gpus):
        return None
    if not args.dry_run:
        raise ConfigError("--gpu / --gpu-memory / --gpus plan for another machine: use them with --dry-run")
    if args.gpus and not (args.gpu or args.gpu_memory):
        raise ConfigError("--gpus: say which GPU with --gpu NAME or --gpu-memory GiB")
    from quantlens.pipeline.plan import planned_target

    return planned_target(args.gpu, args.gpu_memory, args.gpus)


def _nothing_to_do(plan: Any, runs: list[Any], tracker: Any, report: str) -> bool:
    """Every run FINISHED, the report complete and no mechanism analysis missing: said in one line,
    without starting Prefect (seconds instead of ~15 s). A missing, failed or outdated report is made again."""
    from quantlens.analysis.report import report_is_complete

    if not all(r.state == "done" for r in runs) or not report_is_complete(report, [r.run_id for r in runs if r.run_id]):
        return False
    per_model: dict[str, dict[str, str]] = {}
    for r in runs:
        per_model.setdefault(r.model, {})[r.setting] = r.key
    if any(tracker.analysis_plan(plan.config, keys, None) for keys in per_model.values()):
        return False
    print(f"sweep {plan.sweep_id}: all {len(runs)} run(s) already FINISHED, nothing to evaluate "
          f"(--force redoes them); report in {report}/")
    return True


def _run_sweep(plan: Any, args: argparse.Namespace) -> int:
    from quantlens.flows.sweep import sweep_flow
    from quantlens.pipeline.errors import SweepIncomplete

    try:
        summary = sweep_flow(plan, force=args.force, results_dir=args.results)
    except SweepIncomplete as err:
        print(f"quantlens: {err}", file=sys.stderr)
        return 3
    print(f"sweep {summary['sweep_id']}: {summary['evaluated']} evaluated, {summary['skipped']} already finished, "
          f"{len(summary['failed'])} failed, {summary['not_run']} not run")
    files = summary.get("artifacts", [])
    if files:
        print(f"report in {summary['report_dir']}/: {len(files)} file(s) (tables .csv/.md, figures .png)")
        if args.verbose:
            for f in files:
                print(f"  wrote {f}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from quantlens.flows.sweep import explain_flow
    from quantlens.pipeline.errors import NotEvaluated
    from quantlens.pipeline.sweep_plan import build_plan
    from quantlens.tasks.tracking import Tracker

    plan = build_plan(args.config)
    Tracker(plan.config.experiment)  # an unreachable store fails here, before Prefect starts
    _check_prefect()
    try:
        out = explain_flow(plan, force=args.force, results_dir=args.results)
    except NotEvaluated as err:
        print(f"quantlens: {err}", file=sys.stderr)
        return 2
    for line in out["report_failed"]:
        print(f"quantlens: report part failed: {line}", file=sys.stderr)
    print(f"sweep {out['sweep_id']}: {len(out['explained'])} analysis(es) run: {', '.join(out['explained']) or 'none needed'}")
    for f in out["artifacts"]:
        if Path(f).stem.startswith(("layer_error", "early_exit", "patching", "fig_layer_error", "fig_early_exit", "fig_patching")):
            print(f"  wrote {f}")
    return 3 if out["report_failed"] else 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    from quantlens.flows.aggregate import build_report

    out = args.out or os.path.join("results", args.sweep_id or args.experiment)
    stats = {"resamples": args.resamples, "level": args.level, "seed": args.seed}
    result = build_report(experiment=args.experiment, sweep_id=args.sweep_id, out_dir=out, statistics=stats)  # no orchestration needed
    if not result["files"] and not result["failed"]:
        print("no finished runs found", file=sys.stderr)
        return 1
    for f in result["files"]:
        print(f"wrote {f}")
    for line in result["failed"]:
        print(f"quantlens: report part failed: {line}", file=sys.stderr)
    return 0 if result["complete"] else 3


def cmd_compare(args: argparse.Namespace) -> int:
    """The MLflow compare view of the latest FINISHED runs of some settings, and their headline metrics."""
    from quantlens.analysis.aggregate import metrics_present, tidy, to_markdown
    from quantlens.analysis.links import compare_url, select_runs, ui_base
    from quantlens.tasks.tracking import Tracker

    tracker = Tracker(args.experiment)
    df = tidy(tracker.runs_frame(args.sweep_id))
    if df.empty:
        where = f"sweep {args.sweep_id} of " if args.sweep_id else ""
        raise ConfigError(f"no FINISHED runs in {where}experiment {args.experiment!r}")
    try:
        runs = select_runs(df, args.settings, args.model)
    except KeyError as err:
        raise ConfigError(str(err).strip("'\"")) from None
    table = runs[["model", "setting"] + metrics_present(runs)]
    print(to_markdown(table).rstrip())
    print(f"\n{len(runs)} run(s) side by side in MLflow (metrics, parameters with a diff switch, parallel coordinates):")
    print(compare_url(runs["run_id"], runs["experiment_id"], ui_base(args.port)))
    return 0


def cmd_list_settings(args: argparse.Namespace) -> int:
    from quantlens.quantize.settings import CALIBRATED_NAMES, FORMAT_NAMES, PRESETS, setting_from_name

    def desc(q) -> str:  # noqa: ANN001
        if q is None:
            return "16-bit (untouched)"
        if getattr(q, "mixture", None):  # llama.cpp's mixture: per-tensor types (what the run measures: weight_bits_per_weight)
            from quantlens.quantize.mixtures import MIXTURES

            return f"{q.label}: {MIXTURES[q.mixture].describe()}"
        if q.is_llama_cpp:  # llama.cpp's types: the scale rule and the stored bits per value
            return f"{q.label} blocks of {q.group_size}, {q.ggml().scale_rule}, {q.ggml().bits_per_weight:g} bpw"
        t = f", p={q.transform_p:.3g}" if q.transform_p != 1.0 else ""
        where = f"blocks of {q.group_size}" if q.group_size else f"per-{q.granularity}"
        scale = "" if q.scale == "fp32" or q.format == "km" else f", {q.scale}" + (f"×fp32/{q.global_scale}" if q.global_scale else "") + " scale"
        return f"{q.label} {where}{scale}{t}"

    def weights(s) -> str:  # noqa: ANN001
        return desc(s.weights) if not s.calibrated else f"{s.method.upper()} on {desc(s.weights)}"

    print(f"{'name':<18}{'weights':<68}{'activations':<48}{'KV cache'}")
    for name in (*PRESETS, *FORMAT_NAMES, *CALIBRATED_NAMES):
        s = setting_from_name(name)
        print(f"{name:<18}{weights(s):<68}{desc(s.activations):<48}{desc(s.kv)}")
    print("\nAny name W<bits>A<bits>[KV<bits>][-g<group>][-nu][-p<exp>][-<nf|fp|mxfp|mxint|nvfp|km>[bits][eXmY]|-q<bits>_<0|1|k|k_m>|-iq4nl][-clip<k>][-gptq|-awq] "
          "works too, e.g. W3A16-g64-nu, W8A8-clip3, W16A16KV4, W4A8-fp (FP4 weights, FP8 activations), W8A8-fp8e5m2, W3A16-g64-gptq.")
    print("Calibrated methods (gptq, awq) quantize on the sweep's calibration data (calibration: in the YAML).")
    from quantlens.checkpoints.layouts import reads

    print("A released quantized checkpoint is a setting too: {name: <any>, checkpoint: <hub id, folder or .gguf file>} (or "
          f"checkpoint: {{<model>: <its checkpoint>, …}}); read: {reads()}.")
    print("Perturbations, grids (seeds, clip_k, transform_p lists) and the long form of every format field "
          "(format, element, scale, global_scale, group_size) are defined in the sweep YAML.")
    return 0


def cmd_list_models(args: argparse.Namespace) -> int:
    from quantlens.model.loading import registry

    for info in registry().values():
        print(f"{info.name:<18}{info.family:<10}{info.size_b:>7g}B  {info.hf_id}")
    print("\nAny Hugging Face id (owner/name) or local model directory works too.")
    return 0


def cmd_list_datasets(args: argparse.Namespace) -> int:
    from quantlens.evaluation.data import DATASETS

    for d in DATASETS.values():
        print(f"{d.name:<12}{d.doc}")
    return 0


def cmd_alpha_sweep(args: argparse.Namespace) -> int:
    import csv

    from quantlens.analysis.alpha_sweep import alpha_sweep, plot_alpha_sweep
    from quantlens.model.loading import download, load_model, resolve_model

    info = resolve_model(args.model)
    model, _ = load_model(download(info), device="cpu", dtype="float32")
    ratios = [round(0.2 + 0.05 * i, 2) for i in range(17)]
    rows = alpha_sweep(model, args.bits, ratios, args.granularity)
    out = os.path.join(args.out, f"alpha_sweep_{info.name}")
    os.makedirs(args.out, exist_ok=True)
    with open(out + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot_alpha_sweep(rows, out + ".png", info.name)
    for b in args.bits:
        best = min((r for r in rows if r["bits"] == b), key=lambda r: r["delta_l2_mean"])
        print(f"{b}-bit: ‖Δ‖₂ smallest at α = {best['alpha_ratio']:.2f}·max|x| ({best['delta_l2_mean']:.4g}; "
              f"{best['clipped_fraction']:.3%} clipped)")
    print(f"wrote {out}.csv and {out}.png")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from quantlens.checkpoints.export import write_quantized
    from quantlens.model.loading import TOKENIZER_FILES, download, load_model, resolve_model
    from quantlens.checkpoints.released import describe

    info = resolve_model(args.model)
    snap = download(info)
    model, _ = load_model(snap, device="cpu", dtype="float32")
    out = write_quantized(model, args.out, args.method, bits=args.bits, group_size=args.group_size, sym=not args.asym,
                          v1=not args.v2, act_order=args.act_order)
    for f in TOKENIZER_FILES:  # (so that the checkpoint also loads on its own, e.g. with transformers + GPTQModel)
        if (Path(snap.path) / f).is_file():
            shutil.copy(Path(snap.path) / f, out / f)
    r = describe(out)
    print(f"wrote {out}: {info.name} as {r.layout}, {r.bits} bits, groups of {r.group_size or 'a row'}"
          f"{', act-order' if r.act_order else ''} (round to nearest on the format's grid); "
          f"use it as a setting: {{name: <any>, checkpoint: {out}}}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """The MLflow UI on the tracking store, started with this interpreter (no activated venv needed)."""
    from quantlens.tasks.tracking import Tracker, tracking_uri

    uri = tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    exp = Tracker(args.experiment, uri)  # creates it as a model-training experiment if new
    print(f"MLflow UI on {uri}: open http://127.0.0.1:{args.port}/#/experiments/{exp.experiment_id}?workflowType=machine_learning "
          "(the runs view; MLflow 3 opens experiments on GenAI traces otherwise)")
    # MLflow's job runner (GenAI prompt optimisation, trace roll-ups) is four extra processes that
    # quantlens never uses; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true brings them back.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(cmd[0], cmd)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="quantlens", description="Why quantization hurts an LLM: sweeps of quantization and perturbation settings.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a sweep described in a YAML file (skips runs already FINISHED)")
    r.add_argument("config")
    r.add_argument("--dry-run", action="store_true", help="print the planned grid and what is already done")
    r.add_argument("--force", action="store_true", help="redo every run, finished or not")
    r.add_argument("--gpu", default=None, help="with --dry-run: plan for this GPU (H100, A100-40GB, L40S, …) instead of this machine's")
    r.add_argument("--gpu-memory", type=float, default=None, metavar="GIB", help="with --dry-run: plan for GPUs of this memory")
    r.add_argument("--gpus", type=int, default=None, metavar="N", help="with --dry-run: plan for N GPUs per node")
    r.add_argument("--results", default="results", help="folder for tables and figures (default: results/)")
    r.add_argument("-v", "--verbose", action="store_true", help="Prefect's logs, per-batch progress, every file written")
    r.set_defaults(fn=cmd_run)
    e = sub.add_parser("explain", help="layer error, early exit and activation patching of the config's analysis.mechanisms settings")
    e.add_argument("config")
    e.add_argument("--force", action="store_true", help="redo analyses already done")
    e.add_argument("--results", default="results", help="folder for tables and figures (default: results/)")
    e.add_argument("-v", "--verbose", action="store_true", help="Prefect's logs and per-batch progress")
    e.set_defaults(fn=cmd_explain)
    a = sub.add_parser("aggregate", help="tables and figures from finished runs in MLflow")
    a.add_argument("--experiment", default="quantlens-demo")
    a.add_argument("--sweep-id", default=None, help="one sweep (default: all runs of the experiment)")
    a.add_argument("--out", default=None)
    a.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the paired intervals (default 1000)")
    a.add_argument("--level", type=float, default=0.95, help="confidence level of every interval (default 0.95)")
    a.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    a.set_defaults(fn=cmd_aggregate)
    c = sub.add_parser("compare", help="link to MLflow's compare view of the latest FINISHED runs of some settings, and their metrics")
    c.add_argument("settings", nargs="+", metavar="SETTING")
    c.add_argument("--experiment", default="quantlens-demo")
    c.add_argument("--model", nargs="+", default=None, help="only these models (default: every model with runs)")
    c.add_argument("--sweep-id", default=None, help="only runs of this sweep")
    c.add_argument("--port", type=int, default=None, help="the port of `quantlens ui` for a local store (default 5000)")
    c.set_defaults(fn=cmd_compare)
    sub.add_parser("list-settings", help="presets and the setting-name grammar").set_defaults(fn=cmd_list_settings)
    sub.add_parser("list-models", help="the model registry").set_defaults(fn=cmd_list_models)
    sub.add_parser("list-datasets", help="evaluation datasets").set_defaults(fn=cmd_list_datasets)
    s = sub.add_parser("alpha-sweep", help="Figure 3: ‖Δ‖₂ of a model's weights as the scale α shrinks below max|x|")
    s.add_argument("model")
    s.add_argument("--bits", type=int, nargs="+", default=[3, 4, 8])
    s.add_argument("--granularity", default="channel", choices=["tensor", "channel"])
    s.add_argument("--out", default="results")
    s.set_defaults(fn=cmd_alpha_sweep)
    x = sub.add_parser("export", help="write a model as a GPTQ or AWQ checkpoint (round to nearest on the format's grid)")
    x.add_argument("model")
    x.add_argument("--method", default="gptq", choices=["gptq", "awq"])
    x.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8], help="GPTQ: 2, 3, 4 or 8; AWQ: 4")
    x.add_argument("--group-size", type=int, default=128, help="-1: one group per row")
    x.add_argument("--asym", action="store_true", help="GPTQ: min/max zero points (AWQ always has them)")
    x.add_argument("--act-order", action="store_true", help="GPTQ: groups over a permutation of the inputs, stored as g_idx")
    x.add_argument("--v2", action="store_true", help="GPTQ: the gptq_v2 layout (zero points as they are)")
    x.add_argument("--out", required=True)
    x.set_defaults(fn=cmd_export)
    u = sub.add_parser("ui", help="open the MLflow UI on the tracking store")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--experiment", default="quantlens-demo", help="the experiment whose link is printed")
    u.set_defaults(fn=cmd_ui)
    return ap


def quiet_environment(verbose: bool) -> None:
    """Before Prefect or MLflow is imported: no telemetry (opt in with QUANTLENS_TELEMETRY=1), and
    unless ``--verbose`` Prefect's console logs down to warnings, MLflow's and the Hugging Face
    progress bars off; the sweep's own console display shows progress instead."""
    if os.environ.get("QUANTLENS_TELEMETRY") != "1":
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ["QUANTLENS_CONSOLE"] = "1"
    if verbose:
        os.environ["QUANTLENS_VERBOSE"] = "1"
        return
    os.environ.setdefault("PREFECT_LOGGING_SETTINGS_PATH", str(Path(__file__).with_name("prefect_logging.yml")))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "🏃 View run …" per run on a server
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging

    for name in ("mlflow", "alembic", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # torchao, where it is installed (often, beside transformers), is imported by transformers when it builds a model, and warns about
    # its own C extensions (absent on CPU builds) and about torch's Enum pytree registrations: noise
    # that would break the one-line answers of preflight; --verbose shows it.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_environment(getattr(args, "verbose", False))
    from quantlens.pipeline.errors import CredentialsRefused, TrackingUnavailable
    from quantlens.model.loading import ModelUnavailable

    try:
        return args.fn(args)
    except ConfigError as err:  # PreflightError too
        print(f"quantlens: {err}", file=sys.stderr)
        return 2
    except ModelUnavailable as err:
        print(f"quantlens: {err}", file=sys.stderr)
        return 4
    except TrackingUnavailable as err:
        print(f"quantlens: {err}", file=sys.stderr)
        return 5
    except CredentialsRefused as err:
        print(f"quantlens: {err}", file=sys.stderr)
        return 6


if __name__ == "__main__":
    sys.exit(main())
