"""The lens on calibrated methods: does GPTQ (AWQ) win by a smaller Δ, or by where it puts it?

For every calibrated run (``method`` gptq or awq) of a model — calibrated in the sweep, or a released
checkpoint's (role ``gptq (checkpoint)`` …; its noise twins are the perturbation runs of the same
checkpoint) — the table sets beside it its round-to-nearest
twin (same grid, group size, activations and KV cache; else round-to-nearest at the same bits with
another granularity, said in its role) and the noise runs matched to either (a
weight perturbation with that run as its ``base``: the same variance per layer, placed at random),
with the mean relative weight error ‖Δ‖/‖W‖ and the quality metrics. GPTQ below RTN in quality
with a Δ as large or larger puts its error where it hurts less; noise matched to GPTQ that does as
well as GPTQ says the magnitude alone explains it. One table per model (``calibrated_lens.md``).
"""

from __future__ import annotations

import pandas as pd

from quantlens.analysis.aggregate import metrics_present, to_markdown

CALIBRATED = ("gptq", "awq", "bnb", "compressed-tensors")  # (the last two: released checkpoints only)
_GRID = ("w_bits", "w_group_size", "w_symmetric", "a_bits", "a_granularity", "kv_bits")


def _same_grid(df: pd.DataFrame, row: pd.Series) -> pd.Series:
    keep = df["model"] == row["model"]
    for c in _GRID:
        if c in df:
            keep &= (df[c].astype(str) == str(row[c]))
    return keep


def calibrated_lens(df: pd.DataFrame) -> pd.DataFrame:
    """model, calibrated (the GPTQ or AWQ setting), role (gptq | awq | rtn | noise ~ gptq | … | noise ~ rtn), setting,
    weight_rel_error_mean and the quality metrics."""
    if "method" not in df or not df["method"].isin(CALIBRATED).any():
        return pd.DataFrame()
    method = df["method"].fillna("rtn")
    pert = df.get("perturbation", pd.Series("none", index=df.index)).fillna("none")
    base = df.get("base", df["setting"]).fillna(df["setting"])
    metrics = metrics_present(df)
    integer = df.get("format", pd.Series("int", index=df.index)).fillna("int").isin(["int", "none"])  # RTN on the integer grid
    ckpt = df.get("checkpoint", pd.Series("", index=df.index)).fillna("").astype(str)
    rows = []
    for i, g in df[method.isin(CALIBRATED) & (pert == "none")].iterrows():
        released = bool(ckpt[i])
        twin = df[_same_grid(df, g) & (method == "rtn") & (pert == "none") & integer]
        rtn = "rtn"
        if twin.empty:  # no run on the very grid: round-to-nearest at the same bits, another granularity
            same_bits = (df["model"] == g["model"]) & (method == "rtn") & (pert == "none") & integer
            for c in ("w_bits", "a_bits", "kv_bits"):
                if c in df:
                    same_bits &= df[c].astype(str) == str(g[c])
            twin, rtn = df[same_bits], "rtn (other granularity)"
        label = f"{g['method']} (checkpoint)" if released else g["method"]
        if not str(g.get("w_format", "int")).startswith(("int", "none", "nan")):
            rtn = f"{rtn} (int grid)"  # (a NormalFloat / FP checkpoint beside integer round-to-nearest)
        parts = [(label, g)]
        parts += [(rtn, r) for _, r in twin.iterrows()]
        same_model = df["model"] == g["model"]
        if released:  # noise matched to a checkpoint: a weight perturbation of the same checkpoint, on the same grid
            on_weights = pert.str.endswith(("-weights", "-both"))
            parts += [(f"noise ~ {label}", r) for _, r in df[same_model & on_weights & (ckpt == ckpt[i]) & _same_grid(df, g)].iterrows()]
        for ref, role in (((g["setting"], f"noise ~ {label}"),) if not released else ()) + tuple(
                (r["setting"], "noise ~ rtn") for _, r in twin.iterrows()):
            parts += [(role, r) for _, r in df[same_model & (pert != "none") & (base == ref)].iterrows()]
        for role, r in parts:
            rows.append({"model": g["model"], "calibrated": g["setting"], "role": role, "setting": r["setting"],
                         "weight_rel_error_mean": r.get("weight_rel_error_mean", float("nan")),
                         **{m: r.get(m, float("nan")) for m in metrics}})
    return pd.DataFrame(rows)


def calibrated_markdown(table: pd.DataFrame) -> str:
    lines = ["# Calibrated methods through the lens of perturbation", "",
             "Does GPTQ (AWQ) win by a smaller Δ or by where it puts it? Each calibrated setting beside its round-to-nearest "
             "twin and noise of the same per-layer variance (a perturbation whose base is that run).", ""]
    for model, g in table.groupby("model", sort=False):
        lines += [f"## {model}", "", to_markdown(g.drop(columns=["model"])), ""]
    return "\n".join(lines)
