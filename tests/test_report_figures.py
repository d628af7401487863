"""The report on a real model's numbers: SmolLM2-135M's perplexities span orders of magnitude (W3A16
and W4A4 collapse to ~12,000 against 38.6), beside a tiny model whose numbers barely move. Tables keep
formats and methods apart and flag collapsed runs; figures go log where values span more than 10× and
put a collapsed run in a band at the end of the axis instead of letting it flatten the rest."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from quantlens.analysis import aggregate as agg
from quantlens.analysis import calibrated_report, format_report, paired_report, plotting
from quantlens.analysis import per_example as pe
from quantlens.quantize.settings import resolve_setting

matplotlib.use("Agg")

# WikiText-2 perplexity measured on SmolLM2-135M (16 windows of 256; the W3A16-g32 family on 64), Lambada accuracy
SMOL = {"W16A16": (38.62, 0.38), "W8A8": (39.51, 0.37), "W8A8-nu": (38.51, 0.38), "W4A16": (78.3, 0.22), "W4A16-g32": (54.1, 0.30),
        "W4A16-nf4": (49.1, 0.31), "W4A16-mxfp4": (60.0, 0.27), "W3A16": (11670.0, 0.0), "W4A4": (13190.0, 0.0),
        "W4A4-nvfp4": (59.5, 0.26), "W16A16KV4": (52.0, 0.31), "W3A16-g32": (183.0, 0.12), "W3A16-g32-gptq": (94.6, 0.2),
        "W3A16-g32-awq": (83.0, 0.22), "W3A16-nf3": (128.9, 0.15), "gptq-w3g32-released": (101.0, 0.19)}
TINY = {s: (70.0 + 0.5 * i, 0.0) for i, s in enumerate(SMOL)}


def params(setting: str) -> dict:
    """What a run of ``setting`` logs (``gptq-w3g32-released``: a released GPTQ checkpoint)."""
    if setting == "gptq-w3g32-released":
        p = resolve_setting("W3A16-g32-gptq").flat_params()
        p.update(setting=setting, base=setting, checkpoint="results/tiny-llama-gptq-w3g32")
        return p
    return resolve_setting(setting).flat_params()


def runs(models=(("smollm2-135m", SMOL, 0.135), ("tiny-llama", TINY, 0.0005))) -> pd.DataFrame:
    rows = []
    for model, table, size in models:
        for setting, (ppl, acc) in table.items():
            p = params(setting)
            rows.append({**{f"params.{k}": str(v) for k, v in p.items()}, "params.model": model, "params.family": "llama",
                         "params.size_b": str(size), "metrics.wikitext2_ppl": ppl, "metrics.lambada_acc": acc,
                         "metrics.weight_rel_error_mean": 0.1 if p["w_bits"] < 16 else 0.0})
    return pd.DataFrame(rows)


def examples(models=(("smollm2-135m", SMOL), ("tiny-llama", TINY)), n: int = 24) -> pd.DataFrame:
    """Per-example NLL whose token-weighted mean is each run's log perplexity, as measured."""
    rng = np.random.default_rng(0)
    rows = []
    for model, table in models:
        hard = rng.normal(0, 1, n)
        for setting, (ppl, _) in table.items():
            nll = math.log(ppl) + 0.05 * (hard + rng.normal(0, 0.5, n))
            nll += math.log(ppl) - nll.mean()
            rows += [{"model": model, "dataset": "wikitext2", "setting": setting, "example_id": f"w{i}", "n_tokens": 255, "nll": v}
                     for i, v in enumerate(nll)]
    return pd.DataFrame(rows)


@pytest.fixture
def figures(monkeypatch):
    """The figures a plotting function made, kept open (save_figure is every figure's end)."""
    made = []

    def keep(fig, path, title=None, fontsize=None, layout=True):
        made.append(fig)
        return Path(path)

    for module in (agg, format_report, calibrated_report, paired_report, pe):
        monkeypatch.setattr(module, "save_figure", keep)
    yield made
    plotting.pyplot().close("all")


# --- the collapse rule, in one place ---------------------------------------------------------------------
def test_a_run_collapses_past_ten_times_the_full_precision_perplexity():
    assert list(plotting.collapsed_ppl([386.2, 386.3, np.nan, 500.0], [38.62, 38.62, 38.62, np.nan])) == [False, True, False, False]
    assert list(plotting.collapsed_nll([math.log(10) - 1e-9, math.log(10) + 1e-9])) == [False, True]
    df = agg.tidy(runs())
    smol = df[df["model"] == "smollm2-135m"].set_index("setting")["collapsed"]
    assert set(smol[smol].index) == {"W3A16", "W4A4"}  # 11,670 and 13,190 against 38.62; W3A16-g32 (183, 4.7×) works
    assert not df[df["model"] == "tiny-llama"]["collapsed"].any()
    results = agg.results_table(df).set_index(["model", "setting"])
    assert results.loc[("smollm2-135m", "W4A4"), "collapsed"] and not results.loc[("smollm2-135m", "W4A16"), "collapsed"]


