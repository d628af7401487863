"""llama.cpp's mixtures (Q3_K_M, Q4_K_M, Q5_K_M): which type each tensor gets, as llama-quantize
chooses it — checked against llama.cpp's own expected types (its tests/snapshots/qwen3-0.6b.schema,
28 layers) and, on the shared models, tensor by tensor."""

from __future__ import annotations

import pytest
import torch

from conftest import MODELS

# llama.cpp tests/snapshots/qwen3-0.6b.schema (n_layer 28): the layers whose attn_v and ffn_down are q6_K
# under Q4_K_M and Q5_K_M
QWEN3_MORE_BITS = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27}


def test_the_recipes_give_llama_cpps_types_on_a_28_layer_model():
    from quantlens.quantize.mixtures import MIXTURES, use_more_bits

    assert {i for i in range(28) if use_more_bits(i, 28)} == QWEN3_MORE_BITS
    q4, q5, q3 = MIXTURES["q4_k_m"], MIXTURES["q5_k_m"], MIXTURES["q3_k_m"]
    for i in range(28):
        more = i in QWEN3_MORE_BITS
        assert q4.type_of("attn_v", i, 28) == q4.type_of("ffn_down", i, 28) == ("q6_k" if more else "q4_k")
        assert q5.type_of("attn_v", i, 28) == q5.type_of("ffn_down", i, 28) == ("q6_k" if more else "q5_k")
        assert q3.type_of("attn_v", i, 28) == ("q5_k" if i < 2 else "q4_k")
        assert q3.type_of("ffn_down", i, 28) == ("q5_k" if i == 0 else "q4_k")  # i < 28 // 16
        assert (q3.type_of("attn_output", i, 28), q4.type_of("attn_output", i, 28), q5.type_of("attn_output", i, 28)) == ("q4_k", "q4_k", "q5_k")
        assert (q3.type_of("other", i, 28), q4.type_of("other", i, 28), q5.type_of("other", i, 28)) == ("q3_k", "q4_k", "q5_k")
    assert {m.type_of("output", 0, 28) for m in MIXTURES.values()} == {"q6_k"}
    # LLaMA-2-70B (80 layers, grouped-query attention): every value projection at least Q5_K
    assert {q3.type_of("attn_v", i, 80, big_gqa=True) for i in range(80)} == {"q5_k"}
    assert {q4.type_of("attn_v", i, 80, big_gqa=True) for i in range(80)} == {"q5_k", "q6_k"}


def test_roles_of_fused_and_split_attention():
    from quantlens.quantize.mixtures import block_roles

    llama = block_roles(["b.q_proj", "b.k_proj", "b.v_proj", "b.o_proj"], "b.o_proj", ["b.gate_proj", "b.up_proj", "b.down_proj"], [])
    assert llama == {"b.q_proj": "other", "b.k_proj": "other", "b.v_proj": "attn_v", "b.o_proj": "attn_output",
                     "b.gate_proj": "other", "b.up_proj": "other", "b.down_proj": "ffn_down"}
    bloom = block_roles(["b.query_key_value", "b.dense"], "b.dense", ["b.dense_h_to_4h", "b.dense_4h_to_h"], ["b.experts.down_proj"])
    assert bloom == {"b.query_key_value": "attn_v", "b.dense": "attn_output", "b.dense_h_to_4h": "other",
                     "b.dense_4h_to_h": "ffn_down", "b.experts.down_proj": "ffn_down"}


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt", "tiny-bloom"])
def test_q4_k_m_writes_each_tensor_in_its_type(model):
    """3 layers: use_more_bits picks layer 2 only. Its value projection and down projection take Q6_K
    (the value projection's 128-wide rows: Q8_0, llama.cpp's fallback), the others Q4_K (128-wide rows:
    Q5_0); the head Q6_K → Q8_0; the embeddings the default. Each weight is exactly that type's."""
    from transformers import AutoModelForCausalLM

    from quantlens.quantize.ggml import GGML_TYPES
    from quantlens.quantize.patch import full_report, quantize_, restore_, targets
    from quantlens.quantize.settings import setting_from_name

    s = setting_from_name("W4A16-q4_k_m")
    assert (s.weights.label, s.include_lm_head, s.include_embeddings) == ("q4_k_m", True, True)
    m = AutoModelForCausalLM.from_pretrained(MODELS / model).eval()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    quantize_(m, s)
    try:
        rows = {r.layer: r.format for r in full_report(m).layers if r.kind == "weight"}
        params = dict(m.named_parameters())
        for t in targets(m, s):
            layer = next((int(p) for p in t.name.split(".") if p.isdigit()), None)
            v = any(k in t.name for k in ("v_proj", "query_key_value"))
            down = any(t.name.endswith(k) for k in ("down_proj", "fc2", "dense_4h_to_h"))
            want = {"q6_k": "q8_0", "q4_k": "q5_0"}[("q6_k" if layer == 2 else "q4_k") if v else "q4_k"]
            if down:
                want = "q6_k" if layer == 2 else "q4_k"  # 512-wide rows: the k-quant itself
            if t.module is m.get_output_embeddings():
                want = "q8_0"
            assert rows[t.name] == want, t.name
            w = before[next(n for n, p in params.items() if p is t.param)]
            w = w.t() if type(t.module).__name__ == "Conv1D" else w
            assert torch.equal(t.param.detach(), GGML_TYPES[want].quantize(w)[0]), t.name
        emb = [n for n in rows if "embed" in n or "word_embeddings" in n]
        tied = m.get_output_embeddings().weight is m.get_input_embeddings().weight
        assert [rows[n] for n in emb] == ([] if tied else ["q5_0"])  # tied: the head's type (Q8_0) covers both
    finally:
        restore_(m)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_mixture_names_and_their_refusals():
    from quantlens.errors import ConfigError
    from quantlens.quantize.settings import FORMAT_NAMES, setting_from_name

    assert {"W3A16-q3_k_m", "W4A16-q4_k_m", "W5A16-q5_k_m"} <= set(FORMAT_NAMES)
    assert setting_from_name("W3A16-q3_k_m").weights.bits_per_weight == 3.4375  # the default type's; runs measure theirs
    with pytest.raises(ConfigError, match=r"llama.cpp has no mixture q2_k_m \(mixtures: q3_k_m, q4_k_m, q5_k_m\)"):
        setting_from_name("W2A16-q2_k_m")
    with pytest.raises(ConfigError, match="mixture q4_k_m: llama.cpp's recipe on q4_k"):
        from quantlens.quantize.settings import resolve_setting

        resolve_setting({"name": "odd", "weights": {"bits": 4, "format": "int", "granularity": "group", "group_size": 256,
                                                    "mixture": "q4_k_m"}})
