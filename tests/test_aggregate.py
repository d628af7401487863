import pandas as pd
import pytest

from quantlens.analysis.aggregate import clipping_summary, perturbation_summary, tidy, uniform_vs_nonuniform, write_report


def frame():
    rows = []
    for model, fam, size in (("m1", "opt", 1.3), ("m2", "opt", 6.7)):
        for setting, w, a, p, clip, pert, seed, base, ppl in (
            ("W16A16", 16, 16, 1.0, 0, "none", 0, "W16A16", 10.0),
            ("W4A16", 4, 16, 1.0, 0, "none", 0, "W4A16", 12.0),
            ("W4A16-nu", 4, 16, 1 / 3, 0, "none", 0, "W4A16-nu", 11.0),
            ("W4A16-clip3", 4, 16, 1.0, 3, "none", 0, "W4A16", 20.0),
            ("W4A16+g-s0", 4, 16, 1.0, 0, "gaussian-additive-both", 0, "W4A16", 13.0),
            ("W4A16+g-s1", 4, 16, 1.0, 0, "gaussian-additive-both", 1, "W4A16", 15.0),
        ):
            rows.append({"params.model": model, "params.family": fam, "params.size_b": str(size), "params.setting": setting,
                         "params.w_bits": str(w), "params.a_bits": str(a), "params.transform_p": str(p),
                         "params.clip_k": str(float(clip)), "params.perturbation": pert, "params.seed": str(seed),
                         "params.base": base, "params.w_granularity": "channel", "params.a_granularity": "none",
                         "params.w_group_size": "0", "metrics.wikitext2_ppl": ppl + size, "metrics.weight_alpha_mean": 0.1,
                         "metrics.weight_delta_l2_mean": 0.5})
    return pd.DataFrame(rows)


def test_tables_from_runs():
    df = tidy(frame())
    uv = uniform_vs_nonuniform(df)
    assert list(uv["config"]) == ["W4A16", "W4A16"]
    assert uv.iloc[0]["wikitext2_ppl INT"] == pytest.approx(13.3)
    assert uv.iloc[0]["wikitext2_ppl format"] == pytest.approx(12.3)
    assert list(uv["family"]) == ["cuberoot", "cuberoot"] and list(uv["INT"]) == ["W4A16", "W4A16"]
    ps = perturbation_summary(df, "wikitext2_ppl")
    m1 = ps[ps["model"] == "m1"].iloc[0]
    assert (m1["mean"], m1["seeds"]) == (pytest.approx(15.3), 2) and m1["std"] == pytest.approx(2 ** 0.5)
    cs = clipping_summary(df)
    assert list(cs[cs["model"] == "m1"]["clip_k"]) == [0.0, 3.0]
    assert list(cs[cs["model"] == "m1"]["mean_ppl"]) == [pytest.approx(13.3), pytest.approx(21.3)]


def test_report_files(tmp_path):
    files = {f.name for f in write_report(frame(), tmp_path)}
    assert {"results.csv", "results.md", "uniform_vs_nonuniform.md", "clipping.csv", "fig1_wikitext2_ppl_vs_size.png",
            "fig3_alpha_vs_delta.png", "fig4_perturbations_wikitext2_ppl.png", "fig5_clipping.png"} <= files
    assert write_report(pd.DataFrame(), tmp_path / "empty") == []


def test_uniform_vs_nonuniform_has_kv_rows_and_a_difference_column():
    df = frame()
    extra = []
    for setting, p, ppl in (("W16A16KV4", 1.0, 12.5), ("W16A16KV4-nu", 1 / 3, 12.0)):
        row = df[(df["params.model"] == "m1") & (df["params.setting"] == "W16A16")].iloc[0].to_dict()
        row.update({"params.setting": setting, "params.base": setting, "params.kv_bits": "4", "params.kv_granularity": "token",
                    "params.transform_p": str(p), "metrics.wikitext2_ppl": ppl})
        extra.append(row)
    df = pd.concat([df.assign(**{"params.kv_bits": "16", "params.kv_granularity": "none"}), pd.DataFrame(extra)])
    uv = uniform_vs_nonuniform(tidy(df))
    kv = uv[uv["config"] == "W16A16KV4"].iloc[0]
    assert kv["model"] == "m1" and kv["wikitext2_ppl Δ"] == pytest.approx(-0.5)
    assert list(uv["config"]).count("W4A16") == 2  # the KV twins do not pair with the weight settings
    assert uv[uv["config"] == "W4A16"]["wikitext2_ppl Δ"].tolist() == [pytest.approx(-1.0)] * 2


