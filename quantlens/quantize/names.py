"""The name grammar of settings: names such as ``W8A8``, ``W4A16-g128-nu`` or ``W4A16-gptq`` parsed
into a :class:`~quantlens.quantize.setting.Setting` (:func:`setting_from_name`, :func:`resolve_setting`),
and the paper's presets (:data:`PRESETS`).
"""

from __future__ import annotations

import re
from typing import Any

from quantlens.errors import ConfigError
from quantlens.quantize.methods import registry
from quantlens.quantize.setting import Setting, validated
from quantlens.quantize.spec import GGML_BLOCK, NO_FP, NONUNIFORM_P, QK_K


# --- Names --------------------------------------------------------------------------------------
# W{wbits}A{abits}[KV{kvbits}][-g{group}][-nu][-p{exp}][-{format}[{bits}][{element}]][-clip{k}], e.g. W8A8,
# W4A16-g128, W4A16-nu, W3A16-clip3, W16A16KV4, W4A16KV4-nu, W4A16-nf4, W8A8-fp8, W8A8-fp8e5m2, W4A4-mxfp4,
# W4A16-nvfp4, W3A16-km, W4A16-q4_0 (llama.cpp's Q4_0; q8_0, q4_1, q5_0, q5_1 too: weights only, blocks of 32), W4A16-gptq / W4A16-awq (GPTQ, AWQ: groups of 128 unless -g). -g is the weights' group size; -nu / -p / -clip and the format apply to every
# quantized part (weights, activations, KV cache), each at its own bits (W4A8-fp: FP4 weights, FP8
# activations; digits after the format must then be every quantized part's bits); 16 bits means "not quantized".
_NAME = re.compile(
    r"^W(?P<w>\d+)A(?P<a>\d+)(?:KV(?P<kv>\d+))?(?:-g(?P<g>\d+))?(?P<nu>-nu)?(?:-p(?P<p>[0-9.]+))?"
    r"(?:-(?P<fmt>nf|fp|mxfp|mxint|nvfp|km|q(?=\d_[01k])|iq4nl)(?P<fb>\d+)?(?P<qv>_[01k](?:_m)?)?(?P<el>e\dm\d)?)?(?:-clip(?P<k>[0-9.]+))?(?:-(?P<calib>[a-z][a-z0-9]*))?$"
)
PRESET_NAMES = ("W16A16", "W8A8", "W4A16", "W4A8", "W8A8-nu", "W4A16-nu", "W4A8-nu")
FORMAT_NAMES = ("W4A16-nf4", "W3A16-nf3", "W4A16-fp4", "W8A8-fp8", "W4A16-mxfp4", "W4A4-mxfp4", "W8A8-mxfp8",
                "W4A16-nvfp4", "W4A4-nvfp4", "W3A16-km", "W4A16-km", "W16A16KV8-fp8", "W16A16KV4-nvfp4",
                "W8A16-q8_0", "W4A16-q4_0", "W4A16-q4_1", "W5A16-q5_0", "W5A16-q5_1", "W4A16-iq4nl",
                "W2A16-q2_k", "W3A16-q3_k", "W4A16-q4_k", "W5A16-q5_k", "W6A16-q6_k", "W3A16-q3_k_m", "W4A16-q4_k_m",
                "W5A16-q5_k_m", "W8A8-q8_0", "W16A16KV8-q8_0", "W16A16KV4-q4_0")
CALIBRATED_NAMES = tuple(n for m in registry.ranked() for n in m.names)  # W4A16-gptq, W3A16-gptq, W4A16-awq, W3A16-awq
MX_BLOCK, NVFP_BLOCK, NF_BLOCK, FP_GROUP, GPTQ_GROUP = 32, 16, 64, 32, 128


