"""GptqPass: 4-bit weights (mxfp4, fp4-e4m3) rounded by GPTQ from calibration Hessians, stored packed.

Each quantized linear's input is made an extra output of the (still float) model, calibration batches stream
through ONNX Runtime, and ``formats.gptq.HessianAccumulator`` sums ``2 X^T X`` over the real positions only (a
batch's ``Feeds.valid`` mask drops padding).  Layers reading the same input (q/k/v) share one Hessian.  Only
``max_hessian_bytes`` of float64 Hessians live at once: the inputs are grouped under that budget and the
calibration data is streamed once per group, each group's layers rounded (``formats.gptq.gptq``) and packed
(``formats.fp4.encode_fp4``, which stores GPTQ's values and scales exactly as given) before the next group's
Hessians are made.  The graph is then rewritten by ``QuantizeMxPass`` with those weights; layers GPTQ cannot
take (Conv, batched MatMul weights, Gemm with transA) are rounded to nearest.

Defaults measured on a trained sentence encoder (all-MiniLM-L6-v2, 64 calibration sentences; docs/benchmarks.md):
plain GPTQ (damping 0.01, columns in order, every token weighted by its size) made the embeddings *worse* than
round-to-nearest although each layer's own output error fell 3-7x on held-out data; rounding outlier input channels
first (``act_order``, static group scales), damping 0.1 and token-normalized Hessians (``normalize_tokens``: the
next LayerNorm divides every token by its norm) turn that into a 2x smaller embedding error.

``GptqPass(fmt, batches, form="ort", block_size=None, exclude=(), damp=0.1, block=128, max_hessian_bytes=512 MiB,
act_order=True, normalize_tokens=True)`` where ``batches(model)`` yields feed dicts (``maia_onnx.data.Feeds`` carry ``valid``).  The result is a
``GptqPassResult`` (an ``MxPassResult``) whose ``gptq`` rows give each layer's output error for round-to-nearest
and for GPTQ on the calibration inputs (``formats.gptq.output_error``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from maia_onnx.calib import run_with_intermediates
from maia_onnx.errors import InvalidOptionError, UserError
from maia_onnx.formats.fp4 import FP4_KINDS, Fp4Weight, encode_fp4
from maia_onnx.formats.gptq import (
    GroupQuantizer,
    HessianAccumulator,
    fp4_e4m3_global_scale,
    fp4_e4m3_quantizer,
    gptq,
    mxfp4_quantizer,
    output_error,
)
from maia_onnx.passes.quantize_mx import MxPassResult, QuantizeMxPass
from maia_onnx.scales import WeightTarget, weight_targets

DEFAULT_HESSIAN_BYTES = 512 << 20


@dataclass
class GptqLayerRecord:
    """One weight's calibration output error (mean squared, per output row) with round-to-nearest and GPTQ."""

    layer: str
    weight: str
    input: str
    rtn_error: float
    gptq_error: float

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class GptqPassResult(MxPassResult):
    gptq: list[GptqLayerRecord] = field(default_factory=list)
    calibration_passes: int = 0  # times the calibration data was streamed (one per Hessian group)


def _quantizer(fmt: str, weight: np.ndarray, block_size: int) -> tuple[GroupQuantizer, float]:
    if fmt == "mxfp4":
        return mxfp4_quantizer(block_size), 1.0
    g = fp4_e4m3_global_scale(weight)
    return fp4_e4m3_quantizer(g, block_size), float(g)


def _gptq_input(t: WeightTarget) -> ir.Value | None:
    """The activation a linear multiplies its ``[in, out]`` / ``[out, in]`` weight with, when GPTQ can take it."""
    node = t.node
    if len(t.weight.shape) != 2 or node.op_type not in ("MatMul", "Gemm"):
        return None
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return None
    x = node.inputs[0]
    if x is None or x.const_value is not None or not x.name:
        return None
    return x


