"""GGUF files (llama.cpp's format) as a model source.

A GGUF file is read through transformers' own GGUF loader (the ``gguf`` package) and turned, once,
into an ordinary Hugging Face folder — ``config.json``, the tokenizer the file carries, and the
dequantized weights as ``model.safetensors`` — in a cache keyed by the file's SHA-256. Everything
downstream (placement ``stream``, ``originals: checkpoint``, released checkpoints, the plan and
preflight) then sees a safetensors model like any other, and a second sweep reads no GGUF.

The folder is made in two steps, each done once per file:

- :func:`stage` (cheap, no tensor dequantized): the header is read — architecture, every tensor's
  shape and ggml type, that the data the header promises is in the file — and the config, the
  tokenizer, ``gguf.json`` (the file, its hash and quant types) and each weight's llama.cpp type are
  written. Preflight and the plan read the folder from here on.
- :func:`convert` (the model download's step): transformers dequantizes every tensor (to float32:
  a Q4_1 weight d·q + m of two fp16 numbers is exact there, not in 16 bits) and the weights are
  written next to the staged files.

Each step parses the file once (:func:`read_once`): transformers' loader would parse its whole
metadata — the tokenizer's vocabulary — again for the config, the tokenizer and the weights.

A model whose weights come from a GGUF file is already quantized (a Q4_1 file holds at most 16
distinct values per 32 weights): quantlens measures every setting against that model, as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

from quantlens.errors import ConfigError

MAGIC = b"GGUF"
LAYOUT = 1  # of a converted folder: a change to what convert() writes makes new folders, never reads old ones
INFO_FILE = "gguf.json"  # in a converted folder: what it was made from
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file's header says, read without dequantizing a tensor."""

    path: str
    sha256: str
    architecture: str  # general.architecture (llama.cpp's name: llama, qwen2, gemma3, …)
    name: str  # general.name, where the file has one
    tensors: int
    params: int
    quant_types: dict[str, int] = field(default_factory=dict)  # ggml type → tensors of that type

    def quant_summary(self) -> str:
        """``Q4_1×210, F32×61, Q8_0×1``: the types, most tensors first."""
        return ", ".join(f"{t}×{n}" for t, n in sorted(self.quant_types.items(), key=lambda kv: (-kv[1], kv[0])))


def is_gguf(ref: str) -> bool:
    return str(ref).lower().endswith(".gguf")


def cache_root() -> Path:
    """``QUANTLENS_GGUF_CACHE``, else ``gguf/`` under ``QUANTLENS_CACHE`` (default ``~/.cache/quantlens``)."""
    if os.environ.get("QUANTLENS_GGUF_CACHE"):
        return Path(os.environ["QUANTLENS_GGUF_CACHE"]).expanduser()
    return Path(os.environ.get("QUANTLENS_CACHE", Path.home() / ".cache" / "quantlens")).expanduser() / "gguf"


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256, computed once per (path, size, mtime): remembered in the cache, so that a
    sweep planned, checked and run does not hash a large file each time."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256(str(p), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    memo = cache_root() / "by-stat" / hashlib.sha256(f"{path}|{size}|{mtime_ns}".encode()).hexdigest()[:32]
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest + "\n")
    return digest


def revision(path: str | Path) -> str:
    """The model revision a GGUF file records in run keys: its hash (a re-quantized file is a new model)."""
    return "gguf-" + file_sha256(path)[:12]


def folder_for(path: str | Path) -> Path:
    return cache_root() / f"{file_sha256(path)[:16]}-v{LAYOUT}"


def read_header(path: str | Path, what: str | None = None) -> GGUFHeader:
    """The header of a GGUF file; one :class:`ConfigError` line for a file that is not GGUF, is cut
    short (a tensor's data past its end), or holds an architecture transformers cannot load."""
    p = Path(path)
    what = what or f"model {p}"
    if not p.is_file():
        raise ConfigError(f"{what}: no such file")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic != MAGIC:
        raise ConfigError(f"{what}: not a GGUF file (it starts with {magic!r}, not {MAGIC!r})")
    reader = _reader(p, what)
    size = p.stat().st_size
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=reader.data_offset)
    if end > size:
        raise ConfigError(f"{what}: truncated GGUF file: its tensors need {end:,} bytes and it has {size:,} "
                          "(an interrupted download? fetch it again)")
    arch = _field(reader, "general.architecture")
    supported = _supported_architectures()
    if arch not in supported and not any(arch.startswith(a) for a in ("qwen2moe", "gpt_oss", "gpt-oss")):
        raise ConfigError(f"{what}: GGUF architecture {arch!r} is not one transformers' GGUF loader reads "
                          f"({', '.join(sorted(supported))}): give the model's safetensors folder instead")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return GGUFHeader(path=str(p.resolve()), sha256=file_sha256(p), architecture=arch, name=_field(reader, "general.name") or p.stem,
                      tensors=len(reader.tensors), params=sum(int(t.n_elements) for t in reader.tensors),
                      quant_types=dict(types))


