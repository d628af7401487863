"""The KL error of a setting: KL(p_ref ‖ p_q) per token, averaged over each example, without storing logits.

The reference run keeps, for every predicted token, its top-``k`` log-probabilities (and their token
ids) and the log of the mass of every other token (the tail), computed in the same forward pass as its
NLL (:func:`reference_topk`). A quantized run then computes, in its own forward pass, the KL between
the two distributions *coarsened* to those k tokens plus one tail bucket (:func:`truncated_kl`):

    KL_k = Σ_{i ∈ top-k} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail)

By the log-sum inequality, merging outcomes never increases a KL divergence, so 0 ≤ KL_k ≤ KL exactly;
the gap is the KL within the tail, which the top-k mass bounds (tests/test_kl.py measures it on the
shared models). The second paper reports that the KL error correlates ≥ 0.97 with the NLL error;
llama.cpp's users compare quantizations by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOP_K = 32


@dataclass
class TopK:
    """What the KL needs of the reference: ``ids`` [n, T, k] int32, ``logp`` [n, T, k] and
    ``log_tail`` [n, T] float32, for n examples of T predicted tokens (``valid`` [n, T]: real tokens)."""

    ids: torch.Tensor
    logp: torch.Tensor
    log_tail: torch.Tensor
    valid: torch.Tensor | None = None

    def rows(self, s: int, e: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.ids[s:e].to(device, torch.long), self.logp[s:e].to(device), self.log_tail[s:e].to(device))

    def to_dict(self) -> dict[str, torch.Tensor]:
        d = {"ids": self.ids, "logp": self.logp, "log_tail": self.log_tail}
        return d if self.valid is None else {**d, "valid": self.valid}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> "TopK":
        return cls(d["ids"], d["logp"], d["log_tail"], d.get("valid"))


def _log_rest(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``ids`` (the tail), exactly as a log-sum-exp over the rest."""
    return logp.scatter(-1, ids, float("-inf")).logsumexp(-1)


def reference_topk(logits: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits`` [..., V] → (ids [..., k] int32, logp [..., k], log_tail [...]) in float32."""
    logp = logits.float().log_softmax(-1)
    vals, ids = logp.topk(k, dim=-1)
    return ids.to(torch.int32), vals, _log_rest(logp, ids)


def truncated_kl(logits: torch.Tensor, ids: torch.Tensor, logp_ref: torch.Tensor, log_tail_ref: torch.Tensor) -> torch.Tensor:
    """KL_k(p_ref ‖ q) per token ([...]) of ``logits`` [..., V] against the reference's top-k."""
    logq = logits.float().log_softmax(-1)
    lq = logq.gather(-1, ids)
    tail_q = _log_rest(logq, ids)
    head = (logp_ref.exp() * (logp_ref - lq)).sum(-1)
    tail = torch.where(log_tail_ref > float("-inf"), log_tail_ref.exp() * (log_tail_ref - tail_q), torch.zeros_like(log_tail_ref))
    return (head + tail).clamp_min(0.0)


def exact_kl(logits_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ q) per token from both full logits (for tests and the bound's measurement)."""
    lp, lq = logits_ref.float().log_softmax(-1), logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)