class GptqPass(QuantizeMxPass):
    """GPTQ-rounded packed 4-bit weights for MatMul/Gemm (see the module docstring)."""

    def __init__(
        self,
        fmt: str,
        batches: Callable[[ir.Model], Iterable[Mapping[str, np.ndarray]]],
        form: str = "ort",
        block_size: int | None = None,
        exclude: Iterable[str] = (),
        damp: float = 0.1,
        block: int = 128,
        max_hessian_bytes: int = DEFAULT_HESSIAN_BYTES,
        act_order: bool = True,
        normalize_tokens: bool = True,
    ):
        if fmt not in FP4_KINDS:
            raise InvalidOptionError(f"GPTQ rounds 4-bit weights: format {fmt!r} is not one of {', '.join(FP4_KINDS)}")
        if not 0 <= damp < 1:
            raise InvalidOptionError(f"GPTQ damping must be in [0, 1), got {damp}")
        super().__init__(fmt, form=form, block_size=block_size, exclude=exclude, activations=False)
        self.batches = batches
        self.damp = float(damp)
        self.block = int(block)
        self.max_hessian_bytes = int(max_hessian_bytes)
        self.act_order = bool(act_order)
        self.normalize_tokens = bool(normalize_tokens)

    def _groups(self, inputs: dict[str, int]) -> list[list[str]]:
        """Input names in groups whose float64 Hessians fit the budget together (at least one per group)."""
        groups: list[list[str]] = []
        used = self.max_hessian_bytes + 1
        for name, columns in inputs.items():
            size = columns * columns * 8
            if used + size > self.max_hessian_bytes:
                groups.append([])
                used = 0
            groups[-1].append(name)
            used += size
        return groups

    def call(self, model: ir.Model) -> GptqPassResult:
        targets = [t for t in weight_targets(model.graph)
                   if not any(fnmatch.fnmatchcase(n, p) for p in self.exclude
                              for n in (t.layer, t.node.name or "", t.weight.name or "") if n)]
        by_input: dict[str, list[WeightTarget]] = {}
        columns: dict[str, int] = {}
        for t in targets:
            x = _gptq_input(t)
            if x is None:
                continue
            by_input.setdefault(x.name, []).append(t)
            columns[x.name] = int(t.weight.shape[t.reduction_axis])
        encoded: dict[str, Fp4Weight] = {}
        records: list[GptqLayerRecord] = []
        groups = self._groups(columns)
        for group in groups:
            hessians = {name: HessianAccumulator(columns[name], self.normalize_tokens) for name in group}
            current: dict[str, Any] = {}

            def tracked():
                for feeds in self.batches(model):
                    current["valid"] = getattr(feeds, "valid", None)
                    yield feeds

            def update(_, values, hessians=hessians, current=current):
                valid = current.get("valid")
                for name, acc in hessians.items():
                    x = values[name]
                    if valid is not None and x.ndim == 2 and x.shape[0] == valid.size:
                        x, mask = x[valid.reshape(-1)], None  # [batch * seq, in] rows (a Gemm after a flatten)
                    else:
                        mask = valid
                    acc.update(x, mask)

            run_with_intermediates(model, list(group), tracked(), update)
            for name in group:
                acc = hessians.pop(name)
                if acc.rows == 0:
                    raise UserError(f"GPTQ: calibration data gave no valid positions for {name!r}: pass non-empty samples")
                h = acc.h
                del acc
                for t in by_input[name]:
                    if t.weight.name in encoded:
                        continue  # a weight shared by two nodes with one input: rounded once
                    encoded[t.weight.name], row = self._round(t, name, h)
                    records.append(row)
                del h
        result = super().call(model) if not encoded else QuantizeMxPass(
            self.fmt, form=self.form, block_size=self.block_size, exclude=self.exclude, activations=False,
            encoded=encoded)(model)
        return GptqPassResult(result.model, result.modified, list(result.layers), records, len(groups))

    def _round(self, t: WeightTarget, input_name: str, hessian: np.ndarray) -> tuple[Fp4Weight, GptqLayerRecord]:
        source = t.weight.const_value
        data = np.asarray(source.numpy(), np.float32)
        axis = t.reduction_axis
        w = data.T if axis == 0 else data  # [out, in]
        quantizer, g = _quantizer(self.fmt, w, self.block_size)
        rtn, _ = quantizer.fake_quant(np.ascontiguousarray(w))
        values, scales = gptq(w, hessian, quantizer, damp=self.damp, block=self.block, act_order=self.act_order)
        row = GptqLayerRecord(t.layer, t.weight.name, input_name, output_error(w, rtn, hessian), output_error(w, values, hessian))
        if axis == 0:
            values, scales = values.T, scales.T
        packed = encode_fp4(values, scales, self.fmt, axis, self.block_size, tensor_scale=g)
        del data, w, rtn, values
        release = getattr(source, "release", None)
        if isinstance(source, ir.ExternalTensor) and release is not None:
            try:
                release()
            except BufferError:
                pass
        return packed, row
