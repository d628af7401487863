"""Datasets are declarations (quantlens.evaluation.data.DATASETS): what an example is, what it
needs, what it writes and how big it is are asked of the declaration, never of the name; a new
dataset is one declaration (here: one made in the test, nothing else touched)."""

from __future__ import annotations

import math

import pytest
from conftest import MODELS, WIKI_TEST

from quantlens.evaluation import data as D
from quantlens.evaluation.evaluate import evaluate_dataset
from quantlens.pipeline.plan import dataset_tokens
from quantlens.pipeline.sweep import DatasetEntry, SweepConfig


def test_every_shipped_dataset_is_declared_with_its_metrics():
    assert list(D.DATASETS) == ["wikitext2", "c4", "fineweb", "lambada", "qerror", "lm-eval", "ptb"]
    for name, info in D.DATASETS.items():
        assert info.name == name and info.estimate is not None
        assert all(isinstance(m, str) and isinstance(hib, bool) for m, hib in info.metrics)
    assert dict(D.DATASETS["lambada"].metrics) == {"acc": True, "nll": False}
    assert [n for n, i in D.DATASETS.items() if i.per_example_analysis] == ["wikitext2", "c4", "fineweb", "qerror", "ptb"]
    assert [n for n, i in D.DATASETS.items() if not i.text] == ["qerror"]


def test_an_unknown_dataset_is_one_line_naming_the_known():
    with pytest.raises(ValueError) as err:
        DatasetEntry(name="hellaswag")
    assert "unknown dataset 'hellaswag' (known: wikitext2, c4, fineweb, lambada, qerror, lm-eval, ptb)" in str(err.value)


def test_a_declarations_own_rules_and_the_harness_fields():
    with pytest.raises(ValueError, match="qerror: give path"):
        DatasetEntry(name="qerror")
    with pytest.raises(ValueError, match="lm-eval: give tasks"):
        DatasetEntry(name="lm-eval")
    with pytest.raises(ValueError, match="tasks: only with name: lm-eval"):
        DatasetEntry(name="wikitext2", tasks=["arc_easy"])


TOY_MODULE = '''"""A toy corpus: a dataset of its own, one module (written by the test)."""
from quantlens.evaluation.corpus import text_requests
from quantlens.evaluation.datasets.wikitext2 import load_wikitext2_text
from quantlens.evaluation.sources import DatasetInfo, text_estimate

DATASET = DatasetInfo("toy", "perplexity", load_wikitext2_text, "a toy corpus (test)", None, text_estimate(1000),
                      requests=text_requests)
'''


def test_a_new_dataset_is_one_module(monkeypatch, tmp_path, trained):
    """A toy corpus declared in a module dropped beside the shipped ones: found by listing the
    package, validated by the config, estimated by the plan, in the per-example analysis, and
    evaluated through the same windows and scoring as WikiText-2."""
    from quantlens.evaluation import datasets

    text = tmp_path / "toy.txt"
    text.write_text(WIKI_TEST.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "toy.py").write_text(TOY_MODULE, encoding="utf-8")
    monkeypatch.setattr(datasets, "__path__", [*datasets.__path__, str(tmp_path / "pkg")])
    found = D.discover()
    assert list(found) == [*D.DATASETS, "toy"]
    monkeypatch.setitem(D.DATASETS, "toy", found["toy"])  # the registry every layer reads

    cfg = SweepConfig.model_validate({"name": "toy", "models": [str(MODELS / "tiny-llama")], "settings": ["W16A16"],
                                      "datasets": [{"name": "toy", "path": str(text), "seqlen": 64, "max_windows": 3}]})
    assert cfg.analysis_datasets() == ["toy"]
    assert dataset_tokens(cfg.datasets[0], 128) == (3 * 64.0, 3)
    model, tok = trained("llama")
    r = evaluate_dataset(model, tok, "toy", path=str(text), seqlen=64, max_windows=3)
    w = evaluate_dataset(model, tok, "wikitext2", path=str(text), seqlen=64, max_windows=3)
    assert len(r["per_example"]) == 3 and math.isfinite(r["ppl"])
    assert r["ppl"] == w["ppl"] and list(r["per_example"]["nll"]) == list(w["per_example"]["nll"])


def test_every_request_builder_goes_through_one_scoring_primitive(monkeypatch, trained, tmp_path):
    """Windows, documents, Lambada and released rows are request builders: each evaluation is one
    call of scoring.loglikelihood."""
    import torch

    from quantlens.evaluation import evaluate, scoring
    from conftest import LAMBADA

    calls = []
    real = scoring.loglikelihood
    monkeypatch.setattr(evaluate, "loglikelihood", lambda *a, **k: calls.append(type(a[1]).__name__) or real(*a, **k))
    model, tok = trained("llama")
    rows = tmp_path / "rows.pt"
    torch.save(torch.randint(0, 100, (2, 16)), rows)
    evaluate_dataset(model, tok, "wikitext2", path=str(WIKI_TEST), seqlen=32, max_windows=2)
    evaluate_dataset(model, tok, "wikitext2", path=str(WIKI_TEST), examples="documents", example_len=16, max_windows=2)
    evaluate_dataset(model, tok, "lambada", path=str(LAMBADA), limit=3)
    evaluate_dataset(model, tok, "qerror", path=str(rows))
    assert calls == ["Windows", "Windows", "Continuations", "Windows"]


def test_penn_treebank_is_its_sentences_joined_by_spaces_in_windows(tmp_path, trained):
    """PTB (datasets/ptb.py, GPTQ's third corpus), added as one module: a local ptb.test.txt (one
    sentence a line) is scored as the windows of its sentences joined by spaces."""
    import torch

    from quantlens.evaluation.evaluate import perplexity

    lines = [line.strip() for line in WIKI_TEST.read_text(encoding="utf-8").splitlines() if line.strip()][:200]
    f = tmp_path / "ptb.test.txt"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = SweepConfig.model_validate({"name": "ptb", "models": [str(MODELS / "tiny-llama")], "settings": ["W16A16"],
                                      "datasets": [{"name": "ptb", "path": str(f), "seqlen": 64, "max_windows": 3}]})
    assert cfg.analysis_datasets() == ["ptb"] and dataset_tokens(cfg.datasets[0], 128) == (3 * 64.0, 3)
    model, tok = trained("llama")
    r = evaluate_dataset(model, tok, "ptb", path=str(f), seqlen=64, max_windows=3)
    ids = torch.tensor(tok(" ".join(lines))["input_ids"][: 3 * 64]).view(3, 64)
    assert r["ppl"] == perplexity(model, ids)["ppl"] and len(r["per_example"]) == 3
