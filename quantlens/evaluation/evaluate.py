"""Batched evaluation: perplexity over token windows and Lambada last-word accuracy.

No per-token Python loops: one forward per batch, losses and greedy checks as tensor ops.
CUDA out-of-memory halves the batch (down to 1) and retries; beyond that the error is raised.

Every evaluation also returns its examples (``result["per_example"]``, a DataFrame): one row per
window / document / passage with ``example_id``, ``n_tokens`` (predicted tokens) and ``nll`` (mean
NLL per predicted token), Lambada also ``correct``; so the token-weighted mean of ``nll`` is
log(ppl). With ``residual=True`` the same forwards also fill the full-precision residual-stream
statistics of :mod:`quantlens.evaluation.residual` (``result["residual"]``, long format, one row per example
and layer).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from quantlens.evaluation.data import DOCUMENTS, example_ids
from quantlens.evaluation.kl import TopK, reference_topk, truncated_kl
from quantlens.model.layerwise import Batch
from quantlens.quantize.patch import set_valid_tokens
from quantlens.evaluation.residual import ResidualRecorder
from quantlens.evaluation.routing import RoutingRecorder
from quantlens.model.streaming import streaming_device

Progress = Callable[[int, int], None]  # (done, total)


def input_device(model: nn.Module) -> torch.device:
    dev = streaming_device(model)
    return dev if dev is not None else model.get_input_embeddings().weight.device


def _auto_batch(model: nn.Module, seqlen: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    from quantlens.model.footprint import auto_batch

    free, _ = torch.cuda.mem_get_info(device)
    cfg = model.config
    return auto_batch(free, seqlen, getattr(cfg, "vocab_size", 50000), getattr(cfg, "hidden_size", 4096))


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


def _drive(model: nn.Module, n: int, batch_size: int, prepare: Callable[[int, int], Batch],
           score: Callable[[Batch, torch.Tensor], None], progress: Progress | None) -> int:
    """Every batch through the model and into ``score``: one forward per batch, or with
    ``placement: stream`` layer by layer (each block copied to the device once, not per batch).
    Returns the batch size used in the end."""
    dev = streaming_device(model)
    if dev is not None:
        from quantlens.model import layerwise

        spans = [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
        layerwise.run(model, [prepare(s, e) for s, e in spans], score, dev, progress)
        return batch_size

    def step(s: int, e: int) -> None:
        b = prepare(s, e)
        b.enter()
        score(b, model(**b.inputs, use_cache=False).logits)

    return _run_batches(n, batch_size, step, progress)


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int | None = None,
    progress: Progress | None = None,
    residual: bool = False,
    keep_examples: bool = True,
    topk: int = 0,
    kl_reference: "TopK | None" = None,
    routing: bool = False,
    routing_reference: torch.Tensor | None = None,
) -> dict[str, Any]:
    """ppl = exp(mean next-token NLL over all predicted tokens of all ``[n, seqlen]`` windows).

    Each window is one example (``per_example``); ``residual`` also records the residual-stream
    statistics. ``keep_examples=False`` is the plain sum (benchmarks only). ``topk`` > 0 (the
    reference run) also keeps every predicted token's top-``topk`` log-probabilities and tail mass
    (``result["topk"]``, :class:`quantlens.evaluation.kl.TopK`); with ``kl_reference`` (those of the
    reference, same windows) each example also gets its mean truncated KL(p_ref ‖ p) (a ``kl`` column).
    ``routing`` (an MoE; :mod:`quantlens.evaluation.routing`): each MoE layer's expert load
    (``result["routing"]``) and, for the reference, every token's expert set (``result["routing_sets"]``);
    with ``routing_reference`` (those sets) the router flips: a ``router_flips`` column and table column."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows: expected a non-empty [n, seqlen] tensor, got shape {tuple(windows.shape)}")
    device = input_device(model)
    n, seqlen = windows.shape
    if (max_pos := getattr(model.config, "max_position_embeddings", None)) and seqlen > max_pos:
        raise ValueError(f"seqlen: {seqlen} exceeds the model's max_position_embeddings {max_pos}")
    bs = batch_size or _auto_batch(model, seqlen, device)
    ex_nll = torch.zeros(n, dtype=torch.float64, device=device)  # summed NLL of each window
    recorder = ResidualRecorder(model, n) if residual else None
    router = RoutingRecorder(model, n, seqlen, routing_reference) if routing or routing_reference is not None else None
    router = router if router is not None and router.active else None
    top, ex_kl = _kl_buffers(n, seqlen, topk, kl_reference, device)
    t0 = time.perf_counter()

    def prepare(s: int, e: int) -> Batch:
        def enter() -> None:
            for rec in (recorder, router):
                if rec is not None:
                    rec.begin_batch(torch.arange(s, e))

        return Batch(s, e, {"input_ids": windows[s:e].to(device, non_blocking=True)}, enter)

    def score(b: Batch, logits: torch.Tensor) -> None:
        ids, s, e = b.inputs["input_ids"], b.start, b.end
        flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        if keep_examples:
            tok = F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="none")
            ex_nll[s:e] = tok.view(e - s, seqlen - 1).double().sum(-1)
        else:
            ex_nll[s] += F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="sum").double()
        if top is not None or ex_kl is not None:
            _kl_parts(logits, s, e, top, topk, kl_reference, ex_kl)

    with recorder if recorder is not None else contextlib.nullcontext(), router if router is not None else contextlib.nullcontext():
        used = _drive(model, n, bs, prepare, score, progress)
    return _perplexity_result(windows, ex_nll, ex_kl, top, recorder, router, routing_reference, keep_examples, used,
                              time.perf_counter() - t0)


