"""Where the error comes from (arXiv 2506.12044, §5): layer-wise error growth, early exit and
activation patching, on the examples that break (D_large) and on controls (D_ctrl).

One patched model holds both weight versions (:func:`quantlens.quantize.patch.full_precision` swaps them by
pointer), so every batch runs once at full precision — its activations cached *for that batch
only*, in the chosen layer range — and then quantized, with hooks on both:

- **layer error**: per layer, MSE between the full-precision and the quantized outputs of the MLP
  and of the attention (each model fed its own input), ‖h(l)‖ (h = the MLP's input: the output of the block's residual norm, full
  precision — see :mod:`quantlens.model.anatomy` for pre- and post-LN), Pearson ρ(‖h(l)‖, MSE_mlp(l)) across the examples of a set, and the kurtosis of r(l);
- **early exit** (logit lens): the mean NLL when r(l) or z(l) is decoded as the model decodes its last
  hidden state (final norm if any, ``project_out`` if any, LM head), full precision and quantized; logits are reduced to NLL per batch and dropped;
- **activation patching** (D_large): the quantized model run while the output of one module type
  is replaced by its full-precision value in the layer range: ``attention``, ``mlp``, each MLP
  linear (``mlp.gate_proj`` … / ``mlp.fc1`` … / ``mlp.dense_h_to_4h`` …), the inputs of the first
  MLP linear (``<first>.input``: the gate for gated MLPs), that linear's weights in 16 bits
  (``<first>.weights_16bit``), the top 18 % of the layers entirely in 16 bits (``upper_k_16bit``),
  ``all`` (attention and MLP outputs of every layer: exactly the full-precision model) and ``none``
  (the quantized model).

"Attention output" and "MLP output" are the outputs of the attention's output projection and of
the MLP's last linear (before the residual addition, which BLOOM fuses into its modules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from quantlens.model.anatomy import Anatomy, Block, anatomy
from quantlens.quantize.patch import full_precision, patched_layers

UPPER_K_FRACTION = 0.18  # the paper keeps the top 18 % of layers in 16 bits


def block_parts(model: nn.Module) -> tuple[Block, ...]:
    """Each decoder block's attention output projection, MLP linears and residual norm: the
    model's anatomy (:mod:`quantlens.model.anatomy`)."""
    return anatomy(model).parts


def layer_range(spec: str | tuple[int, int], n_layers: int) -> range:
    """``upper_half`` (the paper's default), ``all``, ``upper_k`` (top 18 %) or ``"a:b"`` / (a, b)."""
    if isinstance(spec, tuple):
        a, b = spec
    elif spec == "upper_half":
        a, b = n_layers // 2, n_layers
    elif spec == "all":
        a, b = 0, n_layers
    elif spec == "upper_k":
        a, b = n_layers - upper_k(n_layers), n_layers
    elif isinstance(spec, str) and ":" in spec:
        a_s, b_s = spec.split(":", 1)
        a, b = int(a_s or 0), int(b_s or n_layers)
    else:
        raise ValueError(f"layers: {spec!r} is not upper_half, all, upper_k or 'a:b'")
    if not 0 <= a < b <= n_layers:
        raise ValueError(f"layers: {spec!r} gives [{a}, {b}) outside the model's {n_layers} layers")
    return range(a, b)


def upper_k(n_layers: int) -> int:
    return max(1, round(UPPER_K_FRACTION * n_layers))


def describe(r: range) -> str:
    return f"{r.start}-{r.stop - 1}"


