import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import FAMILIES, LAMBADA, WIKI_TEST
from quantlens.evaluation.data import lambada_requests, load_lambada, perplexity_windows
from quantlens.evaluation.evaluate import evaluate_dataset, lambada, perplexity
from quantlens.quantize.patch import quantize_, restore_
from quantlens.model.streaming import disable_streaming, enable_streaming


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


SETTINGS_STREAM = ["W16A16", "W4A16", "W8A8", "W3A16-nu",
                   {"base": "W8A8", "perturbation": {"distribution": "uniform", "rule": "proportional", "target": "both", "seed": 3}}]


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_stream_equals_single_and_moves_each_block_once(family):
    """placement: stream reads each block from the checkpoint when it runs and evaluates layer by
    layer: perplexity, Lambada, per-example errors, residual statistics and the weight statistics
    equal the whole model in memory (bit for bit here, on CPU) for 16-bit, weight-only,
    weight+activation, non-uniform and a seeded perturbation; each block's weights cross once per
    (setting, dataset), where a plain forward brings them once per batch; and what is read back
    after every setting is the checkpoint, bit for bit. The same for streaming from host memory."""
    from conftest import LAMBADA, MODELS
    from quantlens.evaluation.data import lambada_requests, load_lambada
    from quantlens.evaluation.evaluate import lambada
    from quantlens.model.loading import load_model
    from quantlens.model.anatomy import find_decoder_blocks
    from quantlens.quantize.patch import full_report
    from quantlens.model.streaming import block_tensors, resident, transfer_bytes

    path = str(MODELS / f"tiny-{family}")
    single, tok = load_model(path, device="cpu", placement="single")
    w = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=20)
    reqs = lambada_requests(tok, load_lambada(str(LAMBADA), 24))
    pad = tok.pad_token_id or 0

    def evaluate(m):
        p = perplexity(m, w, batch_size=8, residual=True)
        l = lambada(m, reqs, pad_id=pad, batch_size=8, residual=True)
        return p, l, sorted((x.layer, x.delta_l2, x.alpha_mean) for x in full_report(m).layers if x.kind == "weight")

    ref = []
    for st in SETTINGS_STREAM:
        quantize_(single, st)
        ref.append(evaluate(single))
        restore_(single)
    _, blocks = find_decoder_blocks(single)
    block_bytes = sum(t.numel() * t.element_size() for b in blocks for t in block_tensors(b))
    expected_block0 = [t.clone() for t in block_tensors(blocks[0])]

    lazy, _ = load_model(path, device="cpu", placement="stream")
    in_memory, _ = load_model(path, device="cpu", placement="single")
    enable_streaming(in_memory, "cpu")
    assert sum(t.numel() for b in find_decoder_blocks(lazy)[1] for t in block_tensors(b)) == 0  # no block weights held
    for m in (lazy, in_memory):
        for st, (p0, l0, w0) in zip(SETTINGS_STREAM, ref):
            quantize_(m, st)
            transfer_bytes(m, reset=True)
            p, l, wst = evaluate(m)
            assert transfer_bytes(m) == 2 * block_bytes  # two datasets, each block once per dataset
            assert p["ppl"] == pytest.approx(p0["ppl"], rel=1e-6), st
            assert (l["acc"], l["nll"]) == pytest.approx((l0["acc"], l0["nll"]), rel=1e-6), st
            np.testing.assert_allclose(p["per_example"]["nll"], p0["per_example"]["nll"], rtol=1e-6)
            np.testing.assert_allclose(l["per_example"]["nll"], l0["per_example"]["nll"], rtol=1e-6)
            for got, want in ((p["residual"], p0["residual"]), (l["residual"], l0["residual"])):
                np.testing.assert_allclose(got[["r_norm", "z_norm", "r_kurtosis"]], want[["r_norm", "z_norm", "r_kurtosis"]], rtol=1e-5)
            assert [x[0] for x in wst] == [x[0] for x in w0]  # every weight patched, once
            np.testing.assert_allclose([x[1:] for x in wst], [x[1:] for x in w0], rtol=1e-6)
            restore_(m)
        with resident(m, 0) as block:  # restoring = reading the checkpoint (or the stored copy) again
            assert all(torch.equal(a, b) for a, b in zip(block_tensors(block), expected_block0))
        # a plain forward (what the mechanism analysis runs) brings each block for every batch
        transfer_bytes(m, reset=True)
        with torch.inference_mode():
            for s in range(0, 16, 8):
                m(input_ids=w[s:s + 8], use_cache=False)
        assert transfer_bytes(m) == 2 * block_bytes
    disable_streaming(in_memory)


def test_stream_needs_safetensors(tmp_path):
    from quantlens.quantize.settings import ConfigError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="placement: stream reads decoder blocks from safetensors shards"):
        from quantlens.model.streaming import load_streaming

        load_streaming(str(tmp_path), "cpu", torch.float32)


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


def test_layerwise_prefetches_the_next_block_and_spills_hidden_states(monkeypatch):
    """While a block runs, the next one is read from the checkpoint in the background; hidden
    states beyond the device budget wait in host memory. Numbers unchanged."""
    from conftest import MODELS
    from quantlens.model.loading import load_model
    from quantlens.model.streaming import _state

    path = str(MODELS / "tiny-llama")
    single, tok = load_model(path, device="cpu", placement="single")
    w = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=12)
    quantize_(single, "W4A8")
    ref = perplexity(single, w, batch_size=4)
    lazy, _ = load_model(path, device="cpu", placement="stream")
    quantize_(lazy, "W4A8")
    monkeypatch.setenv("QUANTLENS_LAYERWISE_DEVICE_GB", "0")  # every hidden state spills
    got = perplexity(lazy, w, batch_size=4)
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
    np.testing.assert_allclose(got["per_example"]["nll"], ref["per_example"]["nll"], rtol=1e-6)
    n_blocks = len(_state(lazy).blocks)
    assert _state(lazy).prefetched == n_blocks - 1 and not _state(lazy).ahead  # all but the first came ahead
