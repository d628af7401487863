"""Every non-uniform format against an independent implementation, bit for bit: NF4 = bitsandbytes'
own quantize_4bit / dequantize_4bit (CPU, block 64); FP8 = torch's float8 casts of the scaled tensor;
MX and NVFP4 = torchao's reference implementations; plus the OCP rules by hand on worked values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantlens.quantize import formats
from quantlens.quantize.quant import fake_quantize, quantize
from quantlens.quantize.settings import ConfigError, FORMAT_NAMES, QuantSpec, setting_from_name


def _inputs():
    g = torch.Generator().manual_seed(0)
    yield "randn", torch.randn(64, 256, generator=g)
    wide = torch.randn(32, 128, generator=g) * torch.exp2(torch.randint(-20, 20, (32, 128), generator=g).float())
    yield "wide-exponents", wide
    z = torch.randn(16, 64, generator=g)
    z[:, :32] = 0  # all-zero blocks
    yield "zero-blocks", z


@pytest.fixture(scope="module")
def weights(trained):
    """Real weights: one attention and one MLP matrix of each shared trained model."""
    out = {}
    for fam in ("opt", "bloom", "llama"):
        model, _ = trained(fam)
        mats = [(n, p.detach()) for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "wte" not in n
                and p.shape[1] % 64 == 0]
        out.update({f"{fam}:{n}": w for n, w in (mats[0], mats[-1])})
    return out


REF_LIBS = Path(os.environ.get("QUANTLENS_REF_LIBS", Path(__file__).resolve().parents[1] / ".ref-libs"))


@pytest.fixture(scope="module")
def reference(weights, tmp_path_factory):
    """The reference libraries' dequantized tensors of every input (random and the shared models'
    weights), computed by tests/reference_formats.py in a subprocess with .ref-libs/ on its path
    (scripts/install.sh installs bitsandbytes and torchao there, off the environment)."""
    if not (REF_LIBS / "bitsandbytes").is_dir() or not (REF_LIBS / "torchao").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{REF_LIBS} lacks bitsandbytes / torchao: scripts/install.sh installs them")
        pytest.skip(f"no reference libraries in {REF_LIBS}; scripts/install.sh installs them")
    inputs = {**dict(_inputs()), **weights}
    d = tmp_path_factory.mktemp("reference")
    torch.save(inputs, d / "in.pt")
    env = {**os.environ, "PYTHONPATH": str(REF_LIBS)}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("reference_formats.py")), str(d / "in.pt"), str(d / "out.pt")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return inputs, torch.load(d / "out.pt")


def test_nf4_equals_bitsandbytes(reference):
    inputs, ref = reference
    spec = setting_from_name("W4A16-nf4").weights
    assert (spec.format, spec.group_size) == ("nf", 64)
    for name, x in inputs.items():
        assert torch.equal(quantize(x, spec).xq, ref[f"nf4|{name}"]), name
    assert torch.equal(torch.tensor(formats.NF4), ref["nf4-table"])


def test_nf3_is_flutes_construction_and_nf4_is_qloras():
    # QLoRA's construction at 4 bits reproduces bitsandbytes' table to float32 precision
    nf4 = torch.tensor(formats.NF4)
    half, offset = 8, 1 - 0.5 * (1 / 32 + 1 / 30)
    nd = torch.special.ndtri
    pos = nd(torch.tensor([offset + (0.5 - offset) * i / half for i in range(half)], dtype=torch.float64))
    neg = -nd(torch.tensor([offset + (0.5 - offset) * i / (half - 1) for i in range(half - 1)], dtype=torch.float64))
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    assert torch.allclose((v / v.max()).float(), nf4, atol=1e-6)
    nf3 = formats.normal_float(3)
    assert len(nf3) == 8 and nf3[0] == -1.0 and nf3[-1] == 1.0 and 0.0 in nf3
    assert nf3[4:7] == pytest.approx(formats.NF4[9:14:2], abs=1e-6)  # FLUTE's NF3 keeps every other NF4 level
    assert len(formats.normal_float(2)) == 4 and len(formats.normal_float(5)) == 32


# --- FP8 and the other minifloats -------------------------------------------------------------------
@pytest.mark.parametrize("element,dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_equals_torch_cast_of_the_scaled_tensor(element, dtype, weights):
    spec = QuantSpec(bits=8, format="fp", element=element, granularity="channel")
    fmax = formats.MINIFLOATS[element].max
    for name, x in [*_inputs(), *weights.items()]:
        s = (x.abs().amax(-1, keepdim=True) / fmax).clamp_min(1e-38)
        ref = (x * s.reciprocal()).clamp(-fmax, fmax).to(dtype).to(torch.float32) * s
        assert torch.equal(quantize(x, spec).xq, ref), name
        assert torch.equal(fake_quantize(x, spec), ref), name
        fmt = formats.MINIFLOATS[element]  # the definition's rounding, without torch's cast, on the same tensor
        assert torch.equal(formats.round_minifloat((x * s.reciprocal()), fmt, native=False) * s, ref), name


def test_minifloat_rounding_on_every_value_of_every_grid():
    fp4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    m = formats.MINIFLOATS["e2m1"]
    # the levels themselves, halfway points (ties to even), saturation, negatives
    assert torch.equal(formats.round_minifloat(fp4, m), fp4)
    assert torch.equal(formats.round_minifloat(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0]), m),
                       torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0]))
    assert torch.equal(formats.round_minifloat(-fp4, m), -fp4)
    for name, fmt in formats.MINIFLOATS.items():
        levels = _levels(fmt)
        if name in ("e4m3", "e5m2"):  # the finite values of torch's own FP8 dtypes
            dt = torch.float8_e4m3fn if name == "e4m3" else torch.float8_e5m2
            every = torch.arange(256, dtype=torch.uint8).view(dt).float()
            assert torch.equal(torch.unique(every[every.isfinite()]), levels), name
        assert torch.equal(formats.round_minifloat(levels, fmt, native=False), levels), name
        g = torch.Generator().manual_seed(2)  # random points at every scale: the result is the nearest level
        y = (torch.rand(50_000, generator=g) * 2 - 1) * torch.exp2(torch.rand(50_000, generator=g) * 30 - 25) * fmt.max
        q = formats.round_minifloat(y, fmt, native=False)
        assert torch.equal(q, formats.round_minifloat(y, fmt)), name  # FP8: torch's cast gives the same values
        nearest = levels[(y[:, None] - levels[None]).abs().argmin(-1)]
        assert torch.equal((q - y).abs(), (nearest - y).abs()), name
        assert torch.isin(q, levels).all(), name


def _levels(fmt: formats.Minifloat) -> torch.Tensor:
    """Every finite value of a minifloat, from its definition: subnormals m·2^(emin−M), normals (1 + m/2^M)·2^e."""
    mant = torch.arange(2**fmt.mbits, dtype=torch.float64)
    vals = [mant * 2.0 ** (fmt.emin - fmt.mbits)]
    vals += [(1 + mant / 2**fmt.mbits) * 2.0**e for e in range(fmt.emin, fmt.emax + 1)]
    pos = torch.cat(vals)
    pos = pos[pos <= fmt.max]
    return torch.unique(torch.cat([-pos, pos])).float()


# --- MX and NVFP4 against torchao -----------------------------------------------------------------------
_MX = {"mxfp8": "e4m3", "mxfp8e5m2": "e5m2", "mxfp6": "e2m3", "mxfp6e3m2": "e3m2", "mxfp4": "e2m1"}


@pytest.mark.parametrize("fmt", list(_MX))
def test_mx_equals_torchao(fmt, reference):
    inputs, ref = reference
    element = _MX[fmt]
    bits = formats.MINIFLOATS[element].bits
    spec = setting_from_name(f"W{bits}A16-{fmt}").weights
    assert (spec.element, spec.scale, spec.group_size) == (element, "e8m0", 32)
    for name, x in inputs.items():
        ours = quantize(x, spec).xq
        # torchao divides by 2^-126 but multiplies back by 2^-127 in blocks of amax < 2^(emax-126): not ours
        tiny = x.reshape(-1, 32).abs().amax(-1) < 2.0 ** (formats.MINIFLOATS[element].emax - 126)
        keep = (~tiny).repeat_interleave(32).reshape(x.shape)
        assert torch.equal(ours[keep], ref[f"{fmt}|{name}"][keep]), name


@pytest.mark.parametrize("global_scale", [False, True])
def test_nvfp4_equals_torchao(global_scale, reference):
    inputs, ref = reference
    spec = QuantSpec(bits=4, format="fp", element="e2m1", scale="e4m3", granularity="group", group_size=16,
                     global_scale="tensor" if global_scale else None)
    if global_scale:
        assert spec == setting_from_name("W4A16-nvfp4").weights
    for name, x in inputs.items():
        assert torch.equal(quantize(x, spec).xq, ref[f"nvfp4{'-pts' if global_scale else ''}|{name}"]), name


def test_mx_block_scale_by_the_ocp_rules():
    # a block with amax 5 → ⌊log2 5⌋ = 2; FP4's emax 2 → X = 2^0; elements 5 → 4 (RNE between 4 and 6), 6.1 saturates? no: amax
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([5.0, 2.6, -0.3, 0.24])
    q = quantize(x, QuantSpec(bits=4, format="fp", scale="e8m0", granularity="group", group_size=32)).xq
    assert q[0, :4].tolist() == [4.0, 3.0, -0.5, 0.0]
    # amax 100: X = 2^(6-2) = 16 → 100/16 = 6.25 → 6 (saturating) → 96
    x[0, 0] = 100.0
    q = quantize(x, QuantSpec(bits=4, format="fp", scale="e8m0", granularity="group", group_size=32)).xq
    assert q[0, 0] == 96.0 and q[0, 1] == 0.0  # 2.6/16 = 0.1625 → 0 (half of the 0.5 subnormal step is 0.25)
    # MXINT8: X = 2^⌊log2 amax⌋, elements k/64: 1.0 → 1.0, 0.3 → round(19.2)/64
    y = torch.zeros(1, 32)
    y[0, :2] = torch.tensor([1.0, 0.3])
    q = quantize(y, setting_from_name("W8A16-mxint8").weights).xq
    assert q[0, :2].tolist() == [1.0, 19 / 64]


# --- k-means codebooks --------------------------------------------------------------------------------
def test_kmeans_codebook_per_channel_is_deterministic_and_fits_the_values():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 512, generator=g)
    spec = setting_from_name("W3A16-km").weights
    a, b = quantize(x, spec).xq, quantize(x, spec).xq
    assert torch.equal(a, b)
    assert all(torch.unique(r).numel() <= 8 for r in a)
    # a codebook fitted on the values beats the uniform grid of the same bits on a Gaussian
    int3 = quantize(x, QuantSpec(bits=3, granularity="channel")).xq
    assert (a - x).square().sum() < (int3 - x).square().sum()
    # clustered values are found exactly
    c = torch.tensor([-3.0, -1.0, 0.5, 2.0]).repeat(1, 64)
    assert torch.equal(quantize(c, QuantSpec(bits=2, format="km", granularity="channel")).xq, c)


# --- The settings algebra ---------------------------------------------------------------------------
def test_format_names_parse_and_round_trip_through_the_long_form():
    for name in FORMAT_NAMES:
        s = setting_from_name(name)
        long = {"name": "long", **{k: v.model_dump() for k, v in (("weights", s.weights), ("activations", s.activations), ("kv", s.kv)) if v},
                "include_lm_head": s.include_lm_head, "include_embeddings": s.include_embeddings}  # (a llama.cpp mixture's: true)
        from quantlens.quantize.settings import resolve_setting

        assert resolve_setting(long).same_computation(s), name
    assert setting_from_name("W8A8-fp8").weights.element == "e4m3"
    assert setting_from_name("W8A8-fp8").same_computation(setting_from_name("W8A8-fp"))
    assert not setting_from_name("W8A8-fp8").same_computation(setting_from_name("W8A8-fp8e5m2"))
    # run keys of settings made before formats existed are unchanged: the format fields at their defaults drop out
    assert "format" not in setting_from_name("W4A16").identity()["weights"]


@pytest.mark.parametrize("name,says", [
    ("W5A16-fp", "no FP format has 5 bits"), ("W4A8-fp4", "-fp4 names 4 bits but activations 8"),
    ("W8A16-nvfp", "NVFP4 has 4 bits"), ("W4A16-g64-mxfp4", "block size is fixed"),
    ("W4A16-mxfp4-clip3", "clipping means nothing"), ("W4A16-nu-nf4", "does not combine"),
    ("W4A16-km-clip3", "clipping means nothing"), ("W4A16-mxint", "MXINT is defined at 8 bits"),
])
def test_formats_that_do_not_exist_are_one_clear_line(name, says):
    with pytest.raises(ConfigError, match=says):
        setting_from_name(name)
