"""The packed layouts of released quantized checkpoints, unpacked into float weights — pure tensor code.

Each function rebuilds a linear's weight ``[out_features, in_features]`` (float32) from the tensors
its checkpoint stores, following the format's documented layout; the packers (``*_pack``) write the
same layouts and are what the tests and the demo make checkpoints with.

**GPTQ** (AutoGPTQ / GPTQModel ``QuantLinear``; ``quant_method: gptq``): ``qweight`` int32
``[in·bits/32, out]`` — the integers of each output column as one little-endian bit stream along the
input features (2/4/8 bits: 32/bits values per word; 3 bits: 32 values in 3 words, values crossing
word boundaries); ``qzeros`` int32 ``[groups, out·bits/32]`` — the zero points, the same stream along
the output features; ``scales`` ``[groups, out]``; ``g_idx`` int32 ``[in]`` — the group of each input
feature (act-order, ``desc_act``, permutes it). ``W[o, i] = scales[g, o] · (q[i, o] − z[g, o])``
with ``g = g_idx[i]``; the v1 layout (``checkpoint_format: gptq``, AutoGPTQ's) stores ``z − 1`` and
is read as AutoGPTQ reads it, stored + 1 (so it cannot hold z = 0: its packer spills the −1 into
the neighbouring zero points — the bug v2 exists for); v2 (GPTQModel's ``gptq_v2``) stores ``z``.

**AWQ** (AutoAWQ ``WQLinear_GEMM``; ``quant_method: awq``, ``version: gemm``): 4 bits only;
``qweight`` int32 ``[in, out/8]`` and ``qzeros`` int32 ``[groups, out/8]`` pack 8 output features per
word, nibble ``k`` holding feature ``AWQ_ORDER[k]`` of its eight; ``scales`` ``[groups, out]``;
``W[o, i] = scales[i // group, o] · (q[i, o] − z[i // group, o])``.

**bitsandbytes 4-bit** (``quant_method: bitsandbytes``, ``load_in_4bit``): ``weight`` uint8 — the
flattened row-major weight, two 4-bit codes a byte, the first in the high nibble; ``absmax`` one
float per ``blocksize`` values (or, nested — double quantization — uint8 codes of an 8-bit
blockwise quantization: ``absmax = nested_quant_map[code] · nested_absmax[block of 256] + offset``);
``quant_map`` the 16 values of NF4 or FP4. ``W = quant_map[code] · absmax[block]``.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of an AWQ GEMM word holds output feature AWQ_ORDER[k] of its 8
PACK_BITS = (2, 3, 4, 8)


# --- bit streams in int32 words ------------------------------------------------------------------------
def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"packed integers of {bits} bits: the GPTQ layout has 2, 3, 4 or 8")


def unpack_stream(words: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """The ``n`` unsigned ``bits``-bit integers packed along ``dim`` of int32 ``words`` as one
    little-endian bit stream (value k at bits k·bits … k·bits + bits − 1), as int64."""
    _check_bits(bits)
    w = words.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF  # the words as unsigned
    if w.shape[0] * 32 < n * bits:
        raise ValueError(f"{w.shape[0]} words of 32 bits along dim {dim} hold fewer than {n} values of {bits} bits")
    pos = torch.arange(n, device=w.device) * bits
    word, shift = pos // 32, pos % 32
    lo = w[word] >> shift.view(-1, *([1] * (w.dim() - 1)))
    spill = (shift + bits - 32).clamp_min(0)  # bits that cross into the next word (3-bit streams)
    nxt = w[(word + 1).clamp_max(w.shape[0] - 1)]
    hi = nxt << (bits - spill).view(-1, *([1] * (w.dim() - 1)))
    v = (lo | torch.where((spill > 0).view(-1, *([1] * (w.dim() - 1))), hi, torch.zeros_like(hi))) & ((1 << bits) - 1)
    return v.movedim(0, dim)


def pack_stream(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of :func:`unpack_stream`: unsigned integers along ``dim`` (filling whole words)
    packed into int32 words."""
    _check_bits(bits)
    v = values.movedim(dim, 0).to(torch.int64)
    n = v.shape[0]
    if n * bits % 32:
        raise ValueError(f"{n} values of {bits} bits along dim {dim} do not fill whole 32-bit words")
    if v.min() < 0 or v.max() >= 1 << bits:
        raise ValueError(f"values outside 0 … {2 ** bits - 1} cannot take {bits} bits")
    out = torch.zeros(n * bits // 32, *v.shape[1:], dtype=torch.int64, device=v.device)
    for k in range(n):  # (packing is test and demo code: clarity over speed)
        pos = k * bits
        word, shift = divmod(pos, 32)
        out[word] |= (v[k] << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            out[word + 1] |= v[k] >> (32 - shift)
    out = torch.where(out >= 1 << 31, out - (1 << 32), out)  # as signed int32 words
    return out.to(torch.int32).movedim(0, dim)


# --- GPTQ ----------------------------------------------------------------------------------------------
def gptq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                    bits: int, *, v1: bool = True, in_features: int | None = None) -> torch.Tensor:
    """A GPTQ linear's weight [out, in] (float32) from its packed tensors (module docstring)."""
    out_f = scales.shape[1]
    in_f = in_features if in_features is not None else qweight.shape[0] * 32 // bits
    q = unpack_stream(qweight, bits, in_f, 0)  # [in, out]
    z = unpack_stream(qzeros, bits, out_f, 1)  # [groups, out]
    if v1:
        z = z + 1  # AutoGPTQ stores z − 1 and reads stored + 1 (no wrap)
    if g_idx is None:
        group = in_f // scales.shape[0]
        g_idx = torch.arange(in_f, device=q.device) // group
    g = g_idx.to(torch.int64)
    if g.numel() != in_f or int(g.max()) >= scales.shape[0] or int(g.min()) < 0:
        raise ValueError(f"g_idx names groups outside the {scales.shape[0]} of scales (or has {g.numel()} entries, not {in_f})")
    w = scales.to(torch.float32)[g] * (q - z[g]).to(torch.float32)
    return w.t().contiguous()


def gptq_pack(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
              *, v1: bool = True) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of a linear whose integer weights are ``q`` [out, in] (0 … 2^bits − 1),
    zero points ``zeros`` and ``scales`` [groups, out], and input groups ``g_idx`` [in]."""
    z = zeros.to(torch.int64)
    if v1:
        if int(z.min()) < 1:
            raise ValueError("the GPTQ v1 layout cannot hold a zero point of 0 (it stores z − 1): use v2")
        z = z - 1
    return {"qweight": pack_stream(q.t().contiguous(), bits, 0), "qzeros": pack_stream(z, bits, 1),
            "scales": scales.to(torch.float16), "g_idx": g_idx.to(torch.int32)}


# --- AWQ (GEMM) ----------------------------------------------------------------------------------------
def _awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] in AWQ's nibble order → int64 [rows, cols]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    nib = torch.stack([(w >> (4 * k)) & 0xF for k in range(8)], dim=-1)  # [rows, cols/8, 8]: nibble k
    natural = torch.empty_like(nib)
    natural[..., list(AWQ_ORDER)] = nib  # nibble k is feature AWQ_ORDER[k]
    return natural.reshape(w.shape[0], -1)


def _awq_pack(v: torch.Tensor) -> torch.Tensor:
    v = v.to(torch.int64).reshape(v.shape[0], -1, 8)
    word = torch.zeros(v.shape[:2], dtype=torch.int64, device=v.device)
    for k, feat in enumerate(AWQ_ORDER):
        word |= v[..., feat] << (4 * k)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """An AWQ GEMM linear's weight [out, in] (float32) from its packed tensors (module docstring)."""
    q = _awq_unpack(qweight)  # [in, out]
    z = _awq_unpack(qzeros)  # [groups, out]
    in_f, groups = q.shape[0], scales.shape[0]
    if in_f % groups:
        raise ValueError(f"{in_f} input features do not split into the {groups} groups of scales")
    g = torch.arange(in_f, device=q.device) // (in_f // groups)
    w = scales.to(torch.float32)[g] * (q - z[g]).to(torch.float32)
    return w.t().contiguous()


def awq_pack(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """The AWQ GEMM tensors of a linear with 4-bit integer weights ``q`` [out, in], ``zeros`` and ``scales`` [groups, out]."""
    if q.shape[0] % 8:
        raise ValueError(f"AWQ GEMM packs output features by 8; this linear has {q.shape[0]}")
    return {"qweight": _awq_pack(q.t().contiguous()), "qzeros": _awq_pack(zeros), "scales": scales.to(torch.float16)}


# --- bitsandbytes 4-bit --------------------------------------------------------------------------------
def bnb_absmax(absmax: torch.Tensor, nested_absmax: torch.Tensor | None = None, nested_quant_map: torch.Tensor | None = None,
               nested_blocksize: int = 256, nested_offset: float = 0.0) -> torch.Tensor:
    """The per-block absmax of a 4-bit weight: as stored, or undone from its 8-bit double quantization."""
    if nested_absmax is None:
        return absmax.to(torch.float32)
    codes = nested_quant_map.to(torch.float32)[absmax.to(torch.int64).reshape(-1)]
    n = codes.numel()
    blocks = -(-n // nested_blocksize)
    padded = torch.zeros(blocks * nested_blocksize, dtype=torch.float32, device=codes.device)
    padded[:n] = codes
    scaled = (padded.view(blocks, nested_blocksize) * nested_absmax.to(torch.float32).view(-1, 1)).reshape(-1)[:n]
    return scaled + nested_offset


def bnb4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, blocksize: int,
                    shape: tuple[int, ...]) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (float32, ``shape``) from its packed bytes, per-block ``absmax``
    (already undone from double quantization: :func:`bnb_absmax`) and 16-value ``quant_map``."""
    a = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    n = 1
    for d in shape:
        n *= int(d)
    codes = torch.empty(a.numel() * 2, dtype=torch.int64, device=a.device)
    codes[0::2] = (a >> 4).to(torch.int64)
    codes[1::2] = (a & 0xF).to(torch.int64)
    if codes.numel() < n:
        raise ValueError(f"{a.numel()} bytes hold fewer than the {n} values of shape {tuple(shape)}")
    vals = quant_map.to(torch.float32)[codes[:n]]
    blocks = -(-n // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"absmax has {absmax.numel()} blocks, shape {tuple(shape)} in blocks of {blocksize} has {blocks}")
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32, device=a.device)
    padded[:n] = vals
    return (padded.view(blocks, blocksize) * absmax.to(torch.float32).view(-1, 1)).reshape(-1)[:n].reshape(shape)
