"""Layer-by-layer streaming: run a model larger than the GPU, one decoder block on it at a time.

Everything but the decoder blocks (embeddings, final norm, LM head) lives on the compute device.
A block's tensors come from one of two sources:

- **host memory** (:func:`enable_streaming`, a model already loaded): the storage copy stays on the
  CPU, never modified, and is copied to the device when the block runs;
- **the checkpoint** (:func:`load_streaming`, what ``placement: stream`` uses): the model is a
  skeleton whose blocks hold empty placeholders; a block's tensors are read from the safetensors
  shards (memory-mapped, straight to the device) when it runs and dropped after. No originals are
  kept anywhere — the checkpoint is the original, so restoring is reading again, and host RAM holds
  one block at a time, whatever the number of layers. A patched setting is applied to the block's
  weights *on the device* as they are read (:func:`quantlens.quantize.patch.quantize_` defers them).

Two ways to run: a plain forward moves every block for every batch (hooks; what the mechanism
analysis does), while perplexity and Lambada run layer by layer (:mod:`quantlens.model.layerwise`):
each block is made resident once (:func:`resident`) and runs every batch. Both count the bytes
they bring to the device (:func:`transfer_bytes`).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from quantlens.model.anatomy import BLOCKS_ATTR, SHAPE_ATTR, find_decoder_blocks, shape_of

_ATTR = "_quantlens_streaming"


def block_tensors(block: nn.Module) -> list[torch.Tensor]:
    return [*block.parameters(), *block.buffers()]


@dataclass
class _Stream:
    device: torch.device
    blocks: nn.ModuleList
    handles: list[Any] = field(default_factory=list)
    moved: int = 0  # bytes brought to the device
    resident: set[int] = field(default_factory=set)  # ids of blocks made resident by layer-wise runs
    checkpoint: Any = None  # quantlens.model.checkpoint.Checkpoint when blocks are read lazily
    keys: list[list[tuple[nn.Module, str, Any, bool]]] = field(default_factory=list)  # per block: (module, attr, checkpoint source, is_param)
    empty: dict[int, torch.Tensor] = field(default_factory=dict)  # id(tensor holder) → placeholder
    dtype: torch.dtype | None = None
    stash: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    ahead: dict[int, Future] = field(default_factory=dict)  # block → its tensors being read in the background
    prefetched: int = 0  # blocks that arrived through a prefetch (tests, benchmarks)
    pool: ThreadPoolExecutor | None = None  # the prefetching thread, started by the first prefetch
    arrival: Any = None  # (model, block) → None, called when a block's weights are on the device (on_arrival)

    def prefetch(self, i: int) -> None:
        """Start reading block ``i`` from the checkpoint in a background thread (into host memory,
        pinned when the device is a GPU), so the disk read overlaps the current block's compute;
        :meth:`bring` then only copies it to the device. A no-op for blocks held in memory."""
        if self.checkpoint is None or i >= len(self.blocks) or i in self.ahead:
            return
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantlens-prefetch")
        pin = self.device.type == "cuda"

        def read() -> dict[str, torch.Tensor]:
            out = self.checkpoint.load(self._keys(i), "cpu", self.dtype)
            return {k: t.pin_memory() for k, t in out.items()} if pin else out

        self.ahead[i] = self.pool.submit(read)

    # --- one block on the device and off it again -------------------------------------------
    def bring(self, model: nn.Module, i: int) -> None:
        block = self.blocks[i]
        if self.checkpoint is None:
            tensors = block_tensors(block)
            self.stash[i] = [t.data for t in tensors]
            for t in tensors:  # counted on a CPU "device" too (a no-op copy), so tests see the traffic
                self.moved += t.numel() * t.element_size()
                t.data = t.data.to(self.device, non_blocking=True)
            return
        keys = self.keys[i]
        if i in self.ahead:
            loaded = {k: t.to(self.device, non_blocking=True) for k, t in self.ahead.pop(i).result().items()}
            self.prefetched += 1
        else:
            loaded = self.checkpoint.load(self._keys(i), self.device, self.dtype)
        for mod, attr, source, is_param in keys:
            t = self.checkpoint.assemble(source, loaded)  # a key, or an MoE's experts fused from per-expert matrices
            self.moved += t.numel() * t.element_size()
            holder = mod._parameters[attr] if is_param else mod._buffers[attr]
            holder.data = t
        if self.arrival is not None:
            self.arrival(model, block)  # the patched setting, on the device, as the weights arrive

    def _keys(self, i: int) -> list[str]:
        return list(dict.fromkeys(k for _, _, source, _ in self.keys[i] for k in self.checkpoint.keys_of(source)))

    def drop(self, i: int) -> None:
        block = self.blocks[i]
        if self.checkpoint is None:
            for t, d in zip(block_tensors(block), self.stash.pop(i)):
                t.data = d
            return
        for mod, attr, _, is_param in self.keys[i]:
            holder = mod._parameters[attr] if is_param else mod._buffers[attr]
            holder.data = self.empty[id(holder)]


def _state(model: nn.Module) -> _Stream | None:
    return getattr(model, _ATTR, None)


def _hook(model: nn.Module, state: _Stream) -> None:
    for i, block in enumerate(state.blocks):
        def pre(module, args, kwargs, i=i):
            if id(module) not in state.resident:
                state.bring(model, i)

        def post(module, args, kwargs, output, i=i):
            if id(module) not in state.resident and (state.checkpoint is not None or i in state.stash):
                state.drop(i)  # (a pre-hook that raised before ours left nothing to drop)

        state.handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        state.handles.append(block.register_forward_hook(post, with_kwargs=True, always_call=True))


def enable_streaming(model: nn.Module, device: torch.device | str) -> None:
    """Stream a model already in host memory: non-block tensors to ``device``, blocks stay put."""
    device = torch.device(device)
    _, blocks = find_decoder_blocks(model)
    block_ids = {id(t) for b in blocks for t in block_tensors(b)}
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in block_ids:
                p.data = p.data.to(device)
        for bname, b in list(mod.named_buffers(recurse=False)):
            if id(b) not in block_ids and b is not None:
                mod._buffers[bname] = b.to(device)
    state = _Stream(device, blocks)
    _hook(model, state)
    setattr(model, _ATTR, state)


def _empty_blocks(path: str, ckpt: Any, state: _Stream, blocks: nn.ModuleList, prefix: str, kinds: tuple[str, str]
                  ) -> list[tuple[str, nn.Module, str]]:
    """Every block tensor becomes an empty placeholder; ``state.keys`` records, per block, where in the
    checkpoint each is read from when the block runs. Returns the block buffers no checkpoint holds
    because the model computes them (non-persistent: Falcon-H1's ``mup_vector``), as (module name,
    module, attribute), left for :func:`_compute_block_buffers`."""
    computed = []
    tied: dict[int, tuple[nn.Parameter, nn.Parameter, Any]] = {}  # id(parameter) → (it, its placeholder, its source)
    for i, block in enumerate(blocks):
        keys = []
        for mname, mod in block.named_modules():
            for attr, p in list(mod._parameters.items()):
                if p is None:
                    continue
                if id(p) in tied:  # tied across blocks (Zamba2's shared transformer): one placeholder, read under its first name
                    _, holder, key = tied[id(p)]
                    mod._parameters[attr] = holder
                    keys.append((mod, attr, key, True))
                    continue
                qual = f"{prefix}.{i}.{mname + '.' if mname else ''}{attr}"
                key = ckpt.source(qual, kinds, tuple(p.shape))
                if key is None:
                    raise ValueError(f"{path}: block tensor {qual!r} is not in the checkpoint")
                holder = nn.Parameter(torch.empty(0, dtype=p.dtype), requires_grad=False)
                mod._parameters[attr] = holder
                state.empty[id(holder)] = holder.data
                setattr(holder, SHAPE_ATTR, p.shape)
                tied[id(p)] = (p, holder, key)
                keys.append((mod, attr, key, True))
            for attr, b in list(mod._buffers.items()):
                if b is None:
                    continue
                qual = f"{prefix}.{i}.{mname + '.' if mname else ''}{attr}"
                key = ckpt.source(qual, kinds)  # a persistent buffer (DeepSeek's e_score_correction_bias): read like a weight
                if key is None and attr in mod._non_persistent_buffers_set:
                    computed.append((qual.rsplit(".", 1)[0], mod, attr))
                    continue
                if key is None:
                    raise NotImplementedError(f"placement: stream: block buffer {qual} is not in the checkpoint")
                mod._buffers[attr] = torch.empty(0, dtype=b.dtype)
                state.empty[id(mod._buffers[attr])] = mod._buffers[attr]
                keys.append((mod, attr, key, False))
        state.keys.append(keys)
    return computed


def _compute_block_buffers(model: nn.Module, computed: list[tuple[str, nn.Module, str]], device: torch.device) -> None:
    """The block buffers the model computes from its config, made once on ``device`` by its own
    ``_init_weights`` — called on each buffer's module and its ancestors (Falcon-H1's model fills every
    layer's ``mup_vector``), every parameter marked initialised so nothing else changes — and kept
    there: a few values per block, never streamed."""
    if not computed:
        return
    for _, mod, attr in computed:
        mod._buffers[attr] = torch.full_like(mod._buffers[attr], float("nan"), device=device)  # what init leaves untouched shows
    owners = {".".join(name.split(".")[:k]) for name, _, _ in computed for k in range(name.count(".") + 1, 0, -1)}
    with _parameters_left_alone(model.parameters()):
        for name in sorted(owners, key=lambda n: -n.count(".")):  # the buffer's own module first, the model last
            _init_weights(model, name)
    left = [f"{name}.{attr}" for name, mod, attr in computed if mod._buffers[attr].is_floating_point() and mod._buffers[attr].isnan().any()]
    if left:
        raise NotImplementedError(f"placement: stream: the model's init does not compute block buffers {left[:3]} (not in the checkpoint)")


def load_streaming(path: str, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """A model whose blocks are read from ``path``'s safetensors when they run (see module doc).

    The skeleton is built on the meta device (no weights anywhere), the embeddings, final norm and
    LM head are read to ``device``, modules with computed buffers outside the blocks (rotary
    embeddings) are rebuilt there, and every block tensor becomes an empty placeholder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantlens.model.checkpoint import Checkpoint

    device = torch.device(device)
    ckpt = Checkpoint(path)  # no safetensors → ConfigError, before anything is built
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefix, blocks = find_decoder_blocks(model)
    setattr(model, BLOCKS_ATTR, prefix)  # its blocks will hold no weights: remember which list they are
    state = _Stream(device, blocks, checkpoint=ckpt, dtype=dtype)
    in_block = {id(t) for b in blocks for t in block_tensors(b)}

    kinds = (type(model).__name__, str(config.model_type))  # whose checkpoint conversions name the stored tensors
    for name, p in model.named_parameters():
        if id(p) in in_block:
            continue
        key = ckpt.source(name, kinds)
        if key is None:
            if name == "lm_head.weight" or getattr(config, "tie_word_embeddings", False):
                continue  # tied to the input embeddings: tie_weights() below
            raise ValueError(f"{path}: tensor {name!r} is not in the checkpoint")
        _set(model, name, nn.Parameter(ckpt.load([key], device, dtype)[key], requires_grad=False))
    model.tie_weights()
    for mname, mod in list(model.named_modules()):
        if mname.startswith(prefix + ".") or mname == prefix:
            continue
        if any(b is not None and b.is_meta for b in mod._buffers.values()):
            if next(mod.parameters(), None) is not None:  # (Gemma-3n's text model: its scales, beside its loaded weights)
                _materialize_buffers(model, mname, mod, device)
                continue
            try:
                with torch.device(device):
                    _set(model, mname, type(mod)(config))  # rotary embeddings: inv_freq computed from the config
            except TypeError:
                _materialize_buffers(model, mname, mod, device)
    _compute_block_buffers(model, _empty_blocks(path, ckpt, state, blocks, prefix, kinds), device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise NotImplementedError(f"placement: stream: tensors left on the meta device: {leftover[:5]}")
    model.eval()
    _hook(model, state)
    setattr(model, _ATTR, state)
    return model


def _materialize_buffers(model: nn.Module, name: str, mod: nn.Module, device: torch.device) -> None:
    """Computed buffers outside the blocks (rotary ``inv_freq``, Gemma's ``embed_scale``), made on
    ``device`` by the model's own ``_init_weights`` — the way ``from_pretrained`` fills them — with
    the module's loaded parameters marked initialised so that nothing of them is touched."""
    for attr, b in list(mod._buffers.items()):
        if b is not None and b.is_meta:
            mod._buffers[attr] = torch.full_like(b, float("nan"), device=device)  # what init leaves untouched shows
    try:
        with _parameters_left_alone(mod.parameters()):  # (its children's loaded weights too)
            _init_weights(model, name)
    except Exception as err:  # noqa: BLE001 — any failure: one line naming the module
        raise NotImplementedError(f"placement: stream: cannot compute the buffers of {name} ({type(mod).__name__}) "
                                  f"off the meta device: {err}") from None
    left = [a for a, b in mod._buffers.items() if b is not None and b.is_floating_point() and b.isnan().any()]
    if left:
        raise NotImplementedError(f"placement: stream: the model's init does not compute buffers {left} of {name}")


def _init_weights(model: nn.Module, name: str) -> None:
    """Module ``name`` initialised as ``from_pretrained`` does it: by the ``_init_weights`` of the nearest
    pretrained model holding it (Gemma-3n's text model initialises its own buffers from its own fields)."""
    from transformers import PreTrainedModel

    parts = name.split(".") if name else []
    for k in range(len(parts), -1, -1):
        owner = model.get_submodule(".".join(parts[:k]))
        if isinstance(owner, PreTrainedModel):
            owner._init_weights(model.get_submodule(name))
            return


@contextmanager
def _parameters_left_alone(params: Iterator[nn.Parameter]) -> Iterator[None]:
    """``params`` marked initialised (``_is_hf_initialized``) for the duration, gradients off: the
    model's ``_init_weights`` then computes buffers and touches none of them."""
    flagged = [p for p in params if not getattr(p, "_is_hf_initialized", False)]
    for p in flagged:
        p._is_hf_initialized = True
    try:
        with torch.no_grad():
            yield
    finally:
        for p in flagged:
            del p._is_hf_initialized


def _set(model: nn.Module, qualified: str, value: Any) -> None:
    parent_name, _, attr = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, value)


