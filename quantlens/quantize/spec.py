"""The spec data of a setting: how one part is quantized (:class:`QuantSpec`, :class:`KVSpec` — a
number format and its scale rule), how it is perturbed (:class:`PerturbSpec`), and the options of a
calibrated method, its calibration data and a released checkpoint. Each model forbids unknown fields
and is frozen; every invalid value raises, naming the offending field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Granularity = Literal["tensor", "channel", "group", "token"]
KVGranularity = Literal["token", "head", "channel"]
Distribution = Literal["gaussian", "uniform", "binary"]
MagnitudeRule = Literal["additive", "proportional", "inverse"]
Target = Literal["weights", "activations", "both", "kv"]

NONUNIFORM_P = 1.0 / 3.0  # the paper's cube-root transform



class Strict(BaseModel):
    """A frozen model that forbids unknown fields: every spec and the Setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Format = Literal["int", "fp", "nf", "km", "ggml", "iq4nl"]
LLAMA_CPP_FORMATS = ("ggml", "iq4nl")  # llama.cpp's types, quantized by its own rules (ggml.py, kquants.py)
Element = Literal["e4m3", "e5m2", "e2m3", "e3m2", "e2m1"]
ScaleType = Literal["fp32", "fp16", "e8m0", "e4m3"]
_ELEMENT_BITS = {"e4m3": 8, "e5m2": 8, "e2m3": 6, "e3m2": 6, "e2m1": 4}
_DEFAULT_ELEMENT = {8: "e4m3", 6: "e2m3", 4: "e2m1"}
_SCALE_BITS = {"fp32": 32, "fp16": 16, "e8m0": 8, "e4m3": 8}
GGML_BLOCK = 32  # llama.cpp's QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0
QK_K = 256  # llama.cpp's k-quant super-block
GRID_DEFAULTS = {"format": "int", "element": None, "scale": "fp32", "global_scale": None}
NO_FP = "no FP format has {bits} bits (FP8 e4m3/e5m2, FP6 e2m3/e3m2, FP4 e2m1)"


