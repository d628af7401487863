"""llama.cpp's legacy block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) equal the ``gguf`` package's reference
(llama.cpp's gguf-py: quantize then dequantize) bit for bit, on the shared trained models' weights and on
the blocks where a rounding rule shows (all zero, a range of 1e-8, one huge outlier, a negative maximum,
a tie of +max and −max); their names parse to the right spec; a setting runs through ``quantize_``; a
row that is not a multiple of 32 is refused in one line before any weight changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import MODELS, tiny_random_model
from quantlens.quantize.ggml import GGML_TYPES
from quantlens.quantize.patch import quantize_, restore_
from quantlens.quantize.quant import fake_quantize, quantize
from quantlens.quantize.settings import ConfigError, FORMAT_NAMES, QuantSpec, setting_from_name

gguf = pytest.importorskip("gguf")

NAMES = {"q8_0": "W8A16-q8_0", "q4_0": "W4A16-q4_0", "q4_1": "W4A16-q4_1", "q5_0": "W5A16-q5_0", "q5_1": "W5A16-q5_1"}
BPW = {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0}


def reference(x: torch.Tensor, kind: str) -> torch.Tensor:
    """gguf's quantize → dequantize of float32 ``x`` (its rows a multiple of 32)."""
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    a = x.detach().to(torch.float32).numpy()
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype))).reshape(x.shape)


def ours(x: torch.Tensor, kind: str) -> torch.Tensor:
    return quantize(x, setting_from_name(NAMES[kind]).weights).xq


def _edge_blocks() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(8, 32, generator=g)
    outlier = torch.randn(8, 32, generator=g) * 0.01
    outlier[:, 5] = torch.tensor([1e4, -1e4, 3e3, -60000.0, 65504.0, 7e4, -1e7, 1e7])  # 1e7: fp16 d overflows to inf (inf·0 = nan)
    negmax = r.clone()
    negmax[:, 7] = -r.abs().amax(dim=1) * 2  # the signed max is negative
    tie = r.clone()
    tie[:, 3], tie[:, 9] = 4.0, -4.0  # +max first: Q4_0's d is negative of it
    tie2 = r.clone()
    tie2[:, 3], tie2[:, 9] = -4.0, 4.0
    halves = (torch.arange(-16, 16, dtype=torch.float32) + 0.5).repeat(4, 1) / 16 * torch.tensor([[1.0], [-1.0], [3.0], [0.1]])
    return {"zero": torch.zeros(4, 64), "tiny-range": torch.randn(4, 64, generator=g) * 1e-8,
            "tiny-offset": 1.0 + torch.randn(4, 64, generator=g) * 1e-8, "subnormal-d": torch.randn(4, 64, generator=g) * 1e-6,
            "outlier": outlier, "negative-max": negmax, "all-negative": -r.abs() - 0.1, "tie+-": tie, "tie-+": tie2,
            "halves": halves, "constant": torch.full((2, 32), -0.37)}


@pytest.fixture(scope="module")
def weights(trained):
    """Every 2-D weight of the shared trained models whose rows are a multiple of 32 (the embeddings too)."""
    out = {}
    for fam in ("opt", "bloom", "llama"):
        model, _ = trained(fam)
        out.update({f"{fam}:{n}": p.detach().float() for n, p in model.named_parameters() if p.dim() == 2 and p.shape[1] % 32 == 0})
    return out


@pytest.mark.parametrize("kind", list(NAMES))
def test_equals_gguf_reference_on_trained_weights(kind, weights):
    assert len(weights) > 20
    for name, w in weights.items():
        got = ours(w, kind)
        assert torch.equal(got, reference(w, kind)), f"{kind} {name}: {(got - reference(w, kind)).abs().max()}"
        assert torch.equal(fake_quantize(w, setting_from_name(NAMES[kind]).weights), got), name


