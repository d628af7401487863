"""The quantization libraries' own packers and dequantizers, run in a subprocess with .ref-libs/ on
its path (see tests/test_released.py): python tests/reference_packing.py INPUTS.pt OUTPUTS.pt

INPUTS.pt: {name: {"w": float32 [out, in], "bits", "group", "g_idx" (int [in]), "q", "zeros", "scales"}}
— integer weights, zero points and fp16-exact scales of a GPTQ / AWQ grid (the weight is
scales·(q − zeros) exactly, so each library's packer recovers q).

OUTPUTS.pt, per input name:
- ``gptq|<name>``: AutoGPTQ's ``QuantLinear.pack`` (qlinear_cuda, the layout with g_idx) → its qweight,
  qzeros, scales, g_idx, and the weight its own torch forward unpacks (``x = I``: out = Wᵀ exactly);
- ``awq|<name>`` (4 bits): AutoAWQ's ``WQLinear_GEMM.from_linear`` → qweight, qzeros, scales, and
  ``awq.utils.packing_utils.dequantize_gemm`` (fp16, as AutoAWQ computes it);
- ``bnb-<nf4|fp4>[-nested]|<name>``: bitsandbytes ``quantize_4bit`` → ``QuantState.as_dict(packed=True)``
  (what transformers saves) and ``dequantize_4bit``;
plus ``versions``. The packages' ``__init__`` pull in half of their ecosystem, so only the modules
used are loaded (their package made a bare namespace first).
"""

import importlib.util
import logging
import sys
import types
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402
from torch import nn  # noqa: E402


def _bare_package(name: str) -> None:
    """``name`` importable as a package whose __init__ is not run."""
    spec = importlib.util.find_spec(name)
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = pkg


def _load(name: str):
    return importlib.import_module(name)


def _bnb(out: dict, F, name: str, w: torch.Tensor) -> None:
    for kind in ("nf4", "fp4"):
        for nested in (False, True):
            packed, state = F.quantize_4bit(w.contiguous(), blocksize=64, quant_type=kind, compress_statistics=nested)
            out[f"bnb-{kind}{'-nested' if nested else ''}|{name}"] = {
                "weight": packed.clone(), **{f"weight.{k}": v.clone() for k, v in state.as_dict(packed=True).items()},
                "dequantized": F.dequantize_4bit(packed, state).clone()}


def main(src: str, dst: str) -> None:
    for pkg in ("auto_gptq", "auto_gptq.nn_modules", "auto_gptq.nn_modules.qlinear", "awq", "awq.modules", "awq.modules.linear",
                "awq.utils"):
        _bare_package(pkg)
    gptq_lin = _load("auto_gptq.nn_modules.qlinear.qlinear_cuda")
    awq_gemm = _load("awq.modules.linear.gemm")
    awq_pack = _load("awq.utils.packing_utils")
    import bitsandbytes
    import bitsandbytes.functional as F

    inputs = torch.load(src)
    out = {}
    for name, d in inputs.items():
        w, bits, group, g_idx = d["w"], d["bits"], d["group"], d["g_idx"]
        out_f, in_f = w.shape
        lin = nn.Linear(in_f, out_f, bias=False)
        lin.weight.data = w.clone()
        if d.get("bnb_only"):
            _bnb(out, F, name, w)
            continue
        # AutoGPTQ: pack(linear, scales [out, groups], zeros [out, groups], g_idx)
        q = gptq_lin.QuantLinear(bits, group, in_f, out_f, False, weight_dtype=torch.float32)
        q.pack(lin, d["scales"].t().contiguous(), d["zeros"].t().to(torch.float32).contiguous(), g_idx.to(torch.int32))
        with torch.no_grad():
            unpacked = q(torch.eye(in_f)).t().contiguous()
        out[f"gptq|{name}"] = {"qweight": q.qweight.clone(), "qzeros": q.qzeros.clone(), "scales": q.scales.clone(),
                               "g_idx": q.g_idx.clone(), "weight": unpacked}
        if bits == 4 and torch.equal(g_idx, torch.arange(in_f) // group):
            a = awq_gemm.WQLinear_GEMM.from_linear(lin, 4, group, scales=d["scales"].contiguous(),  # [groups, out], as
                                                   zeros=d["zeros"].to(torch.float32).contiguous())  # AutoAWQ's quantizer hands them
            out[f"awq|{name}"] = {"qweight": a.qweight.clone(), "qzeros": a.qzeros.clone(), "scales": a.scales.clone(),
                                  "weight": awq_pack.dequantize_gemm(a.qweight, a.qzeros, a.scales, 4, group).t().contiguous()}
        _bnb(out, F, name, w)
    import importlib.metadata as md

    ref = Path(bitsandbytes.__file__).parents[1]
    versions = {p.name.split("-")[0]: p.name.split("-")[1].removesuffix(".dist-info") for p in ref.glob("*.dist-info")}
    out["versions"] = ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or md.version("bitsandbytes")
    torch.save(out, dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
