"""Typed settings: the one source of truth for what a quantization / perturbation setting is.

A :class:`Setting` says how weights and activations of the decoder-block linear layers are
perturbed. Names such as ``W8A8`` or ``W4A16-nu`` are parsed by :func:`resolve_setting`; the
paper's presets are listed in :data:`PRESETS`. Every invalid value raises :class:`ConfigError`
naming the offending field, before any model is touched.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Granularity = Literal["tensor", "channel", "group", "token"]
KVGranularity = Literal["token", "head", "channel"]
Distribution = Literal["gaussian", "uniform", "binary"]
MagnitudeRule = Literal["additive", "proportional", "inverse"]
Target = Literal["weights", "activations", "both", "kv"]

NONUNIFORM_P = 1.0 / 3.0  # the paper's cube-root transform


class ConfigError(ValueError):
    """An invalid setting or config; the message names the field."""


def format_validation_error(err: ValidationError, what: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        parts.append(f"{loc}: {e['msg']}{got_s}")
    return f"invalid {what}: " + "; ".join(parts)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantSpec(_Strict):
    """How one kind of tensor (weights or activations) is quantized."""

    bits: int = Field(8, ge=2, le=16, description="bit width, 2..16")
    granularity: Granularity = "channel"
    group_size: int | None = Field(None, gt=0, description="only with granularity='group'")
    symmetric: bool = True
    transform_p: float = Field(
        1.0, gt=0.0, le=1.0, description="power transform exponent p; 1 = uniform, 1/3 = paper's non-uniform"
    )
    clip_k: float | None = Field(None, gt=0.0, description="clip at k·σ of the group; None = max|x|")

    @model_validator(mode="after")
    def _group_size_matches_granularity(self) -> "QuantSpec":
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("group_size is required when granularity is 'group'")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size is only valid with granularity 'group' (granularity is {self.granularity!r})")
        return self

    @property
    def nonuniform(self) -> bool:
        return self.transform_p != 1.0


class KVSpec(_Strict):
    """How the KV cache is quantized: keys (after the rotary embedding where there is one) and
    values, per head, as a cache would hold them ([batch, heads, tokens, head_dim]).

    ``token``: one scale per token and head over head_dim (``group_size`` splits head_dim);
    ``head``: one scale per head over all its tokens and dims; ``channel``: one scale per head_dim
    channel of a head over the tokens (KIVI's choice for keys).
    """

    bits: int = Field(8, ge=2, le=16, description="bit width, 2..16")
    granularity: KVGranularity = "token"
    group_size: int | None = Field(None, gt=0, description="token granularity: groups of head_dim")
    symmetric: bool = True
    transform_p: float = Field(1.0, gt=0.0, le=1.0, description="power transform exponent p; 1/3 = cube root")
    clip_k: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _group_only_per_token(self) -> "KVSpec":
        if self.group_size is not None and self.granularity != "token":
            raise ValueError(f"group_size is only valid with granularity 'token' (granularity is {self.granularity!r})")
        return self

    @property
    def nonuniform(self) -> bool:
        return self.transform_p != 1.0

    def row_spec(self) -> QuantSpec:
        """The quantizer applied along the last dim once K/V are laid out for this granularity."""
        gran = {"granularity": "group", "group_size": self.group_size} if self.group_size else {"granularity": "token"}
        return QuantSpec(bits=self.bits, symmetric=self.symmetric, transform_p=self.transform_p, clip_k=self.clip_k, **gran)


class PerturbSpec(_Strict):
    """Artificial noise replacing the native quantization error Δ, with Var(noise) = Var(Δ).

    The setting's own ``weights`` / ``activations`` specs are the reference quantizers whose error
    variance the noise matches; ``target`` picks which of them are perturbed.
    """

    distribution: Distribution = "gaussian"
    rule: MagnitudeRule = "additive"
    target: Target = "both"
    seed: int = Field(0, ge=0)
    inverse_eps: float = Field(
        0.1, gt=0.0, description="'inverse' rule: noise ∝ 1/(|x| + eps·rms(x)) (assumed regulariser)"
    )
    rng: Literal["cpu", "device"] = Field(
        "cpu", description="'cpu': bit-identical noise on CPU and GPU; 'device': faster activation noise"
    )
    match: Literal["token", "batch"] = Field(
        "token",
        description="activations / KV: match the noise's std (and the inverse rule's rms) per token — independent "
        "of batching and padding — or over the real (unpadded) tokens of each batch",
    )


class Setting(_Strict):
    """One point of a sweep: what happens to the decoder-block linear layers."""

    name: str = Field(min_length=1)
    base: str | None = Field(None, description="the setting this one was derived from (groups seeds/k in figures)")
    weights: QuantSpec | None = None
    activations: QuantSpec | None = None
    kv: KVSpec | None = Field(None, description="KV-cache quantization (keys after RoPE, values), per head")
    perturbation: PerturbSpec | None = None
    include_lm_head: bool = False
    include_embeddings: bool = False

    @model_validator(mode="after")
    def _perturbation_has_reference(self) -> "Setting":
        p = self.perturbation
        if p is None:
            return self
        if p.target in ("weights", "both") and self.weights is None:
            raise ValueError(f"perturbation.target {p.target!r} needs a weights spec as the reference quantizer")
        if p.target in ("activations", "both") and self.activations is None:
            raise ValueError(
                f"perturbation.target {p.target!r} needs an activations spec as the reference quantizer"
            )
        if p.target == "kv" and self.kv is None:
            raise ValueError("perturbation.target 'kv' needs a kv spec as the reference quantizer")
        return self

    # --- the settings algebra: what computation a setting is, whatever its name ------------------------
    def canonical(self) -> "Setting":
        """The same computation in one normal form, so that two names of one computation compare equal
        (``W16A16KV16`` ≡ ``W16A16``, ``W16A16-nu`` ≡ ``W16A16``): name and ``base`` are presentation,
        and a field that cannot change the computation takes its default — ``include_lm_head`` /
        ``include_embeddings`` without a weights spec; a perturbation's ``inverse_eps`` unless its rule is
        ``inverse``, ``rng`` unless activations are perturbed, ``match`` unless activations or the KV
        cache are. (16 bits in a *name* already means "not quantized": the parser leaves that part out.)"""
        p = self.perturbation
        if p is not None:
            default = PerturbSpec()
            p = p.model_copy(update={
                "inverse_eps": p.inverse_eps if p.rule == "inverse" else default.inverse_eps,
                "rng": p.rng if self.perturbs_activations() else default.rng,
                "match": p.match if self.perturbs_activations() or self.perturbs_kv() else default.match,
            })
        quantizes_weights = self.weights is not None
        return self.model_copy(update={
            "name": "canonical", "base": None, "perturbation": p,
            "include_lm_head": self.include_lm_head and quantizes_weights,
            "include_embeddings": self.include_embeddings and quantizes_weights,
        })

    def identity(self) -> dict[str, Any]:
        """What the setting computes, as plain data: equal for two settings exactly when they are the same
        computation. Run keys are built from it, so the same computation is one run."""
        return self.canonical().model_dump(exclude={"name", "base"})

    def same_computation(self, other: "Setting") -> bool:
        return self.identity() == other.identity()

    @property
    def is_reference(self) -> bool:
        """The full-precision model: nothing quantized or perturbed — weights, activations, KV cache.
        The one predicate every table, figure, analysis and the ledger ask (the runs log it as the
        ``reference`` param)."""
        c = self.canonical()
        return c.weights is None and c.activations is None and c.kv is None and c.perturbation is None

    @property
    def w_bits(self) -> int:
        return self.weights.bits if self.weights else 16

    @property
    def a_bits(self) -> int:
        return self.activations.bits if self.activations else 16

    @property
    def kv_bits(self) -> int:
        return self.kv.bits if self.kv else 16

    def perturbs_kv(self) -> bool:
        return self.perturbation is not None and self.perturbation.target == "kv"

    def perturbs_weights(self) -> bool:
        return self.perturbation is not None and self.perturbation.target in ("weights", "both")

    def perturbs_activations(self) -> bool:
        return self.perturbation is not None and self.perturbation.target in ("activations", "both")

    def flat_params(self) -> dict[str, Any]:
        """Flat, stable key/values (the MLflow params schema uses these names): each part's own
        spec (``w_*`` weights, ``a_*`` activations, ``kv_*`` KV cache; 16 bits / "none" when the
        part is untouched), ``reference`` (:attr:`is_reference`), an explicit ``quantizer`` (none | uniform | non-uniform | mixed |
        noise) and ``nonuniform`` flag, and the summary keys the reports group by
        (``transform_p``, ``clip_k``, ``symmetric``, ``transform``: those of the first quantized
        part, weights → activations → KV)."""
        w, a, p, kv = self.weights, self.activations, self.perturbation, self.kv
        parts = [x for x in (w, a, kv) if x is not None]
        spec = parts[0] if parts else None
        kinds = {x.nonuniform for x in parts}
        quantizer = "none" if not parts else "mixed" if len(kinds) > 1 else "non-uniform" if kinds == {True} else "uniform"
        out: dict[str, Any] = {"setting": self.name, "base": self.base or self.name, "reference": self.is_reference,
                               "quantizer": "noise" if p else quantizer, "nonuniform": any(kinds)}
        for prefix, q in (("w", w), ("a", a), ("kv", kv)):
            out[f"{prefix}_bits"] = q.bits if q else 16
            out[f"{prefix}_granularity"] = q.granularity if q else "none"
            out[f"{prefix}_group_size"] = q.group_size or 0 if q else 0
            out[f"{prefix}_symmetric"] = q.symmetric if q else True
            out[f"{prefix}_transform_p"] = q.transform_p if q else 1.0
            out[f"{prefix}_clip_k"] = q.clip_k or 0.0 if q else 0.0
        out.update({
            "symmetric": spec.symmetric if spec else True,
            "transform": f"power{spec.transform_p:.4g}" if spec and spec.nonuniform else "uniform",
            "transform_p": spec.transform_p if spec else 1.0,
            "clip_k": spec.clip_k if spec and spec.clip_k is not None else 0.0,
            "perturbation": f"{p.distribution}-{p.rule}-{p.target}" if p else "none",
            "perturbation_match": p.match if p else "none",
            "seed": p.seed if p else 0,
        })
        return out


def _validated(cls: type[BaseModel], data: dict[str, Any], what: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, what)) from None


# --- Names --------------------------------------------------------------------------------------
# W{wbits}A{abits}[KV{kvbits}][-g{group}][-nu][-p{exp}][-clip{k}], e.g. W8A8, W4A16-g128, W4A16-nu,
# W3A16-clip3, W16A16KV4, W4A16KV4-nu. -g is the weights' group size; -nu / -p / -clip apply to every
# quantized part (weights, activations, KV cache); 16 bits means "not quantized".
_NAME = re.compile(
    r"^W(?P<w>\d+)A(?P<a>\d+)(?:KV(?P<kv>\d+))?(?:-g(?P<g>\d+))?(?P<nu>-nu)?(?:-p(?P<p>[0-9.]+))?(?:-clip(?P<k>[0-9.]+))?$"
)
PRESET_NAMES = ("W16A16", "W8A8", "W4A16", "W4A8", "W8A8-nu", "W4A16-nu", "W4A8-nu")


def setting_from_name(name: str) -> Setting:
    """Parse a setting name; 16 bits means 'not quantized' (W16A16 is the baseline)."""
    m = _NAME.match(name)
    if m is None:
        raise ConfigError(
            f"unknown setting {name!r}: expected a preset ({', '.join(PRESET_NAMES)}) or a name of the "
            "form W<bits>A<bits>[KV<bits>][-g<group>][-nu][-p<exp>][-clip<k>], e.g. W3A16-g64-nu, W16A16KV4"
        )
    wb, ab = int(m["w"]), int(m["a"])
    kvb = int(m["kv"]) if m["kv"] else 16
    for field, bits in (("weights.bits", wb), ("activations.bits", ab), ("kv.bits", kvb)):
        if not 2 <= bits <= 16:
            raise ConfigError(f"invalid setting {name!r}: {field}: must be between 2 and 16 (16 = not quantized), got {bits}")
    if m["nu"] and m["p"]:
        raise ConfigError(f"unknown setting {name!r}: use either -nu (p=1/3) or -p<exp>, not both")
    p = NONUNIFORM_P if m["nu"] else float(m["p"]) if m["p"] else 1.0
    k = float(m["k"]) if m["k"] else None
    w_gran: dict[str, Any] = {"granularity": "group", "group_size": int(m["g"])} if m["g"] else {"granularity": "channel"}
    data: dict[str, Any] = {"name": name}
    if wb < 16:
        data["weights"] = {"bits": wb, **w_gran, "transform_p": p, "clip_k": k}
    elif m["g"]:
        raise ConfigError(f"invalid setting {name!r}: weights.group_size given but weights are not quantized (16 bits)")
    if ab < 16:
        data["activations"] = {"bits": ab, "granularity": "token", "transform_p": p, "clip_k": k}
    if kvb < 16:
        data["kv"] = {"bits": kvb, "granularity": "token", "transform_p": p, "clip_k": k}
    return _validated(Setting, data, f"setting {name!r}")


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
    return _validated(Setting, data, what)
