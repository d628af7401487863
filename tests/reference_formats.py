"""The reference libraries' own quantizers, run in a subprocess with .ref-libs/ on its path (see
tests/test_formats.py): python tests/reference_formats.py INPUTS.pt OUTPUTS.pt

INPUTS.pt: {name: float32 tensor}. OUTPUTS.pt: {"<format>|<name>": dequantized float32 tensor} for
NF4 (bitsandbytes quantize_4bit / dequantize_4bit, CPU, block 64), MXFP8 e4m3/e5m2, MXFP6 e2m3/e3m2,
MXFP4 (torchao to_mx / to_dtype, FLOOR scales, block 32) and NVFP4 with and without the per-tensor
scale (torchao NVFP4Tensor, block 16), plus "versions".
"""

import logging
import sys
import warnings

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
import torchao  # noqa: E402
from torchao.prototype.mx_formats import constants  # noqa: E402
from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale  # noqa: E402

MX = {"mxfp8": torch.float8_e4m3fn, "mxfp8e5m2": torch.float8_e5m2, "mxfp6": constants.DTYPE_FP6_E2M3,
      "mxfp6e3m2": constants.DTYPE_FP6_E3M2, "mxfp4": torch.float4_e2m1fn_x2}


def main(src: str, dst: str) -> None:
    inputs = torch.load(src)
    out = {}
    for name, x in inputs.items():
        x = x.contiguous().float()
        q, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
        out[f"nf4|{name}"] = F.dequantize_4bit(q, state)
        for fmt, dt in MX.items():
            scale, data = to_mx(x, dt, 32)
            out[f"{fmt}|{name}"] = to_dtype(data, scale, dt, 32, torch.float32)
        out[f"nvfp4|{name}"] = NVFP4Tensor.to_nvfp4(x).dequantize(torch.float32)
        pts = per_tensor_amax_to_scale(x.abs().max())
        out[f"nvfp4-pts|{name}"] = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=pts).dequantize(torch.float32)
    out["nf4-table"] = F.get_4bit_type("nf4", device="cpu").float()
    out["versions"] = f"bitsandbytes {bitsandbytes.__version__}, torchao {torchao.__version__}"
    torch.save(out, dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
