"""Layer-wise evaluation for ``placement: stream``: each decoder block crosses to the device once.

Per-batch streaming (:mod:`quantlens.model.streaming`'s hooks) copies every block to the device for every
batch: a 66B model moves its 130 GB once per batch. Here, as in GPTQ's evaluation loops, the
order is turned around:

1. run each batch up to the first decoder block and keep what the block receives — its hidden
   states and every other argument the model passes it (attention mask, position ids, rotary
   embeddings, ALiBi: whatever the family needs), captured, not rebuilt;
2. for each block: copy its tensors to the device once, run every batch through it, drop it
   (the next block is read from the checkpoint meanwhile; hidden states beyond a quarter of the
   free GPU memory wait in pinned host memory between blocks);
3. decode each batch's last hidden states as the model does (its anatomy: Gemma-3n's streams merged,
   final norm if any, project_out if any, LM head, logit scaling and soft-capping), and score them.

Each module still sees the batches in the same order as a normal forward, so seeded activation
noise, activation statistics and residual-stream hooks give the same numbers as ``single``.
The per-batch ``enter`` callback restores the batch's context (valid-token mask, the residual
recorder's example index) before every block call.
"""

from __future__ import annotations

import functools
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from quantlens.model.anatomy import anatomy
from quantlens.model.streaming import resident


class _Captured(Exception):
    pass


@dataclass
class Batch:
    """One batch of a layer-wise pass: the model's inputs, and how to make it current."""

    start: int
    end: int
    inputs: dict[str, torch.Tensor]
    enter: Callable[[], None] = lambda: None
    state: dict[str, Any] = field(default_factory=dict)  # whatever ``score`` needs later


