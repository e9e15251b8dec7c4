"""GptqPass: 4-bit weights (mxfp4, fp4-e4m3) rounded by GPTQ from calibration Hessians, stored packed.

The calibration batches stream once through the (still float) model segment by segment
(``maia_onnx.calib.collect_hessians`` over ``maia_onnx.segments``):
only one segment's weights (``max_segment_bytes``, cut between decoder layers) are in ONNX Runtime at a time, and
a segment ends before the Hessians of the layer inputs it makes pass ``max_hessian_bytes``.  For each such input
``formats.gptq.HessianAccumulator`` sums ``2 X^T X`` over the real positions only (a batch's ``Feeds.valid`` mask
drops padding); layers reading the same input (q/k/v) share one Hessian and one factorization.  When a segment is
done its inputs' layers are rounded (``formats.gptq.gptq_rows``, a slab of ``ROW_CHUNK_ELEMENTS`` output rows at
a time from the memory-mapped weight) and packed (``formats.fp4.encode_fp4``, which stores GPTQ's values and scales
exactly as given), and their Hessians are dropped before the next segment runs.  The graph is then rewritten by
``QuantizeMxPass`` with those weights; layers GPTQ cannot take (Conv, batched MatMul weights, Gemm with transA)
are rounded to nearest.  Every layer reads the float model's activations (not its already-rounded predecessors'),
so the result does not depend on how the model was cut.

Defaults measured on a trained sentence encoder (all-MiniLM-L6-v2, 64 calibration sentences; docs/benchmarks.md):
plain GPTQ (damping 0.01, columns in order, every token weighted by its size) made the embeddings *worse* than
round-to-nearest although each layer's own output error fell 3-7x on held-out data; rounding outlier input channels
first (``act_order``, static group scales), damping 0.1 and token-normalized Hessians (``normalize_tokens``: the
next LayerNorm divides every token by its norm) turn that into a 2x smaller embedding error.

``GptqPass(fmt, batches, form="ort", block_size=None, exclude=(), damp=0.1, block=128, max_hessian_bytes=512 MiB,
act_order=True, normalize_tokens=True, max_segment_bytes=256 MiB, progress=None)`` where ``batches(model)`` yields
feed dicts (``maia_onnx.data.Feeds`` carry ``valid``) and ``progress(done, total, what)`` hears of each rounded
layer.  The result is a ``GptqPassResult`` (an ``MxPassResult``) whose ``gptq`` rows give each layer's output error
for round-to-nearest and for GPTQ on the calibration inputs (``formats.gptq.output_error``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx_ir as ir

from maia_onnx.calib import collect_hessians
from maia_onnx.errors import InvalidOptionError, UserError
from maia_onnx.formats.fp4 import FP4_KINDS, Fp4Weight, encode_fp4
from maia_onnx.formats.gptq import (
    DEFAULT_HESSIAN_BYTES,
    GroupQuantizer,
    HessianFactor,
    factor_hessian,
    fp4_e4m3_global_scale,
    fp4_e4m3_quantizer,
    gptq_rows,
    mxfp4_quantizer,
    output_error_sum,
)
from maia_onnx.formats.packing import BlockLayout, layout
from maia_onnx.io import SpillFile, give_back_free_memory, release_mapping
from maia_onnx.passes.quantize_mx import MxPassResult, QuantizeMxPass
from maia_onnx.scales import WeightTarget, weight_targets
from maia_onnx.segments import DEFAULT_SEGMENT_BYTES

ROW_CHUNK_ELEMENTS = 1 << 22  # rows of a weight rounded together: ~16 MB of float32 working copies per array


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
    calibration_passes: int = 0  # times the calibration data was streamed through the model (1)
    segments: int = 0  # pieces the model was run in (one segment's weights in ORT at a time)


def _quantizer(fmt: str, weight: np.ndarray, block_size: int) -> tuple[GroupQuantizer, float]:
    if fmt == "mxfp4":
        return mxfp4_quantizer(block_size), 1.0
    g = fp4_e4m3_global_scale(weight)
    return fp4_e4m3_quantizer(g, block_size), float(g)


class _SpilledWeights(Mapping[str, Fp4Weight]):
    """Rounded weights parked in a ``SpillFile`` as they are made (a multi-GB model's packed weights would otherwise
    pile up in memory while later layers are rounded); each is read back when the rewrite asks for it."""

    def __init__(self):
        self._spill = SpillFile()
        self._index: dict[str, tuple[str, BlockLayout, np.float32, tuple, tuple]] = {}

    def __setitem__(self, name: str, weight: Fp4Weight) -> None:
        self._index[name] = (weight.kind, weight.layout, weight.tensor_scale, self._spill.put(weight.packed()),
                             self._spill.put(weight.scale_codes))

    def __getitem__(self, name: str) -> Fp4Weight:
        kind, lay, tensor_scale, packed, scales = self._index[name]
        return Fp4Weight.from_packed(kind, lay, self._spill.get(packed), self._spill.get(scales), tensor_scale)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


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
        max_segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        progress: Callable[[int, int, str], None] | None = None,
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
        self.max_segment_bytes = int(max_segment_bytes)
        self.progress = progress

    def call(self, model: ir.Model) -> GptqPassResult:
        targets = [t for t in weight_targets(model.graph) if not t.excluded_by(self.exclude)]
        by_input: dict[str, list[WeightTarget]] = {}
        columns: dict[str, int] = {}
        for t in targets:
            x = t.linear_input()
            if x is None:
                continue
            by_input.setdefault(x.name, []).append(t)
            columns[x.name] = int(t.weight.shape[t.reduction_axis])
        encoded = _SpilledWeights()
        records: list[GptqLayerRecord] = []
        total = sum(len(ts) for ts in by_input.values())

        def on_hessian(name, h, rows):
            if rows == 0:
                raise UserError(f"GPTQ: calibration data gave no valid positions for {name!r}: pass non-empty samples")
            factor = factor_hessian(h, self.damp, self.act_order)
            for t in by_input[name]:
                if t.weight.name in encoded:
                    continue  # a weight shared by two nodes with one input: rounded once
                encoded[t.weight.name], row = self._round(t, name, h, factor)
                records.append(row)
                give_back_free_memory()
                if self.progress is not None:
                    self.progress(len(records), total, t.weight.name)

        streamed, segments = (0, []) if not by_input else collect_hessians(
            model, columns, self.batches(model), on_hessian, self.normalize_tokens, self.max_segment_bytes,
            self.max_hessian_bytes)
        if by_input and streamed == 0:
            raise UserError("GPTQ: the calibration source gave no batches: pass calibration data with samples")
        result = super().call(model) if not encoded else QuantizeMxPass(
            self.fmt, form=self.form, block_size=self.block_size, exclude=self.exclude, activations=False,
            encoded=encoded)(model)
        return GptqPassResult(result.model, result.modified, list(result.layers), records, 1 if by_input else 0,
                              len(segments))

    def _round(self, t: WeightTarget, input_name: str, hessian: np.ndarray,
               factor: HessianFactor) -> tuple[Fp4Weight, GptqLayerRecord]:
        """GPTQ of one weight, a slab of output rows at a time, read from the (memory-mapped) source."""
        source = t.weight.const_value
        data = source.numpy()
        axis = t.reduction_axis
        w = data.T if axis == 0 else data  # [out, in] view: rows are output channels
        quantizer, g = _quantizer(self.fmt, w, self.block_size)
        lay = layout(tuple(data.shape), axis, quantizer.group_size)
        codes = np.zeros(lay.blocked_shape, np.uint8)
        scale_codes = np.zeros(lay.scale_shape, np.uint8)
        out_rows = w.shape[0]
        step = max(1, ROW_CHUNK_ELEMENTS // max(1, w.shape[1]))
        step += step % 2  # chunks of an even number of rows keep any nibble pairing whole
        rtn_sum = gptq_sum = 0.0
        for r0 in range(0, out_rows, step):
            r1 = min(r0 + step, out_rows)
            rows = np.ascontiguousarray(w[r0:r1], dtype=np.float32)
            rtn, rtn_scales = quantizer.fake_quant(rows)
            rtn_sum += output_error_sum(rows, rtn, hessian)
            del rtn
            values, scales = gptq_rows(rows, factor, quantizer, self.block, rtn_scales)
            gptq_sum += output_error_sum(rows, values, hessian)
            # the chunk as its own ONNX-oriented tensor: [in, rows] (MatMul) or [rows, in] (Gemm transB)
            piece = encode_fp4(values.T if axis == 0 else values, scales.T if axis == 0 else scales, self.fmt, axis,
                               self.block_size, tensor_scale=g)
            where = (slice(None), slice(None), slice(None), slice(r0, r1)) if axis == 0 else (slice(r0, r1),)
            codes[where] = piece.codes
            scale_codes[where] = piece.scale_codes
            del rows, values, scales, piece
        del data, w
        release_mapping(source)
        row = GptqLayerRecord(t.layer, t.weight.name, input_name, rtn_sum / 2.0 / out_rows, gptq_sum / 2.0 / out_rows)
        return Fp4Weight(self.fmt, lay, codes, scale_codes, np.float32(g)), row
