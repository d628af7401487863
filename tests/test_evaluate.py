import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import FAMILIES, LAMBADA, WIKI_TEST
from quantlens.data import lambada_requests, load_lambada, perplexity_windows
from quantlens.evaluate import evaluate_dataset, lambada, perplexity
from quantlens.patch import quantize_, restore_
from quantlens.streaming import disable_streaming, enable_streaming


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_equals_hf_labels_loss(family, trained):
    m, tok = trained(family)
    w = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=24)
    got = perplexity(m, w, batch_size=5)  # 24 windows: uneven last batch
    with torch.no_grad():
        losses = [float(m(input_ids=w[i : i + 1], labels=w[i : i + 1]).loss) for i in range(len(w))]
    assert got["ppl"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert got["tokens"] == 24 * 128 and got["windows"] == 24


def test_full_wikitext2_matches_training_reference(trained):
    m, tok = trained("opt")
    r = evaluate_dataset(m, tok, "wikitext2", seqlen=128, path=str(WIKI_TEST))
    assert r["ppl"] == pytest.approx(157.4, abs=0.05)  # TRAINING.md


class NextTokenModel(nn.Module):
    """Predicts (token + 1) mod V with logit 10, all others 0."""

    V = 20

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=64, vocab_size=self.V)
        self.emb = nn.Embedding(self.V, 1)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=F.one_hot((input_ids + 1) % self.V, self.V).float() * 10)


def test_lambada_exact_on_hand_made_examples():
    reqs = [
        ([1, 2, 3], [4, 5]),  # right
        ([1, 2], [3, 9]),  # second target token wrong
        ([7], [8]),  # right
        ([5, 6, 7, 8], [2]),  # wrong
        ([10], [11, 12, 13]),  # right
    ]
    r = lambada(NextTokenModel(), reqs, batch_size=2)
    assert r["acc"] == pytest.approx(0.6)
    lp_right = 10 - math.log(math.exp(10) + 19)
    lp_wrong = 0 - math.log(math.exp(10) + 19)
    per_example = [-2 * lp_right, -(lp_right + lp_wrong), -lp_right, -lp_wrong, -3 * lp_right]
    assert r["nll"] == pytest.approx(sum(per_example) / 5, rel=1e-6)
    assert r["examples"] == 5


def test_lambada_batched_equals_one_by_one_reference(trained):
    m, tok = trained("llama")
    examples = load_lambada(str(LAMBADA), limit=24)
    reqs = lambada_requests(tok, examples)
    got = lambada(m, reqs, batch_size=7, pad_id=tok.pad_token_id)
    correct, nll = 0, 0.0
    with torch.no_grad():
        for ctx, tgt in reqs:
            ids = torch.tensor([ctx + tgt])
            logp = m(ids).logits[0, len(ctx) - 1 : -1].log_softmax(-1)
            t = torch.tensor(tgt)
            correct += int(torch.equal(logp.argmax(-1), t))
            nll += float(-logp.gather(-1, t[:, None]).sum())
    assert got["acc"] == pytest.approx(correct / len(reqs))
    assert got["nll"] == pytest.approx(nll / len(reqs), rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_equals_whole_model(family):
    from quantlens.models import load_model
    from conftest import MODELS

    m, tok = load_model(str(MODELS / f"tiny-{family}"), device="cpu")
    w = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=16)
    ref = perplexity(m, w, batch_size=8)["ppl"]
    quantize_(m, "W4A8")
    ref_q = perplexity(m, w, batch_size=8)["ppl"]
    restore_(m)
    enable_streaming(m, "cpu")
    blk = m.get_decoder().layers[0] if family != "bloom" else m.transformer.h[0]
    stored = [p.data_ptr() for p in blk.parameters()]
    assert perplexity(m, w, batch_size=8)["ppl"] == pytest.approx(ref, rel=1e-4)
    assert [p.data_ptr() for p in blk.parameters()] == stored  # storage copies put back
    quantize_(m, "W4A8")
    assert perplexity(m, w, batch_size=8)["ppl"] == pytest.approx(ref_q, rel=1e-4)
    restore_(m)
    disable_streaming(m)


def test_oom_halves_batch(monkeypatch):
    m = NextTokenModel()
    calls = []
    orig = m.forward

    def flaky(input_ids, **kw):
        calls.append(input_ids.shape[0])
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("fake")
        return orig(input_ids, **kw)

    m.forward = flaky
    r = perplexity(m, torch.randint(0, 20, (9, 8)), batch_size=8)
    assert r["batch_size"] == 2 and calls[:3] == [8, 4, 2]