def _kl_buffers(n: int, seqlen: int, topk: int, kl_reference: "TopK | None", device: torch.device) -> tuple:
    """The reference's top-k store ([n, T-1, k] ids and log-probs, [n, T-1] tail) and the per-example KL sums."""
    if kl_reference is not None and tuple(kl_reference.ids.shape[:2]) != (n, seqlen - 1):
        raise ValueError(f"kl_reference: top-k of {tuple(kl_reference.ids.shape[:2])} tokens, not of these {n} × {seqlen - 1}")
    top = (torch.zeros(n, seqlen - 1, topk, dtype=torch.int32), torch.zeros(n, seqlen - 1, topk), torch.zeros(n, seqlen - 1)) if topk else None
    ex_kl = torch.zeros(n, dtype=torch.float64, device=device) if kl_reference is not None else None
    return top, ex_kl


def _kl_parts(logits: torch.Tensor, s: int, e: int, top: tuple | None, topk: int, kl_reference: "TopK | None",
              ex_kl: torch.Tensor | None) -> None:
    """Top-k of the reference / truncated KL against it, one example at a time (memory: one [T, V])."""
    for i in range(e - s):
        lg = logits[i, :-1]
        if top is not None:
            ids, lp, lt = reference_topk(lg, topk)
            top[0][s + i], top[1][s + i], top[2][s + i] = ids.cpu(), lp.cpu(), lt.cpu()
        if kl_reference is not None:
            ids, lp, lt = kl_reference.rows(s + i, s + i + 1, lg.device)
            ex_kl[s + i] = truncated_kl(lg, ids[0], lp[0], lt[0]).double().sum()


def _perplexity_result(windows: torch.Tensor, ex_nll: torch.Tensor, ex_kl: torch.Tensor | None, top: tuple | None,
                       recorder: Any, router: Any, routing_reference: Any, keep_examples: bool, used: int,
                       secs: float) -> dict[str, Any]:
    """:func:`perplexity`'s result from its per-window sums and recorders."""
    n, seqlen = windows.shape
    n_pred = n * (seqlen - 1)
    mean_nll = float(ex_nll.sum()) / n_pred
    out: dict[str, Any] = {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": float(n * seqlen),
        "windows": float(n),
        "seconds": secs,
        "tokens_per_s": n * seqlen / secs if secs > 0 else float("inf"),
        "batch_size": float(used),
    }
    if keep_examples:
        ids = example_ids(windows)
        out["per_example"] = pd.DataFrame(
            {"example_id": ids, "n_tokens": seqlen - 1, "nll": (ex_nll.cpu() / (seqlen - 1)).numpy()}
        )
        if ex_kl is not None:
            out["per_example"]["kl"] = (ex_kl.cpu() / (seqlen - 1)).numpy()
        if router is not None and routing_reference is not None:
            out["per_example"]["router_flips"] = router.example_flips().numpy()
        out["example_tokens"] = windows  # row i: the tokens of example i (for near-duplicate checks)
    if top is not None:
        out["topk"] = TopK(*top)
    if recorder is not None:
        out["residual"] = pd.DataFrame(recorder.rows(example_ids(windows)))
    if router is not None:
        out["routing"] = router.table()
        if router.sets is not None:
            out["routing_sets"] = router.sets
    return out


