"""GGUF files (llama.cpp's) as released checkpoints: ``{name: q4_k_m, checkpoint: model.Q4_K_M.gguf}``.

The file is read as a model source is (:mod:`quantlens.model.gguf`: staged once, dequantized by
transformers' GGUF loader into a cached folder of float weights, tensor names mapped as transformers
maps them), and each weight's llama.cpp type comes from the file's header
(:func:`quantlens.model.gguf.tensor_types`). The weights the file stores in a quantized type are
the checkpoint's quantized layers — read as they dequantize, already exact in float32 — and
everything else (norms, the float tensors; the token embeddings, which are not a linear of the
blocks) is compared with the model, a changed one set for the setting and restored after. So a
model loaded from a GGUF file and its own file read back as a checkpoint change nothing.

The run's weights spec is the type most of the quantized block weights are stored in (a Q4_K_M
file: its mixture's types, listed in the layout); a file that stores every weight in a float type (an
F16 export) is read the same way, its matrices as its weights (16 bits). A type quantlens does not
know (the IQ2/IQ3 codebooks, ternary types) is one line before anything runs.
"""

from __future__ import annotations

from collections import Counter

from quantlens.checkpoints.layouts import Layout
from quantlens.errors import ConfigError
from quantlens.model.gguf import FLOAT_TYPES
from quantlens.quantize.ggml import GGML_TYPES

EMBEDDINGS = ("token_embd.weight", "per_layer_token_embd.weight")  # GGUF names: an embedding, not a linear


def _quantized(q: dict) -> dict[str, str]:
    """Parameter name → llama.cpp type of the weights stored quantized (embeddings left out); a file
    that stores none quantized (an F16 or F32 export): its matrices, in their float type."""
    matrices = {name: t.lower() for name, (t, gguf_name, ndim) in q["tensor_types"].items()
                if ndim >= 2 and gguf_name not in EMBEDDINGS}
    quantized = {name: t for name, t in matrices.items() if t.upper() not in FLOAT_TYPES}
    return quantized or matrices


def describe(q: dict, what: str) -> dict:
    types = _quantized(q)
    unknown = sorted({t for t in types.values() if t not in GGML_TYPES and t.upper() not in FLOAT_TYPES})
    if unknown:
        raise ConfigError(f"{what}: GGUF type {unknown[0].upper()} is not one quantlens reads "
                          f"(types: {', '.join(t.upper() for t in GGML_TYPES)}, and float)")
    if not types:
        raise ConfigError(f"{what}: the GGUF file holds no weight matrix a model of its architecture has")
    counts = Counter(types.values())
    top = counts.most_common(1)[0][0]
    if top not in GGML_TYPES:  # a float export (F16, BF16, F32): its weights as they are, read back
        return dict(method="gguf", layout=f"gguf-{top}", bits=16, group_size=None, symmetric=True, act_order=False)
    main = GGML_TYPES[top]
    return dict(method="gguf", layout="gguf-" + "+".join(t for t, _ in counts.most_common()), bits=main.bits,
                group_size=main.block, symmetric=main.symmetric, act_order=False,
                num_format="iq4nl" if main.rule == "iq4nl" else "ggml")


def packed_modules(keys: set[str], r) -> dict[str, list[str]]:
    """Module → its weight, for every weight the file stores quantized (already float in the folder)."""
    return {name[: -len(".weight")]: [name] for name in _quantized(r.qconfig) if name in keys and name.endswith(".weight")}


def dequantize(prefix: str, parts: dict, r):
    return parts[prefix + ".weight"]


def weight_shape(prefix: str, shapes: dict, load, r) -> tuple[int, ...] | None:
    return shapes.get(prefix + ".weight")


LAYOUT = Layout("gguf", "GGUF (llama.cpp's Q4_0 … Q8_0, k-quants, IQ4_NL)", describe, packed_modules, dequantize, weight_shape, order=5)
