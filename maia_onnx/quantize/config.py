"""``QuantizeConfig``: every option of ``maia-onnx quantize`` in one frozen, validated dataclass.

The CLI builds it from its options, the Python API from keyword arguments, batch steps from job-file
dicts (``from_dict`` / ``to_dict``); every bad value or impossible combination is refused here, before any
model is read, with a one-line ``InvalidOptionError``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

from maia_onnx.calib import check_method
from maia_onnx.data import data_kind
from maia_onnx.errors import InvalidOptionError
from maia_onnx.formats.mx import SMX_SUB_BLOCK
from maia_onnx.formats.registry import FOUR_BIT, KV_CACHE_FORMATS, MX_FORMS, ROUNDINGS, FormatSpec, get_format
from maia_onnx.passes.kv_cache import GRANULARITIES as KV_GRANULARITIES
from maia_onnx.passes.mixed_precision import KEEP_DTYPES
from maia_onnx.passes.quantize_fp8 import GRANULARITIES

_PATH_FIELDS = ("calib", "scales", "emit_scales", "report_path", "tokenizer", "emit_checkpoint")
# fields a job file may spell with the wrong type; None is allowed where the default is None
_TYPES = {
    int: ("block_size", "num_samples", "batch_size", "seed", "eval_samples", "seq_len"),
    float: ("percentile", "target_cosine"),
    bool: ("embeddings", "weights_only", "attention", "qat", "evaluate", "show_progress", "external_data", "hadamard"),
    str: ("format", "granularity", "mx_form", "rounding", "method", "kv_cache", "kv_granularity", "keep_dtype",
          "activation_scheme") + _PATH_FIELDS,
}


_NULLABLE = ("block_size", "num_samples", "target_cosine", "external_data", "kv_cache", "activation_scheme") + _PATH_FIELDS
ACTIVATION_SCHEMES = ("static", "dynamic", "none")  # of --emit-checkpoint (compressed-tensors input activations)


def _image_size(value) -> tuple[int, int] | None:
    """``(H, W)`` from a pair or an ``"H,W"`` string (CLI, job files); a bad value is a one-line error."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        size = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise InvalidOptionError(f"--image-size {value!r}: write two positive integers H,W (e.g. 224,224)")
    return size


