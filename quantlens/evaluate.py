"""Batched evaluation: perplexity over token windows and Lambada last-word accuracy.

No per-token Python loops: one forward per batch, losses and greedy checks as tensor ops.
CUDA out-of-memory halves the batch (down to 1) and retries; beyond that the error is raised.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantlens.streaming import streaming_device

Progress = Callable[[int, int], None]  # (done, total)


def input_device(model: nn.Module) -> torch.device:
    dev = streaming_device(model)
    return dev if dev is not None else model.get_input_embeddings().weight.device


def _auto_batch(model: nn.Module, seqlen: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    free, _ = torch.cuda.mem_get_info(device)
    cfg = model.config
    vocab = getattr(cfg, "vocab_size", 50000)
    hidden = getattr(cfg, "hidden_size", 4096)
    per_seq = seqlen * (vocab * 4 * 3 + hidden * 2 * 24)  # fp32 logits + loss temporaries, activations
    return int(max(1, min(64, 0.6 * free // per_seq)))


def _run_batches(n: int, batch_size: int, fn: Callable[[int, int], None], progress: Progress | None) -> int:
    """Call fn(start, end) over [0, n) in batches; halve the batch on CUDA OOM. Returns the final batch."""
    start = 0
    while start < n:
        end = min(n, start + batch_size)
        try:
            fn(start, end)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            torch.cuda.empty_cache()
            continue
        start = end
        if progress:
            progress(start, n)
    return batch_size


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """ppl = exp(mean next-token NLL over all predicted tokens of all ``[n, seqlen]`` windows)."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows: expected a non-empty [n, seqlen] tensor, got shape {tuple(windows.shape)}")
    device = input_device(model)
    n, seqlen = windows.shape
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and seqlen > max_pos:
        raise ValueError(f"seqlen: {seqlen} exceeds the model's max_position_embeddings {max_pos}")
    bs = batch_size or _auto_batch(model, seqlen, device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    t0 = time.perf_counter()

    def step(s: int, e: int) -> None:
        nonlocal total
        ids = windows[s:e].to(device, non_blocking=True)
        logits = model(input_ids=ids, use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total = total + nll.double()

    used = _run_batches(n, bs, step, progress)
    n_pred = n * (seqlen - 1)
    mean_nll = float(total) / n_pred
    secs = time.perf_counter() - t0
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": float(n * seqlen),
        "windows": float(n),
        "seconds": secs,
        "tokens_per_s": n * seqlen / secs if secs > 0 else float("inf"),
        "batch_size": float(used),
    }


@torch.inference_mode()
def lambada(
    model: nn.Module,
    requests: list[tuple[list[int], list[int]]],
    *,
    pad_id: int = 0,
    batch_size: int | None = None,
    max_length: int | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Last-word accuracy (every target token is the greedy argmax) and mean last-word NLL.

    Requests are (context ids, target ids), sorted by length and right-padded per batch; a context
    longer than ``max_length`` loses its oldest tokens.
    """
    if not requests:
        raise ValueError("lambada: no examples")
    device = input_device(model)
    max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    seqs = []
    for ctx, tgt in requests:
        full = (ctx + tgt)[:-1][-max_length:]  # inputs: everything but the last target token
        seqs.append((full, tgt))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    correct = torch.zeros(len(seqs), dtype=torch.bool)
    nll = torch.zeros(len(seqs), dtype=torch.float64)
    bs = batch_size or (_auto_batch(model, len(seqs[order[0]][0]), device) * 2)
    t0 = time.perf_counter()

    def step(s: int, e: int) -> None:
        idx = order[s:e]
        L = max(len(seqs[i][0]) for i in idx)
        T = max(len(seqs[i][1]) for i in idx)
        ids = torch.full((len(idx), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        tgt = torch.zeros((len(idx), T), dtype=torch.long)
        pos = torch.zeros((len(idx), T), dtype=torch.long)
        valid = torch.zeros((len(idx), T), dtype=torch.bool)
        for r, i in enumerate(idx):
            inp, t = seqs[i]
            ids[r, : len(inp)] = torch.tensor(inp)
            mask[r, : len(inp)] = 1
            tgt[r, : len(t)] = torch.tensor(t)
            # target token j is predicted at input position len(inp) - len(t) + j
            pos[r, : len(t)] = torch.arange(len(inp) - len(t), len(inp))
            valid[r, : len(t)] = True
        ids, mask, tgt, pos, valid = (x.to(device) for x in (ids, mask, tgt, pos, valid))
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        picked = torch.gather(logits, 1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()
        logp = picked.log_softmax(-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        greedy = picked.argmax(-1) == tgt
        ok = (greedy | ~valid).all(-1)
        ex_nll = -(logp * valid).sum(-1)
        correct[idx] = ok.cpu()
        nll[idx] = ex_nll.double().cpu()

    used = _run_batches(len(seqs), bs, step, progress)
    secs = time.perf_counter() - t0
    n_tokens = sum(len(s[0]) for s in seqs)
    return {
        "acc": float(correct.double().mean()),
        "nll": float(nll.mean()),
        "examples": float(len(seqs)),
        "tokens": float(n_tokens),
        "seconds": secs,
        "tokens_per_s": n_tokens / secs if secs > 0 else float("inf"),
        "batch_size": float(used),
    }


def evaluate_dataset(model: nn.Module, tokenizer: Any, name: str, **kw: Any) -> dict[str, float]:
    """Evaluate one registered dataset; keyword options: seqlen, path, max_windows/limit, batch_size."""
    from quantlens.data import dataset_info, lambada_requests, load_lambada, perplexity_windows

    info = dataset_info(name)
    progress = kw.get("progress")
    if info.kind == "lambada":
        examples = load_lambada(kw.get("path"), kw.get("limit"))
        reqs = lambada_requests(tokenizer, examples)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return lambada(model, reqs, pad_id=pad, batch_size=kw.get("batch_size"), max_length=kw.get("seqlen"), progress=progress)
    seqlen = kw.get("seqlen", 2048)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos:
        seqlen = min(seqlen, max_pos)
    windows = perplexity_windows(tokenizer, name, seqlen, path=kw.get("path"), max_windows=kw.get("max_windows"))
    return perplexity(model, windows, batch_size=kw.get("batch_size"), progress=progress)
