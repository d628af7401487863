"""llama.cpp's k-quants and IQ4_NL (quantlens/quantize/kquants.py): what we dequantize is exactly what the
blocks we would write decode to. The stored integers (codes, sub-block scales and mins, fp16 super-scales)
are packed into ggml's byte layout (ggml-common.h's block_q2_K … block_q6_K, block_iq4_nl) and the ``gguf``
package (llama.cpp's gguf-py, which can only dequantize these types) decodes them: bit for bit equal to ours,
on the shared trained models' weights and on edge blocks. Plus small hand-checked cases. That the codes are
the ones llama.cpp's C quantizer chooses is bench/ggml_reference.py's check (it compiles ggml-quants.c)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize

from quantlens.quantize import kquants

from conftest import MODELS


def _u8(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.int64).numpy().astype(np.uint8)


def _half(t: torch.Tensor, nb: int) -> np.ndarray:
    return t.to(torch.float16).numpy().reshape(nb, 1).view(np.uint8)


def _low2(L: np.ndarray) -> np.ndarray:
    """The 2-bit planes of 256 codes per block: qs[j/4 + l] = L[j+l] | L[j+l+32]<<2 | … (j = 0, 128)."""
    h = L.reshape(-1, 2, 4, 32)
    return (h[:, :, 0] | h[:, :, 1] << 2 | h[:, :, 2] << 4 | h[:, :, 3] << 6).reshape(-1, 64)


def _scales6(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K's 12 bytes of eight 6-bit scales and mins (get_scale_min_k4's inverse)."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, :4], out[:, 4:8] = ls[:, :4], lm[:, :4]
    out[:, 8:] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    out[:, :4] |= (ls[:, 4:] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return out


def pack(kind: str, s: dict[str, torch.Tensor]) -> np.ndarray:
    """Our stored integers as ggml's blocks, one row of bytes per block."""
    nb = s["d"].numel()
    if kind == "iq4_nl":
        L = _u8(s["q"]).reshape(nb, 32)
        return np.concatenate([_half(s["d"], nb), L[:, :16] | L[:, 16:] << 4], 1)
    L = _u8(s["q"]).reshape(nb, 256)
    if kind == "q2_k":
        sc = _u8(s["sc"]) | _u8(s["m"]) << 4
        return np.concatenate([sc, _low2(L), _half(s["d"], nb), _half(s["dmin"], nb)], 1)
    if kind == "q3_k":
        hm = (L.reshape(nb, 8, 32) >> 2 & 1) << np.arange(8, dtype=np.uint8)[None, :, None]
        l6 = _u8(s["sc"])
        sc = np.zeros((nb, 12), np.uint8)
        sc[:, :8] = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
        for j in range(16):
            sc[:, 8 + j % 4] |= (l6[:, j] >> 4) << (2 * (j // 4))
        return np.concatenate([hm.sum(1, dtype=np.uint8), _low2(L & 3), sc, _half(s["d"], nb)], 1)
    if kind in ("q4_k", "q5_k"):
        h = L.reshape(nb, 4, 2, 32)
        ql = ((h[:, :, 0] & 0xF) | (h[:, :, 1] & 0xF) << 4).reshape(nb, 128)
        head = [_half(s["d"], nb), _half(s["dmin"], nb), _scales6(_u8(s["sc"]), _u8(s["m"]))]
        if kind == "q4_k":
            return np.concatenate(head + [ql], 1)
        qh = ((h >> 4) << np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)).reshape(nb, 8, 32).sum(1, dtype=np.uint8)
        return np.concatenate(head + [qh, ql], 1)
    h = L.reshape(nb, 2, 4, 32)  # q6_k
    ql = np.concatenate([(h[:, :, 0] & 0xF) | (h[:, :, 2] & 0xF) << 4, (h[:, :, 1] & 0xF) | (h[:, :, 3] & 0xF) << 4], 2)
    qh = (h[:, :, 0] >> 4) | (h[:, :, 1] >> 4) << 2 | (h[:, :, 2] >> 4) << 4 | (h[:, :, 3] >> 4) << 6
    sc = s["sc"].to(torch.int8).numpy().view(np.uint8)
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc, _half(s["d"], nb)], 1)


QTYPE = {"q2_k": T.Q2_K, "q3_k": T.Q3_K, "q4_k": T.Q4_K, "q5_k": T.Q5_K, "q6_k": T.Q6_K, "iq4_nl": T.IQ4_NL}


def assert_decodes_to_ours(kind: str, x: torch.Tensor) -> None:
    y, stored = kquants.KQUANTS[kind](x)
    got = dequantize(pack(kind, stored), QTYPE[kind]).reshape(y.shape)
    assert np.array_equal(got.view(np.uint32), y.numpy().view(np.uint32)), (kind, np.abs(got - y.numpy()).max())


