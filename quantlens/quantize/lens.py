"""The first paper's lens on a format: how large Δ is *relative to the value it perturbs*, by magnitude.

"Small values suffer most": for a tensor x and its quantized copy Q(x), the elements are split by
the rank of |x| into ``BUCKETS`` equal-count buckets (deciles: bucket 1 holds the smallest 10 % of
|x|, bucket 10 the largest) and the mean of |Δ| / |x| is taken in each. Rank buckets are scale-free,
so the curves of two formats, layers or models are comparable. Zeros are left out (|Δ|/0), and a
tensor of more than ``MAX_SAMPLES`` elements (an activation: ``ACTIVATION_SAMPLES``) is read at a fixed
stride (deterministic).
"""

from __future__ import annotations

import torch

BUCKETS = 10
MAX_SAMPLES = 1 << 16  # a weight tensor (once per patch; 2^18 before: its argsort was 3/4 of a real model's patch time)
ACTIVATION_SAMPLES = 1 << 14  # an activation of one of the sampled forwards (every layer, 4 forwards: the hot path)


def magnitude_buckets(x: torch.Tensor, xq: torch.Tensor, buckets: int = BUCKETS, max_samples: int = MAX_SAMPLES) -> torch.Tensor:
    """``[2, buckets]`` float64: the sum of |Δ|/|x| and the element count in each rank bucket of |x|
    (sums, so the buckets of several tensors or forwards add up; mean = row 0 / row 1)."""
    xf, qf = x.detach().reshape(-1), xq.detach().reshape(-1)
    step = max(1, -(-xf.numel() // max_samples))
    xf, qf = xf[::step].to(torch.float32), qf[::step].to(torch.float32)
    keep = xf != 0
    a = xf[keep].abs()
    r = (qf[keep] - xf[keep]).abs_().div_(a)
    chunks = r[a.argsort()].tensor_split(buckets)
    sums = torch.stack([c.double().sum() for c in chunks])
    counts = torch.tensor([float(c.numel()) for c in chunks], dtype=torch.float64, device=sums.device)
    return torch.stack([sums, counts]).cpu()


def bucket_means(acc: torch.Tensor) -> list[float]:
    """Mean |Δ|/|x| per bucket from summed :func:`magnitude_buckets` (nan for an empty bucket)."""
    return [float(s / c) if c > 0 else float("nan") for s, c in zip(acc[0], acc[1])]
