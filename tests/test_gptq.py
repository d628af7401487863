"""GPTQ, exactly: round-to-nearest when nothing correlates, a smaller reconstruction loss than RTN on
real inputs of the shared trained models, and the published algorithm's invariants."""

from __future__ import annotations

import pytest
import torch

from quantlens.quantize.gptq import HessianAccumulator, gptq_quantize, hessian, reconstruction_error, supported
from quantlens.quantize.quant import quantize
from quantlens.quantize.settings import resolve_setting


@pytest.mark.parametrize("name", ["W4A16", "W3A16-g16"])
def test_identity_hessian_without_act_order_is_round_to_nearest(name):
    spec = resolve_setting(name).weights
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    got = gptq_quantize(w, torch.eye(64), spec, act_order=False, damp=0.0)
    assert torch.equal(got, quantize(w, spec).xq)


def test_asymmetric_identity_is_round_to_nearest_too():
    spec = resolve_setting({"name": "W4-asym", "weights": {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 16}}).weights
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(gptq_quantize(w, torch.eye(32), spec, act_order=False, damp=0.0), quantize(w, spec).xq)


def test_hessian_accumulates_as_one_batch():
    x = torch.randn(5, 7, 16, generator=torch.Generator().manual_seed(2))
    acc = HessianAccumulator(16)
    for part in x:
        acc.add(part)
    torch.testing.assert_close(acc.h, hessian(x), rtol=1e-5, atol=1e-6)


def _block_hessians(model, block, windows) -> dict[str, HessianAccumulator]:
    """Each linear of ``block``'s input Hessian over one forward of ``windows``."""
    acc: dict[str, HessianAccumulator] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: acc.setdefault(n, HessianAccumulator(args[0].shape[-1])).add(args[0]))
             for n, m in block.linears()]
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    return acc


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("name", ["W4A16", "W3A16-g32"])
def test_gptq_beats_rtn_on_every_linear_of_a_trained_block(trained, family, name):
    """On real inputs (WikiText-2 through the trained model), GPTQ's ‖WX − ŴX‖² is below RTN's at the
    same grid and group size, for every linear of a block, with and without act-order."""
    from conftest import WIKI_TEST
    from quantlens.evaluation.data import perplexity_windows
    from quantlens.model.anatomy import anatomy

    model, tok = trained(family)
    spec = resolve_setting(name).weights
    windows = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=16, use_cache=False)
    block = anatomy(model).parts[1]
    acc = _block_hessians(model, block, windows)
    for n, m in block.linears():
        H = acc[n].h
        rtn = reconstruction_error(m.weight, quantize(m.weight.data, spec).xq, H)
        for order in (True, False):
            q = gptq_quantize(m.weight.data, H, spec, act_order=order)
            assert reconstruction_error(m.weight, q, H) < rtn, (n, order)
            cols = q[:, torch.argsort(torch.diag(H), descending=True)] if order else q  # act-order: groups in that order
            rows = cols.reshape(q.shape[0], -1, spec.group_size or q.shape[1])
            assert max(len(torch.unique(r)) for r in rows.reshape(-1, rows.shape[-1])) <= 2**spec.bits  # on the grid


def test_gptq_refuses_grids_it_cannot_round_on():
    assert "integer grid" in supported(resolve_setting("W4A16-nf4").weights)
    assert supported(resolve_setting("W4A16-g128").weights) is None


