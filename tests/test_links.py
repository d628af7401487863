"""MLflow compare links: the URL MLflow 3's UI reads (``#/compare-runs?runs=[…]&experiments=[…]``)."""

import json
from urllib.parse import unquote

import pandas as pd
import pytest

from quantlens.analysis.links import compare_url, main_comparisons, select_runs, ui_base


def test_compare_url_is_the_ui_route_with_json_lists(monkeypatch):
    monkeypatch.delenv("QUANTLENS_UI_URL", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlruns/mlflow.db")
    url = compare_url(["b", "a", "b"], ["2", "1"], ui_base(5057))
    assert url.startswith("http://127.0.0.1:5057/#/compare-runs?runs=")
    query = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
    assert json.loads(unquote(query["runs"])) == ["b", "a"] and json.loads(unquote(query["experiments"])) == ["1", "2"]


def test_ui_base_is_the_tracking_server_when_there_is_one(monkeypatch):
    monkeypatch.delenv("QUANTLENS_UI_URL", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.lab.example/")
    assert ui_base(5057) == "https://mlflow.lab.example"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert ui_base() == "http://127.0.0.1:5000"
    monkeypatch.setenv("QUANTLENS_UI_URL", "https://proxy.example/mlflow/")
    assert ui_base(5057) == "https://proxy.example/mlflow"


RUNS = pd.DataFrame({
    "model": ["opt", "opt", "opt", "opt", "llama", "llama"],
    "setting": ["W16A16", "W4A16", "W4A16-nu", "W8A8-clip3", "W4A16", "W4A16-nu"],
    "base": ["W16A16", "W4A16", "W4A16-nu", "W8A8", "W4A16", "W4A16-nu"],
    "run_id": list("abcdef"), "experiment_id": ["1"] * 6,
})


def test_select_runs_orders_by_model_then_setting_and_names_what_is_missing():
    got = select_runs(RUNS, ["W4A16-nu", "W4A16"])
    assert list(zip(got["model"], got["setting"])) == [("opt", "W4A16-nu"), ("opt", "W4A16"), ("llama", "W4A16-nu"), ("llama", "W4A16")]
    assert list(select_runs(RUNS, ["W4A16"], ["llama"])["run_id"]) == ["e"]
    with pytest.raises(KeyError, match=r"no FINISHED run of W3A16 \(settings with runs: W16A16, W4A16, W4A16-nu, W8A8-clip3\)"):
        select_runs(RUNS, ["W4A16", "W3A16"])
    with pytest.raises(KeyError, match="no FINISHED run of model bloom"):
        select_runs(RUNS, ["W4A16"], ["bloom"])


def test_main_comparisons_pair_twins_and_variants():
    titles = {t: u for t, u in main_comparisons(RUNS, "http://x")}
    assert "W4A16 vs W4A16-nu on 2 model(s)" in titles
    assert json.loads(unquote(titles["W4A16 vs W4A16-nu on 2 model(s)"].split("runs=")[1].split("&")[0])) == ["b", "c", "e", "f"]
    assert not any(t.startswith("W8A8 against") for t in titles)  # its base did not run: nothing to compare against
    assert "every setting of opt (4 runs)" in titles and "every setting of llama (2 runs)" in titles
