"""Preflight: everything a sweep needs, checked before any model loads, download retries or GPU time.

- every model reference resolves: a registry name, a Hugging Face id, or a local folder — anything
  that looks like a path (``/…``, ``./…``, ``~/…``, more than one ``/``) must be an existing
  model folder, else "no such directory"; a hub id must be in the local cache when the hub is
  offline (``HF_HUB_OFFLINE=1``);
- every local dataset file exists and is not empty;
- the grid (settings, analysis) is valid — :func:`quantlens.pipeline.sweep.load_config` already did that.

The tracking store's reachability is checked by the caller (``Tracker``), also before any work.
"""

from __future__ import annotations

import os

from quantlens.evaluation.data import _expand
from quantlens.pipeline.errors import PreflightError
from quantlens.model.loading import ModelUnavailable, local_revision, resolve_model
from quantlens.pipeline.sweep import SweepConfig


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def preflight(cfg: SweepConfig) -> None:
    """Raise one :class:`PreflightError` / :class:`ModelUnavailable` naming the first problem."""
    for m in cfg.models:
        info = resolve_model(m.ref, m.hf_id)  # ConfigError: unknown names, absent folders
        if hub_offline() and not os.path.isdir(info.hf_id) and local_revision(info, m.revision) is None:
            raise ModelUnavailable(
                f"model {info.hf_id!r} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1): "
                "check the id, download it first, or give a local folder"
            )
    for d in cfg.datasets:
        if d.path:
            try:
                _expand(d.path)
            except Exception as err:
                raise PreflightError(f"dataset {d.name}: {err}") from None
