"""The MLflow parameter schema of a setting: flat, stable key/values (:func:`flat_params`), the names
every run logs and every report groups by. Reads a setting through :class:`Described` (the fields it
needs), so it sits below :mod:`quantlens.quantize.setting`.
"""

from __future__ import annotations

from typing import Any, Protocol

from quantlens.quantize.spec import CheckpointSpec, KVSpec, PerturbSpec, QuantSpec


class Described(Protocol):
    """What the params schema reads of a :class:`~quantlens.quantize.setting.Setting`."""

    name: str
    base: str | None
    weights: QuantSpec | None
    activations: QuantSpec | None
    kv: KVSpec | None
    perturbation: PerturbSpec | None
    checkpoint: CheckpointSpec | None
    include_routers: bool
    include_mixer_states: bool

    @property
    def is_reference(self) -> bool: ...

    @property
    def method(self) -> str: ...

    @property
    def external_weights(self) -> bool: ...


def part_params(prefix: str, q: QuantSpec | KVSpec | None) -> dict[str, Any]:
    """One part's own spec (``w_*`` weights, ``a_*`` activations, ``kv_*`` KV cache; 16 bits / "none"
    when the part is untouched)."""
    return {
        f"{prefix}_bits": q.bits if q else 16,
        f"{prefix}_granularity": q.granularity if q else "none",
        f"{prefix}_group_size": q.group_size or 0 if q else 0,
        f"{prefix}_symmetric": q.symmetric if q else True,
        f"{prefix}_transform_p": q.transform_p if q else 1.0,
        f"{prefix}_clip_k": q.clip_k or 0.0 if q else 0.0,
        f"{prefix}_format": q.label if q else "none",
        f"{prefix}_scale": q.scale + (f"+{q.global_scale}" if q.global_scale else "") if q else "none",
    }


def flat_params(s: Described) -> dict[str, Any]:
    """Flat, stable key/values (the MLflow params schema uses these names): each part's own
    spec (``w_*`` weights, ``a_*`` activations, ``kv_*`` KV cache; 16 bits / "none" when the
    part is untouched), ``reference`` (:attr:`is_reference`), an explicit ``quantizer`` (none | uniform | non-uniform | mixed |
    noise) and ``nonuniform`` flag, and the summary keys the reports group by
    (``transform_p``, ``clip_k``, ``symmetric``, ``transform``: those of the first quantized
    part, weights → activations → KV); ``include`` (``routers``, ``mixer_states``, ``routers+mixer_states``)
    where the setting quantizes a role kept 16-bit by default."""
    w, a, p, kv = s.weights, s.activations, s.perturbation, s.kv
    parts = [x for x in (w, a, kv) if x is not None]
    spec = parts[0] if parts else None
    kinds = {x.nonuniform for x in parts}
    fams = [x.family for x in parts]
    quantizer = "none" if not parts else "mixed" if len(kinds) > 1 else "non-uniform" if kinds == {True} else "uniform"
    out: dict[str, Any] = {"setting": s.name, "base": s.base or s.name, "reference": s.is_reference,
                           "quantizer": "noise" if p else quantizer, "nonuniform": any(kinds)}
    for prefix, q in (("w", w), ("a", a), ("kv", kv)):
        out.update(part_params(prefix, q))
    out.update({
        "symmetric": spec.symmetric if spec else True,
        "transform": f"power{spec.transform_p:.4g}" if spec and spec.transform_p != 1.0 else "uniform",
        "format": s.method if s.external_weights else fams[0] if fams and len(set(fams)) == 1 else "mixed" if fams else "none",
        "method": s.method if parts else "none",
        "transform_p": spec.transform_p if spec else 1.0,
        "clip_k": spec.clip_k if spec and spec.clip_k is not None else 0.0,
        "perturbation": f"{p.distribution}-{p.rule}-{p.target}" if p else "none",
        "perturbation_match": p.match if p else "none",
        "seed": p.seed if p else 0,
    })
    opted = [k for k, on in (("routers", s.include_routers and (w is not None or a is not None)),
                             ("mixer_states", s.include_mixer_states and w is not None)) if on]  # (where they change something)
    if opted:  # the roles kept 16-bit by default that this setting quantizes too (absent otherwise: earlier runs' params unchanged)
        out["include"] = "+".join(opted)
    if s.checkpoint is not None:
        out.update(checkpoint=s.checkpoint.source or "per model", checkpoint_revision=s.checkpoint.revision or "default",
                   method=s.method, format=s.method)
    return out
