"""KV-cache quantization and perturbations whose size does not depend on batching or padding."""

import pytest
import torch

from conftest import FAMILIES, LAMBADA, WIKI_TEST, tiny_random_model
from quantlens.quantize import kv
from quantlens.evaluation.data import lambada_requests, load_lambada, perplexity_windows
from quantlens.evaluation.evaluate import lambada, perplexity
from quantlens.quantize.patch import _ActivationState, full_report, quantize_, restore_
from quantlens.quantize.perturb import make_generator, shaped_noise_rows
from quantlens.quantize.quant import fake_quantize
from quantlens.quantize.settings import ConfigError, KVSpec, PerturbSpec, QuantSpec, resolve_setting


# --- settings --------------------------------------------------------------------------------------
def test_kv_names_and_params():
    s = resolve_setting("W4A16KV4-nu")
    assert s.kv == KVSpec(bits=4, granularity="token", transform_p=1 / 3) and s.weights.transform_p == pytest.approx(1 / 3)
    assert resolve_setting("W16A16KV16").kv is None and resolve_setting("W16A16KV16").is_reference
    p = resolve_setting("W16A16KV3").flat_params()
    assert (p["kv_bits"], p["kv_granularity"], p["w_bits"], p["a_bits"]) == (3, "token", 16, 16)
    assert resolve_setting("W8A8").flat_params()["kv_bits"] == 16
    with pytest.raises(ConfigError, match="kv.bits: must be between 2 and 16"):
        resolve_setting("W16A16KV1")
    with pytest.raises(ConfigError, match="group_size is only valid with granularity 'token'"):
        resolve_setting({"name": "x", "kv": {"bits": 4, "granularity": "head", "group_size": 8}})
    with pytest.raises(ConfigError, match="perturbation.target 'kv' needs a kv spec"):
        resolve_setting({"base": "W8A8", "perturbation": {"target": "kv"}})


def test_quantize_kv_granularities_by_hand():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8)
    row = QuantSpec(bits=3, granularity="token")
    tok = kv.quantize_kv(x, KVSpec(bits=3, granularity="token"))
    head = kv.quantize_kv(x, KVSpec(bits=3, granularity="head"))
    chan = kv.quantize_kv(x, KVSpec(bits=3, granularity="channel"))
    for b in range(2):
        for h in range(3):
            for t in range(5):
                assert torch.equal(tok[b, h, t], fake_quantize(x[b, h, t][None], row)[0])
            assert torch.equal(head[b, h], fake_quantize(x[b, h].reshape(1, -1), row).reshape(5, 8))
            for d in range(8):
                assert torch.equal(chan[b, h, :, d], fake_quantize(x[b, h, :, d][None], row)[0])
    grouped = kv.quantize_kv(x, KVSpec(bits=3, granularity="token", group_size=4))
    assert torch.equal(grouped[0, 0, 0, :4], fake_quantize(x[0, 0, 0, :4][None], row)[0])


# --- on the models -----------------------------------------------------------------------------------
def _record_interface(monkeypatch):
    """Record the K/V that the original attention functions receive (after any KV quantization)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    kv._install_interface_wrappers()
    seen = []
    for name in list(ALL_ATTENTION_FUNCTIONS.keys()):
        wrapper = ALL_ATTENTION_FUNCTIONS[name]
        inner = getattr(wrapper, kv._WRAPPED)

        def recording(module, q, k, v, *a, inner=inner, **kw):
            seen.append((k.detach().clone(), v.detach().clone()))
            return inner(module, q, k, v, *a, **kw)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, name, kv._wrap(recording))
    return seen


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_kv_quantization_equals_quantizing_k_and_v_by_hand(trained, family, monkeypatch):
    m, tok = trained(family)
    w = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=2)
    seen = _record_interface(monkeypatch)
    spec = KVSpec(bits=3, granularity="channel", transform_p=1 / 3)
    with torch.no_grad():
        m(input_ids=w)
        k0, v0 = seen[0]  # layer 0, full precision (LLaMA: keys after RoPE)
        seen.clear()
        quantize_(m, {"name": "kv3", "kv": spec.model_dump()})
        try:
            m(input_ids=w)
        finally:
            restore_(m)
    kq, vq = seen[0]  # layer 0 sees the same input: only its cache is quantized
    assert torch.equal(kq, kv.quantize_kv(k0, spec)) and torch.equal(vq, kv.quantize_kv(v0, spec))
    assert not torch.equal(kq, k0)


def test_bloom_kv_quantization_by_hand(trained):
    m, tok = trained("bloom")
    attn = m.transformer.h[1].self_attention
    fused = torch.randn(2, 7, 3 * m.config.hidden_size)
    q0, k0, v0 = type(attn)._reshape(attn, fused)
    quantize_(m, "W16A16KV4")
    try:
        q, k, v = attn._reshape(fused)
    finally:
        restore_(m)
    spec = KVSpec(bits=4)
    assert torch.equal(q, q0) and torch.equal(k, kv.quantize_kv(k0, spec)) and torch.equal(v, kv.quantize_kv(v0, spec))
    assert "_reshape" not in attn.__dict__  # restored


@pytest.mark.parametrize("family", FAMILIES)
def test_kv16_is_bit_identical_kv8_harmless_kv2_hurts(trained, family):
    m, tok = trained(family)
    w = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=48)
    with torch.no_grad():
        ref_logits = m(input_ids=w[:4]).logits
    base = perplexity(m, w, batch_size=16)["ppl"]
    quantize_(m, "W16A16KV16")
    with torch.no_grad():
        assert torch.equal(m(input_ids=w[:4]).logits, ref_logits)
    ppl = {}
    for s in ("W16A16KV8", "W16A16KV2"):
        quantize_(m, s)
        ppl[s] = perplexity(m, w, batch_size=16)["ppl"]
        stats = full_report(m).summary()
        assert stats["key_rel_error_mean"] > 0 and stats["value_rel_error_mean"] > 0
    restore_(m)
    assert abs(ppl["W16A16KV8"] / base - 1) < 0.005
    assert ppl["W16A16KV2"] > base * 1.003 and ppl["W16A16KV2"] > ppl["W16A16KV8"]


def test_unknown_attention_is_one_clear_error_before_any_change():
    """An attention computed by code of its own (here: LLaMA's class, defined again outside
    transformers' modeling module, so it is not on the attention interface): weights still work, a KV
    setting is refused before any weight changes."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    own = type("OwnAttention", (LlamaAttention,), {"__module__": __name__})
    m = tiny_random_model("llama")
    for layer in m.model.layers:
        layer.self_attn.__class__ = own
    before = m.model.layers[0].mlp.down_proj.weight.detach().clone()
    with pytest.raises(kv.AttentionNotUnderstood, match=r"^KV-cache settings cannot be applied: OwnAttention \(model.layers.0.self_attn\) computes K/V in code quantlens cannot reach"):
        quantize_(m, "W4A16KV4")
    assert torch.equal(m.model.layers[0].mlp.down_proj.weight, before)
    quantize_(m, "W4A16")  # what the anatomy does understand still works
    assert not torch.equal(m.model.layers[0].mlp.down_proj.weight, before)
    restore_(m)


# --- perturbations independent of batching and padding ------------------------------------------------
def test_row_matched_noise_has_each_rows_target_std():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 16) * torch.linspace(0.1, 5, 6)[None, :, None]
    target = torch.rand(3, 6, 1) + 0.1
    for rule in ("additive", "proportional", "inverse"):
        n = shaped_noise_rows(x, target, PerturbSpec(rule=rule), make_generator(0, "t"))
        torch.testing.assert_close(n.std(-1, unbiased=False, keepdim=True), target, rtol=1e-5, atol=1e-6)


