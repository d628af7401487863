"""Released quantized checkpoints: read a GPTQ, AWQ, bitsandbytes 4-bit, compressed-tensors or GGUF
checkpoint of a model into that model, already loaded in 16 bits.

A setting ``{name: …, checkpoint: <hub id or folder>}`` evaluates such a checkpoint like any
other setting of the sweep (one model load per sweep; restored bit-exactly after):

- :func:`describe` reads the checkpoint's ``quantization_config`` (``config.json``, or the older
  ``quantize_config.json`` / ``quant_config.json``) into a :class:`Released`: the method, its
  layout, bits, groups, symmetry and act-order — the run's params and its weights spec. A format
  quantlens does not read is one line (:class:`ConfigError`).
- :class:`QuantizedCheckpoint` is the checkpoint with every packed linear visible as a float
  ``<module>.weight``, dequantized on read (:mod:`quantlens.checkpoints.packing` for GPTQ, AWQ and
  bitsandbytes by their documented layouts; :mod:`quantlens.checkpoints.compressed` through the
  compressed-tensors library). Per-expert checkpoints of an MoE are fused through transformers'
  conversion mapping, as a float checkpoint is (:class:`~quantlens.model.checkpoint.Checkpoint`).
- :func:`check` compares a checkpoint with the model it is meant for — config, every quantized
  layer's name and shape, every decoder-block linear present — from the safetensors headers alone
  (no tensor read), so preflight refuses another model's checkpoint, a corrupt file or a missing
  layer in one line before any evaluation.
- :func:`released_weights` reads it: the quantized layers' weights (by target name, as a
  calibrated method's are: :func:`quantlens.quantize.patch.quantize_` takes them as ``calibrated``)
  and the float tensors the checkpoint changed (AWQ folds its scales into the norms before the
  layers it scales): ``overrides``, set and restored with the weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantlens.model import gguf
from quantlens.model.checkpoint import Checkpoint
from quantlens.model.footprint import text_config
from quantlens.checkpoints import layouts as L
from quantlens.errors import ConfigError

_COMPARED = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "head_dim",
             "ffn_dim", "n_embed", "n_layer", "n_head", "d_model")


@dataclass(frozen=True)
class Released:
    """What a released checkpoint is: ``method`` (gptq, awq, bnb, compressed-tensors), ``layout``
    (gptq-v1, gptq-v2, awq-gemm, bnb-nf4, bnb-fp4, ct-pack-quantized, …) and its grid."""

    folder: str
    method: str
    layout: str
    bits: int
    group_size: int | None
    symmetric: bool
    act_order: bool
    num_format: str = "int"  # int | fp | nf: the weights spec's format
    element: str | None = None
    qconfig: dict = field(default_factory=dict, compare=False, repr=False)
    config: dict = field(default_factory=dict, compare=False, repr=False)

    def weights(self) -> dict[str, Any]:
        """The setting's weights spec (descriptive: the run's ``w_*`` params, group-size checks); the
        weights themselves are the checkpoint's, dequantized."""
        spec: dict[str, Any] = {"bits": self.bits, "format": self.num_format}
        if self.num_format in ("int", "ggml"):
            spec["symmetric"] = self.symmetric
        if self.num_format in ("ggml", "iq4nl"):  # llama.cpp's: an fp16 block scale
            spec["scale"] = "fp16"
        if self.element:
            spec["element"] = self.element
        if self.layout == "ct-nvfp4-pack-quantized":
            spec.update(scale="e4m3", global_scale="tensor")
        spec.update({"granularity": "group", "group_size": self.group_size} if self.group_size else {"granularity": "channel"})
        return spec

    def params(self) -> dict[str, Any]:
        return {"checkpoint_method": self.method, "checkpoint_layout": self.layout, "checkpoint_act_order": self.act_order}


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{what}: {path.name} cannot be read ({' '.join(str(err).split())[:120]})") from None


