"""One scoring primitive: the log-likelihood of target tokens given the tokens before them
(lm-evaluation-harness's ``loglikelihood``), batched. Every dataset is a request builder over it.

Requests come in two shapes:

- :class:`Windows` — ``[n, T]`` rows of equal length, every next token a target (perplexity
  windows, documents, the released rows): no padding, so the per-token extras apply — the
  reference's top-k, the truncated KL against it, an MoE's router flips;
- :class:`Continuations` — (context ids, target ids) pairs (Lambada's last word, lm-eval's gold
  continuations): sorted by length, right-padded per batch, a context longer than ``max_length``
  loses its oldest tokens.

:func:`loglikelihood` runs them — one forward per batch, losses and greedy checks as tensor ops,
no per-token Python loop; CUDA out-of-memory halves the batch — and returns :class:`Scores`
(per request: summed NLL, target tokens, all-greedy); each request type turns scores into its
dataset's result (:meth:`Windows.result`, :meth:`Continuations.result`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from quantlens.evaluation.kl import TopK, reference_topk, truncated_kl
from quantlens.evaluation.residual import ResidualRecorder
from quantlens.evaluation.routing import RoutingRecorder
from quantlens.evaluation.sources import example_ids
from quantlens.model.layerwise import Batch
from quantlens.model.streaming import streaming_device
from quantlens.quantize.patch import set_valid_tokens

Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class Scores:
    """What :func:`loglikelihood` measured, per request (in request order)."""

    nll: torch.Tensor  # [n] float64: summed NLL of the target tokens
    n_tokens: torch.Tensor  # [n] int64: target tokens
    greedy: torch.Tensor | None  # [n] bool: every target token the argmax (when asked)
    input_tokens: int  # tokens run through the model
    batch_size: int  # the batch used in the end (after OOM halvings)
    seconds: float
    kl: torch.Tensor | None = None  # [n] float64: summed truncated KL against the reference (Windows)
    topk: TopK | None = None  # the reference's top-k of every target token (Windows)
    residual: ResidualRecorder | None = None
    routing: RoutingRecorder | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Requests(Protocol):
    n: int
    per_token: bool  # every next token a target, unpadded: the top-k, KL and router flips apply
    input_tokens: int  # tokens run through the model

    def default_batch(self, model: nn.Module, device: torch.device) -> int: ...

    def batch(self, s: int, e: int, device: torch.device) -> Batch: ...
    def targets(self, b: Batch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...
    def tokens(self) -> Any: ...
    def result(self, scores: Scores) -> dict[str, Any]: ...


def input_device(model: nn.Module) -> torch.device:
    dev = streaming_device(model)
    return dev if dev is not None else model.get_input_embeddings().weight.device


def auto_batch(model: nn.Module, seqlen: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    from quantlens.model.footprint import auto_batch as fit

    free, _ = torch.cuda.mem_get_info(device)
    cfg = model.config
    return fit(free, seqlen, getattr(cfg, "vocab_size", 50000), getattr(cfg, "hidden_size", 4096))


# --- Request shapes ---------------------------------------------------------------------------------------
class Windows:
    """``[n, T]`` token rows, each one example, every token after the first a target."""

    per_token = True

    def __init__(self, rows: torch.Tensor, columns: dict[str, Any] | None = None):
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise ValueError(f"windows: expected a non-empty [n, seqlen] tensor, got shape {tuple(rows.shape)}")
        self.rows, self.columns = rows, columns or {}
        self.n, self.seqlen = rows.shape
        self.input_tokens = rows.numel()

    def default_batch(self, model: nn.Module, device: torch.device) -> int:
        return auto_batch(model, self.seqlen, device)

    def batch(self, s: int, e: int, device: torch.device) -> Batch:
        return Batch(s, e, {"input_ids": self.rows[s:e].to(device, non_blocking=True)}, state={"idx": torch.arange(s, e)})

    def targets(self, b: Batch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return logits[:, :-1], b.inputs["input_ids"][:, 1:], None

    def tokens(self) -> torch.Tensor:
        return self.rows

    def result(self, sc: Scores) -> dict[str, Any]:
        """ppl = exp(mean next-token NLL over all predicted tokens), and one row per window."""
        n, seqlen = self.n, self.seqlen
        mean_nll = float(sc.nll.sum()) / (n * (seqlen - 1))
        out: dict[str, Any] = {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": float(n * seqlen), "windows": float(n),
                               **_timing(sc)}
        ex = pd.DataFrame({"example_id": example_ids(self.rows), "n_tokens": seqlen - 1, "nll": (sc.nll / (seqlen - 1)).numpy()})
        if sc.kl is not None:
            ex["kl"] = (sc.kl / (seqlen - 1)).numpy()
        if sc.routing is not None and sc.routing.reference is not None:
            ex["router_flips"] = sc.routing.example_flips().numpy()
        for k, v in self.columns.items():
            ex[k] = v
        out["per_example"], out["example_tokens"] = ex, self.rows  # row i: the tokens of example i
        return _with_recorders(out, sc, example_ids(self.rows))


class Continuations:
    """(context ids, target ids) pairs: the NLL of the target after its context, and whether every
    target token is the greedy argmax."""

    per_token = False

    def __init__(self, pairs: list[tuple[list[int], list[int]]], *, pad_id: int = 0, max_length: int = 2048):
        if not pairs:
            raise ValueError("lambada: no examples")
        self.pairs, self.pad_id, self.n = pairs, pad_id, len(pairs)
        self.inputs = [((c + t)[:-1][-max_length:], t) for c, t in pairs]  # inputs: all but the last target token
        self.order = sorted(range(self.n), key=lambda i: -len(self.inputs[i][0]))
        self.input_tokens = sum(len(inp) for inp, _ in self.inputs)

    def default_batch(self, model: nn.Module, device: torch.device) -> int:
        """Twice the windows' batch at the longest input (most are shorter)."""
        return auto_batch(model, len(self.inputs[self.order[0]][0]), device) * 2

    def batch(self, s: int, e: int, device: torch.device) -> Batch:
        idx = self.order[s:e]
        ids, mask, tgt, pos, valid = padded([self.inputs[i] for i in idx], self.pad_id)
        state = {"idx": torch.tensor(idx), "mask": mask, "tgt": tgt.to(device), "pos": pos.to(device), "valid": valid.to(device)}
        return Batch(s, e, {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, state=state)

    def targets(self, b: Batch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        pos = b.state["pos"]
        picked = torch.gather(logits, 1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return picked, b.state["tgt"], b.state["valid"]

    def tokens(self) -> list[list[int]]:
        return [c + t for c, t in self.pairs]

    def result(self, sc: Scores) -> dict[str, Any]:
        """Accuracy (every target token greedy), mean NLL per passage, and one row per passage."""
        n_tokens = self.input_tokens
        passages = self.tokens()
        ids = example_ids(passages)
        n_tgt = sc.n_tokens.double()
        out: dict[str, Any] = {
            "acc": float(sc.greedy.double().mean()), "nll": float(sc.nll.mean()), "examples": float(self.n),
            "tokens": float(n_tokens), **_timing(sc),
            "per_example": pd.DataFrame({"example_id": ids, "n_tokens": sc.n_tokens.numpy(), "nll": (sc.nll / n_tgt).numpy(),
                                         "correct": sc.greedy.numpy()}),
            "example_tokens": passages,
        }
        return _with_recorders(out, sc, ids)


def padded(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
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


def _timing(sc: Scores) -> dict[str, float]:
    t = float(sc.input_tokens)
    return {"seconds": sc.seconds, "tokens_per_s": t / sc.seconds if sc.seconds > 0 else float("inf"), "batch_size": float(sc.batch_size)}


def _with_recorders(out: dict[str, Any], sc: Scores, ids: list[str]) -> dict[str, Any]:
    if sc.topk is not None:
        out["topk"] = sc.topk
    if sc.residual is not None:
        out["residual"] = pd.DataFrame(sc.residual.rows(ids))
    if sc.routing is not None:
        out["routing"] = sc.routing.table()
        if sc.routing.sets is not None:
            out["routing_sets"] = sc.routing.sets
    return out


# --- The primitive ------------------------------------------------------------------------------------------
@torch.inference_mode()
def loglikelihood(
    model: nn.Module,
    requests: Requests,
    *,
    batch_size: int | None = None,
    progress: Progress | None = None,
    greedy: bool = False,
    residual: bool = False,
    topk: int = 0,
    kl_reference: TopK | None = None,
    routing: bool = False,
    routing_reference: torch.Tensor | None = None,
) -> Scores:
    """Score every request's targets: summed NLL, target tokens and (``greedy``) whether all are the
    argmax. ``residual`` also records the residual-stream statistics over the real (unpadded) input
    tokens. On :class:`Windows` only: ``topk`` > 0 (the reference run) keeps every target token's
    top-``topk`` log-probabilities and tail mass; ``kl_reference`` (those of the reference, same
    windows) sums each example's truncated KL(p_ref ‖ p); ``routing`` records an MoE's expert load
    and the reference's expert sets, ``routing_reference`` the router flips against them."""
    device = input_device(model)
    if not requests.per_token and (topk or kl_reference is not None or routing or routing_reference is not None):
        raise ValueError("top-k, KL and router flips are scored on windows (every next token), not on continuations")
    bs = batch_size or requests.default_batch(model, device)
    tally = _Tally(model, requests, device, greedy, residual, topk, kl_reference, routing, routing_reference)
    t0 = time.perf_counter()
    try:
        with tally.recording():
            used = drive(model, requests.n, bs, tally.prepare, tally.score, progress)
    finally:
        set_valid_tokens(model, None)
    return tally.scores(used, time.perf_counter() - t0)


class _Tally:
    """:func:`loglikelihood`'s per-request sums, filled batch by batch, and the recorders it runs."""

    def __init__(self, model: nn.Module, requests: Requests, device: torch.device, greedy: bool, residual: bool, topk: int,
                 kl_reference: TopK | None, routing: bool, routing_reference: torch.Tensor | None):
        n, windows = requests.n, requests.per_token
        self.model, self.requests, self.device, self.topk, self.kl_reference = model, requests, device, topk, kl_reference
        self.nll, self.n_tok = torch.zeros(n, dtype=torch.float64, device=device), torch.zeros(n, dtype=torch.long, device=device)
        self.ok = torch.zeros(n, dtype=torch.bool, device=device) if greedy else None
        self.recorder = ResidualRecorder(model, n) if residual else None
        self.router = _router(model, requests, routing, routing_reference) if windows else None
        self.top, self.ex_kl = _kl_buffers(requests, topk, kl_reference, device) if windows else (None, None)

    def recording(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for rec in (self.recorder, self.router):
            if rec is not None:
                stack.enter_context(rec)
        return stack

    def prepare(self, s: int, e: int) -> Batch:
        b = self.requests.batch(s, e, self.device)

        def enter() -> None:
            mask = b.state.get("mask")  # padded requests: the real tokens
            if self.recorder is not None:
                self.recorder.begin_batch(b.state["idx"], mask)
            if self.router is not None:
                self.router.begin_batch(b.state["idx"])
            if mask is not None:
                set_valid_tokens(self.model, b.inputs["attention_mask"])  # activation statistics and batch-matched noise skip padding

        b.enter = enter
        return b

    def score(self, b: Batch, logits: torch.Tensor) -> None:
        picked, tgt, valid = self.requests.targets(b, logits)
        idx = b.state["idx"].to(self.device)
        tok = F.cross_entropy(picked.reshape(-1, picked.shape[-1]).float(), tgt.reshape(-1), reduction="none").view(tgt.shape)
        self.nll[idx] = (tok if valid is None else tok * valid).double().sum(-1)
        self.n_tok[idx] = tgt.shape[1] if valid is None else valid.sum(-1)
        if self.ok is not None:
            hit = picked.argmax(-1) == tgt
            self.ok[idx] = (hit if valid is None else hit | ~valid).all(-1)
        if self.top is not None or self.ex_kl is not None:
            _kl_parts(logits, b.start, b.end, self.top, self.topk, self.kl_reference, self.ex_kl)

    def scores(self, used: int, seconds: float) -> Scores:
        return Scores(self.nll.cpu(), self.n_tok.cpu(), self.ok.cpu() if self.ok is not None else None,
                      self.requests.input_tokens, used, seconds,
                      self.ex_kl.cpu() if self.ex_kl is not None else None, TopK(*self.top) if self.top is not None else None,
                      self.recorder, self.router)


def _router(model: nn.Module, w: Windows, routing: bool, reference: torch.Tensor | None) -> RoutingRecorder | None:
    if not routing and reference is None:
        return None
    router = RoutingRecorder(model, w.n, w.seqlen, reference)
    return router if router.active else None


def _kl_buffers(w: Windows, topk: int, kl_reference: TopK | None, device: torch.device) -> tuple:
    """The reference's top-k store ([n, T-1, k] ids and log-probs, [n, T-1] tail) and the per-example KL sums."""
    n, seqlen = w.n, w.seqlen
    if kl_reference is not None and tuple(kl_reference.ids.shape[:2]) != (n, seqlen - 1):
        raise ValueError(f"kl_reference: top-k of {tuple(kl_reference.ids.shape[:2])} tokens, not of these {n} × {seqlen - 1}")
    top = (torch.zeros(n, seqlen - 1, topk, dtype=torch.int32), torch.zeros(n, seqlen - 1, topk), torch.zeros(n, seqlen - 1)) if topk else None
    ex_kl = torch.zeros(n, dtype=torch.float64, device=device) if kl_reference is not None else None
    return top, ex_kl


def _kl_parts(logits: torch.Tensor, s: int, e: int, top: tuple | None, topk: int, kl_reference: TopK | None,
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


# --- Batching -------------------------------------------------------------------------------------------------
def run_batches(n: int, batch_size: int, fn: Callable[[int, int], None], progress: Progress | None) -> int:
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


def drive(model: nn.Module, n: int, batch_size: int, prepare: Callable[[int, int], Batch],
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

    return run_batches(n, batch_size, step, progress)
