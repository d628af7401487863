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

from quantlens.errors import ConfigError  # noqa: F401  (raised here; importable from here as before)

Granularity = Literal["tensor", "channel", "group", "token"]
KVGranularity = Literal["token", "head", "channel"]
Distribution = Literal["gaussian", "uniform", "binary"]
MagnitudeRule = Literal["additive", "proportional", "inverse"]
Target = Literal["weights", "activations", "both", "kv"]

NONUNIFORM_P = 1.0 / 3.0  # the paper's cube-root transform


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


Format = Literal["int", "fp", "nf", "km"]
Element = Literal["e4m3", "e5m2", "e2m3", "e3m2", "e2m1"]
ScaleType = Literal["fp32", "fp16", "e8m0", "e4m3"]
_ELEMENT_BITS = {"e4m3": 8, "e5m2": 8, "e2m3": 6, "e3m2": 6, "e2m1": 4}
_DEFAULT_ELEMENT = {8: "e4m3", 6: "e2m3", 4: "e2m1"}
_GRID_DEFAULTS = {"format": "int", "element": None, "scale": "fp32", "global_scale": None}
NO_FP = "no FP format has {bits} bits (FP8 e4m3/e5m2, FP6 e2m3/e3m2, FP4 e2m1)"


class _Grid(_Strict):
    """The number format of a quantized part: which grid (``format``, ``element``), which scale rule
    (``scale``, ``global_scale``) — the two orthogonal pieces of :mod:`quantlens.quantize.formats`.

    ``int``: symmetric/asymmetric integers (optionally through the power transform ``transform_p``);
    ``fp``: a minifloat ``element`` (default by bits: 8 → e4m3, 6 → e2m3, 4 → e2m1); ``nf``:
    NormalFloat (2^b quantiles of a normal, blockwise absmax); ``km``: 2^b centroids per row/group
    by k-means on the values (no scale). ``scale``: fp32, fp16, ``e8m0`` (OCP MX power of two) or
    ``e4m3`` (NVFP4); ``global_scale``: NVFP4's second fp32 scale, over the whole ``tensor`` or per
    ``token`` (each row: activations and KV, so a token never depends on its batch)."""

    bits: int = Field(8, ge=2, le=16, description="bit width, 2..16")
    symmetric: bool = True
    transform_p: float = Field(1.0, gt=0.0, le=1.0, description="power transform exponent p; 1 = uniform, 1/3 = paper's non-uniform")
    clip_k: float | None = Field(None, gt=0.0, description="clip at k·σ of the group; None = max|x|")
    format: Format = "int"
    element: Element | None = Field(None, description="format fp: the minifloat (default by bits)")
    scale: ScaleType = "fp32"
    global_scale: Literal["tensor", "token"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_element(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format") == "fp" and data.get("element") is None:
            bits = data.get("bits", 8)
            if isinstance(bits, int) and bits in _DEFAULT_ELEMENT:
                data = {**data, "element": _DEFAULT_ELEMENT[bits]}
        return data

    @model_validator(mode="after")
    def _format_is_consistent(self) -> "_Grid":
        f = self.format
        if f == "fp":
            if self.element is None:
                raise ValueError(NO_FP.format(bits=self.bits))
            if _ELEMENT_BITS[self.element] != self.bits:
                raise ValueError(f"element {self.element} has {_ELEMENT_BITS[self.element]} bits, not {self.bits}")
        elif self.element is not None:
            raise ValueError(f"element is only valid with format 'fp' (format is {f!r})")
        if f in ("nf", "km") and self.bits > 8:
            raise ValueError(f"format {f!r}: at most 8 bits (a codebook of 2^bits entries), got {self.bits}")
        if f != "int" and self.transform_p != 1.0:
            raise ValueError(f"transform_p (the power transform) is only valid with format 'int' (format is {f!r})")
        if not self.symmetric and (f != "int" or self.scale != "fp32"):
            raise ValueError("symmetric: false is only valid with format 'int' and scale 'fp32'")
        if f == "km" and self.scale != "fp32":
            raise ValueError("format 'km': a k-means codebook has no scale (leave scale at fp32)")
        if self.scale == "e8m0" and f not in ("int", "fp"):
            raise ValueError(f"scale 'e8m0' (OCP MX) is only valid with format 'int' or 'fp' (format is {f!r})")
        if self.scale == "e8m0" and f == "int" and self.bits != 8:
            raise ValueError(f"scale 'e8m0' with format 'int': MXINT is defined at 8 bits only, got {self.bits}")
        if self.clip_k is not None and (f == "km" or self.scale in ("e8m0", "e4m3")):
            raise ValueError(f"clip_k: clipping means nothing for format {f!r} with scale {self.scale!r} "
                             "(a k-means codebook or a power-of-two/E4M3 block scale has no free range)")
        if self.global_scale is not None and self.scale != "e4m3":
            raise ValueError("global_scale (NVFP4's second-level fp32 scale) needs scale 'e4m3'")
        return self

    @property
    def nonuniform(self) -> bool:
        """Levels not evenly spaced: the power transform, a minifloat, NormalFloat or a codebook."""
        return self.transform_p != 1.0 or self.format in ("fp", "nf", "km")

    @property
    def family(self) -> str:
        """The format family the report compares: int, cuberoot / power, fp, mxfp, mxint, nvfp, nf, km."""
        if self.format == "int":
            if self.scale == "e8m0":
                return "mxint"
            if self.transform_p != 1.0:
                return "cuberoot" if abs(self.transform_p - 1 / 3) < 1e-9 else "power"
            return "int"
        if self.format == "fp":
            return "mxfp" if self.scale == "e8m0" else "nvfp" if self.scale == "e4m3" and self.global_scale else "fp"
        return self.format

    @property
    def label(self) -> str:
        """A short name of the format at its width: int4, cuberoot4, fp4-e2m1, mxfp4-e2m1, nvfp4, nf4, km3."""
        fam = self.family
        return f"{fam}{self.bits}-{self.element}" if fam in ("fp", "mxfp") else f"{fam}{self.bits}"


class QuantSpec(_Grid):
    """How one kind of tensor (weights or activations) is quantized."""

    granularity: Granularity = "channel"
    group_size: int | None = Field(None, gt=0, description="only with granularity='group' (the block size)")

    @model_validator(mode="after")
    def _group_size_matches_granularity(self) -> "QuantSpec":
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("group_size is required when granularity is 'group'")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size is only valid with granularity 'group' (granularity is {self.granularity!r})")
        if self.global_scale is not None and self.granularity != "group":
            raise ValueError("global_scale needs granularity 'group' (blocks under one tensor/token scale)")
        return self

    def grid_fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _Grid.model_fields}


class KVSpec(_Grid):
    """How the KV cache is quantized: keys (after the rotary embedding where there is one) and
    values, per head, as a cache would hold them ([batch, heads, tokens, head_dim]).

    ``token``: one scale per token and head over head_dim (``group_size`` splits head_dim);
    ``head``: one scale per head over all its tokens and dims; ``channel``: one scale per head_dim
    channel of a head over the tokens (KIVI's choice for keys). Any format of :class:`QuantSpec`.
    """

    granularity: KVGranularity = "token"
    group_size: int | None = Field(None, gt=0, description="token granularity: groups of head_dim")

    @model_validator(mode="after")
    def _group_only_per_token(self) -> "KVSpec":
        if self.group_size is not None and self.granularity != "token":
            raise ValueError(f"group_size is only valid with granularity 'token' (granularity is {self.granularity!r})")
        if self.global_scale is not None and self.group_size is None:
            raise ValueError("global_scale needs group_size (blocks of head_dim under one per-row scale)")
        return self

    def row_spec(self) -> QuantSpec:
        """The quantizer applied along the last dim once K/V are laid out for this granularity."""
        gran = {"granularity": "group", "group_size": self.group_size} if self.group_size else {"granularity": "token"}
        fields = {k: getattr(self, k) for k in _Grid.model_fields}
        if fields["global_scale"] is not None:
            fields["global_scale"] = "token"  # one fp32 scale per row (token and head)
        return QuantSpec(**fields, **gran)


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


class GPTQSpec(_Strict):
    """GPTQ's own parameters (:mod:`quantlens.quantize.gptq`); the grid is the setting's weights spec."""

    damp: float = Field(0.01, gt=0, lt=1, description="H += damp · mean(diag H) · I (the second paper: 0.01)")
    act_order: bool = Field(True, description="columns in order of decreasing Hessian diagonal (desc_act)")
    block: int = Field(128, gt=0, description="columns per lazy batch update")


class AWQSpec(_Strict):
    """AWQ's own parameters (:mod:`quantlens.quantize.awq`); the grid is the setting's weights spec."""

    grid: int = Field(20, gt=0, description="α searched over {0, 1/grid, …}: AWQ's n_grid (and the clip search's)")
    clip: bool = Field(True, description="then clip each group at the range that minimises its output error (AutoAWQ's "
                       "auto_clip; not the query / key projections)")
    max_shrink: float = Field(0.5, gt=0, lt=1, description="the clip search goes down to (1 − max_shrink)·max|w|")


class CalibrationSpec(_Strict):
    """The data a calibrated method (GPTQ) sees: ``samples`` windows of ``seqlen`` tokens. ``dataset``
    ``auto`` is the sweep's first text dataset — its windows after the evaluated ones (disjoint), or
    those of ``path`` (another split, e.g. WikiText-2's valid.txt) — drawn with ``seed``."""

    dataset: str = "auto"
    path: str | None = None
    samples: int = Field(128, gt=0)
    seqlen: int = Field(2048, ge=2)
    seed: int = 0


class CheckpointSpec(_Strict):
    """A released quantized checkpoint of the sweep's model (:mod:`quantlens.model.released`): a hub id
    or a local folder, and the hub revision (None: the default branch) — or, for a sweep of several
    models, ``models``: each model's checkpoint (by the model's ref or name; a model without one does
    not run the setting). What it holds (method, bits, groups) is read from the checkpoint once it is
    downloaded: :meth:`Setting.described`."""

    source: str | None = Field(None, min_length=1, description="hub id (owner/name) or local folder of the quantized checkpoint")
    models: dict[str, str] | None = Field(None, description="model (ref or name) → its checkpoint's hub id or folder")
    revision: str | None = None
    method: str | None = Field(None, description="read from the checkpoint: gptq, awq, bnb, compressed-tensors")
    layout: str | None = Field(None, description="read from the checkpoint: gptq-v1, gptq-v2, awq-gemm, bnb-nf4, ct-…")

    @model_validator(mode="before")
    @classmethod
    def _models_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and data and not set(data) & set(cls.model_fields):  # {model: source, …}
            data = {"models": data}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> "CheckpointSpec":
        if (self.source is None) == (self.models is None):
            raise ValueError("checkpoint: give source (one checkpoint) or models (each model's checkpoint), not both or neither")
        if self.models is not None and not self.models:
            raise ValueError("checkpoint.models: empty")
        return self


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
    include_routers: bool = Field(False, description="MoE routers (and Qwen2-MoE's shared-expert gate) quantized too; "
                                  "by default they stay 16-bit, as deployed MoE quantization leaves them")
    gptq: GPTQSpec | None = Field(None, description="weights quantized by GPTQ on calibration data (the -gptq suffix)")
    awq: AWQSpec | None = Field(None, description="weights quantized by AWQ's activation-aware scales (the -awq suffix)")
    calibration: CalibrationSpec | None = Field(None, description="this setting's calibration data (else the sweep's)")
    checkpoint: CheckpointSpec | None = Field(None, description="the weights of a released quantized checkpoint "
                                              "(hub id or folder), dequantized into the loaded model")

    @model_validator(mode="before")
    @classmethod
    def _checkpoint_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("checkpoint"), str):
            data = {**data, "checkpoint": {"source": data["checkpoint"]}}
        return data

    @model_validator(mode="after")
    def _calibrated_has_a_grid(self) -> "Setting":
        if self.gptq is not None and self.awq is not None:
            raise ValueError("gptq and awq: one calibrated method per setting")
        if self.checkpoint is not None:
            if self.gptq is not None or self.awq is not None or self.calibration is not None:
                raise ValueError("checkpoint: the weights are the checkpoint's; gptq, awq and calibration do not apply")
            if self.weights is not None and self.checkpoint.layout is None:
                raise ValueError("checkpoint: the weights spec is read from the checkpoint; leave weights out")
            if self.include_lm_head or self.include_embeddings or self.include_routers:
                raise ValueError("checkpoint: what is quantized is the checkpoint's; include_lm_head / include_embeddings / "
                                 "include_routers do not apply")
            return self
        method = self.method
        if method == "rtn":
            if self.calibration is not None:
                raise ValueError("calibration: only a calibrated method (gptq, awq) uses calibration data")
            return self
        if self.weights is None:
            raise ValueError(f"{method}: needs quantized weights (a weights spec)")
        from quantlens.quantize.gptq import supported

        why = supported(self.weights)
        if why:
            raise ValueError(f"{method}: {why.replace('GPTQ', method.upper())}")
        return self  # (a weight perturbation of a calibrated setting is noise matched to the method's own Δ, layer by layer)

    @property
    def method(self) -> str:
        """How the weights are quantized: ``rtn`` (round to nearest, also for no weights), ``gptq``, ``awq``,
        or a released checkpoint's method (``checkpoint`` until it is read)."""
        if self.checkpoint is not None:
            return self.checkpoint.method or "checkpoint"
        return "gptq" if self.gptq is not None else "awq" if self.awq is not None else "rtn"

    @property
    def calibrated(self) -> bool:
        """GPTQ or AWQ calibrated in the sweep (a released checkpoint is not: it is read, see :attr:`external_weights`)."""
        return self.gptq is not None or self.awq is not None

    @property
    def external_weights(self) -> bool:
        """The weights come from outside round-to-nearest: calibrated in the sweep, or a released checkpoint's."""
        return self.calibrated or self.checkpoint is not None

    def for_model(self, *names: str) -> "Setting | None":
        """This setting as model ``names`` (its ref, its name) runs it: a checkpoint setting with one
        checkpoint per model takes that model's (None: the model has none, the setting is not its)."""
        if self.checkpoint is None or self.checkpoint.models is None:
            return self
        src = next((self.checkpoint.models[n] for n in names if n in self.checkpoint.models), None)
        if src is None:
            return None
        return self.model_copy(update={"checkpoint": self.checkpoint.model_copy(update={"source": src, "models": None})})

    def described(self, weights: dict[str, Any], method: str, layout: str) -> "Setting":
        """This checkpoint setting with what its checkpoint holds: the weights spec, method and layout."""
        if self.checkpoint is None:
            raise ValueError(f"{self.name}: not a checkpoint setting")
        ck = self.checkpoint.model_copy(update={"method": method, "layout": layout})
        return Setting.model_validate({**self.model_dump(exclude={"checkpoint", "weights"}), "weights": weights,
                                       "checkpoint": ck.model_dump()})

    @model_validator(mode="after")
    def _perturbation_has_reference(self) -> "Setting":
        p = self.perturbation
        if p is None:
            return self
        if p.target in ("weights", "both") and self.weights is None and self.checkpoint is None:  # (a checkpoint's Δ is its own)
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
            "include_routers": self.include_routers and (quantizes_weights or self.activations is not None),
        })

    def identity(self) -> dict[str, Any]:
        """What the setting computes, as plain data: equal for two settings exactly when they are the same
        computation. Run keys are built from it, so the same computation is one run."""
        ident = self.canonical().model_dump(exclude={"name", "base"})
        if self.checkpoint is not None:  # the checkpoint is the computation; what it holds is read from it
            ident.pop("weights", None)
            ident["checkpoint"] = {"source": self.checkpoint.source, "revision": self.checkpoint.revision,
                                   **({"models": self.checkpoint.models} if self.checkpoint.models else {})}
        for k in ("include_routers", "gptq", "awq", "calibration", "checkpoint"):  # (fields newer than most runs: absent at their defaults)
            if not ident.get(k):
                ident.pop(k, None)
        for part in ("weights", "activations", "kv"):  # format fields at their defaults: the keys of runs made before they existed
            if ident.get(part):
                for k, default in _GRID_DEFAULTS.items():
                    if ident[part].get(k, default) == default:
                        ident[part].pop(k, None)
        return ident

    def same_computation(self, other: "Setting") -> bool:
        return self.identity() == other.identity()

    @property
    def is_reference(self) -> bool:
        """The full-precision model: nothing quantized or perturbed — weights, activations, KV cache.
        The one predicate every table, figure, analysis and the ledger ask (the runs log it as the
        ``reference`` param)."""
        c = self.canonical()
        return c.checkpoint is None and c.weights is None and c.activations is None and c.kv is None and c.perturbation is None

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
        fams = [x.family for x in parts]
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
            out[f"{prefix}_format"] = q.label if q else "none"
            out[f"{prefix}_scale"] = q.scale + (f"+{q.global_scale}" if q.global_scale else "") if q else "none"
        out.update({
            "symmetric": spec.symmetric if spec else True,
            "transform": f"power{spec.transform_p:.4g}" if spec and spec.transform_p != 1.0 else "uniform",
            "format": self.method if self.external_weights else fams[0] if fams and len(set(fams)) == 1 else "mixed" if fams else "none",
            "method": self.method if parts else "none",
            "transform_p": spec.transform_p if spec else 1.0,
            "clip_k": spec.clip_k if spec and spec.clip_k is not None else 0.0,
            "perturbation": f"{p.distribution}-{p.rule}-{p.target}" if p else "none",
            "perturbation_match": p.match if p else "none",
            "seed": p.seed if p else 0,
        })
        if self.checkpoint is not None:
            out.update(checkpoint=self.checkpoint.source or "per model", checkpoint_revision=self.checkpoint.revision or "default",
                       method=self.method, format=self.method)
        return out


