"""HadamardRotationPass: block Hadamard rotation of the input channels of linear layers, kept where it lowers the
4-bit rounding error (``--hadamard``; run before ``QuantizeMxPass`` / ``GptqPass``).

With ``R = blockdiag(H_b / sqrt(b))`` (Sylvester Hadamard, orthonormal and symmetric) a layer ``y = x W``
(``W`` ``[in, out]``) equals ``y = (x R)(R W)``: the pass stores ``R W`` (rotated along the reduction axis; ``W R``
for a Gemm with transB) and inserts ``x' = x R`` once per input, shared by every rotated layer that reads ``x``
(q/k/v): ``Reshape(x, [-1, b]) -> MatMul(H_b / sqrt(b)) -> Reshape(Shape(x))``, b multiply-adds per element of
``x``.  Inside one block an outlier weight is spread over all ``b`` elements, so the block's shared scale (MXFP4's
E8M0 power of two, fp4-e4m3's E4M3 scale) is set by the block's energy instead of its largest entry; ``b`` is the
format's block size so a rotation never mixes two blocks.

"Where it helps": the layers reading one input are rotated together or not at all, and only when the sum of their
round-to-nearest errors falls.  With calibration ``batches`` the error is the layers' *output* error on the
calibration inputs, ``tr(D^T H D)`` against ``R H R`` when rotated (Hessians streamed segment by segment by
``maia_onnx.calib.collect_hessians``, as for GPTQ): measured on all-MiniLM-L6-v2, rotating by weight error alone
made MXFP4 round-to-nearest worse (the rotation moves error into the few input channels that carry outlier
activations), while the output error sees that.  Without data it is the weight error energy (``R`` is orthonormal, so before and after compare directly).
``HadamardRotationPass(fmt, block_size=None, exclude=(), batches=None, normalize_tokens=True)``; the result's
``rotations`` rows give each input's error both ways, which measure, and whether it was rotated.  Weights
memory-mapped from external data stay lazy: the rotated weight is computed when it is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir
import onnx_ir.passes

from maia_onnx.calib import collect_hessians
from maia_onnx.errors import InvalidOptionError
from maia_onnx.formats.fp4 import FP4_KINDS, quantize_fp4, tensor_scale_e4m3
from maia_onnx.io import release_mapping
from maia_onnx.passes.packed_weights import Namer
from maia_onnx.scales import NOT_A_WEIGHT_KEY, WeightTarget, weight_targets


ROW_SLAB_ELEMENTS = 1 << 22  # weight elements rotated / quantized together while judging a rotation


def hadamard(b: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix ``H_b / sqrt(b)`` (``b`` a power of two), float64."""
    if b < 1 or b & (b - 1):
        raise InvalidOptionError(f"a Hadamard block must be a power of two, got {b}")
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(b)


