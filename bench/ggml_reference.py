"""quantlens' k-quants and IQ4_NL (quantlens/quantize/kquants.py) against llama.cpp's own C reference
quantizers, bit for bit, on the weights of the shared trained models.

llama.cpp's sources are not part of this repository: point ``--ggml`` at a checkout of ggml (or of
llama.cpp's ``ggml/`` folder) holding ``src/ggml-quants.c``, ``src/ggml-common.h``, ``src/ggml-impl.h``,
``src/ggml-cpu/ggml-cpu-impl.h``, ``include/ggml.h`` and ``include/ggml-cpu.h`` (e.g. ``git archive`` of
github.com/ggml-org/ggml). The script compiles ``ggml-quants.c`` with gcc (``-O2``, no ``-ffast-math``, no
``-march``: IEEE float32, no fused multiply-add — what the reference means) into a shared library under
``.ref-libs/ggml-quants/`` (git-ignored), with stubs for the four ggml symbols it references but the
reference paths never call, and calls it through ctypes:

- ``quantize_row_{q2,q3,q4,q5,q6}_K_ref`` then ``dequantize_row_*_K`` — what ``llama-quantize`` writes
  for these types without an importance matrix (``quantize_qX_K`` with ``quant_weights`` NULL);
- ``quantize_iq4_nl(…, quant_weights NULL)`` (ntry 7, llama-quantize's path) and
  ``quantize_row_iq4_nl_ref`` (ntry −1) then ``dequantize_row_iq4_nl``.

Per type and model: the exact-match fraction of the dequantized weights, the max |difference|, and
the number of weights compared. Weights whose rows do not divide into the block are skipped (llama.cpp
does not quantize them to that type either). Plus synthetic edge cases: all-zero blocks, constant
blocks, tiny ranges, a single outlier.

    .venv/bin/python bench/ggml_reference.py --ggml /path/to/ggml [--models tiny-llama,tiny-opt] [--max-rows 4096]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from quantlens.quantize import kquants  # noqa: E402

SHARED = Path(os.environ.get("QUANTLENS_SHARED_DATA", REPO.parent / "shared" / "data")) / "models"
STUBS = r"""
#include <stdlib.h>
#include <stddef.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) { (void)file; (void)line; (void)fmt; abort(); }
size_t ggml_row_size(int type, long long ne) { (void)type; (void)ne; abort(); }
const char * ggml_type_name(int type) { (void)type; return "?"; }
size_t ggml_type_size(int type) { (void)type; abort(); }
"""
# (block bytes, block elements) of each type, as ggml-common.h lays them out
LAYOUT = {"q2_k": (84, 256), "q3_k": (110, 256), "q4_k": (144, 256), "q5_k": (176, 256), "q6_k": (210, 256),
          "iq4_nl": (18, 32)}


def build(ggml: Path, out_dir: Path) -> ctypes.CDLL:
    out_dir.mkdir(parents=True, exist_ok=True)
    stub = out_dir / "stubs.c"
    stub.write_text(STUBS)
    lib = out_dir / "libggmlquants.so"
    src = ggml / "src" / "ggml-quants.c"
    if not lib.exists() or lib.stat().st_mtime < src.stat().st_mtime:
        cmd = ["gcc", "-O2", "-std=gnu11", "-fPIC", "-shared", f"-I{ggml / 'include'}", f"-I{ggml / 'src'}",
               f"-I{ggml / 'src' / 'ggml-cpu'}", str(src), str(stub), "-lm", "-o", str(lib)]
        subprocess.run(cmd, check=True)
    return ctypes.CDLL(str(lib))


def reference(lib: ctypes.CDLL, name: str, x: np.ndarray) -> np.ndarray:
    """llama.cpp's quantize → dequantize of float32 ``x`` [rows, n] under ``name``."""
    rows, n = x.shape
    nbytes, qk = LAYOUT[name.split(":")[0]]
    x = np.ascontiguousarray(x, dtype=np.float32)
    buf = np.zeros(rows * n // qk * nbytes, dtype=np.uint8)
    y = np.empty_like(x)
    fp = ctypes.POINTER(ctypes.c_float)
    px, pb, py = x.ctypes.data_as(fp), buf.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(fp)
    if name == "iq4_nl":  # llama-quantize's path: quantize_iq4_nl(src, dst, nrow, n_per_row, NULL)
        f = lib.quantize_iq4_nl
        f.argtypes = [fp, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        f(px, pb, rows, n, None)
        deq = "dequantize_row_iq4_nl"
    else:
        base = "iq4_nl" if name == "iq4_nl:ref" else name[:-1] + "K"
        f = getattr(lib, f"quantize_row_{base}_ref")
        f.argtypes = [fp, ctypes.c_void_p, ctypes.c_int64]
        f(px, pb, rows * n)
        deq = f"dequantize_row_{base}"
    g = getattr(lib, deq)
    g.argtypes = [ctypes.c_void_p, fp, ctypes.c_int64]
    g(pb, py, rows * n)
    return y


def ours(name: str, x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if name == "iq4_nl:ref":
        return kquants.iq4_nl(t, ntry=-1)[0].numpy()
    return kquants.KQUANTS[name](t)[0].numpy()


def compare(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float, int]:
    """(weights, bit-identical weights, max |a − b|, weights equal in value but not in bits: ±0)."""
    bits = a.view(np.uint32) == b.view(np.uint32)
    return a.size, int(bits.sum()), float(np.abs(a - b).max()) if a.size else 0.0, int(((a == b) & ~bits).sum())


def edge_cases(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = [np.zeros(n), np.full(n, 0.25), np.full(n, -3.0), rng.normal(0, 1e-6, n), rng.normal(0, 1e-12, n),
            np.where(np.arange(n) == 5, 7.0, rng.normal(0, 0.01, n)), rng.normal(0, 1, n),
            np.round(rng.normal(0, 4, n)), np.abs(rng.normal(0, 1, n)), -np.abs(rng.normal(0, 1, n))]
    half = np.concatenate([np.zeros(n // 2), rng.normal(0, 1, n - n // 2)])
    return np.stack(rows + [half]).astype(np.float32)


def model_weights(name: str, max_rows: int) -> list[tuple[str, np.ndarray]]:
    """Every 2-D weight of a shared model (its first ``max_rows`` rows): a trained tiny model's folder, or
    a GGUF file's (SmolLM2: ``smollm2-135m``, converted once by quantlens as a sweep converts it)."""
    from safetensors.numpy import load_file

    folder = SHARED / name
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs:
        from quantlens.model import gguf

        folder = gguf.convert(ggufs[0])
    out = []
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            if v.ndim == 2:
                out.append((k, v.astype(np.float32)[:max_rows]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ggml", type=Path, required=True, help="a ggml checkout (src/ggml-quants.c, include/)")
    ap.add_argument("--models", default="tiny-llama,tiny-opt,tiny-bloom,smollm2-135m")
    ap.add_argument("--max-rows", type=int, default=2048, help="rows per matrix (the time is in the C reference)")
    ap.add_argument("--types", default="q2_k,q3_k,q4_k,q5_k,q6_k,iq4_nl,iq4_nl:ref")
    ap.add_argument("--out", type=Path, default=REPO / ".ref-libs" / "ggml-quants")
    args = ap.parse_args()
    lib = build(args.ggml, args.out)
    mats = [("edge", edge_cases(256))] + [(f"{m}/{k}", w) for m in args.models.split(",") for k, w in model_weights(m, args.max_rows)]
    print(f"{'type':<12}{'weights':>12}{'bit-exact':>12}{'fraction':>12}{'max |diff|':>14}{'±0 only':>9}  worst matrix")
    ok = True
    for name in args.types.split(","):
        qk = LAYOUT[name.split(":")[0]][1]
        tot = same = signed0 = 0
        worst, where = 0.0, "-"
        for label, w in mats:
            if w.shape[1] % qk:
                continue
            n, s, mx, z = compare(ours(name, w), reference(lib, name, w))
            tot, same, signed0 = tot + n, same + s, signed0 + z
            if mx > worst or (s < n and where == "-"):
                worst, where = max(mx, worst), label
        ok &= same == tot
        print(f"{name:<12}{tot:>12}{same:>12}{same / max(tot, 1):>12.6f}{worst:>14.3g}{signed0:>9}  {where if same < tot else ''}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
