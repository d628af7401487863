"""Per-example NLL, residual-stream statistics and the per-example analysis (second paper)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FAMILIES, LAMBADA, REPO, SHARED, WIKI_TEST, tiny_random_model
from quantlens.analysis import per_example as pe
from quantlens.evaluation.data import document_examples, example_ids, lambada_requests, load_lambada, perplexity_windows
from quantlens.evaluation.evaluate import evaluate_dataset, lambada, perplexity
from quantlens.quantize.patch import quantize_, restore_
from quantlens.evaluation.residual import BlockNotUnderstood, ResidualRecorder
from quantlens.quantize.settings import ConfigError

WIKI_RAW = SHARED / "wikitext2" / "wiki.test.raw"


# --- statistics: exact values ------------------------------------------------------------------------
def test_pearson_spearman_exact():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert pe.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert pe.pearson(a, -a) == pytest.approx(-1.0)
    assert pe.pearson(a, np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)
    # monotone but not linear: Spearman 1, Pearson below 1
    assert pe.spearman(a, a**3) == pytest.approx(1.0)
    assert pe.pearson(a, a**3) < 0.99
    # ties take their average rank: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]
    assert list(pe.rank(np.array([1.0, 2.0, 2.0, 3.0]))) == [1.0, 2.5, 2.5, 4.0]
    assert math.isnan(pe.pearson(a, np.ones(4)))  # no variance: undefined, not 0


def test_top_set_and_jaccard():
    ids = np.array([f"e{i}" for i in range(20)])
    err = np.arange(20, dtype=float)
    assert pe.top_set(ids, err) == {"e19", "e18"}  # ceil(10 % of 20) = 2
    assert pe.top_set(ids, err, 0.15) == {"e19", "e18", "e17"}
    assert pe.jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)


def test_d_large_drops_near_duplicates_and_d_ctrl_is_seeded_bottom_half():
    ids = np.array([f"e{i}" for i in range(20)])
    err = np.arange(20, dtype=float)[::-1].copy()  # e0 largest
    toks = {f"e{i}": list(range(100 * i, 100 * i + 30)) for i in range(20)}
    toks["e1"] = toks["e0"][:25] + [9999] * 5  # near duplicate of e0: 20 of 26 5-grams shared
    large = pe.select_large(ids, err, toks)
    assert large == ["e0", "e2"]  # e1 skipped, the next one taken: still 10 %
    ctrl = pe.select_control(ids, err, len(large), seed=3)
    assert len(ctrl) == 2 and all(int(c[1:]) >= 10 for c in ctrl)  # bottom 50 % by error
    assert ctrl == pe.select_control(ids, err, 2, seed=3)
    assert pe.select_large(ids, err, None) == ["e0", "e1"]


def _examples():
    rng = np.random.default_rng(0)
    n = 50
    ids = [f"x{i}" for i in range(n)]
    base = rng.uniform(3, 5, n)
    e_a = rng.normal(0, 1, n)
    e_b = 2 * e_a + rng.normal(0, 0.5, n)
    rows = []
    for setting, nll in (("W16A16", base), ("A", base + e_a), ("B", base + e_b)):
        rows.append(pd.DataFrame({"model": "m", "dataset": "d", "setting": setting, "example_id": ids, "n_tokens": 10, "nll": nll}))
    return pd.concat(rows), ids, e_a, e_b


def test_errors_and_pairwise_correlation_equal_direct_computation():
    ex, ids, e_a, e_b = _examples()
    err = pe.errors(ex.sample(frac=1, random_state=1), {"m": "W16A16"})  # order must not matter
    got = err[err["setting"] == "A"].set_index("example_id").loc[ids, "error"].to_numpy()
    np.testing.assert_allclose(got, e_a, atol=1e-12)
    corr = pe.error_correlation(err)
    assert len(corr) == 1 and corr.iloc[0]["n_examples"] == 50
    assert corr.iloc[0]["pearson"] == pytest.approx(np.corrcoef(e_a, e_b)[0, 1], abs=1e-12)
    self_pair = pe.pair_stats("m", "d", "A", "A", np.array(ids), e_a, e_a)
    assert self_pair["pearson"] == pytest.approx(1.0) and self_pair["spearman"] == pytest.approx(1.0)
    assert self_pair["jaccard_top10"] == 1.0


def test_residual_predictor_sign_and_depth():
    ex, ids, e_a, _ = _examples()
    err = pe.errors(ex, {"m": "W16A16"})
    res = pd.concat([
        pd.DataFrame({"model": "m", "dataset": "d", "example_id": ids, "layer": 0, "r_norm": -e_a, "z_norm": e_a}),
        pd.DataFrame({"model": "m", "dataset": "d", "example_id": ids, "layer": 1, "r_norm": 5 - 3 * e_a, "z_norm": 1.0}),
    ])
    pred = pe.residual_predictor(err, res, {"m": "llama"})
    a = pred[pred["setting"] == "A"].set_index("layer")
    assert a.loc[0, "rho"] == pytest.approx(-1.0) and a.loc[0, "rho_z"] == pytest.approx(1.0)
    assert a.loc[1, "rho"] == pytest.approx(-1.0) and math.isnan(a.loc[1, "rho_z"])
    assert list(a["relative_depth"]) == [0.5, 1.0] and set(pred["family"]) == {"llama"}


# --- per-example NLL from the evaluator ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_token_weighted_per_example_nll_is_log_ppl(family, trained):
    m, tok = trained(family)
    w = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=24)
    r = perplexity(m, w, batch_size=5)
    ex = r["per_example"]
    assert list(ex.columns) == ["example_id", "n_tokens", "nll"] and len(ex) == 24
    weighted = float((ex["nll"] * ex["n_tokens"]).sum() / ex["n_tokens"].sum())
    assert weighted == pytest.approx(math.log(r["ppl"]), abs=1e-6)
    # one example's NLL is Hugging Face's labels= loss on that example alone
    with torch.no_grad():
        hf = float(m(input_ids=w[7:8], labels=w[7:8]).loss)
    assert ex["nll"].iloc[7] == pytest.approx(hf, rel=1e-5)


def test_lambada_per_example_sums_to_metrics(trained):
    m, tok = trained("llama")
    reqs = lambada_requests(tok, load_lambada(str(LAMBADA), limit=24))
    r = lambada(m, reqs, batch_size=7, pad_id=tok.pad_token_id or 0)
    ex = r["per_example"]
    assert len(ex) == 24 and set(ex.columns) == {"example_id", "n_tokens", "nll", "correct"}
    assert list(ex["n_tokens"]) == [len(t) for _, t in reqs]
    assert float((ex["nll"] * ex["n_tokens"]).mean()) == pytest.approx(r["nll"], abs=1e-9)
    assert float(ex["correct"].mean()) == r["acc"]
    # passage 0 alone, unpadded, by hand: NLL of its target tokens
    ctx, tgt = reqs[0]
    ids = torch.tensor([ctx + tgt])
    with torch.no_grad():
        logp = m(input_ids=ids).logits[0, len(ctx) - 1 : -1].log_softmax(-1)
    want = -float(logp.gather(-1, torch.tensor(tgt)[:, None]).sum()) / len(tgt)
    assert ex["nll"].iloc[0] == pytest.approx(want, rel=1e-5)


def test_example_ids_are_stable_and_unique(trained):
    m, tok = trained("opt")
    w = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=16)
    a = perplexity(m, w, batch_size=8)["per_example"]
    quantize_(m, "W4A8")
    try:
        b = perplexity(m, w, batch_size=3)["per_example"]
    finally:
        restore_(m)
    assert list(a["example_id"]) == list(b["example_id"])  # same tokens → same ids, any setting/batching
    assert list(a["nll"]) != list(b["nll"])
    ids = example_ids([[1, 2, 3], [4, 5], [1, 2, 3]])
    assert ids[0] != ids[1] and ids[2] == ids[0] + "~1"
    assert example_ids([[4, 5]]) == [ids[1]]  # the id depends on the tokens only
    assert len(ids[0]) == 16


def test_documents_mode(trained):
    m, tok = trained("opt")
    d = document_examples(tok, "wikitext2", 64, path=str(WIKI_RAW), max_examples=30, use_cache=False)
    assert d.shape == (30, 65) and bool((d[:, 0] == tok.bos_token_id).all())
    # shorter documents are dropped: with a huge example_len nothing is left
    with pytest.raises(ConfigError, match="no document has 100000 tokens"):
        document_examples(tok, "wikitext2", 100000, path=str(WIKI_RAW), use_cache=False)
    with pytest.raises(ConfigError, match="has no documents"):
        document_examples(tok, "lambada", 64, path=str(LAMBADA))
    r = evaluate_dataset(m, tok, "wikitext2", path=str(WIKI_RAW), examples="documents", example_len=64, max_windows=30, batch_size=8)
    assert len(r["per_example"]) == 30 and set(r["per_example"]["n_tokens"]) == {64}
    assert float((r["per_example"]["nll"]).mean()) == pytest.approx(math.log(r["ppl"]), abs=1e-6)


def test_documents_config_validation():
    from quantlens.pipeline.sweep import DatasetEntry

    with pytest.raises(ValueError, match="examples: 'lambada' has no documents"):
        DatasetEntry(name="lambada", examples="documents")
    with pytest.raises(ValueError, match="example_len: only with examples: documents"):
        DatasetEntry(name="c4", example_len=128)
    assert DatasetEntry(name="fineweb", examples="documents", example_len=512).example_len == 512


# --- residual statistics ------------------------------------------------------------------------------
def _by_hand(m, ids, family):
    """r(l) and z(l) captured as whole tensors by independent hooks, reduced here."""
    blocks = {"opt": lambda: m.model.decoder.layers, "bloom": lambda: m.transformer.h, "llama": lambda: m.model.layers}[family]()
    caught = {}
    hs = []
    for i, b in enumerate(blocks):  # the trained models are pre-LN: r(l) is the input of the norm before the MLP
        norm2 = b.final_layer_norm if family == "opt" else b.post_attention_layernorm
        hs.append(norm2.register_forward_pre_hook(lambda mod, a, i=i: caught.__setitem__(("r", i), a[0].detach().clone())))
        hs.append(b.register_forward_hook(lambda mod, a, o, i=i: caught.__setitem__(("z", i), (o[0] if isinstance(o, tuple) else o).detach().clone())))
    with torch.no_grad():
        m(input_ids=ids)
    for h in hs:
        h.remove()
    out = {}
    for (kind, i), x in caught.items():
        x = x.reshape(ids.shape[0], ids.shape[1], -1).double()
        out[(kind, i, "norm")] = x.norm(dim=-1).mean(-1)
        if kind == "r":
            xc = x - x.mean(-1, keepdim=True)
            out[(kind, i, "kurt")] = ((xc**4).mean(-1) / (xc**2).mean(-1) ** 2).mean(-1)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_statistics_equal_hand_computation(family, trained):
    m, tok = trained(family)
    w = perplexity_windows(tok, "wikitext2", 128, path=str(WIKI_TEST), max_windows=6)
    r = perplexity(m, w, batch_size=4, residual=True)
    res = r["residual"]
    assert list(res.columns) == ["example_id", "layer", "r_norm", "z_norm", "r_kurtosis"]
    assert len(res) == 6 * 3 and not res.isna().any().any()
    want = _by_hand(m, w, family)
    for layer in range(3):
        got = res[res["layer"] == layer]
        np.testing.assert_allclose(got["r_norm"], want[("r", layer, "norm")].numpy(), rtol=1e-5)
        np.testing.assert_allclose(got["z_norm"], want[("z", layer, "norm")].numpy(), rtol=1e-5)
        np.testing.assert_allclose(got["r_kurtosis"], want[("r", layer, "kurt")].numpy(), rtol=1e-4)
    # residual recording changes nothing in the NLL
    assert r["ppl"] == perplexity(m, w, batch_size=4)["ppl"]


def test_residual_statistics_exclude_padding(trained):
    m, tok = trained("bloom")
    reqs = lambada_requests(tok, load_lambada(str(LAMBADA), limit=12))
    batched = lambada(m, reqs, batch_size=12, pad_id=tok.pad_token_id or 0, residual=True)["residual"]
    alone = lambada(m, reqs, batch_size=1, pad_id=tok.pad_token_id or 0, residual=True)["residual"]
    np.testing.assert_allclose(batched[["r_norm", "z_norm", "r_kurtosis"]], alone[["r_norm", "z_norm", "r_kurtosis"]], rtol=1e-4)


def test_block_not_understood_is_one_clear_error():
    m = tiny_random_model("llama")
    m.model.layers[0].extra_norm = type(m.model.layers[0].input_layernorm)(32)
    with pytest.raises(BlockNotUnderstood, match=r"block LlamaDecoderLayer has norms \[input_layernorm, post_attention_layernorm, extra_norm\]: not a layout quantlens knows"):
        ResidualRecorder(m, 4)


def test_fineweb_local_jsonl_and_parquet_documents(trained, tmp_path):
    m, tok = trained("llama")
    docs = [" ".join(["word"] * n) for n in (10, 80, 200, 5, 90)]
    pd.DataFrame({"text": docs, "id": range(5)}).to_parquet(tmp_path / "fw.parquet")
    (tmp_path / "fw.jsonl").write_text("\n".join(pd.Series(docs).map(lambda t: f'{{"text": "{t}"}}')))
    for f in ("fw.parquet", "fw.jsonl"):
        d = document_examples(tok, "fineweb", 60, path=str(tmp_path / f), use_cache=False)
        assert d.shape[0] == 3 and d.shape[1] == 61  # the 10- and 5-word documents are dropped
    assert document_examples(tok, "fineweb", 60, path=str(tmp_path / "fw.parquet"), max_examples=2, use_cache=False).shape[0] == 2


def test_registry_has_the_second_papers_models():
    from quantlens.model.loading import resolve_model
    from quantlens.pipeline.sweep import load_config

    assert resolve_model("llama-3-8b").hf_id == "meta-llama/Meta-Llama-3-8B"
    assert resolve_model("qwen2.5-7b").family == "qwen" and resolve_model("mistral-nemo-12b").family == "mistral"
    assert resolve_model("llama-3-70b", "my-org/l3-70b").hf_id == "my-org/l3-70b"
    cfg = load_config(REPO / "configs" / "paper2-examples.yaml")
    assert [m.ref for m in cfg.models] == ["qwen2.5-7b", "llama-3-8b", "mistral-nemo-12b", "llama-3-70b"]
    assert cfg.datasets[0].examples == "documents" and cfg.datasets[0].example_len == 512


@pytest.mark.parametrize("missing", [False, True])
def test_matrix_pair_statistics_equal_the_per_pair_code(missing):
    rng = np.random.default_rng(0)
    rows = []
    for model, n_ex, n_set in (("m1", 50, 9), ("m2", 7, 4)):
        base = rng.normal(size=n_ex)
        for s in range(n_set):
            e = base * rng.uniform(0, 2) + rng.normal(size=n_ex) * 0.5
            if s % 3 == 0:
                e = np.round(e, 1)  # ties: ranks and top sets must break them as before
            if s == 4:
                e[:] = 0.25  # a constant error: ρ is NaN
            keep = np.ones(n_ex, bool)
            if missing and s in (1, 2):
                keep[rng.choice(n_ex, size=n_ex // 4, replace=False)] = False
            for ds in ("wikitext2", "c4"):
                rows += [{"model": model, "dataset": ds, "setting": f"S{s}", "example_id": f"x{i:03d}", "error": float(e[i])}
                         for i in range(n_ex) if keep[i]]
    err = pd.DataFrame(rows)
    got, want = pe.error_correlation(err), pe.error_correlation_pairwise(err)
    assert len(got) == 2 * (36 + 6) and list(got.columns) == pe.PAIR_COLUMNS + pe.INTERVAL_COLUMNS
    from quantlens.analysis.paired import fisher_interval

    lo, hi = fisher_interval(got["pearson"].to_numpy(), got["n_examples"].to_numpy())  # each ρ's interval by Fisher's z
    np.testing.assert_allclose(got["pearson_lo"], lo, equal_nan=True)
    np.testing.assert_allclose(got["pearson_hi"], hi, equal_nan=True)
    ok = got["pearson"].notna() & (got["n_examples"] > 3)
    assert ((got["pearson_lo"] <= got["pearson"]) & (got["pearson"] <= got["pearson_hi"]))[ok].all()
    pd.testing.assert_frame_equal(got[["model", "dataset", "setting_a", "setting_b", "n_examples"]],
                                  want[["model", "dataset", "setting_a", "setting_b", "n_examples"]], check_dtype=False)
    for c in ("pearson", "spearman", "jaccard_top10"):
        np.testing.assert_allclose(got[c], want[c], rtol=0, atol=1e-12, equal_nan=True, err_msg=c)
    assert got["pearson"].isna().sum() == 2 * 8 and (got["n_examples"] < got["model"].map({"m1": 50, "m2": 7})).any() == missing


def test_vectorised_residual_predictor_equals_the_per_setting_code():
    rng = np.random.default_rng(1)
    ids = [f"x{i}" for i in range(30)]
    res = pd.DataFrame([{"model": "m", "dataset": "d", "example_id": e, "layer": l, "r_norm": rng.uniform(1, 9), "z_norm": rng.uniform(1, 9)}
                        for e in ids for l in range(3)])
    err = pd.DataFrame([{"model": "m", "dataset": "d", "setting": s, "example_id": e, "error": float(np.round(rng.normal(), 1))}
                        for s in ("A", "B", "C") for k, e in enumerate(ids) if not (s == "B" and k % 4 == 0)])
    got = pe.residual_predictor(err, res, {"m": "opt"})
    assert len(got) == 9 and list(got["setting"]) == ["A"] * 3 + ["B"] * 3 + ["C"] * 3
    r_wide = res.pivot_table(index="example_id", columns="layer", values="r_norm")
    z_wide = res.pivot_table(index="example_id", columns="layer", values="z_norm")
    for _, row in got.iterrows():  # the per-(setting, layer) computation it replaced
        e = err[err["setting"] == row["setting"]].set_index("example_id")["error"]
        s, z = r_wide.loc[e.index, row["layer"]].to_numpy(), z_wide.loc[e.index, row["layer"]].to_numpy()
        assert row["n_examples"] == len(e) and row["family"] == "opt"
        assert row["rho"] == pytest.approx(pe.pearson(s, e.to_numpy()), abs=1e-12)
        assert row["spearman"] == pytest.approx(pe.spearman(s, e.to_numpy()), abs=1e-12)
        assert row["rho_z"] == pytest.approx(pe.pearson(z, e.to_numpy()), abs=1e-12)


def test_correlation_summary_collapses_seeds_and_compares_each_family_with_its_own():
    rng = np.random.default_rng(2)
    base = rng.normal(size=40)
    rows = []
    names = ["W4A16", "W4A16-nu"] + [f"W4A16+gaussian-additive-both-s{s}" for s in range(6)]
    for s in names:
        e = base + rng.normal(size=40) * (0.1 if "+" in s else 0.5)
        rows += [{"model": "m", "dataset": "d", "setting": s, "example_id": f"x{i}", "error": float(e[i])} for i in range(40)]
    corr = pe.error_correlation(pd.DataFrame(rows))
    assert len(corr) == 28
    bases = {n: ("W4A16" if "+" in n else n) for n in names}
    md = pe.correlation_summary(corr, bases)
    seeds = corr[corr["setting_a"].str.contains("-s") & corr["setting_b"].str.contains("-s")]["pearson"]
    assert f"| W4A16+gaussian-additive-both | its other seeds | {seeds.mean():.3f} ± {seeds.std():.3f} | 15 |" in md
    native = corr[(corr["setting_a"] == "W4A16") & corr["setting_b"].str.contains("-s")]["pearson"]
    assert f"| W4A16+gaussian-additive-both | W4A16 (native) | {native.mean():.3f} ± {native.std():.3f} | 6 |" in md
    assert "28 pairs of 8 settings, 40 examples" in md and "-s3" not in md  # seeds never listed one by one


def test_report_of_300_settings_is_readable_and_keeps_every_pair(tmp_path, monkeypatch):
    """Issue #21's grid at the report level: W16A16 + 299 seeds of one perturbation on 2 examples.
    Its 44,551 pairs are matrix operations, not one computation per pair (bench/bench_report.py
    times both)."""
    per_pair, pair_stats = [], pe.pair_stats
    monkeypatch.setattr(pe, "pair_stats", lambda *a, **k: per_pair.append(a[2:4]) or pair_stats(*a, **k))
    rng = np.random.default_rng(3)
    settings = ["W16A16"] + [f"W8A8+gaussian-additive-both-s{s}" for s in range(299)]
    ex = pd.DataFrame({"model": "tiny-opt", "dataset": "wikitext2", "setting": np.repeat(settings, 2), "example_id": ["a", "b"] * 300,
                       "n_tokens": 127, "nll": 5 + rng.normal(0, 0.1, 600)})
    res = pd.DataFrame({"model": "tiny-opt", "dataset": "wikitext2", "example_id": ["a", "a", "b", "b"], "layer": [0, 1, 0, 1],
                        "r_norm": [1.0, 2.0, 3.0, 5.0], "z_norm": 1.0, "r_kurtosis": 3.0})
    files = pe.write_per_example_report(ex, res, None, {"tiny-opt": "W16A16"}, tmp_path, {"tiny-opt": "opt"})
    assert per_pair == []  # every setting has every example: no pair goes through the per-pair path
    assert (tmp_path / "error_correlation.md").stat().st_size < 10_000 and not (tmp_path / "error_correlation.md").read_text().count("-s1")
    assert len(pd.read_csv(tmp_path / "error_correlation.csv")) == 299 * 298 // 2
    assert tmp_path / "fig_error_corr_tiny-opt.png" in files