def rotate(weight: np.ndarray, axis: int, b: int, chunk_elements: int = 1 << 22) -> np.ndarray:
    """A 2-D ``weight`` with its ``axis`` (length divisible by ``b``) multiplied block by block by ``H_b / sqrt(b)``,
    in float32, a slab of ``chunk_elements`` at a time (an lm_head is 262 MB: no whole-tensor temporaries)."""
    w = np.asarray(weight)
    h = hadamard(b).astype(np.float32)  # symmetric: R^T = R
    out = np.empty(w.shape, np.float32)
    if axis == 0:  # [in, out]: R W, one group of whole b-row blocks at a time
        step = max(b, chunk_elements // max(1, w.shape[1]) // b * b)
        for r0 in range(0, w.shape[0], step):
            part = np.asarray(w[r0:r0 + step], np.float32)
            out[r0:r0 + step] = np.matmul(h, part.reshape(-1, b, w.shape[1])).reshape(part.shape)
    else:  # [out, in]: W R, a slab of output rows at a time
        step = max(1, chunk_elements // max(1, w.shape[1]))
        for r0 in range(0, w.shape[0], step):
            part = np.asarray(w[r0:r0 + step], np.float32)
            out[r0:r0 + step] = (part.reshape(part.shape[0], -1, b) @ h).reshape(part.shape)
    return out


@dataclass
class RotationRecord:
    """One layer input: the summed RTN weight error energy of its layers without and with the rotation."""

    input: str
    weights: list[str]
    error_plain: float
    error_rotated: float
    rotated: bool
    measure: str = "weight"  # "output" (calibration Hessian) | "weight" (no data)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class HadamardPassResult(onnx_ir.passes.PassResult):
    rotations: list[RotationRecord] = field(default_factory=list)


def _rotatable(t: WeightTarget, b: int) -> ir.Value | None:
    """The input ``x`` of a 2-D linear whose reduction axis splits into whole blocks, when it can be rotated."""
    x = t.linear_input()
    return x if x is not None and int(t.weight.shape[t.reduction_axis]) % b == 0 else None


def _rotated_tensor(source: ir.TensorProtocol, axis: int, b: int, name: str) -> ir.TensorProtocol:
    if isinstance(source, ir.ExternalTensor):
        def compute() -> ir.Tensor:
            out = rotate(source.numpy(), axis, b)
            release_mapping(source)  # the mapped pages go as soon as the rotated copy exists
            return ir.Tensor(out, name=name)

        return ir.LazyTensor(compute, dtype=ir.DataType.FLOAT, shape=ir.Shape(list(source.shape)), name=name, cache=False)
    return ir.Tensor(rotate(source.numpy(), axis, b), name=name)


class HadamardRotationPass(onnx_ir.passes.InPlacePass):
    """Block Hadamard rotation of 4-bit layers' inputs where it lowers their rounding error (module docstring)."""

    def __init__(self, fmt: str, block_size: int | None = None, exclude: Iterable[str] = (),
                 batches: Callable[[ir.Model], Iterable[Mapping[str, np.ndarray]]] | None = None,
                 normalize_tokens: bool = True):
        if fmt not in FP4_KINDS:
            raise InvalidOptionError(f"--hadamard rotates for 4-bit weights: format {fmt!r} is not one of "
                                     f"{', '.join(FP4_KINDS)}")
        self.fmt = fmt
        self.block_size = int(block_size or FP4_KINDS[fmt])
        hadamard(self.block_size)  # refuses a block that is not a power of two
        self.exclude = tuple(exclude)
        self.batches = batches
        self.normalize_tokens = normalize_tokens

    def _error(self, weight: np.ndarray, axis: int, hessian: np.ndarray | None, rotated: bool) -> float:
        """Round-to-nearest error of ``weight`` (rotated first if asked): its energy, or ``tr(D^T H D)`` with a
        Hessian (of the rotated input ``R H R`` when rotated).  Output rows go a slab at a time, each rotated and
        quantized on its own (blocks run along the input axis, so a slab quantizes exactly as the whole does), and
        fp4-e4m3's tensor scale comes from the whole (rotated) weight first."""
        rows = weight.T if axis == 0 else weight  # [out, in] view of the (memory-mapped) weight
        step = max(1, ROW_SLAB_ELEMENTS // max(1, rows.shape[1]))

        def slabs():
            for r0 in range(0, rows.shape[0], step):
                part = np.asarray(rows[r0:r0 + step], np.float32)
                yield rotate(part, 1, self.block_size) if rotated else part

        scale = None
        if self.fmt == "fp4-e4m3":
            scale = tensor_scale_e4m3(np.array([max((float(np.max(np.abs(p))) for p in slabs()), default=0.0)]))
        total = 0.0
        for part in slabs():
            d = part - quantize_fp4(part, self.fmt, 1, self.block_size, tensor_scale=scale).dequantize()
            total += float(np.sum((d @ hessian) * d if hessian is not None else d * d, dtype=np.float64))
        return total

    def _decide(self, name: str, targets: list[WeightTarget], hessian: np.ndarray | None) -> RotationRecord:
        b = self.block_size
        turned_h = None if hessian is None else rotate(rotate(hessian, 0, b), 1, b)  # R H R: what x R gives
        plain = rotated = 0.0
        for t in dict((t.weight.name, t) for t in targets).values():
            w = t.weight.const_value.numpy()
            plain += self._error(w, t.reduction_axis, hessian, rotated=False)
            rotated += self._error(w, t.reduction_axis, turned_h, rotated=True)
            del w
            release_mapping(t.weight.const_value)
        weights = list(dict.fromkeys(t.weight.name for t in targets))
        return RotationRecord(name, weights, plain, rotated, rotated < plain, "weight" if hessian is None else "output")

    def call(self, model: ir.Model) -> HadamardPassResult:
        graph = model.graph
        b = self.block_size
        groups: dict[str, tuple[ir.Value, list[WeightTarget]]] = {}
        for t in weight_targets(graph):
            x = _rotatable(t, b)
            if x is not None and not t.excluded_by(self.exclude):
                groups.setdefault(x.name, (x, []))[1].append(t)
        records: dict[str, RotationRecord] = {}
        if self.batches is None or not groups:
            for name, (_, targets) in groups.items():
                records[name] = self._decide(name, targets, None)
        else:
            # the layers' own calibration inputs decide, one segment of the model at a time (as GPTQ's Hessians)
            columns = {name: int(ts[0].weight.shape[ts[0].reduction_axis]) for name, (_, ts) in groups.items()}

            def on_hessian(name, h, _rows):
                records[name] = self._decide(name, groups[name][1], h)

            collect_hessians(model, columns, self.batches(model), on_hessian, self.normalize_tokens)
        namer = Namer(graph)
        table = None
        for name, (x, targets) in groups.items():
            if not records[name].rotated:
                continue
            if table is None:
                table = _initializer(graph, namer("maia_hadamard"), hadamard(b).astype(np.float32))
                # the rotation stays exact float: no weight pass may quantize it as a layer
                table.metadata_props[NOT_A_WEIGHT_KEY] = "hadamard"
            x_rot = self._insert_rotation(graph, namer, x, table, targets[0].node)
            done: dict[str, ir.Value] = {}
            for t in targets:
                w = t.weight
                if w.name not in done:  # a weight shared by two nodes reading x: rotated once
                    new_name = namer(f"{w.name}_hadamard")
                    done[w.name] = _initializer(graph, new_name, _rotated_tensor(w.const_value, t.reduction_axis, b, new_name))
                t.node.replace_input_with(t.input_index, done[w.name])
                t.node.replace_input_with(0, x_rot)
        outputs = {o.name for o in graph.outputs}
        for value in list(graph.initializers.values()):
            if not value.uses() and value.name not in outputs:
                graph.initializers.pop(value.name)  # the unrotated weights nothing reads any more
        rows = [records[name] for name in groups]
        return HadamardPassResult(model, any(r.rotated for r in rows), rows)

    def _insert_rotation(self, graph: ir.Graph, namer: Namer, x: ir.Value, table: ir.Value, before: ir.Node) -> ir.Value:
        """``x R`` = Reshape(MatMul(Reshape(x, [-1, b]), H), Shape(x)), placed before the first layer reading it."""
        base = x.name
        blocks = _initializer(graph, namer(f"{base}_hadamard_blocks"), np.array([-1, self.block_size], np.int64))

        def op(op_type, inputs, dtype=ir.DataType.FLOAT, shape=None):
            out = ir.Value(name=namer(f"{base}_hadamard_{op_type.lower()}"), type=ir.TensorType(dtype), shape=shape)
            graph.insert_before(before, ir.node(op_type, inputs, outputs=[out], name=namer(f"{base}_Hadamard{op_type}")))
            return out

        shape = op("Shape", [x], ir.DataType.INT64)
        flat = op("Reshape", [x, blocks])
        turned = op("MatMul", [flat, table])
        return op("Reshape", [turned, shape], shape=x.shape)


def _initializer(graph: ir.Graph, name: str, value) -> ir.Value:
    tensor = value if not isinstance(value, np.ndarray) else ir.Tensor(value, name=name)
    tensor.name = name
    v = ir.Value(name=name, const_value=tensor, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(v)
    return v