def describe(folder: str | Path, what: str | None = None) -> Released:
    """The checkpoint of ``folder`` as a :class:`Released`, or one line saying why it is not one quantlens reads."""
    folder = Path(folder)
    what = what or f"checkpoint {folder}"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{what}: no config.json (not a Hugging Face model folder)")
    config = _read_json(folder / "config.json", what)
    q = config.get("quantization_config")
    for lay in L.layouts().values():  # a library's own file (AutoGPTQ's, AutoAWQ's) stands for quantization_config
        if q is None and lay.legacy_file and (folder / lay.legacy_file).is_file():
            q = _read_json(folder / lay.legacy_file, what)
            q.setdefault("quant_method", lay.quant_method)
    if q is None and gguf.describe(folder) is not None:  # a GGUF file's folder: the file's own types say what is quantized
        q = {"quant_method": "gguf", "tensor_types": gguf.tensor_types(folder)}
    if not isinstance(q, dict):
        raise ConfigError(f"{what}: its config has no quantization_config: not a quantized checkpoint "
                          "(a full-precision model is a sweep model, not a setting)")
    r = L.layout(str(q.get("quant_method", "")).lower(), what).describe(q, what)
    return Released(str(folder), qconfig=q, config=config, **r)


# --- the checkpoint, its packed linears seen as float weights --------------------------------------
def layout_of(r: Released) -> L.Layout:
    return L.layout(str(r.qconfig.get("quant_method", "")).lower(), f"checkpoint {r.folder}")


