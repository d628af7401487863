"""A sweep's plan, made once: config → grid → checks → :class:`SweepPlan`.

:func:`build_plan` is the one way a sweep is understood: the YAML is loaded and validated
(:func:`~quantlens.pipeline.sweep.load_config`: expansion, names, aliases), every check of
:mod:`~quantlens.pipeline.preflight` runs, and what they found — per model its settings, the
revision known before any download, the estimate, the released checkpoints already read — is kept
in typed, frozen records. The CLI builds it, prints it and hands it to the sweep flow; the flows
only run it. A model flow on a remote worker receives its :meth:`SweepPlan.payload` (plain JSON:
the sweep's options, the model entry, its settings), not the YAML to re-derive.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from quantlens.pipeline import plan as P
from quantlens.pipeline.preflight import ModelCheck, check_sweep
from quantlens.pipeline.sweep import ModelEntry, SweepConfig, load_config, run_key, sweep_id
from quantlens.quantize.settings import Setting


@dataclass(frozen=True)
class ModelPlan:
    """One model of the sweep as planned: what its model flow needs and nothing it must re-derive."""

    index: int
    entry: ModelEntry
    settings: tuple[Setting, ...]  # the grid's settings this model runs (its `settings:` subset; the reference first in the grid)
    revision: str | None = None  # known without network (local folder, cached snapshot, GGUF file); None: after download
    estimate: P.Estimate | None = None  # None: its size is known only after download (or a remote worker plans itself)
    checkpoints: dict[str, Any] = field(default_factory=dict)  # checkpoint setting → Released, read by the checks
    shards: int = 1  # model flow runs its settings are split over (:meth:`shard`)
    shard_index: int | None = None  # this plan is that shard's (None: the whole model)

    @property
    def ref(self) -> str:
        return self.entry.ref

    @property
    def label(self) -> str:
        """The model, and which shard of it this is (``opt-66b [2/4]``)."""
        return self.ref if self.shard_index is None else f"{self.ref} [{self.shard_index + 1}/{self.shards}]"

    def shard(self, k: int) -> "ModelPlan":
        """The ``k``-th of :attr:`shards` parts of this model's work: every ``shards``-th of its settings
        besides the reference, round robin in grid order (calibrated ones spread like the rest), and the
        reference in each — evaluated once by whichever shard gets it first, the others waiting for it
        (the KL error and the analyses read it) and reading it back."""
        if not 0 <= k < self.shards:
            raise ValueError(f"{self.ref}: shard {k} of {self.shards}")
        ref = [s for s in self.settings if s.is_reference]
        rest = [s for s in self.settings if not s.is_reference]
        return replace(self, settings=tuple(ref + rest[k::self.shards]), shard_index=k)

    def parts(self) -> list["ModelPlan"]:
        """The model flow runs of this model: its shards, or itself."""
        return [self.shard(k) for k in range(self.shards)] if self.shards > 1 else [self]

    def keys(self, config: SweepConfig, revision: str) -> dict[str, str]:
        """setting name → run key of this model at ``revision``."""
        return {s.name: run_key(revision, self.entry.ref, s, config) for s in self.settings}


@dataclass(frozen=True)
class SweepPlan:
    config: SweepConfig
    sweep_id: str
    settings: tuple[Setting, ...]  # the grid: one setting per computation
    aliases: dict[str, str]  # a setting name left out → the one it computes the same as
    models: tuple[ModelPlan, ...]
    target: P.Target | None = None  # the machine planned for (None: a remote worker's own)

    @property
    def grid_size(self) -> int:
        """How many (model, setting) runs the sweep holds."""
        return sum(len(m.settings) for m in self.models)

    @property
    def steps(self) -> int:
        """The (model flow run, setting) steps the console counts: the grid, and a sharded model's
        reference once more per shard beyond the first (each shard reads it back)."""
        return sum(len(p.settings) for m in self.models for p in m.parts())

    @property
    def reference(self) -> Setting:
        return next(s for s in self.settings if s.is_reference)

    def lines(self) -> list[str]:
        """The plan as ``--dry-run`` prints it and every run shows first."""
        estimates = [m.estimate for m in self.models]
        target = self.target or next((e.target for e in estimates if e is not None), None) \
            or P.detected_target(self.config.hardware.device)
        return P.format_plan(estimates, [m.ref for m in self.models], target, [m.shards for m in self.models])

    def description(self) -> str:
        """The sweep's MLflow parent-run description."""
        cfg = self.config
        return (f"**{cfg.name}** (sweep `{self.sweep_id}`): {len(cfg.models)} model(s) × {len(self.settings)} setting(s) on "
                f"{', '.join(d.name for d in cfg.datasets)}.\n\nModels: {', '.join(m.ref for m in cfg.models)}\n\n"
                f"Settings: {', '.join(s.name for s in self.settings)}\n\nThe resolved config is the artifact "
                "`sweep_config.yaml`; tables and figures are under `report/`.")

    def payload(self, index: int, shard: int | None = None) -> dict[str, Any]:
        """What a model flow on another machine needs, as JSON: the sweep's options, the sweep id, the
        model and its settings (``shard``: that shard's). Paths read here (checkpoint folders) and this
        machine's estimate stay here: the worker downloads and plans on its own device."""
        m = self.models[index] if shard is None else self.models[index].shard(shard)
        return {"config": self.config.model_dump(mode="json"), "sweep_id": self.sweep_id, "index": index,
                "settings": [s.model_dump(mode="json") for s in m.settings],
                **({"shard": shard, "shards": m.shards} if shard is not None else {})}


def from_payload(payload: dict[str, Any]) -> tuple[SweepConfig, str, ModelPlan]:
    """A model flow's plan from :meth:`SweepPlan.payload` (on the worker: validated once there, the
    settings taken as planned — not expanded from names again)."""
    cfg = SweepConfig.model_validate(payload["config"])
    i = payload["index"]
    settings = tuple(Setting.model_validate(s) for s in payload["settings"])
    return cfg, payload["sweep_id"], ModelPlan(i, cfg.models[i], settings, shards=payload.get("shards", 1),
                                               shard_index=payload.get("shard"))


def build_plan(source: str | Path | dict[str, Any] | SweepConfig, target: P.Target | None = None,
               planning: bool = False) -> SweepPlan:
    """Load (unless given a config), check and plan a sweep. Raises one ConfigError /
    PreflightError / ModelUnavailable naming the first problem, before any store is opened."""
    cfg = source if isinstance(source, SweepConfig) else load_config(source)
    checks = check_sweep(cfg, target, planning)
    models = tuple(_model_plan(i, m, cfg, c) for i, (m, c) in enumerate(zip(cfg.models, checks)))
    return SweepPlan(cfg, sweep_id(cfg), tuple(cfg.expanded_settings()), cfg.aliases(), models, target)


def _model_plan(i: int, entry: ModelEntry, cfg: SweepConfig, check: ModelCheck) -> ModelPlan:
    return ModelPlan(i, entry, tuple(cfg.settings_for(entry)), check.revision, check.estimate, check.checkpoints,
                     cfg.shards_for(entry))
