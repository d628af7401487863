"""Artificial perturbations matched to the native quantization error (the paper's "lens").

Given a tensor ``x`` and a reference quantizer, the native error is Δ = Q(x) − x. An artificial
perturbation replaces Δ by noise ``n`` with the same variance, Var(n) = Var(Δ) exactly (the drawn
noise is rescaled to the measured standard deviation of Δ), so that only the *shape* of the
perturbation differs:

- distribution of the unit noise ``e``: ``gaussian`` N(0, 1), ``uniform`` U(−√3, √3),
  ``binary`` ±1 (Rademacher);
- magnitude rule: ``additive`` n ∝ e (independent of x), ``proportional`` n ∝ |x|·e (large values
  get large perturbations), ``inverse`` n ∝ e / (|x| + ε·rms(x)) (small values get large ones).

Noise is drawn from a CPU ``torch.Generator`` seeded explicitly, so the same seed gives the same
tensor on CPU and on GPU.
"""

from __future__ import annotations

import zlib

import torch

from quantlens.quantize.quant import fake_quantize
from quantlens.quantize.spec import PerturbSpec, QuantSpec

_SQRT3 = 3.0**0.5


def derive_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the run seed and a stable name (e.g. the layer's qualified name)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def unit_noise(shape: torch.Size | tuple[int, ...], distribution: str, generator: torch.Generator) -> torch.Tensor:
    """Zero-mean, unit-variance noise of the given distribution, drawn on ``generator``'s device."""
    dev = generator.device
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, device=dev)
    if distribution == "uniform":
        return torch.rand(shape, generator=generator, device=dev).mul_(2 * _SQRT3).sub_(_SQRT3)
    if distribution == "binary":
        return torch.randint(0, 2, shape, generator=generator, device=dev).to(torch.float32).mul_(2).sub_(1)
    raise ValueError(f"distribution: unknown {distribution!r} (gaussian, uniform, binary)")


def shaped_noise(
    x: torch.Tensor, target_std: torch.Tensor | float, spec: PerturbSpec, generator: torch.Generator
) -> torch.Tensor:
    """Noise shaped by ``spec`` (distribution × magnitude rule) with std exactly ``target_std``.

    Returned in float32 on ``x``'s device.
    """
    e = unit_noise(x.shape, spec.distribution, generator).to(x.device)
    xf = x.to(torch.float32)
    if spec.rule == "proportional":
        e = e.mul_(xf.abs())
    elif spec.rule == "inverse":
        eps = spec.inverse_eps * xf.square().mean().sqrt()
        e = e.div_(xf.abs() + eps)
    elif spec.rule != "additive":
        raise ValueError(f"rule: unknown {spec.rule!r} (additive, proportional, inverse)")
    std = e.std(unbiased=False)
    return e.mul_(torch.as_tensor(target_std, dtype=torch.float32, device=x.device) / std.clamp_min(1e-30))


def shaped_noise_rows(
    x: torch.Tensor, target_std: torch.Tensor, spec: PerturbSpec, generator: torch.Generator,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Like :func:`shaped_noise`, with the std matched **per row** (the last dim: one token of an
    activation, one token and head of K/V): ``target_std`` has shape ``[..., 1]``. With ``valid``
    (a bool per row), the std is instead matched over the valid rows together (one scalar target),
    and the ``inverse`` rule's rms is taken over them. Float32, on ``x``'s device."""
    e = unit_noise(x.shape, spec.distribution, generator).to(x.device)
    xf = x.to(torch.float32)
    if spec.rule == "proportional":
        e = e.mul_(xf.abs())
    elif spec.rule == "inverse":
        if valid is None:
            rms = xf.square().mean(-1, keepdim=True).sqrt()
        else:
            rms = xf.reshape(-1, xf.shape[-1])[valid.reshape(-1)].square().mean().sqrt()
        e = e.div_(xf.abs() + spec.inverse_eps * rms)
    elif spec.rule != "additive":
        raise ValueError(f"rule: unknown {spec.rule!r} (additive, proportional, inverse)")
    if valid is None:
        std = e.std(-1, unbiased=False, keepdim=True)
    else:
        std = e.reshape(-1, e.shape[-1])[valid.reshape(-1)].std(unbiased=False)
    return e.mul_(target_std.to(torch.float32) / std.clamp_min(1e-30))


def native_error(x: torch.Tensor, reference: QuantSpec) -> torch.Tensor:
    """Δ = Q(x) − x in float32."""
    return fake_quantize(x, reference).to(torch.float32) - x.to(torch.float32)


def perturb(x: torch.Tensor, reference: QuantSpec, spec: PerturbSpec, generator: torch.Generator) -> torch.Tensor:
    """x + n with Var(n) = Var(Q_reference(x) − x); same dtype and device as ``x``."""
    target_std = native_error(x, reference).std(unbiased=False)
    return (x.to(torch.float32) + shaped_noise(x, target_std, spec, generator)).to(x.dtype)


def make_generator(seed: int, name: str, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, name))
    return g
