import pytest
import torch

from conftest import FAMILIES, tiny_random_model
from quantlens.model.anatomy import find_decoder_blocks
from quantlens.quantize.patch import full_report, quantize_, restore_, target_linears
from quantlens.quantize.settings import ConfigError, resolve_setting

IDS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
BLOCKS = {"opt": "model.decoder.layers", "bloom": "transformer.h", "llama": "model.layers"}
LINEARS_PER_BLOCK = {"opt": 6, "bloom": 4, "llama": 7}


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_decoder_linears(family):
    m = tiny_random_model(family)
    assert find_decoder_blocks(m)[0] == BLOCKS[family]
    names = [n for n, _ in target_linears(m, resolve_setting("W8A8"))]
    assert len(names) == 2 * LINEARS_PER_BLOCK[family]
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert len(target_linears(m, resolve_setting({"name": "h", "base": "W8A8", "include_lm_head": True}))) == len(names) + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_random_models_change_and_restore_bit_exactly(family):
    m = tiny_random_model(family)
    ref = logits(m)
    quantize_(m, "W16A16")
    assert torch.equal(logits(m), ref)
    for s in ("W4A16", "W8A8", "W4A8-nu", "W3A16-g8"):
        quantize_(m, s)  # re-patching restores first
        assert not torch.equal(logits(m), ref), s
    restore_(m)
    assert torch.equal(logits(m), ref)
    restore_(m)  # idempotent


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_models_change_and_restore_bit_exactly(family, trained):
    m, tok = trained(family)
    ids = torch.tensor([tok("The tower is 324 metres tall , about the same height as an 81 @-@ storey building .")["input_ids"]])
    ref = logits(m, ids)
    quantize_(m, "W16A16")
    assert torch.equal(logits(m, ids), ref)
    quantize_(m, "W4A16")
    q = logits(m, ids)
    assert not torch.equal(q, ref)
    assert (q - ref).abs().max() < 5.0  # a perturbation, not garbage
    restore_(m)
    assert torch.equal(logits(m, ids), ref)


def test_weights_quantized_once_not_per_forward():
    m = tiny_random_model("opt")
    quantize_(m, "W4A16")
    lin = m.model.decoder.layers[0].self_attn.q_proj
    w = lin.weight.data
    ptr = w.data_ptr()
    logits(m)
    logits(m)
    assert lin.weight.data.data_ptr() == ptr
    # on the grid: each row has at most 2·7+1 distinct levels
    assert max(len(row.unique()) for row in w) <= 15
    restore_(m)


def test_report_statistics():
    m = tiny_random_model("llama")
    rep = quantize_(m, "W4A8")
    weights = [r for r in rep.layers if r.kind == "weight"]
    assert len(weights) == 14
    lin = dict(m.named_modules())[weights[0].layer]
    assert weights[0].numel == lin.weight.numel()
    assert weights[0].alpha_max > 0 and 0 < weights[0].rel_error < 0.5
    logits(m)
    full = full_report(m)
    acts = [r for r in full.layers if r.kind == "activation"]
    assert acts and all(a.delta_l2 > 0 for a in acts)
    s = full.summary()
    assert set(s) >= {"weight_delta_l2_mean", "weight_rel_error_mean", "activation_rel_error_mean"}
    restore_(m)


def test_clipping_fraction_reported():
    m = tiny_random_model("opt")
    plain = {r.layer: r for r in quantize_(m, "W8A16").layers}
    rep = quantize_(m, "W8A16-clip3")
    # Gaussian init: P(|x| > 3σ) = 0.27 %
    assert rep.summary()["weight_clipped_fraction"] == pytest.approx(0.0027, abs=0.0015)
    for r in rep.layers:  # α shrinks exactly where something was clipped
        assert (r.alpha_mean < plain[r.layer].alpha_mean) == (r.clipped_fraction > 0), r.layer
    # at 8 bits the clipping error dominates the rounding error saved
    assert sum(r.delta_l2 for r in rep.layers) > 2 * sum(p.delta_l2 for p in plain.values())
    restore_(m)


