"""The command line as a user meets it: preflight in seconds, quiet output, true summaries."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import MODELS, REPO, WIKI_TEST


def cli(*args, env=None, cwd=REPO, timeout=300):
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "quantlens.pipeline.cli", *args], cwd=cwd, capture_output=True, text=True, env=full, timeout=timeout)
    return r, time.monotonic() - t


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


def test_absent_local_model_path_fails_in_seconds_with_one_line(tmp_path, store):
    r, secs = cli("run", str(write(tmp_path, models=["/data/llama-7b-typo"])), env=store)
    assert r.returncode == 2 and secs < 5
    assert r.stderr.strip() == "quantlens: model '/data/llama-7b-typo': no such directory"
    assert "Traceback" not in r.stderr + r.stdout


def test_typo_hub_id_offline_fails_in_preflight(tmp_path, store):
    r, secs = cli("run", str(write(tmp_path, models=["facebook/opt-125mm"])), env={**store, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 4 and secs < 10
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'facebook/opt-125mm' is not in the local Hugging Face cache and the hub is offline" in lines[0]


def test_missing_dataset_file_fails_in_preflight(tmp_path, store):
    r, _ = cli("run", str(write(tmp_path, datasets=[{"name": "wikitext2", "path": str(tmp_path / "nope.txt")}])), env=store)
    assert r.returncode == 2 and "dataset wikitext2: dataset path" in r.stderr and "no such file" in r.stderr


def test_quiet_run_failure_line_rerun_and_verbose(tmp_path, store):
    cfg = write(tmp_path)
    r, _ = cli("run", str(cfg), env={**store, "QUANTLENS_INJECT_FAULT": "tiny-opt:W4A16"})
    out = r.stdout + r.stderr
    assert r.returncode == 3, out
    assert "Traceback" not in out and "telemetry" not in out.lower()
    assert len(out.strip().splitlines()) <= 8, out
    failed = [line for line in out.splitlines() if "tiny-opt/W4A16 FAILED" in line]
    assert len(failed) == 1 and "injected fault" in failed[0] and "artifact failure.log of MLflow run" in failed[0]
    assert "1 evaluated, 0 already finished, 1 run(s) failed, 0 not run" in out

    r, _ = cli("run", str(cfg), "--dry-run", env=store)
    assert r.returncode == 0 and "1 done, 1 to run" in r.stdout and "todo (failed last time)" in r.stdout

    r, _ = cli("run", str(cfg), "-v", env=store)
    assert r.returncode == 0, r.stderr
    assert "sweep cli-" in r.stdout and "1 evaluated, 1 already finished, 0 failed, 0 not run" in r.stdout
    assert "wikitext2: 4/4 (100%)" in r.stdout + r.stderr  # per-batch progress only with --verbose

    r, secs = cli("run", str(cfg), env=store)
    assert r.returncode == 0 and "nothing to evaluate" in r.stdout and secs < 10


def test_a_model_that_fails_before_evaluating_is_counted_as_not_run(tmp_path, store):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "opt"}))  # no weights, no tokenizer
    r, _ = cli("run", str(write(tmp_path, models=[str(broken)])), env=store)
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
