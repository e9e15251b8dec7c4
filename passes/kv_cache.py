"""KvCacheFp8Pass: make a decoder's KV cache FP8 (``past_key_values.*`` inputs and ``present.*`` outputs).

For every layer ``i`` and ``kind`` in (key, value):

    past_key_values.i.kind : FLOAT8  --DequantizeLinear(scale)-->  (what the graph read before)
    present.i.kind (float, Concat(past, new))  --QuantizeLinear(scale, saturate)-->  present.i.kind : FLOAT8
                                               --DequantizeLinear(scale)-->  attention

so the cache is stored in 1 byte per element (half of BF16) and attention reads every cached K/V
through a DequantizeLinear -- including the current step's, so one step sees exactly what later
steps will read back.  The past part of the Concat round-trips exactly (Q(DQ(q)) == q: FP8 values
times a float scale divide back to themselves), only the new tokens are rounded.  ONNX Concat has no
FP8 type, which is why the concat itself stays in float.

Scales (dequantisation multipliers, ``real = fp8 * scale``): per tensor (scalar) or per KV head
(``[kv_heads]`` on axis 1), either imported (``scales``: layer index -> {"k": ..., "v": ...}, e.g.
``maia_onnx.scales.map_scales(...)[0].kv`` from a checkpoint's ``k_scale`` / ``v_scale``) or calibrated
(``calib``: feed dicts run through the FP32 model; scale = amax(present) / fmt max).  Imported scales
win; layers they miss fall back to calibration, else the pass fails with the layers it lacks.

``call`` returns a ``KvCachePassResult`` whose ``record`` (``KvCacheRecord``) holds the scale used for every
cache tensor.  The model gets ``maia_onnx.kv_cache`` metadata (JSON: dtype, granularity, per-layer scales) so a runtime
knows how to allocate and read the cache.  ``maia_onnx.decode`` runs greedy decoding over such models.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import onnx_ir as ir
import onnx_ir.passes

from maia_onnx.errors import InvalidOptionError, UnsupportedModelError
from maia_onnx.formats.registry import kv_cache_format
from maia_onnx.ortutil import make_session
from maia_onnx.passes.quantize_mx import ORT_OPSET, require_opset

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
PRESENT = "present.{}.{}"
GRANULARITIES = ("tensor", "head")


@dataclass
class KvCacheRecord:
    """What the pass did: the FP8 element format, the scale granularity and the scale of every ``present.*`` tensor."""

    format: str  # FP8 element format name (e4m3fn / e5m2)
    granularity: str
    scales: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class KvCachePassResult(onnx_ir.passes.PassResult):
    record: KvCacheRecord | None = None


def kv_pairs(model: ir.Model) -> list[tuple[int, str, ir.Value, ir.Value]]:
    """(layer, kind, past input, present output) for every cache tensor of a decoder, in layer order."""
    outputs = {v.name: v for v in model.graph.outputs}
    pairs = []
    for value in model.graph.inputs:
        m = PAST.fullmatch(value.name or "")
        if m and PRESENT.format(m.group(1), m.group(2)) in outputs:
            pairs.append((int(m.group(1)), m.group(2), value, outputs[PRESENT.format(m.group(1), m.group(2))]))
    return sorted(pairs, key=lambda p: (p[0], p[1]))


def calibrate_kv_amax(model: ir.Model, feeds: Iterable[Mapping[str, np.ndarray]], granularity: str = "tensor") -> dict[str, np.ndarray]:
    """amax of every ``present.*`` output over the calibration feeds (per tensor, or per KV head on axis 1)."""
    sess = make_session(model)
    names = [o.name for o in sess.get_outputs() if o.name.startswith("present.")]
    amax: dict[str, np.ndarray] = {}
    for f in feeds:
        valid = getattr(f, "valid", None)  # maia_onnx.data.Feeds: [batch, seq] real positions; padding holds no cache
        for name, out in zip(names, sess.run(names, dict(f))):
            a = np.abs(out.astype(np.float32))
            if valid is not None and a.ndim == 4 and a.shape[2] == valid.shape[1]:
                a = a * valid[:, None, :, None]  # [batch, kv_heads, seq, head_dim]; 0 never raises an amax
            cur = a.max(axis=(0, 2, 3)) if granularity == "head" else np.array(a.max() if a.size else 0.0)
            amax[name] = np.maximum(amax[name], cur) if name in amax else cur
    return amax


class KvCacheFp8Pass(onnx_ir.passes.InPlacePass):
    """FP8 KV cache with per-tensor or per-head scales (imported ``k_scale``/``v_scale`` or calibrated).

    Args:
        fmt: "e4m3fn" / "fp8-e4m3" (default) or "e5m2" / "fp8-e5m2".
        granularity: "tensor" (one scale per cache tensor) or "head" (one per KV head).
        scales: layer index -> {"k": scale, "v": scale} (scalar or [kv_heads]); e.g. ``ScaleMap.kv``.
        calib: iterable of feed dicts for the FP32 model (e.g. a prefill of real prompts).
    """

    def __init__(
        self,
        fmt: str = "e4m3fn",
        granularity: str = "tensor",
        scales: Mapping[int, Mapping[str, np.ndarray | float]] | None = None,
        calib: Iterable[Mapping[str, np.ndarray]] | None = None,
    ):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise InvalidOptionError(f"KV-cache scale granularity {granularity!r}: use 'tensor' or 'head'")
        self.fmt = kv_cache_format(fmt)
        self.granularity = granularity
        self.scales = {int(k): dict(v) for k, v in (scales or {}).items()}
        self.calib = list(calib) if calib is not None else None

    def _scale_for(self, layer: int, kind: str, heads: int | None, amax: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
        slot = "k" if kind == "key" else "v"
        if layer in self.scales and slot in self.scales[layer]:
            s = np.asarray(self.scales[layer][slot], dtype=np.float32)
            if s.size == 1:
                s = s.reshape(())
                if self.granularity == "head" and heads:
                    s = np.full((heads,), float(s), np.float32)  # a per-tensor checkpoint scale serves every head
            elif heads is not None and s.shape != (heads,):
                raise InvalidOptionError(
                    f"imported {slot}_scale for layer {layer} has shape {s.shape}, expected a scalar or [{heads}] (KV heads)"
                )
            return s
        if amax is None:
            return None
        a = np.asarray(amax[PRESENT.format(layer, kind)], dtype=np.float64)
        s = np.where(a > 0, a / self.fmt.max, 1.0).astype(np.float32)
        return s.reshape(()) if s.size == 1 and self.granularity == "tensor" else s

    def call(self, model: ir.Model) -> KvCachePassResult:
        pairs = kv_pairs(model)
        if not pairs:
            raise UnsupportedModelError(
                "no KV cache found: --kv-cache needs a decoder with past_key_values.{i}.key/value inputs "
                "and present.{i}.key/value outputs"
            )
        needs_calib = any(
            l not in self.scales or ("k" if k == "key" else "v") not in self.scales[l] for l, k, _, _ in pairs
        )
        amax = None
        if needs_calib:
            if not self.calib:
                missing = sorted({l for l, k, _, _ in pairs if l not in self.scales or ("k" if k == "key" else "v") not in self.scales[l]})
                raise InvalidOptionError(
                    f"KV-cache FP8 needs scales for layers {missing}: import k_scale/v_scale (--scales) or give calibration data"
                )
            amax = calibrate_kv_amax(model, self.calib, self.granularity)
        require_opset(model, ORT_OPSET)
        graph = model.graph
        fp8_type = self.fmt.ir_dtype
        front: list[ir.Node] = []
        meta: dict[str, object] = {}
        record = KvCacheRecord(self.fmt.name, self.granularity)
        for layer, kind, past, present in pairs:
            heads = past.shape[1] if past.shape is not None and len(past.shape) == 4 and isinstance(past.shape[1], int) else None
            if self.granularity == "head" and heads is None:
                raise UnsupportedModelError(f"{past.name} has no static KV-head dimension (axis 1): use per-tensor KV scales")
            scale = self._scale_for(layer, kind, heads, amax)
            if scale.ndim == 1 and heads is not None and scale.shape[0] != heads:
                raise InvalidOptionError(f"scale for {past.name} has {scale.shape[0]} entries, the cache has {heads} KV heads")
            record.scales[present.name] = scale
            meta[present.name] = scale.tolist()
            attrs = {"axis": 1} if scale.ndim == 1 else {}
            s_name = f"kv_cache.{layer}.{kind}_scale"
            s_value = ir.Value(name=s_name, const_value=ir.tensor(scale, name=s_name), shape=ir.Shape(scale.shape), type=ir.TensorType(ir.DataType.FLOAT))
            graph.register_initializer(s_value)

            # past: FP8 graph input read through DequantizeLinear
            past_float = ir.Value(name=f"{past.name}_dequantized", shape=past.shape, type=ir.TensorType(ir.DataType.FLOAT))
            uses = list(past.uses())
            dq_past = ir.node("DequantizeLinear", [past, s_value], attrs, outputs=[past_float], name=f"{past.name}_DequantizeLinear")
            for use in uses:
                use.node.replace_input_with(use.idx, past_float)
            past.type = ir.TensorType(fp8_type)
            front.append(dq_past)

            # present: quantised graph output; attention reads the dequantised copy
            producer = present.producer()
            name = present.name
            present.name = f"{name}_float"
            q_out = ir.Value(name=name, shape=present.shape, type=ir.TensorType(fp8_type))
            q = ir.node(
                "QuantizeLinear", [present, s_value], {**attrs, "saturate": 1, "output_dtype": int(fp8_type)},
                outputs=[q_out], name=f"{name}_QuantizeLinear",
            )
            read_back = ir.Value(name=f"{name}_dequantized", shape=present.shape, type=ir.TensorType(ir.DataType.FLOAT))
            dq_present = ir.node("DequantizeLinear", [q_out, s_value], attrs, outputs=[read_back], name=f"{name}_DequantizeLinear")
            for use in list(present.uses()):
                if use.node is not q:
                    use.node.replace_input_with(use.idx, read_back)
            out_index = list(graph.outputs).index(present)
            graph.outputs[out_index] = q_out
            graph.insert_after(producer, [q, dq_present])
        first = graph.node(0)
        graph.insert_before(first, front)
        model.metadata_props["maia_onnx.kv_cache"] = json.dumps(
            {"dtype": fp8_type.name, "format": self.fmt.name, "granularity": self.granularity, "scales": meta}, sort_keys=True
        )
        return KvCachePassResult(model, True, record)