def _format_part(fmt: str, part: str, bits: int, element: str | None, group: int | None) -> dict[str, Any]:
    """The fields a format suffix means for one quantized part (``weights``, ``activations``, ``kv``)
    at ``bits``: its grid, scale rule and the block it is defined with."""
    rows = {"weights": "channel", "activations": "token", "kv": "token"}[part]

    def blocks(n: int) -> dict[str, Any]:
        return {"granularity": "token", "group_size": n} if part == "kv" else {"granularity": "group", "group_size": n}

    default = {"granularity": rows} if group is None else blocks(group)
    if fmt == "nf":  # bitsandbytes: blockwise absmax, blocks of 64 (KV: per token and head)
        return {"format": "nf", **(default if group or part == "kv" else blocks(NF_BLOCK))}
    if fmt == "km":
        return {"format": "km", **default}
    if fmt == "fp":  # FP8 per channel / token; narrower FP per group of 32 with an fp16 scale
        if bits not in (4, 6, 8) and element is None:
            raise ValueError(f"{part}: " + NO_FP.format(bits=bits))
        wide = bits == 8 or part == "kv"
        return {"format": "fp", "element": element, **(default if wide or group else blocks(FP_GROUP)),
                **({} if bits == 8 else {"scale": "fp16"})}
    if fmt == "iq4nl":  # llama.cpp's IQ4_NL: a 16-value codebook, blocks of 32, fp16 scale (weights, the KV cache)
        if part == "activations" or bits != 4 or group not in (None, GGML_BLOCK):
            raise ValueError(f"{part}: llama.cpp's iq4_nl quantizes weights and the KV cache at 4 bits in blocks of "
                             f"{GGML_BLOCK} (write W4A16-iq4nl, W16A16KV4-iq4nl)")
        return {"format": "iq4nl", "scale": "fp16", **blocks(GGML_BLOCK)}
    if fmt == "q_k_m":  # llama.cpp's mixture (quantlens.quantize.mixtures): per-tensor k-quants, the head too
        from quantlens.quantize.mixtures import MIXTURES

        if f"q{bits}_k_m" not in MIXTURES:
            raise ValueError(f"llama.cpp has no mixture q{bits}_k_m (mixtures: {', '.join(MIXTURES)})")
        return {**_format_part("q_k", part, bits, element, group), "mixture": f"q{bits}_k_m"}
    if fmt in ("q_0", "q_1", "q_k"):  # llama.cpp's types (quantlens.quantize.ggml): weights in blocks of 32, k-quants of 256
        name = f"q{bits}{fmt[1:]}"
        if part == "kv" and fmt == "q_k" or part == "activations" and name != "q8_0":
            raise ValueError(f"{part}: llama.cpp's {name} is a weight type (write W{bits}A16-{name}; llama.cpp quantizes "
                             "activations to q8_0 — W8A8-q8_0 — and the KV cache to q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl)")
        from quantlens.quantize.ggml import GGML_TYPES

        if f"q{bits}{fmt[1:]}" not in GGML_TYPES:
            raise ValueError(f"llama.cpp has no type q{bits}{fmt[1:]} (its types: {', '.join(GGML_TYPES)})")
        block = QK_K if fmt == "q_k" else GGML_BLOCK
        if group is not None and group != block:
            raise ValueError(f"-g{group}: llama.cpp's q{bits}{fmt[1:]} is defined on blocks of {block}")
        symmetric = fmt == "q_0" or (fmt == "q_k" and bits in (3, 6))  # Q3_K, Q6_K: no minimum
        return {"format": "ggml", "symmetric": symmetric, "scale": "fp16", **blocks(block)}
    if group is not None:
        raise ValueError(f"-g{group}: the {fmt} block size is fixed by its definition ({MX_BLOCK if fmt != 'nvfp' else NVFP_BLOCK}); "
                         "give another block in the long form (group_size)")
    if fmt == "mxint":
        return {"format": "int", "scale": "e8m0", **blocks(MX_BLOCK)}
    if fmt == "mxfp":
        if bits not in (4, 6, 8) and element is None:
            raise ValueError(f"{part}: " + NO_FP.format(bits=bits))
        return {"format": "fp", "element": element, "scale": "e8m0", **blocks(MX_BLOCK)}
    if bits != 4:  # nvfp
        raise ValueError(f"{part}: NVFP4 has 4 bits, not {bits}")
    return {"format": "fp", "element": "e2m1", "scale": "e4m3", "global_scale": "tensor" if part == "weights" else "token",
            **blocks(NVFP_BLOCK)}


def _calibrated(name: str, suffix: str) -> Any:
    methods = registry.known()
    if suffix not in methods:
        raise ConfigError(f"unknown setting {name!r}: -{suffix} is neither a format nor a calibrated method "
                          f"(calibrated: {', '.join('-' + m.name for m in registry.ranked())})")
    return methods[suffix]


def _check_format_bits(name: str, fmt: str, fb: str, qv: str, quantized: dict[str, int]) -> None:
    """Digits after a format (``-nf4``, ``-q4_0``) name every quantized part's bits: one line where they do not."""
    wrong = {part: bits for part, bits in quantized.items() if bits != int(fb)}
    if not wrong:
        return
    said = ", ".join(f"{part} {bits}" for part, bits in wrong.items())
    if fmt == "q":
        raise ConfigError(f"invalid setting {name!r}: llama.cpp's q{fb}{qv} has {fb} bits but {said} bits are quantized: "
                          f"write W{fb}A16-q{fb}{qv} (weights only), or each part's type in the long form")
    raise ConfigError(f"invalid setting {name!r}: -{fmt}{fb} names {fb} bits but {said} bits are quantized: "
                      f"write -{fmt} (each part in {fmt} at its own bits)")


