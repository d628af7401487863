"""A sweep's plan before any GPU time: per model, its size, the peak GPU memory of each placement,
the placement ``auto`` picks and why, host RAM, and the time per setting and for the grid —
:mod:`quantlens.model.footprint` applied to the sweep's workload (datasets, seqlen, batch, settings).
Torch-free: planning a 66B grid on a laptop imports neither torch nor transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantlens.evaluation.data import DOCUMENTS
from quantlens.model.footprint import (  # noqa: F401  (the plan's vocabulary, one import for callers)
    GIB, REGISTRY_CONFIGS, Estimate, Shape, Target, Workload, detected_target, estimate, format_estimate,
    placement_error, planned_target, shape_from_checkpoint, shape_from_config,
)


HUB_TOKENS = {"wikitext2": 290_000, "c4": 550_000, "fineweb": 900_000}  # test text, tokens (OPT tokenizer)
HUB_LAMBADA = 5153
LAMBADA_TOKENS = 90  # tokens of a passage, on average
BYTES_PER_TOKEN = 4.0  # English text, BPE


def dataset_tokens(d: Any, seqlen: int) -> tuple[float, int]:
    """(tokens evaluated per setting, examples) of one dataset entry — estimated, not tokenized."""
    if d.name == "lm-eval":  # each task's documents × its choices, ~100 tokens each (an estimate)
        n = (d.limit or 1000) * len(d.tasks or [])
        return float(n * 4 * 100), 0
    if d.name == "lambada":
        if d.path:
            n = sum(sum(1 for _ in open(f, "rb")) for f in _files(d.path))
        else:
            n = HUB_LAMBADA
        n = min(n, d.limit or n)
        return float(n * LAMBADA_TOKENS), n
    if d.name == "qerror":  # released rows: [rows, tokens] int64 files, their sizes say how many (8 bytes a token)
        from quantlens.evaluation.data import token_files

        total = sum(f.stat().st_size for f in token_files(d.path)) / 8
        rows = d.limit * len(token_files(d.path)) if d.limit else int(total // 512)
        return float(min(total, rows * 512)), max(1, rows)
    T = d.seqlen or seqlen
    total = sum(f.stat().st_size for f in _files(d.path)) / BYTES_PER_TOKEN if d.path else HUB_TOKENS.get(d.name, 500_000)
    if d.examples in DOCUMENTS:
        T = (d.example_len or 512) + 1
    n = max(1, int(total // T))
    if d.max_windows:
        n = min(n, d.max_windows)
    return float(n * T), n


def _files(path: str) -> list[Path]:
    from quantlens.evaluation.data import _expand

    return _expand(path)


def workload(cfg: Any) -> Workload:
    """The per-model work of a :class:`~quantlens.pipeline.sweep.SweepConfig`."""
    settings = cfg.expanded_settings()
    tokens, examples, seqlens = 0.0, 0, []
    for d in cfg.datasets:
        t, n = dataset_tokens(d, cfg.eval.seqlen)
        tokens += t
        if d.name == "qerror":
            examples = max(examples, n)
            seqlens.append(512)
        elif d.name not in ("lambada", "lm-eval"):
            examples = max(examples, n)
            seqlens.append((d.example_len or 512) + 1 if d.examples in DOCUMENTS else d.seqlen or cfg.eval.seqlen)
    calibrated = list({repr((s.weights, s.gptq, s.awq, cfg.calibration_for(s))): s for s in settings if s.calibrated}.values())  # one calibration each
    calib_tokens = max((cfg.calibration_for(s).samples * cfg.calibration_for(s).seqlen for s in calibrated), default=0)
    methods = " / ".join(m.upper() for m in dict.fromkeys(s.method for s in calibrated)) or "GPTQ"
    released = [s for s in settings if s.checkpoint is not None]
    return Workload(seqlen=max(seqlens) if seqlens else 256, tokens=tokens, examples=examples, settings=len(settings),
                    batch_size=cfg.eval.batch_size, act_quant=any(s.activations is not None for s in settings),
                    dtype=cfg.hardware.dtype, placement=cfg.hardware.placement, originals=cfg.hardware.originals,
                    calibrated=len(calibrated), calibration_tokens=float(calib_tokens), methods=methods,
                    released=len(released))


def format_plan(estimates: list[Estimate | None], refs: list[str], target: Target) -> list[str]:
    """The plan as printed by ``--dry-run`` and first by every run."""
    lines = [f"plan for {target.describe()}:"]
    total = 0.0
    for ref, e in zip(refs, estimates):
        if e is None:
            lines.append(f"{ref}: size not known before download / loading (not cached, or its config lacks dimensions)")
            continue
        lines += format_estimate(e)
        total += e.seconds
    if len([e for e in estimates if e]) > 1:
        from quantlens.model.footprint import format_duration

        lines.append(f"grid: ≈ {format_duration(total)} of evaluation in all (one model at a time)")
    return lines
