"""The :class:`Setting` model: one point of a sweep — what happens to the decoder-block linear layers —
and its validation (every invalid value raises :class:`ConfigError` naming the offending field,
before any model is touched), its algebra (:meth:`Setting.canonical`, :meth:`Setting.identity`: the
run identity) and its MLflow params (:mod:`quantlens.quantize.params`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from quantlens.errors import ConfigError
from quantlens.quantize import params
from quantlens.quantize.methods import registry
from quantlens.quantize.spec import GRID_DEFAULTS, CalibrationSpec, CheckpointSpec, KVSpec, PerturbSpec, QuantSpec, Strict


def format_validation_error(err: ValidationError, what: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        parts.append(f"{loc}: {e['msg']}{got_s}")
    return f"invalid {what}: " + "; ".join(parts)


class SettingFields(Strict):
    """One point of a sweep: what happens to the decoder-block linear layers. :class:`Setting` is this
    model with one more field per registered calibrated method (``gptq``, ``awq``, …: its options,
    None unless the setting uses it), so a new method is one module of :mod:`quantlens.quantize.methods`."""

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
    include_mixer_states: bool = Field(False, description="the state matrices of a hybrid's token mixers (conv kernels, "
                                       "Mamba-1's A_log and dt_proj) quantized too, each row along its last dimension "
                                       "(a group that does not tile the row is the row); by default they stay 16-bit "
                                       "(llama.cpp keeps conv kernels and A in F32, though it quantizes Mamba-1's dt_proj). "
                                       "Vectors (D, dt_bias, norms, biases) stay 16-bit always")
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
        methods = registry.chosen(self)
        if len(methods) > 1:
            raise ValueError(f"{' and '.join(m.option for m in methods)}: one calibrated method per setting")
        if self.checkpoint is not None:
            if methods or self.calibration is not None:
                raise ValueError(f"checkpoint: the weights are the checkpoint's; {_method_list()} and calibration do not apply")
            if self.weights is not None and self.checkpoint.layout is None:
                raise ValueError("checkpoint: the weights spec is read from the checkpoint; leave weights out")
            if self.include_lm_head or self.include_embeddings or self.include_routers or self.include_mixer_states:
                raise ValueError("checkpoint: what is quantized is the checkpoint's; include_lm_head / include_embeddings / "
                                 "include_routers / include_mixer_states do not apply")
            return self
        if self.include_mixer_states and self.weights is not None and (self.weights.is_llama_cpp or self.weights.mixture):
            raise ValueError("include_mixer_states: llama.cpp's types are blocks of 32 or 256, longer than a conv kernel's rows "
                             "of 4 taps (llama.cpp keeps those F32); use a format whose group can be the row")
        if not methods:
            if self.calibration is not None:
                raise ValueError(f"calibration: only a calibrated method ({_method_list()}) uses calibration data")
            return self
        method = methods[0].name
        if self.weights is None:
            raise ValueError(f"{method}: needs quantized weights (a weights spec)")
        why = methods[0].supported(self.weights)
        if why:
            raise ValueError(f"{method}: {why}")
        return self  # (a weight perturbation of a calibrated setting is noise matched to the method's own Δ, layer by layer)

    @property
    def method(self) -> str:
        """How the weights are quantized: ``rtn`` (round to nearest, also for no weights), ``gptq``, ``awq``,
        or a released checkpoint's method (``checkpoint`` until it is read)."""
        if self.checkpoint is not None:
            return self.checkpoint.method or "checkpoint"
        methods = registry.chosen(self)
        return methods[0].name if methods else "rtn"

    @property
    def calibrated(self) -> bool:
        """GPTQ or AWQ (a registered calibrated method, :mod:`quantlens.quantize.methods`) calibrated in the sweep
        (a released checkpoint is not: it is read, see :attr:`external_weights`)."""
        return bool(registry.chosen(self))

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
            "include_mixer_states": self.include_mixer_states and quantizes_weights,  # (no activation reaches a state)
        })

    def identity(self) -> dict[str, Any]:
        """What the setting computes, as plain data: equal for two settings exactly when they are the same
        computation. Run keys are built from it, so the same computation is one run."""
        ident = self.canonical().model_dump(exclude={"name", "base"})
        if self.checkpoint is not None:  # the checkpoint is the computation; what it holds is read from it
            ident.pop("weights", None)
            ident["checkpoint"] = {"source": self.checkpoint.source, "revision": self.checkpoint.revision,
                                   **({"models": self.checkpoint.models} if self.checkpoint.models else {})}
        for k in ("include_routers", "include_mixer_states", "calibration", "checkpoint"):  # (fields newer than most runs: absent at their defaults)
            if not ident.get(k):
                ident.pop(k, None)
        for k in registry.options(self):  # a method's options: absent unless used (options of none are still the method)
            if ident.get(k) is None:
                ident.pop(k, None)
        for part in ("weights", "activations", "kv"):  # format fields at their defaults: the keys of runs made before they existed
            if ident.get(part):
                for k, default in {**GRID_DEFAULTS, "mixture": None}.items():
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
        """Flat, stable key/values: the MLflow params schema (:func:`quantlens.quantize.params.flat_params`)."""
        return params.flat_params(self)


Setting = create_model("Setting", __base__=SettingFields, __module__=__name__, **registry.option_fields())
Setting.__doc__ = "One point of a sweep: what happens to the decoder-block linear layers (and, per calibrated method, its options)."


def _method_list() -> str:
    return ", ".join(m.option for m in registry.ranked())


def validated(cls: type[BaseModel], data: dict[str, Any], what: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, what)) from None
