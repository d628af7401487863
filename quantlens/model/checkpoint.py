"""A model folder's safetensors checkpoint, read tensor by tensor (memory-mapped, straight to a device).

``placement: stream`` reads each decoder block from here when it runs; nothing else of the model
needs to fit in host memory. Sharded checkpoints (``model.safetensors.index.json``) and single files
both work; names are matched as they are, or with the model's base prefix added or removed
(``model.`` / ``transformer.``), which covers checkpoints saved from the bare base model.

**Fused experts.** transformers 5 holds an MoE's experts as fused 3-D tensors
(``mlp.experts.gate_up_proj``), while most checkpoints store one matrix per expert
(``mlp.experts.3.gate_proj.weight``; Mixtral's ``block_sparse_moe.experts.3.w1.weight``).
:meth:`Checkpoint.source` finds such a tensor through transformers' own conversion mapping for the
model type (``get_checkpoint_conversion_mapping``: renamings, then per-expert matrices merged along
a new first dimension and concatenated): a :class:`Fused` recipe that :meth:`Checkpoint.read`
assembles exactly as ``from_pretrained`` does. A mapping with any other operation is not followed
(the tensor is reported missing, in one line).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from quantlens.errors import ConfigError

_PREFIXES = ("model.", "transformer.", "model.decoder.")


@dataclass(frozen=True)
class Fused:
    """A fused tensor read from per-expert matrices: ``parts`` (one list of keys per source pattern,
    expert by expert) each stacked along a new dim 0, then concatenated along ``dim``; or, ``merge``
    False, one key per source pattern concatenated (OLMo-hybrid's and Kimi Linear's q/k/v_conv1d → conv1d)."""

    parts: tuple[tuple[str, ...], ...]
    dim: int
    merge: bool = True

    @property
    def keys(self) -> list[str]:
        return [k for p in self.parts for k in p]


Source = Union[str, Fused]


def _conversions(kinds: tuple[str, ...]) -> list:
    """transformers' checkpoint conversions for the first of ``kinds`` (class name, then model type) that has any."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return []
    for kind in kinds:
        found = get_checkpoint_conversion_mapping(kind) if kind else None
        if found:
            return list(found)
    return []


def _unescaped(pattern: str) -> str:
    """A conversion pattern without its start anchor and with its escaped dots as dots."""
    return pattern.lstrip("^").replace("\\.", ".")


def _literal(pattern: str) -> tuple[str, bool] | None:
    """A renaming pattern as plain text and whether it is anchored at the start, or None (a real regex)."""
    anchored = pattern.startswith("^")
    text = _unescaped(pattern)
    return (text, anchored) if re.fullmatch(r"[\w.]+", text) else None


def _renamed(name: str, conversions: list) -> list[str]:
    """The names a checkpoint may store ``name`` under: each plain renaming undone (Mixtral's
    ``block_sparse_moe`` for ``mlp``, GPT-NeoX's ``embed_out`` for ``lm_head``)."""
    out = []
    for c in conversions:
        if type(c).__name__ != "WeightRenaming":
            continue
        for src, tgt in zip(c.source_patterns, c.target_patterns):
            a, b = _literal(src), _literal(tgt)
            if a is None or b is None:
                continue
            if a[1] and name.startswith(b[0]):
                out.append(a[0] + name[len(b[0]):])
            elif not a[1] and b[0] in name:
                out.append(name.replace(b[0], a[0]))
    return out


