"""Random inputs a model accepts, synthesized from its graph: the one generator behind ``run --random``, the
checks of ``compile`` and ``batch verify``, random calibration and the shape probes of the passes.

* integer inputs that index a table (a Gather on a constant, reached through Cast/Reshape/Add/... ) are drawn
  below the table's row count: ``token_type_ids`` of BERT stay under 2, positions under the position table;
* masks (the name says ``mask``, or the value is consumed as a condition: Where, Not/And/Or, Cast to bool)
  are drawn from {0, 1}, mostly ones and always one at the first position (no fully masked row);
* image-like float inputs (4-D NCHW with 1 or 3 channels, or named like pixels/images) lie in [0, 1);
  other floats are standard normal.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import ml_dtypes
import numpy as np
import onnx_ir as ir

DEFAULT_DIM = 2  # value used for a symbolic dim nobody named
DEFAULT_INT_HIGH = 8  # integers that index nothing we can see: [0, 8)
MASK_ONES = 0.9  # share of ones in a synthesized mask

_INTS = {ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32, ir.DataType.INT16: np.int16,
         ir.DataType.INT8: np.int8, ir.DataType.UINT8: np.uint8, ir.DataType.UINT16: np.uint16,
         ir.DataType.UINT32: np.uint32, ir.DataType.UINT64: np.uint64}
_FLOATS = {ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64, ir.DataType.FLOAT16: np.float16,
           ir.DataType.BFLOAT16: ml_dtypes.bfloat16, ir.DataType.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn,
           ir.DataType.FLOAT8E5M2: ml_dtypes.float8_e5m2}
# ops an index goes through unchanged in value (shape, type or layout only), on the way to its Gather
_INDEX_PASSTHROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Identity", "Slice", "Concat",
                      "Transpose", "Tile", "Clip", "Max", "Min", "CastLike", "Add", "Sub"}
# ops between a weight and the Gather that reads it (the row count is the weight's)
_TABLE_PASSTHROUGH = {"Cast", "Identity", "DequantizeLinear", "CastLike", "Mul", "Div"}
_MASK_CONSUMERS = {("Where", 0), ("Not", 0), ("And", 0), ("And", 1), ("Or", 0), ("Or", 1), ("Xor", 0), ("Xor", 1)}
_IMAGE_NAMES = ("pixel", "image", "img")


def input_shape(value: ir.Value, dims: Mapping[str, int] | None = None) -> tuple[int, ...]:
    """Concrete shape of a graph input: fixed dims as they are, symbolic ones from ``dims`` (``"*"``: any)."""
    dims = dims or {}
    return tuple(d if isinstance(d, int) else int(dims.get(str(d), dims.get("*", DEFAULT_DIM)))
                 for d in (value.shape or ()))


def feed_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs a caller feeds (not those that double as initializers)."""
    return [v for v in model.graph.inputs if v.name not in model.graph.initializers]


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def _is_table(value: ir.Value | None, depth: int = 0) -> bool:
    """Whether a Gather's data input is a weight (an initializer or constant, possibly cast/dequantized)."""
    if value is None or depth > 4:
        return False
    if value.const_value is not None or value.is_initializer():
        return True
    node = value.producer()
    if node is None:
        return False
    if node.op_type == "Constant":
        return True
    return node.op_type in _TABLE_PASSTHROUGH and _is_table(node.inputs[0], depth + 1)


def _table_rows(gather: ir.Node) -> int | None:
    data = gather.inputs[0]
    if not _is_table(data) or data.shape is None:
        return None
    axis = gather.attributes.get_int("axis", 0)
    if axis < 0:
        axis += len(data.shape)
    dim = data.shape[axis] if 0 <= axis < len(data.shape) else None
    return dim if isinstance(dim, int) and dim > 0 else None