@torch.inference_mode()
def lambada(
    model: nn.Module,
    requests: list[tuple[list[int], list[int]]],
    *,
    pad_id: int = 0,
    batch_size: int | None = None,
    max_length: int | None = None,
    progress: Progress | None = None,
    residual: bool = False,
) -> dict[str, Any]:
    """Last-word accuracy (every target token is the greedy argmax) and mean last-word NLL.

    Requests are (context ids, target ids), sorted by length and right-padded per batch; a context
    longer than ``max_length`` loses its oldest tokens. Each passage is one example
    (``per_example``: its NLL per target token and ``correct``); ``residual`` records the
    residual-stream statistics over its real (unpadded) input tokens.
    """
    if not requests:
        raise ValueError("lambada: no examples")
    device = input_device(model)
    max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    seqs = [((ctx + tgt)[:-1][-max_length:], tgt) for ctx, tgt in requests]  # inputs: all but the last target token
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    correct, nll = torch.zeros(len(seqs), dtype=torch.bool), torch.zeros(len(seqs), dtype=torch.float64)
    bs = batch_size or (_auto_batch(model, len(seqs[order[0]][0]), device) * 2)
    recorder = ResidualRecorder(model, len(seqs)) if residual else None
    t0 = time.perf_counter()

    def prepare(s: int, e: int) -> Batch:
        idx = order[s:e]
        ids, mask, tgt, pos, valid = _padded([seqs[i] for i in idx], pad_id)
        cpu_mask = mask
        ids, mask, tgt, pos, valid = (x.to(device) for x in (ids, mask, tgt, pos, valid))

        def enter() -> None:
            if recorder is not None:
                recorder.begin_batch(torch.tensor(idx), cpu_mask)
            set_valid_tokens(model, mask)  # activation statistics and batch-matched noise skip padding

        return Batch(s, e, {"input_ids": ids, "attention_mask": mask}, enter, {"idx": idx, "tgt": tgt, "pos": pos, "valid": valid})

    def score(b: Batch, logits: torch.Tensor) -> None:
        idx, tgt, pos, valid = (b.state[k] for k in ("idx", "tgt", "pos", "valid"))
        picked = torch.gather(logits, 1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()
        logp = picked.log_softmax(-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        greedy = picked.argmax(-1) == tgt
        ok = (greedy | ~valid).all(-1)
        ex_nll = -(logp * valid).sum(-1)
        correct[idx] = ok.cpu()
        nll[idx] = ex_nll.double().cpu()

    try:
        with recorder if recorder is not None else contextlib.nullcontext():
            used = _drive(model, len(seqs), bs, prepare, score, progress)
    finally:
        set_valid_tokens(model, None)
    out = _lambada_result(requests, seqs, correct, nll, used, time.perf_counter() - t0)
    if recorder is not None:
        out["residual"] = pd.DataFrame(recorder.rows(example_ids(out["example_tokens"])))
    return out


def _padded(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded inputs, their mask, and per target token: its id, the input position predicting it, valid."""
    L = max(len(inp) for inp, _ in batch)
    T = max(len(t) for _, t in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    tgt = torch.zeros((len(batch), T), dtype=torch.long)
    pos = torch.zeros((len(batch), T), dtype=torch.long)
    valid = torch.zeros((len(batch), T), dtype=torch.bool)
    for r, (inp, t) in enumerate(batch):
        ids[r, : len(inp)] = torch.tensor(inp)
        mask[r, : len(inp)] = 1
        tgt[r, : len(t)] = torch.tensor(t)
        # target token j is predicted at input position len(inp) - len(t) + j
        pos[r, : len(t)] = torch.arange(len(inp) - len(t), len(inp))
        valid[r, : len(t)] = True
    return ids, mask, tgt, pos, valid


def _lambada_result(requests: list, seqs: list, correct: torch.Tensor, nll: torch.Tensor, used: int, secs: float) -> dict[str, Any]:
    """:func:`lambada`'s result: accuracy, mean NLL, and one row per passage."""
    n_tokens = sum(len(s[0]) for s in seqs)
    passages = [ctx + tgt for ctx, tgt in requests]
    ids = example_ids(passages)
    n_tgt = torch.tensor([len(t) for _, t in requests], dtype=torch.float64)
    out: dict[str, Any] = {
        "acc": float(correct.double().mean()),
        "nll": float(nll.mean()),
        "examples": float(len(seqs)),
        "tokens": float(n_tokens),
        "seconds": secs,
        "tokens_per_s": n_tokens / secs if secs > 0 else float("inf"),
        "batch_size": float(used),
        "per_example": pd.DataFrame(
            {"example_id": ids, "n_tokens": n_tgt.long().numpy(), "nll": (nll / n_tgt).numpy(), "correct": correct.numpy()}
        ),
        "example_tokens": passages,
    }
    return out


_LAMBADA_CACHE: dict[tuple, tuple[Any, list]] = {}  # (id(tokenizer), path, limit) → (tokenizer kept alive, requests)


def evaluate_dataset(model: nn.Module, tokenizer: Any, name: str, **kw: Any) -> dict[str, Any]:
    """Evaluate one registered dataset; keyword options: seqlen, path, max_windows/limit,
    batch_size, progress, residual, ``examples="documents"`` with ``example_len``, and for the KL error
    ``topk`` (the reference) / ``kl_reference`` (the others; perplexity datasets), and for the router
    flips of an MoE ``routing`` (the reference) / ``routing_reference`` (the others)."""
    from quantlens.evaluation.data import dataset_info, document_examples, lambada_requests, load_lambada, perplexity_windows

    info = dataset_info(name)
    progress = kw.get("progress")
    residual = bool(kw.get("residual", False))
    if info.kind == "last-word":
        key = (id(tokenizer), kw.get("path"), kw.get("limit"))
        if key not in _LAMBADA_CACHE:  # a sweep evaluates the same passages under every setting
            _LAMBADA_CACHE.clear()
            _LAMBADA_CACHE[key] = (tokenizer, lambada_requests(tokenizer, load_lambada(kw.get("path"), kw.get("limit"))))
        reqs = _LAMBADA_CACHE[key][1]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return lambada(model, reqs, pad_id=pad, batch_size=kw.get("batch_size"), max_length=kw.get("seqlen"),
                       progress=progress, residual=residual)
    if info.kind == "tokens":  # released token ids: each row one example, no tokenizer
        from quantlens.evaluation.data import load_token_rows

        rows, tags = load_token_rows(kw["path"], kw.get("limit"))
        vocab = model.get_input_embeddings().weight.shape[0]
        if int(rows.max()) >= vocab:
            raise ValueError(f"dataset {name}: token id {int(rows.max())} is outside the model's vocabulary of {vocab}")
        r = perplexity(model, rows, batch_size=kw.get("batch_size"), progress=progress, residual=residual,
                       topk=kw.get("topk", 0), kl_reference=kw.get("kl_reference"),
                       routing=kw.get("routing", False), routing_reference=kw.get("routing_reference"))
        r["per_example"]["released"] = tags
        return r
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if kw.get("examples", "windows") in DOCUMENTS:
        example_len = kw.get("example_len") or 512
        if max_pos and example_len + 1 > max_pos:
            raise ValueError(f"example_len: {example_len} + BOS exceeds the model's max_position_embeddings {max_pos}")
        windows = document_examples(tokenizer, name, example_len, path=kw.get("path"), max_examples=kw.get("max_windows"),
                                    dedup=kw.get("examples") == "paper2")
    else:
        seqlen = kw.get("seqlen", 2048)
        if max_pos:
            seqlen = min(seqlen, max_pos)
        windows = perplexity_windows(tokenizer, name, seqlen, path=kw.get("path"), max_windows=kw.get("max_windows"))
    return perplexity(model, windows, batch_size=kw.get("batch_size"), progress=progress, residual=residual,
                      topk=kw.get("topk", 0), kl_reference=kw.get("kl_reference"),
                      routing=kw.get("routing", False), routing_reference=kw.get("routing_reference"))