def _reader(p: Path, what: str) -> Any:
    try:
        import gguf as gguf_py
    except ImportError:
        raise ConfigError(f"{what}: reading GGUF needs the gguf package: pip install 'gguf>=0.10' "
                          "(scripts/install.sh installs it)") from None
    try:
        return gguf_py.GGUFReader(p)  # (the file's one reader while read_once() is active)
    except Exception as err:  # the reader's errors for a cut or corrupt file: ValueError, IndexError, struct errors
        msg = " ".join(str(err).split())[:160] or err.__class__.__name__
        raise ConfigError(f"{what}: not a readable GGUF file (truncated or corrupt: {msg})") from None


def _field(reader: Any, key: str) -> str:
    f = reader.fields.get(key)
    if f is None:
        return ""
    value = f.contents()
    return str(value[0] if isinstance(value, list) else value)


def _supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return list(GGUF_SUPPORTED_ARCHITECTURES)


def staged(path: str | Path) -> GGUFHeader | None:
    """The header recorded by :func:`stage` for this file, or None when it has not been staged."""
    return describe(folder_for(path))


def stage(path: str | Path, what: str | None = None) -> tuple[Path, GGUFHeader]:
    """The file's cache folder with its config, tokenizer and ``gguf.json`` (no weights yet): made
    once, from the header; raises :class:`ConfigError` for a file transformers cannot load."""
    folder = folder_for(path)
    header = staged(path)
    if header is not None:
        return folder, header
    with read_once():  # (outermost, always: one order for the process lock and the folder's file lock)
        header = read_header(path, what)
        with _lock(folder):
            done = staged(path)  # by another process while this one waited
            if done is not None:
                return folder, done
            tmp = _fresh(folder.with_name(folder.name + ".staging"))
            p = Path(header.path)
            try:
                from transformers import AutoConfig, AutoTokenizer

                config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
                config.__dict__.pop("quantization_config", None)  # the folder holds dequantized weights
                config.save_pretrained(tmp)
                AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name).save_pretrained(tmp)
            except (OSError, ValueError, KeyError, TypeError) as err:
                shutil.rmtree(tmp, ignore_errors=True)
                msg = " ".join(str(err).split())[:200]
                raise ConfigError(f"{what or f'model {p}'}: transformers cannot load this GGUF file ({msg})") from None
            (tmp / INFO_FILE).write_text(json.dumps({"header": asdict(header)}, indent=1) + "\n")
            try:  # each weight's llama.cpp type, now, from the reader already parsed: the folder appears whole
                tensor_types(tmp)
            except (ValueError, KeyError, RuntimeError):
                pass  # names transformers cannot map: the model still loads; a checkpoint of it says why when used
            folder.parent.mkdir(parents=True, exist_ok=True)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
    return folder, header


def converted(path: str | Path) -> bool:
    return has_weights(folder_for(path))


def has_weights(folder: str | Path) -> bool:
    """A GGUF file's folder whose weights are written (staged only: its header and config, no tensor)."""
    return (Path(folder) / WEIGHTS_FILE).is_file()


def convert(path: str | Path, log: Callable[[str], None] = lambda _: None) -> Path:
    """The file's cache folder with the dequantized weights: transformers reads the GGUF once, later
    calls (any sweep, any process) find the folder. Concurrent callers wait for one conversion."""
    folder, header = stage(path)
    if converted(path):
        return folder
    with read_once(), _lock(folder):
        if converted(path):
            return folder
        import torch
        from safetensors.torch import save_file
        from transformers import AutoConfig, AutoModelForCausalLM

        p = Path(header.path)
        log(f"converting {p.name} ({header.quant_summary()}) to safetensors in {folder}, once")
        config = AutoConfig.from_pretrained(folder)  # the staged config: the file's metadata is not parsed again
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, config=config, dtype=torch.float32)
        tmp = folder / (WEIGHTS_FILE + ".partial")
        save_file(_untied(model.state_dict()), str(tmp), metadata={"format": "pt", "gguf_sha256": header.sha256})
        tmp.rename(folder / WEIGHTS_FILE)
        del model
    return folder