def index_range(value: ir.Value) -> int | None:
    """Exclusive upper bound for an integer input that indexes a table: the fewest rows any Gather it reaches
    can take, minus constant offsets added on the way (``positions + 2`` into a table of 130 rows -> 128)."""
    best: int | None = None
    seen: set[int] = set()
    todo: list[tuple[ir.Value, int]] = [(value, 0)]
    while todo:
        current, offset = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for node, idx in current.uses():
            if node.op_type == "Gather" and idx == 1:
                rows = _table_rows(node)
                if rows is not None and rows - offset > 0:
                    best = rows - offset if best is None else min(best, rows - offset)
                continue
            if node.op_type not in _INDEX_PASSTHROUGH or (node.op_type in ("Reshape", "Expand", "Tile") and idx != 0):
                continue
            shift = 0
            if node.op_type in ("Add", "Sub"):
                other = _constant(node.inputs[1 - idx]) if idx < 2 else None
                if other is not None and other.size and np.issubdtype(other.dtype, np.number):
                    shift = int(np.max(other)) if node.op_type == "Add" else (-int(np.min(other)) if idx == 0 else 0)
            todo.extend((out, offset + max(shift, 0)) for out in node.outputs)
    return best


def is_mask(value: ir.Value) -> bool:
    """A mask: named so, or consumed (directly or through a cast/reshape) as a boolean condition."""
    if "mask" in value.name.lower():
        return True
    seen: set[int] = set()
    todo = [value]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for node, idx in current.uses():
            if (node.op_type, idx) in _MASK_CONSUMERS:
                return True
            if node.op_type == "Cast" and node.attributes.get_int("to", 0) == ir.DataType.BOOL:
                return True
            if node.op_type in ("Reshape", "Unsqueeze", "Squeeze", "Expand", "Identity") and idx == 0:
                todo.extend(node.outputs)
    return False


def is_image(value: ir.Value, shape: tuple[int, ...]) -> bool:
    """A float NCHW input with 1 or 3 channels, or one named like pixels/images."""
    name = value.name.lower()
    return len(shape) == 4 and (shape[1] in (1, 3) or any(k in name for k in _IMAGE_NAMES))


def _mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    mask = rng.random(shape) < MASK_ONES
    if mask.ndim:
        mask[..., 0] = True  # every row attends to something
    return mask


def synthesize(value: ir.Value, shape: tuple[int, ...], rng: np.random.Generator,
               int_high: int = DEFAULT_INT_HIGH) -> np.ndarray:
    """Random values for one graph input of the given concrete shape (see the module docstring)."""
    dtype = value.dtype
    if dtype == ir.DataType.BOOL:
        return _mask(rng, shape)
    if dtype in _INTS:
        if is_mask(value):
            return _mask(rng, shape).astype(_INTS[dtype])
        return rng.integers(0, index_range(value) or int_high, size=shape).astype(_INTS[dtype])
    target = _FLOATS.get(dtype, np.float32)
    if is_mask(value):
        data = _mask(rng, shape).astype(np.float32)
    elif is_image(value, shape):
        data = rng.random(shape, dtype=np.float32)
    else:
        # standard normal: well inside every narrow format's range, so a bf16/fp8 cast only rounds
        data = rng.standard_normal(shape).astype(np.float32)
    return data.astype(target)


def make_inputs(model: ir.Model, seed: int = 0, dims: Mapping[str, int] | None = None,
                int_high: int = DEFAULT_INT_HIGH, *, rng: np.random.Generator | None = None, batch: int | None = None,
                inputs: Iterable[ir.Value] | None = None) -> dict[str, np.ndarray]:
    """Random feeds for every graph input the model accepts.

    Symbolic dims come from ``dims`` (``"*"`` for any other, else 2); ``batch`` overrides the first symbolic
    dim of every input; ``int_high`` bounds integers that index no table; ``rng`` (else ``seed``) draws.
    """
    rng = rng if rng is not None else np.random.default_rng(seed)
    feeds = {}
    for value in (feed_inputs(model) if inputs is None else inputs):
        shape = list(input_shape(value, dims))
        if batch is not None and value.shape is not None and len(value.shape) and not isinstance(value.shape[0], int):
            shape[0] = batch
        feeds[value.name] = synthesize(value, tuple(shape), rng, int_high)
    return feeds
