import pytest
import torch

from quantlens.quantize.quant import fake_quantize, inverse_power_transform, power_transform, qmax_symmetric, quantize
from quantlens.quantize.settings import QuantSpec


def test_known_values_per_tensor_4bit():
    # α = 7 → s = 7 / (2^3 − 1) = 1: plain rounding; ties round to even (torch.round).
    x = torch.tensor([[-7.0, -2.4, 0.5, 1.5, 2.6, 7.0]])
    r = quantize(x, QuantSpec(bits=4, granularity="tensor"))
    assert torch.equal(r.xq, torch.tensor([[-7.0, -2.0, 0.0, 2.0, 3.0, 7.0]]))
    assert r.scale.numel() == 1 and float(r.scale) == 1.0
    assert r.clipped_fraction == 0.0


def test_known_values_per_channel_8bit():
    x = torch.tensor([[127.0, -63.4, 0.2], [2.54, 1.0, -0.01]])
    r = quantize(x, QuantSpec(bits=8, granularity="channel"))
    assert torch.allclose(r.scale, torch.tensor([1.0, 0.02]))
    assert torch.allclose(r.xq, torch.tensor([[127.0, -63.0, 0.0], [2.54, 1.0, 0.0]]))


def test_qmax():
    assert [qmax_symmetric(b) for b in (2, 3, 4, 8, 16)] == [1, 3, 7, 127, 32767]