class Checkpoint:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                weight_map = {k: single.name for k in f.keys()}
        else:
            raise ConfigError(
                f"placement: stream reads decoder blocks from safetensors shards, and {self.folder} has none "
                "(model.safetensors or model.safetensors.index.json): convert the checkpoint, or use placement: single"
            )
        self.weight_map: dict[str, str] = weight_map

    def resolve(self, name: str) -> str | None:
        """The checkpoint's key for a model tensor name, or None."""
        if name in self.weight_map:
            return name
        for p in _PREFIXES:
            if name.startswith(p) and name[len(p):] in self.weight_map:
                return name[len(p):]
            if p + name in self.weight_map:
                return p + name
        return None

    def source(self, name: str, kinds: tuple[str, ...] = (), shape: tuple[int, ...] | None = None) -> Source | None:
        """Where a model tensor is in the checkpoint: its key, a :class:`Fused` recipe (an MoE's
        fused expert tensor stored per expert; ``shape`` gives the number of experts), or None.
        ``kinds``: the model's class name and model type, whose conversion mapping is followed."""
        key = self.resolve(name)
        if key is not None or not kinds:
            return key
        convs = _conversions(kinds)
        for alias in _renamed(name, convs):
            if (key := self.resolve(alias)) is not None:
                return key
        for c in convs:
            if type(c).__name__ != "WeightConverter" or len(c.target_patterns) != 1:
                continue
            target = c.target_patterns[0]
            if not name.endswith(target.lstrip("^")):
                continue
            ops = [(type(o).__name__, getattr(o, "dim", None)) for o in c.operations]
            stem = name[: len(name) - len(target.lstrip("^"))]
            if len(ops) == 1 and ops[0][0] == "Concatenate":  # several tensors of one module joined (q/k/v_conv1d → conv1d)
                texts = [_literal(pattern) for pattern in c.source_patterns]
                keys = [self.resolve(stem + t[0]) if t is not None else None for t in texts]
                return None if None in keys else Fused(tuple((k,) for k in keys), ops[0][1], merge=False)
            if not ops or ops[0] != ("MergeModulelist", 0) or any(op != "Concatenate" for op, _ in ops[1:]) or len(ops) > 2 or not shape:
                return None  # an operation quantlens does not replay (or experts whose number is not given)
            parts = []
            for pattern in c.source_patterns:
                keys = []
                for e in range(int(shape[0])):
                    cand = stem + _unescaped(pattern).replace("*", str(e), 1)
                    k = self.resolve(cand)
                    for alias in _renamed(cand, convs):  # the checkpoint's own names (Mixtral: block_sparse_moe)
                        k = k if k is not None else self.resolve(alias)
                    if k is None:
                        return None
                    keys.append(k)
                parts.append(tuple(keys))
            return Fused(tuple(parts), ops[1][1] if len(ops) > 1 else 0)
        return None

    def read(self, sources: list[Source], device: torch.device | str, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """The tensors of ``sources`` (keys or :class:`Fused` recipes), in order."""
        loaded = self.load(list(dict.fromkeys(k for s in sources for k in self.keys_of(s))), device, dtype)
        return [self.assemble(s, loaded) for s in sources]

    @staticmethod
    def keys_of(source: Source) -> list[str]:
        return [source] if isinstance(source, str) else source.keys

    @staticmethod
    def assemble(source: Source, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tensor of ``source`` from loaded checkpoint tensors (a Fused recipe: stacked, then joined)."""
        if isinstance(source, str):
            return loaded[source]
        stacked = [torch.stack([loaded[k] for k in keys]) if source.merge else loaded[keys[0]] for keys in source.parts]
        return stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=source.dim)

    def load(self, keys: list[str], device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors of ``keys`` on ``device`` (floating ones cast to ``dtype``), one shard open at a time."""
        from safetensors import safe_open

        device = torch.device(device)
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for fname, ks in by_file.items():
            with safe_open(str(self.folder / fname), framework="pt", device=str(device)) as f:
                for k in ks:
                    t = f.get_tensor(k)
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                    out[k] = t
        return out


def model_checkpoint(model: "torch.nn.Module") -> Checkpoint | None:
    """The safetensors checkpoint a model was loaded from (``quantlens.model.loading.load_model``), or None."""
    source = getattr(model, "_quantlens_source", None)
    if source is None:
        return None
    try:
        return Checkpoint(source)
    except ConfigError:
        return None
