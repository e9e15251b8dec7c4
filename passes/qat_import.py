"""QatImportPass: turn a fake-quantised (QAT) export into standard FP8 QDQ, keeping the learned scales.

A PyTorch model trained with FP8 fake quantisation, e.g. ``(x / s).clamp(-448, 448).to(float8_e4m3fn).to(float32) * s``
(or exported QuantizeLinear/DequantizeLinear nodes), reaches ONNX in one of three shapes; all become
``DequantizeLinear`` over real 1-byte FP8 weights and ``QuantizeLinear -> DequantizeLinear`` on activations,
with the scale the training learned:

1. **Cast-pair fake quant** ``Mul(Cast<float>(Cast<fp8>([Clip](Div(x, s)))), s)`` with a constant ``s``:
   on a constant ``x`` (weight) the FP8 bytes are computed now (``cast_fp8_saturate(x / s)``, same float32
   division as torch) and read by ``DequantizeLinear(q, s)``; on an activation it becomes
   ``QuantizeLinear(x, s, saturate) -> DequantizeLinear(s)`` (identical rounding: RNE, saturating).
2. **QDQ on a constant weight** ``DequantizeLinear(QuantizeLinear(W, s, zp), s, zp)``: the QuantizeLinear is
   evaluated now (FP8 or INT8/UINT8), so only the DequantizeLinear remains.
3. **Folded weights**: the exporter's constant folding (onnxscript optimizer) evaluates a weight's
   fake-quant chain, leaving a float weight whose values are ``fp8 * s`` and no scale node.  Given the
   checkpoint's ``<layer>.weight_scale`` (``weight_scales``: weight initializer name -> scale, e.g. from
   ``maia_onnx.scales.map_scales``) that scale is used; otherwise (``infer=True``) the pass recovers a
   per-tensor, then per-output-channel, scale ``s`` such that every ``W / s`` is exactly an FP8 value.
   Ordinary float weights are never on such a grid, so they are left alone.  An inferred scale
   reproduces the fake-quantised weights bit for bit but may differ from the learned one by a power
   of two (fp8 * s == (fp8 * 2^k) * (s / 2^-k)); give ``weight_scales`` to keep the learned value.

``call`` returns a ``QatImportResult`` whose ``records`` (``QatRecord``) say what was converted (kind, value,
scale, scale source, whether exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir
import onnx_ir.passes

from maia_onnx.formats.fp8 import FP8_E4M3FN, FP8_E5M2, Fp8Format, cast_fp8_saturate, expand_scale, get_fp8_format
from maia_onnx.passes.quantize_mx import ORT_OPSET, require_opset
from maia_onnx.scales import weight_targets

_FP8_BY_IR = {ir.DataType.FLOAT8E4M3FN: FP8_E4M3FN, ir.DataType.FLOAT8E5M2: FP8_E5M2}
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass
class QatRecord:
    """One conversion: what kind, which value, its scale, where the scale came from, and whether it is exact."""

    kind: str  # "fake-quant weight" | "fake-quant activation" | "weight qdq" | "folded weight"
    value: str
    scale: Any  # scale as a (nested) list / float
    source: str  # "graph" | "given" | "inferred"
    format: str
    exact: bool
    layer: str | None = None  # folded weights: the checkpoint layer name

    def as_dict(self) -> dict[str, Any]:
        row = {k: v for k, v in vars(self).items() if k != "layer"}
        if self.kind == "folded weight":
            row["layer"] = self.layer
        return row


@dataclass
class QatImportResult(onnx_ir.passes.PassResult):
    records: list[QatRecord] = field(default_factory=list)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy())
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return np.asarray(node.attributes["value"].as_tensor().numpy())
    return None


def _drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove an initializer the conversion left without readers (the float weight, an unused scale)."""
    if value is not None and value.name in graph.initializers and graph.initializers[value.name] is value:
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            graph.initializers.pop(value.name)


def _single_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) == 1 and uses[0].node.op_type == op_type and not value.is_graph_output():
        return uses[0].node
    return None