@pytest.mark.parametrize("family", ["llama", "opt", "bloom"])
def test_calibrated_w4a16_gptq_beats_rtn_and_is_cached(trained, family, tmp_path):
    """GPTQ of the whole trained model, block by block on 16 WikiText-2 *valid* windows: perplexity
    on the test windows at most RTN's at the same group size (W4A16-g128), restore bit-exact, and a
    second call reads the cache (no calibration)."""
    from conftest import WIKI_TEST
    from quantlens.evaluation.data import perplexity_windows
    from quantlens.evaluation.evaluate import perplexity
    from quantlens.quantize.calibrate import calibrated_weights
    from quantlens.quantize.patch import full_report, quantize_, restore_

    model, tok = trained(family)
    calib = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST.parent / "valid.txt"), max_windows=32, use_cache=False)
    test = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=32, use_cache=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights, cached = calibrated_weights(model, "W4A16-g32-gptq", calib, cache_dir=tmp_path)
    assert not cached and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model untouched
    ppl = {}
    for s in ("W16A16", "W4A16-g32", "W4A16-g32-gptq"):
        quantize_(model, s, calibrated=weights)
        ppl[s] = perplexity(model, test, batch_size=8)["ppl"]
        if s.endswith("gptq"):
            assert full_report(model).summary()["coverage_targeted"] == 1.0
        restore_(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert ppl["W4A16-g32-gptq"] < ppl["W4A16-g32"], ppl  # (on tiny-bloom GPTQ at W4 g32 lands within 0.01 % of 16 bits,
    assert ppl["W4A16-g32-gptq"] < ppl["W16A16"] * 1.01, ppl  # just below it: quantization noise, not an error)
    again, cached = calibrated_weights(model, "W4A16-g32-gptq", calib, cache_dir=tmp_path)
    assert cached and all(torch.equal(again[k], weights[k]) for k in weights)
    with pytest.raises(Exception, match="no calibrated weights"):
        quantize_(model, "W4A16-g32-gptq")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_plan_states_calibration_time_once_per_distinct_gptq():
    from quantlens.model.footprint import REGISTRY_CONFIGS, estimate, planned_target, shape_from_config
    from quantlens.pipeline.plan import workload
    from quantlens.pipeline.sweep import load_config

    cfg = load_config({"name": "p", "models": ["llama-3-8b"], "datasets": [{"name": "wikitext2", "seqlen": 2048}],
                       "settings": ["W16A16", "W4A16-gptq", "W8A8-gptq", {"base": "W4A16-gptq", "perturbation": {"target": "weights"}}],
                       "calibration": {"dataset": "c4", "samples": 64, "seqlen": 1024}})
    work = workload(cfg)
    assert work.calibrated == 2 and work.calibration_tokens == 64 * 1024  # W4A16-gptq and its noise twin: one GPTQ
    e = estimate("llama-3-8b", shape_from_config(REGISTRY_CONFIGS["llama-3-8b"], "registry"), planned_target("H100", None, 1), work)
    assert e.calibration_seconds > 0 and e.seconds > e.seconds_per_setting * e.settings
    assert any(n.startswith("calibration (GPTQ, 65,536 tokens)") for n in e.notes)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe", "gpt-oss", "dbrx"])
def test_gptq_on_every_expert_of_an_moe_from_its_routed_tokens(kind):
    """Each expert matrix is GPTQ-quantized on the tokens routed to it (its own Hessian): on those
    tokens its reconstruction loss is at most round-to-nearest's; the routers untouched; coverage 1.0."""
    import shutil

    from test_moe import _model
    from quantlens.model.anatomy import anatomy
    from quantlens.model.loading import load_model
    from quantlens.quantize.calibrate import _ExpertHessians, calibrate_model
    from quantlens.quantize.patch import full_report, quantize_, restore_

    model = _model(kind)
    body = anatomy(model)
    calib = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(5))
    setting = resolve_setting("W3A16-g16-gptq")
    got = calibrate_model(model, setting, calib, batch_size=4)
    names = {e.qualified(a) for e in body.experts() for a in e.params}
    assert names <= set(got) and not any(n in got for n, _ in body.routers())
    # the last MoE block's experts, on the tokens the 16-bit model routes to them (its inputs are unchanged by
    # the blocks before only for block 0: measure block 0, or the first MoE block when it is first)
    first = next(b for b in body.parts if b.is_moe)
    if first.index == 0:
        e = first.experts[0]
        hs = _ExpertHessians(e, "cpu")
        h = hs.attach()
        with torch.no_grad():
            model(calib)
        h.remove()
        spec = setting.weights
        for attr in e.params:
            w = e.matrices(attr, e.tensor(attr).data)
            q = e.matrices(attr, got[e.qualified(attr)])
            for i in range(w.shape[0]):
                acc = hs.acc.get((i // e.parts(attr), e.input_of(attr)))  # (DBRX's v1 reads the input recorded for w1)
                if acc is not None and acc.n:
                    assert reconstruction_error(w[i], q[i], acc.h) <= reconstruction_error(w[i], quantize(w[i], spec).xq, acc.h) + 1e-9
    quantize_(model, setting, calibrated=got)
    assert full_report(model).summary()["coverage_targeted"] == 1.0
    restore_(model)


def test_awq_never_worse_than_rtn_on_its_calibration_loss_and_shares_a_scale():
    """α = 0 is round-to-nearest, so AWQ's loss on the calibration Hessian is at most RTN's; with salient
    channels (a few inputs 30× larger) it is strictly below; linears of one input share one α."""
    from quantlens.quantize.awq import awq_quantize, scaled_quantize, scales

    g = torch.Generator().manual_seed(7)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 30  # salient channels
    H = hessian(x)
    spec = resolve_setting("W3A16-g16").weights
    ws = [torch.randn(32, 64, generator=g) for _ in range(3)]
    qs, alpha = awq_quantize(ws, H, x.abs().mean(0), spec)
    rtn = sum(reconstruction_error(w, quantize(w, spec).xq, H) for w in ws)
    got = sum(reconstruction_error(w, q, H) for w, q in zip(ws, qs))
    assert got < rtn and 0 < alpha < 1
    s = scales(x.abs().mean(0), alpha)
    assert all(torch.equal(q, scaled_quantize(w, s, spec)) for w, q in zip(ws, qs))  # one scale for the three


def test_awq_clip_search_never_raises_a_groups_own_error_and_clips_outlier_groups():
    """Per row and group the clip search keeps the range with the smallest output error on the group's
    own inputs (r = 1, no clip, is among them): never above round-to-nearest's there, and below it
    where a large weight on a quiet input makes the full range wasteful."""
    from quantlens.quantize.awq import _group_errors, clip_search

    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=g)
    x[:, 5] *= 0.01  # an input that barely moves the output ...
    H = hessian(x)
    spec = resolve_setting("W3A16-g16").weights
    w = torch.randn(16, 64, generator=g)
    w[0, 5] = 12.0  # ... with a large weight in row 0, group 0: its full range wastes the group's levels
    clipped = clip_search(w, H, spec)
    before = _group_errors(quantize(w, spec).xq - w, H, 16)
    after = _group_errors(quantize(clipped, spec).xq - w, H, 16)
    assert (after <= before * (1 + 1e-6)).all()
    assert after[0, 0] < 0.9 * before[0, 0] and clipped[0, 5] < 12.0  # the outlier's group: clipped, and better for it
    assert (clipped.abs() <= w.abs()).all()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_calibrated_awq_is_at_most_rtn_on_the_first_blocks_calibration_loss(trained, family, tmp_path):
    """AWQ of the whole trained model, on block 0 (whose inputs the calibration data fix): q/k/v share
    one scale and their summed calibration loss is at most round-to-nearest's; a linear that reads an
    input alone (o_proj, down_proj, fc1, fc2) is at most RTN's by itself. (Perplexity is not asserted: on these small models AWQ and RTN at W3 g32 come within
    noise of each other — measured in the closing note.)"""
    from conftest import WIKI_TEST
    from quantlens.evaluation.data import perplexity_windows
    from quantlens.model.anatomy import anatomy
    from quantlens.quantize.calibrate import calibrated_weights

    model, tok = trained(family)
    calib = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST.parent / "valid.txt"), max_windows=16, use_cache=False)
    weights, _ = calibrated_weights(model, "W3A16-g32-awq", calib, cache_dir=tmp_path)
    block = anatomy(model).parts[0]
    acc = _block_hessians(model, block, calib)
    spec = resolve_setting("W3A16-g32").weights
    loss = {n: (reconstruction_error(m.weight, weights[n], acc[n].h), reconstruction_error(m.weight, quantize(m.weight.data, spec).xq, acc[n].h))
            for n, m in block.linears()}
    qkv = [n for n in loss if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")]
    assert len(qkv) == 3 and sum(loss[n][0] for n in qkv) <= sum(loss[n][1] for n in qkv) * (1 + 1e-6)  # one α for the three
    for n in set(loss) - set(qkv) - {n for n in loss if n.endswith(("gate_proj", "up_proj"))}:
        assert loss[n][0] <= loss[n][1] * (1 + 1e-6), n  # a linear alone