@contextmanager
def resident(model: nn.Module, i: int, prefetch_next: bool = True) -> Iterator[nn.Module]:
    """Block ``i`` on the device for the duration (brought once, counted once), hooks idle; the
    next block is read from the checkpoint meanwhile (``prefetch_next``)."""
    state = _state(model)
    block = state.blocks[i]
    state.bring(model, i)
    if prefetch_next:
        state.prefetch(i + 1)
    state.resident.add(id(block))
    try:
        yield block
    finally:
        state.resident.discard(id(block))
        state.drop(i)


def on_arrival(model: nn.Module, fn: Any) -> None:
    """Call ``fn(model, block)`` each time a block's weights arrive on the device (how
    :func:`quantlens.quantize.patch.quantize_` applies a setting to weights it never saw)."""
    state = _state(model)
    if state is not None:
        state.arrival = fn


def full_shape(model: nn.Module, param: torch.Tensor) -> torch.Size:
    """A block tensor's shape in the checkpoint (a streamed skeleton's placeholders are empty between
    runs), else its own."""
    return shape_of(param)


def full_numel(model: nn.Module, param: torch.Tensor) -> int:
    n = 1
    for d in full_shape(model, param):
        n *= int(d)
    return n


def is_lazy(model: nn.Module) -> bool:
    state = _state(model)
    return state is not None and state.checkpoint is not None


def transfer_bytes(model: nn.Module, reset: bool = False) -> int:
    """Bytes of block weights brought to the device since streaming began (or the last reset)."""
    state = _state(model)
    if state is None:
        return 0
    n = state.moved
    if reset:
        state.moved = 0
    return n


def streaming_device(model: nn.Module) -> torch.device | None:
    state = _state(model)
    return state.device if state else None


def disable_streaming(model: nn.Module) -> None:
    state = _state(model)
    if state is None:
        return
    if state.checkpoint is not None:
        raise ValueError("a model loaded with placement: stream has no weights in its blocks: it cannot stop streaming")
    for h in state.handles:
        h.remove()
    delattr(model, _ATTR)