@pytest.mark.parametrize("kind", list(NAMES))
@pytest.mark.parametrize("case", list(_edge_blocks()))
def test_equals_gguf_reference_on_edge_blocks(kind, case):
    x = _edge_blocks()[case]
    with np.errstate(over="ignore", invalid="ignore"):
        want = reference(x, kind)
    got = ours(x, kind)
    assert torch.equal(got.isnan(), want.isnan()), case
    keep = ~want.isnan()
    assert torch.equal(got[keep], want[keep]), f"{kind} {case}: {(got - want)[keep].abs().max()}"
    if case == "zero":
        assert torch.equal(got, torch.zeros_like(x))


def test_bf16_weights_round_through_float32():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for kind in NAMES:
        got = quantize(w, setting_from_name(NAMES[kind]).weights).xq
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, reference(w.float(), kind).to(torch.bfloat16)), kind


def test_names_parse_to_the_right_spec():
    for kind, name in NAMES.items():
        assert name in FORMAT_NAMES
        s = setting_from_name(name)
        w = s.weights
        assert (w.format, w.scale, w.granularity, w.group_size) == ("ggml", "fp16", "group", 32)
        assert (w.bits, w.symmetric, w.label) == (int(kind[1]), kind.endswith("_0"), kind)
        assert w.bits_per_weight == BPW[kind] == GGML_TYPES[kind].bits_per_weight
        assert s.activations is None and s.kv is None
        assert setting_from_name(name.replace("-q", "-g32-q")).same_computation(s)
        assert QuantSpec(**w.model_dump()) == w
    assert setting_from_name("W4A16-q4_0").weights != setting_from_name("W4A16-g32").weights


@pytest.mark.parametrize("name,says", [
    ("W4A8-q4_0", "q4_0 has 4 bits but activations 8 bits are quantized: write W4A16-q4_0"), ("W16A16KV4-q4_k", "q4_k is a weight type"), ("W4A4-mxfp4-q", "unknown setting"),
    ("W6A16-q6_0", "no type q6_0"), ("W4A16KV8-q4_0", "q4_0 has 4 bits but kv 8 bits"), ("W8A16-q8_1", "no type q8_1"), ("W4A16-g64-q4_0", "blocks of 32"),
    ("W4A16-q4_0-clip3", "never clipped"), ("W4A16-q4_2", "unknown setting"), ("W4A16-q4", "unknown setting"),
])
def test_names_that_do_not_exist_are_one_clear_line(name, says):
    with pytest.raises(ConfigError, match=says):
        setting_from_name(name)


def test_long_form_refuses_other_blocks_and_scales():
    with pytest.raises(ValueError, match="blocks of 32"):
        QuantSpec(bits=4, format="ggml", scale="fp16", granularity="group", group_size=64)
    with pytest.raises(ValueError, match="fp16"):
        QuantSpec(bits=4, format="ggml", granularity="group", group_size=32)


def test_runs_through_quantize_and_restores():
    m = tiny_random_model("llama")
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits
    w0 = m.model.layers[0].mlp.down_proj.weight.detach().clone()
    for name in NAMES.values():
        quantize_(m, name)
        assert torch.equal(m.model.layers[0].mlp.down_proj.weight.detach(), reference(w0, name.split("-")[1]))
        with torch.no_grad():
            assert not torch.equal(m(ids).logits, ref), name
    restore_(m)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref)