def _validated(cls: type[BaseModel], data: dict[str, Any], what: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, what)) from None


# --- Names --------------------------------------------------------------------------------------
# W{wbits}A{abits}[KV{kvbits}][-g{group}][-nu][-p{exp}][-{format}[{bits}][{element}]][-clip{k}], e.g. W8A8,
# W4A16-g128, W4A16-nu, W3A16-clip3, W16A16KV4, W4A16KV4-nu, W4A16-nf4, W8A8-fp8, W8A8-fp8e5m2, W4A4-mxfp4,
# W4A16-nvfp4, W3A16-km, W4A16-gptq / W4A16-awq (GPTQ, AWQ: groups of 128 unless -g). -g is the weights' group size; -nu / -p / -clip and the format apply to every
# quantized part (weights, activations, KV cache), each at its own bits (W4A8-fp: FP4 weights, FP8
# activations; digits after the format must then be every quantized part's bits); 16 bits means "not quantized".
_NAME = re.compile(
    r"^W(?P<w>\d+)A(?P<a>\d+)(?:KV(?P<kv>\d+))?(?:-g(?P<g>\d+))?(?P<nu>-nu)?(?:-p(?P<p>[0-9.]+))?"
    r"(?:-(?P<fmt>nf|fp|mxfp|mxint|nvfp|km)(?P<fb>\d+)?(?P<el>e\dm\d)?)?(?:-clip(?P<k>[0-9.]+))?(?P<calib>-gptq|-awq)?$"
)
PRESET_NAMES = ("W16A16", "W8A8", "W4A16", "W4A8", "W8A8-nu", "W4A16-nu", "W4A8-nu")
FORMAT_NAMES = ("W4A16-nf4", "W3A16-nf3", "W4A16-fp4", "W8A8-fp8", "W4A16-mxfp4", "W4A4-mxfp4", "W8A8-mxfp8",
                "W4A16-nvfp4", "W4A4-nvfp4", "W3A16-km", "W4A16-km", "W16A16KV8-fp8", "W16A16KV4-nvfp4")
