"""End to end: Prefect flows on the shared trained models with a real (SQLite) MLflow store."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import LAMBADA, MODELS, REPO, WIKI_TEST

pytestmark = pytest.mark.slow
SETTINGS = ["W16A16", "W4A16", "W8A8", {"base": "W4A8", "perturbation": {"distribution": "binary", "target": "weights"}, "seeds": [0, 1]}]
GRID = 2 * 5


def config(name="e2e", **over):
    cfg = {
        "name": name,
        "experiment": "test",
        "models": [str(MODELS / "tiny-opt"), str(MODELS / "tiny-llama")],
        "settings": SETTINGS,
        "datasets": [{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 8},
                     {"name": "lambada", "path": str(LAMBADA), "limit": 16}],
        "eval": {"seqlen": 128, "batch_size": 8},
        "hardware": {"device": "cpu"},
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    d = tmp_path_factory.mktemp("store")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d}/mlflow.db"
    os.environ["QUANTLENS_HEARTBEAT_S"] = "0.5"  # a dead run is stale after 2 s
    with prefect_test_harness(server_startup_timeout=120):
        yield d
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI")
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def filled(env):
    """The e2e sweep, complete: tests that read its runs do not depend on running after another."""
    from quantlens.flows.sweep import sweep_flow

    sweep_flow(config(), results_dir=str(env / "results"))
    return env


SETTING_NAMES = ["W16A16", "W4A16", "W8A8", "W4A8+binary-additive-weights-s0", "W4A8+binary-additive-weights-s1"]


def prefect_artifacts() -> dict[str, list]:
    """Artifacts on the Prefect server, by key, oldest first."""
    from prefect.client.orchestration import get_client

    out: dict[str, list] = {}
    with get_client(sync_client=True) as client:
        for a in sorted(client.read_artifacts(), key=lambda a: a.created):
            out.setdefault(a.key, []).append(a)
    return out


def test_compare_prints_the_runs_and_their_mlflow_compare_link(filled, capsys):
    from quantlens.analysis.aggregate import tidy
    from quantlens.pipeline.cli import main
    from quantlens.tasks.tracking import Tracker

    assert main(["compare", "W4A16", "W8A8", "--experiment", "test", "--port", "5099"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    df = tidy(Tracker("test").runs_frame())
    want = df[df["setting"].isin(["W4A16", "W8A8"])]
    rows = [line for line in out if line.startswith("| tiny-")]
    assert [r.split(" | ")[:2] for r in rows] == [["| tiny-llama", "W4A16"], ["| tiny-llama", "W8A8"], ["| tiny-opt", "W4A16"], ["| tiny-opt", "W8A8"]]
    link = out[-1]
    assert link.startswith("http://127.0.0.1:5099/#/compare-runs?runs=[%22")
    ids = json.loads(link.split("runs=")[1].split("&")[0].replace("%22", '"'))
    assert sorted(ids) == sorted(want["run_id"]) and link.endswith(f"&experiments=[%22{Tracker('test').experiment_id}%22]")
    assert main(["compare", "W4A16", "W5A5", "--experiment", "test"]) == 2
    assert "no FINISHED run of W5A5 (settings with runs: " in capsys.readouterr().err


def test_report_tables_link_each_row_to_its_runs(filled):
    from quantlens.pipeline.sweep import load_config, sweep_id

    d = filled / "results" / sweep_id(load_config(config()))
    pert = (d / "perturbations_wikitext2_ppl.md").read_text()
    assert pert.count("[compare](http://127.0.0.1:5000/#/compare-runs?runs=") == 2  # one per model
    assert "[Compare these runs in MLflow](http" in (d / "error_correlation.md").read_text()
    assert (d / "per_example.md").read_text().count("[compare](http") == 4  # per model and dataset


def runs(status=None, sweep=None):
    from quantlens.tasks.tracking import Tracker

    df = Tracker("test").runs_frame(sweep, finished_only=False)
    return df if status is None else df[df["status"] == status]


def test_failure_then_rerun_redoes_only_it(env, monkeypatch):
    from quantlens.flows.sweep import SweepIncomplete, sweep_flow
    from quantlens.pipeline.sweep import load_config, sweep_id

    datasets = [{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 7}, {"name": "lambada", "path": str(LAMBADA), "limit": 16}]

    def failing():  # its own run keys: no other test's runs can be reused here
        return config(name="failure", datasets=datasets)

    sid = sweep_id(load_config(failing()))
    monkeypatch.setenv("QUANTLENS_INJECT_FAULT", "tiny-llama:W8A8")
    with pytest.raises(SweepIncomplete, match="1 run\\(s\\) failed.*tiny-llama/W8A8: RuntimeError: injected fault"):
        sweep_flow(failing(), results_dir=str(env / "results"))
    assert len(runs("FINISHED", sid)) == GRID - 1
    failed = runs("FAILED", sid)
    assert list(failed["params.setting"]) == ["W8A8"] and list(failed["params.model"]) == ["tiny-llama"]
    assert "injected fault" in failed["tags.quantlens.failure"].iloc[0]
    from quantlens.tasks.tracking import Tracker

    failed_id = failed["run_id"].iloc[0]
    log = Tracker("test").client.download_artifacts(failed_id, "failure.log", str(env))
    assert "Traceback" in open(log).read() and "injected fault" in open(log).read()
    # what the flow runs publish in Prefect: the sweep's summary, each model's table, the failure's log
    found = prefect_artifacts()
    md = found["quantlens-sweep-failure"][-1].data
    assert f"sweep `{sid}`" in md and f"**{GRID - 1} evaluated**" in md and "**1 failed**" in md
    assert "tiny-llama/W8A8: RuntimeError: injected fault" in md and f"{failed_id}/artifacts/failure.log`" in md
    assert "#/compare-runs?runs=" in md and "## Comparisons in MLflow" in md
    table = json.loads(found["quantlens-model-tiny-llama"][-1].data)
    bad = [r for r in table if r["state"] == "FAILED"]
    assert [r["setting"] for r in bad] == ["W8A8"] and bad[0]["failure_log"].endswith(f"{failed_id}/artifacts/failure.log")
    assert sorted(r["setting"] for r in table if r["state"] == "evaluated") == sorted(s for s in SETTING_NAMES if s != "W8A8")

    monkeypatch.delenv("QUANTLENS_INJECT_FAULT")
    summary = sweep_flow(failing(), results_dir=str(env / "results"))
    assert summary["evaluated"] == 1 and summary["skipped"] == GRID - 1 and summary["failed"] == [] and summary["not_run"] == 0
    assert runs("FAILED", sid).empty  # the superseded failure left the default view (soft-deleted, restorable)
    assert Tracker("test").client.get_run(failed_id).info.lifecycle_stage == "deleted"
    fin = runs("FINISHED", sid)
    assert len(fin) == GRID  # exactly the grid: nothing duplicated
    assert fin["tags.run_key"].nunique() == GRID
    # one parent run, reused by the rerun
    from quantlens.tasks.tracking import KIND_TAG

    t = Tracker("test")
    parents = t._search(f"tags.sweep_id = '{sid}' and tags.`{KIND_TAG}` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert (env / "results" / sid / "results.csv").is_file()
    assert (env / "results" / sid / "fig4_perturbations_wikitext2_ppl.png").is_file()

    # a third run evaluates nothing
    summary = sweep_flow(failing(), results_dir=str(env / "results"))
    assert summary["evaluated"] == 0 and summary["skipped"] == GRID


def test_numbers_in_mlflow_equal_direct_evaluation(filled):
    from quantlens.evaluation.evaluate import evaluate_dataset
    from quantlens.model.loading import load_model
    from quantlens.quantize.patch import quantize_, restore_
    from quantlens.pipeline.sweep import load_config, sweep_id

    df = runs("FINISHED", sweep_id(load_config(config())))
    row = df[(df["params.model"] == "tiny-opt") & (df["params.setting"] == "W4A16")].iloc[0]
    m, tok = load_model(str(MODELS / "tiny-opt"), device="cpu")
    quantize_(m, "W4A16")
    ppl = evaluate_dataset(m, tok, "wikitext2", seqlen=128, path=str(WIKI_TEST), max_windows=8, batch_size=8)["ppl"]
    lam = evaluate_dataset(m, tok, "lambada", path=str(LAMBADA), limit=16, batch_size=8)
    restore_(m)
    assert row["metrics.wikitext2_ppl"] == pytest.approx(ppl, rel=1e-9)
    assert row["metrics.lambada_nll"] == pytest.approx(lam["nll"], rel=1e-9)
    assert row["metrics.lambada_acc"] == lam["acc"]
    for p in ("model", "family", "size_b", "setting", "w_bits", "a_bits", "w_granularity", "a_granularity",
              "transform", "clip_k", "perturbation", "seed", "revision", "seqlen"):
        assert f"params.{p}" in df
    assert row["params.family"] == "opt" and row["params.w_bits"] == "4" and row["params.a_bits"] == "16"
    # the plan it ran under, and what it measured (CPU: the process' peak RSS)
    assert row["params.placement"] == "single" and float(row["params.plan.peak_gpu_gib"]) > 0
    assert row["params.plan.batch_size"] == "8" and row["metrics.peak_rss_gib"] > 0
    for t in ("sweep_id", "run_key", "git_commit", "device"):
        assert row[f"tags.{t}"]
    assert row["metrics.weight_rel_error_mean"] > 0 and row["metrics.eval_seconds"] > 0 and row["metrics.tokens_per_s"] > 0
    from quantlens.tasks.tracking import Tracker

    arts = [a.path for a in Tracker("test").client.list_artifacts(row["run_id"])]
    assert "layer_stats.csv" in arts


def test_stale_running_run_marked_failed_and_redone(env):
    from quantlens.flows.sweep import sweep_flow
    from quantlens.pipeline.sweep import load_config, sweep_id
    from quantlens.tasks.tracking import Tracker

    cfg = config(name="stale", models=[str(MODELS / "tiny-opt")], settings=["W4A16"],
                 datasets=[{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 4}])
    sid = sweep_id(load_config(cfg))
    # a crashed attempt: a run left RUNNING for the same key
    from quantlens.model.loading import download, resolve_model
    from quantlens.pipeline.sweep import run_key

    c = load_config(cfg)
    key = run_key(download(resolve_model(cfg["models"][0])).revision, cfg["models"][0], c.expanded_settings()[0], c)
    t = Tracker("test")
    parent = t.parent_run(sid, "stale", {})
    rev = download(resolve_model(cfg["models"][0])).revision
    crashed = t.start_eval(parent, "crashed", {"revision": rev}, {"sweep_id": sid, "run_key": key, "attempt": "dead"})
    t.client.set_tag(crashed, "quantlens.heartbeat", "0")  # died long ago
    sweep_flow(cfg, results_dir=str(env / "results"), aggregate=False)
    assert t.client.get_run(crashed).info.status == "FAILED"
    assert "stale" in t.client.get_run(crashed).data.tags["quantlens.failure"]
    assert len(runs("FINISHED", sid)) == 1


def test_fresh_run_of_another_attempt_is_waited_for_then_taken_over(env):
    """A run RUNNING with a fresh heartbeat belongs to a live attempt: wait; when its beats stop
    (the process was killed), mark it FAILED and evaluate the key here. No duplicate FINISHED run."""
    import time

    from quantlens.flows.sweep import sweep_flow
    from quantlens.model.loading import download, resolve_model
    from quantlens.pipeline.sweep import load_config, run_key, sweep_id
    from quantlens.tasks.tracking import Tracker

    cfg = config(name="takeover", models=[str(MODELS / "tiny-opt")], settings=["W6A16"],
                 datasets=[{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 4}])
    c = load_config(cfg)
    sid = sweep_id(c)
    rev = download(resolve_model(cfg["models"][0])).revision
    key = run_key(rev, cfg["models"][0], c.expanded_settings()[0], c)
    t = Tracker("test")
    parent = t.parent_run(sid, "takeover", {})
    other = t.start_eval(parent, "other", {"revision": rev}, {"sweep_id": sid, "run_key": key, "attempt": "live"})
    t0 = time.monotonic()
    summary = sweep_flow(cfg, aggregate=False)
    waited = time.monotonic() - t0
    assert summary["evaluated"] == 1
    assert t.client.get_run(other).info.status == "FAILED"
    assert waited >= 2.0  # it waited for the heartbeat to go stale instead of duplicating
    assert len(runs("FINISHED", sid)) == 1


def test_identical_work_in_another_sweep_is_reused(filled):
    env = filled
    from quantlens.flows.sweep import sweep_flow

    # same models/settings/datasets as test_failure_then_rerun..., another sweep name
    summary = sweep_flow(config(name="other", settings=["W16A16", "W4A16"]), results_dir=str(env / "results"))
    assert summary["evaluated"] == 0 and summary["skipped"] == 4
    report = (env / "results" / summary["sweep_id"] / "results.csv").read_text().splitlines()
    assert len(report) == 1 + 4  # its report holds the 4 reused runs


def test_force_redoes_everything(env):
    from quantlens.flows.sweep import sweep_flow

    cfg = config(name="force", models=[str(MODELS / "tiny-opt")], settings=["W16A16", "W4A16"],
                 datasets=[{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 2}])
    assert sweep_flow(cfg, aggregate=False)["evaluated"] == 2
    assert sweep_flow(cfg, aggregate=False)["evaluated"] == 0
    assert sweep_flow(cfg, force=True, aggregate=False)["evaluated"] == 2


def test_the_config_is_validated_once_per_sweep(env, monkeypatch):
    """One plan, built once: the sweep flow, its model flows and their steps run the plan; none
    re-validates the config (issue 35)."""
    from quantlens.flows.sweep import sweep_flow
    from quantlens.pipeline.sweep import SweepConfig

    validate, calls = SweepConfig.model_validate, []
    monkeypatch.setattr(SweepConfig, "model_validate", classmethod(lambda cls, *a, **k: calls.append(1) or validate(*a, **k)))
    cfg = config(name="once", models=[str(MODELS / "tiny-opt")], settings=["W16A16", "W4A16"],
                 datasets=[{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 2}])
    assert sweep_flow(cfg, force=True)["evaluated"] == 2
    assert len(calls) == 1


def _cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "quantlens.pipeline.cli", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


def test_cli_bad_config_fails_before_loading(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nmodels: []\nsettings: [W8A8]\ndatasets: [wikitext2]\n")
    r = _cli("run", str(f))
    assert r.returncode == 2
    assert "models: List should have at least 1 item" in r.stderr


def test_cli_dry_run_and_list(filled, tmp_path):
    import yaml

    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(config()))
    r = _cli("run", str(f), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"= {GRID} run(s)" in r.stdout and f"{GRID} done, 0 to run" in r.stdout
    r = _cli("list-settings")
    assert "W4A16-nu" in r.stdout and "p=0.333" in r.stdout and "GPTQ on int4 blocks of 128" in r.stdout


def test_per_example_artifacts_and_analysis_end_to_end(env):
    """Every run stores its examples; the baseline its residual statistics; the report's ρ are the
    ones recomputed from those artifacts; example ids agree across settings and reruns."""
    import numpy as np
    import pandas as pd

    from quantlens.flows.sweep import sweep_flow
    from quantlens.analysis.per_example import pearson
    from quantlens.tasks.tracking import Tracker

    cfg = config(name="per-example", models=[str(MODELS / "tiny-bloom")], settings=["W16A16", "W3A16", "W3A16-nu", "W4A16"])
    summary = sweep_flow(cfg, results_dir=str(env / "results"))
    assert summary["evaluated"] == 4
    t = Tracker("test")
    df = runs("FINISHED", summary["sweep_id"])
    frames = {row["params.setting"]: t.read_frames(row["run_id"], "per_example") for _, row in df.iterrows()}
    assert all(set(f) == {"wikitext2", "lambada"} for f in frames.values())
    ids = {s: list(f["wikitext2"]["example_id"]) for s, f in frames.items()}
    assert len(set(map(tuple, ids.values()))) == 1 and len(ids["W16A16"]) == 8
    assert "correct" in frames["W3A16"]["lambada"] and "tokens" in frames["W16A16"]["wikitext2"]
    base_run = df[df["params.setting"] == "W16A16"]["run_id"].iloc[0]
    res = t.read_frames(base_run, "residual")
    assert set(res) == {"wikitext2", "lambada"} and len(res["wikitext2"]) == 8 * 3

    out = env / "results" / summary["sweep_id"]
    corr = pd.read_csv(out / "error_correlation.csv")
    assert len(corr) == 2 * 3  # 3 quantized settings → 3 pairs, per dataset
    row = corr[(corr["dataset"] == "wikitext2") & (corr["setting_a"] == "W3A16") & (corr["setting_b"] == "W3A16-nu")].iloc[0]
    nll = {s: f["wikitext2"].set_index("example_id")["nll"] for s, f in frames.items()}
    e_a = (nll["W3A16"] - nll["W16A16"]).to_numpy()
    e_b = (nll["W3A16-nu"] - nll["W16A16"]).loc[nll["W3A16"].index].to_numpy()
    assert row["pearson"] == pytest.approx(np.corrcoef(e_a, e_b)[0, 1], abs=1e-9)
    pred = pd.read_csv(out / "residual_predictor.csv")
    assert len(pred) == 2 * 3 * 3  # datasets × settings × layers
    last = res["wikitext2"][res["wikitext2"]["layer"] == 2].set_index("example_id")["r_norm"]
    p = pred[(pred["dataset"] == "wikitext2") & (pred["setting"] == "W3A16") & (pred["layer"] == 2)].iloc[0]
    assert p["rho"] == pytest.approx(pearson(last.loc[nll["W3A16"].index].to_numpy(), e_a), abs=1e-9)
    d = pd.read_csv(out / "d_large_tiny-bloom_wikitext2.csv")
    assert set(d["set"]) == {"large", "ctrl"} and len(d[(d["setting"] == "W3A16") & (d["set"] == "large")]) == 1
    paired = pd.read_csv(out / "paired.csv")
    w3 = paired[(paired["dataset"] == "wikitext2") & (paired["setting"] == "W3A16")].iloc[0]
    assert w3["delta_nll_lo"] > 0 and not w3["covers_zero"]  # W3A16 against W16A16 on WikiText-2: not noise
    from quantlens.analysis.paired import paired_bootstrap

    ref = frames["W16A16"]["wikitext2"]
    self_ = paired_bootstrap(ref["n_tokens"].to_numpy(), ref["nll"].to_numpy(), ref["nll"].to_numpy()[:, None])
    assert self_["delta_nll_lo"][0] == 0 == self_["delta_nll_hi"][0]  # the reference against itself: [0, 0]
    uvn = pd.read_csv(out / "uniform_vs_nonuniform.csv").set_index("setting")  # each Δ inside its own statistic's interval
    for m in ("wikitext2_ppl", "lambada_nll"):
        assert uvn.loc["W3A16-nu", f"{m} Δ lo"] <= uvn.loc["W3A16-nu", f"{m} Δ"] <= uvn.loc["W3A16-nu", f"{m} Δ hi"], m
    kl = t.read_frames(df[df["params.setting"] == "W3A16"]["run_id"].iloc[0], "per_example")["wikitext2"]
    assert (kl["kl"] > 0).all() and "kl" not in frames["W3A16"]["lambada"]  # the KL error: windows, not passages
    for f in ("per_example.md", "fig_residual_predictor.png", "fig_error_corr_tiny-bloom.png", "fig_error_vs_norm_tiny-bloom.png",
              "paired.md", "kl_error.csv", "fig_paired_tiny-bloom_wikitext2.png"):
        assert (out / f).is_file(), f
    assert "calibration-free" in (out / "per_example.md").read_text()
    arts = [a.path for a in t.client.list_artifacts(summary["parent_run_id"], "report")]
    assert "report/error_correlation.csv" in arts
    # a rerun evaluates nothing and the report is the same
    again = sweep_flow(cfg, results_dir=str(env / "results"))
    assert again["evaluated"] == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "error_correlation.csv"), corr)


def test_mechanism_analysis_step_failure_rerun_and_explain(env, monkeypatch):
    """The analysis runs after a model's evaluations; a failed analysis fails the sweep and a rerun
    redoes only it; `all` patched equals W16A16 on D_large; `explain` reuses or redoes it."""
    import math

    import pandas as pd

    from quantlens.flows.sweep import SweepIncomplete, explain_flow, sweep_flow
    from quantlens.tasks.tracking import Tracker

    cfg = config(name="mechanisms", models=[str(MODELS / "tiny-opt")], settings=["W16A16", "W3A16"],
                 datasets=[{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 30}],
                 analysis={"mechanisms": ["W3A16"], "layers": "upper_half", "batch_size": 4})
    monkeypatch.setenv("QUANTLENS_INJECT_FAULT", "tiny-opt:explain-W3A16")
    with pytest.raises(SweepIncomplete, match="explain wikitext2.*injected fault"):
        sweep_flow(cfg, results_dir=str(env / "results"))
    monkeypatch.delenv("QUANTLENS_INJECT_FAULT")
    summary = sweep_flow(cfg, results_dir=str(env / "results"))
    assert summary["evaluated"] == 0 and summary["failed"] == []  # only the analysis was redone
    out = env / "results" / summary["sweep_id"]
    patching = pd.read_csv(out / "patching.csv").set_index("patched")
    assert {"none", "all", "attention", "mlp", "mlp.fc1", "mlp.fc2", "fc1.input", "fc1.weights_16bit", "upper_k_16bit"} <= set(patching.index)
    t = Tracker("test")
    df = runs("FINISHED", summary["sweep_id"])
    ref_run = df[df["params.setting"] == "W16A16"]["run_id"].iloc[0]
    ref = t.read_frames(ref_run, "per_example")["wikitext2"].set_index("example_id")
    d_large = pd.read_csv(out / "d_large_tiny-opt_wikitext2.csv")
    ids = d_large[(d_large["setting"] == "W3A16") & (d_large["set"] == "large")]["example_id"]
    r = ref.loc[ids]
    w16 = math.exp(float((r["nll"] * r["n_tokens"]).sum() / r["n_tokens"].sum()))
    assert patching.loc["all", "ppl"] == pytest.approx(w16, rel=1e-3)
    assert patching.loc["all", "ppl"] < patching.loc["none", "ppl"]
    for f in ("layer_error.csv", "early_exit.csv", "fig_patching.png", "fig_early_exit_tiny-opt.png", "fig_layer_error_tiny-opt.png"):
        assert (out / f).is_file(), f
    assert explain_flow(cfg, results_dir=str(env / "results"))["explained"] == []
    assert explain_flow(cfg, force=True, results_dir=str(env / "results"))["explained"] == ["tiny-opt/W3A16/wikitext2"]


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="needs headless Chromium")
def test_compare_link_opens_mlflows_compare_page_with_exactly_those_runs(filled, capsys, tmp_path):
    """The printed link, opened in a real browser on `mlflow ui` serving the store."""
    import shutil
    import socket
    import time
    import urllib.request

    from quantlens.pipeline.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["compare", "W4A16", "W8A8", "--experiment", "test", "--port", str(port)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    link = out[-1]
    shown = [line.split(" | ")[:2] for line in out if line.startswith("| tiny-")]  # [model, setting] of each run
    assert len(shown) >= 4
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"],
                           "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        dom = subprocess.run([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                              f"--user-data-dir={tmp_path / 'chrome'}", "--dump-dom", link],
                             capture_output=True, text=True, timeout=120).stdout
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    assert f"Comparing {len(shown)} Runs from 1 Experiment" in dom  # every model of the experiment with those runs
    for model, setting in shown:
        assert f"{setting} · {model[2:]}" in dom
    assert "W16A16 · " not in dom


def test_paired_statistics_kl_error_and_the_papers_released_examples(env, tmp_path):
    """A model folder without a tokenizer evaluates the second paper's released token ids (``qerror``);
    the report holds the paired intervals (in paired.csv and uniform_vs_nonuniform), the KL error beside
    the NLL error, and the overlap of our D_large with the released one."""
    import shutil

    import pandas as pd

    from quantlens.flows.sweep import sweep_flow
    from quantlens.evaluation.data import perplexity_windows
    from quantlens.model.loading import load_model
    from quantlens.tasks.tracking import Tracker

    _, tok = load_model(str(MODELS / "tiny-llama"), device="cpu")
    rows = perplexity_windows(tok, "wikitext2", 256, path=str(WIKI_TEST), max_windows=24, use_cache=False)
    released = tmp_path / "released"
    released.mkdir()
    torch.save(rows[:12].clone(), released / "w3-large_error_seqs-10.pt")  # the released layout: [rows, tokens] int64
    torch.save(rows[12:].clone(), released / "w3-nonlarge_error_seqs-10.pt")
    bare = tmp_path / "tiny-llama-no-tokenizer"
    bare.mkdir()
    for f in (MODELS / "tiny-llama").iterdir():
        if f.suffix in (".json", ".safetensors") and not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, bare / f.name)
    cfg = config(name="qerror", models=[str(bare)], settings=["W16A16", "W3A16", "W3A16-nf3", "W4A16"],
                 datasets=[{"name": "qerror", "path": str(released)}], analysis={"statistics": {"resamples": 400, "seed": 1}})
    summary = sweep_flow(cfg, results_dir=str(env / "results"))
    assert summary["evaluated"] == 4 and not summary.get("failed")
    out = env / "results" / summary["sweep_id"]
    paired = pd.read_csv(out / "paired.csv").set_index("setting")
    assert set(paired.index) == {"W3A16", "W3A16-nf3", "W4A16"} and (paired["n_examples"] == 24).all()
    assert paired.loc["W3A16", "delta_nll_lo"] > 0 and not paired.loc["W3A16", "covers_zero"]
    assert "≈0" in (out / "paired.md").read_text() or (~paired["covers_zero"]).all()
    uvn = pd.read_csv(out / "uniform_vs_nonuniform.csv").set_index("setting")
    lo, hi, d = uvn.loc["W3A16-nf3", ["qerror_ppl Δ lo", "qerror_ppl Δ hi", "qerror_ppl Δ"]]
    assert lo <= d <= hi and "[" in (out / "uniform_vs_nonuniform.md").read_text()
    kl = pd.read_csv(out / "kl_error.csv").set_index("setting")
    assert set(kl.index) == {"W3A16", "W3A16-nf3", "W4A16"} and (kl["mean_kl"] > 0).all()
    assert kl.loc["W3A16", "mean_kl"] > kl.loc["W4A16", "mean_kl"] and kl["pearson_kl_error"].between(-1, 1).all()
    overlap = pd.read_csv(out / "released_overlap.csv")
    assert set(overlap["released"]) == {"w3-large_error_seqs-10"} and (overlap["theirs"] == 12).all()
    assert ((overlap["jaccard"] >= 0) & (overlap["jaccard"] <= 1)).all() and overlap["chance"].iloc[0] == pytest.approx(12 / 36)
    df = runs("FINISHED", summary["sweep_id"])
    t = Tracker("test")
    ref_run = df[df["params.setting"] == "W16A16"]["run_id"].iloc[0]
    top = t.read_tensors(ref_run, "kl_reference/qerror.pt")
    assert tuple(top["ids"].shape) == (24, 255, 32)
    w3 = df[df["params.setting"] == "W3A16"].iloc[0]
    assert w3["metrics.qerror_kl"] == pytest.approx(kl.loc["W3A16", "mean_kl"], rel=1e-9)
    assert "released" in t.read_frames(w3["run_id"], "per_example")["qerror"]
    assert (out / "fig_paired_tiny-llama-no-tokenizer_qerror.png").is_file()


def test_a_mixture_of_experts_end_to_end(env, tmp_path):
    """A Mixtral-shaped model through the whole pipeline, read from its checkpoint block by block
    (placement: stream; the checkpoint stores one matrix per expert): every targeted weight quantized
    (coverage 1.0, the routers left out of the blocks' share), router flips 0 for the reference and
    growing from W8A8 to W3A16, the report's flips per layer and each expert's load and ‖Δ‖₂."""
    import shutil

    import pandas as pd
    from transformers import AutoModelForCausalLM, MixtralConfig

    from quantlens.flows.sweep import sweep_flow

    vocab = json.loads((MODELS / "tiny-llama" / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256))
    folder = tmp_path / "tiny-mixtral"
    model.save_pretrained(folder)
    for f in (MODELS / "tiny-llama").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    cfg = config(name="moe", models=[str(folder)], settings=["W16A16", "W8A8", "W3A16"],
                 datasets=[{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 8}],
                 hardware={"device": "cpu", "placement": "stream"})
    summary = sweep_flow(cfg, results_dir=str(env / "results"))
    assert summary["evaluated"] == 3 and not summary.get("failed")
    by = runs("FINISHED", summary["sweep_id"]).set_index("params.setting")
    for s in ("W8A8", "W3A16"):
        assert by.loc[s, "metrics.coverage_targeted"] == 1.0
        assert 0.98 < by.loc[s, "metrics.coverage_block"] < 1.0  # 8 × 64 router weights per layer stay 16-bit
        assert by.loc[s, "metrics.coverage_16bit_routers"] == pytest.approx(1 - by.loc[s, "metrics.coverage_block"])
    flips = by["metrics.wikitext2_router_flips"]
    assert pd.isna(flips["W16A16"]) and 0 < flips["W8A8"] < flips["W3A16"]
    out = env / "results" / summary["sweep_id"]
    table = pd.read_csv(out / "router_flips.csv")
    assert set(table["setting"]) == {"W8A8", "W3A16"} and sorted(set(table["layer"])) == [0, 1, 2]
    assert table.groupby("setting")["flips"].mean()["W3A16"] == pytest.approx(flips["W3A16"])
    load = pd.read_csv(out / "expert_load.csv")
    w3 = load[load["setting"] == "W3A16"]
    assert len(w3) == 3 * 8 and (w3["delta_l2"] > 0).all()
    assert w3.groupby("layer")["load"].sum().round(9).eq(1).all() and w3["load_reference"].notna().all()
    assert (out / "fig_router_flips_tiny-mixtral.png").is_file()


def test_gptq_calibrated_in_the_sweep_and_cached(env, tmp_path):
    """W4A16-g32-gptq next to its RTN twin: calibrated layer by layer on WikiText-2's valid split (the
    run's params say on what), perplexity below RTN's, its per-example errors in error_correlation,
    and the noise run matched to it calibrates nothing (GPTQ's weights come from the cache)."""
    import pandas as pd

    from quantlens.flows.sweep import sweep_flow

    noise = {"base": "W4A16-g32-gptq", "perturbation": {"target": "weights", "seed": 0}}
    cfg = config(name="gptq", models=[str(MODELS / "tiny-llama")], settings=["W16A16", "W4A16-g32", "W4A16-g32-gptq", noise, "W4A16-g32-awq"],
                 datasets=[{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 8}],
                 calibration={"path": str(WIKI_TEST.parent / "valid.txt"), "samples": 16, "seqlen": 128})
    summary = sweep_flow(cfg, results_dir=str(env / "results"))
    assert summary["evaluated"] == 5 and not summary.get("failed")
    by = runs("FINISHED", summary["sweep_id"]).set_index("params.setting")
    g = by.loc["W4A16-g32-gptq"]
    assert by.loc["W4A16-g32-awq", "params.method"] == "awq" and by.loc["W4A16-g32-awq", "tags.quantlens.calibration_cached"] == "false"
    assert g["params.method"] == "gptq" and g["params.format"] == "gptq" and by.loc["W4A16-g32", "params.method"] == "rtn"
    assert g["params.calibration_samples"] == "16" and g["params.calibration_path"].endswith("valid.txt")
    assert g["tags.quantlens.calibration_cached"] == "false"
    assert by.loc["W16A16", "metrics.wikitext2_ppl"] < g["metrics.wikitext2_ppl"] < by.loc["W4A16-g32", "metrics.wikitext2_ppl"]
    out = env / "results" / summary["sweep_id"]
    corr = pd.read_csv(out / "error_correlation.csv")
    assert ((corr["setting_a"] == "W4A16-g32-gptq") | (corr["setting_b"] == "W4A16-g32-gptq")).any()
    # the lens: GPTQ, its RTN twin and noise of GPTQ's own per-layer variance, side by side
    lens = pd.read_csv(out / "calibrated_lens.csv")
    assert set(lens[lens["calibrated"] == "W4A16-g32-awq"]["role"]) == {"awq", "rtn"}
    lens = lens[lens["calibrated"] == "W4A16-g32-gptq"].set_index("role")
    assert set(lens.index) == {"gptq", "rtn", "noise ~ gptq"}
    noise_run = by[by["params.base"] == "W4A16-g32-gptq"].iloc[0]
    assert noise_run["metrics.weight_rel_error_mean"] == pytest.approx(g["metrics.weight_rel_error_mean"], rel=1e-3)
    assert lens.loc["noise ~ gptq", "wikitext2_ppl"] == pytest.approx(noise_run["metrics.wikitext2_ppl"])
    assert "## tiny-llama" in (out / "calibrated_lens.md").read_text()
    # the noise run needs GPTQ's weights too: the calibration step read them from the cache
    assert noise_run["tags.quantlens.calibration_cached"] == "true" and noise_run["params.calibration_samples"] == "16"


@pytest.fixture(scope="module")
def released_checkpoints(tmp_path_factory):
    """GPTQ (4-bit, g32, act-order) checkpoints of tiny-llama and tiny-opt and an AWQ one of tiny-llama
    with its scales folded into the norms, in the layouts checked against AutoGPTQ / AutoAWQ (test_released)."""
    from quantlens.checkpoints.export import write_quantized
    from quantlens.model.loading import load_model

    d = tmp_path_factory.mktemp("released")
    out = {}
    for fam in ("llama", "opt"):
        model, _ = load_model(str(MODELS / f"tiny-{fam}"), device="cpu")
        out[f"gptq-{fam}"] = write_quantized(model, d / f"tiny-{fam}-gptq", "gptq", bits=4, group_size=32, sym=False, act_order=True)
        if fam == "llama":
            out["awq-llama"] = write_quantized(model, d / "tiny-llama-awq", "awq", group_size=32, fold=True)
    return out


def test_released_checkpoints_are_settings_of_their_models(env, released_checkpoints):
    """A released GPTQ checkpoint per model and an AWQ one of tiny-llama only, beside RTN: each read into
    its model, evaluated like any setting (params say what the checkpoint holds), in error_correlation
    and the calibrated lens (with noise matched to the checkpoint's own Δ)."""
    import pandas as pd

    from quantlens.flows.sweep import sweep_flow

    ck = {k: str(v) for k, v in released_checkpoints.items()}
    gptq = {"tiny-llama": ck["gptq-llama"], "tiny-opt": ck["gptq-opt"]}
    settings = ["W16A16", "W4A16-g32", {"name": "gptq4-ck", "checkpoint": gptq},
                {"name": "awq4-ck", "checkpoint": {"tiny-llama": ck["awq-llama"]}},
                {"name": "gptq4-ck-noise", "checkpoint": {"tiny-llama": ck["gptq-llama"]}, "perturbation": {"target": "weights"}}]
    cfg = config(name="released", settings=settings, datasets=[{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 4}])
    summary = sweep_flow(cfg, results_dir=str(env / "results"))
    assert summary["evaluated"] == 3 + 5 and not summary.get("failed"), summary
    df = runs("FINISHED", summary["sweep_id"])
    llama = df[df["params.model"] == "tiny-llama"].set_index("params.setting")
    g = llama.loc["gptq4-ck"]
    assert (g["params.method"], g["params.checkpoint_layout"], g["params.w_bits"], g["params.w_group_size"]) == ("gptq", "gptq-v1", "4", "32")
    assert g["params.checkpoint"] == ck["gptq-llama"] and g["params.checkpoint_commit"].startswith("local-")
    assert g["metrics.coverage_targeted"] == 1.0 and g["metrics.coverage_block"] == 1.0
    assert llama.loc["awq4-ck", "params.checkpoint_changed_tensors"] == "6"  # AWQ's folded norms, read too
    assert pd.isna(llama.loc["awq4-ck", "metrics.weight_rel_error_mean"])  # its weights are rescaled: no Ŵ − W to report
    assert llama.loc["awq4-ck", "tags.quantlens.weight_error"].startswith("not comparable")
    for name in ("gptq4-ck", "awq4-ck"):
        assert llama.loc["W16A16", "metrics.wikitext2_ppl"] * 0.98 < llama.loc[name, "metrics.wikitext2_ppl"] < 2 * llama.loc["W16A16", "metrics.wikitext2_ppl"]
    noise = llama.loc["gptq4-ck-noise"]
    assert noise["metrics.weight_rel_error_mean"] == pytest.approx(g["metrics.weight_rel_error_mean"], rel=1e-3)
    opt = df[df["params.model"] == "tiny-opt"]
    assert sorted(opt["params.setting"]) == ["W16A16", "W4A16-g32", "gptq4-ck"]  # no AWQ checkpoint of tiny-opt: not its setting
    assert opt.set_index("params.setting").loc["gptq4-ck", "params.checkpoint"] == ck["gptq-opt"]
    out = env / "results" / summary["sweep_id"]
    corr = pd.read_csv(out / "error_correlation.csv")
    assert ((corr["setting_a"] == "awq4-ck") | (corr["setting_b"] == "awq4-ck")).any()
    lens = pd.read_csv(out / "calibrated_lens.csv")
    roles = set(lens[(lens["model"] == "tiny-llama") & (lens["calibrated"] == "gptq4-ck")]["role"])
    assert {"gptq (checkpoint)", "noise ~ gptq (checkpoint)"} <= roles, roles


def test_preflight_refuses_a_checkpoint_of_another_model_a_corrupt_one_and_an_unknown_format(released_checkpoints, tmp_path):
    import shutil

    from quantlens.pipeline.errors import PreflightError
    from quantlens.pipeline.preflight import preflight
    from quantlens.pipeline.sweep import load_config

    corrupt = shutil.copytree(released_checkpoints["gptq-llama"], tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 3])
    unknown = shutil.copytree(released_checkpoints["gptq-llama"], tmp_path / "unknown")
    c = json.loads((unknown / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "hqq", "nbits": 4}
    (unknown / "config.json").write_text(json.dumps(c))
    settings = ["W16A16", {"name": "other", "checkpoint": str(released_checkpoints["gptq-opt"])},
                {"name": "broken", "checkpoint": str(corrupt)}, {"name": "hqq", "checkpoint": str(unknown)},
                {"name": "absent", "checkpoint": str(tmp_path / "nowhere")}]
    cfg = load_config(config(name="refusals", models=[str(MODELS / "tiny-llama")], settings=settings,
                             datasets=[{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 2}]))
    with pytest.raises(PreflightError) as e:
        preflight(cfg)
    lines = str(e.value).splitlines()
    assert len(lines) == 4, lines  # every refusal at once, one line each
    assert any(ln.startswith("setting other on model") and "another model" in ln for ln in lines), lines
    assert any(ln.startswith("setting broken:") and "not a readable safetensors file" in ln for ln in lines), lines
    assert any(ln.startswith("setting hqq:") and "'hqq' is not one quantlens reads" in ln for ln in lines), lines
    assert any(ln.startswith("setting absent:") and "no such directory" in ln for ln in lines), lines
    with pytest.raises(Exception, match="not a model of this sweep"):
        load_config(config(name="typo", models=[str(MODELS / "tiny-llama")],
                           settings=["W16A16", {"name": "x", "checkpoint": {"tiny-lama": str(released_checkpoints["gptq-llama"])}}]))


def test_a_sharded_model_evaluates_the_reference_once_and_equals_the_unsharded_sweep(env):
    """`shards: 2`: the model's settings over two model flow runs (here in turn), each loading the
    model once; the reference runs once and the other shard reads its top-k back for the KL error.
    The sweep and its run keys are the unsharded sweep's: its numbers equal, bit for bit."""
    from quantlens.flows.sweep import sweep_flow
    from quantlens.pipeline.sweep import load_config, sweep_id
    from quantlens.pipeline.sweep_plan import build_plan

    settings = ["W16A16", "W4A16", "W8A8", "W3A16"]
    cfg = config(name="sharded", models=[str(MODELS / "tiny-opt")], settings=settings,
                 datasets=[{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 5}], shards=2)
    plan = build_plan(cfg)
    parts = plan.models[0].parts()
    assert [[s.name for s in p.settings] for p in parts] == [["W16A16", "W4A16", "W3A16"], ["W16A16", "W8A8"]]
    assert any("2 shards" in line for line in plan.lines()) and any(line.startswith("critical path") for line in plan.lines())

    summary = sweep_flow(cfg, aggregate=False)
    assert summary["evaluated"] == 4 and summary["failed"] == []
    sid = sweep_id(load_config(cfg))
    fin = runs("FINISHED", sid).set_index("params.setting")
    assert sorted(fin.index) == sorted(settings)  # each once, the reference too
    assert (fin.drop(index="W16A16")["metrics.wikitext2_kl"] > 0).all()  # shard 2 read the reference back

    plain = {k: v for k, v in cfg.items() if k != "shards"}
    assert sweep_id(load_config(plain)) == sid and sweep_flow(plain, aggregate=False)["evaluated"] == 0  # one sweep, same runs
    assert sweep_flow(plain, force=True, aggregate=False)["evaluated"] == 4
    again = runs("FINISHED", sid)
    again = again[~again["run_id"].isin(fin["run_id"])].set_index("params.setting")
    for m in ("metrics.wikitext2_ppl", "metrics.wikitext2_kl"):
        assert again[m].drop(index="W16A16", errors="ignore").to_dict() == fin[m].drop(index="W16A16").to_dict(), m


def test_the_console_line_names_what_stayed_16_bit_and_a_hybrids_kv_blocks():
    from quantlens.flows.sweep import coverage_note

    assert coverage_note({}) == ""
    assert coverage_note({"coverage_targeted": 1.0, "coverage_block": 1.0}) == ", weights 100% of targeted / 100.0% of block"
    moe = {"coverage_targeted": 1.0, "coverage_block": 0.9875, "coverage_16bit_routers": 0.0125}
    assert coverage_note(moe) == ", weights 100% of targeted / 98.8% of block (16-bit: routers 1.2%)"
    hybrid = {"coverage_targeted": 1.0, "coverage_block": 0.97, "coverage_16bit_mixer_states": 0.02, "coverage_16bit_routers": 0.01,
              "kv_cache_blocks": 2.0, "kv_cache_share": 0.25}
    assert coverage_note(hybrid) == (", weights 100% of targeted / 97.0% of block (16-bit: mixer states 2.0%, routers 1.0%), "
                                     "KV cache in 2 of 8 blocks (the attention ones)")
    assert coverage_note({"kv_cache_blocks": 12.0, "kv_cache_share": 1.0}) == ""  # every block attends: nothing to say