class QuantizedCheckpoint(Checkpoint):
    """A quantized checkpoint whose packed linears read as float ``<module>.weight`` tensors."""

    def __init__(self, released: Released):
        try:
            super().__init__(released.folder)
        except ConfigError:
            raise ConfigError(f"checkpoint {released.folder}: no safetensors (model.safetensors or model.safetensors.index.json): "
                              "quantlens reads released checkpoints from safetensors") from None
        except Exception as err:  # safetensors' own errors: a truncated or garbled file
            raise ConfigError(f"checkpoint {released.folder}: model.safetensors is not a readable safetensors file "
                              f"({' '.join(str(err).split())[:160]})") from None
        self.released = released
        self.layout = layout_of(released)
        self.packed = self.layout.packed_modules(set(self.weight_map), released)
        for prefix, parts in self.packed.items():
            missing = [p for p in parts if p not in self.weight_map]
            if missing:
                raise ConfigError(f"checkpoint {released.folder}: {prefix} is packed but {missing[0]} is missing")
            self.weight_map.setdefault(prefix + ".weight", self.weight_map[parts[0]])
        self._virtual = {p + ".weight": p for p in self.packed}

    def is_packed(self, key: str) -> bool:
        return key in self._virtual

    def load(self, keys: list[str], device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        virtual = [k for k in keys if k in self._virtual]
        out = super().load([k for k in keys if k not in self._virtual], device, dtype)
        for k in virtual:
            prefix = self._virtual[k]
            parts = super().load(self.packed[prefix], device, None)
            w = self.dequantize(prefix, parts)
            out[k] = w.to(dtype) if dtype is not None else w
        return out

    def dequantize(self, prefix: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight [out, in] of the packed module ``prefix`` from its stored tensors."""
        r = self.released
        try:
            return self.layout.dequantize(prefix, parts, r)
        except (ValueError, KeyError, RuntimeError, StopIteration, TypeError) as err:
            raise ConfigError(f"checkpoint {r.folder}: {prefix} cannot be unpacked as {r.layout}: "
                              f"{' '.join(str(err).split())[:160] or type(err).__name__}") from None

    def header_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every stored tensor's shape, from the safetensors headers (no tensor read)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for fname in sorted(set(self.weight_map.values())):
            path = self.folder / fname
            try:
                with open(path, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    if n <= 0 or n > 100_000_000:
                        raise ValueError(f"a header of {n} bytes")
                    header = json.loads(fh.read(n))
                size = path.stat().st_size
                for k, v in header.items():
                    if k == "__metadata__":
                        continue
                    if int(v["data_offsets"][1]) + 8 + n > size:
                        raise ValueError(f"{k} ends past the end of the file (truncated?)")
                    shapes[k] = tuple(int(d) for d in v["shape"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ConfigError(f"checkpoint {self.folder}: {fname} is not a readable safetensors file ({err})") from None
        return shapes

    def weight_shape(self, prefix: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
        """The [out, in] shape a packed module's weight unpacks to, from header shapes (and, for
        bitsandbytes and compressed-tensors, a tiny stored tensor that records it)."""
        return self.layout.weight_shape(prefix, shapes, lambda which: Checkpoint.load(self, [k for k in self.packed[prefix] if which(k)], "cpu"),
                                        self.released)


# --- the checkpoint against its model --------------------------------------------------------------
def config_mismatch(released: Released, model_config: dict) -> str | None:
    """Why the checkpoint's config is not the model's (architecture or a dimension), or None."""
    a, b = text_config(released.config), text_config(model_config)
    for k in _COMPARED:
        if k in a and k in b and a[k] != b[k]:
            return f"its {k} is {a[k]!r}, the model's {b[k]!r}"
    return None


def _kinds(model: Any) -> tuple[str, str]:
    return type(model).__name__, str(getattr(model.config, "model_type", ""))


def _targets(model: Any):
    from quantlens.quantize.patch import targets
    from quantlens.quantize.settings import Setting

    return targets(model, Setting(name="checkpoint", include_routers=True, include_lm_head=True))


def check(released: Released, model: Any, ckpt: QuantizedCheckpoint | None = None) -> dict[str, Any]:
    """Compare the checkpoint with ``model`` (a loaded model or one built on the meta device) from
    headers alone; raise one ConfigError line on a mismatch. Returns what it found: the quantized
    targets (``quantized``: name → (target, where the checkpoint holds it)), the block linears the
    checkpoint keeps in float (``full_precision``)."""
    from quantlens.model.anatomy import is_conv1d, shape_of

    what = f"checkpoint {released.folder}"
    problem = config_mismatch(released, model.config.to_dict())
    if problem:
        raise ConfigError(f"{what} is of another model: {problem}")
    if gguf.describe(released.folder) is not None and not gguf.has_weights(released.folder):
        return _check_gguf_header(released, model)
    ckpt = ckpt or QuantizedCheckpoint(released)
    shapes = ckpt.header_shapes()
    kinds = _kinds(model)
    quantized, kept, used = {}, [], set()
    head = model.get_output_embeddings()
    for t in _targets(model):
        shape = tuple(shape_of(t.param))
        src = ckpt.source(f"{t.name}.weight" if t.kind != "experts" else t.name, kinds, shape)
        if src is None:
            if t.kind == "linear" and t.module is head or t.kind == "router":
                continue  # (a tied head; a router the checkpoint stores otherwise is checked by the float pass)
            raise ConfigError(f"{what} has no weight for {t.name} {shape}: not a checkpoint of this model (or a layer it drops)")
        keys = Checkpoint.keys_of(src)
        used.update(keys)
        packed = [ckpt.is_packed(k) for k in keys]
        if any(packed) and not all(packed):
            raise ConfigError(f"{what}: {t.name} mixes packed and float experts")
        got = [ckpt.weight_shape(ckpt._virtual[k], shapes) if ckpt.is_packed(k) else shapes.get(k) for k in keys]
        want = shape if t.kind != "experts" else None
        if want is not None and is_conv1d(t.module) and ckpt.is_packed(keys[0]):
            want = tuple(reversed(want))  # (a packed Conv1D unpacks to the [out, in] matrix it is)
        if want is not None and got[0] is not None and tuple(got[0]) != want:
            raise ConfigError(f"{what}: {t.name} is {tuple(got[0])} there, {want} in the model: a checkpoint of another model")
        if all(packed):
            quantized[t.name] = (t, src)
        elif t.kind != "router" and t.module is not head:  # (routers stay 16-bit, as the field's quantizers leave them)
            kept.append(t.name)
    strays = sorted(p for p in ckpt.packed if p + ".weight" not in used)
    if strays:
        raise ConfigError(f"{what} quantizes {strays[0]}, which the model does not have (or not as a linear of its blocks)"
                          + (f" — and {len(strays) - 1} more" if len(strays) > 1 else ""))
    if not quantized:
        raise ConfigError(f"{what}: none of the model's decoder-block linears is quantized in it")
    return {"quantized": quantized, "full_precision": kept}  # (the head, whatever its name — BioGPT's output_projection —, is not a block's)


def _check_gguf_header(released: Released, model: Any) -> dict[str, Any]:
    """A GGUF file not yet dequantized, checked from its header: every weight it quantizes is one of the model's."""
    params = dict(model.named_parameters())
    layout = layout_of(released)
    for prefix in layout.packed_modules(set(released.qconfig["tensor_types"]), released):
        if prefix + ".weight" not in params:
            raise ConfigError(f"checkpoint {released.folder} quantizes {prefix}, which the model does not have")
    return {"quantized": {}, "full_precision": []}


def _same_tensor(stored: torch.Tensor, base: torch.Tensor) -> bool:
    """The checkpoint holds the model's own tensor: a rounded copy of it (fp16 beside a float32
    model), or one that loading would not change (fp16 on disk, the model in bfloat16)."""
    return torch.equal(stored, base.to(stored.dtype)) or torch.equal(stored.to(base.dtype), base)


class CheckpointWeights(Mapping):
    """The quantized layers' weights of a checkpoint by target name, each dequantized when it is asked
    for (float32, then the model's dtype) and not kept: patching a model reads one layer at a time, a
    streamed one each block's when it arrives, so no copy of the whole model is held in host memory."""

    def __init__(self, ckpt: QuantizedCheckpoint, layers: dict[str, tuple]):
        self.ckpt, self.layers = ckpt, layers

    def __getitem__(self, name: str) -> torch.Tensor:
        src, shape, dtype, conv1d = self.layers[name]
        w = self.ckpt.read([src], "cpu", torch.float32)[0]
        if conv1d:  # GPT-2's Conv1D holds [in, out]; packed as the [out, in] matrix it is
            w = w.t().contiguous()
        if tuple(w.shape) != shape:
            raise ConfigError(f"checkpoint {self.ckpt.folder}: {name} unpacks to {tuple(w.shape)}, the model's is {shape}")
        return w.to(dtype)

    def __contains__(self, name: object) -> bool:  # (Mapping's would read the layer)
        return name in self.layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


@torch.no_grad()
def released_weights(model: Any, released: Released) -> tuple["CheckpointWeights", dict[str, torch.Tensor], dict[str, Any]]:
    """(weights of the quantized targets by target name — :class:`CheckpointWeights`, read layer by
    layer —, float tensors the checkpoint changes by parameter name, params)."""
    from quantlens.model.anatomy import is_conv1d, shape_of
    from quantlens.model.streaming import is_lazy

    ckpt = QuantizedCheckpoint(released)
    found = check(released, model, ckpt)
    kinds = _kinds(model)
    quantized = found["quantized"]
    weights = CheckpointWeights(ckpt, {name: (src, tuple(shape_of(t.param)), t.param.dtype, t.kind != "experts" and is_conv1d(t.module))
                                       for name, (t, src) in quantized.items()})
    rewritten = set(quantized) | {f"{q}.weight" for q in quantized}  # (an expert tensor's name is its parameter's)
    overrides: dict[str, torch.Tensor] = {}
    packed_keys = set(ckpt._virtual)
    lazy = is_lazy(model)
    base_ckpt = None
    if lazy:
        from quantlens.model.checkpoint import model_checkpoint

        base_ckpt = model_checkpoint(model)
    for name, param in model.named_parameters():
        if name in rewritten:
            continue
        src = ckpt.source(name, kinds, tuple(shape_of(param)))
        if src is None or any(k in packed_keys for k in Checkpoint.keys_of(src)):
            continue
        stored = ckpt.read([src], "cpu")[0]
        if not stored.is_floating_point() or tuple(stored.shape) != tuple(shape_of(param)):
            continue
        if lazy and param.numel() == 0:  # a streamed block's tensor: compared with the model's own checkpoint
            own = base_ckpt.source(name, kinds, tuple(shape_of(param))) if base_ckpt is not None else None
            if own is None or not _same_tensor(stored, base_ckpt.read([own], "cpu")[0].to(param.dtype)):
                raise ConfigError(f"checkpoint {released.folder} changes {name} of a streamed decoder block (AWQ folds its "
                                  "scales into the norms): placement: stream reads blocks from the model's own checkpoint, "
                                  "so use placement: single or device_map for it")
            continue
        base = param.detach().to("cpu")
        if _same_tensor(stored, base):
            continue  # the model's own tensor
        overrides[name] = stored.to(param.dtype)
    params = {**released.params(), "checkpoint_quantized_layers": len(quantized),
              "checkpoint_full_precision_layers": len(found["full_precision"]), "checkpoint_changed_tensors": len(overrides)}
    return weights, overrides, params
