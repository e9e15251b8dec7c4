"""``QuantizeReport``: what one quantize run did and measured, typed; ``to_dict()`` is the ``--report`` JSON layout.

Shared by the CLI (tables and ``--json``), batch steps (metrics) and the Python API (``QuantizeResult``).
Sections appear in the dict only when the run produced them (calibration, KV cache, mixed precision ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from maia_onnx.accuracy import AccuracyReport
from maia_onnx.io import external_data_files
from maia_onnx.passes.gptq import GptqLayerRecord
from maia_onnx.passes.hadamard import RotationRecord
from maia_onnx.passes.kv_cache import KvCacheRecord
from maia_onnx.passes.mixed_precision import MixedPrecisionPlan
from maia_onnx.passes.qat_import import QatRecord
from maia_onnx.passes.quantize_mx import MxLayerRecord
from maia_onnx.pipeline import PassReport


@dataclass
class ScalesImport:
    file: str
    unmatched: list[str] = field(default_factory=list)  # scale names that fit no layer of the model


@dataclass
class CalibrationInfo:
    source: str
    method: str
    percentile: float | None  # only for method == "percentile"
    samples: int
    activations: int  # activation tensors calibrated
    seconds: float


@dataclass
class KvCacheReport:
    format: str  # the --kv-cache name (fp8-e4m3 / fp8-e5m2)
    record: KvCacheRecord

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "scales": dict(self.record.scales)}


@dataclass
class Sizes:
    output_bytes: int
    input_bytes: int | None = None  # None: the input was an in-memory model
    ratio: float | None = None  # output / input bytes on disk (external data included)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"output_bytes": self.output_bytes}
        if self.input_bytes is not None:
            out.update(input_bytes=self.input_bytes, ratio=self.ratio)
        return out


@dataclass
class QuantizeReport:
    input: str | None
    output: str | None
    format: str
    granularity: str
    block_size: int | None
    exclude: list[str] = field(default_factory=list)
    activation_scales: dict[str, float] = field(default_factory=dict)
    passes: list[PassReport] = field(default_factory=list)
    quantize_seconds: float = 0.0
    seconds: float = 0.0
    scales_import: ScalesImport | None = None
    qat_import: list[QatRecord] | None = None
    calibration: CalibrationInfo | None = None
    mx_layers: list[MxLayerRecord] | None = None
    gptq: list[GptqLayerRecord] | None = None  # --rounding gptq: each layer's calibration output error, RTN vs GPTQ
    rotations: list[RotationRecord] | None = None  # --hadamard: each layer input's 4-bit weight error, plain vs rotated
    mixed_precision: MixedPrecisionPlan | None = None
    kv_cache: KvCacheReport | None = None
    accuracy: AccuracyReport | None = None
    accuracy_skipped: str | None = None  # why no accuracy report was run (model too large)
    decode: dict[str, Any] | None = None  # maia_onnx.decode.decode_report (+ seconds), FP8 KV cache only
    save_seconds: float | None = None
    sizes: Sizes | None = None
    checkpoint: dict[str, Any] | None = None  # maia_onnx.serving.emit_checkpoint's summary (--emit-checkpoint)

    @property
    def min_output_cosine(self) -> float | None:
        """Worst graph-output cosine against the original (None when no accuracy report ran)."""
        return self.accuracy.min_output_cosine if self.accuracy is not None else None

    @property
    def size_ratio(self) -> float | None:
        """Output / input bytes on disk (None without an output file or a source file)."""
        return self.sizes.ratio if self.sizes is not None else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "input": self.input,
            "output": self.output,
            "format": self.format,
            "weights": {"granularity": self.granularity, "block_size": self.block_size},
            "exclude": list(self.exclude),
            "passes": [p.as_dict() for p in self.passes],
            "quantize_seconds": self.quantize_seconds,
            "activation_scales": dict(self.activation_scales),
            "seconds": self.seconds,
        }
        if self.scales_import is not None:
            out["scales_import"] = asdict(self.scales_import)
        if self.qat_import is not None:
            out["qat_import"] = [r.as_dict() for r in self.qat_import]
        if self.calibration is not None:
            out["calibration"] = asdict(self.calibration)
        if self.mx_layers is not None:
            out["mx_layers"] = [r.as_dict() for r in self.mx_layers]
        if self.gptq is not None:
            out["gptq"] = [r.as_dict() for r in self.gptq]
        if self.rotations is not None:
            out["hadamard"] = [r.as_dict() for r in self.rotations]
        if self.mixed_precision is not None:
            out["mixed_precision"] = self.mixed_precision.as_dict()
        if self.kv_cache is not None:
            out["kv_cache"] = self.kv_cache.to_dict()
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy.to_dict()
        elif self.accuracy_skipped is not None:
            out["accuracy"] = {"skipped": self.accuracy_skipped}
        if self.decode is not None:
            out["decode"] = dict(self.decode)
        if self.save_seconds is not None:
            out["save_seconds"] = self.save_seconds
        if self.sizes is not None:
            out["sizes"] = self.sizes.to_dict()
        if self.checkpoint is not None:
            out["checkpoint"] = dict(self.checkpoint)
        return out


def _file_bytes(path: Path) -> int:
    """Bytes on disk of a model file plus the external data files it references."""
    total = path.stat().st_size
    try:
        total += sum(p.stat().st_size for p in external_data_files(ir.load(path)) if p.exists())
    except Exception:  # sizes are informational only
        pass
    return total


def measure_sizes(source: Path | None, output: Path) -> Sizes:
    out = _file_bytes(output)
    if source is None:
        return Sizes(out)
    src = _file_bytes(source)
    return Sizes(out, src, out / src if src else None)
