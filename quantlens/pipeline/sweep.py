"""Sweep description (YAML → pydantic), grid expansion and deterministic run identity.

Framework-free: the Prefect flows in ``flows/`` execute the plan made here, and the MLflow layer
in ``tasks/tracking.py`` stores it. Every problem with a config is raised as one
:class:`~quantlens.quantize.settings.ConfigError` naming the field, before any model loads.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from quantlens import __version__
from quantlens.evaluation.data import DATASETS, DOCUMENTS, HARNESS_FIELDS, LM_EVAL  # noqa: F401  (LM_EVAL: importable from here)
from quantlens.quantize.settings import CalibrationSpec, ConfigError, Setting, format_validation_error, resolve_setting

# Bump when a change alters the numbers an evaluation produces: it is part of every run key,
# so finished runs of an older protocol are not taken as done.
EVAL_PROTOCOL = "3"  # 2: per-example NLL and residual statistics stored with every run; 3: keys of the canonical setting


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    ref: str = Field(min_length=1, description="registry name, HF id, local directory or .gguf file")
    hf_id: str | None = Field(None, description="override the registry's HF id (e.g. re-hosted LLaMA)")
    gguf_file: str | None = Field(None, description="a GGUF file of the hub repo or folder `ref` (e.g. model.Q4_K_M.gguf)")
    revision: str | None = Field(None, description="hub revision to pin (branch, tag or commit)")
    gpus: int = Field(1, ge=1, description="GPUs this model asks for on a cluster")
    settings: list[str] | None = Field(None, min_length=1, description="run only these settings of the grid on this model "
                                       "(names as the grid names them; the reference W16A16 always runs); default: all")
    shards: int | None = Field(None, ge=1, description="split this model's settings over N model flow runs (N GPU jobs), "
                               "each loading the model once; the reference runs once, before the others (default: the sweep's shards)")

    def info(self) -> Any:
        """The model this entry names (:func:`quantlens.model.loading.resolve_model`)."""
        from quantlens.model.loading import resolve_model

        return resolve_model(self.ref, self.hf_id, self.gguf_file)

    def label(self) -> str:
        return self.ref if self.gguf_file is None else f"{self.ref}:{self.gguf_file}"


class DatasetEntry(_Strict):
    name: str
    path: str | None = Field(None, description="local file(s); default: the Hugging Face hub")
    seqlen: int | None = Field(None, ge=2)
    max_windows: int | None = Field(None, ge=1, description="perplexity: evaluate at most this many windows")
    limit: int | None = Field(None, ge=1, description="lambada: evaluate the first N examples; qerror: the first N rows of each file")
    examples: Literal["windows", "documents", "paper2"] = Field(
        "windows", description="perplexity: the unit of the per-example analysis (documents: BOS + example_len tokens; "
        "paper2: the second paper's protocol — documents of 512 tokens with BOS, long documents only, near-duplicates "
        "(5-gram Jaccard > 0.1) removed)"
    )
    example_len: int | None = Field(None, ge=2, description="examples: documents: tokens per example (default 512)")
    # name: lm-eval — lm-evaluation-harness tasks (quantlens.evaluation.harness); limit: documents per task
    tasks: list[str] | None = Field(None, min_length=1, description="lm-eval: task or group names (arc_easy, hellaswag, mmlu, …)")
    num_fewshot: int | None = Field(None, ge=0, description="lm-eval: examples in the prompt (default: each task's own)")
    include_path: str | None = Field(None, description="lm-eval: a folder of extra task YAMLs (private or offline tasks)")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r} (known: {', '.join(DATASETS)})")
        return v

    @model_validator(mode="after")
    def _as_declared(self) -> "DatasetEntry":
        """The harness' fields only where the dataset is lm-eval's; then the declaration's own rules."""
        info = DATASETS[self.name]
        given = [k for k in HARNESS_FIELDS if getattr(self, k) is not None]
        if given and not info.harness:
            raise ValueError(f"{', '.join(given)}: only with name: {LM_EVAL}")
        if info.check is not None:
            info.check(self)
        return self

    @model_validator(mode="after")
    def _documents_need_documents(self) -> "DatasetEntry":
        if self.examples in DOCUMENTS and DATASETS[self.name].documents is None:
            with_docs = ", ".join(n for n, d in DATASETS.items() if d.documents)
            raise ValueError(f"examples: {self.name!r} has no documents (documents work for {with_docs})")
        if self.example_len is not None and self.examples not in DOCUMENTS:
            raise ValueError("example_len: only with examples: documents (or paper2)")
        return self


