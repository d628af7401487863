"""Model registry (the study's families 350M–66B, the per-example paper's models, mixtures of experts,
Llama-4 and the hybrids, the Pythia ladder), download, and loading onto the hardware."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: planning a sweep must not pay for it
    import torch

from quantlens.model import gguf
from quantlens.errors import ConfigError


@dataclass(frozen=True)
class ModelInfo:
    name: str  # registry name, e.g. "opt-1.3b"
    family: str  # opt | bloom | llama | qwen | mistral | mixtral | deepseek | olmoe | gpt-oss | nemotron | granite | pythia | other
    size_b: float  # parameters, billions
    hf_id: str  # Hugging Face id or local path (for a GGUF file: its cache folder, once staged)
    gguf: str | None = None  # a GGUF source: the file's local path, or its name in the hub repo ``hf_id``


def _entries() -> dict[str, ModelInfo]:
    out: dict[str, ModelInfo] = {}
    for size, b in [("350m", 0.35), ("1.3b", 1.3), ("2.7b", 2.7), ("6.7b", 6.7), ("13b", 13), ("30b", 30), ("66b", 66)]:
        out[f"opt-{size}"] = ModelInfo(f"opt-{size}", "opt", b, f"facebook/opt-{size}")
    for size, b in [("560m", 0.56), ("1b1", 1.1), ("1b7", 1.7), ("3b", 3.0), ("7b1", 7.1)]:
        out[f"bloom-{size}"] = ModelInfo(f"bloom-{size}", "bloom", b, f"bigscience/bloom-{size}")
    # LLaMA v1 checkpoints are gated / re-hosted under many names: the id is configurable with
    # QUANTLENS_LLAMA_ID_TEMPLATE (default "huggyllama/llama-{size}") or per model in a sweep config.
    template = os.environ.get("QUANTLENS_LLAMA_ID_TEMPLATE", "huggyllama/llama-{size}")
    for size, b in [("7b", 6.7), ("13b", 13.0), ("30b", 32.5), ("65b", 65.2)]:
        out[f"llama-{size}"] = ModelInfo(f"llama-{size}", "llama", b, template.format(size=size))
    # The per-example paper's models (arXiv 2506.12044); gated ones need HF_TOKEN, and any id can be
    # replaced per model in a sweep config (`{ref: llama-3-8b, hf_id: my-org/llama3-8b}`).
    for name, family, b, hf_id in [
        ("qwen2.5-7b", "qwen", 7.6, "Qwen/Qwen2.5-7B"),
        ("llama-3-8b", "llama", 8.0, "meta-llama/Meta-Llama-3-8B"),
        ("mistral-nemo-12b", "mistral", 12.2, "mistralai/Mistral-Nemo-Base-2407"),
        ("llama-3-70b", "llama", 70.6, "meta-llama/Meta-Llama-3-70B"),
    ]:
        out[name] = ModelInfo(name, family, b, hf_id)
    # Mixtures of experts (issue 25): size_b counts every expert (what memory holds)
    for name, family, b, hf_id in [
        ("mixtral-8x7b", "mixtral", 46.7, "mistralai/Mixtral-8x7B-v0.1"),
        ("qwen3-30b-a3b", "qwen", 30.5, "Qwen/Qwen3-30B-A3B"),
        ("deepseek-v2-lite", "deepseek", 15.7, "deepseek-ai/DeepSeek-V2-Lite"),
        ("olmoe-1b-7b", "olmoe", 6.9, "allenai/OLMoE-1B-7B-0924"),
        ("gpt-oss-20b", "gpt-oss", 20.9, "openai/gpt-oss-20b"),
        # Llama-4 and the hybrids (DeltaNet / Mamba-2 blocks beside attention): size_b of the text
        # model AutoModelForCausalLM loads
        ("llama-4-scout-17b-16e", "llama", 107.8, "meta-llama/Llama-4-Scout-17B-16E-Instruct"),
        ("llama-4-maverick-17b-128e", "llama", 400.7, "meta-llama/Llama-4-Maverick-17B-128E-Instruct"),
        ("qwen3.5-35b-a3b", "qwen", 34.7, "Qwen/Qwen3.5-35B-A3B"),
        ("nemotron-h-8b", "nemotron", 8.1, "nvidia/Nemotron-H-8B-Base-8K"),
        ("granite-4.0-h-tiny", "granite", 6.9, "ibm-granite/granite-4.0-h-tiny"),
        ("zamba2-2.7b", "zamba", 2.66, "Zyphra/Zamba2-2.7B-Instruct-v2"),  # (one transformer block shared by 9 of its 54 layers)
    ]:
        out[name] = ModelInfo(name, family, b, hf_id)
    # The Pythia suite: one architecture and one training run at ten sizes (the size-scaling ladder)
    for size, b in [("14m", 0.014), ("31m", 0.030), ("70m", 0.070), ("160m", 0.162), ("410m", 0.405), ("1b", 1.01),
                    ("1.4b", 1.41), ("2.8b", 2.78), ("6.9b", 6.86), ("12b", 11.8)]:
        out[f"pythia-{size}"] = ModelInfo(f"pythia-{size}", "pythia", b, f"EleutherAI/pythia-{size}")
    return out


def registry() -> dict[str, ModelInfo]:
    return _entries()


_FAMILY_OF_TYPE = {"opt": "opt", "bloom": "bloom", "llama": "llama", "qwen2": "qwen", "mistral": "mistral",
                   "qwen2_moe": "qwen", "qwen3_moe": "qwen", "mixtral": "mixtral", "deepseek_v2": "deepseek",
                   "deepseek_v3": "deepseek", "olmoe": "olmoe", "gpt_oss": "gpt-oss", "gpt_neox": "pythia",
                   "llama4": "llama", "llama4_text": "llama", "qwen3_next": "qwen", "qwen3_5": "qwen", "qwen3_5_text": "qwen",
                   "qwen3_5_moe": "qwen", "qwen3_5_moe_text": "qwen", "nemotron_h": "nemotron", "granitemoehybrid": "granite"}


def family_from_config(config: dict[str, Any]) -> str:
    return _FAMILY_OF_TYPE.get(str(config.get("model_type", "")), "other")


def looks_like_path(ref: str) -> bool:
    """A local path, not a hub id (``owner/name``): absolute, relative with ./ or ../, ~, or deeper."""
    return ref.startswith(("/", "./", "../", "~", ".\\")) or ref.count("/") > 1 or "\\" in ref


def resolve_model(ref: str, hf_id: str | None = None, gguf_file: str | None = None) -> ModelInfo:
    """Registry name (``opt-1.3b``), Hugging Face id (``facebook/opt-125m``), local directory, or a
    GGUF file (``path/model.gguf``; ``gguf_file``: a file of the folder or hub repo ``ref``).

    ``hf_id`` overrides the id of a registry entry (e.g. a re-hosted LLaMA checkpoint).
    """
    if gguf_file is not None or gguf.is_gguf(ref):
        return _resolve_gguf(ref, gguf_file)
    reg = registry()
    if ref in reg:
        info = reg[ref]
        return ModelInfo(info.name, info.family, info.size_b, hf_id or info.hf_id)
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model {ref!r}: directory has no config.json (not a Hugging Face model folder)")
        cfg = json.loads((path / "config.json").read_text())
        return ModelInfo(path.name, family_from_config(cfg), _size_from_files(path), str(path.resolve()))
    if looks_like_path(ref):
        raise ConfigError(f"model {ref!r}: no such directory")
    family, _, size = ref.partition("-")
    if family in ("opt", "bloom", "llama", "pythia") and "/" not in ref:
        known = ", ".join(sorted(n for n in reg if n.startswith(family + "-")))
        raise ConfigError(f"model {ref!r}: unknown size {size!r} for family {family!r} (known: {known})")
    if "/" not in ref:
        raise ConfigError(
            f"model {ref!r}: not a registry name ({', '.join(sorted(reg))}), an existing directory, "
            "or a Hugging Face id of the form owner/name"
        )
    low = ref.lower()
    fam = next((f for f in ("opt", "bloom", "llama") if f in low), "other")
    return ModelInfo(ref.split("/")[-1], fam, float("nan"), ref)


def _resolve_gguf(ref: str, gguf_file: str | None) -> ModelInfo:
    """A GGUF file here (a path, a file of a local folder, or cached from the hub) is staged — its
    header read, config and tokenizer written to its cache folder — and named by its file; one in a
    hub repo that is not cached yet is known by its repo until the download task fetches it."""
    what = f"model {ref}" + (f" (gguf_file {gguf_file})" if gguf_file else "")
    if gguf_file is not None and not gguf.is_gguf(gguf_file):
        raise ConfigError(f"{what}: gguf_file must name a .gguf file")
    path = Path(ref).expanduser() / gguf_file if gguf_file and Path(ref).expanduser().is_dir() else Path(ref).expanduser()
    if gguf_file is not None and not path.is_file() and not looks_like_path(ref):
        cached = _cached_hub_file(ref, gguf_file)
        if cached is None:
            return ModelInfo(Path(gguf_file).stem, "other", float("nan"), ref, gguf_file)
        path = Path(cached)
    if not path.is_file():
        raise ConfigError(f"{what}: no such file")
    folder, header = gguf.stage(path, what)
    cfg = json.loads((folder / "config.json").read_text())
    return ModelInfo(path.stem, family_from_config(cfg), header.params / 1e9, str(folder), str(path.resolve()))


def _cached_hub_file(repo: str, filename: str, revision: str | None = None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return found if isinstance(found, str) else None


def _size_from_files(path: Path) -> float:
    """Parameter count (billions) from the safetensors headers, without loading any tensor."""
    total = 0
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                count = 1
                for d in v["shape"]:
                    count *= d
                total += count
    return total / 1e9 if total else float("nan")


@dataclass(frozen=True)
class Snapshot:
    path: str  # local directory with config + weights
    revision: str  # commit hash on the hub, or "local-<fingerprint>" for a directory


class ModelUnavailable(RuntimeError):
    """The model cannot be obtained (missing, gated, no network): raised before any work runs."""


def download(info: ModelInfo, revision: str | None = None) -> Snapshot:
    """Fetch (or find in the HF cache) the model files; honours HF_HOME, HF_HUB_OFFLINE, HF_TOKEN.
    A GGUF model is fetched as its one file, then converted once into its cache folder."""
    if info.gguf is not None:
        return _download_gguf(info, revision)
    path = Path(info.hf_id)
    if path.is_dir():
        return Snapshot(str(path), local_revision(info))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        local = snapshot_download(
            info.hf_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"],
        )
    except GatedRepoError as err:
        raise ModelUnavailable(
            f"model {info.hf_id!r} is gated: accept its licence on the hub and set HF_TOKEN ({err.__class__.__name__})"
        ) from None
    except RepositoryNotFoundError:
        raise ModelUnavailable(f"model {info.hf_id!r} not found on the hub (or private without HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise ModelUnavailable(
            f"model {info.hf_id!r} is not in the local Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}) "
            "and the hub cannot be reached (offline or HF_HUB_OFFLINE=1): download it first or pass a local directory"
        ) from None
    except ValueError as err:  # huggingface_hub's HFValidationError: not a valid repo id
        raise ModelUnavailable(f"model {info.hf_id!r}: not a valid Hugging Face id ({err})") from None
    except Exception as err:  # connection errors come in many classes: transient, worth a retry
        raise RuntimeError(f"model {info.hf_id!r} could not be downloaded: {err}") from err
    return Snapshot(local, Path(local).name)  # snapshot folders are named by commit hash


def _download_gguf(info: ModelInfo, revision: str | None) -> Snapshot:
    path = Path(info.gguf or "")
    if not path.is_file():  # a file of a hub repo, not cached when the sweep was planned
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = Path(hf_hub_download(info.hf_id, info.gguf or "", revision=revision))
        except LocalEntryNotFoundError:
            raise ModelUnavailable(f"model {info.hf_id!r} (gguf_file {info.gguf}) is not in the local Hugging Face cache "
                                   "and the hub cannot be reached: download it first or give the file's path") from None
        except Exception as err:  # gated, missing, connection: said in one line, retried by the task if transient
            raise RuntimeError(f"model {info.hf_id!r} (gguf_file {info.gguf}) could not be downloaded: {err}") from err
    return Snapshot(str(gguf.convert(path, log=print)), gguf.revision(path))


def local_revision(info: ModelInfo, revision: str | None = None) -> str | None:
    """The revision :func:`download` would record, known without any network access: a local
    folder's fingerprint, the commit of a cached hub snapshot, a GGUF file's hash; None when it is
    not here."""
    if info.gguf is not None:
        return gguf.revision(info.gguf) if Path(info.gguf).is_file() else None
    path = Path(info.hf_id)
    if path.is_dir():
        return "local-" + _fingerprint(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(info.hf_id, revision=revision, local_files_only=True)).name
    except Exception:  # not cached (or not a valid id): known only after download
        return None


def _fingerprint(path: Path) -> str:
    """Cheap identity of a local model folder: names, sizes and mtimes of its files."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def pick_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """bf16 on GPU (fp16 where bf16 is unsupported), fp32 on CPU."""
    import torch

    if dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(
    snapshot: Snapshot | str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    placement: str = "auto",
) -> tuple[torch.nn.Module, Any]:
    """Load model + tokenizer once. ``placement``: ``single`` (one device), ``device_map`` (spread
    over all GPUs with accelerate), ``stream`` (a skeleton on the device, each decoder block read from the
    checkpoint's safetensors when it runs), or ``auto`` (single if it fits, else device_map over several GPUs, else stream)."""
    import torch

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = snapshot.path if isinstance(snapshot, Snapshot) else snapshot
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    tokenizer = _tokenizer(path, AutoTokenizer)
    if placement == "auto":
        placement = choose_placement(path, dev, dt)
    if placement not in ("single", "device_map", "stream"):
        raise ConfigError(f"placement: unknown {placement!r} (auto, single, device_map, stream)")
    if placement == "device_map":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, device_map="auto")
    elif placement == "stream":
        from quantlens.model.streaming import load_streaming

        model = load_streaming(path, dev, dt)  # blocks read from the checkpoint when they run
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
        model.to(dev)
    model.eval()
    model._quantlens_placement = placement
    model._quantlens_source = path  # originals: checkpoint reads weights back from here
    return model, tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _tokenizer(path: str, auto: Any) -> Any:
    """The folder's tokenizer; None for a local folder with none (it can evaluate token-id datasets only)."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir() and not any((p / f).exists() for f in TOKENIZER_FILES):
        return None
    return auto.from_pretrained(path)


def choose_originals(model: Any, choice: str = "auto") -> str:
    """Where :func:`quantlens.quantize.patch.quantize_` keeps the 16-bit originals: ``memory`` (host RAM,
    restoring is a copy) or ``checkpoint`` (nowhere: restoring reads the safetensors again).
    ``auto``: ``checkpoint`` when the model's weights exceed ``QUANTLENS_ORIGINALS_MAX_GB`` (default:
    a quarter of this machine's RAM) and it was loaded from safetensors, else ``memory``. Returns
    the ``keep_originals_on`` value to pass (``auto`` for memory)."""
    import os

    from quantlens.model.checkpoint import model_checkpoint

    if choice == "memory":
        return "auto"
    if choice == "checkpoint":
        return "checkpoint"
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    limit_gb = os.environ.get("QUANTLENS_ORIGINALS_MAX_GB")
    if limit_gb is not None:
        limit = float(limit_gb) * 2**30
    else:
        try:
            limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 4
        except (ValueError, OSError, AttributeError):
            limit = float("inf")
    return "checkpoint" if size > limit and model_checkpoint(model) is not None else "auto"


def choose_placement(path: str, device: torch.device, dtype: torch.dtype, n_sequences: int = 1, seqlen: int = 2048) -> str:
    """``placement: auto``: the plan's choice (:func:`quantlens.pipeline.plan.estimate`) for this
    checkpoint on the GPUs here, by their free memory: single if it fits one, else device_map if it
    fits all of them, else stream. On a CPU: single."""
    import torch

    from quantlens.model import footprint as P

    if device.type != "cuda":
        return "single"
    free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    here = P.detected_target(str(device))
    target = P.Target(**{**here.__dict__, "memory_gib": min(free) / P.GIB})
    dt = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "auto")
    work = P.Workload(seqlen=seqlen, tokens=0.0, examples=n_sequences, settings=1, dtype=dt, placement="auto")
    return P.estimate(Path(path).name, P.shape_from_checkpoint(path), target, work).placement