def capture_block_inputs(model: nn.Module, block: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
    """(args, kwargs) the model passes ``block`` for these inputs; nothing after it runs. An argument
    the model slices per block (:data:`PER_BLOCK_SLICES`) is kept whole, for :func:`with_hidden`."""
    seen: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Captured

    row = PER_BLOCK_SLICES.get(type(block).__name__)
    handle = block.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    with _recording(model, row) as made:
        try:
            model(**inputs, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
    if "args" not in seen:
        raise RuntimeError(f"{type(model).__name__}: the forward never reached its first decoder block")
    if row is None:
        return seen["args"], seen["kwargs"]
    if len(made) != 1:
        raise RuntimeError(f"{type(model).__name__}: {row.method} ran {len(made)} times before the first block, not once")
    return _set_argument(seen["args"], seen["kwargs"], type(block), row.argument, lambda _: _Sliced(made[0], row.dim))


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@dataclass(frozen=True)
class PerBlockSlice:
    """A block argument the model slices per block from one tensor: the argument, the model method
    that makes the whole tensor, and the dimension of the blocks in it."""

    argument: str
    method: str
    dim: int


# by block class: Gemma-3n's per-layer input, ``project_per_layer_inputs(…)[:, :, i, :]`` for block i
PER_BLOCK_SLICES: dict[str, PerBlockSlice] = {"Gemma3nTextDecoderLayer": PerBlockSlice("per_layer_input", "project_per_layer_inputs", 2)}


@dataclass(frozen=True)
class _Sliced:
    """Stands for a :data:`PER_BLOCK_SLICES` argument among captured arguments: the whole tensor."""

    whole: torch.Tensor
    dim: int


def with_hidden(args: tuple, kwargs: dict, h: torch.Tensor, block: nn.Module, i: int) -> tuple[tuple, dict]:
    """The captured arguments of block 0 as block ``i`` takes them: hidden state ``h`` — ``i`` where
    the model passes each block its index (Zamba2: ``layer_idx``, by which its shared transformer
    picks the layer's adapters), and block ``i``'s slice where it passes each block its slice of one
    tensor (:data:`PER_BLOCK_SLICES`)."""
    args, kwargs = ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
    args, kwargs = _set_argument(args, kwargs, type(block), "layer_idx", lambda _: i)
    at = lambda x: x.whole.select(x.dim, i).to(h.device, non_blocking=True) if isinstance(x, _Sliced) else x  # noqa: E731 — (spilled: from host)
    return tuple(at(a) for a in args), {k: at(v) for k, v in kwargs.items()}


def _set_argument(args: tuple, kwargs: dict, kind: type, name: str, value: Callable[[Any], Any]) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with argument ``name`` of ``kind.forward`` set to ``value(its captured value)``, where passed."""
    if name in kwargs:
        return args, {**kwargs, name: value(kwargs[name])}
    slot = _slot(kind, name)
    if slot is None or slot >= len(args):
        return args, kwargs
    return (*args[:slot], value(args[slot]), *args[slot + 1:]), kwargs


@contextmanager
def _recording(model: nn.Module, row: PerBlockSlice | None) -> Iterator[list[torch.Tensor]]:
    """What the model's ``row.method`` returns while the context lasts (nothing without a row)."""
    made: list[torch.Tensor] = []
    owner = next((m for m in model.modules() if hasattr(m, row.method)), None) if row is not None else None
    if owner is None:
        yield made
        return
    method = getattr(owner, row.method)
    setattr(owner, row.method, lambda *a, **kw: made.append(method(*a, **kw)) or made[-1])
    try:
        yield made
    finally:
        delattr(owner, row.method)  # (the class's method again)


@functools.cache
def _slot(kind: type, name: str) -> int | None:
    """The position of argument ``name`` among a block class's forward arguments, or None."""
    names = [n for n in inspect.signature(kind.forward).parameters][1:]  # (self)
    return names.index(name) if name in names else None


def layer_kinds(model: nn.Module, blocks: nn.ModuleList) -> list[str | None]:
    """Each block's attention type where they differ (Gemma-2/3, gpt-oss, Qwen with sliding layers:
    ``config.layer_types``, by which the model picks each block's mask and rotary embedding), else
    ``[None] * blocks``; blocks of several types the config does not list are refused."""
    types = list(getattr(model.config, "layer_types", None) or [])
    if len(types) >= len(blocks) and len(set(types[: len(blocks)])) > 1:
        return types[: len(blocks)]
    kinds = {getattr(b, "attention_type", None) or getattr(getattr(b, "self_attn", None), "layer_type", None) for b in blocks}
    kinds.discard(None)
    if len(kinds) > 1:
        raise NotImplementedError(
            f"layer-wise evaluation: blocks of different attention types ({sorted(kinds)}) need different masks, and the "
            "config does not list them (layer_types); use placement: single or device_map for this model"
        )
    return [None] * len(blocks)


def capture_by_kind(model: nn.Module, block: nn.Module, inputs: dict[str, torch.Tensor], kinds: list[str | None]) -> dict:
    """kind → (args, kwargs) the model passes a block of that kind: block 0's, captured once per kind
    with ``config.layer_types[0]`` set to it for the capture (the model's own mask and rotary choice)."""
    if kinds[0] is None:
        return {None: capture_block_inputs(model, block, inputs)}
    out = {}
    for kind in dict.fromkeys(kinds):
        with _first_layer_type(model.config, kind), _block_type(block, kind):
            out[kind] = capture_block_inputs(model, block, inputs)
    return _shared_slices(out)


def _shared_slices(by_kind: dict) -> dict:
    """One whole tensor of each per-block argument for every kind (each kind's capture made its own
    copy of the same values, Gemma-3n's per-layer inputs: kept once)."""
    whole = _whole(by_kind)
    return by_kind if whole is None else _with_whole(by_kind, whole)


def _whole(by_kind: dict) -> "_Sliced | None":
    """The per-block argument of the captured contexts (one per block class: :data:`PER_BLOCK_SLICES`), or None."""
    return next((a for args, kw in by_kind.values() for a in (*args, *kw.values()) if isinstance(a, _Sliced)), None)


def _with_whole(by_kind: dict, whole: "_Sliced") -> dict:
    swap = lambda x: whole if isinstance(x, _Sliced) else x  # noqa: E731
    return {k: (tuple(swap(a) for a in args), {n: swap(v) for n, v in kw.items()}) for k, (args, kw) in by_kind.items()}


@contextmanager
def _block_type(block: nn.Module, kind: str) -> Iterator[None]:
    """Block 0's own ``block_type`` reads ``kind`` for one capture, where the model picks a block's mask
    by it (Nemotron-H: ``mask_mapping.get(block.block_type)``); the capture stops before the block runs."""
    if not hasattr(block, "block_type"):
        yield
        return
    first = block.block_type
    block.block_type = kind
    try:
        yield
    finally:
        block.block_type = first


@contextmanager
def _first_layer_type(config: Any, kind: str) -> Iterator[None]:
    """``config.layer_types[0]`` reads ``kind`` for one capture: set in the stored list (Gemma-2/3,
    Qwen3-Next), or — a config that derives its layer types from other fields (Jamba, Bamba: a
    property) — read from a subclass of the config's class whose ``layer_types`` (and the name the
    config's ``attribute_map`` reads it by) is that list, for as long as the capture runs."""
    types = list(config.layer_types)
    cls = type(config)
    names = {"layer_types", getattr(cls, "attribute_map", {}).get("layer_types", "layer_types")}
    if not any(isinstance(getattr(cls, n, None), property) for n in names):
        stored, first = config.layer_types, config.layer_types[0]
        stored[0] = kind
        try:
            yield
        finally:
            stored[0] = first
        return
    config.__class__ = type(cls.__name__, (cls,), {n: property(lambda self, t=[kind, *types[1:]]: t) for n in names})
    try:
        yield
    finally:
        config.__class__ = cls


def _budget(device: torch.device) -> float:
    """Bytes of hidden states the device keeps across blocks before the rest spills to host memory:
    a quarter of the free GPU memory (``QUANTLENS_LAYERWISE_DEVICE_GB`` overrides; 0 = always spill)."""
    forced = os.environ.get("QUANTLENS_LAYERWISE_DEVICE_GB")
    if forced is not None:
        return float(forced) * 2**30
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 4
    return float("inf")


def _to_host(t: torch.Tensor) -> torch.Tensor:
    host = t.to("cpu", non_blocking=False)
    return host.pin_memory() if t.device.type == "cuda" else host.clone() if host is t else host


@torch.inference_mode()
def run(
    model: nn.Module,
    batches: list[Batch],
    score: Callable[[Batch, torch.Tensor], None],
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Forward every batch layer by layer, then ``score(batch, logits)`` each in order."""
    body = anatomy(model)
    blocks = body.blocks
    kinds = layer_kinds(model, blocks)
    decode = body.decode
    states, contexts = [], []  # per batch: the hidden state, and each block kind's other inputs
    budget, held, spill = _budget(device), 0, False
    for b in batches:
        b.enter()
        by_kind = capture_by_kind(model, blocks[0], b.inputs, kinds)
        h = hidden_of(*by_kind[kinds[0]])
        whole = _whole(by_kind)  # (Gemma-3n's per-layer inputs: each block's slice of one tensor)
        held += h.numel() * h.element_size() + (whole.whole.numel() * whole.whole.element_size() if whole else 0)
        spill = spill or held > budget  # from here on, hidden states (and per-block inputs) wait in (pinned) host memory
        states.append(_to_host(h) if spill else h)
        contexts.append(_with_whole(by_kind, _Sliced(_to_host(whole.whole), whole.dim)) if spill and whole else by_kind)
    n = batches[-1].end if batches else 0
    for i in range(len(blocks)):
        with resident(model, i) as block:  # read (or copied) to the device once, for every batch
            for j, b in enumerate(batches):
                b.enter()
                h = states[j]
                on_host = h.device != device
                args, kwargs = with_hidden(*contexts[j][kinds[i]], h.to(device, non_blocking=True) if on_host else h, block, i)
                out = block(*args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                states[j] = _to_host(out) if on_host else out
        if progress:
            progress(int(n * (i + 1) / (len(blocks) + 1)), n)
    for j, b in enumerate(batches):
        b.enter()
        score(b, decode(states[j].to(device)))
        states[j] = contexts[j] = None  # free as we go
    if progress:
        progress(n, n)
