"""Released quantized checkpoints as settings: the packed layouts (GPTQ v1/v2 with g_idx at
2/3/4/8 bits, AWQ GEMM, bitsandbytes 4-bit) against the libraries' own packers and dequantizers
(AutoGPTQ, AutoAWQ, bitsandbytes, in a subprocess with .ref-libs/ on its path), checkpoints of the
three shared trained models written from those libraries' tensors, their refusals, and the patch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES, MODELS
from quantlens.checkpoints import bnb
from quantlens.checkpoints import released as R
from quantlens.checkpoints.export import grid_ints, write_packed, write_quantized
from quantlens.checkpoints import packing as P
from quantlens.quantize.patch import full_precision, quantize_, restore_
from quantlens.quantize.settings import ConfigError, resolve_setting

REF_LIBS = Path(os.environ.get("QUANTLENS_REF_LIBS", Path(__file__).resolve().parents[1] / ".ref-libs"))


# --- the bit streams, exactly -----------------------------------------------------------------------
@pytest.mark.parametrize("bits", P.PACK_BITS)
def test_bit_stream_round_trips_and_is_little_endian(bits):
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2**bits, (64, 5), generator=g)
    words = P.pack_stream(v, bits, 0)
    assert words.dtype == torch.int32 and words.shape == (64 * bits // 32, 5)
    assert torch.equal(P.unpack_stream(words, bits, 64, 0), v)
    one = torch.zeros(64, 1, dtype=torch.int64)
    one[10] = 2**bits - 1  # value 10 sits at bits 10·b … 10·b + b − 1 of the stream
    w = P.pack_stream(one, bits, 0).flatten().to(torch.int64) & 0xFFFFFFFF
    stream = sum(int(x) << (32 * i) for i, x in enumerate(w.tolist()))
    assert stream == (2**bits - 1) << (10 * bits)


def test_awq_nibble_order_is_0_2_4_6_1_3_5_7():
    q = torch.arange(8).repeat(2, 1)  # [in 2, out 8]: output feature f holds the value f
    word = P._awq_pack(q)[0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * k)) & 0xF for k in range(8)] == list(P.AWQ_ORDER)
    assert torch.equal(P._awq_unpack(P._awq_pack(q)), q)


def _inputs() -> dict[str, dict]:
    """Integer grids (q, zeros, fp16-exact scales, g_idx) and their exact weight: random matrices at
    every GPTQ width, an act-order permutation, and every linear of the shared trained tiny-llama."""
    from safetensors.torch import load_file

    out = {}
    gen = torch.Generator().manual_seed(0)

    def add(name, w, bits, group, perm=None, sym=False, min_zero=1, **flags):
        in_f = w.shape[1]
        order = perm if perm is not None else torch.arange(in_f)
        g_idx = torch.empty(in_f, dtype=torch.int64)
        g_idx[order] = torch.arange(in_f) // group
        q, zeros, scales = grid_ints(w, bits, g_idx, in_f // group, sym, min_zero=min_zero)
        exact = scales[g_idx].t() * (q - zeros[g_idx].t()).to(torch.float32)
        out[name] = {"w": exact, "bits": bits, "group": group, "g_idx": g_idx, "q": q, "zeros": zeros, "scales": scales, **flags}

    for bits in P.PACK_BITS:
        add(f"rand-b{bits}", torch.randn(64, 128, generator=gen), bits, 32)
    add("rand-b3-act", torch.randn(64, 128, generator=gen), 3, 32, torch.randperm(128, generator=gen), sym=True)
    add("rand-b4-act", torch.randn(64, 128, generator=gen), 4, 64, torch.randperm(128, generator=gen))
    # all-positive groups: zero point 0, which the v1 layout cannot hold (AutoGPTQ spills its −1 into the
    # neighbouring zero points, and reads stored + 1): read exactly as AutoGPTQ reads it, garbage included
    add("rand-b4-z0", torch.rand(64, 128, generator=gen), 4, 32, min_zero=0, spill=True)
    # bitsandbytes over a tensor that is no whole number of its 64-value blocks (the last block short)
    add("rand-bnb-odd", torch.randn(7, 40, generator=gen), 4, 8, bnb_only=True)
    for fam in FAMILIES:  # every decoder-block linear of the three shared trained models
        for k, w in load_file(str(MODELS / f"tiny-{fam}" / "model.safetensors")).items():
            if (".layers." in k or "transformer.h." in k) and k.endswith(".weight") and w.ndim == 2:
                add(f"{fam}:" + k[: -len(".weight")], w, 4, 32)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each library's own packing and dequantization of every input (tests/reference_packing.py)."""
    if not all((REF_LIBS / p).is_dir() for p in ("auto_gptq", "awq", "bitsandbytes")):
        if os.environ.get("CI"):
            pytest.fail(f"{REF_LIBS} lacks auto_gptq / awq / bitsandbytes: scripts/install.sh installs them")
        pytest.skip(f"no reference libraries in {REF_LIBS}; scripts/install.sh installs them")
    inputs = _inputs()
    d = tmp_path_factory.mktemp("packing")
    torch.save(inputs, d / "in.pt")
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("reference_packing.py")), str(d / "in.pt"), str(d / "out.pt")],
                       env={**os.environ, "PYTHONPATH": str(REF_LIBS)}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return inputs, torch.load(d / "out.pt")