def _fp8_grid_scale(w: np.ndarray, fmt: Fp8Format) -> float | None:
    """A per-tensor scale s with W == float32(fp8(W / s) * s) exactly, or None.

    The largest |W| is some FP8 value v times s; try every v (largest first, i.e. the most precise
    storage) and keep the first s that reproduces all of W.
    """
    w = np.asarray(w, dtype=np.float32)
    amax = float(np.max(np.abs(w))) if w.size else 0.0
    if amax == 0.0 or not np.isfinite(amax):
        return None
    codes = np.arange(256, dtype=np.uint8).view(fmt.np_dtype).astype(np.float32)
    candidates = np.unique(codes[np.isfinite(codes) & (codes > 0)])[::-1]
    flat = w.reshape(-1)
    sample = flat[: 4096]  # cheap rejection first: ordinary float weights fail on the first few values

    def reproduces(values: np.ndarray, s: np.float32) -> bool:
        return np.array_equal(cast_fp8_saturate(values / s, fmt).astype(np.float32) * s, values)

    for v in candidates:
        s0 = np.float32(amax / np.float64(v))
        if not (np.isfinite(s0) and s0 > 0):
            continue
        # amax itself was rounded (fl(v * s)), so the learned s can sit an ulp or two either side of amax / v
        s_lo = s_hi = s0
        neighbours = [s0]
        for _ in range(2):
            s_lo, s_hi = np.nextafter(s_lo, np.float32(0)), np.nextafter(s_hi, np.float32(np.inf))
            neighbours += [s_lo, s_hi]
        for s in neighbours:
            if reproduces(sample, s) and reproduces(flat, s):
                return float(s)
    return None


def has_fake_quant(model: ir.Model) -> bool:
    """True when the graph holds something QatImportPass converts: a Cast-to-FP8 fake-quant chain or a weight QDQ.

    (Folded fake-quant weights are found by the pass itself: they look like ordinary float weights.)
    """
    for node in model.graph:
        if node.op_type == "Cast" and ir.DataType(node.attributes.get_int("to", 0)) in _FP8_BY_IR:
            return True
        if node.op_type == "QuantizeLinear" and node.inputs and node.inputs[0] is not None and node.inputs[0].is_initializer():
            return True
    return False


