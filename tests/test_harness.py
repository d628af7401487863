"""lm-evaluation-harness tasks on a patched model: equal to lm-eval's own run, per example, in a sweep.

The tasks are written here from the shared Lambada file (offline): one loglikelihood task (the
last word) and one multiple-choice task (the last word against three fixed distractors)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import LAMBADA, MODELS, REPO

LIMIT = 24
TASKS = ["ql_lambada", "ql_lambada_mc"]


def write_tasks(folder):
    folder.mkdir(parents=True, exist_ok=True)
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(LAMBADA)}}, "test_split": "test",
              "doc_to_text": "{{context}}", "metadata": {"version": 1.0}}
    (folder / "ql_lambada.yaml").write_text(yaml.safe_dump({
        "task": "ql_lambada", **common, "output_type": "loglikelihood", "doc_to_target": " {{continuation}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    (folder / "ql_lambada_mc.yaml").write_text(yaml.safe_dump({
        "task": "ql_lambada_mc", **common, "output_type": "multiple_choice",
        "doc_to_choice": "{{[continuation, 'the', 'it', 'him']}}", "doc_to_target": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}))
    return folder


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm_tasks"))


def lm_evals_own(model, tok, tasks_dir, limit=LIMIT):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from quantlens.evaluation.harness import sequential_bootstrap, task_manager  # lm-eval's own TaskManager, built once

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu")
    with sequential_bootstrap():  # no forked pool from this threaded test process
        return lm_eval.simple_evaluate(model=lm, tasks=TASKS, limit=limit, task_manager=task_manager(str(tasks_dir)))


def test_task_metric_names_follow_lm_eval():
    from quantlens.evaluation.harness import task_metrics

    got = task_metrics({"hellaswag": {"alias": "hellaswag", "acc,none": 0.5, "acc_stderr,none": 0.01, "acc_norm,none": 0.6},
                        "gsm8k": {"exact_match,strict-match": 0.3, "exact_match_stderr,strict-match": "N/A"}})
    assert got == {"hellaswag_acc": 0.5, "hellaswag_acc_stderr": 0.01, "hellaswag_acc_norm": 0.6, "gsm8k_exact_match_strict-match": 0.3}


def test_values_equal_lm_evals_own_run_on_the_patched_model(tasks_dir):
    from quantlens.evaluation.harness import evaluate_tasks
    from quantlens.model.loading import load_model
    from quantlens.quantize.patch import quantize_, restore_

    model, tok = load_model(str(MODELS / "tiny-opt"), device="cpu", placement="single")
    quantize_(model, "W4A8")
    try:
        ours = evaluate_tasks(model, tok, TASKS, limit=LIMIT, include_path=str(tasks_dir))
        theirs = lm_evals_own(model, tok, tasks_dir)["results"]
        again = evaluate_tasks(model, tok, ["ql_lambada_mc"], limit=LIMIT, include_path=str(tasks_dir), residual=True)
    finally:
        restore_(model)
    # residual statistics of the gold passages, under the documents' ids; the numbers do not move
    res, with_tokens = again["residual"]["ql_lambada_mc"], again["per_example"]["ql_lambada_mc"]
    assert set(res["example_id"]) == set(with_tokens["example_id"]) and res["layer"].nunique() == model.config.num_hidden_layers
    assert with_tokens.drop(columns="tokens").equals(ours["per_example"]["ql_lambada_mc"])
    m = ours["metrics"]
    assert m["ql_lambada_acc"] == theirs["ql_lambada"]["acc,none"]
    assert m["ql_lambada_perplexity"] == pytest.approx(theirs["ql_lambada"]["perplexity,none"], rel=1e-4)
    assert m["ql_lambada_perplexity_stderr"] == pytest.approx(theirs["ql_lambada"]["perplexity_stderr,none"], rel=1e-4)  # same bootstrap
    assert m["ql_lambada_mc_acc"] == theirs["ql_lambada_mc"]["acc,none"] and m["ql_lambada_mc_acc_norm"] == theirs["ql_lambada_mc"]["acc_norm,none"]
    assert m["ql_lambada_mc_acc_stderr"] == pytest.approx(theirs["ql_lambada_mc"]["acc_stderr,none"])
    assert 0 < m["ql_lambada_mc_acc"] < 1  # the multiple-choice task discriminates on the trained model
    ll, mc = ours["per_example"]["ql_lambada"], ours["per_example"]["ql_lambada_mc"]
    assert len(ll) == len(mc) == LIMIT and ll["example_id"].is_unique and list(ll["example_id"]) == list(mc["example_id"])
    # per-example NLL is per token of the gold continuation: n_tokens × nll is its log-likelihood, so
    # lm-eval's document perplexity exp(−mean log-likelihood) comes back from the table
    assert math.exp((ll["nll"] * ll["n_tokens"]).mean()) == pytest.approx(m["ql_lambada_perplexity"], rel=1e-9)
    assert ll["correct"].mean() == m["ql_lambada_acc"] and mc["correct"].mean() == m["ql_lambada_mc_acc"]
    assert ((mc["chosen"] == 0) == (mc["correct"] == 1)).all()  # gold is choice 0
    assert (ll["chosen"] == -1).all() and (ll["n_tokens"] >= 1).all()


def test_lm_eval_entries_are_validated():
    from quantlens.pipeline.sweep import load_config
    from quantlens.quantize.settings import ConfigError

    base = {"name": "t", "models": [str(MODELS / "tiny-opt")], "settings": ["W16A16"]}
    with pytest.raises(ConfigError, match="lm-eval: give tasks"):
        load_config({**base, "datasets": [{"name": "lm-eval"}]})
    with pytest.raises(ConfigError, match="tasks: only with name: lm-eval"):
        load_config({**base, "datasets": [{"name": "wikitext2", "tasks": ["arc_easy"]}]})
    with pytest.raises(ConfigError, match="lm-eval: max_windows do not apply"):
        load_config({**base, "datasets": [{"name": "lm-eval", "tasks": ["arc_easy"], "max_windows": 3}]})
    cfg = load_config({**base, "datasets": [{"name": "wikitext2"}, {"name": "lm-eval", "tasks": ["arc_easy"]}]})
    assert cfg.analysis_datasets() == ["wikitext2"]


def cli(*args, env=None, timeout=600):
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "quantlens.pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=full, timeout=timeout)


def sweep_yaml(tmp_path, tasks_dir, **over):
    cfg = {"name": "tasks", "experiment": "tasks", "models": [str(MODELS / "tiny-opt"), str(MODELS / "tiny-llama")],
           "settings": ["W16A16", "W4A16", "W3A16"],
           "datasets": [{"name": "lm-eval", "tasks": TASKS, "include_path": str(tasks_dir), "limit": LIMIT}],
           "eval": {"seqlen": 128, "batch_size": 8}, "hardware": {"device": "cpu"}}
    cfg.update(over)
    f = tmp_path / "tasks.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def test_unknown_task_and_stream_fail_in_preflight(tmp_path, tasks_dir):
    from quantlens.pipeline.errors import PreflightError
    from quantlens.pipeline.preflight import preflight
    from quantlens.pipeline.sweep import load_config

    bad = sweep_yaml(tmp_path, tasks_dir, datasets=[{"name": "lm-eval", "tasks": ["ql_lambada_mcc"], "include_path": str(tasks_dir)}])
    with pytest.raises(PreflightError) as err:
        preflight(load_config(bad))
    assert str(err.value) == ("lm-eval: unknown task(s) 'ql_lambada_mcc' (did you mean 'ql_lambada_mc'?); `lm-eval ls tasks` lists "
                              "them, include_path adds your own")
    with pytest.raises(PreflightError, match="use placement: single or device_map for a sweep with tasks"):
        preflight(load_config(sweep_yaml(tmp_path, tasks_dir, hardware={"device": "cpu", "placement": "stream"})))
    missing = sweep_yaml(tmp_path, tasks_dir, datasets=[{"name": "lm-eval", "tasks": TASKS, "include_path": str(tmp_path / "nope")}])
    with pytest.raises(PreflightError, match="include_path .* is not a folder"):
        preflight(load_config(missing))
    preflight(load_config(sweep_yaml(tmp_path, tasks_dir)))  # the good one passes


def test_sweep_with_tasks_matches_lm_eval_and_feeds_the_per_example_analysis(tmp_path, tasks_dir):
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "QUANTLENS_CACHE": str(tmp_path / "cache")}
    r = cli("run", str(sweep_yaml(tmp_path, tasks_dir)), "--results", str(tmp_path / "results"), env=store)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    os.environ.update(store)  # read the store the sweep wrote
    try:
        from quantlens.analysis.aggregate import tidy
        from quantlens.tasks.tracking import Tracker

        t = Tracker("tasks")
        runs = tidy(t.runs_frame())
        assert len(runs) == 6
        for _, row in runs.iterrows():
            frames = t.read_frames(row["run_id"], "per_example")
            assert sorted(frames) == TASKS
            for task in TASKS:
                assert frames[task]["correct"].mean() == row[f"{task}_acc"] and len(frames[task]) == LIMIT
            assert {"ql_lambada_perplexity", "ql_lambada_perplexity_stderr", "ql_lambada_mc_acc_norm"} <= set(row.index)
            inputs = {d.dataset.name for d in t.client.get_run(row["run_id"]).inputs.dataset_inputs}
            assert inputs == set(TASKS)
        # the logged numbers are lm-eval's own on the same patched model
        from quantlens.model.loading import load_model
        from quantlens.quantize.patch import quantize_

        model, tok = load_model(str(MODELS / "tiny-llama"), device="cpu", placement="single")
        quantize_(model, "W3A16")
        theirs = lm_evals_own(model, tok, tasks_dir)["results"]
        row = runs[(runs["model"] == "tiny-llama") & (runs["setting"] == "W3A16")].iloc[0]
        assert row["ql_lambada_mc_acc"] == theirs["ql_lambada_mc"]["acc,none"] and row["ql_lambada_acc"] == theirs["ql_lambada"]["acc,none"]
        assert row["ql_lambada_perplexity"] == pytest.approx(theirs["ql_lambada"]["perplexity,none"], rel=1e-4)
    finally:
        for k in store:
            os.environ.pop(k, None)
    report = next((tmp_path / "results").iterdir())
    corr = pd.read_csv(report / "error_correlation.csv")
    assert set(corr["dataset"]) == set(TASKS) and len(corr) == 2 * 2 * 1  # per model and task: the one pair W4A16 × W3A16
    pred = pd.read_csv(report / "residual_predictor.csv")  # the reference runs kept residual statistics of the task examples
    assert set(pred["dataset"]) == set(TASKS)
    flips = pd.read_csv(report / "flips.csv")
    assert set(flips["dataset"]) == set(TASKS) and len(flips) == 2 * 2 * 2
    assert ((flips["acc"] - flips["acc_reference"]) * flips["examples"]).round().astype(int).tolist() == flips["net"].tolist()