class EvalOptions(_Strict):
    seqlen: int = Field(2048, ge=2, description="perplexity window; the default is capped at the model's max positions, a seqlen given longer than them is refused in preflight")
    batch_size: int | None = Field(None, ge=1, description="None: sized from free memory")


class StatisticsOptions(_Strict):
    """The report's paired statistics: bootstrap intervals over the same examples (quantlens.analysis.paired)."""

    resamples: int = Field(1000, ge=100, le=100_000, description="bootstrap resamples of the examples")
    level: float = Field(0.95, gt=0.5, lt=1.0, description="confidence level of every interval")
    seed: int = Field(0, ge=0, description="seed of the resamples (with the model and dataset)")


class AnalysisOptions(_Strict):
    """Mechanism analyses (layer error, early exit, activation patching) on D_large / D_ctrl, and the
    report's paired statistics."""

    mechanisms: list[str] = Field(default_factory=list, description="settings of the grid to explain (e.g. [W3A16])")
    layers: str = Field("upper_half", description="upper_half | all | upper_k | 'a:b' (patched and compared layers)")
    datasets: list[str] | None = Field(None, description="default: every perplexity dataset of the sweep")
    batch_size: int = Field(8, ge=1)
    statistics: StatisticsOptions = StatisticsOptions()

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str) -> str:
        if v not in ("upper_half", "all", "upper_k") and not re.fullmatch(r"\d*:\d*", v):
            raise ValueError(f"{v!r} is not upper_half, all, upper_k or 'a:b'")
        return v


class Hardware(_Strict):
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    placement: Literal["auto", "single", "device_map", "stream"] = "auto"
    # where the 16-bit originals live while a setting is applied (single / device_map; stream keeps
    # none): memory (host RAM), checkpoint (read back from the safetensors), auto (by size)
    originals: Literal["auto", "memory", "checkpoint"] = "auto"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"{v!r} is not a device (auto, cpu, cuda, cuda:N, mps)")
        return v


