"""A sweep's plan before any GPU time: per model, its size, the peak GPU memory of each placement,
the placement ``auto`` picks and why, host RAM, and the time per setting and for the grid —
:mod:`quantlens.model.footprint` applied to the sweep's workload (datasets, seqlen, batch, settings).
Torch-free: planning a 66B grid on a laptop imports neither torch nor transformers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from quantlens.evaluation.data import BYTES_PER_TOKEN, DATASETS, DOCUMENTS, HUB_LAMBADA, HUB_TOKENS, LAMBADA_TOKENS  # noqa: F401
from quantlens.quantize.methods import registry
from quantlens.model.footprint import (  # noqa: F401  (the plan's vocabulary, one import for callers)
    GIB, REGISTRY_CONFIGS, Estimate, Shape, Target, Workload, detected_target, estimate, format_estimate,
    placement_error, planned_target, shape_from_checkpoint, shape_from_config,
)


def dataset_tokens(d: Any, seqlen: int) -> tuple[float, int]:
    """(tokens evaluated per setting, examples) of one dataset entry — estimated, not tokenized
    (each dataset's declaration says how)."""
    return DATASETS[d.name].estimate(d, seqlen)


def workload(cfg: Any) -> Workload:
    """The per-model work of a :class:`~quantlens.pipeline.sweep.SweepConfig`."""
    settings = cfg.expanded_settings()
    tokens, examples, seqlens = 0.0, 0, []
    for d in cfg.datasets:
        t, n = dataset_tokens(d, cfg.eval.seqlen)
        tokens += t
        info = DATASETS[d.name]
        if info.row_tokens:
            examples = max(examples, n)
            seqlens.append(info.row_tokens)
        elif info.windowed:
            examples = max(examples, n)
            seqlens.append((d.example_len or 512) + 1 if d.examples in DOCUMENTS else d.seqlen or cfg.eval.seqlen)
    calibrated = list({repr((s.weights, registry.options(s), cfg.calibration_for(s))): s for s in settings if s.calibrated}.values())  # one calibration each
    calib_tokens = max((cfg.calibration_for(s).samples * cfg.calibration_for(s).seqlen for s in calibrated), default=0)
    methods = " / ".join(m.upper() for m in dict.fromkeys(s.method for s in calibrated)) or "GPTQ"
    released = [s for s in settings if s.checkpoint is not None]
    return Workload(seqlen=max(seqlens) if seqlens else 256, tokens=tokens, examples=examples, settings=len(settings),
                    batch_size=cfg.eval.batch_size, act_quant=any(s.activations is not None for s in settings),
                    dtype=cfg.hardware.dtype, placement=cfg.hardware.placement, originals=cfg.hardware.originals,
                    calibrated=len(calibrated), calibration_tokens=float(calib_tokens), methods=methods,
                    released=len(released))


def format_plan(estimates: list[Estimate | None], refs: list[str], target: Target, shards: list[int] | None = None) -> list[str]:
    """The plan as printed by ``--dry-run`` and first by every run; ``shards``: each model's model flow runs."""
    from quantlens.model.footprint import format_duration

    shards = shards or [1] * len(refs)
    lines = [f"plan for {target.describe()}:"]
    total = 0.0
    for ref, e, k in zip(refs, estimates, shards):
        if e is None:
            lines.append(f"{ref}: size not known before download / loading (not cached, or its config lacks dimensions)")
            continue
        lines += format_estimate(e)
        if k > 1:
            lines.append(f"  {k} shards (model flow runs, each loading the model once): ≈ {format_duration(shard_seconds(e, k))} "
                         f"each at most, the reference once (the others wait for it)")
        total += e.seconds
    known = [(e, k) for e, k in zip(estimates, shards) if e is not None]
    if len(known) > 1:
        lines.append(f"grid: ≈ {format_duration(total)} of evaluation in all (one model at a time)")
    if any(k > 1 for _, k in known) or (len(known) > 1 and target.kind != "cpu"):  # what fanning out to GPUs buys
        lines.append(critical_path_line(known))
    return lines


def shard_seconds(e: Estimate, k: int) -> float:
    """The longest of ``k`` shards of a model's settings: the reference (which every shard needs
    first), then its share of the others and of their calibration."""
    others = max(0, e.settings - 1)
    calib = e.calibration_seconds if math.isfinite(e.calibration_seconds) else 0.0
    return e.seconds_per_setting * (1 + math.ceil(others / k)) + calib / k


def critical_path_line(known: list[tuple[Estimate, int]]) -> str:
    """The grid's critical path with every model flow run on a GPU of its own: its longest shard
    (the largest model's, unsharded, whatever the cluster's size)."""
    from quantlens.model.footprint import format_duration

    sharded = max(shard_seconds(e, k) for e, k in known)
    plain = max(e.seconds for e, _ in known)
    longest = max(known, key=lambda ek: shard_seconds(*ek))[0]
    line = f"critical path: ≈ {format_duration(sharded)} with a GPU per model flow run ({longest.model}"
    if sharded < plain:
        return line + f"; unsharded ≈ {format_duration(plain)})"
    return line + "; `shards: N` on it splits its settings over N GPUs)"