def test_gptq_layout_is_autogptqs_bit_for_bit(reference):
    inputs, ref = reference
    assert "auto-gptq" in ref["versions"] or "auto_gptq" in ref["versions"], ref["versions"]
    for name, d in inputs.items():
        if d.get("bnb_only"):
            continue
        lib = ref[f"gptq|{name}"]
        w = P.gptq_dequantize(lib["qweight"], lib["qzeros"], lib["scales"], lib["g_idx"], d["bits"], v1=True)
        assert torch.equal(w, lib["weight"]), name  # = AutoGPTQ's own unpacking, exactly
        if d.get("spill"):
            assert not torch.equal(w, d["w"])  # (the v1 layout's known loss: why quantlens' packer refuses z = 0 there)
            with pytest.raises(ValueError, match="zero point of 0"):
                P.gptq_pack(d["q"], d["zeros"], d["scales"], d["g_idx"], d["bits"], v1=True)
            continue
        ours = P.gptq_pack(d["q"], d["zeros"], d["scales"], d["g_idx"], d["bits"], v1=True)
        assert torch.equal(ours["qweight"], lib["qweight"]), name  # AutoGPTQ's packer: the v1 layout
        assert torch.equal(ours["qzeros"], lib["qzeros"]), name
        assert torch.equal(ours["g_idx"], lib["g_idx"].to(torch.int32)), name
        assert torch.equal(w, d["w"]), name
        v2 = P.gptq_pack(d["q"], d["zeros"], d["scales"], d["g_idx"], d["bits"], v1=False)
        assert torch.equal(P.gptq_dequantize(v2["qweight"], v2["qzeros"], v2["scales"], v2["g_idx"], d["bits"], v1=False), d["w"])


def test_awq_layout_is_autoawqs_bit_for_bit(reference):
    inputs, ref = reference
    names = [n for n in inputs if f"awq|{n}" in ref]  # (zero points of 0 included: AWQ stores them as they are)
    assert len(names) > 50  # every linear of the three trained models and the regular 4-bit random matrices
    for name in names:
        d, lib = inputs[name], ref[f"awq|{name}"]
        ours = P.awq_pack(d["q"], d["zeros"], d["scales"])
        assert torch.equal(ours["qweight"], lib["qweight"]) and torch.equal(ours["qzeros"], lib["qzeros"]), name
        w = P.awq_dequantize(lib["qweight"], lib["qzeros"], lib["scales"])
        assert torch.equal(w, d["w"]), name  # exact in float32 ...
        assert torch.equal(w.half(), lib["weight"]), name  # ... and AutoAWQ's fp16 dequantization once rounded as it rounds


def test_bitsandbytes_4bit_state_is_read_as_bitsandbytes_dequantizes(reference):
    inputs, ref = reference
    for name in inputs:
        for kind in ("nf4", "fp4", "nf4-nested", "fp4-nested"):
            lib = ref[f"bnb-{kind}|{name}"]
            parts = {f"x.{k}": v for k, v in lib.items() if k != "dequantized"}
            assert torch.equal(bnb.weight("x.weight", parts), lib["dequantized"]), (kind, name)


# --- checkpoints of the shared trained model, written from the libraries' own tensors ----------------
def _library_checkpoint(reference, trained, tmp_path, fmt: str, family: str = "llama") -> Path:
    inputs, ref = reference
    model, _ = trained(family)
    packed = {}
    for name in inputs:
        if not name.startswith(f"{family}:"):
            continue
        lin = name[len(family) + 1:]
        if fmt == "gptq":
            lib = ref[f"gptq|{name}"]
            packed[lin] = {k: lib[k] for k in ("qweight", "qzeros", "scales", "g_idx")}
        elif fmt == "awq":
            lib = ref[f"awq|{name}"]
            packed[lin] = {k: lib[k] for k in ("qweight", "qzeros", "scales")}
        else:
            lib = ref[f"bnb-nf4-nested|{name}"]
            packed[lin] = {k: v for k, v in lib.items() if k != "dequantized"}
    qc = {"gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": False},
          "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
          "bnb": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                  "bnb_4bit_use_double_quant": True}}[fmt]
    return write_packed(model, tmp_path / f"tiny-{family}-{fmt}", packed, qc)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["gptq", "awq", "bnb"])