CALIBRATED_NAMES = ("W4A16-gptq", "W3A16-gptq", "W4A16-awq", "W3A16-awq")
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


def setting_from_name(name: str) -> Setting:
    """Parse a setting name; 16 bits means 'not quantized' (W16A16 is the baseline)."""
    m = _NAME.match(name)
    if m is None:
        raise ConfigError(
            f"unknown setting {name!r}: expected a preset ({', '.join(PRESET_NAMES)}), a format "
            f"({', '.join(FORMAT_NAMES[:6])}, …) or a name of the form "
            "W<bits>A<bits>[KV<bits>][-g<group>][-nu][-p<exp>][-<nf|fp|mxfp|mxint|nvfp|km>[bits][eXmY]][-clip<k>][-gptq|-awq], "
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
        wrong = {part: bits for part, bits in quantized.items() if bits != int(m["fb"])}
        if wrong:
            said = ", ".join(f"{part} {bits}" for part, bits in wrong.items())
            raise ConfigError(f"invalid setting {name!r}: -{fmt}{m['fb']} names {m['fb']} bits but {said} bits are quantized: "
                              f"write -{fmt} (each part in {fmt} at its own bits)")
    data: dict[str, Any] = {"name": name}
    if m["calib"]:  # GPTQ / AWQ as the second paper runs them: groups of 128 unless -g says otherwise (GPTQ: act-order, damp 0.01)
        if wb == 16:
            raise ConfigError(f"invalid setting {name!r}: {m['calib']} quantizes weights, and weights are at 16 bits")
        group = group or GPTQ_GROUP
        data[m["calib"][1:]] = {}
    for part, bits in quantized.items():
        if fmt:
            try:
                spec = _format_part(fmt, part, bits, m["el"], group if part == "weights" else None)
            except ValueError as err:
                raise ConfigError(f"invalid setting {name!r}: {err}") from None
        else:
            gran = {"granularity": "group", "group_size": group} if group and part == "weights" else \
                   {"granularity": "channel" if part == "weights" else "token"}
            spec = {**gran, "transform_p": p}
        data[part] = {"bits": bits, **spec, **({"clip_k": k} if k is not None else {})}
    if m["el"] and not fmt:
        raise ConfigError(f"invalid setting {name!r}: an element type needs a format")
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
