"""Run Maia-compiled models in a plain ``onnxruntime.InferenceSession`` through onnxruntime-extensions custom ops.

A plain ORT session refuses EPContext nodes no registered provider claims, so ``to_ort_custom_op_model`` rewrites
each Maia ``EPContext`` node into an ``ai.onnx.contrib`` Python custom op bound to the emulator, and
``session_options()`` gives the SessionOptions with the onnxruntime-extensions library registered::

    model = to_ort_custom_op_model("model_ctx.onnx")
    sess = onnxruntime.InferenceSession(model.SerializeToString(), session_options())

onnxruntime-extensions returns Python-op outputs through Python lists (tens of MB/s), so this path is for users who
need a plain ORT session; ``maia_onnx.runtime.InferenceSession`` drives the partitions itself and avoids that cost.
A custom op has a fixed input/output type list, so each partition signature gets its own op type
(``MaiaPartition_<inputs>_<outputs>``), registered on first use in this process.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import onnx_ir as ir

from maia_onnx.errors import UnsupportedModelError

CUSTOM_DOMAIN = "ai.onnx.contrib"
_LOCK = threading.Lock()
_REGISTERED: dict[str, object] = {}
_PARTITIONS: dict[tuple[str, str], object] = {}

_TYPE_CODES = {
    ir.DataType.FLOAT: ("f", "dt_float"), ir.DataType.INT64: ("l", "dt_int64"), ir.DataType.INT32: ("i", "dt_int32"),
    ir.DataType.BOOL: ("b", "dt_bool"), ir.DataType.FLOAT16: ("h", "dt_float16"), ir.DataType.DOUBLE: ("d", "dt_double"),
    ir.DataType.UINT8: ("B", "dt_uint8"), ir.DataType.INT8: ("c", "dt_int8"),
}


def _partition(model_path: str, partition_name: str):
    """The emulator for one partition of a compiled model file (loaded once per process)."""
    key = (model_path, partition_name)
    with _LOCK:
        if key not in _PARTITIONS:
            from maia_onnx.io import load_model
            from maia_onnx.runtime.emulator import EmulatedPartition
            from maia_onnx.runtime.session import _is_maia_context, _ProgramSource

            model = load_model(model_path)
            source = _ProgramSource(Path(model_path).parent)
            for node in model.graph:
                if _is_maia_context(node) and node.attributes["partition_name"].value == partition_name:
                    _PARTITIONS[key] = EmulatedPartition(source.program(node))
                    break
            else:
                raise UnsupportedModelError(f"partition {partition_name!r} not found in {model_path}: recompile the model")
        return _PARTITIONS[key]


def _op_type(in_types: list[ir.DataType], out_types: list[ir.DataType]) -> str:
    for t in list(in_types) + list(out_types):
        if t not in _TYPE_CODES:
            raise UnsupportedModelError(
                f"a Maia partition has a {t.name} input/output, which onnxruntime-extensions Python ops cannot carry; "
                "use maia_onnx.runtime.InferenceSession instead"
            )
    sig = "".join(_TYPE_CODES[t][0] for t in in_types) + "_" + "".join(_TYPE_CODES[t][0] for t in out_types)
    # op types must be identifiers; the case-sensitive codes are hashed to stay unique
    return f"MaiaPartition_{len(in_types)}x{len(out_types)}_{hashlib.sha1(sig.encode()).hexdigest()[:10]}"


def register_op(in_types: list[ir.DataType], out_types: list[ir.DataType]) -> str:
    """Register (once) the Python custom op for a partition signature; returns its op type."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    op_type = _op_type(in_types, out_types)
    with _LOCK:
        if op_type in _REGISTERED:
            return op_type

        @onnx_op(
            op_type=op_type,
            domain=CUSTOM_DOMAIN,
            inputs=[getattr(PyCustomOpDef, _TYPE_CODES[t][1]) for t in in_types],
            outputs=[getattr(PyCustomOpDef, _TYPE_CODES[t][1]) for t in out_types],
            attrs={"model_path": PyCustomOpDef.dt_string, "partition_name": PyCustomOpDef.dt_string},
        )
        def maia_partition(*inputs, model_path, partition_name):
            outputs = _partition(model_path, partition_name)(*inputs)
            return tuple(outputs) if len(outputs) > 1 else outputs[0]

        _REGISTERED[op_type] = maia_partition
    return op_type


def session_options(base=None):
    """SessionOptions with the onnxruntime-extensions library (and so every registered Maia op) registered.

    Call after ``to_ort_custom_op_model`` so the model's partition ops are registered first.
    """
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    so = base or ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    return so


def to_ort_custom_op_model(path: str | os.PathLike, output: str | os.PathLike | None = None):
    """A copy of a Maia-compiled model where every Maia EPContext node is an ``ai.onnx.contrib`` custom op.

    Returns the ``onnx.ModelProto`` (and saves it to ``output`` when given). The ops load their program from
    the compiled model at ``path`` (absolute path recorded in the node), so keep that model where it is.
    """
    import onnx

    from maia_onnx.io import load_model, save_model
    from maia_onnx.runtime.session import _is_maia_context

    path = Path(path).resolve()
    model = load_model(path)
    found = False
    for node in list(model.graph):
        if not _is_maia_context(node):
            continue
        found = True
        op_type = register_op([v.dtype for v in node.inputs], [v.dtype for v in node.outputs])
        attrs = [ir.AttrString("model_path", str(path)), ir.AttrString("partition_name", node.attributes["partition_name"].value)]
        custom = ir.Node(CUSTOM_DOMAIN, op_type, list(node.inputs), attrs, num_outputs=len(node.outputs), name=node.name)
        for old, new in zip(node.outputs, custom.outputs):
            name, typ, shape = old.name, old.type, old.shape
            old.name = None
            new.name, new.type, new.shape = name, typ, shape
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        model.graph.insert_after(node, custom)
        model.graph.remove(node, safe=True)
    if not found:
        raise UnsupportedModelError(f"{path} has no Maia EPContext nodes: compile it first (maia-onnx compile)")
    model.opset_imports[CUSTOM_DOMAIN] = 1
    if "com.microsoft" in model.opset_imports and not any(n.domain == "com.microsoft" for n in model.graph):
        del model.opset_imports["com.microsoft"]
    if output is not None:
        save_model(model, output)
    proto = ir.to_proto(model)
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    if any(uses_external_data(t) for t in proto.graph.initializer):
        load_external_data_for_model(proto, str(path.parent))
    return proto if isinstance(proto, onnx.ModelProto) else onnx.ModelProto.FromString(proto.SerializeToString())