def test_a_library_written_checkpoint_patches_the_trained_model_exactly(reference, trained, tmp_path, fmt, family):
    inputs, ref = reference
    model, _ = trained(family)
    folder = _library_checkpoint(reference, trained, tmp_path, fmt, family)
    r = R.describe(folder)
    assert (r.method, r.bits) == ({"gptq": "gptq", "awq": "awq", "bnb": "bnb"}[fmt], 4)
    setting = resolve_setting({"name": f"{fmt}-w4", "checkpoint": str(folder)}).described(r.weights(), r.method, r.layout)
    weights, overrides, params = R.released_weights(model, r)
    mine = [n for n in inputs if n.startswith(f"{family}:")]
    assert params["checkpoint_quantized_layers"] == len(mine) == {"llama": 21, "opt": 18, "bloom": 12}[family]
    assert params["checkpoint_full_precision_layers"] == 0
    assert overrides == {}  # norms and embeddings are the model's own (fp16 copies of them are not changes)
    for name in mine:
        lin = name[len(family) + 1:]
        want = {"gptq": lambda: ref[f"gptq|{name}"]["weight"], "awq": lambda: ref[f"awq|{name}"]["weight"].float(),
                "bnb": lambda: ref[f"bnb-nf4-nested|{name}"]["dequantized"]}[fmt]()
        got = weights[lin] if fmt != "awq" else weights[lin].half().float()
        assert torch.equal(got, want), lin
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rep = quantize_(model, setting, calibrated=weights, overrides=overrides)
    assert rep.coverage["coverage_targeted"] == 1.0 and rep.coverage["coverage_block"] == 1.0
    lin = next(iter(weights))
    assert torch.equal(dict(model.named_parameters())[lin + ".weight"], weights[lin])
    restore_(model)
    assert all(torch.equal(p, params_before[n]) for n, p in model.named_parameters())


