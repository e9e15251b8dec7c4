"""Accuracy report of a quantized model against its unquantized original on held-out samples.

Per quantized layer: SQNR (dB) and max abs error of the layer's output (quantized model vs original, same
value names since QDQ only rewires inputs), the scales used, and the fraction of the layer's input
activations that the static scale clips.  End to end, per graph output: cosine, relative error
(||q - ref|| / ||ref||), max abs error and top-1 agreement (argmax over the last axis).  The result is an
``AccuracyReport`` (typed rows; ``to_dict()`` is the ``accuracy`` section of ``quantize --report`` JSON).
Padded token positions of text batches (``Feeds.valid``) are left out of every number.  On text / image data
the report also carries ``maia_onnx.evaluate``'s task metrics (perplexity delta, embedding cosine ...).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from maia_onnx.calib import _session_with_outputs, declared_shapes
from maia_onnx.data import feeds_valid, real_positions
from maia_onnx.passes.quantize_fp8 import LayerRecord
from maia_onnx.report import format_table

LAYER_COLUMNS = ["layer", "op", "sqnr_db", "max_abs_err", "act_scale", "weight_scale", "clipped"]
OUTPUT_COLUMNS = ["output", "cosine", "rel_err", "max_abs_err", "top1_agree"]


@dataclass
class Accumulator:
    """Streaming sums for SQNR / cosine / relative error / top-1 agreement over many batches (also used by eval)."""

    signal: float = 0.0  # sum ref^2
    noise: float = 0.0  # sum (ref - q)^2
    dot: float = 0.0  # sum ref * q
    q_energy: float = 0.0  # sum q^2
    max_abs: float = 0.0
    top1_match: int = 0
    top1_total: int = 0

    def update(self, ref: np.ndarray, got: np.ndarray, top1: bool = False) -> None:
        r = np.asarray(ref, dtype=np.float64)
        g = np.asarray(got, dtype=np.float64)
        if r.shape != g.shape:
            raise ValueError(f"shape mismatch {r.shape} vs {g.shape}")
        d = r - g
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum(d * d))
        self.dot += float(np.sum(r * g))
        self.q_energy += float(np.sum(g * g))
        if d.size:
            self.max_abs = max(self.max_abs, float(np.nanmax(np.abs(d))))
        if top1 and r.ndim >= 1 and r.shape[-1] > 1:
            self.top1_match += int(np.sum(r.argmax(-1) == g.argmax(-1)))
            self.top1_total += int(np.prod(r.shape[:-1]))

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.signal * self.q_energy)
        return self.dot / denom if denom > 0 else (1.0 if self.noise == 0 else 0.0)

    @property
    def rel_err(self) -> float:
        return math.sqrt(self.noise / self.signal) if self.signal > 0 else (0.0 if self.noise == 0 else math.inf)

    @property
    def top1(self) -> float | None:
        return self.top1_match / self.top1_total if self.top1_total else None


@dataclass
class LayerAccuracy:
    """One quantized layer's output error against the original, plus the scales it used."""

    layer: str
    node: str
    op: str
    output: str
    sqnr_db: float
    max_abs_err: float
    act_scale: float | None
    activation_scales: dict[str, float]
    weight: str | None
    weight_scale: float | None
    weight_scale_min: float | None
    weight_granularity: str | None
    weight_sqnr_db: float | None
    clipped: float  # share of the layer's input activations beyond the static scale's range


@dataclass
class OutputAccuracy:
    """One graph output of the quantized model against the original's."""

    cosine: float
    rel_err: float
    max_abs_err: float
    sqnr_db: float
    top1_agree: float | None


@dataclass
class AccuracySummary:
    samples_batches: int
    min_output_cosine: float
    max_output_rel_err: float
    worst_layer_sqnr_db: float | None
    quantized_layers: int
    top1_agree: float | None = None  # of the first graph output
    source: str | None = None  # where the held-out samples came from (set by the caller)
    seconds: float | None = None


