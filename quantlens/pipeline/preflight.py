"""Preflight: everything a sweep needs, checked before any model loads, download retries or GPU time.
Each problem is one line (:class:`PreflightError`, exit 2) within seconds.

- the device exists and is usable: CUDA asked for but not available says why (a CPU-only torch
  build, ``CUDA_VISIBLE_DEVICES``), ``cuda:N`` beyond the GPUs present, MPS absent, bfloat16 on a
  GPU without it; a model's ``gpus:`` more than the node has;
- every model reference resolves: a registry name, a Hugging Face id, or a local folder — anything
  that looks like a path (``/…``, ``./…``, ``~/…``, more than one ``/``) must be an existing
  model folder, else "no such directory"; a hub id must be in the local cache when the hub is
  offline (``HF_HUB_OFFLINE=1``; a dry run plans it from the registry instead, "not cached");
- every model whose config is here (a local folder or a cached hub snapshot) is one the model
  anatomy understands (:func:`quantlens.model.anatomy.check_config`: built on the meta device, no
  weights read), and its attention can take the sweep's KV-cache settings;
- every group size divides the input features of every linear it applies to (shapes read from
  the safetensors headers, or the config / registry when not downloaded);
- every window fits the model's positions (``max_position_embeddings`` / ``n_positions`` of its
  config or registry entry, where it has one): a ``seqlen`` (``eval`` or a dataset's) or
  ``example_len`` + BOS longer than them is refused, not cut down (the default seqlen is capped);
- the configured placement fits the GPU (:mod:`quantlens.pipeline.plan`), else what to use instead;
- every local dataset file exists, is not empty and is text (or parquet / gzip where named so),
  and a plain text / jsonl file holds more bytes than one window has tokens (fewer bytes: no
  window at all; a text that passes this and still has fewer tokens fails when it is tokenized);
- the models still to download fit the free disk of the Hugging Face cache;
- the grid (settings, analysis) is valid — :func:`quantlens.pipeline.sweep.load_config` already did that.

:func:`preflight` returns the plan (:class:`~quantlens.pipeline.plan.Estimate` per model) that
``--dry-run`` prints and every run shows first. The tracking store's reachability is checked by the
caller (``Tracker``), also before any work.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from quantlens.evaluation.data import DATASETS, DOCUMENTS, expand, load_token_rows
from quantlens.model import gguf
from quantlens.model.loading import TOKENIZER_FILES, ModelInfo, ModelUnavailable, local_revision, resolve_model
from quantlens.model.shape import group_misfit
from quantlens.pipeline import plan as P
from quantlens.pipeline.errors import PreflightError
from quantlens.pipeline.sweep import SweepConfig
from quantlens.errors import ConfigError


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


@dataclasses.dataclass(frozen=True)
class ModelCheck:
    """What the checks found of one model: its estimate (None: size known only after download), its
    revision where known without network, and the released checkpoints they read (setting → Released)."""

    estimate: P.Estimate | None
    revision: str | None
    checkpoints: dict[str, Any]


def preflight(cfg: SweepConfig, target: P.Target | None = None, planning: bool = False) -> list[P.Estimate | None]:
    """Raise one :class:`PreflightError` / :class:`ModelUnavailable` naming the first problem; else
    the plan, one estimate per model (None: its size is known only after download).

    ``target``: plan for another machine (``--gpu`` / ``--gpu-memory``; this machine's device is
    then not checked). ``planning`` (a dry run): uncached models offline are planned from the
    registry instead of refused."""
    return [c.estimate for c in check_sweep(cfg, target, planning)]


def check_sweep(cfg: SweepConfig, target: P.Target | None = None, planning: bool = False) -> list[ModelCheck]:
    """Every check of the module, once; one :class:`ModelCheck` per model (see :func:`preflight`)."""
    settings = cfg.expanded_settings()
    target = check_target(cfg, target)
    token_rows, tasks = check_datasets(cfg)
    check_calibration(cfg, settings)
    work = P.workload(cfg)
    out: list[ModelCheck] = []
    to_download = 0.0
    refusals: list[str] = []  # every model checked: the sweep lists every refusal at once
    read: dict[tuple[str, str], Any] = {}  # (setting, source) → Released or None (a refusal already listed)
    for m in cfg.models:
        mine = cfg.settings_for(m)
        released = check_checkpoint_sources(mine, planning, refusals, read)
        work_m = dataclasses.replace(work, settings=len(mine), released=sum(s.checkpoint is not None for s in mine),
                                     released_bits=max((r.bits for r in released.values()), default=4))
        try:
            est, download, revision = _check_model(m, cfg, settings, target, work_m, token_rows, tasks, planning)
            if released:
                check_checkpoints_fit(m, released)
        except ModelUnavailable:
            raise
        except PreflightError as err:
            refusals.append(str(err))
            continue
        to_download += download
        out.append(ModelCheck(est, revision, released))
    if refusals:
        raise PreflightError("\n".join(refusals))
    if to_download and not hub_offline() and not planning:
        check_disk(to_download)
    return out


def check_target(cfg: SweepConfig, target: P.Target | None) -> P.Target:
    """The machine planned for: this one (its device checked) unless another is named."""
    if target is None:
        check_device(cfg.hardware.device)
        target = P.detected_target(cfg.hardware.device)
    if target.kind == "cuda" and cfg.hardware.dtype == "bfloat16" and not target.bf16:
        raise PreflightError(f"hardware.dtype: bfloat16 is not supported by {target.name}: use float16 (or dtype: auto)")
    return target


def check_datasets(cfg: SweepConfig) -> tuple[dict[str, tuple[int, int]], Any]:
    """Every dataset's local files, and lm-eval's tasks: (token-id datasets → (largest id, tokens per
    row), the lm-eval entry or None)."""
    token_rows: dict[str, tuple[int, int]] = {}  # qerror datasets: (largest id, tokens per row)
    for d in cfg.datasets:
        if DATASETS[d.name].token_ids:
            try:
                rows, _ = load_token_rows(d.path, d.limit)
            except ConfigError as err:
                raise PreflightError(f"dataset {d.name}: {err}") from None
            token_rows[d.name] = (int(rows.max()), int(rows.shape[1]))
        elif d.path:
            try:
                for f in expand(d.path):
                    check_text(f)
            except PreflightError as err:
                raise PreflightError(f"dataset {d.name}: {err}") from None
            except Exception as err:
                raise PreflightError(f"dataset {d.name}: {err}") from None
    tasks = next((d for d in cfg.datasets if DATASETS[d.name].harness), None)
    if tasks is not None:
        check_tasks(tasks)
        if cfg.hardware.placement == "stream":
            raise PreflightError(STREAM_TASKS)
    return token_rows, tasks


def check_calibration(cfg: SweepConfig, settings: list) -> None:
    """Every calibrated setting has calibration data, and a calibration file given reads as text."""
    for spec in {id(cfg.calibration_for(s)): cfg.calibration_for(s) for s in settings if s.calibrated}.values():
        try:
            _, path, _ = cfg.calibration_source(spec)
        except ConfigError as err:
            raise PreflightError(str(err)) from None
        if path and spec.path:
            for f in expand(path):
                check_text(f)


def _check_model(m: Any, cfg: Any, settings: list, target: Any, work: Any, token_rows: dict, tasks: Any,
                 planning: bool) -> tuple[P.Estimate | None, float, str | None]:
    """One model's preflight: (its estimate or None when its shape is unknown, bytes to download, its
    revision where known without network)."""
    to_download = 0.0
    if target.kind == "cuda" and m.gpus > target.count:
        raise PreflightError(f"model {m.ref}: gpus: {m.gpus}, but {'this node' if target.here else 'the planned node'} "
                             f"has {target.count} GPU(s)")
    info = m.info()  # ConfigError: unknown names, absent folders, unreadable GGUF files
    revision = local_revision(info, m.revision)
    cached = revision is not None
    if hub_offline() and not cached and not planning:
        raise ModelUnavailable(
            f"model {info.hf_id!r} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1): "
            "check the id, download it first, or give a local folder"
        )
    shape = None
    if cached:
        check_anatomy(info.hf_id, m.ref, any(s.kv is not None for s in settings), m.revision)
    positions = _max_positions(info, m.revision, cached)
    check_windows(m.ref, positions, cfg)
    for name, (_, tokens) in token_rows.items():
        if positions is not None and tokens > positions[0]:
            raise PreflightError(f"dataset {name}: rows of {tokens} tokens are longer than model {m.ref} can take "
                                 f"(its {positions[1]} is {positions[0]})")
    if cached:
        folder = _local_folder(info, m.revision)
        shape = _shape(folder) if folder else None
        if folder:
            check_tokenizer(m.ref, folder, cfg)
    elif info.name in P.REGISTRY_CONFIGS:
        shape = P.shape_from_config(P.REGISTRY_CONFIGS[info.name], source="registry")
    if shape is None:
        return None, to_download, revision
    if not cached:
        to_download += shape.checkpoint_bytes or 2 * shape.params
    check_group_sizes(m.ref, shape, settings)
    for name, (largest, _) in token_rows.items():
        if largest >= shape.vocab:
            raise PreflightError(f"dataset {name}: token id {largest} is outside the vocabulary of model {m.ref} "
                                 f"({shape.vocab} tokens): these ids belong to another tokenizer")
    est = P.estimate(info.name, shape, target, work, cached=cached)
    problem = P.placement_error(est)
    if problem:
        raise PreflightError(problem)
    if tasks is not None and est.placement == "stream":
        raise PreflightError(f"model {m.ref}: needs placement: stream here ({est.why}); {STREAM_TASKS}")
    return est, to_download, revision


def check_checkpoint_sources(settings: list, planning: bool, refusals: list[str], read: dict | None = None) -> dict[str, Any]:
    """Each checkpoint setting's checkpoint, where it is here (a local folder or the Hugging Face cache):
    read (format, grid) and its safetensors headers checked. Returns setting name → Released; the
    problems go to ``refusals``, one line each. One not here is read after its download (offline: refused)."""
    from quantlens.checkpoints.released import QuantizedCheckpoint, describe

    found: dict[str, Any] = {}
    read = {} if read is None else read
    for s in settings:
        if s.checkpoint is None:
            continue
        if (s.name, s.checkpoint.source) in read:
            if read[(s.name, s.checkpoint.source)] is not None:
                found[s.name] = read[(s.name, s.checkpoint.source)]
            continue
        read[(s.name, s.checkpoint.source)] = None
        what = f"setting {s.name}: checkpoint {s.checkpoint.source}"
        try:
            info = resolve_model(s.checkpoint.source)
        except ConfigError as err:
            refusals.append(f"setting {s.name}: checkpoint {str(err).split(' ', 1)[-1]}")
            continue
        folder = _local_folder(info, s.checkpoint.revision)
        if folder is None:
            if hub_offline() and not planning:
                refusals.append(f"{what} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1): "
                                "download it first, or give a local folder")
            continue
        try:
            r = describe(folder, what)
            if r.method != "gguf" or gguf.has_weights(folder):  # (a GGUF file's is read from its header until converted)
                QuantizedCheckpoint(r).header_shapes()
        except ConfigError as err:
            refusals.append(str(err) if str(err).startswith("setting ") else f"setting {s.name}: {err}")
            continue
        found[s.name] = read[(s.name, s.checkpoint.source)] = r
    return found


def check_checkpoints_fit(m: Any, released: dict[str, Any]) -> None:
    """Every readable checkpoint is one of model ``m`` (its config here): config, every quantized layer's
    name and shape, every decoder-block linear present — checked on the model built on the meta device."""
    import torch

    info = m.info()
    cfg_file = _config_file(info.hf_id, m.revision)
    if cfg_file is None:
        return  # the model is known only after download: the model flow checks it then
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantlens.checkpoints.released import check

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(os.path.dirname(cfg_file)))
    problems = []
    for name, r in released.items():
        try:
            check(r, model)
        except ConfigError as err:
            problems.append(f"setting {name} on model {m.ref}: {err}")
    if problems:
        raise PreflightError("\n".join(problems))


STREAM_TASKS = ("lm-eval tasks run the model's own forward per batch, which placement: stream would pay with every "
                "block read again per batch: use placement: single or device_map for a sweep with tasks")


def check_tasks(d: Any) -> None:
    """lm-eval is installed, ``include_path`` is a folder, and every task or group name is known."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise PreflightError("datasets: lm-eval tasks need lm-evaluation-harness: pip install 'lm_eval>=0.4.8,<0.5' "
                             "(scripts/install.sh installs it)") from None
    if d.include_path and not os.path.isdir(d.include_path):
        raise PreflightError(f"lm-eval: include_path {d.include_path!r} is not a folder")
    from quantlens.evaluation.harness import task_manager

    known = task_manager(d.include_path).all_tasks
    unknown = [t for t in d.tasks or [] if t not in known]
    if unknown:
        import difflib

        hints = {t: difflib.get_close_matches(t, known, n=1) for t in unknown}
        said = ", ".join(f"{t!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for t, h in hints.items())
        raise PreflightError(f"lm-eval: unknown task(s) {said}; `lm-eval ls tasks` lists them, include_path adds your own")


def check_device(device: str) -> None:
    """The configured device exists here and is usable (one line naming why not)."""
    if device in ("auto", "cpu"):
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}"
            why = (f"{build} is a CPU-only build (install a CUDA build of torch)" if torch.version.cuda is None
                   else f"{build} (CUDA {torch.version.cuda}) sees no GPU")
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise PreflightError(f"hardware.device: {device!r}, but CUDA is not available here: {why}; "
                                 f"CUDA_VISIBLE_DEVICES={'unset' if visible is None else repr(visible)}")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise PreflightError(f"hardware.device: {device!r}, but this node has {torch.cuda.device_count()} GPU(s) "
                                 f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    if device == "mps" and not torch.backends.mps.is_available():
        raise PreflightError("hardware.device: 'mps', but MPS is not available here (Apple silicon with a torch build for it)")


def check_tokenizer(ref: str, folder: str, cfg: SweepConfig) -> None:
    """A model folder without a tokenizer evaluates only token-id datasets (qerror): one line otherwise."""
    if any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        return
    text = [d.name for d in cfg.datasets if DATASETS[d.name].text]
    if text:
        raise PreflightError(f"model {ref}: no tokenizer in {folder}, and dataset {text[0]} is text: add the tokenizer's files "
                             "(only qerror, released token ids, evaluates without one)")


def check_group_sizes(ref: str, shape: P.Shape, settings: list) -> None:
    """Every weight and activation group size divides the input features of every block linear (and
    of the routers a setting includes)."""
    gcd = math.gcd(*shape.linears.values()) if shape.linears else 0
    fitting = [g for g in (16, 32, 64, 128, 256) if gcd and gcd % g == 0]
    hint = f"group sizes that divide every linear: {', '.join(map(str, fitting))}" if fitting else f"use a divisor of {gcd}"
    for s in settings:
        for part, spec in (("weights", s.weights), ("activations", s.activations)):
            g = getattr(spec, "group_size", None) if spec is not None else None
            if not g:
                continue
            rows = {**shape.linears, **(shape.routers if s.include_routers else {})}  # (Gemma-3n's 4-wide AltUp maps: when included)
            misfit = group_misfit(lambda n, spec=spec: spec.for_row(n).group_size, rows.items())
            if misfit is not None:
                name, n_in = misfit
                raise PreflightError(f"setting {s.name}: {part} group size {spec.for_row(n_in).group_size} does not divide the {n_in} input "
                                     f"features of {name} (model {ref}); {hint}")
        g = s.kv.group_size if s.kv is not None and s.kv.granularity == "token" else None
        if g and shape.head_dim and shape.head_dim % g:
            raise PreflightError(f"setting {s.name}: kv group size {g} does not divide the head_dim {shape.head_dim} of the "
                                 f"attention heads (model {ref}; K/V rows are [batch, heads, tokens, {shape.head_dim}])")


POSITION_KEYS = ("max_position_embeddings", "n_positions")


def _max_positions(info: ModelInfo, revision: str | None, cached: bool) -> tuple[int, str] | None:
    """(positions, config key) of a local / cached config or of the registry entry; None when the
    config is not here or has no such key (BLOOM's ALiBi, models known only after download)."""
    config: dict[str, Any] | None = None
    if cached:
        f = _config_file(info.hf_id, revision)
        if f is not None:
            try:
                with open(f, encoding="utf-8") as fh:
                    config = json.load(fh)
            except (OSError, ValueError):
                config = None  # check_anatomy reports an unreadable config
    elif info.name in P.REGISTRY_CONFIGS:
        config = P.REGISTRY_CONFIGS[info.name]
    for key in POSITION_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value, key
    return None


def _windows_of(d: Any, cfg: SweepConfig) -> tuple[int, str] | None:
    """(tokens per window, what sets it) of a dataset entry as the sweep evaluates it; None where
    nothing the user gave sets a length (lm-eval tasks, lambada without seqlen, the default seqlen)."""
    info = DATASETS[d.name]
    if not info.takes_seqlen:  # lm-eval; released rows: their own length, checked against the positions apart
        return None
    if d.examples in DOCUMENTS:
        n = d.example_len or 512
        return n + 1, f"example_len {n} + BOS"
    if d.seqlen is not None:
        return d.seqlen, f"seqlen {d.seqlen}"
    if not info.windowed or "seqlen" not in cfg.eval.model_fields_set:
        return None  # lambada: passages as they are; the default eval.seqlen is capped at the model's positions
    return cfg.eval.seqlen, f"seqlen {cfg.eval.seqlen} (eval.seqlen)"


def check_windows(ref: str, positions: tuple[int, str] | None, cfg: SweepConfig) -> None:
    """Every dataset's windows fit the model's positions (one line naming the dataset, the length,
    the model and its limit), and a local plain-text dataset holds at least one window."""
    for d in cfg.datasets:
        window = _windows_of(d, cfg)
        if window is not None and positions is not None and window[0] > positions[0]:
            limit, key = positions
            fix = f"a seqlen of at most {limit}" if d.examples == "windows" else f"an example_len of at most {limit - 1}"
            raise PreflightError(f"dataset {d.name}: {window[1]} is longer than model {ref} can take "
                                 f"(its {key} is {limit}): use {fix}")
        if not d.path or not DATASETS[d.name].windowed or d.examples != "windows":
            continue
        if window is None and positions is None:
            continue  # the default seqlen, capped at positions known only after download
        T, what = window or (min(cfg.eval.seqlen, positions[0]), f"seqlen {min(cfg.eval.seqlen, positions[0])}")
        check_text_holds(d.name, d.path, T, what)


TOKEN_SLACK = 2  # special tokens a tokenizer adds to a whole text (BOS, a dummy-prefix piece)


def check_text_holds(name: str, path: str, T: int, what: str) -> None:
    """A local text / jsonl dataset holds at least one window of ``T`` tokens. Every token of a
    byte-level BPE or SentencePiece tokenizer covers at least one byte (one character) of the text,
    and the loaders read at most the files' bytes, so fewer bytes than ``T`` (less the special
    tokens) cannot make one window; compressed files (.gz, .parquet) are not sized here."""
    files = expand(path)
    if any(f.suffix in (".gz", ".parquet") for f in files):
        return
    size = sum(f.stat().st_size for f in files)
    if size + TOKEN_SLACK < T:
        where = str(files[0]) if len(files) == 1 else f"{path} ({len(files)} files)"
        raise PreflightError(f"dataset {name}: {what} is longer than its whole text: {where} has {size} bytes, "
                             f"so fewer than {T} tokens and no window; use a smaller seqlen or a longer text")


def check_text(f: Path) -> None:
    """A data file reads as text (UTF-8; ``.gz`` after decompression) or is a parquet file."""
    if f.suffix == ".parquet":
        with open(f, "rb") as fh:
            if fh.read(4) != b"PAR1":
                raise PreflightError(f"{f} is named .parquet but is not a parquet file")
        return
    opener = gzip.open if f.suffix == ".gz" else open
    try:
        with opener(f, "rb") as fh:
            chunk = fh.read(1 << 20)
    except (OSError, EOFError) as err:
        raise PreflightError(f"{f} cannot be read ({err})") from None
    nul = chunk.find(b"\x00")
    if nul >= 0:
        raise PreflightError(f"{f} is not text (a NUL byte at offset {nul}): give the raw text, jsonl or parquet file")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(chunk, final=False)
    except UnicodeDecodeError as err:
        raise PreflightError(f"{f} is not UTF-8 text (byte 0x{chunk[err.start]:02x} at offset {err.start}): "
                             "give the raw text, jsonl or parquet file") from None


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def check_disk(need_bytes: float) -> None:
    """The models still to download fit the free disk of the Hugging Face cache."""
    where = hf_cache_dir()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need_bytes * 1.05 > free:
        raise PreflightError(f"downloads need ≈ {need_bytes / 1e9:.1f} GB in {where} and {free / 1e9:.1f} GB are free: "
                             "free space, or set HF_HOME to a larger disk")


def _shape(folder: str) -> P.Shape | None:
    """The folder's shape; None when its config lacks dimensions the plan reads (transformers'
    defaults fill them at load time: the plan then says "known after loading")."""
    try:
        return P.shape_from_checkpoint(folder)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ValueError) and "safetensors" in str(err):
            raise PreflightError(f"model {folder}: {err}") from None
        return None


def _local_folder(info: ModelInfo, revision: str | None) -> str | None:
    if os.path.isdir(info.hf_id):
        return info.hf_id
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(info.hf_id, revision=revision, local_files_only=True)
    except Exception:
        return None


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
    from quantlens.paths import cache_dir

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
        raise PreflightError(f"model {ref}: the sweep has KV-cache settings, which it cannot take: {body.kv_refusal}")
    seen.parent.mkdir(parents=True, exist_ok=True)
    seen.write_text(f"transformers {transformers.__version__}: {body.describe()}\n")
