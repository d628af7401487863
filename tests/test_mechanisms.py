"""Layer-wise error, early exit and activation patching: exactness on the trained models."""

import math

import pandas as pd
import pytest
import torch

from conftest import FAMILIES, WIKI_TEST
from quantlens.evaluation.data import perplexity_windows
from quantlens.evaluation.evaluate import perplexity
from quantlens.analysis.mechanisms import block_parts, explain, layer_range, patch_variants
from quantlens.quantize.patch import full_precision, quantize_, restore_


def _windows(tok, n=12):
    return perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=n)


@pytest.mark.parametrize("setting", ["W3A16", "W4A8"])
def test_switching_weight_versions_is_bit_exact(trained, setting):
    m, tok = trained("llama")
    w = _windows(tok, 4)
    with torch.no_grad():
        ref = m(input_ids=w).logits
    quantize_(m, setting, keep_originals_on="same")
    try:
        before = {n: (p.data_ptr(), p.detach().clone()) for n, p in m.named_parameters()}
        with torch.no_grad():
            q = m(input_ids=w).logits
        with full_precision(m):
            with torch.no_grad():
                assert torch.equal(m(input_ids=w).logits, ref)  # the 16-bit model, activations too
        # the same quantized tensors back: same storage, same bits
        assert all(p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]) for n, p in m.named_parameters())
        with torch.no_grad():
            assert torch.equal(m(input_ids=w).logits, q)
        assert not torch.equal(q, ref)
    finally:
        restore_(m)


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_and_early_exit_exactness(trained, family):
    m, tok = trained(family)
    w = _windows(tok)
    large, ctrl = w[:6].tolist(), w[6:].tolist()
    fp = perplexity(m, w[:6], batch_size=6)["nll"]
    quantize_(m, "W3A16", keep_originals_on="same")
    try:
        q = perplexity(m, w[:6], batch_size=6)["nll"]
        ex = explain(m, {"large": large, "ctrl": ctrl}, layers="upper_half", batch_size=4)
    finally:
        restore_(m)
    p = ex.patching.set_index("patched")
    assert p.loc["all", "nll"] == pytest.approx(fp, rel=1e-6)  # every module's output full precision = W16A16
    assert p.loc["none", "nll"] == pytest.approx(q, rel=1e-9)  # nothing patched = the quantized model
    assert p.loc["all", "ppl"] == pytest.approx(math.exp(fp), rel=1e-3)
    first = block_parts(m)[0].first_mlp[0]
    assert set(p.index) == set(patch_variants(block_parts(m), range(1, 3)))
    assert {"attention", "mlp", f"{first}.input", f"{first}.weights_16bit", "upper_k_16bit"} <= set(p.index)
    assert p.loc["mlp", "layers"] == "1-2" and p.loc["all", "layers"] == "0-2"
    # the MLP output is its last linear's output: the two patches are the same run
    last = list(block_parts(m)[0].mlp)[-1]
    assert p.loc["mlp", "nll"] == p.loc[f"mlp.{last}", "nll"]
    # early exit at the last layer's block output is the model's own NLL, at both precisions
    e = ex.early_exit
    last_z = e[(e["set"] == "large") & (e["source"] == "z") & (e["layer"] == 2)].set_index("precision")["nll"]
    assert last_z["full"] == pytest.approx(fp, rel=1e-6) and last_z["quantized"] == pytest.approx(q, rel=1e-6)
    le = ex.layer_error
    assert list(le[le["set"] == "large"]["in_range"]) == [False, True, True]
    assert (le[le["in_range"]]["mse_mlp"] > 0).all() and (le["h_norm"] > 0).all()


def test_nothing_differs_under_w16a16(trained):
    m, tok = trained("opt")
    w = _windows(tok, 6)
    quantize_(m, "W16A16")
    try:
        ex = explain(m, {"large": w[:3].tolist(), "ctrl": w[3:].tolist()}, layers="all", batch_size=3)
    finally:
        restore_(m)
    assert (ex.layer_error["mse_mlp"] == 0).all() and (ex.layer_error["mse_attention"] == 0).all()
    assert ex.patching["nll"].nunique() == 1
    e = ex.early_exit.pivot_table(index=["set", "source", "layer"], columns="precision", values="nll")
    assert (e["full"] == e["quantized"]).all()


def test_layer_range():
    assert layer_range("upper_half", 32) == range(16, 32)
    assert layer_range("all", 3) == range(0, 3)
    assert layer_range("upper_k", 32) == range(26, 32)  # round(0.18 · 32) = 6
    assert layer_range("4:8", 32) == range(4, 8) and layer_range((0, 2), 3) == range(0, 2)
    with pytest.raises(ValueError, match=r"layers: '30:40' gives \[30, 40\) outside the model's 32 layers"):
        layer_range("30:40", 32)
    with pytest.raises(ValueError, match="not upper_half, all, upper_k or 'a:b'"):
        layer_range("top", 32)


def test_analysis_on_a_streamed_model_equals_the_loaded_one(trained):
    """placement: stream (blocks read from the checkpoint per batch, full precision = read as
    stored) gives the same layer error, early exit and patching tables as the model in memory."""
    from conftest import MODELS
    from quantlens.model.loading import load_model

    m, tok = trained("llama")
    w = _windows(tok)
    sets = {"large": w[:6].tolist(), "ctrl": w[6:].tolist()}
    streamed, _ = load_model(str(MODELS / "tiny-llama"), device="cpu", placement="stream")
    out = []
    for model in (m, streamed):
        quantize_(model, "W3A16", keep_originals_on="same")
        try:
            out.append(explain(model, sets, layers="upper_half", batch_size=4))
        finally:
            restore_(model)
    for table in ("patching", "early_exit", "layer_error"):
        a, b = getattr(out[0], table), getattr(out[1], table)
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)
