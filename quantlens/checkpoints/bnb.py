"""bitsandbytes 4-bit checkpoints (NF4 / FP4, ``quant_method: bitsandbytes``): per linear the packed
weight, its absmax (nested-quantized or not), the quant map and a JSON quant state recording the
block size and shape (:func:`quantlens.checkpoints.packing.bnb4_dequantize`)."""

from __future__ import annotations

import json

import torch

from quantlens.checkpoints import packing as P
from quantlens.checkpoints.layouts import Layout
from quantlens.errors import ConfigError


def describe(q: dict, what: str) -> dict:
    if not q.get("load_in_4bit"):
        raise ConfigError(f"{what}: bitsandbytes 8-bit (LLM.int8()) mixes int8 and fp16 per outlier column at run time; "
                          "quantlens reads bitsandbytes 4-bit checkpoints")
    kind = str(q.get("bnb_4bit_quant_type", "fp4")).lower()
    if kind not in ("nf4", "fp4"):
        raise ConfigError(f"{what}: bitsandbytes 4-bit type {kind!r} (nf4 or fp4)")
    return dict(method="bnb", layout=f"bnb-{kind}", bits=4, group_size=64, symmetric=True, act_order=False,
                num_format="nf" if kind == "nf4" else "fp", element=None if kind == "nf4" else "e2m1")


def packed_modules(keys: set[str], r) -> dict[str, list[str]]:
    """Module prefix → its weight and every tensor stored beside it (absmax, quant map, quant state)."""
    out = {}
    for k in keys:
        if k.endswith(".weight.absmax"):
            w = k[: -len(".absmax")]
            out[w[: -len(".weight")]] = sorted(x for x in keys if x == w or x.startswith(w + "."))
    return out


def unpack_json(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.to(torch.uint8).cpu().numpy()).decode("utf-8"))


def weight(key: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float weight ``key`` from its stored tensors."""
    state_key = next(k for k in parts if k.startswith(key + ".quant_state.bitsandbytes__"))
    st = unpack_json(parts[state_key])
    absmax = P.bnb_absmax(parts[key + ".absmax"], parts.get(key + ".nested_absmax"), parts.get(key + ".nested_quant_map"),
                          int(st.get("nested_blocksize", 256)), float(st.get("nested_offset", 0.0)))
    return P.bnb4_dequantize(parts[key], absmax, parts[key + ".quant_map"], int(st["blocksize"]), tuple(st["shape"]))


def dequantize(prefix: str, parts: dict, r) -> torch.Tensor:
    return weight(prefix + ".weight", parts)


def weight_shape(prefix: str, shapes: dict, load, r) -> tuple[int, ...] | None:
    """From the JSON quant state (a tiny stored tensor)."""
    state = next(iter(load(lambda k: ".quant_state." in k).values()), None)
    try:
        return tuple(unpack_json(state)["shape"]) if state is not None else None
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"checkpoint {r.folder}: {prefix}'s bitsandbytes quant_state is not readable ({err})") from None


LAYOUT = Layout("bitsandbytes", "bitsandbytes 4-bit", describe, packed_modules, dequantize, weight_shape, order=3)