class QatImportPass(onnx_ir.passes.InPlacePass):
    """Convert fake-quant chains / weight QDQ / folded fake-quant weights into FP8 QDQ with the learned scales.

    Args:
        weight_scales: weight initializer name -> learned scale (scalar or per output channel), for
            weights the exporter constant-folded (their scale no longer appears in the graph).
        infer: recover scales of folded fake-quant weights from their values when not given.
        fmt: FP8 format of folded weights ("e4m3fn" or "e5m2").
    """

    def __init__(self, weight_scales: Mapping[str, np.ndarray | float] | None = None, infer: bool = True, fmt: str = "e4m3fn"):
        super().__init__()
        self.weight_scales = dict(weight_scales or {})
        self.infer = infer
        self.fmt = get_fp8_format(fmt)

    # -------------------------------------------------------------------------------------------
    def _new_init(self, graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
        base, k = name, 1
        while name in graph.initializers:
            name, k = f"{base}_{k}", k + 1
        tensor = ir.Tensor(array, dtype=dtype, name=name) if dtype is not None else ir.tensor(array, name=name)
        v = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
        graph.register_initializer(v)
        return v

    def _match_cast_chain(self, div: ir.Node):
        """Div(x, s) [-> Clip] -> Cast(fp8) -> Cast(float) -> Mul(., s): returns (x, s, fmt, nodes, out) or None."""
        x, s_val = div.inputs[0], div.inputs[1]
        s = _const(s_val)
        if s is None or x is None:
            return None
        nodes = [div]
        cur = div.outputs[0]
        nxt = _single_consumer(cur, "Clip")
        if nxt is not None:
            nodes.append(nxt)
            cur = nxt.outputs[0]
        cast8 = _single_consumer(cur, "Cast")
        if cast8 is None:
            return None
        fmt = _FP8_BY_IR.get(ir.DataType(cast8.attributes.get_int("to", 0)))
        if fmt is None:
            return None
        castf = _single_consumer(cast8.outputs[0], "Cast")
        if castf is None or ir.DataType(castf.attributes.get_int("to", 0)) not in _FLOATS:
            return None
        mul = _single_consumer(castf.outputs[0], "Mul")
        if mul is None:
            return None
        other = mul.inputs[1] if mul.inputs[0] is castf.outputs[0] else mul.inputs[0]
        s2 = _const(other)
        if s2 is None or not np.array_equal(np.asarray(s2, np.float32), np.asarray(s, np.float32)):
            return None
        if nodes[-1].op_type == "Clip":
            lo, hi = (_const(v) if v is not None else None for v in (list(nodes[-1].inputs) + [None, None])[1:3])
            # a clip tighter than the format's range is not plain saturation: leave such graphs alone
            if lo is None or hi is None or float(hi) < fmt.max or float(lo) > -fmt.max:
                return None
        return x, s_val, np.asarray(s, np.float32), fmt, nodes + [cast8, castf, mul], mul.outputs[0]

    def _convert_chains(self, model: ir.Model, records: list[QatRecord]) -> bool:
        graph = model.graph
        changed = False
        for div in [n for n in graph if n.op_type == "Div"]:
            if div.graph is not graph:
                continue
            m = self._match_cast_chain(div)
            if m is None:
                continue
            x, s_val, s, fmt, nodes, out = m
            s_value = s_val if s_val.is_initializer() else self._new_init(graph, f"{out.name}_scale", s)
            x_const = _const(x) if (x.is_initializer() or (x.producer() is not None and x.producer().op_type == "Constant")) else None
            new_nodes: list[ir.Node] = []
            if x_const is not None:
                # same float32 division as torch, then RNE + saturation into FP8
                q = cast_fp8_saturate(np.asarray(x_const, np.float32) / s, fmt)
                q_value = self._new_init(graph, f"{x.name}_fp8", q, fmt.ir_dtype)
                dq = ir.node("DequantizeLinear", [q_value, s_value], {}, name=f"{out.name}_DequantizeLinear")
                new_nodes.append(dq)
                kind = "weight"
            else:
                q = ir.node("QuantizeLinear", [x, s_value], {"saturate": 1, "output_dtype": int(fmt.ir_dtype)}, name=f"{out.name}_QuantizeLinear")
                q.outputs[0].type = ir.TensorType(fmt.ir_dtype)
                dq = ir.node("DequantizeLinear", [q.outputs[0], s_value], {}, name=f"{out.name}_DequantizeLinear")
                new_nodes.extend([q, dq])
                kind = "activation"
            dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            dq.outputs[0].shape = out.shape
            graph.insert_before(nodes[-1], new_nodes)
            ir.convenience.replace_all_uses_with(out, dq.outputs[0])
            if out.is_graph_output():
                idx = list(graph.outputs).index(out)
                name = out.name
                out.name = f"{name}_fake_quant"
                dq.outputs[0].name = name
                graph.outputs[idx] = dq.outputs[0]
            else:
                dq.outputs[0].name = f"{out.name}_qdq"
            dropped = [i for n in nodes for i in n.inputs]
            for n in reversed(nodes):
                graph.remove(n, safe=True)
            for v in dropped:
                _drop_if_unused(graph, v)
            records.append(QatRecord(f"fake-quant {kind}", x.name, s.tolist(), "graph", fmt.name, True))
            changed = True
        return changed

    def _fold_weight_qdq(self, model: ir.Model, records: list[QatRecord]) -> bool:
        graph = model.graph
        changed = False
        for qn in [n for n in graph if n.op_type == "QuantizeLinear"]:
            w = _const(qn.inputs[0])
            s = _const(qn.inputs[1]) if len(qn.inputs) > 1 else None
            if w is None or s is None or not qn.inputs[0].is_initializer():
                continue
            zp_value = qn.inputs[2] if len(qn.inputs) > 2 else None
            zp = _const(zp_value) if zp_value is not None else None
            axis = qn.attributes.get_int("axis", 1)
            block = qn.attributes.get_int("block_size", 0)
            out_dtype = qn.attributes.get_int("output_dtype", 0)
            if zp_value is not None and zp_value.dtype is not None:
                target = zp_value.dtype
            elif out_dtype:
                target = ir.DataType(out_dtype)
            else:
                target = ir.DataType.UINT8
            s_full = expand_scale(np.asarray(s, np.float32), w.shape, axis if np.ndim(s) else None, block or None)
            x = np.asarray(w, np.float32) / s_full
            if target in _FP8_BY_IR:
                q = cast_fp8_saturate(x, _FP8_BY_IR[target])
            elif target in (ir.DataType.INT8, ir.DataType.UINT8):
                info = np.iinfo(np.int8 if target == ir.DataType.INT8 else np.uint8)
                zp_full = 0 if zp is None else expand_scale(np.asarray(zp, np.float32), w.shape, axis if np.ndim(zp) else None, block or None)
                q = np.clip(np.rint(x) + zp_full, info.min, info.max).astype(info.dtype)
            else:
                continue
            q_value = self._new_init(graph, f"{qn.inputs[0].name}_quantized", q, target)
            ir.convenience.replace_all_uses_with(qn.outputs[0], q_value)
            w_value = qn.inputs[0]
            graph.remove(qn, safe=True)
            _drop_if_unused(graph, w_value)
            records.append(QatRecord("weight qdq", w_value.name, np.asarray(s).tolist(), "graph", target.name, True))
            changed = True
        return changed

    def _fold_grid_weights(self, model: ir.Model, records: list[QatRecord]) -> bool:
        graph = model.graph
        changed = False
        for t in list(weight_targets(graph)):
            w_value = t.weight
            if w_value.name not in graph.initializers or w_value.const_value is None:
                continue
            w = np.asarray(w_value.const_value.numpy(), np.float32)
            axis = None
            source = "given"
            if w_value.name in self.weight_scales:
                s = np.asarray(self.weight_scales[w_value.name], np.float32)
                if s.size > 1:
                    s = s.reshape(-1)
                    axis = t.output_axis
                    if axis is None or s.shape[0] != w.shape[axis]:
                        continue
                else:
                    s = s.reshape(())
            elif self.infer:
                source = "inferred"
                per_tensor = _fp8_grid_scale(w, self.fmt)
                if per_tensor is not None:
                    s = np.array(per_tensor, np.float32)
                elif t.output_axis is not None:
                    moved = np.moveaxis(w, t.output_axis, 0)
                    per_ch = [_fp8_grid_scale(moved[i], self.fmt) for i in range(moved.shape[0])]
                    if any(p is None for p in per_ch):
                        continue
                    s, axis = np.array(per_ch, np.float32), t.output_axis
                else:
                    continue
            else:
                continue
            s_b = s if axis is None else s.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
            q = cast_fp8_saturate(w / s_b, self.fmt)
            exact = bool(np.array_equal(q.astype(np.float32) * s_b, w))
            q_value = self._new_init(graph, f"{w_value.name}_fp8", q, self.fmt.ir_dtype)
            s_value = self._new_init(graph, f"{w_value.name}_scale", s)
            attrs = {"axis": int(axis)} if axis is not None else {}
            dq = ir.node("DequantizeLinear", [q_value, s_value], attrs, name=f"{w_value.name}_DequantizeLinear")
            dq.outputs[0].name = f"{w_value.name}_dequantized"
            dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            dq.outputs[0].shape = ir.Shape(list(w.shape))
            graph.insert_before(graph.node(0), [dq])
            for use in list(w_value.uses()):
                if use.node is not dq:
                    use.node.replace_input_with(use.idx, dq.outputs[0])
            if not w_value.uses() and not w_value.is_graph_output():
                graph.initializers.pop(w_value.name)
            records.append(QatRecord("folded weight", w_value.name, s.tolist(), source, self.fmt.name, exact, t.layer))
            changed = True
        return changed

    def call(self, model: ir.Model) -> QatImportResult:
        records: list[QatRecord] = []
        changed = self._convert_chains(model, records)
        changed |= self._fold_weight_qdq(model, records)
        changed |= self._fold_grid_weights(model, records)
        if changed:
            require_opset(model, ORT_OPSET)
        return QatImportResult(model, changed, records)
