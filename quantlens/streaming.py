"""Layer-by-layer streaming: run a model larger than the GPU, one decoder block on it at a time.

Everything but the decoder blocks (embeddings, final norm, LM head) lives on the compute device.
Each block's parameters stay on the CPU (the storage copy is never modified) and are copied to the
device right before the block runs and dropped right after, so GPU memory holds one block plus the
activations. Works with :func:`quantlens.patch.quantize_`: the patched weights are what is stored.
Large batches amortise the copies (each batch moves the blocks once), as GPTQ's eval loop does.
"""

from __future__ import annotations

import torch
from torch import nn

from quantlens.patch import find_decoder_blocks

_ATTR = "_quantlens_streaming"


def _block_tensors(block: nn.Module) -> list[torch.Tensor]:
    return [*block.parameters(), *block.buffers()]


def enable_streaming(model: nn.Module, device: torch.device | str) -> None:
    device = torch.device(device)
    _, blocks = find_decoder_blocks(model)
    block_ids = {id(t) for b in blocks for t in _block_tensors(b)}
    # Non-block tensors go to the compute device; block tensors stay where they are (CPU).
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in block_ids:
                p.data = p.data.to(device)
        for bname, b in list(mod.named_buffers(recurse=False)):
            if id(b) not in block_ids and b is not None:
                mod._buffers[bname] = b.to(device)

    handles = []
    for block in blocks:
        tensors = _block_tensors(block)
        stash: dict[int, torch.Tensor] = {}

        def pre(module, args, kwargs, tensors=tensors, stash=stash):
            for t in tensors:
                stash[id(t)] = t.data
                t.data = t.data.to(device, non_blocking=True)
            return None

        def post(module, args, kwargs, output, tensors=tensors, stash=stash):
            for t in tensors:
                t.data = stash.pop(id(t))
            return None

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True, always_call=True))
    setattr(model, _ATTR, (device, handles))


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