def test_a_gptq_checkpoint_with_act_order_and_3_bits_reads_back_its_grid(trained, tmp_path):
    model, _ = trained("llama")
    folder = write_quantized(model, tmp_path / "g3", "gptq", bits=3, group_size=32, sym=True, act_order=True)
    r = R.describe(folder)
    assert (r.layout, r.bits, r.group_size, r.act_order) == ("gptq-v1", 3, 32, True)
    weights, _, _ = R.released_weights(model, r)
    w = weights["model.layers.1.mlp.down_proj"]
    g_idx = R.QuantizedCheckpoint(r).load(["model.layers.1.mlp.down_proj.g_idx"], "cpu")["model.layers.1.mlp.down_proj.g_idx"]
    assert not torch.equal(g_idx.long(), torch.arange(g_idx.numel()) // 32)  # the groups run over a permutation
    orig = dict(model.named_parameters())["model.layers.1.mlp.down_proj.weight"].detach()
    for r in range(w.shape[0]):
        for g in range(int(g_idx.max()) + 1):
            cols = g_idx.long() == g
            assert w[r, cols].unique().numel() <= 8  # every act-order group of a row: at most 2^3 values
            amax = orig[r, cols].abs().max()  # GPTQ's symmetric grid: step 2·max|w|/7, so |Ŵ − W| ≤ max|w|/7
            assert (w[r, cols] - orig[r, cols]).abs().max() <= amax / 7 * 1.01 + 1e-6, (r, g)


def test_awq_folded_scales_are_overrides_restored_bit_exactly_and_refuse_the_lens(trained, tmp_path):
    model, tok = trained("llama")
    folder = write_quantized(model, tmp_path / "awqf", "awq", group_size=32, fold=True)
    r = R.describe(folder)
    weights, overrides, params = R.released_weights(model, r)
    assert sorted(overrides) == sorted(f"model.layers.{i}.{n}.weight" for i in range(3)
                                       for n in ("input_layernorm", "post_attention_layernorm"))
    assert params["checkpoint_changed_tensors"] == 6
    s = resolve_setting({"name": "awq-fold", "checkpoint": str(folder)}).described(r.weights(), r.method, r.layout)
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
        quantize_(model, s, calibrated=weights, overrides=overrides)
        norm = dict(model.named_parameters())["model.layers.0.input_layernorm.weight"]
        assert torch.equal(norm, overrides["model.layers.0.input_layernorm.weight"])
        folded = model(ids).logits
        with full_precision(model):  # every layer at 16 bits: the model's own norms back too
            assert torch.equal(model(ids).logits, base)
        with pytest.raises(ConfigError, match="rescales 6 norm"):
            with full_precision(model, ["model.layers.0.mlp.down_proj"]):
                pass
        assert torch.equal(model(ids).logits, folded)
        restore_(model)
        assert torch.equal(model(ids).logits, base)
    assert 0 < float((folded - base).abs().max()) < 5  # a 4-bit model, the scales folded consistently (not garbage)
    lens = resolve_setting({"name": "awq-fold-noise", "checkpoint": str(folder), "perturbation": {"target": "weights"}})
    lens = lens.described(r.weights(), r.method, r.layout)
    with pytest.raises(ConfigError, match="AWQ folds its scales"):
        quantize_(model, lens, calibrated=weights, overrides=overrides)


# --- refusals: one line each -----------------------------------------------------------------------
def _one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_another_models_checkpoint_a_corrupt_file_and_an_unknown_format_are_one_line(trained, tmp_path):
    llama, _ = trained("llama")
    opt, _ = trained("opt")
    folder = write_quantized(opt, tmp_path / "opt-gptq", "gptq", group_size=32)
    with pytest.raises(ConfigError) as e:
        R.check(R.describe(folder), llama)
    assert "another model" in _one_line(e.value)
    # the same dimensions, another layer naming: a layer of the model is missing from the checkpoint
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="llama")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        R.check(R.describe(folder), llama)
    assert "no weight for model.layers.0" in _one_line(e.value)
    good = write_quantized(llama, tmp_path / "llama-gptq", "gptq", group_size=32)
    data = (good / "model.safetensors").read_bytes()
    (good / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ConfigError) as e:
        R.check(R.describe(good), llama)
    assert "not a readable safetensors file" in _one_line(e.value)
    for qc, why in (({"quant_method": "hqq", "nbits": 4}, "'hqq' is not one quantlens reads"),
                    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit"),
                    ({"quant_method": "awq", "version": "gemv", "bits": 4}, "version 'gemv'"),
                    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "repacked for a kernel"),
                    (None, "not a quantized checkpoint")):
        cfg = json.loads((good / "config.json").read_text())
        cfg.pop("quantization_config")
        if qc:
            cfg["quantization_config"] = qc
        (good / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError) as e:
            R.describe(good)
        assert why in _one_line(e.value), e.value


def test_a_checkpoint_setting_is_keyed_by_its_source_not_by_what_it_holds(tmp_path):
    s = resolve_setting({"name": "ck", "checkpoint": str(tmp_path)})
    assert s.method == "checkpoint" and not s.is_reference and not s.calibrated and s.external_weights
    d = s.described({"bits": 4, "granularity": "group", "group_size": 128, "symmetric": False}, "gptq", "gptq-v1")
    assert d.identity() == s.identity() and d.method == "gptq" and d.w_bits == 4
    p = d.flat_params()
    assert (p["method"], p["format"], p["checkpoint"], p["w_bits"]) == ("gptq", "gptq", str(tmp_path), 4)
    other = resolve_setting({"name": "ck2", "checkpoint": {"source": str(tmp_path), "revision": "abc"}})
    assert other.identity() != s.identity()
    for bad, why in (({"weights": {"bits": 4}}, "read from the checkpoint"), ({"gptq": {}}, "do not apply"),
                     ({"include_lm_head": True}, "do not apply")):
        with pytest.raises(ConfigError, match=why):
            resolve_setting({"name": "x", "checkpoint": str(tmp_path), **bad})


def test_export_writes_a_checkpoint_that_reads_back_as_a_setting(tmp_path, capsys):
    from quantlens.pipeline.cli import main

    out = tmp_path / "ck"
    assert main(["export", str(MODELS / "tiny-opt"), "--bits", "3", "--group-size", "32", "--asym", "--act-order", "--out", str(out)]) == 0
    assert "as gptq-v1, 3 bits, groups of 32, act-order" in capsys.readouterr().out
    r = R.describe(out)
    assert (r.method, r.bits, r.group_size, r.symmetric, r.act_order) == ("gptq", 3, 32, False, True)
    assert (out / "tokenizer.json").is_file()  # (the checkpoint also loads on its own)