@dataclass
class AccuracyReport:
    layers: list[LayerAccuracy] = field(default_factory=list)
    outputs: dict[str, OutputAccuracy] = field(default_factory=dict)
    summary: AccuracySummary | None = None
    task: str | None = None  # maia_onnx.evaluate's task ("decoder" / "encoder" / "generic") on text / image data
    task_metrics: dict[str, Any] | None = None  # its metrics (perplexity delta, embedding cosine ...)

    @property
    def min_output_cosine(self) -> float | None:
        return self.summary.min_output_cosine if self.summary else None

    def to_dict(self) -> dict[str, Any]:
        summary = {k: v for k, v in asdict(self.summary).items() if k not in ("top1_agree", "source", "seconds")} if self.summary else {}
        if self.summary is not None:
            if self.outputs:
                summary["top1_agree"] = self.summary.top1_agree
            summary.update({k: getattr(self.summary, k) for k in ("source", "seconds") if getattr(self.summary, k) is not None})
        out = {
            "layers": [asdict(row) for row in self.layers],
            "outputs": {name: asdict(o) for name, o in self.outputs.items()},
            "summary": summary,
        }
        if self.task_metrics is not None:
            out.update(task=self.task, task_metrics=dict(self.task_metrics))
        return out


_FP8_TYPES = (ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2)


def float_io_model(model: ir.Model) -> ir.Model:
    """A copy of ``model`` whose FP8 graph inputs/outputs (e.g. an FP8 KV cache) are float32 again.

    An FP8 input read by ``DequantizeLinear(x, scale[, zp])`` gets a float input of the same name feeding
    ``QuantizeLinear`` with that scale; an FP8 output made by ``QuantizeLinear(x, scale, zp)`` is followed
    by the matching ``DequantizeLinear``.  The copy computes exactly what the FP8 model computes on a float
    cache that went through FP8 storage, so it can be compared with the FP32 model on the same feeds.
    """
    if not any(v.dtype in _FP8_TYPES for v in list(model.graph.inputs) + list(model.graph.outputs)):
        return model
    model = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    graph = model.graph
    for i, value in enumerate(list(graph.inputs)):
        if value.dtype not in _FP8_TYPES:
            continue
        dq = next((u.node for u in value.uses() if u.node.op_type == "DequantizeLinear" and u.idx == 0), None)
        if dq is None:
            continue
        name = value.name
        value.name = f"{name}__fp8"
        float_in = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=value.shape)
        attrs = {k: a.value for k, a in dq.attributes.items() if k in ("axis", "block_size")}
        if len(dq.inputs) < 3 or dq.inputs[2] is None:
            attrs["output_dtype"] = int(value.dtype)  # without a zero point the type must be stated
        q = ir.node("QuantizeLinear", [float_in, *dq.inputs[1:]], attributes=attrs)
        q.outputs[0].name = f"{name}__fp8q"
        q.outputs[0].type = value.type
        q.outputs[0].shape = value.shape
        value.replace_all_uses_with(q.outputs[0])
        graph.inputs[i] = float_in
        graph.insert_before(graph.node(0), [q])
    for i, value in enumerate(list(graph.outputs)):
        if value.dtype not in _FP8_TYPES or value.producer() is None or value.producer().op_type != "QuantizeLinear":
            continue
        q = value.producer()
        name = value.name
        value.name = f"{name}__fp8"
        dq = ir.node("DequantizeLinear", [value, *q.inputs[1:]], attributes={k: a.value for k, a in q.attributes.items() if k in ("axis", "block_size")})
        dq.outputs[0].name = name
        dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        dq.outputs[0].shape = value.shape
        graph.insert_after(q, [dq])
        graph.outputs[i] = dq.outputs[0]
    return model


def _is_float(arr: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(arr).dtype, np.floating)


