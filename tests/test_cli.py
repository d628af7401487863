"""The command line as a user meets it: preflight before any work, quiet output, true summaries."""

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
import yaml

from conftest import MODELS, REPO, WIKI_TEST


def cli(*args, env=None, cwd=REPO, timeout=300):
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "quantlens.pipeline.cli", *args], cwd=cwd, capture_output=True, text=True, env=full, timeout=timeout)


def write(tmp_path, **cfg):
    base = {"name": "cli", "experiment": "cli", "models": [str(MODELS / "tiny-opt")], "settings": ["W16A16", "W4A16"],
            "datasets": [{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 4}],
            "eval": {"seqlen": 128, "batch_size": 4}, "hardware": {"device": "cpu"}}
    base.update(cfg)
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(base))
    return f


@pytest.fixture
def store(tmp_path):
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "QUANTLENS_CACHE": str(tmp_path / "cache")}


def store_file(store) -> Path:
    """The test store's database: absent until the CLI opens the tracking store, which it does only
    after preflight (so a preflight answer leaves none: no Prefect, no model, no run)."""
    return Path(store["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))


def store_runs(store) -> list[tuple]:
    """(run id, status, end time, lifecycle stage) of every run in the store: a command that
    evaluates nothing and starts no flow leaves them all as they were (a flow at least reopens and
    closes the sweep's parent run, a new end time)."""
    with closing(sqlite3.connect(store_file(store))) as db:
        return sorted(db.execute("SELECT run_uuid, status, end_time, lifecycle_stage FROM runs"))


def nothing_run(r, before, store) -> None:
    """The rerun answered from the ledger: it says so, starts no flow (the plan and the "to evaluate"
    line are printed only when it does) and leaves every run in the store as it was."""
    assert r.returncode == 0 and "nothing to evaluate" in r.stdout, r.stdout + r.stderr
    assert "to evaluate" not in r.stderr and "plan for" not in r.stdout + r.stderr, r.stderr
    assert store_runs(store) == before


def test_absent_local_model_path_fails_in_seconds_with_one_line(tmp_path, store):
    r = cli("run", str(write(tmp_path, models=["/data/llama-7b-typo"])), env=store)
    assert r.returncode == 2
    assert r.stderr.strip() == "quantlens: model '/data/llama-7b-typo': no such directory"
    assert "Traceback" not in r.stderr + r.stdout and r.stdout == ""
    assert not store_file(store).exists()  # answered in preflight, before the store, Prefect or a model


def test_typo_hub_id_offline_fails_in_preflight(tmp_path, store):
    r = cli("run", str(write(tmp_path, models=["facebook/opt-125mm"])), env={**store, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 4
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'facebook/opt-125mm' is not in the local Hugging Face cache and the hub is offline" in lines[0]
    assert not store_file(store).exists()  # no download retries, no store, no flow: preflight answered


def test_missing_dataset_file_fails_in_preflight(tmp_path, store):
    r = cli("run", str(write(tmp_path, datasets=[{"name": "wikitext2", "path": str(tmp_path / "nope.txt")}])), env=store)
    assert r.returncode == 2 and "dataset wikitext2: dataset path" in r.stderr and "no such file" in r.stderr


def test_quiet_run_failure_line_rerun_and_verbose(tmp_path, store):
    cfg = write(tmp_path)
    r = cli("run", str(cfg), env={**store, "QUANTLENS_INJECT_FAULT": "tiny-opt:W4A16"})
    out = r.stdout + r.stderr
    assert r.returncode == 3, out
    assert "Traceback" not in out and "telemetry" not in out.lower()
    assert len(out.strip().splitlines()) <= 8, out
    failed = [line for line in out.splitlines() if "tiny-opt/W4A16 FAILED" in line]
    assert len(failed) == 1 and "injected fault" in failed[0] and "artifact failure.log of MLflow run" in failed[0]
    assert "1 evaluated, 0 already finished, 1 run(s) failed, 0 not run" in out

    r = cli("run", str(cfg), "--dry-run", env=store)
    assert r.returncode == 0 and "1 done, 1 to run" in r.stdout and "todo (failed last time)" in r.stdout

    r = cli("run", str(cfg), "-v", env=store)
    assert r.returncode == 0, r.stderr
    assert "sweep cli-" in r.stdout and "1 evaluated, 1 already finished, 0 failed, 0 not run" in r.stdout
    assert "wikitext2: 4/4 (100%)" in r.stdout + r.stderr  # per-batch progress only with --verbose

    before = store_runs(store)
    nothing_run(cli("run", str(cfg), env=store), before, store)


def test_a_model_that_fails_before_evaluating_is_counted_as_not_run(tmp_path, store):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "opt"}))  # no weights (a tokenizer: preflight wants one for text)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (broken / f).write_bytes((MODELS / "tiny-opt" / f).read_bytes())
    r = cli("run", str(write(tmp_path, models=[str(broken)])), env=store)
    out = r.stdout + r.stderr
    assert r.returncode == 3, out
    assert "0 evaluated, 0 already finished, 1 run(s) failed, 2 not run" in out


def test_flows_and_tasks_are_not_top_level_packages(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import flows"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'flows'" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import tasks"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'tasks'" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import quantlens.flows.sweep, quantlens.tasks.ledger, quantlens.pipeline.cli"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_only_transient_tracking_errors_are_retried(monkeypatch):
    from quantlens.tasks import tracking

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def bad():
        calls.append(1)
        raise TypeError("unexpected keyword argument 'x'")

    with pytest.raises(TypeError):
        tracking._retry(bad, "x")
    assert len(calls) == 1  # permanent: raised at once

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionError("Connection refused")
        return "ok"

    calls.clear()
    assert tracking._retry(flaky, "x") == "ok" and len(calls) == 4
    assert tracking.is_transient(RuntimeError("(sqlite3.OperationalError) database is locked"))
    assert tracking.is_transient(RuntimeError("API request failed with status code 503"))
    assert not tracking.is_transient(RuntimeError("RESOURCE_DOES_NOT_EXIST: Run 'ab503cd' not found"))

    def race():  # two runs logging one dataset at once: the loser's retry finds the row
        calls.append(1)
        if len(calls) < 2:
            raise RuntimeError("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")
        return "ok"

    calls.clear()
    with pytest.raises(RuntimeError, match="UNIQUE constraint"):
        tracking._retry(race, "x")  # not transient in general
    assert tracking._retry(race, "x", also=("UNIQUE constraint failed: datasets",)) == "ok" and len(calls) == 2


def test_kv_sweep_keeps_w16a16_as_reference_and_the_report_is_a_step_that_can_fail(tmp_path, store):
    """The KV grid of issue #17: KV16 is the W16A16 run, the per-example errors are against W16A16
    (never against a KV run), and a report that fails is one line per part, exit 3, evaluations
    kept; the rerun completes the report without evaluating anything."""
    import numpy as np
    import pandas as pd

    cfg = write(tmp_path, settings=["W16A16", "W16A16KV16", "W16A16KV8", "W16A16KV4", "W16A16KV2"],
                datasets=[{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 6}])
    results = tmp_path / "results"
    r = cli("run", str(cfg), "--results", str(results), env={**store, "QUANTLENS_INJECT_FAULT": "report"})
    out = r.stdout + r.stderr
    assert r.returncode == 3, out
    assert "Traceback" not in out
    assert "W16A16KV16: the same computation as W16A16, evaluated once as W16A16" in out
    assert "4 evaluated, 0 already finished, 0 run(s) failed, 0 not run" in out
    failed = [line.strip() for line in out.splitlines() if "injected fault in report part" in line]
    assert failed == ["results: RuntimeError: injected fault in report part results (QUANTLENS_INJECT_FAULT)"], out
    (report,) = list(results.iterdir())
    assert json.loads((report / "report.json").read_text())["complete"] is False
    assert (report / "error_correlation.csv").is_file() and not (report / "results.csv").exists()  # the other parts were written

    r = cli("run", str(cfg), "--results", str(results), env=store)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 evaluated, 4 already finished, 0 failed, 0 not run" in r.stdout and f"report in {report}/" in r.stdout
    assert json.loads((report / "report.json").read_text())["complete"] is True and (report / "results.csv").is_file()
    before, written = store_runs(store), {f.name: f.stat().st_mtime_ns for f in report.iterdir()}
    r = cli("run", str(cfg), "--results", str(results), env=store)
    nothing_run(r, before, store)
    assert f"report in {report}/" in r.stdout
    assert {f.name: f.stat().st_mtime_ns for f in report.iterdir()} == written  # the complete report is not made again

    # every ρ is the one recomputed from the per-example artifacts against W16A16
    from quantlens.tasks.tracking import Tracker

    os.environ["MLFLOW_TRACKING_URI"] = store["MLFLOW_TRACKING_URI"]
    try:
        runs = Tracker("cli").runs_frame(None)
        frames = {row["params.setting"]: Tracker("cli").read_frames(row["run_id"], "per_example")["wikitext2"].set_index("example_id")["nll"]
                  for _, row in runs.iterrows()}
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert sorted(frames) == ["W16A16", "W16A16KV2", "W16A16KV4", "W16A16KV8"]
    assert runs[runs["params.setting"] == "W16A16"]["params.reference"].iloc[0] == "True"
    corr = pd.read_csv(report / "error_correlation.csv")
    assert len(corr) == 3 and "W16A16" not in set(corr["setting_a"]) | set(corr["setting_b"])
    for _, row in corr.iterrows():
        e_a, e_b = frames[row["setting_a"]] - frames["W16A16"], frames[row["setting_b"]] - frames["W16A16"]
        assert row["pearson"] == pytest.approx(np.corrcoef(e_a, e_b.loc[e_a.index])[0, 1], abs=1e-9)
    assert (report / "fig_error_vs_norm_tiny-opt.png").is_file()


def test_stored_names_do_not_follow_module_paths():
    """Tags already in users' stores keep their names whatever the package layout."""
    from quantlens.tasks.tracking import KIND_TAG, sweep_tag

    assert sweep_tag("demo-1") == "quantlens.sweep.demo-1" and KIND_TAG == "quantlens.kind"