def _noise_std_of_rows(setting, x, valid=None):
    st = _ActivationState(resolve_setting(setting), stats_forwards=1)
    st.valid = valid
    out = st.transform("layer", x, make_generator(0, "layer"))
    return (out - x).std(-1, unbiased=False)


def test_a_passage_gets_the_same_noise_magnitude_alone_or_batched():
    torch.manual_seed(1)
    short = torch.randn(1, 5, 32)
    longer = torch.randn(1, 9, 32) * 4
    padded = torch.cat([torch.cat([short, torch.full((1, 4, 32), 50.0)], 1), longer])  # right padding
    mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
    setting = {"base": "W8A8", "perturbation": {"distribution": "gaussian", "rule": "inverse", "target": "activations"}}
    alone = _noise_std_of_rows(setting, short)[0]
    batched = _noise_std_of_rows(setting, padded, mask)[0, :5]
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-7)
    # the per-batch option matches over the real tokens: padding (the 50s) still does not count
    setting["perturbation"]["match"] = "batch"
    st = _ActivationState(resolve_setting(setting), stats_forwards=1)
    st.valid = mask
    out = st.transform("l", padded, make_generator(0, "l"))
    real = mask.reshape(-1).bool()
    delta = fake_quantize(padded, resolve_setting("W8A8").activations) - padded
    n = (out - padded).reshape(-1, 32)[real]
    assert float(n.std(unbiased=False)) == pytest.approx(float(delta.reshape(-1, 32)[real].std(unbiased=False)), rel=1e-5)


def test_activation_statistics_exclude_padding():
    torch.manual_seed(2)
    x = torch.randn(1, 6, 16)
    padded = torch.cat([x, torch.full((1, 3, 16), 1e4)], 1)
    stats = []
    for t, valid in ((x, None), (padded, torch.tensor([[1] * 6 + [0] * 3]))):
        st = _ActivationState(resolve_setting("W4A8"), stats_forwards=1)
        st.valid = valid
        st.transform("l", t, None)
        stats.append(st.stats()[0])
    assert stats[1].rel_error == pytest.approx(stats[0].rel_error, rel=1e-6) and stats[1].numel == stats[0].numel
    assert stats[1].alpha_max == pytest.approx(stats[0].alpha_max)


def test_lambada_and_ppl_under_activation_noise_do_not_depend_on_batch_size(trained):
    """Batch 1 and 16 agree to within the spread across seeds (per-token matching)."""
    m, tok = trained("llama")
    reqs = lambada_requests(tok, load_lambada(str(LAMBADA), limit=48))
    w = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=16)
    nll = {}
    for seed in (0, 1, 2):
        quantize_(m, {"base": "W4A8", "perturbation": {"distribution": "uniform", "rule": "proportional", "target": "activations", "seed": seed}})
        for bs in (1, 16):
            nll[(seed, bs)] = lambada(m, reqs, batch_size=bs, pad_id=tok.pad_token_id or 0)["nll"]
            nll[("ppl", seed, bs)] = perplexity(m, w, batch_size=bs)["nll"]
        restore_(m)
    # The noise draws differ with the batching (another stream position), so a batch size acts like
    # another seed: the mean over seeds must agree within the spread across seeds.
    for kind in ("lambada", "ppl"):
        vals = {bs: [nll[(s, bs)] if kind == "lambada" else nll[("ppl", s, bs)] for s in (0, 1, 2)] for bs in (1, 16)}
        spread = max(max(v) - min(v) for v in vals.values())
        gap = abs(sum(vals[1]) / 3 - sum(vals[16]) / 3)
        assert gap <= spread, (kind, vals, gap, spread)
