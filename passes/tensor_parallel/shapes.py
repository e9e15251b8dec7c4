"""Shape probing for the tensor-parallel rewrite: a concrete shape for every value of a model.

Symbolic input dims get distinct odd primes (no model dim equals them, so a split axis is never confused with a
batch or sequence axis); ONNX data-propagating shape inference does the rest, and an ORT run on probe inputs
fills what inference leaves unknown in models small enough to run.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from maia_onnx.io import initializer_bytes
from maia_onnx.ortutil import make_inputs, make_session, to_ort_feed

# dims given to symbolic input dims when resolving concrete shapes: odd primes no model dim will equal
PROBE_DIMS = (3, 5, 7, 11, 13, 17, 19, 23)
ORT_PROBE_MAX_BYTES = 512 * 1024 * 1024  # larger models are not run to fill shape gaps


def _ir_shape(value: ir.Value) -> tuple | None:
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


def probe_dims(model: ir.Model) -> dict[str, int]:
    """Concrete values for the symbolic input dims (distinct odd primes)."""
    dims: dict[str, int] = {}
    for value in model.graph.inputs:
        for d in value.shape or ():
            if not isinstance(d, int) and str(d) not in dims:
                dims[str(d)] = PROBE_DIMS[len(dims) % len(PROBE_DIMS)]
    return dims


def infer_full_shapes(model: ir.Model, dims: dict[str, int] | None = None) -> dict[str, tuple]:
    """Concrete shape of every value for probe input dims (ONNX data-propagating shape inference).

    Unknown dims are None. Small models fill the gaps by an ORT run on probe inputs.
    """
    dims = dims if dims is not None else probe_dims(model)
    proto = ir.to_proto(model)
    for vi in proto.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_value = dims.get(d.dim_param, PROBE_DIMS[0])
    del proto.graph.value_info[:]
    shapes: dict[str, tuple] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - inference gaps are filled below
        inferred = proto
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)
    for name, value in model.graph.initializers.items():
        if value.const_value is not None:
            shapes[name] = tuple(int(d) for d in value.const_value.shape)
    for node in model.graph:
        for out in node.outputs:
            if out.name not in shapes:
                shapes[out.name] = _ir_shape(out) if out.shape is not None else None
    missing = [k for k, v in shapes.items() if v is None or any(d is None for d in v)]
    if missing and initializer_bytes(model) < ORT_PROBE_MAX_BYTES:
        shapes.update(_ort_shapes(model, dims, missing))
    return shapes


def _ort_shapes(model: ir.Model, dims: dict[str, int], names: list[str]) -> dict[str, tuple]:
    """Shapes of ``names`` from an ORT run of a copy of the model with those values as extra outputs."""
    probe = model.clone()
    by_name = {o.name: o for n in probe.graph for o in n.outputs}
    existing = {o.name for o in probe.graph.outputs}
    for name in names:
        if name in by_name and name not in existing and name not in probe.graph.initializers:
            probe.graph.outputs.append(by_name[name])
    feeds = make_inputs(probe, seed=0, dims=dims, int_high=2)
    sess = make_session(probe)
    out_names = [o.name for o in sess.get_outputs()]
    # OrtValues all the way (only the shapes are wanted; bfloat16/float8 outputs stay opaque); onnxruntime is
    # imported here, as ortutil does, so importing the pass does not load it
    import onnxruntime as ort

    values = {}
    for name, arr in feeds.items():
        value = to_ort_feed(arr)
        values[name] = value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
    results = sess.run_with_ort_values(out_names, values)
    return {n: tuple(int(d) for d in r.shape()) for n, r in zip(out_names, results)}