@dataclass(frozen=True)
class QuantizeConfig:
    """What to quantize into and how; see ``maia-onnx quantize --help`` for each option."""

    format: str = "fp8-e4m3"  # a name of maia_onnx.formats.registry.FORMATS
    # weights
    granularity: str = "channel"  # FP8 weight scales: channel | tensor | block
    block_size: int | None = None  # FP8 --granularity block, or the MX block (default: the format's)
    mx_form: str = "ort"  # OCP MX weight encoding: ort (float32 power-of-two scales) | standard (E8M0 scales)
    exclude: tuple[str, ...] = ()  # fnmatch patterns of nodes / layers left unquantized
    embeddings: bool = False  # FP8: also Gather tables, per-row scales
    rounding: str = "rtn"  # 4-bit weights: rtn (round to nearest) | gptq (error-compensating, from calibration Hessians)
    hadamard: bool = False  # mxfp4 / fp4-e4m3: block Hadamard rotation of layer inputs where it lowers the weight error
    # activations
    weights_only: bool = False  # False: activations are quantized too (where the format allows)
    attention: bool = True  # quantize the attention matmuls (Q.K^T, P.V)
    calib: str | None = "random"  # .npz | directory of .npz | text:FILE | images:DIR | "random" | None (weights only)
    tokenizer: str | None = None  # text:FILE calibration: Hugging Face tokenizer dir (default: the model's hf: dir)
    seq_len: int = 128  # text:FILE calibration: tokens per sample at most
    image_size: tuple[int, int] | None = None  # images:DIR calibration: H, W (default: the graph's or preprocessor's)
    method: str = "minmax"  # minmax | percentile | mse | entropy
    percentile: float = 99.99
    num_samples: int | None = None
    batch_size: int = 1
    dims: tuple[tuple[str, int], ...] = ()  # symbolic dim -> size for random inputs (a mapping is accepted)
    seed: int = 0
    # extras
    kv_cache: str | None = None  # fp8-e4m3 | fp8-e5m2
    kv_granularity: str = "tensor"  # tensor | head
    qat: bool = False  # fake-quant (QAT) chains -> FP8 QDQ with their learned scales first
    scales: str | None = None  # import scales (vLLM / ModelOpt names)
    emit_scales: str | None = None  # write the scales used
    emit_checkpoint: str | None = None  # write a compressed-tensors FP8 Hugging Face checkpoint directory
    activation_scheme: str | None = None  # its input activations: static | dynamic | none (default: static if quantized)
    target_cosine: float | None = None  # mixed precision: keep the most sensitive layers wider
    keep_dtype: str = "bf16"  # what mixed precision keeps them in: bf16 | fp32
    # report and output
    evaluate: bool = True
    eval_samples: int = 4
    report_path: str | None = None
    external_data: bool | None = None
    show_progress: bool = True

    def __post_init__(self):
        # normalise what callers pass loosely (paths, lists, mappings) so the config is plain and hashable
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in _PATH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                set_(name, os.fspath(value))
        self._check_types()
        set_("format", self.format.lower())
        if isinstance(self.exclude, str):
            set_("exclude", (self.exclude,))
        set_("exclude", tuple(self.exclude))
        dims = self.dims.items() if isinstance(self.dims, Mapping) else (self.dims or ())
        set_("dims", tuple(sorted((str(k), int(v)) for k, v in dims)))
        set_("image_size", _image_size(self.image_size))
        self._validate()

    # ------------------------------------------------------------------------------------------
    @property
    def spec(self) -> FormatSpec:
        return get_format(self.format)

    @property
    def activations(self) -> bool:
        """Whether activations are quantized (off with ``weights_only`` or for a weight-only format)."""
        return not self.weights_only and self.spec.activations

    @property
    def checkpoint_scheme(self) -> str:
        """The --emit-checkpoint activation scheme: as given, else static when activations are quantized, else none."""
        return self.activation_scheme or ("static" if self.activations else "none")

    @property
    def dims_map(self) -> dict[str, int]:
        return dict(self.dims)

    def _check_types(self) -> None:
        for kind, names in _TYPES.items():
            for name in names:
                value = getattr(self, name)
                if value is None and name in _NULLABLE:
                    continue
                ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
                if kind is float and isinstance(value, int) and not isinstance(value, bool):
                    object.__setattr__(self, name, float(value))
                    ok = True
                if not ok:
                    raise InvalidOptionError(f"quantize option {name} must be {kind.__name__}"
                                             f"{' or null' if name in _NULLABLE else ''}, got {value!r}")

    def _validate(self) -> None:
        spec = get_format(self.format)  # unknown name: one line listing the valid ones
        check_method(self.method, self.percentile)
        if self.granularity not in GRANULARITIES:
            raise InvalidOptionError(f"--granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if self.block_size is not None and self.block_size <= 0:
            raise InvalidOptionError(f"--block-size must be positive, got {self.block_size}")
        if spec.family == "fp8" and self.granularity == "block" and not self.block_size:
            raise InvalidOptionError("--granularity block needs --block-size N (e.g. 32 or 128)")
        if spec.family != "fp8" and self.granularity != "channel":
            raise InvalidOptionError(f"--granularity {self.granularity} applies to FP8 weights only, not --format {self.format}")
        if spec.family == "maia-mx" and self.block_size and self.block_size % SMX_SUB_BLOCK:
            raise InvalidOptionError(f"--block-size {self.block_size} is invalid for {self.format}: use a multiple of {SMX_SUB_BLOCK}")
        if spec.family == "bf16" and self.block_size is not None:
            raise InvalidOptionError("--block-size does not apply to --format bf16 (no shared scales): drop it")
        if self.mx_form not in MX_FORMS:
            raise InvalidOptionError(f"--mx-form {self.mx_form!r} is not one of {', '.join(MX_FORMS)}")
        if self.mx_form != "ort" and spec.family not in ("mx", "fp4", "w4a8"):
            raise InvalidOptionError(f"--mx-form applies to the OCP MX formats and 4-bit weights (mxfp8-*, mxint8, {', '.join(FOUR_BIT)}), "
                                     f"not --format {self.format}")
        if self.rounding not in ROUNDINGS:
            raise InvalidOptionError(f"--rounding {self.rounding!r} is not one of {', '.join(ROUNDINGS)}")
        if self.rounding == "gptq" and not spec.four_bit:
            raise InvalidOptionError(f"--rounding gptq applies to the 4-bit formats ({', '.join(FOUR_BIT)}), not --format {self.format}")
        if self.rounding == "gptq" and self.calib is None:
            raise InvalidOptionError("--rounding gptq needs calibration data for its Hessians: pass --calib (text:FILE, npz, ...)")
        if self.hadamard and spec.name not in ("mxfp4", "fp4-e4m3"):
            raise InvalidOptionError(f"--hadamard rotates 4-bit weight-only layers (mxfp4, fp4-e4m3), not --format {self.format}")
        if self.mx_form == "standard" and self.evaluate:
            raise InvalidOptionError("--mx-form standard: ONNX Runtime cannot run FLOAT8E8M0 scales yet, so the accuracy "
                                     "report cannot run; add --no-eval (evaluate=False) or use --mx-form ort")
        if self.embeddings and spec.family != "fp8":
            raise InvalidOptionError(f"--embeddings stores embedding tables in FP8: it needs an FP8 --format, not {self.format}")
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE_FORMATS:
            raise InvalidOptionError(f"--kv-cache {self.kv_cache!r} is not one of {', '.join(KV_CACHE_FORMATS)}")
        if self.kv_granularity not in KV_GRANULARITIES:
            raise InvalidOptionError(f"--kv-granularity {self.kv_granularity!r} is not one of {', '.join(KV_GRANULARITIES)}")
        if self.target_cosine is not None and not 0 < self.target_cosine <= 1:
            raise InvalidOptionError(f"--target-cosine must be in (0, 1], got {self.target_cosine}")
        if self.keep_dtype not in KEEP_DTYPES:
            raise InvalidOptionError(f"keep_dtype {self.keep_dtype!r} is not one of {', '.join(KEEP_DTYPES)}")
        data_kind(self.calib)  # text: / images: without a path is refused here
        if self.seq_len < 2:
            raise InvalidOptionError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.activation_scheme is not None and self.activation_scheme not in ACTIVATION_SCHEMES:
            raise InvalidOptionError(f"--activation-scheme {self.activation_scheme!r} is not one of {', '.join(ACTIVATION_SCHEMES)}")
        if self.activation_scheme is not None and self.emit_checkpoint is None:
            raise InvalidOptionError("--activation-scheme describes the --emit-checkpoint directory: add --emit-checkpoint DIR")
        if self.emit_checkpoint is not None and (self.format != "fp8-e4m3" or self.granularity == "block"):
            raise InvalidOptionError("--emit-checkpoint writes compressed-tensors FP8 (E4M3 weights per channel or per tensor): "
                                     "use --format fp8-e4m3 with --granularity channel or tensor")
        if self.activation_scheme == "static" and self.emit_checkpoint is not None and not self.activations:
            raise InvalidOptionError("--activation-scheme static needs quantized activations: drop --weights-only, "
                                     "or emit with --activation-scheme dynamic|none")
        for name, value in (("--samples", self.num_samples), ("--batch-size", self.batch_size), ("--eval-samples", self.eval_samples)):
            if value is not None and value < 1:
                raise InvalidOptionError(f"{name} must be >= 1, got {value}")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **overrides: Any) -> QuantizeConfig:
        """A copy with ``overrides`` applied (validated); an unknown name is a one-line error listing the valid ones."""
        unknown = sorted(set(overrides) - set(self.option_names()))
        if unknown:
            raise InvalidOptionError(
                f"unknown quantize option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                f"valid options are {', '.join(self.option_names())}"
            )
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> QuantizeConfig:
        """From a plain mapping (a job file's step options; ``to_dict`` output); missing keys take defaults."""
        return cls().replace(**dict(options))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists, dicts), round-tripping through ``from_dict``."""
        out = dataclasses.asdict(self)
        out["exclude"] = list(self.exclude)
        out["dims"] = self.dims_map
        out["image_size"] = list(self.image_size) if self.image_size is not None else None
        return out