def test_the_reference_is_what_the_runs_logged_else_nothing_quantized_kv_included():
    from quantlens.analysis.aggregate import reference_mask, reference_settings

    logged = pd.DataFrame({"model": ["m"] * 3, "setting": ["W16A16KV4", "W16A16", "W16A16KV16"], "w_bits": [16] * 3, "a_bits": [16] * 3,
                           "kv_bits": [4, 16, 16], "perturbation": ["none"] * 3, "reference": ["False", "True", "True"]})
    assert list(reference_mask(logged)) == [False, True, True]
    assert reference_settings(logged.assign(reference=reference_mask(logged))) == {"m": "W16A16"}
    old = logged.drop(columns=["reference"])  # runs of versions that did not log it: KV bits count too
    assert list(reference_mask(old)) == [False, True, True]
    assert list(reference_mask(old.drop(columns=["kv_bits"]))) == [True, True, True]  # (older still: no KV at all)


def _format_rows(df: pd.DataFrame) -> pd.DataFrame:
    """frame() plus runs of the field's formats on m1, as the runs log them (format, w_format, lens metrics)."""
    extra = []
    lens = {f"metrics.weight_lens_d{i:02d}": 1.0 / i for i in range(1, 11)}
    for setting, fam, w, a, gran, group, ppl in (
        ("W4A16-nf4", "nf", 4, 16, "group", 64, 11.5), ("W4A16-g64", "int", 4, 16, "group", 64, 11.8),
        ("W3A16", "int", 3, 16, "channel", 0, 30.0), ("W3A16-nf3", "nf", 3, 16, "group", 64, 20.0),
        ("W4A4-mxfp4", "mxfp", 4, 4, "group", 32, 40.0), ("W8A8-fp8", "fp", 8, 8, "channel", 0, 11.4),
        ("W4A4", "int", 4, 4, "channel", 0, 60.0),
    ):
        row = df[(df["params.model"] == "m1") & (df["params.setting"] == "W16A16")].iloc[0].to_dict()
        row.update({"params.setting": setting, "params.base": setting, "params.format": fam, "params.w_bits": str(w),
                    "params.a_bits": str(a), "params.w_granularity": gran, "params.w_group_size": str(group),
                    "params.a_granularity": "group" if a < 16 else "none", "metrics.wikitext2_ppl": ppl, **lens})
        extra.append(row)
    return pd.concat([df, pd.DataFrame(extra)])


def test_every_format_is_compared_with_int_at_the_same_bits_and_granularity():
    uv = uniform_vs_nonuniform(tidy(_format_rows(frame())))
    m1 = uv[uv["model"] == "m1"].set_index("setting")
    assert m1.loc["W4A16-nf4", "INT"] == "W4A16-g64"  # same group of 64: the like-for-like INT run
    assert m1.loc["W4A16-nf4", "wikitext2_ppl Δ"] == pytest.approx(-0.3)
    assert m1.loc["W3A16-nf3", "INT"] == "W3A16" and m1.loc["W3A16-nf3", "wikitext2_ppl Δ"] == pytest.approx(-10.0)
    assert m1.loc["W4A4-mxfp4", "INT"] == "W4A4" and m1.loc["W4A4-mxfp4", "family"] == "mxfp"
    assert "W8A8-fp8" not in m1.index  # no INT W8A8 run on m1: nothing to compare with
    assert set(uv[uv["model"] == "m2"]["family"]) == {"cuberoot"}


def test_formats_against_bits_and_the_lens_in_the_report(tmp_path):
    from quantlens.analysis.format_report import format_lens, formats_vs_bits

    df = tidy(_format_rows(frame()))
    fvb = formats_vs_bits(df)
    nf = fvb[(fvb["model"] == "m1") & (fvb["family"] == "nf")]
    assert list(nf["bits"]) == [3, 4] and list(nf["regime"]) == ["weights"] * 2
    ints = fvb[(fvb["model"] == "m1") & (fvb["family"] == "int") & (fvb["regime"] == "weights")]
    assert list(ints["setting"]) == ["W3A16", "W4A16"]  # one run a point: the default granularity
    assert set(fvb[fvb["regime"] == "weights+activations"]["setting"]) == {"W4A4-mxfp4", "W8A8-fp8", "W4A4"}
    lens = format_lens(df)
    assert set(lens["setting"]) == {"W4A16-nf4", "W4A16-g64", "W3A16", "W3A16-nf3", "W4A4-mxfp4", "W8A8-fp8", "W4A4"}
    assert lens.iloc[0]["d01"] == 1.0 and lens.iloc[0]["d10"] == pytest.approx(0.1)
    files = {f.name for f in write_report(_format_rows(frame()), tmp_path)}
    assert {"formats_vs_bits.csv", "format_lens.csv", "fig_formats_wikitext2_ppl.png", "fig_format_lens_m1.png",
            "fig_uniform_vs_nonuniform.png"} <= files
