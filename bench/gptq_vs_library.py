"""quantlens' GPTQ against field libraries' GPTQ on the same weights W and Hessians H.

Three modes, two virtual environments (the libraries cannot share the project's pins):

    # 1. project venv: W and H = 2/n XᵀX (quantlens' HessianAccumulator, forward pre-hooks) of a few
    #    linear layers of the shared tiny-llama on 32 random windows of 128 tokens of WikiText-2
    .venv/bin/python bench/gptq_vs_library.py dump --out /tmp/gptq_cmp/dump.pt
    # 2. library venv (scripts/gptq_library_venv.sh): the libraries' GPTQ on each (W, H) and config
    /tmp/gptq-lib-venv/bin/python bench/gptq_vs_library.py compare --dump /tmp/gptq_cmp/dump.pt --out /tmp/gptq_cmp/lib.pt
    # 3. project venv: quantlens' gptq_quantize on the same (W, H); the table
    .venv/bin/python bench/gptq_vs_library.py report --dump /tmp/gptq_cmp/dump.pt --lib /tmp/gptq_cmp/lib.pt

Libraries (``compare``):

- ``llmc``: llm-compressor's ``quantize_weight`` with the default weight observer (memoryless min-max on the
  original weights) — static group scales; its act-order is ``actorder="weight"`` (columns in act order,
  groups stay in original column order); ``actorder="group"`` (dynamic) was removed from this version.
- ``agptq``: AutoGPTQ 0.7.1's ``GPTQ.fasterquant`` (the original algorithm: a group's scale found from the
  weights when the group starts, groups in act order with ``desc_act``), ``static_groups=False``.
- ``agptq-static``: the same with ``static_groups=True`` (scales from the original weights: llm-compressor's
  convention — a check that ``llmc`` is driven right).
- ``agptq-b32``: AutoGPTQ with ``blocksize`` = the group size (group-32 configs only). AutoGPTQ finds a
  group's scale from ``W[:, i1+i : i1+i+g]``, the matrix as of the *block's* start (the block's own updates
  live in its copy ``W1``); quantlens does the same (it used the error-updated ``W1`` before this bench found
  the difference), so it equals ``agptq`` at block 128 and differs from ``agptq-b32`` by the block size alone.

``report`` also runs ``ql-libgrid``: quantlens' own ``gptq_quantize`` with only its grid swapped for the
libraries' (symmetric: 2^b levels −2^(b−1)..2^(b−1)−1, step max|w|/(2^(b−1) − ½); asymmetric: the range
[min, max] widened to include 0), to separate a grid convention from the algorithm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

SHARED = Path(os.environ.get("QUANTLENS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# name: (bits, symmetric, group_size or None for per channel, act_order)
CONFIGS: dict[str, tuple[int, bool, int | None, bool]] = {
    "w4-g128-sym-act": (4, True, 128, True),
    "w4-g128-sym-noact": (4, True, 128, False),
    "w3-g128-asym-act": (3, False, 128, True),
    "w4-ch-asym-act": (4, False, None, True),
    # extras: where the conventions part
    "w4-ch-asym-noact": (4, False, None, False),
    "w4-g128-asym-noact": (4, False, 128, False),
    "w3-g32-asym-act": (3, False, 32, True),
    "w3-g32-asym-noact": (3, False, 32, False),
}
DAMP, BLOCK = 0.01, 128
LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj",
          "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.down_proj"]


# --- dump (project venv) -------------------------------------------------------------------------
@torch.no_grad()
def dump(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlens.quantize.gptq import HessianAccumulator

    model_dir = Path(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(tok(Path(args.text).read_text(encoding="utf-8"))["input_ids"], dtype=torch.long)
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, ids.numel() - args.seqlen, (args.samples,), generator=g)
    windows = torch.stack([ids[s:s + args.seqlen] for s in starts.tolist()])
    mods = dict(model.named_modules())
    accs, hooks = {}, []
    for name in LAYERS:
        m = mods[name]
        accs[name] = acc = HessianAccumulator(m.in_features)
        hooks.append(m.register_forward_pre_hook(lambda _m, a, acc=acc: acc.add(a[0])))
    for i in range(0, len(windows), 8):
        model(input_ids=windows[i:i + 8], use_cache=False)
    for h in hooks:
        h.remove()
    out = {"meta": {"model": str(model_dir), "text": str(args.text), "samples": args.samples, "seqlen": args.seqlen,
                    "seed": args.seed, "torch": str(torch.__version__)},
           "layers": {n: {"w": mods[n].weight.detach().float().clone(), "h": accs[n].h.clone(), "n": accs[n].n}
                      for n in LAYERS}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out)
    for n, d in out["layers"].items():
        dead = int((torch.diag(d["h"]) == 0).sum())
        print(f"{n}: W {tuple(d['w'].shape)}, H over {d['n']} rows, dead columns {dead}")
    print(f"saved {args.out}")


# --- compare (library venv) ----------------------------------------------------------------------
def _llmc(w: torch.Tensor, h: torch.Tensor, bits: int, sym: bool, group: int | None, act: bool) -> torch.Tensor:
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.observers import Observer

    qa = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if group else "channel",
                          group_size=group, actorder="weight" if act else None)
    obs = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=qa)  # GPTQModifier's default
    obs(w.clone())
    qp = obs.get_qparams()
    q, _loss, fallback = quantize_weight(w.clone()[None], h.clone()[None], qp["scale"][None], qp["zero_point"][None],
                                         None, qa, blocksize=BLOCK, percdamp=DAMP)
    assert not bool(fallback.any()), "llm-compressor fell back to RTN (H not positive definite)"
    return q[0]


def _import_autogptq():
    """AutoGPTQ's quantization subpackage, without the package __init__ (whose model classes need a
    transformers 4 API that this venv's transformers no longer has); its code runs unchanged."""
    import importlib.util
    import types

    if "auto_gptq" not in sys.modules:
        spec = importlib.util.find_spec("auto_gptq")
        stub = types.ModuleType("auto_gptq")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["auto_gptq"] = stub
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # fasterquant calls it unconditionally
    from auto_gptq.quantization.gptq import GPTQ

    return GPTQ


