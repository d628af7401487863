"""Mixtures of experts, exactly: the expert layouts, the quantizer on every expert slice, expert
inputs through the model's kernels and through the per-expert loop, routers, coverage, router flips."""

from __future__ import annotations

import pytest
import torch

from quantlens.evaluation.evaluate import perplexity
from quantlens.model.anatomy import Experts, anatomy
from quantlens.quantize import moe
from quantlens.quantize.patch import full_report, quantize_, restore_
from quantlens.quantize.quant import fake_quantize
from quantlens.quantize.settings import resolve_setting

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, max_position_embeddings=64, num_hidden_layers=2,
              num_experts_per_tok=2)


def _model(kind: str, seed: int = 0):
    import transformers as T
    from transformers import AutoModelForCausalLM

    cfg = {
        "mixtral": lambda: T.MixtralConfig(**COMMON, intermediate_size=32, num_key_value_heads=2, num_local_experts=4),
        "qwen2-moe": lambda: T.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=64, num_experts=4, num_key_value_heads=2),
        "deepseek-v3": lambda: T.DeepseekV3Config(**COMMON, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                                  n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=32,
                                                  q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
        "gpt-oss": lambda: T.GptOssConfig(**COMMON, intermediate_size=32, num_local_experts=4, num_key_value_heads=2, head_dim=8),
        "llama4": lambda: T.Llama4TextConfig(**COMMON, intermediate_size=32, intermediate_size_mlp=64, num_local_experts=4,
                                             num_key_value_heads=2, head_dim=8),
        "dbrx": lambda: T.DbrxConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=96,
                                     attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                                     ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2}),
        "jetmoe": lambda: T.JetMoeConfig(**COMMON, num_key_value_heads=2, kv_channels=8, intermediate_size=32, num_local_experts=4),
    }[kind]()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _windows(n: int = 6, t: int = 20) -> torch.Tensor:
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("concatenated,transposed", [(True, False), (False, False), (True, True), (False, True)])
def test_expert_matrices_are_each_experts_gate_up_and_down_and_round_trip(concatenated, transposed):
    e, inter, hidden = 3, 4, 5
    gate = torch.randn(e, inter, hidden)
    up = torch.randn(e, inter, hidden)
    stored = torch.cat([gate, up], 1) if concatenated else torch.stack([gate, up], 2).reshape(e, 2 * inter, hidden)
    stored = stored.transpose(-1, -2).contiguous() if transposed else stored
    ex = Experts("x", torch.nn.Module(), e, "gate_up_proj", transposed, True, concatenated, False)
    mats = ex.matrices("gate_up_proj", stored)
    assert mats.shape == (2 * e, inter, hidden)
    for j in range(e):
        assert torch.equal(mats[2 * j], gate[j]) and torch.equal(mats[2 * j + 1], up[j])
    assert torch.equal(ex.from_matrices("gate_up_proj", mats), stored)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe", "deepseek-v3", "gpt-oss", "dbrx"])