TYPES_FILE = "tensor_types-v2.json"  # in a staged folder: each weight's llama.cpp type, by the model's parameter name
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def tensor_types(folder: str | Path) -> dict[str, tuple[str, str, int]]:
    """The model's parameter name → (the llama.cpp type it is stored in, its GGUF name, its dimensions), for the GGUF
    file a staged folder was made from: tensor names mapped as transformers' GGUF loader maps them
    (``blk.0.attn_q.weight`` → ``model.layers.0.self_attn.q_proj.weight``). Read once from the
    header (no tensor dequantized, the model built on the meta device), then kept in the folder."""
    folder = Path(folder)
    cached = folder / TYPES_FILE
    if cached.is_file():
        return {k: tuple(v) for k, v in json.loads(cached.read_text()).items()}
    header = describe(folder)
    if header is None:
        raise ConfigError(f"{folder}: not a folder made from a GGUF file")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with read_once():
        processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=config.to_dict())
        names = get_gguf_hf_weights_map(model, processor)
        reader = _reader(Path(header.path), f"GGUF file {header.path}")
    types = {names[t.name]: (t.tensor_type.name, t.name, len(t.shape)) for t in reader.tensors if t.name in names}
    tmp = folder / f"{TYPES_FILE}.{os.getpid()}.{threading.get_ident()}.partial"  # (two processes may both compute it)
    tmp.write_text(json.dumps(types, indent=0) + "\n")
    os.replace(tmp, cached)
    return types


def _untied(state: dict[str, Any]) -> dict[str, Any]:
    """Each tensor once, under its first name (a tied LM head is the embedding: stored as
    ``save_pretrained`` stores it, so every reader — streaming included — finds the embedding)."""
    seen: set[int] = set()
    out = {}
    for name, t in state.items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.contiguous()
    return out


def describe(folder: str | Path) -> GGUFHeader | None:
    """The header of the GGUF file a cache folder was made from (None: an ordinary model folder)."""
    info = Path(folder) / INFO_FILE
    if not info.is_file():
        return None
    return GGUFHeader(**json.loads(info.read_text())["header"])


def run_params(folder: str | Path) -> dict[str, str]:
    """A model read from a GGUF file, as run params: the file, its hash, architecture and the quant
    types its weights already had (empty for an ordinary folder)."""
    header = describe(folder)
    if header is None:
        return {}
    return {"model_id": header.path, "gguf_file": Path(header.path).name, "gguf_sha256": header.sha256,
            "gguf_architecture": header.architecture, "gguf_quant_types": header.quant_summary()}


_READ_ONCE = threading.RLock()


@contextmanager
def read_once() -> Iterator[None]:
    """While active (in this process, one thread at a time), each GGUF file is parsed once: the
    ``gguf`` package's reader parses every metadata field — the tokenizer's whole vocabulary, ~5 s for
    SmolLM2's 49k tokens — each time it is made, and transformers makes one for the config, the
    tokenizer and the weights of the same file (six per file in all); its tensor-name maps, rebuilt
    for every module of the model (~8 s), are made once per (architecture, layers) too. Both are
    read-only: the same objects serve every caller in the thread that holds the context; other
    threads get the package's own (they wait for the context only to enter one of their own)."""
    with _READ_ONCE:
        try:
            import gguf as gguf_py
        except ImportError:
            yield  # (the read itself says what to install)
            return
        if getattr(gguf_py.GGUFReader, "_quantlens_shared", False):
            yield  # nested: the outer context shares already
            return
        reader_cls, name_map = gguf_py.GGUFReader, gguf_py.get_tensor_name_map
        readers: dict[tuple[str, str], Any] = {}
        owner = threading.get_ident()

        def shared_reader(path: Any, mode: str = "r") -> Any:
            if threading.get_ident() != owner:
                return reader_cls(path, mode)
            key = (str(Path(path).resolve()), mode)
            if key not in readers:
                readers[key] = reader_cls(path, mode)
            return readers[key]

        shared_reader._quantlens_shared = True  # type: ignore[attr-defined]
        gguf_py.GGUFReader, gguf_py.get_tensor_name_map = shared_reader, lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            gguf_py.GGUFReader, gguf_py.get_tensor_name_map = reader_cls, name_map


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _lock(folder: Path) -> Any:
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder) + ".lock")
