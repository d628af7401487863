"""compressed-tensors checkpoints (quantlens.checkpoints.compressed), against the library's own packer.

Each case quantizes a tiny random Llama with the library (``apply_quantization_config``; scales and
zero points from min/max by the library's ``calculate_qparams`` / ``generate_gparam``, the observers'
job in llm-compressor, which is not installed), compresses it with ``ModelCompressor.compress_model``,
saves model.safetensors + the config.json that ``ModelCompressor.update_config`` writes, and reads it
back with ``packed_modules`` + ``dequantize`` through ``safetensors.safe_open``. The rebuilt weight
must equal the library's ``fake_quantize`` of the original weight with the same scales *exactly*
(torch.equal: both compute in the model's dtype, the dtype the scales are stored in), lie on the
format's grid, and take at most 2^bits values per row / group.
"""

from __future__ import annotations

import json

import pytest
import torch

from quantlens.checkpoints.compressed import dequantize, describe, packed_modules
from quantlens.quantize.settings import ConfigError

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MODULES = [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]


def _args(**kw):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(**kw)


def _scheme(targets, weights, inputs=None):
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs)


def _cases():
    fp8_token = dict(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
    nvfp4 = dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                 dynamic=False, scale_dtype=torch.float8_e4m3fn)
    return {
        # id: (config groups, model dtype, format written, key names per module, bits)
        "pack-int4-g32-sym": (
            {"group_0": _scheme(["Linear"], _args(num_bits=4, strategy="group", group_size=32))},
            torch.bfloat16, "pack-quantized", {"weight_packed", "weight_scale", "weight_shape"}),
        "pack-int4-channel-asym": (
            {"group_0": _scheme(["Linear"], _args(num_bits=4, strategy="channel", symmetric=False))},
            torch.float32, "pack-quantized", {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"}),
        "pack-int8-channel-fp16": (
            {"group_0": _scheme(["Linear"], _args(num_bits=8, strategy="channel"))},
            torch.float16, "pack-quantized", {"weight_packed", "weight_scale", "weight_shape"}),
        "fp8-channel-dynamic": (
            {"group_0": _scheme(["Linear"], _args(num_bits=8, type="float", strategy="channel"), _args(**fp8_token))},
            torch.bfloat16, "float-quantized", {"weight", "weight_scale"}),
        "nvfp4": (
            {"group_0": _scheme(["Linear"], _args(**nvfp4),
                                _args(**{**nvfp4, "dynamic": "local", "observer": "static_minmax"}))},
            torch.bfloat16, "nvfp4-pack-quantized", {"weight_packed", "weight_scale", "weight_global_scale"}),
        "mixed-int4-attn-fp8-mlp": (
            {"group_0": _scheme(["re:.*self_attn.*"], _args(num_bits=4, strategy="group", group_size=32,
                                                            symmetric=False)),
             "group_1": _scheme(["re:.*mlp.*"], _args(num_bits=8, type="float", strategy="tensor"),
                                _args(**fp8_token))},
            torch.bfloat16, "mixed-precision", None),
    }


CASES = _cases()


def _tiny_llama(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _calibrate(model) -> dict[str, dict]:
    """Min/max scales (the library's calculate_qparams / generate_gparam) set on every quantized
    module; returns per module its args, qparams and the library's fake-quantized weight."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    ref = {}
    for name, mod in model.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        a, w = scheme.weights, mod.weight.data
        if a.strategy == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        elif a.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            g = w.unflatten(-1, (-1, a.group_size))
            lo, hi = g.amin(-1), g.amax(-1)
        gscale = None
        if a.strategy == "tensor_group":
            gscale = generate_gparam(w.amin(), w.amax())
            mod.weight_global_scale.data.copy_(gscale)
            mod.input_global_scale.data.fill_(1.0)
        scale, zp = calculate_qparams(lo, hi, a, global_scale=gscale)
        mod.weight_scale.data.copy_(scale)
        if hasattr(mod, "weight_zero_point"):
            mod.weight_zero_point.data.copy_(zp)
        zp = mod.weight_zero_point.data.clone() if not a.symmetric else None
        expected = fake_quantize(w, mod.weight_scale.data, zp, a, global_scale=gscale)
        ref[name] = {"args": a, "scale": mod.weight_scale.data.clone(), "zp": zp,
                     "gscale": gscale, "expected": expected.clone(), "dtype": w.dtype}
    return ref


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    """(case id, folder with model.safetensors + config.json, reference per module)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import save_file

    groups, dtype, _, _ = CASES[request.param]
    model = _tiny_llama(dtype)
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, ignore=["lm_head"]),
                              show_progress=False)
    ref = _calibrate(model)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    out = tmp_path_factory.mktemp(request.param)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    model.config.save_pretrained(out)
    compressor.update_config(str(out))
    return request.param, out, ref


def _read(folder):
    from safetensors import safe_open

    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        mods = packed_modules(keys, qconfig)
        weights = {p: dequantize(p, {k: f.get_tensor(k) for k in ks}, qconfig) for p, ks in mods.items()}
    return qconfig, keys, mods, weights


def _expand(t: torch.Tensor, a, shape) -> torch.Tensor:
    """A per-tensor / per-row / per-group qparam broadcast to the weight's shape, float64."""
    t = t.to(torch.float64)
    if a.strategy in ("group", "tensor_group"):
        return t.repeat_interleave(a.group_size, dim=-1)
    return t.reshape(-1, 1).expand(shape) if t.numel() > 1 else t.reshape(1, 1).expand(shape)


def _distinct(x: torch.Tensor) -> torch.Tensor:
    """Distinct values along the last dim."""
    s = x.sort(dim=-1).values
    return 1 + (s[..., 1:] != s[..., :-1]).sum(-1)


def test_roundtrip_equals_library_fake_quantize(checkpoint):
    case, folder, ref = checkpoint
    _, dtype, fmt, names, = CASES[case]
    qconfig, keys, mods, weights = _read(folder)
    assert qconfig["format"] == fmt
    assert sorted(mods) == sorted(MODULES)  # not lm_head, embed_tokens or the norms
    for prefix, ks in mods.items():
        stored = {k.rpartition(".")[2] for k in keys if k.startswith(prefix + ".weight")}
        assert {k.rpartition(".")[2] for k in ks} == stored  # every stored weight key, nothing left over
        if names is not None:
            assert stored == names, prefix
        w, r = weights[prefix], ref[prefix]
        assert w.dtype == torch.float32 and w.shape == r["expected"].shape
        assert torch.equal(w, r["expected"].float()), f"{case} {prefix}: max diff {(w - r['expected'].float()).abs().max()}"


def test_values_on_grid_and_at_most_2_pow_bits_per_row_or_group(checkpoint):
    case, folder, ref = checkpoint
    mantissa = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
    _, _, _, weights = _read(folder)
    for prefix, w in weights.items():
        r = ref[prefix]
        a = r["args"]
        scale = _expand(r["scale"], a, w.shape)
        if r["gscale"] is not None:
            scale = scale / r["gscale"].to(torch.float64)
        ratio = w.to(torch.float64) / scale
        if a.type == "int":
            zp = _expand(r["zp"], a, w.shape) if r["zp"] is not None else 0.0
            level = torch.round(ratio + zp)
            assert level.min() >= -(2 ** (a.num_bits - 1)) and level.max() <= 2 ** (a.num_bits - 1) - 1
            grid = (level - zp) * scale
        elif a.num_bits == 8:
            grid = ratio.to(torch.float8_e4m3fn).to(torch.float64) * scale
        else:
            nearest = (ratio.abs().unsqueeze(-1) - E2M1.to(torch.float64)).abs().argmin(-1)
            grid = E2M1.to(torch.float64)[nearest] * ratio.sign() * scale
        # on the grid up to the rounding of the product into the scale's dtype
        tol = 2.0 ** -mantissa[r["dtype"]] * grid.abs() + 1e-30
        assert bool(((w.to(torch.float64) - grid).abs() <= tol).all()), f"{case} {prefix}: off the grid"
        blocks = w.unflatten(-1, (-1, a.group_size)) if a.group_size else (w if a.strategy == "channel" else w.reshape(1, -1))
        assert int(_distinct(blocks).max()) <= 2 ** a.num_bits, f"{case} {prefix}"


def test_describe(checkpoint):
    case, folder, _ = checkpoint
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    d = describe(qconfig)
    assert d["ignore"] == ["lm_head"] and d["act_order"] is False
    expected = {
        "pack-int4-g32-sym": dict(format="pack-quantized", bits=4, num_format="int", element=None, group_size=32,
                                  granularity="group", symmetric=True, global_scale=None, activations=None, mixed=False),
        "pack-int4-channel-asym": dict(format="pack-quantized", bits=4, granularity="channel", group_size=None,
                                       symmetric=False, mixed=False),
        "pack-int8-channel-fp16": dict(format="pack-quantized", bits=8, granularity="channel", symmetric=True),
        "fp8-channel-dynamic": dict(format="float-quantized", bits=8, num_format="fp", element="e4m3",
                                    granularity="channel", group_size=None, mixed=False),
        "nvfp4": dict(format="nvfp4-pack-quantized", bits=4, num_format="fp", element="e2m1", group_size=16,
                      granularity="group", scale="e4m3", global_scale="tensor", mixed=False),
        "mixed-int4-attn-fp8-mlp": dict(format="pack-quantized", bits=4, group_size=32, symmetric=False, mixed=True),
    }[case]
    assert {k: d[k] for k in expected} == expected
    if case == "fp8-channel-dynamic":
        assert d["activations"]["bits"] == 8 and d["activations"]["dynamic"] is True
        assert d["activations"]["granularity"] == "token"


def test_act_order_g_idx():
    """actorder 'group' (weight_g_idx; removed from compressed-tensors 0.20, written by earlier
    llm-compressor GPTQ): each column j is quantized in group g_idx[j], stored in original order."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(1)
    out_f, in_f, gs = 24, 128, 32
    w = torch.randn(out_f, in_f, dtype=torch.bfloat16)
    perm = torch.randperm(in_f)  # the act-order: column perm[k] is the k-th quantized
    inv = torch.argsort(perm)
    args = _args(num_bits=4, strategy="group", group_size=gs, symmetric=False)
    scheme = _scheme(["Linear"], args)
    w_perm = w[:, perm]
    g = w_perm.unflatten(-1, (-1, gs))
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    packed = PackedQuantizationCompressor.compress({"weight": w_perm, "weight_scale": scale, "weight_zero_point": zp},
                                                   scheme)
    q = unpack_from_int32(packed["weight_packed"], 4, torch.Size([out_f, in_f]))
    prefix = "model.layers.0.mlp.down_proj"
    tensors = {f"{prefix}.weight_packed": pack_to_int32(q[:, inv].contiguous(), 4),
               f"{prefix}.weight_scale": packed["weight_scale"],
               f"{prefix}.weight_zero_point": packed["weight_zero_point"],
               f"{prefix}.weight_shape": packed["weight_shape"],
               f"{prefix}.weight_g_idx": (inv // gs).to(torch.int32)}
    qconfig = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
               "quantization_status": "compressed",
               "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": {
                   "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": gs,
                   "actorder": "group", "dynamic": False, "observer": "minmax"}}}}
    assert describe(qconfig)["act_order"] is True
    mods = packed_modules(list(tensors) + ["lm_head.weight", "model.norm.weight"], qconfig)
    assert mods == {prefix: sorted(tensors, key=lambda k: ["weight_packed", "weight_scale", "weight_shape",
                                                           "weight_zero_point", "weight_g_idx"].index(k.rpartition(".")[2]))}
    rebuilt = dequantize(prefix, tensors, qconfig)
    expected = fake_quantize(w_perm, scale, zp, args)[:, inv]
    assert torch.equal(rebuilt, expected.float())
    # without honouring g_idx the columns would be dequantized with the wrong groups' scales
    plain = {k: v for k, v in tensors.items() if not k.endswith("g_idx")}
    plain_config = json.loads(json.dumps(qconfig))
    del plain_config["config_groups"]["group_0"]["weights"]["actorder"]
    assert not torch.equal(dequantize(prefix, plain, plain_config), rebuilt)
    # a g_idx that is not GPTQ's (groups of unequal size) is refused
    bad = dict(tensors)
    bad[f"{prefix}.weight_g_idx"] = torch.zeros(in_f, dtype=torch.int32)
    with pytest.raises(ConfigError, match="group_size"):
        dequantize(prefix, bad, qconfig)


def _valid_config(**over) -> dict:
    cfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
           "ignore": ["lm_head"], "sparsity_config": {}, "transform_config": {},
           "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": {
               "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}}}}
    cfg.update(over)
    return cfg


def _with_group(fmt: str, **weights) -> dict:
    cfg = _valid_config(format=fmt)
    cfg["config_groups"]["group_0"].update(format=fmt, weights=weights)
    return cfg


@pytest.mark.parametrize("cfg, named", [
    (_valid_config(format="sparse-24-bitmask"), "sparse-24-bitmask"),
    (_valid_config(sparsity_config={"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}), "sparse-24-bitmask"),
    (_valid_config(format="marlin-24"), "marlin-24"),
    (_valid_config(format="turbo-quantized"), "turbo-quantized"),
    (_with_group("turbo-quantized", num_bits=4, type="int", strategy="group", group_size=128), "turbo-quantized"),
    (_valid_config(format="dense"), "dense"),
    (_with_group("mxfp4-pack-quantized", num_bits=4, type="float", strategy="group", group_size=32),
     "mxfp4-pack-quantized"),
    (_valid_config(transform_config={"config_groups": {"u": {"type": "hadamard", "apply": []}}}), "hadamard"),
    (_with_group("float-quantized", num_bits=8, type="float", strategy="block", block_structure=[128, 128]),
     "float-quantized"),
    (_with_group("float-quantized", num_bits=4, type="int", strategy="channel"), "float-quantized"),
    (_with_group("pack-quantized", num_bits=4, type="int", strategy="channel", actorder="group", dynamic=True),
     "pack-quantized"),
    (_valid_config(quant_method="gptq"), "gptq"),
])
def test_refused_configs_raise_one_line(cfg, named):
    for call in (lambda: describe(cfg), lambda: packed_modules(["x.weight_packed"], cfg),
                 lambda: dequantize("x", {"weight": torch.zeros(1)}, cfg)):
        with pytest.raises(ConfigError) as err:
            call()
        msg = str(err.value)
        assert named in msg and "\n" not in msg, msg


def test_modules_matching_no_group_are_an_error():
    cfg = _valid_config()
    cfg["config_groups"]["group_0"]["targets"] = ["re:.*mlp.*"]
    assert packed_modules(["model.layers.0.mlp.up_proj.weight_packed", "model.layers.0.mlp.up_proj.weight_scale",
                           "model.layers.0.mlp.up_proj.weight_shape"], cfg)
    with pytest.raises(ConfigError, match="q_proj"):
        packed_modules(["model.layers.0.self_attn.q_proj.weight_packed"], cfg)


def test_nvfp4_is_decompressed_to_bf16_by_the_library():
    """Precision, stated: the library's NVFP4 compressor unpacks to bf16, so the rebuilt weight is the
    fake-quantized weight rounded to bf16 even when the weight it was made from is float32."""
    from compressed_tensors.compressors import NVFP4PackedCompressor
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    torch.manual_seed(2)
    w = torch.randn(16, 64)
    args = _args(num_bits=4, type="float", strategy="tensor_group", group_size=16, scale_dtype=torch.float8_e4m3fn)
    gscale = generate_gparam(w.amin(), w.amax())
    g = w.unflatten(-1, (-1, 16))
    scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=gscale)
    packed = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": gscale},
                                            _scheme(["Linear"], args))
    qconfig = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
               "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump(mode="json")}}}
    assert packed["weight_packed"].dtype == torch.uint8 and packed["weight_scale"].dtype == torch.float8_e4m3fn
    rebuilt = dequantize("m", {f"m.{k}": v for k, v in packed.items()}, qconfig)
    expected = fake_quantize(w, scale, None, args, global_scale=gscale)
    assert torch.equal(rebuilt, expected.to(torch.bfloat16).float())
    assert not torch.equal(rebuilt, expected)


def test_a_compressed_tensors_checkpoint_is_a_setting_of_its_base_model(checkpoint):
    """The same checkpoint through quantlens.checkpoints.released: described, checked against the model it
    was made from, read into it (each weight the library's fake-quantized one, exactly), patched."""
    from quantlens.checkpoints import released as R
    from quantlens.quantize.patch import quantize_, restore_
    from quantlens.quantize.settings import resolve_setting

    case, folder, ref = checkpoint
    dtype = CASES[case][1]
    model = _tiny_llama(dtype)
    r = R.describe(folder)
    assert r.method == "compressed-tensors" and r.layout.startswith("ct-")
    weights, overrides, params = R.released_weights(model, r)
    assert overrides == {} and params["checkpoint_quantized_layers"] == len(ref) == len(MODULES)
    for name, d in ref.items():
        assert torch.equal(weights[name], d["expected"].to(dtype)), name
    s = resolve_setting({"name": case, "checkpoint": str(folder)}).described(r.weights(), r.method, r.layout)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    rep = quantize_(model, s, calibrated=weights)
    assert rep.coverage["coverage_targeted"] == 1.0 and rep.coverage["coverage_block"] == 1.0
    restore_(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