class SweepConfig(_Strict):
    name: str = Field(min_length=1)
    experiment: str = Field("quantlens", min_length=1, description="MLflow experiment")
    models: list[ModelEntry] = Field(min_length=1)
    settings: list[str | dict[str, Any]] = Field(min_length=1)
    datasets: list[DatasetEntry] = Field(min_length=1)
    eval: EvalOptions = EvalOptions()
    hardware: Hardware = Hardware()
    analysis: AnalysisOptions = AnalysisOptions()
    calibration: CalibrationSpec = Field(CalibrationSpec(), description="the data of calibrated settings (GPTQ), unless a "
                                         "setting gives its own")
    shards: int = Field(1, ge=1, description="every model's settings split over N model flow runs (a model's own "
                        "`shards` overrides it); how the work is spread, not what it computes: runs and the sweep id are the same")
    _grid: tuple[str, list[Setting], dict[str, str]] | None = PrivateAttr(None)  # the expanded grid, made once per config

    @field_validator("models", "datasets", mode="before")
    @classmethod
    def _short_forms(cls, v: Any, info: ValidationInfo) -> Any:
        """``models: [opt-1.3b]`` / ``datasets: [lambada]`` are short for ``{ref: …}`` / ``{name: …}``."""
        key = "ref" if info.field_name == "models" else "name"
        if isinstance(v, list):
            return [{key: x} if isinstance(x, str) else x for x in v]
        return v

    @model_validator(mode="after")
    def _unique(self) -> "SweepConfig":
        for field, names in (
            ("models", [m.label() for m in self.models]),
            ("datasets", [d.name for d in self.datasets]),
        ):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{field}: duplicated {', '.join(map(repr, dup))}")
        return self

    @model_validator(mode="after")
    def _analysis_datasets(self) -> "SweepConfig":
        names = [d.name for d in self.datasets]
        for d in self.analysis.datasets or []:
            if d not in names:
                raise ValueError(f"analysis.datasets: {d!r} is not one of the sweep's datasets ({', '.join(names)})")
        return self

    def calibration_for(self, setting: Setting) -> CalibrationSpec:
        return setting.calibration or self.calibration

    def calibration_source(self, spec: CalibrationSpec) -> tuple[DatasetEntry, str | None, int]:
        """(the dataset, its file, the first window index) the calibration windows come from: ``path``
        when given (another split), else the windows of the sweep's first text dataset after those it
        evaluates (disjoint). ConfigError when neither exists."""
        text = [d for d in self.datasets if DATASETS.get(d.name) is not None and DATASETS[d.name].kind == "perplexity"]
        if spec.dataset != "auto":
            text = [d for d in self.datasets if d.name == spec.dataset] or \
                ([DatasetEntry(name=spec.dataset)] if DATASETS.get(spec.dataset) and DATASETS[spec.dataset].kind == "perplexity" else [])
            if not text:
                raise ConfigError(f"calibration.dataset: unknown dataset {spec.dataset!r}")
        if not text:
            raise ConfigError("calibration: the sweep has no text dataset to calibrate on (wikitext2, c4, fineweb): "
                              "give calibration.dataset and calibration.path")
        d = text[0]
        if spec.path or d.name not in {e.name for e in self.datasets}:  # another split, or a dataset the sweep does not evaluate
            return d, spec.path, 0
        if d.max_windows is None or d.examples != "windows":
            raise ConfigError(f"calibration: dataset {d.name} is evaluated on all its windows, so none is left to "
                              "calibrate on: give calibration.path (another split, e.g. WikiText-2's valid.txt) or "
                              f"{d.name}.max_windows")
        return d, d.path, d.max_windows

    def analysis_datasets(self) -> list[str]:
        if self.analysis.datasets is not None:
            return list(self.analysis.datasets)
        return [d.name for d in self.datasets if DATASETS[d.name].per_example_analysis]

    def expanded_settings(self) -> list[Setting]:
        """The grid's settings, one per computation: a setting that computes the same as an earlier
        one (``W16A16KV16`` after ``W16A16``, :meth:`Setting.same_computation`) is left out — it is
        that run (:meth:`aliases` lists them)."""
        return self._expand()[0]

    def shards_for(self, entry: "ModelEntry") -> int:
        """How many model flow runs share ``entry``'s settings (never more than the settings besides the reference)."""
        n = entry.shards if entry.shards is not None else self.shards
        return max(1, min(n, sum(1 for s in self.settings_for(entry) if not s.is_reference)))

    def settings_for(self, entry: "ModelEntry") -> list[Setting]:
        """The settings model ``entry`` runs: the grid's (those its ``settings`` names, where it names
        some), a checkpoint setting with one checkpoint per model as this model's (left out where the
        model has none: :meth:`Setting.for_model`)."""
        grid, aliases = self._expand()
        chosen = None if entry.settings is None else {aliases.get(n, n) for n in entry.settings}
        return [x for x in (s.for_model(*_model_names(entry)) for s in grid
                            if chosen is None or s.name in chosen or s.is_reference) if x is not None]

    def check_model_settings(self) -> None:
        """Every setting a model's ``settings`` names is one of the grid (a misspelt one would run nothing)."""
        grid, aliases = self._expand()
        known = {s.name for s in grid} | set(aliases)
        for m in self.models:
            unknown = [n for n in m.settings or [] if n not in known]
            if unknown:
                import difflib

                hint = difflib.get_close_matches(unknown[0], known, n=1)
                raise ConfigError(f"model {m.ref}: settings names {', '.join(map(repr, unknown))}, not a setting of the grid"
                                  + (f" (did you mean {hint[0]!r}?)" if hint else ""))

    def check_checkpoint_models(self) -> None:
        """Every model a checkpoint setting names in ``checkpoint.models`` is a model of the sweep (a
        misspelt one would leave that model without the setting, silently)."""
        known = {n for m in self.models for n in _model_names(m)}
        for s in self.expanded_settings():
            for name in (s.checkpoint.models or {}) if s.checkpoint is not None else {}:
                if name not in known:
                    raise ConfigError(f"setting {s.name}: checkpoint.models names {name!r}, not a model of this sweep "
                                      f"({', '.join(m.ref for m in self.models)})")

    def grid_size(self) -> int:
        """How many (model, setting) runs the sweep holds."""
        return sum(len(self.settings_for(m)) for m in self.models)

    def aliases(self) -> dict[str, str]:
        """Setting names left out of the grid → the name of the setting they compute the same as."""
        return self._expand()[1]

    def _expand(self) -> tuple[list[Setting], dict[str, str]]:
        """(the grid's settings, aliases), expanded and checked once per config object (copies are shared:
        Settings are immutable values)."""
        what = json.dumps([self.settings, self.analysis.mechanisms], sort_keys=True, default=str)  # (a copy with other settings)
        if self._grid is None or self._grid[0] != what:
            self._grid = (what, *self._expand_grid())
        return list(self._grid[1]), dict(self._grid[2])

    def _expand_grid(self) -> tuple[list[Setting], dict[str, str]]:
        out: list[Setting] = []
        for i, entry in enumerate(self.settings):
            try:
                out.extend(expand_setting(entry))
            except ConfigError as err:
                raise ConfigError(f"settings[{i}]: {err}") from None
        names = [s.name for s in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"settings: duplicated setting names {', '.join(map(repr, dup))}")
        unique: list[Setting] = []
        aliases: dict[str, str] = {}
        seen: dict[str, str] = {}
        for s in out:
            ident = json.dumps(s.identity(), sort_keys=True, default=str)
            if ident in seen:
                aliases[s.name] = seen[ident]
            else:
                seen[ident] = s.name
                unique.append(s)
        if self.analysis.mechanisms:
            kept = {s.name for s in unique}
            for m in self.analysis.mechanisms:
                if m in aliases:
                    raise ConfigError(f"analysis.mechanisms: {m!r} is the same computation as {aliases[m]!r}: name that one")
                if m not in kept:
                    raise ConfigError(f"analysis.mechanisms: {m!r} not among the sweep's settings")
                ext = next(s for s in unique if s.name == m)
                if ext.external_weights:
                    raise ConfigError(f"analysis.mechanisms: {m!r} takes its weights from {'a released checkpoint' if ext.checkpoint else ext.method.upper()}, "
                                      "which the mechanism analyses do not read yet: explain a round-to-nearest setting of the grid")
            if not any(s.is_reference for s in unique):
                raise ConfigError("analysis.mechanisms: needs W16A16 among the settings (the reference of the errors)")
        return unique, aliases


