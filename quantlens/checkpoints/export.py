"""Write a model's decoder-block linears as a released quantized checkpoint (GPTQ or AWQ layout),
round to nearest on the format's own grid: what the tests and the offline demo make released
checkpoints with (the hub's are made by the methods' own libraries; the layouts are the same, see
:mod:`quantlens.checkpoints.packing`).

GPTQ's grid: integers 0 … 2^b − 1 with a zero point per group — ``sym`` puts it at 2^(b−1) with
scale 2·max|w| / (2^b − 1), as GPTQ's quantizer does; otherwise min/max (zero included). AWQ's:
4 bits with a zero point. ``act_order`` (GPTQ) forms the groups over a permutation of the input
features and stores it as ``g_idx``. ``fold`` (AWQ) multiplies each linear's input features by a
per-channel scale and divides the norm before it by the same scale — AWQ's folded scales — so the
checkpoint's norms differ from the model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlens.checkpoints import packing as P


def grid_ints(w: torch.Tensor, bits: int, g_idx: torch.Tensor, groups: int, sym: bool, min_zero: int = 0) -> tuple[torch.Tensor, ...]:
    """(integers [out, in], zero points [groups, out], fp16-exact scales [groups, out]) of ``w`` [out, in];
    zero points at least ``min_zero`` (GPTQ v1 cannot store 0)."""
    w = w.to(torch.float32)
    top = 2**bits - 1
    scales = torch.empty(groups, w.shape[0])
    zeros = torch.empty(groups, w.shape[0], dtype=torch.int64)
    q = torch.empty_like(w, dtype=torch.int64)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        wg = w[:, cols]
        if sym:
            s = (2 * wg.abs().amax(1) / top).clamp_min(1e-6)
            z = torch.full((w.shape[0],), 2 ** (bits - 1), dtype=torch.int64)
        else:
            lo, hi = wg.amin(1).clamp_max(0), wg.amax(1).clamp_min(0)
            s = ((hi - lo) / top).clamp_min(1e-6)
        s = s.half().float()  # the checkpoint stores fp16 scales: round with the ones it keeps
        if not sym:
            z = torch.round(-lo / s).clamp(min_zero, top).to(torch.int64)
        q[:, cols] = (torch.round(wg / s[:, None]) + z[:, None]).clamp(0, top).to(torch.int64)
        scales[g], zeros[g] = s, z
    return q, zeros, scales


def _fold_groups(model: nn.Module) -> list[tuple[nn.Module, list[tuple[str, nn.Linear]]]]:
    """(norm, the linears that read it) of each block: the pairs AWQ folds a scale across."""
    from quantlens.model.anatomy import anatomy

    body = anatomy(model)
    out = []
    for i, block in enumerate(body.blocks):
        names = dict(block.named_modules())
        prefix = f"{body.blocks_name}.{i}."
        for norm, readers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            if norm in names and all(r in names for r in readers):
                out.append((names[norm], [(prefix + r, names[r]) for r in readers]))
    return out


@torch.no_grad()
def write_quantized(model: nn.Module, folder: str | Path, method: str = "gptq", bits: int = 4, group_size: int = 128,
                    sym: bool = True, v1: bool = True, act_order: bool = False, fold: bool = False, seed: int = 0) -> Path:
    """Write ``model`` (unchanged) as a GPTQ / AWQ checkpoint in ``folder``: every linear of the decoder
    blocks (GPT-2's Conv1D included) and every expert matrix (one per expert, under the names
    ``save_pretrained`` writes) packed, everything else in fp16; config.json with its
    ``quantization_config``. Routers stay in 16 bits, as the field's quantizers leave them."""
    from quantlens.model.anatomy import anatomy

    if method not in ("gptq", "awq"):
        raise ValueError(f"method {method!r}: gptq or awq")
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.detach().to(torch.float32).clone() for k, v in model.state_dict().items()}
    if fold:
        if method != "awq":
            raise ValueError("fold: AWQ's folded scales")
        names = {m: n for n, m in model.named_modules()}
        for norm, readers in _fold_groups(model):
            s = torch.exp(0.3 * torch.randn(norm.weight.shape[0], generator=gen))
            state[names[norm] + ".weight"] /= s
            for name, _ in readers:
                state[name + ".weight"] *= s
    ckpt_state = _as_saved(model, state)  # the checkpoint's names: one matrix per expert, as save_pretrained writes
    body = anatomy(model)
    saved = lambda names: {k[: -len(".weight")] for k in _as_saved(model, {f"{n}.weight": state[f"{n}.weight"] for n in names})}  # noqa: E731
    linears = saved(n for n, _ in body.block_linears())  # (under the checkpoint's names: Nemotron-H's backbone.layers…)
    conv1d = saved(n for n, m in body.block_linears() if type(m).__name__ == "Conv1D")
    routers = saved(n for n, _ in body.routers())  # (JetMoe's attention router sits under .experts.: still a router)
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(ckpt_state):
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        w = ckpt_state[key]
        if name is None or w.ndim != 2 or name in routers or not (name in linears or ".experts." in key):
            continue
        if name in conv1d:
            w = w.t()  # GPT-2's Conv1D stores [in, out]: packed as the [out, in] matrix it is (as AutoGPTQ does)
        out_f, in_f = w.shape
        g = group_size if group_size > 0 else in_f
        if in_f % g:
            raise ValueError(f"{name}: group_size {g} does not divide its {in_f} input features")
        order = torch.randperm(in_f, generator=gen) if act_order else torch.arange(in_f)
        g_idx = torch.empty(in_f, dtype=torch.int64)
        g_idx[order] = torch.arange(in_f) // g
        q, zeros, scales = grid_ints(w, bits if method == "gptq" else 4, g_idx, in_f // g, sym and method == "gptq",
                                     min_zero=1 if method == "gptq" and v1 else 0)
        packed[name] = P.gptq_pack(q, zeros, scales, g_idx, bits, v1=v1) if method == "gptq" else P.awq_pack(q, zeros, scales)
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": act_order,
              "checkpoint_format": "gptq" if v1 else "gptq_v2", "damp_percent": 0.01}
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    return write_packed(model, folder, packed, qc, ckpt_state)


def _as_saved(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under the names ``save_pretrained`` writes (transformers' conversion mapping reverted:
    fused expert tensors back to one matrix per expert, renamings undone)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    return dict(revert_weight_conversion(model, dict(state)))


def write_packed(model: nn.Module, folder: str | Path, packed: dict[str, dict[str, torch.Tensor]], qconfig: dict[str, Any],
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """A checkpoint of ``model`` whose linears ``packed`` (name → the format's tensors, suffixes
    without the name: ``qweight``, ``weight.absmax``, …) replace their ``weight``; every other tensor
    in fp16 (``state``: the model's state dict to write, default its own); ``qconfig`` in config.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(state) if state is not None else {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, parts in packed.items():
        state.pop(name + ".weight")
        if name + ".bias" in state:  # (GPTQ/AWQ keep a linear's bias in fp16 beside its packed weight)
            tensors[name + ".bias"] = state.pop(name + ".bias").half().contiguous().clone()
        tensors.update({f"{name}.{k}": v.contiguous().clone() for k, v in parts.items()})
    tensors.update({k: v.half().contiguous().clone() for k, v in state.items()})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    config["torch_dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