# --- formats beside INT, methods beside their round-to-nearest twin ----------------------------------------
def test_the_formats_table_holds_no_method_and_flags_collapsed_pairs():
    df = agg.tidy(runs())
    assert set(df[agg.method_runs(df)]["setting"]) == {"W3A16-g32-gptq", "W3A16-g32-awq", "gptq-w3g32-released"}
    old = pd.DataFrame({"setting": ["W4A16-gptq", "W4A16"], "format": ["gptq", "int"]})  # runs logged before `method`
    assert list(agg.method_runs(old)) == [True, False]
    uv = agg.uniform_vs_nonuniform(df)
    assert not set(uv["setting"]) & {"W3A16-g32-gptq", "W3A16-g32-awq", "gptq-w3g32-released"}
    assert not set(uv["family"]) & {"gptq", "awq"}
    smol = uv[uv["model"] == "smollm2-135m"].set_index("setting")
    assert smol.loc["W4A4-nvfp4", "INT"] == "W4A4" and smol.loc["W4A4-nvfp4", "INT collapsed"]
    assert not smol.loc["W4A4-nvfp4", "format collapsed"] and not smol.loc["W4A16-nf4", "INT collapsed"]
    fvb = format_report.formats_vs_bits(df)
    assert not set(fvb["family"]) & {"gptq", "awq"} and "collapsed" in fvb


def test_calibrated_lens_sets_each_method_beside_its_rtn_twin_in_table_and_figure(figures):
    df = agg.tidy(runs())
    lens = calibrated_report.calibrated_lens(df)
    smol = lens[lens["model"] == "smollm2-135m"]
    for method, role in (("W3A16-g32-gptq", "gptq"), ("W3A16-g32-awq", "awq"), ("gptq-w3g32-released", "gptq (checkpoint)")):
        rows = smol[smol["calibrated"] == method]
        assert list(rows["role"]) == [role, "rtn"] and list(rows["setting"]) == [method, "W3A16-g32"]
    assert "collapsed" in lens and not lens["collapsed"].any()
    calibrated_report.fig_calibrated_lens(lens, "smollm2-135m", Path("x.png"))
    labels = [t.get_text() for t in figures[-1].axes[0].get_yticklabels()]
    gptq = labels.index("W3A16-g32-gptq (gptq)")
    assert labels[gptq + 1] == "– rtn: W3A16-g32"  # the twin right under its method


# --- figures: log where values span, collapsed runs in a band -----------------------------------------------
def test_uniform_vs_nonuniform_figure_goes_log_and_bands_the_collapsed(figures):
    df = agg.tidy(runs())
    agg.fig_uniform_vs_nonuniform(agg.uniform_vs_nonuniform(df, examples()), Path("x.png"))
    ppl = next(ax for ax in figures[-1].axes if ax.get_title() == "wikitext2_ppl")
    assert ppl.get_xscale() == "log"
    assert ppl.get_xlim()[1] < 1000  # 13,190 does not stretch the axis: it sits in the band ...
    assert {"11,670", "13,190"} <= {t.get_text() for t in ppl.texts}  # ... with its value written
    assert any("smollm2-135m · W4A4-nvfp4 vs W4A4 (INT collapsed)" == t.get_text() for t in figures[-1].axes[0].get_yticklabels())
    # the paired interval of a format is drawn around it: INT × the interval of the ratio format / INT
    uv = agg.uniform_vs_nonuniform(df, examples()).set_index(["model", "setting"])
    row = uv.loc[("smollm2-135m", "W4A4-nvfp4")]
    lo, hi = row["wikitext2_ppl INT"] * row["wikitext2_ppl ratio lo"], row["wikitext2_ppl INT"] * row["wikitext2_ppl ratio hi"]
    assert lo <= row["wikitext2_ppl format"] <= hi and hi < 2 * row["wikitext2_ppl format"]

    tiny = agg.tidy(runs(models=(("tiny-llama", TINY, 0.0005),)))  # small numbers: a linear axis, no band
    agg.fig_uniform_vs_nonuniform(agg.uniform_vs_nonuniform(tiny), Path("y.png"))
    ax = next(ax for ax in figures[-1].axes if ax.get_title() == "wikitext2_ppl")
    assert ax.get_xscale() == "linear" and not ax.patches


