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