@pytest.mark.parametrize("gran,group", [("tensor", None), ("channel", None), ("token", None), ("group", 16)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_bounded_by_half_step(gran, group, bits):
    torch.manual_seed(0)
    x = torch.randn(24, 64) * torch.rand(24, 1) * 5
    spec = QuantSpec(bits=bits, granularity=gran, group_size=group)
    r = quantize(x, spec)
    err = (r.xq - x).abs()
    if gran == "tensor":
        step = r.scale.reshape(1, 1).expand_as(x)
    elif gran == "group":
        step = r.scale.reshape(24, 4, 1).expand(24, 4, 16).reshape(24, 64)
    else:
        step = r.scale.reshape(24, 1).expand_as(x)
    assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
    # and the levels are on the grid: xq / s is an integer within ±qmax
    levels = r.xq / step
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.abs().max() <= qmax_symmetric(bits) + 1e-3


def test_per_channel_scale_count_is_out_features():
    w = torch.randn(48, 32)
    assert quantize(w, QuantSpec(bits=4, granularity="channel")).scale.shape == (48,)
    assert quantize(w, QuantSpec(bits=4, granularity="group", group_size=8)).scale.shape == (48, 4)
    assert quantize(w, QuantSpec(bits=4, granularity="tensor")).scale.numel() == 1


def test_per_token_on_3d_activation():
    x = torch.randn(2, 5, 16)
    r = quantize(x, QuantSpec(bits=8, granularity="token"))
    assert r.scale.shape == (10,)
    assert torch.allclose(r.scale, x.abs().amax(-1).reshape(-1) / 127)
    assert r.xq.shape == x.shape


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="group_size: 5 does not divide the last dimension 16"):
        quantize(torch.randn(4, 16), QuantSpec(bits=4, granularity="group", group_size=5))


def test_p_equal_one_is_bitwise_uniform():
    torch.manual_seed(1)
    x = torch.randn(64, 64)
    a = quantize(x, QuantSpec(bits=4, transform_p=1.0)).xq
    # the explicit transform with p=1 is the identity in value too
    b = inverse_power_transform(quantize(power_transform(x, 1.0), QuantSpec(bits=4)).xq, 1.0)
    assert torch.equal(a, b)


def test_nonuniform_cube_root_known_values():
    # f(x) = x^(1/3): 8 → 2, -1 → -1, 0.001 → 0.1; α = 2, 3 bits: s = 2/3.
    x = torch.tensor([8.0, -1.0, 0.001, 0.0])
    r = quantize(x, QuantSpec(bits=3, granularity="tensor", transform_p=1 / 3))
    # f(x)/s = [3, -1.5, 0.15, 0] → round → [3, -2, 0, 0] → ·s = [2, -4/3, 0, 0] → cube
    expected = torch.tensor([8.0, -(4 / 3) ** 3, 0.0, 0.0])
    assert torch.allclose(r.xq, expected, rtol=1e-5)


def test_nonuniform_spends_levels_on_small_values():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    small = x.abs() < 0.5
    uni = (quantize(x, QuantSpec(bits=4, granularity="tensor")).xq - x)[small].abs().mean()
    nu = (quantize(x, QuantSpec(bits=4, granularity="tensor", transform_p=1 / 3)).xq - x)[small].abs().mean()
    assert nu < uni / 2


def test_asymmetric_known_values():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # min 0, max 3, 2 bits → 3 levels of 1.0
    r = quantize(x, QuantSpec(bits=2, granularity="channel", symmetric=False))
    assert torch.equal(r.xq, x)
    y = torch.tensor([[1.0, 1.4, 1.6, 4.0]])  # s = 1, zero = -1
    assert torch.equal(quantize(y, QuantSpec(bits=2, granularity="channel", symmetric=False)).xq,
                       torch.tensor([[1.0, 1.0, 2.0, 4.0]]))


def test_clipping_reports_fraction_and_bounds_alpha():
    x = torch.zeros(1000)
    x[:10] = 100.0  # 1 % outliers
    x[10:] = torch.linspace(-1, 1, 990)
    spec = QuantSpec(bits=8, granularity="tensor", clip_k=3.0)
    r = quantize(x, spec)
    sigma = x.std(unbiased=False)
    assert float(r.alpha) == pytest.approx(float(3 * sigma), rel=1e-6)
    assert r.clipped_fraction == pytest.approx(0.01)
    assert float(r.xq.abs().max()) <= float(3 * sigma) * (1 + 1e-6)
    assert quantize(x, QuantSpec(bits=8, granularity="tensor")).clipped_fraction == 0.0


def test_zero_tensor_and_dtype_preserved():
    z = torch.zeros(4, 8, dtype=torch.bfloat16)
    r = quantize(z, QuantSpec(bits=4))
    assert r.xq.dtype == torch.bfloat16 and torch.equal(r.xq, z)


def test_fake_quantize_equals_quantize():
    torch.manual_seed(3)
    x = torch.randn(3, 7, 32)
    for spec in (QuantSpec(bits=8, granularity="token"), QuantSpec(bits=4, granularity="group", group_size=8, transform_p=0.5)):
        assert torch.equal(fake_quantize(x, spec), quantize(x, spec).xq)


def test_input_not_modified():
    x = torch.randn(8, 8)
    before = x.clone()
    quantize(x, QuantSpec(bits=2, granularity="tensor", clip_k=1.0))
    assert torch.equal(x, before)


def test_alpha_ratio_clips_and_shrinks_step():
    x = torch.tensor([[-8.0, -1.0, 0.5, 4.0]])
    spec = QuantSpec(bits=3, granularity="channel")  # qmax 3
    r = quantize(x, spec, alpha_ratio=0.75)  # α = 6 → s = 2
    assert float(r.scale) == 2.0 and float(r.alpha) == 6.0
    assert torch.equal(r.xq, torch.tensor([[-6.0, -0.0, 0.0, 4.0]]))
    assert r.clipped_fraction == 0.25


def test_alpha_sweep_on_trained_model_has_interior_minimum(trained):
    from quantlens.analysis.alpha_sweep import alpha_sweep

    m, _ = trained("opt")
    rows = alpha_sweep(m, [3], [0.3, 0.5, 0.7, 1.0])
    d = {r["alpha_ratio"]: r["delta_l2_mean"] for r in rows}
    # at 3 bits a little clipping lowers ‖Δ‖₂; clipping too much raises it again
    assert min(d, key=d.get) in (0.5, 0.7) and d[0.3] > min(d.values()) and d[1.0] > min(d.values())
    assert [r["clipped_fraction"] for r in rows][-1] == 0.0


def test_a_state_matrix_is_quantized_in_rows_its_group_tiles():
    """include_mixer_states: a conv kernel [channels, 1, 4] under g128 is 4-tap rows, one scale each
    (its absmax exact, ≤ 2^4 values a row); Mamba-1's dt_proj rows of dt_rank 48 under g32 (32 does
    not tile 48): one group a row; a group that tiles the row stays the spec's."""
    from quantlens.quantize.quant import quantize_state, state_spec

    g = QuantSpec(bits=4, granularity="group", group_size=128)
    assert state_spec(g, 4).group_size == 4 and state_spec(g, 256).group_size == 128
    assert state_spec(QuantSpec(bits=4, granularity="group", group_size=32), 48).group_size == 48
    assert state_spec(QuantSpec(bits=4, granularity="group", group_size=16), 48).group_size == 16
    assert state_spec(QuantSpec(bits=4), 4) == QuantSpec(bits=4)  # (per channel: already one scale a row)
    w = torch.randn(64, 1, 4, generator=torch.Generator().manual_seed(0))
    q = quantize_state(w, g).xq
    assert q.shape == w.shape and not torch.equal(q, w)
    rows, qrows = w.reshape(64, 4), q.reshape(64, 4)
    big = rows.abs().argmax(dim=1)
    assert torch.allclose(qrows.gather(1, big[:, None]), rows.gather(1, big[:, None]))  # each row's absmax on its grid
    assert torch.equal(qrows, quantize(rows, state_spec(g, 4)).xq)
