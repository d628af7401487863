import math
from types import SimpleNamespace

import numpy as np
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


SETTINGS_STREAM = ["W16A16", "W4A16", "W8A8",
                   {"base": "W8A8", "perturbation": {"distribution": "uniform", "rule": "proportional", "target": "both", "seed": 3}}]


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_stream_equals_single_and_moves_each_block_once(family):
    """placement: stream evaluates layer by layer: perplexity, Lambada, per-example errors and
    residual statistics equal one whole-model forward per batch (bit for bit here, on CPU), for
    16-bit, weight-only, weight+activation and a seeded perturbation; each block's weights cross
    once per (setting, dataset), where per-batch streaming moves them once per batch."""
    from conftest import LAMBADA, MODELS
    from quantlens.data import lambada_requests, load_lambada
    from quantlens.evaluate import lambada
    from quantlens.models import load_model
    from quantlens.patch import find_decoder_blocks
    from quantlens.streaming import block_tensors, transfer_bytes

    m, tok = load_model(str(MODELS / f"tiny-{family}"), device="cpu", placement="single")
    w = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=20)
    reqs = lambada_requests(tok, load_lambada(str(LAMBADA), 24))
    pad = tok.pad_token_id or 0

    def evaluate():
        p = perplexity(m, w, batch_size=8, residual=True)
        l = lambada(m, reqs, pad_id=pad, batch_size=8, residual=True)
        return p, l

    ref = []
    for st in SETTINGS_STREAM:
        quantize_(m, st)
        ref.append(evaluate())
        restore_(m)
    _, blocks = find_decoder_blocks(m)
    stored = [t.data_ptr() for t in block_tensors(blocks[0])]
    block_bytes = sum(t.numel() * t.element_size() for b in blocks for t in block_tensors(b))
    enable_streaming(m, "cpu")
    try:
        for st, (p0, l0) in zip(SETTINGS_STREAM, ref):
            quantize_(m, st)
            transfer_bytes(m, reset=True)
            p, l = evaluate()
            assert transfer_bytes(m) == 2 * block_bytes  # two datasets, each block once per dataset
            assert p["ppl"] == pytest.approx(p0["ppl"], rel=1e-6), st
            assert (l["acc"], l["nll"]) == pytest.approx((l0["acc"], l0["nll"]), rel=1e-6), st
            np.testing.assert_allclose(p["per_example"]["nll"], p0["per_example"]["nll"], rtol=1e-6)
            np.testing.assert_allclose(l["per_example"]["nll"], l0["per_example"]["nll"], rtol=1e-6)
            for got, want in ((p["residual"], p0["residual"]), (l["residual"], l0["residual"])):
                np.testing.assert_allclose(got[["r_norm", "z_norm", "r_kurtosis"]], want[["r_norm", "z_norm", "r_kurtosis"]], rtol=1e-5)
            restore_(m)
        assert [t.data_ptr() for t in block_tensors(blocks[0])] == stored  # storage copies put back
        # per-batch streaming (a plain forward, as the mechanism analysis does): once per batch
        transfer_bytes(m, reset=True)
        with torch.inference_mode():
            for s in range(0, 16, 8):
                m(input_ids=w[s:s + 8], use_cache=False)
        assert transfer_bytes(m) == 2 * block_bytes
    finally:
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
