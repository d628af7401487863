"""Layer-by-layer streaming: run a model larger than the GPU, one decoder block on it at a time.

Everything but the decoder blocks (embeddings, final norm, LM head) lives on the compute device.
Each block's parameters stay on the CPU (the storage copy is never modified) and are copied to the
device right before the block runs and dropped right after, so GPU memory holds one block plus the
activations. Works with :func:`quantlens.patch.quantize_`: the patched weights are what is stored.
These hooks move every block once per *batch*; the evaluation itself (perplexity, Lambada) runs
layer by layer instead (:mod:`quantlens.layerwise`), moving every block once per dataset. Both
count the bytes they copy (:func:`transfer_bytes`).
"""

from __future__ import annotations

import torch
from torch import nn

from quantlens.patch import find_decoder_blocks

_ATTR = "_quantlens_streaming"


def block_tensors(block: nn.Module) -> list[torch.Tensor]:
    return [*block.parameters(), *block.buffers()]


def count_transfer(model: nn.Module, t: torch.Tensor) -> None:
    """Add a tensor's bytes to the model's host→device transfer count (streaming models only)."""
    state = getattr(model, _ATTR, None)
    if state is not None:
        state[2]["bytes"] += t.numel() * t.element_size()


def set_resident(model: nn.Module, block: nn.Module, resident: bool) -> None:
    """Mark a block as already on the device (layer-wise evaluation moved it): the per-batch
    hooks then leave it alone instead of copying (and counting) it again for every call."""
    state = getattr(model, _ATTR, None)
    if state is not None:
        (state[2]["resident"].add if resident else state[2]["resident"].discard)(id(block))


def transfer_bytes(model: nn.Module, reset: bool = False) -> int:
    """Bytes of block weights copied to the device since streaming began (or the last reset); with
    a CPU compute device the copies are no-ops but are counted the same, so tests see the traffic."""
    state = getattr(model, _ATTR, None)
    if state is None:
        return 0
    n = state[2]["bytes"]
    if reset:
        state[2]["bytes"] = 0
    return n


def enable_streaming(model: nn.Module, device: torch.device | str) -> None:
    device = torch.device(device)
    _, blocks = find_decoder_blocks(model)
    block_ids = {id(t) for b in blocks for t in block_tensors(b)}
    # Non-block tensors go to the compute device; block tensors stay where they are (CPU).
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in block_ids:
                p.data = p.data.to(device)
        for bname, b in list(mod.named_buffers(recurse=False)):
            if id(b) not in block_ids and b is not None:
                mod._buffers[bname] = b.to(device)

    handles = []
    moved: dict = {"bytes": 0, "resident": set()}
    for block in blocks:
        tensors = block_tensors(block)
        stash: dict[int, torch.Tensor] = {}

        def pre(module, args, kwargs, tensors=tensors, stash=stash):
            if id(module) in moved["resident"]:
                return None
            for t in tensors:
                stash[id(t)] = t.data
                moved["bytes"] += t.numel() * t.element_size()  # counted on a CPU "device" too (a no-op copy)
                t.data = t.data.to(device, non_blocking=True)
            return None

        def post(module, args, kwargs, output, tensors=tensors, stash=stash):
            if id(module) in moved["resident"]:
                return None
            for t in tensors:  # (a pre-hook that raised before ours leaves nothing stashed)
                t.data = stash.pop(id(t), t.data)
            return None

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True, always_call=True))
    setattr(model, _ATTR, (device, handles, moved))


def streaming_device(model: nn.Module) -> torch.device | None:
    state = getattr(model, _ATTR, None)
    return state[0] if state else None


def disable_streaming(model: nn.Module) -> None:
    state = getattr(model, _ATTR, None)
    if state is None:
        return
    for h in state[1]:
        h.remove()
    delattr(model, _ATTR)