def _agptq(w: torch.Tensor, h: torch.Tensor, n: int, bits: int, sym: bool, group: int | None, act: bool, *,
           static: bool = False, block: int = BLOCK) -> torch.Tensor:
    GPTQ = _import_autogptq()
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = w.clone()
    g = GPTQ(layer)
    g.H, g.nsamples = h.clone(), n
    g.quantizer.configure(bits, perchannel=True, sym=sym, mse=False)
    g.fasterquant(blocksize=block, percdamp=DAMP, group_size=group or -1, actorder=act, static_groups=static)
    return layer.weight.data.clone()


def compare(args: argparse.Namespace) -> None:
    import importlib.metadata as md
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    d = torch.load(args.dump)
    res: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, L in d["layers"].items():
        w, h, n = L["w"], L["h"], L["n"]
        for cfg, (bits, sym, group, act) in CONFIGS.items():
            runs = {"llmc": lambda: _llmc(w, h, bits, sym, group, act),
                    "agptq": lambda: _agptq(w, h, n, bits, sym, group, act),
                    "agptq-static": lambda: _agptq(w, h, n, bits, sym, group, act, static=True)}
            if group is not None and group < BLOCK:
                runs["agptq-b32"] = lambda: _agptq(w, h, n, bits, sym, group, act, block=group)
            if group is None:
                runs.pop("agptq-static")  # static groups mean nothing per channel
            for lib, fn in runs.items():
                res.setdefault(lib, {}).setdefault(name, {})[cfg] = fn().float()
        print(f"{name}: done", flush=True)
    versions = {p: md.version(p) for p in ("torch", "transformers", "llmcompressor", "compressed-tensors", "auto-gptq")}
    torch.save({"versions": versions, "results": res}, args.out)
    print("versions:", versions)
    print(f"saved {args.out}")


# --- report (project venv) -----------------------------------------------------------------------
def _libgrid():
    """Replacements for quantlens.quantize.gptq._params / _round with the libraries' grid (module doc)."""
    from quantlens.quantize.quant import MIN_SCALE

    def params(w, spec):
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        if spec.symmetric:
            amax = torch.maximum(-lo, hi)
            return (2 * amax / (2**spec.bits - 1)).clamp_min(MIN_SCALE), None
        scale = ((hi - lo) / (2**spec.bits - 1)).clamp_min(MIN_SCALE)
        return scale, torch.round(-lo / scale)

    def rnd(w, scale, zero, spec):
        s = scale.unsqueeze(-1) if w.dim() == 2 else scale
        if zero is None:
            half = 2 ** (spec.bits - 1)
            return torch.round(w / s).clamp_(-half, half - 1).mul_(s)
        z = zero.unsqueeze(-1) if w.dim() == 2 else zero
        return (torch.round(w / s) + z).clamp_(0, 2**spec.bits - 1).sub_(z).mul_(s)

    return params, rnd


