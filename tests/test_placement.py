import pytest
import torch

from conftest import MODELS, WIKI_TEST
from quantlens.evaluation.data import perplexity_windows
from quantlens.evaluation.evaluate import perplexity
from quantlens.model.loading import choose_placement, load_model, pick_dtype
from quantlens.quantize.settings import ConfigError


def test_device_map_placement_matches_single(trained):
    m, tok = trained("llama")
    w = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=8)
    ref = perplexity(m, w, batch_size=8)["ppl"]
    dm, _ = load_model(str(MODELS / "tiny-llama"), device="cpu", placement="device_map")
    assert perplexity(dm, w, batch_size=8)["ppl"] == pytest.approx(ref, rel=1e-6)


def test_placement_choice_and_dtype():
    assert choose_placement(str(MODELS / "tiny-opt"), torch.device("cpu"), torch.float32) == "single"
    assert pick_dtype(torch.device("cpu")) == torch.float32
    with pytest.raises(ConfigError, match="placement: unknown 'gpu'"):
        load_model(str(MODELS / "tiny-opt"), device="cpu", placement="gpu")
