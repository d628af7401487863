"""The composition matrix: every feature × every architecture of both papers' grids.

Architectures, built small from their Hugging Face config classes with random weights and saved as
safetensors: OPT (pre-LN), OPT-350m's shape (post-LN, ``word_embed_proj_dim`` < hidden:
project_in / project_out, no final norm), BLOOM, LLaMA, Llama-3 (GQA, llama3 rope scaling), Qwen2
(q/k/v bias, tied embeddings), Mistral (``head_dim`` ≠ hidden / heads).

Features, on each: quantized and perturbed settings (weights, activations, KV cache, clipping,
non-uniform; NVFP4, MX, NF, k-means and FP8 formats), per-example NLL and residual statistics, perplexity and Lambada-style requests, the
mechanism analysis, placements single / stream / device_map (CPU), and ``originals: checkpoint``.
Asserted: stream == single bit for bit, device_map == single, W16A16 == the Hugging Face loss,
restore bit-exact, KV16 is W16A16, and a model outside the anatomy fails in preflight in one line.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from conftest import MODELS
from quantlens.analysis.mechanisms import explain
from quantlens.evaluation.evaluate import lambada, perplexity
from quantlens.model.anatomy import ModelNotUnderstood, anatomy, check_config
from quantlens.model.loading import load_model
from quantlens.quantize.patch import quantize_, restore_
from quantlens.quantize.settings import resolve_setting


def _configs() -> dict[str, object]:
    from transformers import BloomConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, max_position_embeddings=64)
    return {
        "opt": OPTConfig(**common, ffn_dim=64, num_hidden_layers=3, word_embed_proj_dim=32),
        "opt-350m-shape": OPTConfig(**common, ffn_dim=64, num_hidden_layers=3, word_embed_proj_dim=16, do_layer_norm_before=False),
        "bloom": BloomConfig(vocab_size=96, hidden_size=32, n_layer=3, n_head=4),
        "llama": LlamaConfig(**common, intermediate_size=64, num_hidden_layers=3, num_key_value_heads=4),
        "llama3": LlamaConfig(**common, intermediate_size=64, num_hidden_layers=3, num_key_value_heads=2, rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 16}),
        "qwen2": Qwen2Config(**common, intermediate_size=64, num_hidden_layers=3, num_key_value_heads=2, tie_word_embeddings=True),
        "mistral": MistralConfig(**common, intermediate_size=64, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                                 sliding_window=None),
    }


ARCHS = list(_configs())
SETTINGS = [
    "W16A16",
    "W16A16KV16",  # the same computation as W16A16
    "W4A8",
    "W3A16-g16-nu",
    "W8A8-clip3",
    "W16A16KV4",
    "W4A8KV4-nu",
    {"name": "W4A8+noise", "base": "W4A8", "perturbation": {"target": "both", "seed": 3}},
    {"name": "W16A16KV4+noise", "base": "W16A16KV4", "perturbation": {"target": "kv", "rule": "proportional", "seed": 1}},
    # the field's formats (hidden 32, head_dim 8 or 16: blocks that divide them)
    "W4A4-nvfp4",
    "W4A8-mxfp",  # MXFP4 weights, MXFP8 activations
    "W4A16-g16-nf4",
    "W3A16-km",
    "W16A16KV8-fp8",
    {"name": "W4A4-nvfp4+noise", "base": "W4A4-nvfp4", "perturbation": {"target": "both", "distribution": "uniform", "seed": 2}},
]
FORMATS = ("W4A4-nvfp4", "W4A8-mxfp", "W4A16-g16-nf4", "W3A16-km", "W16A16KV8-fp8", "W4A4-nvfp4+noise")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """arch → a saved model folder (config, safetensors, a tokenizer so that load_model works)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for arch, cfg in _configs().items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # LayerNorm weights away from 1 and biases away from 0: nothing is trivially exact
            for n, p in model.named_parameters():
                if p.ndim == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(MODELS / "tiny-llama" / f, path / f)
        out[arch] = str(path)
    return out


def _inputs(vocab: int) -> tuple[torch.Tensor, list[tuple[list[int], list[int]]]]:
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(1, vocab, (6, 24), generator=g)
    reqs = [(torch.randint(1, vocab, (int(n),), generator=g).tolist(), torch.randint(1, vocab, (int(k),), generator=g).tolist())
            for n, k in zip(torch.randint(4, 20, (7,), generator=g), torch.randint(1, 3, (7,), generator=g))]
    return windows, reqs


def _evaluate(model, setting, windows, reqs) -> dict[str, object]:
    s = resolve_setting(setting)
    quantize_(model, s)
    try:
        ppl = perplexity(model, windows, batch_size=4, residual=s.is_reference)
        lam = lambada(model, reqs, batch_size=3, residual=s.is_reference)
    finally:
        restore_(model)
    out = {"ppl": ppl["ppl"], "nll": ppl["per_example"]["nll"].to_numpy(), "acc": lam["acc"], "lam_nll": lam["per_example"]["nll"].to_numpy()}
    if s.is_reference:
        out["residual"] = ppl["residual"]
        out["lam_residual"] = lam["residual"]
    return out