def test_a_sweep_of_library_written_checkpoints_exits_0_and_correlates_them(reference, trained, tmp_path):
    """`quantlens run` with the GPTQ, AWQ and bitsandbytes checkpoints the libraries' own packers wrote
    for tiny-llama: exit 0, each run's params say what it read, and their per-example errors enter
    error_correlation; beside them a checkpoint of another model is one preflight line, exit 2."""
    import pandas as pd
    import yaml

    from conftest import WIKI_TEST

    folders = {fmt: _library_checkpoint(reference, trained, tmp_path, fmt) for fmt in ("gptq", "awq", "bnb")}
    opt, _ = trained("opt")
    other = write_quantized(opt, tmp_path / "opt-gptq", "gptq", group_size=32)
    settings = ["W16A16"] + [{"name": f"{fmt}-lib", "checkpoint": str(f)} for fmt, f in folders.items()]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "QUANTLENS_CACHE": str(tmp_path / "cache")}

    def run(extra):
        cfg = {"name": "libs", "experiment": "libs", "models": [str(MODELS / "tiny-llama")], "settings": settings + extra,
               "datasets": [{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 8}],
               "eval": {"seqlen": 128, "batch_size": 8}, "hardware": {"device": "cpu"}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        return subprocess.run([sys.executable, "-m", "quantlens.pipeline.cli", "run", str(tmp_path / "c.yaml")], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=600)

    r = run([{"name": "opt-ck", "checkpoint": str(other)}])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "setting opt-ck on model" in r.stderr and "is of another model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "mlflow.db").exists()  # preflight: no store, no model, no run
    r = run([])
    assert r.returncode == 0, r.stderr[-3000:]
    out = next((tmp_path / "results").glob("libs-*"))
    corr = pd.read_csv(out / "error_correlation.csv")
    pairs = set(zip(corr["setting_a"], corr["setting_b"])) | set(zip(corr["setting_b"], corr["setting_a"]))
    assert {("gptq-lib", "awq-lib"), ("gptq-lib", "bnb-lib"), ("awq-lib", "bnb-lib")} <= pairs, pairs
    res = pd.read_csv(out / "results.csv")
    assert {"gptq-lib", "awq-lib", "bnb-lib"} <= set(res["setting"])


def test_a_hub_checkpoint_is_read_from_the_hugging_face_cache_offline(trained, tmp_path, monkeypatch):
    """A checkpoint named by hub id: found in the Hugging Face cache offline by preflight and by the
    download-checkpoint task (its revision the snapshot's commit); one not cached is one preflight line."""
    import huggingface_hub.constants as hc

    from quantlens.pipeline.preflight import check_checkpoint_sources
    from quantlens.tasks.steps import download_checkpoint

    model, _ = trained("llama")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--quantlens-test--tiny-llama-gptq"
    write_quantized(model, repo / "snapshots" / commit, "gptq", bits=4, group_size=32)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = resolve_setting({"name": "hub-gptq", "checkpoint": "quantlens-test/tiny-llama-gptq"})
    refusals: list[str] = []
    found = check_checkpoint_sources([s, resolve_setting({"name": "gone", "checkpoint": "quantlens-test/not-cached"})], False, refusals)
    assert set(found) == {"hub-gptq"} and found["hub-gptq"].layout == "gptq-v1"
    assert len(refusals) == 1 and refusals[0].startswith("setting gone: checkpoint quantlens-test/not-cached is not in the local")
    described, folder, revision = download_checkpoint.fn(s)
    assert revision == commit and folder.endswith(commit) and (described.method, described.w_bits) == ("gptq", 4)
    assert described.identity() == s.identity()  # the run key does not move once the checkpoint is read


def test_an_fp16_checkpoint_beside_a_bfloat16_model_changes_none_of_its_float_tensors(tmp_path):
    """A model published in fp16 and run in bfloat16 (a GPU's default), its GPTQ checkpoint storing the
    norms and embeddings in fp16: loading them would change nothing, so none is an override (the run
    keeps its weight error and its noise twin)."""
    import shutil

    from quantlens.model.loading import load_model

    fp16 = tmp_path / "fp16"
    m, _ = load_model(str(MODELS / "tiny-llama"), device="cpu", dtype="float32")
    m.half().save_pretrained(fp16)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODELS / "tiny-llama" / f, fp16 / f)
    published, _ = load_model(str(fp16), device="cpu", dtype="float16")
    r = R.describe(write_quantized(published, tmp_path / "gptq", "gptq", group_size=32))
    bf16, _ = load_model(str(fp16), device="cpu", dtype="bfloat16")
    weights, overrides, _ = R.released_weights(bf16, r)
    assert overrides == {}
    assert weights["model.layers.0.mlp.down_proj"].dtype == torch.bfloat16
