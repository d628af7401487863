import pytest
import torch

from quantlens.quantize.perturb import derive_seed, make_generator, native_error, perturb, shaped_noise, unit_noise
from quantlens.quantize.settings import PerturbSpec, QuantSpec

REF = QuantSpec(bits=8, granularity="channel")


@pytest.fixture(scope="module")
def weight():
    torch.manual_seed(0)
    return torch.randn(1000, 1000) * 0.02  # 1e6 elements


@pytest.mark.parametrize("dist", ["gaussian", "uniform", "binary"])
@pytest.mark.parametrize("rule", ["additive", "proportional", "inverse"])
def test_variance_matches_native_error(weight, dist, rule):
    target = native_error(weight, REF).var(unbiased=False)
    out = perturb(weight, REF, PerturbSpec(distribution=dist, rule=rule), make_generator(0, "w"))
    got = (out - weight).var(unbiased=False)
    assert float(got) == pytest.approx(float(target), rel=0.02)
    assert not torch.equal(out, weight)


def test_unit_noise_moments():
    g = torch.Generator().manual_seed(0)
    for dist in ("gaussian", "uniform", "binary"):
        e = unit_noise((1_000_000,), dist, g)
        assert abs(float(e.mean())) < 0.005 and float(e.var()) == pytest.approx(1.0, rel=0.01)
    b = unit_noise((1000,), "binary", g)
    assert set(b.unique().tolist()) == {-1.0, 1.0}
    u = unit_noise((100_000,), "uniform", g)
    assert float(u.abs().max()) <= 3**0.5


def test_same_seed_same_tensor_different_seed_differs(weight):
    spec = PerturbSpec(distribution="gaussian", seed=7)
    a = perturb(weight, REF, spec, make_generator(7, "layer.0"))
    b = perturb(weight, REF, spec, make_generator(7, "layer.0"))
    c = perturb(weight, REF, spec, make_generator(8, "layer.0"))
    d = perturb(weight, REF, spec, make_generator(7, "layer.1"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert derive_seed(7, "layer.0") == derive_seed(7, "layer.0") != derive_seed(7, "layer.1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_same_seed_same_tensor_on_gpu(weight):
    spec = PerturbSpec(distribution="uniform", rule="proportional", seed=1)
    cpu = perturb(weight, REF, spec, make_generator(1, "l"))
    gpu = perturb(weight.cuda(), REF, spec, make_generator(1, "l")).cpu()
    assert torch.allclose(cpu, gpu, rtol=1e-5, atol=1e-8)


def test_magnitude_rules_shape_the_noise():
    x = torch.cat([torch.full((50_000,), 0.01), torch.full((50_000,), 1.0)])
    g = lambda: make_generator(0, "x")  # noqa: E731
    prop = shaped_noise(x, 1.0, PerturbSpec(rule="proportional"), g())
    inv = shaped_noise(x, 1.0, PerturbSpec(rule="inverse", inverse_eps=0.01), g())
    add = shaped_noise(x, 1.0, PerturbSpec(rule="additive"), g())
    small, large = slice(0, 50_000), slice(50_000, None)
    assert prop[large].std() / prop[small].std() == pytest.approx(100, rel=0.05)
    assert inv[small].std() > 20 * inv[large].std()
    assert add[large].std() / add[small].std() == pytest.approx(1.0, rel=0.05)
    for n in (prop, inv, add):
        assert float(n.std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)
