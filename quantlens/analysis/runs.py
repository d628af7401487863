"""Reading the table of finished runs: tidy it, tell the reference, collapsed, method and native runs
apart, and the format family of each. Shared by every report module (none of which it imports).
"""

from __future__ import annotations

import pandas as pd

from quantlens.analysis.plotting import collapsed_ppl, is_perplexity

NUMERIC = ("size_b", "w_bits", "a_bits", "kv_bits", "w_group_size", "transform_p", "clip_k", "seed", "seqlen")
QUALITY = ("lambada_acc", "wikitext2_ppl", "c4_ppl", "fineweb_ppl", "qerror_ppl", "lambada_nll")


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Strip the ``params.``/``metrics.``/``tags.`` prefixes, type the numbers, sort by model size."""
    if df.empty:
        return df
    out = df.rename(columns=lambda c: c.split(".", 1)[1] if c.startswith(("params.", "metrics.")) else c)
    out = out.rename(columns=lambda c: "tag_" + c[5:] if c.startswith("tags.") else c)
    for c in NUMERIC:
        if c in out:
            out[c] = pd.to_numeric(out[c], errors="coerce")
    if "base" not in out and "setting" in out:
        out["base"] = out["setting"]
    out["reference"] = reference_mask(out)
    if "end_time" in out:  # several sweeps may hold the same (model, setting): keep the newest
        out = out.sort_values("end_time").drop_duplicates(["model", "setting"], keep="last")
    out = out.sort_values(["family", "size_b", "model", "setting"]).reset_index(drop=True)
    out["collapsed"] = collapsed_runs(out)
    return out


def reference_mask(df: pd.DataFrame) -> pd.Series:
    """Which runs are the full-precision model: the ``reference`` param each run logs
    (:attr:`quantlens.quantize.settings.Setting.is_reference`). Runs logged before it existed: nothing
    quantized — weights, activations *and KV cache* at 16 bits — and nothing perturbed."""
    logged = df["reference"].astype(str).str.lower().map({"true": True, "false": False}) if "reference" in df else pd.Series(None, index=df.index, dtype=object)
    bits = lambda c: pd.to_numeric(df[c], errors="coerce").fillna(16) if c in df else pd.Series(16, index=df.index)  # noqa: E731
    pert = df["perturbation"].fillna("none") if "perturbation" in df else pd.Series("none", index=df.index)
    derived = (bits("w_bits") == 16) & (bits("a_bits") == 16) & (bits("kv_bits") == 16) & (pert == "none")
    return logged.where(logged.notna(), derived).astype(bool)


def reference_settings(df: pd.DataFrame) -> dict[str, str]:
    """model → the setting of its reference run (tidy frame): ``W16A16`` where several names of the
    full-precision model ran (runs of older versions), else the first by name."""
    out = {}
    for model, g in df[df["reference"]].groupby("model"):
        names = sorted(g["setting"])
        out[model] = "W16A16" if "W16A16" in names else names[0]
    return out


def metrics_present(df: pd.DataFrame) -> list[str]:
    return [m for m in QUALITY if m in df and df[m].notna().any()]


def collapsed_runs(df: pd.DataFrame) -> pd.Series:
    """Which runs have collapsed (:data:`quantlens.analysis.plotting.COLLAPSE_RATIO`): a perplexity more
    than 10× that of its model's full-precision run on the same dataset, on any perplexity dataset."""
    out = pd.Series(False, index=df.index)
    if "reference" not in df or "model" not in df:
        return out
    refs = reference_settings(df)
    ref_rows = df[df["setting"] == df["model"].map(refs)].drop_duplicates("model").set_index("model")
    for m in (m for m in metrics_present(df) if is_perplexity(m)):
        out |= collapsed_ppl(df[m], df["model"].map(ref_rows[m]))
    return out


def method_runs(df: pd.DataFrame) -> pd.Series:
    """Runs whose weights a *method* made — calibrated in the sweep (GPTQ, AWQ) or read from a released
    checkpoint — rather than round-to-nearest onto a number format: the ``method`` param (anything but
    ``rtn`` / ``none``) or a ``checkpoint`` param; runs logged before ``method`` existed: the ``format``
    param ``gptq`` / ``awq``. A method is compared with its round-to-nearest twin (``calibrated_lens``),
    a format with INT at the same bits (``uniform_vs_nonuniform``): the one place that tells them apart."""
    none = pd.Series("none", index=df.index)
    method = df["method"].fillna("none").astype(str) if "method" in df else none
    ckpt = df["checkpoint"].fillna("").astype(str) if "checkpoint" in df else pd.Series("", index=df.index)
    fmt = df["format"].fillna("none").astype(str) if "format" in df else none
    return ~method.isin(["rtn", "none", "nan", ""]) | ~ckpt.isin(["", "nan", "none"]) | fmt.isin(["gptq", "awq"])


def run_methods(df: pd.DataFrame) -> dict[str, str]:
    """Setting → the method that made its weights (gptq, awq, a released checkpoint's), for the runs
    :func:`method_runs` says a method made, from their ``method`` param."""
    method = df["method"] if "method" in df else pd.Series("checkpoint", index=df.index)
    return {s: str(m) for s, m, x in zip(df["setting"], method.fillna("checkpoint"), method_runs(df)) if x}


def native_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Native quantization runs: no artificial perturbation, no clipping."""
    return df[(df.get("perturbation", "none") == "none") & (df.get("clip_k", 0).fillna(0) == 0)]


def results_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every run: model × setting with its quality metrics and perturbation statistics, and whether it
    collapsed (perplexity > 10× the full-precision model's: :func:`collapsed_runs`)."""
    cols = ["model", "family", "size_b", "setting"] + metrics_present(df)
    cols += [c for c in ("weight_rel_error_mean", "activation_rel_error_mean", "weight_clipped_fraction", "collapsed") if c in df]
    return df[cols].copy()


def run_families(df: pd.DataFrame) -> pd.Series:
    """The format family of each run (``format`` param: int, cuberoot, power, nf, fp, mxfp, mxint, nvfp,
    km, mixed, none); runs logged before formats existed: int, or the power transform's twin."""
    p = pd.to_numeric(df["transform_p"], errors="coerce").fillna(1.0) if "transform_p" in df else pd.Series(1.0, index=df.index)
    derived = p.map(lambda v: "int" if v == 1.0 else "cuberoot" if abs(v - 1 / 3) < 1e-6 else "power")
    logged = df["format"] if "format" in df else pd.Series(None, index=df.index, dtype=object)
    return logged.where(logged.notna() & (logged != "none"), derived)