def _edge() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    n = 256
    rows = [torch.zeros(n), torch.full((n,), 0.25), torch.full((n,), -3.0), torch.randn(n, generator=g) * 1e-6,
            torch.randn(n, generator=g) * 1e-12, torch.randn(n, generator=g).abs(), -torch.randn(n, generator=g).abs(),
            torch.cat([torch.zeros(n // 2), torch.randn(n // 2, generator=g)]),
            torch.where(torch.arange(n) == 5, 7.0, torch.randn(n, generator=g) * 0.01)]
    return torch.stack(rows)


@pytest.mark.parametrize("kind", list(QTYPE))
def test_our_values_are_exactly_the_blocks_we_store_on_edge_blocks(kind):
    assert_decodes_to_ours(kind, _edge())


@pytest.fixture(scope="module")
def weights():
    from safetensors.torch import load_file

    out = []
    for m in ("tiny-llama", "tiny-opt", "tiny-bloom"):
        for k, v in load_file(str(MODELS / m / "model.safetensors")).items():
            if v.ndim == 2 and v.shape[1] % 256 == 0:
                out.append(v.float()[:256])
    assert out, "no shared weight with rows a multiple of 256"
    return out


@pytest.mark.parametrize("kind", list(QTYPE))
def test_our_values_are_exactly_the_blocks_we_store_on_trained_weights(kind, weights):
    for w in weights:
        assert_decodes_to_ours(kind, w)


def test_hand_checked_q6_k_and_iq4_nl():
    # 16 copies of 1..16: make_qx_quants puts max 16 on −32 → iscale −2, the first scale 16/−32 = −0.5 is
    # the least-squares fit (every x = −0.5·(−2x)); all sub-blocks equal, so every stored scale is −128, d = 0.5/128
    x = torch.arange(1.0, 17.0).repeat(16).reshape(1, 256)
    y, s = kquants.q6_k(x)
    assert torch.equal(s["sc"], torch.full((1, 16), -128.0)) and s["d"].item() == 0.5 / 128
    assert torch.equal(y, x)  # x = d·(−128)·(−2x): exact
    # IQ4_NL: a block holding the codebook's own values is reproduced exactly with d = 1
    v = torch.tensor(kquants.KVALUES_IQ4NL, dtype=torch.float32)
    y, s = kquants.iq4_nl(torch.cat([v, v]).reshape(1, 32))
    assert s["d"].item() == 1.0 and torch.equal(y, torch.cat([v, v]).reshape(1, 32))
    # all-zero blocks decode to zero under every type
    for kind, f in kquants.KQUANTS.items():
        assert torch.equal(f(torch.zeros(2, 256))[0], torch.zeros(2, 256)), kind


# --- The k-quants as settings: each tensor as llama-quantize writes it -----------------------------------
K_SETTINGS = {"W2A16-q2_k": "q2_k", "W3A16-q3_k": "q3_k", "W4A16-q4_k": "q4_k", "W5A16-q5_k": "q5_k", "W6A16-q6_k": "q6_k"}
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}  # llama_tensor_get_type
BPW = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "q4_0": 4.5, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "iq4_nl": 4.5}


@pytest.mark.parametrize("name", list(K_SETTINGS))
def test_a_k_quant_setting_writes_each_tensor_as_llama_quantize(name):
    """tiny-llama: down_proj's 512-wide rows take the k-quant (bit for bit kquants' function); the
    128-wide rows of the other linears its fallback type; the layer statistics say which, and the run's
    bits per weight is what the tensors take."""
    from transformers import AutoModelForCausalLM

    from quantlens.quantize.ggml import GGML_TYPES
    from quantlens.quantize.patch import full_report, quantize_, restore_, targets
    from quantlens.quantize.settings import setting_from_name

    kind = K_SETTINGS[name]
    s = setting_from_name(name)
    assert (s.weights.label, s.weights.group_size, s.weights.bits_per_weight) == (kind, 256, BPW[kind])
    model = AutoModelForCausalLM.from_pretrained(MODELS / "tiny-llama").eval()
    before = {t.name: t.param.detach().clone() for t in targets(model, s)}
    quantize_(model, s)
    try:
        rows = {r.layer: r for r in full_report(model).layers if r.kind == "weight"}
        for t in targets(model, s):
            w = before[t.name]
            want = kind if w.shape[1] % 256 == 0 else FALLBACK[kind]
            assert torch.equal(t.param.detach(), GGML_TYPES[want].quantize(w)[0]), t.name
            assert (rows[t.name].format, rows[t.name].bits_per_weight) == (want, BPW[want]), t.name
        n = {t.name: before[t.name].numel() for t in targets(model, s)}
        real = sum(BPW[rows[k].format] * v for k, v in n.items()) / sum(n.values())
        assert full_report(model).summary()["weight_bits_per_weight"] == pytest.approx(real)
        assert sum(r.format == kind for r in rows.values()) == 3  # the three down_proj
    finally:
        restore_(model)
    assert all(torch.equal(t.param, before[t.name]) for t in targets(model, s))


def test_a_row_neither_the_k_quant_nor_its_fallback_divides_is_refused_before_anything_changes():
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantlens.errors import ConfigError
    from quantlens.quantize.patch import quantize_

    m = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=256, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=4)).eval()
    with pytest.raises(ConfigError, match=r"'W4A16-q4_k': weights.group_size: 32 does not divide in_features=48"):
        quantize_(m, "W4A16-q4_k")


def test_k_quant_names_and_their_refusals():
    from quantlens.errors import ConfigError
    from quantlens.quantize.settings import FORMAT_NAMES, setting_from_name

    assert set(K_SETTINGS) <= set(FORMAT_NAMES)
    assert [setting_from_name(n).weights.symmetric for n in K_SETTINGS] == [False, True, False, False, True]
    for bad, why in (("W4A4-q4_k", r"activations: llama.cpp.s q4_k is a weight type \(write W4A16-q4_k; llama.cpp quantizes activations to q8_0"), ("W4A16-g128-q4_k", "defined on blocks of 256"),
                     ("W7A16-q7_k", r"llama.cpp has no type q7_k \(its types: q8_0, q4_0")):
        with pytest.raises(ConfigError, match=why):
            setting_from_name(bad)