def test_w4_quantizes_every_expert_matrix_as_a_dense_linear_would_be(kind):
    """Each expert's gate, up and down matrix equals the quantizer applied to that matrix alone (g16:
    groups along its input features); restore is bit-exact; the routers stay 16-bit."""
    m = _model(kind)
    body = anatomy(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    spec = resolve_setting("W4A16-g16").weights
    quantize_(m, "W4A16-g16")
    for e in body.experts():
        for a in e.params:
            got = e.matrices(a, e.tensor(a).data)
            want = e.matrices(a, before[e.qualified(a)])
            for i in range(got.shape[0]):
                assert torch.equal(got[i], fake_quantize(want[i], spec)), f"{e.name}.{a}[{i}]"
    for name, _ in body.routers():
        assert torch.equal(m.get_submodule(name).weight, before[f"{name}.weight"])
    cov = full_report(m).summary()
    assert cov["coverage_targeted"] == 1.0
    routers = sum(r.weight.numel() for _, r in body.routers())
    assert cov["coverage_block"] == pytest.approx(1 - routers / sum(body.block_matrices().values()))
    assert cov["coverage_16bit_routers"] == pytest.approx(routers / sum(body.block_matrices().values()))  # what the console names
    restore_(m)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_the_silent_partial_w4_of_qwen2_moe_and_deepseek_is_gone():
    """The issue's measurement: 33 % / 52 % of the blocks' weights were quantized; now all but the routers."""
    for kind in ("qwen2-moe", "deepseek-v3"):
        m = _model(kind)
        rep = quantize_(m, "W4A16")
        assert rep.coverage["coverage_targeted"] == 1.0 and rep.coverage["coverage_block"] > 0.98
        restore_(m)


def test_include_routers_quantizes_the_routers_and_their_inputs():
    m = _model("qwen2-moe")
    body = anatomy(m)
    names = [n for n, _ in body.routers()]
    assert [n.rsplit(".", 1)[-1] for n in names] == ["gate", "shared_expert_gate"] * 2
    before = {n: m.get_submodule(n).weight.clone() for n in names}
    rep = quantize_(m, {"name": "W4A8+routers", "weights": {"bits": 4}, "activations": {"bits": 8, "granularity": "token"},
                        "include_routers": True})
    assert rep.coverage["coverage_block"] == 1.0
    for n in names:
        w = m.get_submodule(n).weight
        assert not torch.equal(w, before[n]) and all(len(torch.unique(r)) <= 16 for r in w)
    restore_(m)
    assert resolve_setting("W4A16").identity() == resolve_setting({"name": "x", "weights": {"bits": 4}}).identity()  # run keys unchanged
    assert "include_routers" not in resolve_setting("W4A16").identity()


@pytest.mark.parametrize("kind", ["mixtral", "gpt-oss"])
def test_expert_inputs_through_the_kernels_equal_the_per_expert_loop(kind):
    """A per-token spec gives each routed token the same quantized input whichever route computes it:
    the model's own experts implementation with hooks, or quantlens' loop over experts."""
    m = _model(kind)
    w = _windows()
    quantize_(m, "W8A8")
    fast = m(w).logits
    e = anatomy(m).experts()
    restore_(m)
    real = moe.needs_per_expert
    try:
        moe.needs_per_expert = lambda setting: True
        quantize_(m, "W8A8")
        assert all("forward" in x.module.__dict__ for x in e)
        loop = m(w).logits
    finally:
        moe.needs_per_expert = real
        restore_(m)
    assert not any("forward" in x.module.__dict__ or "_apply_gate" in x.module.__dict__ for x in e)
    torch.testing.assert_close(loop, fast, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fast, m(w).logits)  # (restored: the 16-bit model again)


def test_a_per_tensor_activation_scale_is_one_experts_routed_tokens():
    """W16A8 per tensor on an MoE: each expert's input gets the scale of the tokens routed to it (the
    per-expert loop runs); one scale over all the tokens of the batch is another computation."""
    m = _model("mixtral")
    s = {"name": "W16A8-tensor", "activations": {"bits": 8, "granularity": "tensor"}}
    assert moe.needs_per_expert(resolve_setting(s)) and not moe.needs_per_expert(resolve_setting("W8A8"))
    spec = resolve_setting(s).activations
    e = anatomy(m).experts()[0]
    got: dict = {}
    quantize_(m, s)
    try:
        h1 = e.module.register_forward_pre_hook(lambda mod, args: got.update(args=args))
        h2 = e.module.register_forward_hook(lambda mod, args, out: got.update(out=out))
        with torch.no_grad():
            m(_windows(2, 8))
        h1.remove(), h2.remove()
    finally:
        restore_(m)
    hidden, idx, weights = got["args"]
    names = (e.qualified(e.first), e.qualified("down_proj"))
    with torch.no_grad():
        own = moe.per_expert_forward(e, hidden, idx, weights, lambda n, x: fake_quantize(x, spec), names, set())
        one_scale = moe.per_expert_forward(e, fake_quantize(hidden, spec), idx, weights,
                                           lambda n, x: x if n == names[0] else fake_quantize(x, spec), names, set())
    assert torch.equal(got["out"], own)
    assert not torch.equal(own, one_scale)


def test_llama4s_routing_is_read_from_its_router():
    """Llama-4's experts module gets every token's row, not the top-k: its router's logits say which
    experts each token went to (the model's own top-k), so the routing lens works on it too."""
    m = _model("llama4")
    w = _windows(4, 16)
    seen = []
    routers = [mod for name, mod in m.named_modules() if name.endswith("feed_forward.router")]
    handles = [r.register_forward_hook(lambda mod, a, out: seen.append(out[1].topk(mod.top_k, dim=-1).indices)) for r in routers]
    ref = perplexity(m, w, batch_size=4, routing=True)
    for h in handles:
        h.remove()
    load = ref["routing"]
    assert load.groupby("layer")["load"].sum().round(9).eq(1).all() and len(load) == len(routers) * 4
    counts = torch.bincount(seen[0].reshape(-1), minlength=4).double()  # the first MoE layer's choices
    first = load[load["layer"] == load["layer"].min()]["load"].to_numpy()
    assert torch.allclose(torch.tensor(first), counts / counts.sum())
    again = perplexity(m, w, batch_size=2, routing_reference=ref["routing_sets"])
    assert (again["per_example"]["router_flips"] == 0).all()


def test_router_flips_are_zero_for_the_reference_and_grow_as_bits_fall():
    m = _model("mixtral")
    w = _windows(8, 24)
    ref = perplexity(m, w, batch_size=4, routing=True)
    sets = ref["routing_sets"]
    assert tuple(sets.shape) == (8, 24, 2)
    again = perplexity(m, w, batch_size=3, routing_reference=sets)
    assert (again["routing"]["flips"] == 0).all() and (again["per_example"]["router_flips"] == 0).all()
    flips = {}
    for s in ("W8A8", "W4A16", "W2A16"):
        quantize_(m, s)
        flips[s] = perplexity(m, w, batch_size=4, routing_reference=sets)["routing"].groupby("layer")["flips"].first().mean()
        restore_(m)
    assert 0 <= flips["W8A8"] < flips["W4A16"] < flips["W2A16"]
    load = ref["routing"]
    assert load.groupby("layer")["load"].sum().round(9).eq(1).all() and len(load) == 2 * 4


def test_preflight_lists_every_refused_model_at_once(tmp_path):
    """Two models the anatomy does not understand beside one it does: one error, a line per refusal,
    before anything loads; a KV setting on an MLA model is refused in one line naming why."""
    import shutil

    from transformers import AutoModelForCausalLM, CTRLConfig

    from conftest import MODELS, WIKI_TEST
    from quantlens.pipeline.preflight import PreflightError, preflight
    from quantlens.pipeline.sweep import load_config

    folders = []
    ctrl = CTRLConfig(n_layer=2, n_embd=32, n_head=4, dff=64, vocab_size=4096)  # (CTRL's layernorm1/2: no row of the layout table)
    for name, model in (("ctrl-a", AutoModelForCausalLM.from_config(ctrl)), ("ctrl-b", AutoModelForCausalLM.from_config(ctrl)),
                        ("dsv3", _model("deepseek-v3"))):
        model.save_pretrained(tmp_path / name)
        for f in (MODELS / "tiny-llama").iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, tmp_path / name / f.name)
        folders.append(str(tmp_path / name))
    cfg = {"name": "refusals", "models": folders, "settings": ["W16A16", "W4A16"],
           "datasets": [{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 2}], "eval": {"seqlen": 32},
           "hardware": {"device": "cpu"}}
    with pytest.raises(PreflightError) as err:
        preflight(load_config(cfg))
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and all("not a layout quantlens knows" in ln for ln in lines), lines
    assert "ctrl-a" in lines[0] and "ctrl-b" in lines[1]
    with pytest.raises(PreflightError, match=r"^model .*dsv3: the sweep has KV-cache settings, which it cannot take: .*multi-head latent attention"):
        preflight(load_config({**cfg, "models": [folders[2]], "settings": ["W16A16KV8"]}))
    preflight(load_config({**cfg, "models": [folders[2]]}))  # the MoE itself is understood