def setting_from_name(name: str) -> Setting:
    """Parse a setting name; 16 bits means 'not quantized' (W16A16 is the baseline)."""
    m = _NAME.match(name)
    if m is None:
        raise ConfigError(
            f"unknown setting {name!r}: expected a preset ({', '.join(PRESET_NAMES)}), a format "
            f"({', '.join(FORMAT_NAMES[:6])}, …) or a name of the form "
            "W<bits>A<bits>[KV<bits>][-g<group>][-nu][-p<exp>][-<nf|fp|mxfp|mxint|nvfp|km>[bits][eXmY]|-q<bits>_<0|1|k|k_m>|-iq4nl][-clip<k>][-<calibrated method: gptq, awq, …>], "
            "e.g. W3A16-g64-nu, W16A16KV4, W4A16-nf4"
        )
    wb, ab = int(m["w"]), int(m["a"])
    kvb = int(m["kv"]) if m["kv"] else 16
    for field, bits in (("weights.bits", wb), ("activations.bits", ab), ("kv.bits", kvb)):
        if not 2 <= bits <= 16:
            raise ConfigError(f"invalid setting {name!r}: {field}: must be between 2 and 16 (16 = not quantized), got {bits}")
    if m["nu"] and m["p"]:
        raise ConfigError(f"unknown setting {name!r}: use either -nu (p=1/3) or -p<exp>, not both")
    fmt = m["fmt"]
    if fmt and (m["nu"] or m["p"]):
        raise ConfigError(f"invalid setting {name!r}: the power transform (-nu / -p) is a grid of integers; "
                          f"it does not combine with -{fmt}")
    p = NONUNIFORM_P if m["nu"] else float(m["p"]) if m["p"] else 1.0
    k = float(m["k"]) if m["k"] else None
    group = int(m["g"]) if m["g"] else None
    if group is not None and wb == 16:
        raise ConfigError(f"invalid setting {name!r}: weights.group_size given but weights are not quantized (16 bits)")
    parts = {"weights": wb, "activations": ab, "kv": kvb}
    quantized = {part: bits for part, bits in parts.items() if bits < 16}
    if fmt and m["fb"]:
        _check_format_bits(name, fmt, m["fb"], m["qv"] or "", quantized)
    data: dict[str, Any] = {"name": name}
    if m["calib"]:  # a calibrated method (GPTQ, AWQ as the second paper runs them: groups of 128 unless -g says otherwise)
        method = _calibrated(name, m["calib"])
        if wb == 16:
            raise ConfigError(f"invalid setting {name!r}: -{method.name} quantizes weights, and weights are at 16 bits")
        group = group or method.group
        data[method.option] = {}
    for part, bits in quantized.items():
        if fmt:
            try:
                spec = _format_part(fmt + (m["qv"] or ""), part, bits, m["el"], group if part == "weights" else None)
            except ValueError as err:
                raise ConfigError(f"invalid setting {name!r}: {err}") from None
        else:
            gran = {"granularity": "group", "group_size": group} if group and part == "weights" else \
                   {"granularity": "channel" if part == "weights" else "token"}
            spec = {**gran, "transform_p": p}
        data[part] = {"bits": bits, **spec, **({"clip_k": k} if k is not None else {})}
        if spec.get("mixture"):  # as llama-quantize writes the file: the output head and embeddings too
            data.update(include_lm_head=True, include_embeddings=True)
    if m["el"] and not fmt:
        raise ConfigError(f"invalid setting {name!r}: an element type needs a format")
    return validated(Setting, data, f"setting {name!r}")


PRESETS: dict[str, Setting] = {n: setting_from_name(n) for n in PRESET_NAMES}


def resolve_setting(spec: str | dict[str, Any] | Setting) -> Setting:
    """A preset/name string, a full dict definition, or a Setting → a validated Setting.

    A dict may start from a name with ``base: W8A8`` and override or add fields, e.g.
    ``{"name": "gauss-W8A8", "base": "W8A8", "perturbation": {"distribution": "gaussian"}}``.
    """
    if isinstance(spec, Setting):
        return spec
    if isinstance(spec, str):
        return setting_from_name(spec)
    if not isinstance(spec, dict):
        raise ConfigError(f"invalid setting: expected a name or a mapping, got {type(spec).__name__}")
    data = dict(spec)
    base = data.pop("base", None)
    if base is not None:
        merged = setting_from_name(str(base)).model_dump(exclude_none=True)
        merged.update(data)
        data = merged
        data.setdefault("name", base)
        data["base"] = str(base)
    what = f"setting {data.get('name')!r}" if data.get("name") else "setting"
    return validated(Setting, data, what)