def test_a_row_not_a_multiple_of_32_is_refused_before_any_weight_changes():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)).eval()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(ConfigError, match=r"^invalid setting 'W4A16-q4_0': weights.group_size: 32 does not divide in_features=48"):
        quantize_(m, "W4A16-q4_0")
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_the_report_places_each_type_at_its_bits_per_weight():
    import pandas as pd

    from quantlens.analysis.format_report import formats_vs_bits
    from quantlens.quantize.settings import resolve_setting

    rows = [{**resolve_setting(n).flat_params(), "model": "m", "wikitext2_ppl": 10.0}
            for n in ("W16A16", "W4A16", "W4A16-iq4nl", *NAMES.values())]
    t = formats_vs_bits(pd.DataFrame(rows)).set_index("setting")
    assert {s: t.loc[s, "bits"] for s in NAMES.values()} == {NAMES[k]: v for k, v in BPW.items()}
    assert t.loc["W4A16-q4_0", "family"] == "llama.cpp q_0" and t.loc["W4A16-q4_1", "family"] == "llama.cpp q_1"
    assert t.loc["W4A16", "bits"] == 4 and t.loc["W4A16-iq4nl", "bits"] == 4.5 and t.loc["W4A16-iq4nl", "family"] == "iq4nl"


# --- IQ4_NL: our codes and fp16 scale, packed as llama.cpp stores them, dequantized by gguf -------------
def _iq4_nl_packed(x: torch.Tensor, ntry: int = -1) -> tuple[torch.Tensor, np.ndarray]:
    """``quantize_row_iq4_nl_ref`` (ntry −1) or llama-quantize's search (ntry 7), packed as block_iq4_nl."""
    from quantlens.quantize.kquants import iq4_nl

    xq, parts = iq4_nl(x.float().reshape(-1, 32), ntry)
    codes = parts["q"].to(torch.uint8).reshape(-1, 32).numpy()
    qs = codes[:, :16] | (codes[:, 16:] << 4)  # q4[j] = L[j] | L[16 + j] << 4
    blocks = np.concatenate([parts["d"].reshape(-1, 1).to(torch.float16).numpy().view(np.uint8), qs], axis=1)
    return xq.reshape(x.shape), blocks


def test_iq4_nl_codes_dequantize_in_gguf_to_our_values(weights):
    """Both paths decode in gguf to our values; the setting W4A16-iq4nl is llama-quantize's (the search)."""
    edges = {k: v for k, v in _edge_blocks().items() if k != "outlier"}
    searched = {**edges, **{k: v[:64] for k, v in list(weights.items())[::4]}}  # (the search is 15 fits: a sample of rows)
    for name, x in {**weights, **edges}.items():
        for ntry in (-1, 7) if name in searched else (-1,):
            x = searched[name] if ntry == 7 else x
            xq, blocks = _iq4_nl_packed(x, ntry)
            ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.IQ4_NL).reshape(tuple(x.shape))
            assert torch.equal(xq, torch.from_numpy(np.ascontiguousarray(ref))), (name, ntry)
        if name in searched:
            assert torch.equal(quantize(x, setting_from_name("W4A16-iq4nl").weights).xq, xq), name


def test_iq4_nl_follows_the_reference_rule():
    """Codes from d0 = max/−127 (nearest entry, ties up), then the x²-weighted least-squares d in fp16."""
    from quantlens.quantize.kquants import KVALUES_IQ4NL

    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    xq, _ = _iq4_nl_packed(x.float())
    v = torch.tensor(KVALUES_IQ4NL, dtype=torch.float64)
    mx = x.gather(1, x.abs().argmax(1, keepdim=True))
    q = v[((x / (mx / -127)).unsqueeze(-1) - v).abs().argmin(-1)]
    d = ((x**3 * q).sum(1, keepdim=True) / (x**2 * q**2).sum(1, keepdim=True)).float().half().float()
    close = (xq - q.float() * d).abs() <= 1e-6 * x.abs().amax()
    assert close.float().mean() > 0.999  # the float32 sums may move d by an ulp
    s = setting_from_name("W4A16-iq4nl")
    assert (s.weights.label, s.weights.bits_per_weight, s.weights.nonuniform) == ("iq4_nl", 4.5, True)
    assert torch.equal(quantize(torch.zeros(2, 32), s.weights).xq, torch.zeros(2, 32))