# --- Grid expansion -------------------------------------------------------------------------------
_GRID_KEYS = ("clip_k", "transform_p", "seeds")
_PERTURB_GRID_KEYS = ("distribution", "rule", "target")


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def expand_setting(entry: str | dict[str, Any]) -> list[Setting]:
    """One settings entry → one or more Settings.

    Lists expand as a cartesian product: ``clip_k: [3, 5, 10]`` and ``transform_p: [0.25, 0.5]``
    apply to every quantizer of the base setting; ``seeds: [0, 1, 2, 3]`` and lists under
    ``perturbation`` (distribution, rule, target) make one setting per combination. Names are
    derived (``W8A8-clip3``, ``W8A8+gaussian-additive-both-s0``) unless ``name`` is a template
    with ``{clip_k}``, ``{transform_p}``, ``{seed}``, ``{distribution}``, ``{rule}``, ``{target}``.
    """
    if isinstance(entry, str):
        return [resolve_setting(entry)]
    if not isinstance(entry, dict):
        raise ConfigError(f"expected a setting name or mapping, got {type(entry).__name__}")
    data = dict(entry)
    grids = {k: _as_list(data.pop(k)) for k in _GRID_KEYS if k in data}
    pert = data.pop("perturbation", None)
    pgrids = {k: _as_list(pert[k]) for k in _PERTURB_GRID_KEYS if isinstance(pert, dict) and k in pert}
    if "seeds" in grids and pert is None:
        raise ConfigError("seeds: only valid with a perturbation")
    for k, vals in {**grids, **pgrids}.items():
        if not vals:
            raise ConfigError(f"{k}: empty list")
    template = data.pop("name", None)
    keys = list(grids) + [f"p.{k}" for k in pgrids]
    values = list(grids.values()) + list(pgrids.values())
    out = []
    for combo in itertools.product(*values) if values else [()]:
        choice = dict(zip(keys, combo))
        d = dict(data)
        base_name = d.get("base") or template or "setting"
        if "base" in d:
            d = resolve_setting({**d, "name": str(d["base"])}).model_dump(exclude_none=True)
        for k in ("clip_k", "transform_p"):
            if k in choice:
                for part in ("weights", "activations", "kv"):
                    if d.get(part):
                        d[part] = {**d[part], k: choice[k]}
                if not d.get("weights") and not d.get("activations") and not d.get("kv"):
                    raise ConfigError(f"{k}: the setting {base_name!r} quantizes nothing to apply it to")
        if pert is not None:
            p = {k: v for k, v in pert.items() if k not in pgrids}
            p.update({k[2:]: v for k, v in choice.items() if k.startswith("p.")})
            if "seeds" in choice:
                p["seed"] = choice["seeds"]
            d["perturbation"] = p
        fields = {
            "clip_k": choice.get("clip_k"),
            "transform_p": choice.get("transform_p"),
            "seed": (d.get("perturbation") or {}).get("seed", 0),
            **{k: (d.get("perturbation") or {}).get(k) for k in _PERTURB_GRID_KEYS},
        }
        d["name"] = template.format(**fields) if template else _derived_name(str(base_name), choice, d)
        if "base" not in entry:
            d.pop("base", None)
        out.append(resolve_setting(d))
    return out