def _loop_logits(m, w) -> torch.Tensor:
    """The model's logits with every experts module running quantlens' per-expert loop (no transform)."""
    handles = [moe.run_per_expert(x, lambda n, t: t, set()) for x in anatomy(m).experts()]
    try:
        with torch.no_grad():
            return m(w).logits
    finally:
        for h in handles:
            h.remove()


def test_llama4_experts_are_read_from_the_table_and_its_loop_is_the_models_forward():
    """Llama4TextExperts declares no layout: anatomy.KNOWN_EXPERTS gives it (transposed, gate then up,
    every token's row to every expert). quantlens' loop over the rows routed to each expert computes
    the model's own bmm; each expert matrix of W4 is the dense quantizer's on that matrix."""
    m = _model("llama4")
    w = _windows()
    e = anatomy(m).experts()[0]
    assert (e.is_transposed, e.has_gate, e.is_concatenated, e.has_bias, e.dense) == (True, True, True, False, True)
    assert not moe.uses_kernel(e)
    own = m(w).logits
    torch.testing.assert_close(_loop_logits(m, w), own, rtol=1e-5, atol=1e-5)
    gate_up = e.module.gate_up_proj.detach().clone()
    quantize_(m, "W4A16")
    try:  # expert 1's gate matrix is gate_up_proj[1][:, :I]ᵀ, quantized on its own
        gate = gate_up[1][:, : gate_up.shape[-1] // 2].t()
        want = fake_quantize(gate, resolve_setting("W4A16").weights)
        assert torch.equal(e.module.gate_up_proj[1][:, : gate_up.shape[-1] // 2].t(), want)
    finally:
        restore_(m)


def test_dbrx_experts_are_read_from_the_table_and_its_loop_is_the_models_forward():
    """DbrxExperts declares no layout: anatomy.KNOWN_EXPERTS gives it (its child mlp holds w1, v1 and
    w2, each 2-D [experts·ffn, hidden]: gate and up apart, w2 applied as stored, [in, out]). quantlens'
    loop computes the model's own forward bit for bit; W4's down matrix of expert 1 (rows F…2F of w2,
    transposed) is the dense quantizer's on that matrix; A8 quantizes the one input gate and up read."""
    m = _model("dbrx")
    w = _windows()
    body = anatomy(m)
    e = body.experts()[0]
    assert (e.name, e.params, e.qualified("v1")) == ("transformer.blocks.0.ffn.experts", ("w1", "v1", "w2"),
                                                      "transformer.blocks.0.ffn.experts.mlp.v1")
    assert (e.num_experts, e.in_features("w1"), e.in_features("w2"), e.input_of("v1")) == (4, 32, 64, "w1")
    assert [n for n, _ in body.routers()] == [f"transformer.blocks.{i}.ffn.router.layer" for i in range(2)]
    assert not moe.uses_kernel(e)
    with torch.no_grad():
        own = m(w).logits
    assert torch.equal(_loop_logits(m, w), own)
    w2 = e.tensor("w2").detach().clone()
    f = w2.shape[0] // e.num_experts
    quantize_(m, "W4A16")
    try:
        assert torch.equal(e.tensor("w2")[f:2 * f].t(), fake_quantize(w2[f:2 * f].t(), resolve_setting("W4A16").weights))
    finally:
        restore_(m)
    quantize_(m, "W8A8")
    try:
        with torch.no_grad():
            m(w)
        sites = {s.layer for s in full_report(m).layers if s.kind == "activation" and s.layer.startswith(e.name)}
    finally:
        restore_(m)
    assert sites == {e.qualified("w1"), e.qualified("w2")}


def test_jetmoe_attention_and_mlp_experts_are_each_experts_own():
    """JetMoe: a mixture of attention heads (query and output projections as experts, routed by the
    attention's own router; one shared kv_proj) and an MoE MLP, both JetMoeParallelExperts [E, out, in]
    applied to rows grouped by expert (anatomy.KNOWN_EXPERTS). The anatomy names both experts and both
    routers (the attention's router is no attention linear); the hooks splitting each child's rows
    expert by expert compute the model's own forward bit for bit; W4 per tensor quantizes each expert's
    gate and up matrices on their own; both routers stay 16-bit."""
    m = _model("jetmoe")
    w = _windows()
    body = anatomy(m)
    b = body.parts[0]
    att, mlp = b.attention_experts[0], b.experts[0]
    assert (att.name, mlp.name, mlp.params) == ("model.layers.0.self_attention.experts", "model.layers.0.mlp",
                                                ("input_linear.weight", "output_linear.weight"))
    assert [n for n, _ in b.attention_linears] == ["model.layers.0.self_attention.kv_proj"] and b.attention_out is b.attention
    assert [n for n, _ in body.routers()] == [f"model.layers.{i}.{s}.router.layer" for i in range(2) for s in ("self_attention.experts", "mlp")]
    assert (mlp.parts(mlp.first), att.parts(att.first), mlp.in_features(mlp.down), att.in_features(att.down)) == (2, 1, 32, 16)
    with torch.no_grad():
        own = m(w).logits
    assert torch.equal(_loop_logits(m, w), own)
    first = mlp.tensor(mlp.first).detach().clone()
    routers = {n: r.weight.detach().clone() for n, r in body.routers()}
    spec = resolve_setting({"name": "w4t", "weights": {"bits": 4, "granularity": "tensor"}}).weights
    quantize_(m, {"name": "w4t", "weights": {"bits": 4, "granularity": "tensor"}})
    try:  # expert 1's gate matrix: the first half of its input_linear rows, one scale of its own
        half = first.shape[1] // 2
        assert torch.equal(mlp.tensor(mlp.first)[1][:half], fake_quantize(first[1][:half], spec))
        assert not torch.equal(mlp.tensor(mlp.first)[1], fake_quantize(first[1], spec))
        assert all(torch.equal(r.weight, routers[n]) for n, r in body.routers())
    finally:
        restore_(m)


@pytest.mark.parametrize("experts", ["attention", "mlp"])
def test_jetmoe_a_per_tensor_activation_scale_is_one_experts_rows(experts):
    """W16A8 per tensor on JetMoe: the rows entering each expert's output projection — the attention's
    output at the mixture of attention heads', the gated state at the MoE's — get the scale of that
    expert's rows; one scale over all rows is another computation."""
    m = _model("jetmoe")
    body = anatomy(m)
    e = (body.parts[0].attention_experts if experts == "attention" else body.parts[0].experts)[0]
    child = e.owner.output_linear
    s = {"name": "W16A8-tensor", "activations": {"bits": 8, "granularity": "tensor"}}
    spec = resolve_setting(s).activations
    seen: dict = {}
    raw = child.register_forward_pre_hook(lambda mod, args: seen.update(raw=args))  # first: the rows as the model gives them
    quantize_(m, s)
    try:
        got = child.register_forward_hook(lambda mod, args, out: seen.update(got=args[0]))  # what the experts read
        with torch.no_grad():
            m(_windows(2, 8))
        got.remove()
    finally:
        restore_(m)
        raw.remove()
    rows, counts = seen["raw"]
    want = torch.cat([fake_quantize(x, spec) for x in rows.split(list(counts), 0) if len(x)])
    assert torch.equal(seen["got"], want) and not torch.equal(want, fake_quantize(rows, spec))


def test_jetmoe_kv_is_quantized_as_the_cache_holds_it():
    """JetMoe hands the attention interface its K/V heads tiled top_k times (anatomy.KV_TILED; the cache
    holds one copy): one copy is quantized or perturbed, then tiled, so every copy is the cache's; the
    statistics count that copy."""
    from quantlens.model.anatomy import kv_copies
    from quantlens.quantize.kv import KVState, quantize_kv

    m = _model("jetmoe")
    assert kv_copies(anatomy(m).parts[0].attention) == 2
    spec = resolve_setting("W16A16KV4").kv
    noise = resolve_setting({"name": "n", "base": "W16A16KV4", "perturbation": {"target": "kv", "seed": 1}}).perturbation
    x = torch.randn(2, 2, 5, 8, generator=torch.Generator().manual_seed(0))
    tiled = x.repeat(1, 2, 1, 1)
    assert torch.equal(KVState("a", spec, None, 4, copies=2).apply(tiled, tiled)[0], quantize_kv(x, spec).repeat(1, 2, 1, 1))
    k, _ = KVState("a", spec, noise, 4, copies=2).apply(tiled, tiled)
    assert torch.equal(k[:, :2], k[:, 2:]) and not torch.equal(k[:, :2], x)
    quantize_(m, "W16A16KV4")
    try:
        with torch.no_grad():
            m(_windows(2, 8))
        keys = [s for s in full_report(m).layers if s.kind == "key"]
    finally:
        restore_(m)
    assert len(keys) == 2 and all(s.numel == 2 * 2 * 8 * 8 for s in keys)  # batch × kv heads × tokens × head_dim: one copy