class _Grid(Strict):
    """The number format of a quantized part: which grid (``format``, ``element``), which scale rule
    (``scale``, ``global_scale``) — the two orthogonal pieces of :mod:`quantlens.quantize.formats`.

    ``int``: symmetric/asymmetric integers (optionally through the power transform ``transform_p``);
    ``fp``: a minifloat ``element`` (default by bits: 8 → e4m3, 6 → e2m3, 4 → e2m1); ``nf``:
    NormalFloat (2^b quantiles of a normal, blockwise absmax); ``km``: 2^b centroids per row/group
    by k-means on the values (no scale). ``scale``: fp32, fp16, ``e8m0`` (OCP MX power of two) or
    ``e4m3`` (NVFP4); ``ggml``: llama.cpp's legacy block types (:mod:`quantlens.quantize.ggml`: bits 8
    symmetric is Q8_0, bits 4/5 symmetric Q4_0/Q5_0, asymmetric Q4_1/Q5_1; blocks of 32, fp16 scale); ``global_scale``: NVFP4's second fp32 scale, over the whole ``tensor`` or per
    ``token`` (each row: activations and KV, so a token never depends on its batch)."""

    bits: int = Field(8, ge=2, le=16, description="bit width, 2..16")
    symmetric: bool = True
    transform_p: float = Field(1.0, gt=0.0, le=1.0, description="power transform exponent p; 1 = uniform, 1/3 = paper's non-uniform")
    clip_k: float | None = Field(None, gt=0.0, description="clip at k·σ of the group; None = max|x|")
    format: Format = "int"
    element: Element | None = Field(None, description="format fp: the minifloat (default by bits)")
    scale: ScaleType = "fp32"
    global_scale: Literal["tensor", "token"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_element(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format") == "fp" and data.get("element") is None:
            bits = data.get("bits", 8)
            if isinstance(bits, int) and bits in _DEFAULT_ELEMENT:
                data = {**data, "element": _DEFAULT_ELEMENT[bits]}
        return data

    @model_validator(mode="after")
    def _format_is_consistent(self) -> "_Grid":
        f = self.format
        if f == "fp":
            if self.element is None:
                raise ValueError(NO_FP.format(bits=self.bits))
            if _ELEMENT_BITS[self.element] != self.bits:
                raise ValueError(f"element {self.element} has {_ELEMENT_BITS[self.element]} bits, not {self.bits}")
        elif self.element is not None:
            raise ValueError(f"element is only valid with format 'fp' (format is {f!r})")
        if f in ("nf", "km") and self.bits > 8:
            raise ValueError(f"format {f!r}: at most 8 bits (a codebook of 2^bits entries), got {self.bits}")
        if f != "int" and self.transform_p != 1.0:
            raise ValueError(f"transform_p (the power transform) is only valid with format 'int' (format is {f!r})")
        if f in LLAMA_CPP_FORMATS:
            self._ggml_is_consistent()
        elif not self.symmetric and (f != "int" or self.scale != "fp32"):
            raise ValueError("symmetric: false is only valid with format 'int' and scale 'fp32' (or format 'ggml')")
        if f == "km" and self.scale != "fp32":
            raise ValueError("format 'km': a k-means codebook has no scale (leave scale at fp32)")
        if self.scale == "e8m0" and f not in ("int", "fp"):
            raise ValueError(f"scale 'e8m0' (OCP MX) is only valid with format 'int' or 'fp' (format is {f!r})")
        if self.scale == "e8m0" and f == "int" and self.bits != 8:
            raise ValueError(f"scale 'e8m0' with format 'int': MXINT is defined at 8 bits only, got {self.bits}")
        if self.clip_k is not None and (f == "km" or self.scale in ("e8m0", "e4m3")):
            raise ValueError(f"clip_k: clipping means nothing for format {f!r} with scale {self.scale!r} "
                             "(a k-means codebook or a power-of-two/E4M3 block scale has no free range)")
        if self.global_scale is not None and self.scale != "e4m3":
            raise ValueError("global_scale (NVFP4's second-level fp32 scale) needs scale 'e4m3'")
        return self

    def _ggml_is_consistent(self) -> None:
        """llama.cpp's types: an fp16 scale, no clipping (which type: :meth:`QuantSpec.ggml`)."""
        if self.format == "iq4nl" and (self.bits != 4 or not self.symmetric):
            raise ValueError("format 'iq4nl': IQ4_NL has 4 bits and one symmetric scale")
        if self.scale != "fp16" or self.clip_k is not None:
            raise ValueError(f"format {self.format!r}: llama.cpp's block scale is fp16 (scale: fp16) and is never clipped (no clip_k)")

    def ggml(self) -> Any:
        """The llama.cpp type (:class:`quantlens.quantize.ggml.GGMLType`) a ``ggml`` / ``iq4nl`` spec is."""
        from quantlens.quantize.ggml import ggml_type

        return ggml_type(self.bits, self.symmetric, self.format, getattr(self, "group_size", None) or GGML_BLOCK)

    @property
    def is_llama_cpp(self) -> bool:
        """One of llama.cpp's types (its own quantizers, blocks of its fixed sizes): ggml's, IQ4_NL."""
        return self.format in LLAMA_CPP_FORMATS

    @property
    def nonuniform(self) -> bool:
        """Levels not evenly spaced: the power transform, a minifloat, NormalFloat or a codebook."""
        return self.transform_p != 1.0 or self.format in ("fp", "nf", "km", "iq4nl")

    @property
    def family(self) -> str:
        """The format family the report compares: int, cuberoot / power, fp, mxfp, mxint, nvfp, nf, km."""
        if self.format == "int":
            if self.scale == "e8m0":
                return "mxint"
            if self.transform_p != 1.0:
                return "cuberoot" if abs(self.transform_p - 1 / 3) < 1e-9 else "power"
            return "int"
        if self.format == "fp":
            return "mxfp" if self.scale == "e8m0" else "nvfp" if self.scale == "e4m3" and self.global_scale else "fp"
        return self.format

    @property
    def label(self) -> str:
        """A short name of the format at its width: int4, cuberoot4, fp4-e2m1, mxfp4-e2m1, nvfp4, nf4, km3."""
        fam = self.family
        if fam == "iq4nl":
            return "iq4_nl"
        if fam == "ggml":
            return getattr(self, "mixture", None) or self.ggml().name
        return f"{fam}{self.bits}-{self.element}" if fam in ("fp", "mxfp") else f"{fam}{self.bits}"


class QuantSpec(_Grid):
    """How one kind of tensor (weights or activations) is quantized."""

    granularity: Granularity = "channel"
    group_size: int | None = Field(None, gt=0, description="only with granularity='group' (the block size)")
    mixture: Literal["q3_k_m", "q4_k_m", "q5_k_m"] | None = Field(
        None, description="llama.cpp's recipe of per-tensor types on this k-quant (quantlens.quantize.mixtures)")

    @model_validator(mode="after")
    def _group_size_matches_granularity(self) -> "QuantSpec":
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("group_size is required when granularity is 'group'")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size is only valid with granularity 'group' (granularity is {self.granularity!r})")
        if self.global_scale is not None and self.granularity != "group":
            raise ValueError("global_scale needs granularity 'group' (blocks under one tensor/token scale)")
        if self.is_llama_cpp:
            if self.granularity != "group":
                raise ValueError(f"format {self.format!r}: llama.cpp's types are blocks (granularity 'group', group_size "
                                 f"{GGML_BLOCK}, or {QK_K} for a k-quant)")
            self.ggml()
        if self.mixture is not None:
            from quantlens.quantize.mixtures import MIXTURES

            base = MIXTURES[self.mixture].default
            if self.format != "ggml" or self.ggml().name != base:
                raise ValueError(f"mixture {self.mixture}: llama.cpp's recipe on {base} (format ggml, bits {base[1]}, "
                                 f"group_size {QK_K}), not on {self.label}")
        return self

    def of_type(self, name: str) -> "QuantSpec":
        """This spec as llama.cpp's type ``name`` (q6_k, q8_0 …): a mixture's choice for one tensor."""
        from quantlens.quantize.ggml import GGML_TYPES

        t = GGML_TYPES[name]
        return self.model_copy(update={"bits": t.bits, "symmetric": t.symmetric, "format": "iq4nl" if t.rule == "iq4nl" else "ggml",
                                       "group_size": t.block, "mixture": None})

    def for_row(self, n: int) -> "QuantSpec":
        """The spec a row of ``n`` values gets: this one — or, for a llama.cpp k-quant whose super-block
        does not divide ``n``, the type llama-quantize writes instead (Q4_K → Q5_0, Q6_K → Q8_0 …)."""
        if self.format != "ggml":
            return self
        from quantlens.quantize.ggml import type_for_row

        t = type_for_row(self.ggml(), n)
        return self if t.name == self.ggml().name and self.mixture is None else self.of_type(t.name)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: the codes plus each block's scale (and zero point / minimum) spread
        over its ``group_size``; llama.cpp's types as ggml declares them (Q4_0 4.5, Q4_1 5.0, Q5_0 5.5,
        Q5_1 6.0, Q8_0 8.5, Q4_K 4.5, Q6_K 6.5625). Per-channel, per-tensor scales and NVFP4's one fp32
        tensor scale count as free (they amortise over a row or more)."""
        if self.is_llama_cpp:
            return self.ggml().bits_per_weight
        if self.granularity != "group" or self.format == "km":
            return float(self.bits)
        per_block = _SCALE_BITS[self.scale] * (1 if self.symmetric else 2)
        return self.bits + per_block / self.group_size

    def grid_fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _Grid.model_fields}


class KVSpec(_Grid):
    """How the KV cache is quantized: keys (after the rotary embedding where there is one) and
    values, per head, as a cache would hold them ([batch, heads, tokens, head_dim]).

    ``token``: one scale per token and head over head_dim (``group_size`` splits head_dim);
    ``head``: one scale per head over all its tokens and dims; ``channel``: one scale per head_dim
    channel of a head over the tokens (KIVI's choice for keys). Any format of :class:`QuantSpec`.
    """

    granularity: KVGranularity = "token"
    group_size: int | None = Field(None, gt=0, description="token granularity: groups of head_dim")

    @model_validator(mode="after")
    def _group_only_per_token(self) -> "KVSpec":
        if self.group_size is not None and self.granularity != "token":
            raise ValueError(f"group_size is only valid with granularity 'token' (granularity is {self.granularity!r})")
        if self.global_scale is not None and self.group_size is None:
            raise ValueError("global_scale needs group_size (blocks of head_dim under one per-row scale)")
        return self

    def row_spec(self) -> QuantSpec:
        """The quantizer applied along the last dim once K/V are laid out for this granularity."""
        gran = {"granularity": "group", "group_size": self.group_size} if self.group_size else {"granularity": "token"}
        fields = {k: getattr(self, k) for k in _Grid.model_fields}
        if fields["global_scale"] is not None:
            fields["global_scale"] = "token"  # one fp32 scale per row (token and head)
        return QuantSpec(**fields, **gran)


class PerturbSpec(Strict):
    """Artificial noise replacing the native quantization error Δ, with Var(noise) = Var(Δ).

    The setting's own ``weights`` / ``activations`` specs are the reference quantizers whose error
    variance the noise matches; ``target`` picks which of them are perturbed.
    """

    distribution: Distribution = "gaussian"
    rule: MagnitudeRule = "additive"
    target: Target = "both"
    seed: int = Field(0, ge=0)
    inverse_eps: float = Field(
        0.1, gt=0.0, description="'inverse' rule: noise ∝ 1/(|x| + eps·rms(x)) (assumed regulariser)"
    )
    rng: Literal["cpu", "device"] = Field(
        "cpu", description="'cpu': bit-identical noise on CPU and GPU; 'device': faster activation noise"
    )
    match: Literal["token", "batch"] = Field(
        "token",
        description="activations / KV: match the noise's std (and the inverse rule's rms) per token — independent "
        "of batching and padding — or over the real (unpadded) tokens of each batch",
    )


class GPTQSpec(Strict):
    """GPTQ's own parameters (:mod:`quantlens.quantize.gptq`); the grid is the setting's weights spec."""

    damp: float = Field(0.01, gt=0, lt=1, description="H += damp · mean(diag H) · I (the second paper: 0.01)")
    act_order: bool = Field(True, description="columns in order of decreasing Hessian diagonal (desc_act)")
    block: int = Field(128, gt=0, description="columns per lazy batch update")


class AWQSpec(Strict):
    """AWQ's own parameters (:mod:`quantlens.quantize.awq`); the grid is the setting's weights spec."""

    grid: int = Field(20, gt=0, description="α searched over {0, 1/grid, …}: AWQ's n_grid (and the clip search's)")
    clip: bool = Field(True, description="then clip each group at the range that minimises its output error (AutoAWQ's "
                       "auto_clip; not the query / key projections)")
    max_shrink: float = Field(0.5, gt=0, lt=1, description="the clip search goes down to (1 − max_shrink)·max|w|")


class CalibrationSpec(Strict):
    """The data a calibrated method (GPTQ) sees: ``samples`` windows of ``seqlen`` tokens. ``dataset``
    ``auto`` is the sweep's first text dataset — its windows after the evaluated ones (disjoint), or
    those of ``path`` (another split, e.g. WikiText-2's valid.txt) — drawn with ``seed``."""

    dataset: str = "auto"
    path: str | None = None
    samples: int = Field(128, gt=0)
    seqlen: int = Field(2048, ge=2)
    seed: int = 0


class CheckpointSpec(Strict):
    """A released quantized checkpoint of the sweep's model (:mod:`quantlens.checkpoints.released`): a hub id
    or a local folder, and the hub revision (None: the default branch) — or, for a sweep of several
    models, ``models``: each model's checkpoint (by the model's ref or name; a model without one does
    not run the setting). What it holds (method, bits, groups) is read from the checkpoint once it is
    downloaded: :meth:`Setting.described`."""

    source: str | None = Field(None, min_length=1, description="hub id (owner/name) or local folder of the quantized checkpoint")
    models: dict[str, str] | None = Field(None, description="model (ref or name) → its checkpoint's hub id or folder")
    revision: str | None = None
    method: str | None = Field(None, description="read from the checkpoint: gptq, awq, bnb, compressed-tensors")
    layout: str | None = Field(None, description="read from the checkpoint: gptq-v1, gptq-v2, awq-gemm, bnb-nf4, ct-…")

    @model_validator(mode="before")
    @classmethod
    def _models_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and data and not set(data) & set(cls.model_fields):  # {model: source, …}
            data = {"models": data}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> "CheckpointSpec":
        if (self.source is None) == (self.models is None):
            raise ValueError("checkpoint: give source (one checkpoint) or models (each model's checkpoint), not both or neither")
        if self.models is not None and not self.models:
            raise ValueError("checkpoint.models: empty")
        return self