def evaluate_accuracy(
    reference: ir.Model,
    quantized: ir.Model,
    batches: Iterable[Mapping[str, np.ndarray]],
    layers: Sequence[LayerRecord] = (),
    fmt_max: float = 448.0,
) -> AccuracyReport:
    """Run both models on ``batches``; per-layer rows for the ``layers`` the FP8 pass quantized, per-output rows."""
    quantized = float_io_model(quantized)
    layer_outputs = [r.outputs[0] for r in layers if r.outputs]
    act_inputs = sorted({name for r in layers for name in r.activation_scales})
    ref_graph_outputs = [o.name for o in reference.graph.outputs]
    q_graph_outputs = {o.name for o in quantized.graph.outputs}
    ref_sess = _session_with_outputs(reference, list(dict.fromkeys(layer_outputs + act_inputs)))
    q_sess = _session_with_outputs(quantized, layer_outputs)
    ref_names = [o.name for o in ref_sess.get_outputs()]
    q_names = [o.name for o in q_sess.get_outputs()]

    per_layer = {name: Accumulator() for name in layer_outputs}
    per_output = {name: Accumulator() for name in ref_graph_outputs if name in q_graph_outputs}
    clipped = {name: [0, 0] for name in act_inputs}
    scales = {name: s for r in layers for name, s in r.activation_scales.items()}
    declared = declared_shapes(reference, list(per_layer) + list(per_output) + act_inputs)
    n_batches = 0
    for feeds in batches:
        valid = feeds_valid(feeds)
        ref_vals = dict(zip(ref_names, ref_sess.run(ref_names, dict(feeds))))
        q_vals = dict(zip(q_names, q_sess.run(q_names, dict(feeds))))
        for k, v in feeds.items():
            ref_vals.setdefault(k, v)

        def real(values, name):
            return real_positions(values[name], valid, declared.get(name))

        for name, acc in per_layer.items():
            if name in ref_vals and name in q_vals and _is_float(ref_vals[name]):
                acc.update(real(ref_vals, name), real(q_vals, name))
        for name, acc in per_output.items():
            if _is_float(ref_vals[name]):
                acc.update(real(ref_vals, name), real(q_vals, name), top1=True)
        for name in act_inputs:
            if name in ref_vals:
                x = np.abs(np.asarray(real(ref_vals, name), dtype=np.float32))
                clipped[name][0] += int(np.count_nonzero(x > scales[name] * fmt_max))
                clipped[name][1] += x.size
        n_batches += 1

    names = [r.layer or r.node for r in layers if r.outputs]
    repeated = {n for n in names if names.count(n) > 1}  # e.g. the two attention matmuls of one module
    layer_rows = []
    for r in layers:
        if not r.outputs:
            continue
        acc = per_layer[r.outputs[0]]
        n_clip = sum(clipped[a][0] for a in r.activation_scales)
        n_tot = sum(clipped[a][1] for a in r.activation_scales)
        act_scale = max(r.activation_scales.values()) if r.activation_scales else None
        name = r.layer or r.node
        layer_rows.append(
            LayerAccuracy(
                layer=name + (f" ({r.node})" if name in repeated else ""),
                node=r.node,
                op=r.op_type,
                output=r.outputs[0],
                sqnr_db=acc.sqnr_db,
                max_abs_err=acc.max_abs,
                act_scale=act_scale,
                activation_scales=dict(r.activation_scales),
                weight=r.weight,
                weight_scale=r.weight_scale_max,
                weight_scale_min=r.weight_scale_min,
                weight_granularity=r.weight_granularity,
                weight_sqnr_db=r.weight_sqnr_db,
                clipped=(n_clip / n_tot) if n_tot else 0.0,
            )
        )
    outputs = {
        name: OutputAccuracy(acc.cosine, acc.rel_err, acc.max_abs, acc.sqnr_db, acc.top1)
        for name, acc in per_output.items()
    }
    finite_sqnr = [row.sqnr_db for row in layer_rows if math.isfinite(row.sqnr_db)]
    first = next(iter(outputs.values()), None)
    summary = AccuracySummary(
        samples_batches=n_batches,
        min_output_cosine=min((o.cosine for o in outputs.values()), default=1.0),
        max_output_rel_err=max((o.rel_err for o in outputs.values()), default=0.0),
        worst_layer_sqnr_db=min(finite_sqnr) if finite_sqnr else None,
        quantized_layers=len(layer_rows),
        top1_agree=first.top1_agree if first is not None else None,
    )
    return AccuracyReport(layer_rows, outputs, summary)


def format_report(report: AccuracyReport, max_layers: int | None = 40) -> str:
    """Terminal tables: per-layer rows (worst SQNR first when truncated) then per-output rows."""
    data = report.to_dict()
    parts = []
    rows = list(data["layers"])
    title = f"per-layer accuracy ({len(rows)} quantized layers)"
    if max_layers is not None and len(rows) > max_layers:
        rows = sorted(rows, key=lambda r: r["sqnr_db"])[:max_layers]
        title += f", worst {max_layers} by SQNR"
    if rows:
        parts.append(format_table(rows, LAYER_COLUMNS, title))
    out_rows = [{"output": k, **v} for k, v in data["outputs"].items()]
    if out_rows:
        parts.append(format_table(out_rows, OUTPUT_COLUMNS, "end-to-end accuracy vs the unquantized model"))
    if report.task_metrics:
        rows = [{"metric": k, "value": v} for k, v in report.task_metrics.items()]
        parts.append(format_table(rows, ["metric", "value"], f"task metrics ({report.task}) on the held-out data"))
    return "\n\n".join(parts)