def report(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import quantlens.quantize.gptq as G
    from quantlens.quantize.quant import quantize
    from quantlens.quantize.settings import QuantSpec

    torch.set_num_threads(args.threads)
    d = torch.load(args.dump)
    lib = torch.load(args.lib)
    res = lib["results"]
    rows = []
    for name, L in d["layers"].items():
        w, h = L["w"], L["h"]
        for cfg, (bits, sym, group, act) in CONFIGS.items():
            spec = QuantSpec(bits=bits, symmetric=sym, granularity="group" if group else "channel", group_size=group)
            ql = G.gptq_quantize(w, h, spec, damp=DAMP, block=BLOCK, act_order=act)
            orig = G._params, G._round
            G._params, G._round = _libgrid()
            try:
                ql_lg = G.gptq_quantize(w, h, spec, damp=DAMP, block=BLOCK, act_order=act)
            finally:
                G._params, G._round = orig
            rtn = quantize(w, spec)
            step = rtn.scale.repeat_interleave(group, dim=1) if group else rtn.scale.reshape(-1, 1).expand_as(w)
            e_ql, e_lg = G.reconstruction_error(w, ql, h), G.reconstruction_error(w, ql_lg, h)
            e_rtn = G.reconstruction_error(w, rtn.xq, h)
            for ours_name, ours, e_ours in (("ql", ql, e_ql), ("ql-libgrid", ql_lg, e_lg)):
                for ln in res:
                    if cfg not in res[ln].get(name, {}):
                        continue
                    q = res[ln][name][cfg]
                    diff = (ours - q).abs()
                    e_lib = G.reconstruction_error(w, q, h)
                    rows.append({"layer": name.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", ""),
                                 "config": cfg, "ours": ours_name, "lib": ln,
                                 "max_abs": float(diff.max()), "max_steps": float((diff / step).max()),
                                 "frac_diff": float((diff > 0.5 * step).float().mean()),
                                 "frac_neq": float((diff > 0).float().mean()),
                                 "err_ours": e_ours, "err_lib": e_lib, "err_rtn": e_rtn,
                                 "ours_over_lib": e_ours / e_lib, "ours_over_rtn": e_ours / e_rtn,
                                 "lib_over_rtn": e_lib / e_rtn})
    print("versions:", lib["versions"], "| dump:", d["meta"])
    hdr = f"{'layer':<16}{'config':<20}{'ours':<11}{'lib':<13}{'max|Δ|':>9}{'steps':>7}{'%lvl≠':>8}{'%≠':>8}" \
          f"{'err_ours':>11}{'err_lib':>11}{'ours/lib':>9}{'ours/rtn':>9}{'lib/rtn':>9}"
    want = set(args.ours)
    print(hdr)
    for r in rows:
        if r["ours"] not in want:
            continue
        print(f"{r['layer']:<16}{r['config']:<20}{r['ours']:<11}{r['lib']:<13}{r['max_abs']:>9.2e}{r['max_steps']:>7.2f}"
              f"{100 * r['frac_diff']:>7.2f}%{100 * r['frac_neq']:>7.2f}%{r['err_ours']:>11.4g}{r['err_lib']:>11.4g}"
              f"{r['ours_over_lib']:>9.4f}{r['ours_over_rtn']:>9.4f}{r['lib_over_rtn']:>9.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"saved {args.json}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("dump")
    a.add_argument("--model", default=str(SHARED / "models" / "tiny-llama"))
    a.add_argument("--text", default=str(SHARED / "wikitext2" / "valid.txt"),
                   help="calibration text (the shared data has no WikiText-2 train split; valid.txt is the models' training text)")
    a.add_argument("--samples", type=int, default=32)
    a.add_argument("--seqlen", type=int, default=128)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default="/tmp/gptq_cmp/dump.pt")
    b = sub.add_parser("compare")
    b.add_argument("--dump", default="/tmp/gptq_cmp/dump.pt")
    b.add_argument("--out", default="/tmp/gptq_cmp/lib.pt")
    b.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("report")
    c.add_argument("--dump", default="/tmp/gptq_cmp/dump.pt")
    c.add_argument("--lib", default="/tmp/gptq_cmp/lib.pt")
    c.add_argument("--ours", nargs="+", default=["ql", "ql-libgrid"], help="which quantlens variants to print")
    c.add_argument("--json", default=None)
    c.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    {"dump": dump, "compare": compare, "report": report}[args.mode](args)


if __name__ == "__main__":
    main()
