"""Preflight: everything a sweep needs, checked before any model loads, download retries or GPU time.

- every model reference resolves: a registry name, a Hugging Face id, or a local folder — anything
  that looks like a path (``/…``, ``./…``, ``~/…``, more than one ``/``) must be an existing
  model folder, else "no such directory"; a hub id must be in the local cache when the hub is
  offline (``HF_HUB_OFFLINE=1``);
- every model whose config is here (a local folder or a cached hub snapshot) is one the model
  anatomy understands (:func:`quantlens.model.anatomy.check_config`: built on the meta device, no
  weights read), and its attention can take the sweep's KV-cache settings;
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
    needs_kv = any(s.kv is not None for s in cfg.expanded_settings())
    for m in cfg.models:
        info = resolve_model(m.ref, m.hf_id)  # ConfigError: unknown names, absent folders
        revision = local_revision(info, m.revision)
        if hub_offline() and not os.path.isdir(info.hf_id) and revision is None:
            raise ModelUnavailable(
                f"model {info.hf_id!r} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1): "
                "check the id, download it first, or give a local folder"
            )
        if revision is not None:
            check_anatomy(info.hf_id, m.ref, needs_kv, m.revision)
    for d in cfg.datasets:
        if d.path:
            try:
                _expand(d.path)
            except Exception as err:
                raise PreflightError(f"dataset {d.name}: {err}") from None


def _config_file(model_id: str, revision: str | None) -> str | None:
    if os.path.isdir(model_id):
        path = os.path.join(model_id, "config.json")
        return path if os.path.isfile(path) else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model_id, "config.json", revision=revision)
    return found if isinstance(found, str) else None


def check_anatomy(model_id: str, ref: str, needs_kv: bool, revision: str | None = None) -> None:
    """The model of a local or cached config is one the anatomy understands (one line if not). A
    config understood once is remembered (by its bytes) so that reruns need not import transformers."""
    import hashlib
    from importlib.metadata import version

    from quantlens import __version__
    from quantlens.evaluation.data import cache_dir

    cfg_file = _config_file(model_id, revision)
    if cfg_file is None:
        return  # known only after download: the model flow meets it
    with open(cfg_file, "rb") as fh:
        key = hashlib.sha256(fh.read() + f"|{needs_kv}|{__version__}|{version('transformers')}".encode()).hexdigest()[:20]
    seen = cache_dir() / "anatomy" / f"{key}.ok"
    if seen.is_file():
        return
    import transformers
    from transformers import AutoConfig

    from quantlens.model.anatomy import ModelNotUnderstood, check_config

    try:
        config = AutoConfig.from_pretrained(os.path.dirname(cfg_file))
        body = check_config(config)
    except ModelNotUnderstood as err:
        raise PreflightError(f"model {ref}: not understood by quantlens' model anatomy: {err}") from None
    except (OSError, ValueError) as err:
        raise PreflightError(f"model {ref}: its config cannot be read ({' '.join(str(err).split())[:200]})") from None
    if needs_kv and body.kv_route is None:
        raise PreflightError(f"model {ref}: the sweep has KV-cache settings, but its attention "
                             f"({type(body.parts[0].attention).__name__}) computes K/V in code quantlens cannot reach")
    seen.parent.mkdir(parents=True, exist_ok=True)
    seen.write_text(f"transformers {transformers.__version__}: {body.describe()}\n")
