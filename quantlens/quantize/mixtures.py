"""llama.cpp's quantization mixtures (Q3_K_M, Q4_K_M, Q5_K_M) as data: which llama.cpp type each
weight of a model gets, as ``llama-quantize`` chooses it (``llama_tensor_get_type_impl`` in
``src/llama-quant.cpp``, ggml-org/llama.cpp e21cdc11, 2026-04).

A mixture is a default k-quant and the rules that give some tensors more bits: the attention's value
projection (a fused QKV too) and the MLP's down projection in the layers :func:`use_more_bits` picks
(Q4_K_M, Q5_K_M: Q6_K there) or in the first layers (Q3_K_M), the attention's output projection
(Q3_K_M: Q4_K), and the output head (Q6_K; the token embeddings when the head is tied to them). Each
type then passes llama.cpp's fallback for rows its super-block does not divide
(:meth:`quantlens.quantize.spec.QuantSpec.for_row`: Q6_K → Q8_0 on SmolLM2's 576-wide rows).

Rules llama.cpp keeps for other models are out of scope and said where they would apply: Falcon's,
and the 8-expert MoE rules (a routed expert's down projection follows the dense down rule here).
LLaMA-2/3-70B (80 layers, grouped-query attention) get llama.cpp's bump of the value projection to
Q5_K.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

Rule = Callable[[int, int], str]  # (layer index, layers) → llama.cpp type


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _more(hi: str, lo: str) -> Rule:
    return lambda i, n: hi if use_more_bits(i, n) else lo


@dataclass(frozen=True)
class Mixture:
    """One ``LLAMA_FTYPE_MOSTLY_*_M``: its default type and the types of the tensors it raises."""

    name: str
    default: str
    attn_v: Rule
    ffn_down: Rule
    attn_output: str
    output: str = "q6_k"

    def describe(self) -> str:
        """One line: the default type and what gets more bits (in a 32-layer model)."""
        v = sorted({self.attn_v(i, 32) for i in range(32)} - {self.default})
        down = sorted({self.ffn_down(i, 32) for i in range(32)} - {self.default})
        return f"{self.default}; v {'/'.join(v)}, down {'/'.join(down)} in some layers; head {self.output}"

    def type_of(self, role: str, layer: int, layers: int, big_gqa: bool = False) -> str:
        """The type of a weight in ``role`` (``attn_v``, ``ffn_down``, ``attn_output``, ``output``, or
        anything else: the default) of block ``layer`` of ``layers``. ``big_gqa``: a LLaMA-70B
        (80 layers, grouped-query attention), whose value projections take at least Q5_K."""
        if role == "output":
            return self.output
        if role == "attn_v":
            t = self.attn_v(layer, layers)
            return "q5_k" if big_gqa and t in ("q3_k", "q4_k") else t
        if role == "ffn_down":
            return self.ffn_down(layer, layers)
        if role == "attn_output":
            return self.attn_output
        return self.default


MIXTURES: dict[str, Mixture] = {
    m.name: m
    for m in (
        Mixture("q3_k_m", "q3_k", lambda i, n: "q5_k" if i < 2 else "q4_k", lambda i, n: "q5_k" if i < n // 16 else "q4_k", "q4_k"),
        Mixture("q4_k_m", "q4_k", _more("q6_k", "q4_k"), _more("q6_k", "q4_k"), "q4_k"),
        Mixture("q5_k_m", "q5_k", _more("q6_k", "q5_k"), _more("q6_k", "q5_k"), "q5_k"),
    )
}

_VALUE = re.compile(r"(?:^|[._])(?:v_proj|value|v|wv|v_lin|v_linear)$")
_FUSED_QKV = re.compile(r"(?:^|[._])(?:qkv_proj|query_key_value|c_attn|Wqkv|qkv|W_pack)$")


def block_roles(attention: list[str], attention_out: str, mlp: list[str], expert_downs: list[str]) -> dict[str, str]:
    """llama.cpp's tensor category of each weight of one block, from the names of its attention
    linears (the output projection among them), its MLP linears in model order (the last one is the
    down projection) and its experts' down-projection tensors: ``attn_v`` (a value projection or a
    fused QKV, which llama.cpp now treats alike), ``attn_output``, ``ffn_down``, else ``other``."""
    roles = {n: "attn_v" if _VALUE.search(n) or _FUSED_QKV.search(n) else "other" for n in attention}
    roles[attention_out] = "attn_output"
    roles.update({n: "other" for n in mlp[:-1]})
    if mlp:
        roles[mlp[-1]] = "ffn_down"
    roles.update({n: "ffn_down" for n in expert_downs})
    return roles