def test_perturbation_seeded_and_matched():
    m = tiny_random_model("opt")
    ref = logits(m)
    spec = {"name": "p", "base": "W4A8", "perturbation": {"distribution": "binary", "seed": 1}}
    quantize_(m, spec)
    a = logits(m)
    w_pert = m.model.decoder.layers[0].fc1.weight.data.clone()
    quantize_(m, spec)
    assert torch.equal(logits(m), a)
    quantize_(m, {**spec, "perturbation": {"distribution": "binary", "seed": 2}})
    assert not torch.equal(logits(m), a)
    restore_(m)
    w = m.model.decoder.layers[0].fc1.weight.data
    from quantlens.quantize.quant import quantize
    from quantlens.quantize.settings import QuantSpec
    native = quantize(w, QuantSpec(bits=4)).xq - w
    assert float((w_pert - w).std()) == pytest.approx(float(native.std()), rel=1e-4)
    assert torch.equal(logits(m), ref)


def test_group_size_incompatible_fails_before_touching_weights():
    m = tiny_random_model("opt")  # in_features 32 and 64
    before = {n: p.clone() for n, p in m.named_parameters()}
    with pytest.raises(ConfigError, match=r"weights.group_size: 12 does not divide in_features=32 of layer 'model.decoder.layers.0.self_attn.k_proj'"):
        quantize_(m, "W4A16-g12")
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_lm_head_and_embeddings_optional():
    m = tiny_random_model("llama")
    head = m.lm_head.weight.data.clone()
    emb = m.model.embed_tokens.weight.data.clone()
    quantize_(m, "W4A16")
    assert torch.equal(m.lm_head.weight.data, head) and torch.equal(m.model.embed_tokens.weight.data, emb)
    quantize_(m, {"name": "all", "base": "W4A16", "include_lm_head": True, "include_embeddings": True})
    assert not torch.equal(m.lm_head.weight.data, head) and not torch.equal(m.model.embed_tokens.weight.data, emb)
    restore_(m)
    assert torch.equal(m.lm_head.weight.data, head) and torch.equal(m.model.embed_tokens.weight.data, emb)


@pytest.mark.parametrize("family", ["opt", "bloom", "llama"])
def test_originals_from_the_checkpoint_restore_bit_exact(family, monkeypatch):
    """originals: checkpoint keeps no copy of the patched weights; restoring reads them back from
    the safetensors, bit for bit, and full_precision() reads them too. auto picks it by size."""
    from conftest import MODELS
    from quantlens.model.loading import choose_originals, load_model
    from quantlens.quantize.patch import _STATE_ATTR, _Stored, full_precision

    m, _ = load_model(str(MODELS / f"tiny-{family}"), device="cpu", placement="single")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ids = torch.randint(0, m.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = m(input_ids=ids).logits
    monkeypatch.setenv("QUANTLENS_ORIGINALS_MAX_GB", "0")
    assert choose_originals(m, "auto") == "checkpoint"
    monkeypatch.setenv("QUANTLENS_ORIGINALS_MAX_GB", "1000")
    assert choose_originals(m, "auto") == "auto" and choose_originals(m, "memory") == "auto"
    for setting in ("W3A16", {"name": "all", "base": "W4A16", "include_lm_head": True, "include_embeddings": True}):
        quantize_(m, setting, keep_originals_on="checkpoint")
        held = getattr(m, _STATE_ATTR).originals
        assert held and all(isinstance(orig, _Stored) for _, orig in held.values())  # nothing kept in memory
        with torch.inference_mode():
            assert not torch.equal(m(input_ids=ids).logits, ref)
            with full_precision(m):
                assert torch.equal(m(input_ids=ids).logits, ref)
        restore_(m)
        assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    with pytest.raises(ConfigError, match="originals: checkpoint needs a model loaded from a folder with safetensors"):
        quantize_(tiny_random_model("opt"), "W4A16", keep_originals_on="checkpoint")