def test_every_perplexity_figure_goes_log_past_ten_times(figures):
    df = agg.tidy(runs())
    format_report.fig_formats_vs_bits(format_report.formats_vs_bits(df), df, "wikitext2_ppl", Path("x.png"))
    smol = next(ax for ax in figures[-1].axes if ax.get_title() == "smollm2-135m")
    tiny = next(ax for ax in figures[-1].axes if ax.get_title() == "tiny-llama")
    assert smol.get_yscale() == "log" and tiny.get_yscale() == "linear"
    assert smol.get_ylim()[1] < 1000 and {"11,670", "13,190"} <= {t.get_text() for t in smol.texts}
    agg.fig_metric_vs_size(df, "wikitext2_ppl", Path("y.png"))
    assert figures[-1].axes[0].get_yscale() == "log" and figures[-1].axes[0].get_ylim()[1] < 1000
    agg.fig_metric_vs_size(df, "lambada_acc", Path("z.png"))  # a bounded metric stays linear
    assert figures[-1].axes[0].get_yscale() == "linear"


def test_forest_plot_keeps_a_collapsed_setting_from_squeezing_the_others(figures):
    ex = examples()
    paired = paired_report.paired_vs_reference(ex, {"smollm2-135m": "W16A16", "tiny-llama": "W16A16"})
    smol = paired[paired["model"] == "smollm2-135m"].set_index("setting")
    assert smol.loc["W4A4", "collapsed"] and smol.loc["W3A16", "collapsed"] and not smol.loc["W3A16-g32", "collapsed"]
    assert "collapsed" in paired_report.paired_markdown(paired, paired_report.BootstrapSpec())
    paired_report.fig_paired(paired, "smollm2-135m", "wikitext2", paired_report.BootstrapSpec(), Path("x.png"))
    ax = figures[-1].axes[0]
    assert ax.get_xscale() == "linear"  # ΔNLL is itself a log ratio
    assert ax.get_xlim()[1] < smol.loc["W4A4", "delta_nll"]  # ln(13,190 / 38.6) = 5.8 sits in the band, not on the axis
    assert "W4A4 (collapsed)" in [t.get_text() for t in ax.get_yticklabels()]


def test_the_error_vs_norm_figure_shows_the_worst_setting_that_still_works():
    err = pd.DataFrame({"model": "m", "dataset": "d", "setting": ["W4A4", "W4A4", "W4A16", "W4A16"], "example_id": ["a", "b"] * 2,
                        "error": [5.8, 5.9, 0.7, 0.8]})
    assert pe.worst_setting(err, "m", "d") == "W4A4"
    assert pe.worst_setting(err, "m", "d", {"W4A4"}) == "W4A16"


# --- per_example.md says what is true --------------------------------------------------------------------
def test_per_example_md_names_the_methods_and_their_pairs(tmp_path):
    ex = examples(models=(("smollm2-135m", SMOL),))
    methods = {"W3A16-g32-gptq": "gptq", "W3A16-g32-awq": "awq", "gptq-w3g32-released": "gptq"}
    pe.write_per_example_report(ex, pd.DataFrame(), None, {"smollm2-135m": "W16A16"}, tmp_path, methods=methods)
    md = (tmp_path / "per_example.md").read_text()
    assert "not here yet" not in md and "calibration-free" in md
    assert "| W3A16-g32-awq | awq | W3A16-g32-gptq | gptq | cross-method |" in md
    assert re.search(r"\| W3A16-g32-gptq \| gptq \| gptq-w3g32-released \| gptq \| same method \|", md)
    assert pe.setting_methods(["W3A16-g32-gptq", "W4A16", "gptq-w3g32-released", "W3A16-g32-gptq+gaussian-additive-weights-s0"]) == \
        {"W3A16-g32-gptq": "gptq"}  # from names alone: a checkpoint's name says nothing
    rtn = ex[~ex["setting"].isin(methods)]
    pe.write_per_example_report(rtn, pd.DataFrame(), None, {"smollm2-135m": "W16A16"}, tmp_path / "rtn")
    assert "No setting of these runs was made by a method" in (tmp_path / "rtn" / "per_example.md").read_text()


def test_every_report_figure_is_written_on_these_numbers(tmp_path):
    files = {f.name for f in agg.write_report(runs(), tmp_path, examples=examples())}
    assert {"fig_uniform_vs_nonuniform.png", "fig_formats_wikitext2_ppl.png", "fig1_wikitext2_ppl_vs_size.png",
            "fig_calibrated_lens_smollm2-135m.png", "fig_calibrated_lens_tiny-llama.png", "calibrated_lens.md"} <= files


def test_no_module_of_the_report_imports_another_ones_private_names():
    root = Path(agg.__file__).parent
    for path in root.glob("*.py"):
        private = re.findall(r"from quantlens\.analysis\.\w+ import ([^\n]*)", path.read_text())
        names = [n.strip(" ()") for line in private for n in line.split(",")]
        assert not [n for n in names if n.startswith("_")], path.name