def _same(a: dict, b: dict, what: str) -> None:
    for k in a:
        if isinstance(a[k], pd.DataFrame):
            pd.testing.assert_frame_equal(a[k], b[k], check_exact=True, obj=f"{what} {k}")
        elif isinstance(a[k], float):
            assert a[k] == b[k], f"{what} {k}: {a[k]} != {b[k]}"
        else:
            assert (a[k] == b[k]).all(), f"{what} {k}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_feature_on_every_architecture(arch, folders):
    path = folders[arch]
    single, _ = load_model(path, device="cpu", dtype="float32", placement="single")
    stream, _ = load_model(path, device="cpu", dtype="float32", placement="stream")
    windows, reqs = _inputs(single.config.vocab_size)
    body = anatomy(single)
    if arch == "opt-350m-shape":
        assert body.post_ln and body.final_norm is None and body.project_in is not None and body.project_out is not None
        assert body.parts[0].residual_norm is single.model.decoder.layers[0].self_attn_layer_norm
    else:
        assert not body.post_ln and body.final_norm is not None

    # W16A16 is the model itself: its NLL is Hugging Face's own loss
    with torch.no_grad():
        hf = float(single(input_ids=windows, labels=windows).loss)
    results = {}
    for setting in SETTINGS:
        name = setting if isinstance(setting, str) else setting["name"]
        results[name] = r = _evaluate(single, setting, windows, reqs)
        _same(r, _evaluate(stream, setting, windows, reqs), f"{arch}/{name} stream vs single")
        assert torch.isfinite(torch.tensor(r["nll"])).all()
    assert results["W16A16"]["nll"].mean() == pytest.approx(hf, rel=1e-6)
    _same(results["W16A16"], results["W16A16KV16"], f"{arch}: KV16 is W16A16")
    for name in ("W4A8", "W16A16KV4", "W4A8+noise", "W16A16KV4+noise", "W3A16-g16-nu", *FORMATS):
        assert (results[name]["nll"] != results["W16A16"]["nll"]).any(), f"{arch}/{name} changed nothing"

    # residual statistics: every layer, every example, finite
    res = results["W16A16"]["residual"]
    assert len(res) == 6 * len(body.parts) and res[["r_norm", "z_norm", "r_kurtosis"]].notna().all().all()

    # the mechanism analysis, on a plain model and on a streamed one (per-batch forwards there)
    sets = {"large": windows[:3].tolist(), "ctrl": windows[3:].tolist()}
    explained = {}
    for placement, model in (("single", single), ("stream", stream)):
        quantize_(model, "W4A8", keep_originals_on="same")
        try:
            explained[placement] = explain(model, sets, layers="all", batch_size=2)
        finally:
            restore_(model)
    for table in ("layer_error", "early_exit", "patching"):
        pd.testing.assert_frame_equal(getattr(explained["single"], table), getattr(explained["stream"], table), check_exact=True)
    patching = explained["single"].patching.set_index("patched")["nll"]
    ex = explained["single"].per_example
    full = (ex[ex["set"] == "large"]["nll_full"]).mean()
    assert patching["all"] == pytest.approx(full, rel=1e-6)  # every module restored = the full-precision model
    early = explained["single"].early_exit
    last_z = early[(early["set"] == "large") & (early["precision"] == "full") & (early["source"] == "z")]
    assert last_z[last_z["layer"] == len(body.parts) - 1]["nll"].iloc[0] == pytest.approx(full, rel=1e-6)  # decoding z(L) is the model

    # originals: checkpoint restores bit for bit
    before = {k: v.clone() for k, v in single.state_dict().items()}
    quantize_(single, "W4A8KV4-nu", keep_originals_on="checkpoint")
    restore_(single)
    after = single.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # device_map on CPU computes what single computes
    dm, _ = load_model(path, device="cpu", dtype="float32", placement="device_map")
    for setting in ("W16A16", "W4A8KV4-nu"):
        _same(results[setting if setting != "W4A8KV4-nu" else "W4A8KV4-nu"], _evaluate(dm, setting, windows, reqs), f"{arch}/{setting} device_map")


def test_a_model_outside_the_anatomy_fails_in_one_line():
    from transformers import GPT2Config

    with pytest.raises(ModelNotUnderstood, match=r"^GPT2LMHeadModel: block GPT2Block has no attention child holding nn.Linear layers"):
        check_config(GPT2Config(n_layer=2, n_embd=32, n_head=4))
    assert check_config(_configs()["opt-350m-shape"]).post_ln