# --- per-batch helpers --------------------------------------------------------------------------------
def _nll_per_example(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each row (fp32 logits), [b]."""
    b, t, v = logits.shape
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1), reduction="none")
    return tok.view(b, t - 1).double().sum(-1)


def _kurtosis(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    xc = x - x.mean(-1, keepdim=True)
    sq = xc.square()
    return (sq.square().mean(-1) / sq.mean(-1).square().clamp_min(1e-30)).mean(-1)


class _Hooks:
    """Register hooks for one forward and remove them all afterwards."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def output(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        def hook(m: nn.Module, args: tuple, out: Any) -> Any:
            if isinstance(out, tuple):
                new = fn(out[0])
                return None if new is None else (new, *out[1:])
            return fn(out)

        self.handles.append(module.register_forward_hook(hook))

    def input(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        def hook(m: nn.Module, args: tuple) -> Any:
            new = fn(args[0])
            return None if new is None else (new, *args[1:])

        self.handles.append(module.register_forward_pre_hook(hook))

    def __enter__(self) -> "_Hooks":
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


def _batches(seqs: list[list[int]], batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Equal-length groups (no padding), in batches: (indices into seqs, [b, T] ids)."""
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(len(s), []).append(i)
    for length in sorted(by_len):
        idx = by_len[length]
        for k in range(0, len(idx), batch_size):
            chunk = idx[k : k + batch_size]
            yield chunk, torch.tensor([seqs[i] for i in chunk], dtype=torch.long)


# --- the analysis -------------------------------------------------------------------------------------
@dataclass
class Explanation:
    layer_error: pd.DataFrame  # set, layer, mse_mlp, mse_attn, h_norm, rho_h_mse, r_kurtosis, n_examples
    early_exit: pd.DataFrame  # set, precision, source, layer, nll
    patching: pd.DataFrame  # patched, layers, nll, ppl, n_examples (D_large)
    per_example: pd.DataFrame  # set, example index, precision, nll (final) — for exactness checks


def _with_mlp(parts: tuple[Block, ...], rng: range) -> list[int]:
    """The layers of ``rng`` whose block has an MLP (all but a hybrid's blocks of one token mixer:
    Mamba's, Nemotron-H's mixer blocks)."""
    return [layer for layer in rng if parts[layer].has_mlp]


def _first_mlp_name(parts: tuple[Block, ...], rng: range) -> str | None:
    """The leaf name of the range's first MLP layer (each layer patches its own: an MoE block's is its experts), None without MLPs."""
    layers = _with_mlp(parts, rng)
    return parts[layers[0]].first_mlp[0] if layers else None


def patch_variants(parts: tuple[Block, ...], rng: range) -> list[str]:
    """The activation-patching variants for ``rng``; a model without MLPs (Mamba) patches its mixers only."""
    layers = _with_mlp(parts, rng)
    if not layers:
        return ["none", "all", "attention", "upper_k_16bit"]
    first = parts[layers[0]].first_mlp[0]
    common = [k for k in parts[layers[0]].mlp if all(k in parts[layer].mlp for layer in layers)]
    names = ["none", "all", "attention", "mlp"] + [f"mlp.{k}" for k in common]
    return names + [f"{first}.input", f"{first}.weights_16bit", "upper_k_16bit"]


@torch.inference_mode()
def _full_precision_pass(model: nn.Module, body: Anatomy, rng: range, ids: torch.Tensor, cache: dict, record: Callable,
                         shape: Callable) -> torch.Tensor:
    """Full precision: cache the range's module values, record the norms, kurtosis and early exits; the NLLs."""
    parts, decode, blocks, n_layers = body.parts, body.decode, body.blocks, len(body.parts)
    with full_precision(model), _Hooks() as hk:
        for layer in rng:
            p = parts[layer]
            for key, m in _sum_parts(p):
                hk.output(m, lambda x, l=layer, key=key: cache.__setitem__((l, key), shape(x).clone()))  # (Falcon adds to mlp_out in place)
            for k, lin in p.mlp.items():
                hk.output(lin, lambda x, l=layer, k=k: cache.__setitem__((l, f"mlp.{k}"), shape(x).clone()))
            if p.has_mlp:
                hk.input(p.first_mlp[1], lambda x, l=layer: cache.__setitem__((l, "first_input"), shape(x).clone()))
        for layer in range(n_layers):
            p = parts[layer]
            (hk.output if p.h_site[1] == "output" else hk.input)(p.h_site[0], lambda x, l=layer: (record("h_norm", l, shape(x).float().norm(dim=-1).mean(-1)), None)[1])
            hk.input(p.residual_site, lambda x, l=layer: (record("r_kurtosis", l, _kurtosis(shape(x))), None)[1])
            if layer in rng:
                hk.input(p.residual_site, lambda x, l=layer: (record("exit_full_r", l, _nll_per_example(decode(shape(x)), ids)), None)[1])
                hk.output(blocks[layer], lambda x, l=layer: (record("exit_full_z", l, _nll_per_example(decode(_decodable(body, shape, x)), ids)), None)[1])
        return _nll_per_example(model(input_ids=ids, use_cache=False).logits, ids)


@torch.inference_mode()
def _quantized_pass(model: nn.Module, body: Anatomy, rng: range, ids: torch.Tensor, cache: dict, record: Callable,
                    shape: Callable) -> torch.Tensor:
    """Quantized: each module's error against the full-precision cache, early exits; the NLLs."""
    parts, decode, blocks = body.parts, body.decode, body.blocks
    with _Hooks() as hk:
        for layer in rng:
            p = parts[layer]
            _summed_error(hk, p.mixer_outs, "attention", "mse_attention", layer, cache, record, shape)
            _summed_error(hk, p.mlp_outs, "mlp_out", "mse_mlp", layer, cache, record, shape)
            hk.input(p.residual_site, lambda x, l=layer: (record("exit_quant_r", l, _nll_per_example(decode(shape(x)), ids)), None)[1])
            hk.output(blocks[layer], lambda x, l=layer: (record("exit_quant_z", l, _nll_per_example(decode(_decodable(body, shape, x)), ids)), None)[1])
        return _nll_per_example(model(input_ids=ids, use_cache=False).logits, ids)


def _decodable(body: Anatomy, shape: Callable, z: torch.Tensor) -> torch.Tensor:
    """A block's output as :meth:`Anatomy.decode` takes it: every stream of a model that carries
    several (Gemma-3n's, merged as its forward merges them), else ``[b, T, H]``."""
    return z if body.streams is not None else shape(z)


def _sum_parts(p: Block) -> list[tuple[str, nn.Module]]:
    """(cache key, module) of the outputs that sum to a block's token-mixer and MLP contributions:
    ``attention``, ``attention1`` (Falcon-H1's Mamba-2 beside it), ``mlp_out``, ``mlp_out1`` (Granite-4's shared MLP)."""
    return [(f"{base}{j or ''}", m) for base, mods in (("attention", p.mixer_outs), ("mlp_out", p.mlp_outs)) for j, m in enumerate(mods)]


def _summed_error(hk: "_Hooks", modules: tuple[nn.Module, ...], base: str, key: str, layer: int, cache: dict, record: Callable,
                  shape: Callable) -> None:
    """Record ``key``: the mean squared error of the summed outputs of ``modules`` (one contribution
    to the stream) against their full-precision cache, once the last of them has run."""
    acc: dict[str, Any] = {}

    def on(j: int) -> Callable[[torch.Tensor], None]:
        def f(x: torch.Tensor) -> None:
            d = shape(x).float() - cache[(layer, f"{base}{j or ''}")].float()
            acc["d"] = d if "d" not in acc else acc["d"] + d
            acc["n"] = acc.get("n", 0) + 1
            if acc["n"] == len(modules):
                record(key, layer, acc.pop("d").square().mean((1, 2)))
                acc["n"] = 0
        return f

    for j, m in enumerate(modules):
        hk.output(m, on(j))


def _example_rows(set_name: str, idx: list[int], n_pred: int, nll_full: torch.Tensor, nll_quant: torch.Tensor,
                  per: dict[str, torch.Tensor], n_layers: int, rows_ex: list[dict], rows_err: list[dict]) -> None:
    """The batch's per-example NLLs (``rows_ex``) and per-(example, layer) numbers (``rows_err``)."""
    for j, i in enumerate(idx):
        rows_ex.append({"set": set_name, "example": i, "n_tokens": n_pred, "nll_full": float(nll_full[j]) / n_pred, "nll_quantized": float(nll_quant[j]) / n_pred})
        for layer in range(n_layers):
            row = {"set": set_name, "example": i, "layer": layer, "n_tokens": n_pred}
            for key, tab in per.items():
                row[key] = float(tab[j, layer])
            rows_err.append(row)


def explain(
    model: nn.Module,
    sets: dict[str, list[list[int]]],
    *,
    layers: str | tuple[int, int] = "upper_half",
    batch_size: int = 8,
    patch_set: str = "large",
    progress: Callable[[int, int], None] | None = None,
) -> Explanation:
    """Run the three analyses on a model patched with a setting (``quantize_`` first; patch with
    ``keep_originals_on="same"`` on a GPU so that switching weight versions stays on the device).

    ``sets``: set name → token sequences (``{"large": [...], "ctrl": [...]}``); activation patching
    runs on ``patch_set``. Nothing of a batch outlives it but per-example numbers.
    """
    body = anatomy(model)
    parts = body.parts
    n_layers = len(parts)
    rng = layer_range(layers, n_layers)
    device = model.get_input_embeddings().weight.device
    variants = patch_variants(parts, rng)
    rows_err, rows_exit, rows_patch, rows_ex = [], [], [], []
    total = sum(len(v) for v in sets.values())
    done = 0

    for set_name, seqs in sets.items():
        if not seqs:
            continue
        for idx, ids_cpu in _batches(seqs, batch_size):
            ids = ids_cpu.to(device)
            b, t = ids.shape
            shape = lambda x: x.reshape(b, t, -1)  # noqa: E731 — OPT's MLP sees [b·T, H]
            cache: dict[tuple[int, str], torch.Tensor] = {}
            per: dict[str, torch.Tensor] = {}

            def record(key: str, layer: int, v: torch.Tensor) -> None:
                per.setdefault(key, torch.full((b, n_layers), float("nan"), dtype=torch.float64, device=device))[:, layer] = v.double()

            nll_full = _full_precision_pass(model, body, rng, ids, cache, record, shape)
            nll_quant = _quantized_pass(model, body, rng, ids, cache, record, shape)
            n_pred = t - 1
            _example_rows(set_name, idx, n_pred, nll_full, nll_quant, per, n_layers, rows_ex, rows_err)

            # 3. activation patching on the set that breaks
            if set_name == patch_set:
                for variant in variants:
                    nll = _patched_nll(model, ids, parts, rng, variant, cache, shape, nll_quant, nll_full)
                    for j, i in enumerate(idx):
                        rows_patch.append({"patched": variant, "example": i, "n_tokens": n_pred, "nll_sum": float(nll[j])})
            done += len(idx)
            if progress:
                progress(done, total)

    per_layer = _per_layer(rows_err)
    return Explanation(
        layer_error=_layer_error(per_layer, rng),
        early_exit=_early_exit(per_layer, rng),
        patching=_patching(pd.DataFrame(rows_patch), variants, rng, n_layers),
        per_example=pd.DataFrame(rows_ex),
    )


@torch.inference_mode()
def _patched_nll(model: nn.Module, ids: torch.Tensor, parts: tuple[Block, ...], rng: range, variant: str,
                 cache: dict, shape: Callable, nll_quant: torch.Tensor, nll_full: torch.Tensor) -> torch.Tensor:
    if variant == "none":
        return nll_quant
    n_layers = len(parts)
    first = _first_mlp_name(parts, rng)
    if variant == "upper_k_16bit":
        top = range(n_layers - upper_k(n_layers), n_layers)
        names = [n for layer in top for n in parts[layer].weight_names()]  # every weight of those blocks
        with full_precision(model, _patched_names(model, names)):
            return _nll_per_example(model(input_ids=ids, use_cache=False).logits, ids)
    if variant == f"{first}.weights_16bit":
        names = [n for layer in _with_mlp(parts, rng) for n in parts[layer].first_mlp_weights()]
        with full_precision(model, _patched_names(model, names), activations=False):
            return _nll_per_example(model(input_ids=ids, use_cache=False).logits, ids)
    layers = range(n_layers) if variant == "all" else rng
    if variant == "all" and any((layer, key) not in cache for layer in layers for key, _ in _sum_parts(parts[layer])):
        # the cache holds the range only: patching every layer is the full-precision model by definition
        # only if we can replace every layer; recompute with a full-range cache
        return _all_layers_patched(model, ids, parts, shape)
    with _Hooks() as hk:
        for layer in layers:
            p = parts[layer]
            replace = lambda key, l: (lambda x: cache[(l, key)].reshape(x.shape).to(x.dtype, copy=True))  # noqa: E731 — a copy: models edit outputs in place
            for key, m in _sum_parts(p):
                if variant == "all" or variant == ("attention" if key.startswith("attention") else "mlp"):
                    hk.output(m, replace(key, layer))
            if variant.startswith("mlp.") and variant != "mlp" and p.has_mlp:
                hk.output(p.mlp[variant[4:]], replace(variant, layer))
            if variant == f"{first}.input" and p.has_mlp:
                hk.input(p.first_mlp[1], replace("first_input", layer))
        return _nll_per_example(model(input_ids=ids, use_cache=False).logits, ids)


@torch.inference_mode()
def _all_layers_patched(model: nn.Module, ids: torch.Tensor, parts: tuple[Block, ...], shape: Callable) -> torch.Tensor:
    """``all`` when the analysed range is not every layer: cache attention and MLP outputs of every
    layer at full precision, then replace them all in the quantized model."""
    cache: dict[tuple[int, str], torch.Tensor] = {}
    with full_precision(model), _Hooks() as hk:
        for layer, p in enumerate(parts):
            for key, m in _sum_parts(p):
                hk.output(m, lambda x, l=layer, key=key: cache.__setitem__((l, key), x.clone()))
        model(input_ids=ids, use_cache=False)
    with _Hooks() as hk:
        for layer, p in enumerate(parts):
            for key, m in _sum_parts(p):
                hk.output(m, lambda x, l=layer, key=key: cache[(l, key)].to(x.dtype, copy=True))
        return _nll_per_example(model(input_ids=ids, use_cache=False).logits, ids)


def _patched_names(model: nn.Module, names: list[str]) -> list[str]:
    """Only the names that the current setting changed (a weight-only setting patches no activations)."""
    return sorted(set(names) & patched_layers(model))


# --- reductions -----------------------------------------------------------------------------------------
def _pearson(a: pd.Series, b: pd.Series) -> float:
    from quantlens.analysis.per_example import pearson

    return pearson(a.to_numpy(), b.to_numpy())


def _per_layer(rows: list[dict]) -> pd.DataFrame:
    """The per-(example, layer) rows as a frame, with every error column (a model without MLPs — Mamba — records no MLP error)."""
    per = pd.DataFrame(rows)
    for key in ("mse_mlp", "mse_attention"):
        if key not in per:
            per[key] = float("nan")
    return per


def _layer_error(per: pd.DataFrame, rng: range) -> pd.DataFrame:
    rows = []
    for (set_name, layer), g in per.groupby(["set", "layer"], sort=True):
        in_range = layer in rng
        rows.append({
            "set": set_name, "layer": layer, "in_range": in_range,
            "mse_mlp": g["mse_mlp"].mean() if in_range else float("nan"),
            "mse_attention": g["mse_attention"].mean() if in_range else float("nan"),
            "h_norm": g["h_norm"].mean(),
            "rho_h_mse": _pearson(g["h_norm"], g["mse_mlp"]) if in_range else float("nan"),
            "r_kurtosis": g["r_kurtosis"].mean(),
            "n_examples": len(g),
        })
    return pd.DataFrame(rows)


def _early_exit(per: pd.DataFrame, rng: range) -> pd.DataFrame:
    rows = []
    for (set_name, layer), g in per.groupby(["set", "layer"], sort=True):
        if layer not in rng:
            continue
        w = g["n_tokens"]
        for precision, tag in (("full", "full"), ("quantized", "quant")):
            for source in ("r", "z"):
                rows.append({"set": set_name, "precision": precision, "source": source, "layer": layer,
                             "nll": float(g[f"exit_{tag}_{source}"].sum() / w.sum())})
    return pd.DataFrame(rows)


def _patching(rows: pd.DataFrame, variants: list[str], rng: range, n_layers: int) -> pd.DataFrame:
    if rows.empty:
        return pd.DataFrame(columns=["patched", "layers", "nll", "ppl", "n_examples"])
    out = []
    for v in variants:
        g = rows[rows["patched"] == v]
        nll = float(g["nll_sum"].sum() / g["n_tokens"].sum())
        span = {"none": "-", "all": describe(range(n_layers)), "upper_k_16bit": describe(range(n_layers - upper_k(n_layers), n_layers))}.get(v, describe(rng))
        out.append({"patched": v, "layers": span, "nll": nll, "ppl": math.exp(nll), "n_examples": len(g)})
    return pd.DataFrame(out)