def _fmt(x: float) -> str:
    return f"{x:g}" if x != 1 / 3 else "1/3"


def _derived_name(base: str, choice: dict[str, Any], d: dict[str, Any]) -> str:
    name = base
    if "clip_k" in choice:
        name += f"-clip{_fmt(choice['clip_k'])}"
    if "transform_p" in choice:
        name += f"-p{_fmt(choice['transform_p'])}"
    p = d.get("perturbation")
    if p is not None:
        name += f"+{p.get('distribution', 'gaussian')}-{p.get('rule', 'additive')}-{p.get('target', 'both')}-s{p.get('seed', 0)}"
    return name


# --- Loading --------------------------------------------------------------------------------------
_ENV = re.compile(r"\$\{(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def _expand_env(text: str) -> str:
    return _ENV.sub(lambda m: os.environ.get(m["var"], m["default"] if m["default"] is not None else ""), text)


def _model_names(entry: "ModelEntry") -> tuple[str, ...]:
    """What a ``checkpoint: {model: …}`` mapping may call a model: its ref, or the ref's last part (its name;
    a GGUF file's name without .gguf)."""
    name = Path(entry.gguf_file or entry.ref).name
    return entry.ref, name, name.removesuffix(".gguf")


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative local paths in a config file are relative to the file's folder."""

    def fix(p: str) -> str:
        q = Path(p).expanduser()
        if q.is_absolute() or not (p.startswith(".") or (base / q).exists()):
            return p
        return os.path.normpath(str(base / q))

    for m in data.get("models") or []:
        if isinstance(m, dict) and isinstance(m.get("ref"), str):
            m["ref"] = fix(m["ref"])
    if isinstance(data.get("models"), list):
        data["models"] = [fix(m) if isinstance(m, str) else m for m in data["models"]]
    for d in data.get("datasets") or []:
        for k in ("path", "include_path"):
            if isinstance(d, dict) and isinstance(d.get(k), str):
                d[k] = fix(d[k])
    for holder in [data] + [s for s in data.get("settings") or [] if isinstance(s, dict)]:
        c = holder.get("calibration")
        if isinstance(c, dict) and isinstance(c.get("path"), str):
            c["path"] = fix(c["path"])
    for st in data.get("settings") or []:  # released checkpoints: folders (hub ids stay as they are)
        ck = st.get("checkpoint") if isinstance(st, dict) else None
        if isinstance(ck, str):
            st["checkpoint"] = fix(ck)
        elif isinstance(ck, dict):
            for k, v in list(ck.items()):
                if k == "source" and isinstance(v, str):
                    ck[k] = fix(v)
                elif k == "models" and isinstance(v, dict):
                    ck[k] = {fix(m): fix(x) if isinstance(x, str) else x for m, x in v.items()}
                elif k not in ("revision", "method", "layout") and isinstance(v, str):
                    ck[fix(k)] = fix(ck.pop(k))  # the {model: source} shorthand (a model given as a path: resolved as the models are)


def load_config(source: str | Path | dict[str, Any]) -> SweepConfig:
    """A YAML file path or a dict → validated SweepConfig; settings are expanded to check them too."""
    if isinstance(source, dict):
        data, where = source, "config"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config {str(path)!r}: no such file")
        try:
            data = yaml.safe_load(_expand_env(path.read_text()))
        except yaml.YAMLError as err:
            raise ConfigError(f"config {str(path)!r}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {str(path)!r}: expected a mapping at the top level")
        _resolve_paths(data, path.resolve().parent)
        where = f"config {path.name!r}"
    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, where)) from None
    cfg.expanded_settings()
    cfg.check_checkpoint_models()
    cfg.check_model_settings()
    return cfg


