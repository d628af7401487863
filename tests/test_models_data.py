import gzip
import json

import pytest

from conftest import MODELS, WIKI_TEST
from quantlens.evaluation.data import load_lambada, perplexity_windows
from quantlens.model.loading import ModelUnavailable, download, registry, resolve_model
from quantlens.quantize.settings import ConfigError


def test_registry_covers_the_study():
    reg = registry()
    for n in ["opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b",
              "bloom-560m", "bloom-1b1", "bloom-1b7", "bloom-3b", "bloom-7b1",
              "llama-7b", "llama-13b", "llama-30b", "llama-65b"]:
        assert n in reg
    assert reg["opt-66b"].hf_id == "facebook/opt-66b" and reg["opt-66b"].size_b == 66
    assert reg["bloom-7b1"].family == "bloom"
    assert resolve_model("llama-7b", hf_id="my-org/llama-7b-hf").hf_id == "my-org/llama-7b-hf"


def test_llama_id_template(monkeypatch):
    monkeypatch.setenv("QUANTLENS_LLAMA_ID_TEMPLATE", "org/llama-{size}-hf")
    assert resolve_model("llama-13b").hf_id == "org/llama-13b-hf"


def test_local_model_resolves_with_family_and_size():
    info = resolve_model(str(MODELS / "tiny-opt"))
    assert info.family == "opt" and info.size_b == pytest.approx(1.38176e-3, rel=1e-3)
    snap = download(info)
    assert snap.path == info.hf_id and snap.revision.startswith("local-")
    assert download(info).revision == snap.revision  # stable


@pytest.mark.parametrize("ref,msg", [
    ("opt-7b", "unknown size '7b' for family 'opt'"),
    ("gpt-5", "not a registry name"),
])
def test_unknown_models(ref, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve_model(ref)


def test_directory_without_config(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_offline_missing_model_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelUnavailable, match="not in the local Hugging Face cache"):
        download(resolve_model("opt-350m"))


def test_empty_dataset_file(tmp_path, trained):
    _, tok = trained("opt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.txt is empty"):
        perplexity_windows(tok, "wikitext2", 128, path=str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n")
    with pytest.raises(ConfigError, match="the text is empty"):
        perplexity_windows(tok, "wikitext2", 128, path=str(blank))
    with pytest.raises(ConfigError, match="no such file"):
        perplexity_windows(tok, "wikitext2", 128, path=str(tmp_path / "missing.txt"))


def test_seqlen_larger_than_text(tmp_path, trained):
    _, tok = trained("opt")
    small = tmp_path / "small.txt"
    small.write_text("just a few words of text")
    with pytest.raises(ConfigError, match="seqlen: 128 is larger than the whole wikitext2 text"):
        perplexity_windows(tok, "wikitext2", 128, path=str(small))


def test_windows_cached_on_disk(trained, tmp_path, monkeypatch):
    _, tok = trained("opt")
    monkeypatch.setenv("QUANTLENS_CACHE", str(tmp_path))
    a = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST))
    files = list((tmp_path / "windows").glob("*.pt"))
    assert len(files) == 1 and a.shape == (2720, 128)
    b = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST))
    assert b.equal(a)
    perplexity_windows(tok, "wikitext2", 64, path=str(WIKI_TEST))
    assert len(list((tmp_path / "windows").glob("*.pt"))) == 2  # seqlen is part of the key


def test_lambada_loader_both_formats(tmp_path):
    f = tmp_path / "l.jsonl"
    f.write_text(json.dumps({"context": "a b", "continuation": " c"}) + "\n" + json.dumps({"text": "x y z"}) + "\n")
    assert load_lambada(str(f)) == [("a b", "c"), ("x y", "z")]


def test_c4_local_gz(trained, tmp_path):
    _, tok = trained("opt")
    f = tmp_path / "c4.json.gz"
    with gzip.open(f, "wt") as fh:
        for i in range(3):
            fh.write(json.dumps({"text": f"document number {i} " * 50}) + "\n")
    w = perplexity_windows(tok, "c4", 32, path=str(f))
    assert w.shape[1] == 32 and w.shape[0] > 3
