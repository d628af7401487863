"""A model folder's safetensors checkpoint, read tensor by tensor (memory-mapped, straight to a device).

``placement: stream`` reads each decoder block from here when it runs; nothing else of the model
needs to fit in host memory. Sharded checkpoints (``model.safetensors.index.json``) and single files
both work; names are matched as they are, or with the model's base prefix added or removed
(``model.`` / ``transformer.``), which covers checkpoints saved from the bare base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantlens.quantize.settings import ConfigError

_PREFIXES = ("model.", "transformer.", "model.decoder.")


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