# --- Identity -------------------------------------------------------------------------------------
def config_digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def pinned(setting: Setting) -> Setting:
    """A checkpoint setting with its checkpoint's revision as it is here — a local folder's
    fingerprint, a cached hub snapshot's commit — so that a re-exported folder or a moved hub branch
    is a new run, not the old one reused; as given where the checkpoint is not here yet."""
    ck = setting.checkpoint
    if ck is None or ck.source is None:
        return setting
    from quantlens.model.loading import local_revision, resolve_model

    try:
        rev = local_revision(resolve_model(ck.source), ck.revision)
    except ConfigError:
        return setting
    return setting if rev is None else setting.model_copy(update={"checkpoint": ck.model_copy(update={"revision": rev})})


def run_key(revision: str, model_ref: str, setting: Setting, cfg: SweepConfig) -> str:
    """Deterministic identity of one (model revision, setting, datasets, eval options, code) run."""
    ident = {
        "model": model_ref,
        "revision": revision,
        "setting": pinned(setting).identity(),  # the computation, not its name: two names of one computation share a run
        "datasets": [d.model_dump() for d in cfg.datasets],
        "eval": cfg.eval.model_dump(),
        "dtype": cfg.hardware.dtype,
        "code": f"{__version__}/{EVAL_PROTOCOL}",
    }
    return config_digest(ident)[:20]


def sweep_id(cfg: SweepConfig) -> str:
    """Stable id of a sweep definition: reruns of the same config share their parent MLflow run."""
    dump = cfg.model_dump(exclude={"shards": True, "models": {"__all__": {"shards"}}})  # how work is spread, not what
    if dump["analysis"]["statistics"] == StatisticsOptions().model_dump():
        del dump["analysis"]["statistics"]  # (the sweeps of configs written before it keep their ids)
    if dump["calibration"] == CalibrationSpec().model_dump():
        del dump["calibration"]  # (likewise)
    return f"{cfg.name}-{config_digest(dump)[:10]}"