def test_runs_that_measured_their_bits_per_weight_are_placed_there():
    """A run's weight_bits_per_weight (what its tensors take on the model: block scales, a k-quant's
    fallback rows, a mixture's types) is its x in the formats-vs-bits table, for every family."""
    import pandas as pd

    from quantlens.analysis.format_report import formats_vs_bits
    from quantlens.quantize.settings import resolve_setting

    measured = {"W4A16-g32": 5.0, "W4A16-nf4": 4.5, "W4A16-q4_k": 5.25, "W4A16-q4_k_m": 6.159, "W3A16-q3_k_m": 5.448}
    rows = [{**resolve_setting("W16A16").flat_params(), "model": "m", "wikitext2_ppl": 10.0}]
    rows += [{**resolve_setting(n).flat_params(), "model": "m", "wikitext2_ppl": 12.0, "weight_bits_per_weight": b}
             for n, b in measured.items()]
    t = formats_vs_bits(pd.DataFrame(rows)).set_index("setting")
    assert dict(t["bits"]) == measured
    assert dict(t["family"]) == {"W4A16-g32": "int", "W4A16-nf4": "nf", "W4A16-q4_k": "llama.cpp q_k",
                                 "W4A16-q4_k_m": "llama.cpp q_k_m", "W3A16-q3_k_m": "llama.cpp q_k_m"}


# --- llama.cpp's KV cache types (--cache-type-k/-v) and its q8_0 activations --------------------------
@pytest.mark.parametrize("name, kind", [("W16A16KV8-q8_0", "q8_0"), ("W16A16KV4-q4_0", "q4_0"), ("W16A16KV4-q4_1", "q4_1"),
                                        ("W16A16KV5-q5_0", "q5_0"), ("W16A16KV5-q5_1", "q5_1"), ("W16A16KV4-iq4nl", "iq4_nl")])
def test_the_kv_cache_in_llama_cpps_types_is_each_token_and_head_in_blocks_of_32(name, kind):
    """llama.cpp stores a quantized K (and, with flash attention, V) cache row per token: the heads'
    head_dim values side by side in blocks of 32 — a block never straddles two heads (head_dim % 32 == 0)."""
    from quantlens.quantize.ggml import GGML_TYPES
    from quantlens.quantize.kv import quantize_kv

    x = torch.randn(2, 4, 5, 64, generator=torch.Generator().manual_seed(0))  # [batch, heads, tokens, head_dim]
    got = quantize_kv(x, setting_from_name(name).kv)
    assert torch.equal(got, GGML_TYPES[kind].quantize(x.reshape(-1, 64))[0].reshape(x.shape))


def test_w8a8_q8_0_quantizes_activations_per_token_in_q8_0_blocks_as_llama_cpps_matmul():
    """llama.cpp's CPU matmul for Q8_0 weights quantizes each activation row to Q8_0 (vec_dot_type)."""
    from quantlens.quantize.ggml import GGML_TYPES
    from quantlens.quantize.quant import fake_quantize

    s = setting_from_name("W8A8-q8_0")
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fake_quantize(x, s.activations), GGML_TYPES["q8_0"].quantize(x)[0])
    assert (s.weights.label, s.activations.label) == ("q8_0", "q8_0")


def test_a_kv_type_on_a_model_runs_and_is_measured():
    from transformers import AutoModelForCausalLM

    from quantlens.quantize.patch import full_report, quantize_, restore_

    m = AutoModelForCausalLM.from_pretrained(MODELS / "tiny-llama").eval()
    ids = torch.arange(1, 65).reshape(2, 32)
    with torch.no_grad():
        ref = m(ids).logits
        quantize_(m, "W16A16KV4-q4_0")
        got = m(ids).logits
        err = {r.kind: r.rel_error for r in full_report(m).layers if r.kind in ("key", "value")}
        restore_(m)
        assert torch.equal(m(ids).logits, ref)
    assert not torch.equal(got, ref) and 0 < err["key"] < 0.3 and 0 < err["value"] < 0.3
