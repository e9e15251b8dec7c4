"""Tensor parallelism: rewrite one ONNX model into ``tp`` rank models (Megatron layout) with collectives.

The layout is found structurally by propagating a *sharding state* through the graph in topological order
(never from tensor names):

* a MatMul/Gemm/Conv whose activation is replicated and whose weight is a constant (initializer, possibly
  behind Transpose / Cast / DequantizeLinear) becomes **column-parallel**: its output features/channels are
  split, and per-channel / per-block quantization scales are sliced with the weight;
* the split flows through elementwise ops, RoPE, Reshape/Transpose/Expand to heads, attention MatMuls and
  Softmax; Reshape/Expand shape constants that encode head counts or hidden sizes are rewritten per rank;
* a weight MatMul/Gemm/Conv whose input is split on its contraction axis becomes **row-parallel**: it takes
  the matching rows of the weight and is followed by one ``com.microsoft`` ``AllReduce`` (a bias is kept on
  rank 0 only), which closes the chain before the residual Add;
* ``Gather`` embeddings are **vocab-parallel** (offset, mask, look up, AllReduce); the LM head is column
  parallel and its logits are collected by an ``AllGather`` (``axis`` = vocab);
* grouped-query attention: K/V projections are split when their head count divides by ``tp``; otherwise the
  reshape to heads fails to divide, the projection is *demoted* to replicated and the planner re-runs, so
  every rank computes all KV heads and slices the heads its queries use;
* a KV-cache graph input concatenated with a split K/V is itself split (each rank holds its heads' cache);
  the matching ``present`` output stays split and the manifest says how to reassemble it;
* ops that cannot work on a split tensor (GroupNorm over split channels, a reduction over the split axis,
  Concat along it, ...) get an ``AllGather`` in front (conv nets: output-channel split with matching gathers).

``split_model(model, tp)`` returns the rank models plus the manifest fragment the partition writer and the
pipeline pass consume; ``TensorParallelPass(tp, rank)`` is the same rewrite as an onnx_ir pass.
Weights are sliced lazily (``ir.LazyTensor`` over the memory-mapped source), so nothing is read until a
rank file is written, one tensor at a time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes

from maia_onnx.errors import InvalidOptionError, UnsupportedModelError

COLLECTIVE_DOMAIN = "com.microsoft"
# dims given to symbolic input dims when resolving concrete shapes: odd primes no model dim will equal
PROBE_DIMS = (3, 5, 7, 11, 13, 17, 19, 23)
MAX_PLAN_ROUNDS = 64
BLOCKED_ROWS = -1  # Split.sections marker: rows of per-rank quantization blocks (no global row order)

UNARY_OPS = {
    "Identity", "Cast", "CastLike", "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Neg",
    "Sqrt", "Reciprocal", "Exp", "Log", "Abs", "Softplus", "Softsign", "Gelu", "Elu", "Selu", "Celu", "Mish", "Sin",
    "Cos", "Not", "IsNaN", "IsInf", "Sign", "Floor", "Ceil", "Round", "Dropout", "Clip", "QuantizeLinear",
    "DequantizeLinear", "Swish",
}
BINARY_OPS = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "BitShift", "Sum", "Mean",
}
REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
              "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"}
CHANNEL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"}  # per channel (axis 1)
CHAIN_OPS = {"Transpose", "Cast", "Identity", "DequantizeLinear"}  # weight -> MatMul paths we can shard through


@dataclass(frozen=True)
class Split:
    """A value split into ``tp`` equal contiguous chunks along ``axis``; ``origins`` made it split."""

    axis: int
    origins: frozenset = frozenset()
    sections: int = 1  # the split axis holds this many fused blocks, each split tp ways (Q|K|V)


class _Demote(Exception):
    def __init__(self, origins: frozenset, why: str):
        super().__init__(why)
        self.origins = origins


class _Gather(Exception):
    """The current node cannot take its split inputs: gather them first."""


@dataclass
class TpFragment:
    """What the rewrite did, in the manifest's vocabulary (same for every rank except ``shards``)."""

    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    collectives: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    demoted: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "outputs": self.outputs, "collectives": self.collectives, "tensors": self.tensors}


# ------------------------------------------------------------------------------------------ shapes


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
    import onnx

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
    from maia_onnx.io import initializer_bytes

    if missing and initializer_bytes(model) < 512 * 1024 * 1024:
        shapes.update(_ort_shapes(model, dims, [k for k in missing]))
    return shapes


def _ort_shapes(model: ir.Model, dims: dict[str, int], names: list[str]) -> dict[str, tuple]:
    """Shapes of ``names`` from an ORT run of a copy of the model with those values as extra outputs."""
    from maia_onnx.ortutil import make_inputs, make_session, to_ort_feed

    probe = model.clone()
    by_name = {o.name: o for n in probe.graph for o in n.outputs}
    existing = {o.name for o in probe.graph.outputs}
    for name in names:
        if name in by_name and name not in existing and name not in probe.graph.initializers:
            probe.graph.outputs.append(by_name[name])
    feeds = make_inputs(probe, seed=0, dims=dims, int_high=2)
    sess = make_session(probe)
    out_names = [o.name for o in sess.get_outputs()]
    # OrtValues all the way (only the shapes are wanted; bfloat16/float8 outputs stay opaque)
    import onnxruntime as ort

    values = {}
    for name, arr in feeds.items():
        value = to_ort_feed(arr)
        values[name] = value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
    results = sess.run_with_ort_values(out_names, values)
    return {n: tuple(int(d) for d in r.shape()) for n, r in zip(out_names, results)}


# ------------------------------------------------------------------------------------------ helpers


class _SourceCache:
    """The last source weight read in full, so the ranks' lazy slices of one tensor read it once, not tp times.

    Each read is a fresh array (never a reused buffer): a slice handed out earlier may still be alive.
    """

    key: int | None = None
    array: np.ndarray | None = None

    @classmethod
    def get(cls, tensor: ir.TensorProtocol) -> np.ndarray:
        if cls.key != id(tensor) or cls.array is None:
            cls.array = None
            cls.array = _read_whole(tensor)
            cls.key = id(tensor)
        return cls.array

    @classmethod
    def clear(cls) -> None:
        cls.key, cls.array = None, None

    @classmethod
    def release_buffers(cls) -> None:
        cls.clear()


def _read_whole(tensor: ir.TensorProtocol) -> np.ndarray:
    """The whole tensor in a private array: external data by positional reads (no mmap page faults)."""
    if isinstance(tensor, ir.ExternalTensor) and tensor.dtype.bitwidth % 8 == 0:
        dtype = np.dtype(tensor.dtype.numpy())
        shape = tuple(int(d) for d in tensor.shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = np.empty(nbytes, np.uint8)
        view = memoryview(raw)
        path = os.path.join(str(tensor.base_dir), tensor.location)
        fd = os.open(path, os.O_RDONLY)
        try:
            done, offset = 0, tensor.offset or 0
            while done < nbytes:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise OSError(f"unexpected end of {path} reading {tensor.name!r}")
                done += n
        finally:
            view.release()
            os.close(fd)
        return raw.view(dtype).reshape(shape)
    arr = np.array(tensor.numpy(), copy=True)
    release = getattr(tensor, "release", None)
    if callable(release):
        try:
            release()
        except BufferError:
            pass
    return arr


class SlicedTensor(ir.LazyTensor):
    """A lazy slice of a source weight that says what it is: ``slice_source`` cut along ``slice_axis`` to
    ``slice_ranges`` (concatenated). The partition writer reads that description and streams the slice from
    the source file straight to disk; anyone else evaluating it gets a private array."""

    __slots__ = ("slice_axis", "slice_ranges", "slice_source")

    def __init__(self, func, dtype, shape, *, source, axis: int, ranges, name: str | None = None):
        super().__init__(func, dtype=dtype, shape=shape, name=name)
        self.slice_source = source
        self.slice_axis = axis
        self.slice_ranges = tuple(tuple(r) for r in ranges)


def _lazy_slice(tensor: ir.TensorProtocol, axis: int, ranges: list[tuple[int, int]], name: str, last: bool) -> SlicedTensor:
    """Part(s) of ``tensor`` along ``axis`` (concatenated), read only when written; ``last``: the final
    rank's cut, after which the cached source is dropped (it is read once per tensor, not once per rank)."""
    shape = [int(d) for d in tensor.shape]
    shape[axis] = sum(b - a for a, b in ranges)
    dtype = tensor.dtype

    def load() -> ir.Tensor:
        arr = _SourceCache.get(tensor)
        pieces = []
        for a, b in ranges:
            index = [slice(None)] * arr.ndim
            index[axis] = slice(a, b)
            pieces.append(arr[tuple(index)])
        part = pieces[0]
        if len(pieces) > 1 or not part.flags["C_CONTIGUOUS"]:
            out_shape = list(part.shape)
            out_shape[axis] = shape[axis]
            # a fresh array per slice: a shared scratch buffer here let the next rank's cut overwrite this
            # rank's weights (Conv input-channel shards came out identical on every rank -> wrong TP outputs)
            out = np.empty(out_shape, dtype=part.dtype)
            np.concatenate(pieces, axis=axis, out=out)
            part = out
        # (a contiguous leading-axis shard stays a view of the cached source: that array is never reused)
        if last:
            _SourceCache.clear()  # nobody needs this tensor any more
        return ir.Tensor(part, dtype=dtype, name=name)

    return SlicedTensor(load, dtype, ir.Shape(shape), source=tensor, axis=axis, ranges=ranges, name=name)


def shard_ranges(size: int, tp: int, rank: int, sections: int = 1) -> list[tuple[int, int]]:
    """Rank ``rank``'s ranges of an axis of ``size`` made of ``sections`` equal fused blocks (e.g. Q|K|V)."""
    block = size // sections
    n = block // tp
    return [(s * block + rank * n, s * block + (rank + 1) * n) for s in range(sections)]


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


class _Rewriter:
    """One rank's rewrite of a (cloned) model; raises _Demote to ask the planner for another round."""

    def __init__(self, model: ir.Model, tp: int, rank: int, shapes: dict[str, tuple], demoted: set[str]):
        self.model = model
        self.graph = model.graph
        self.tp = tp
        self.rank = rank
        self.shapes = dict(shapes)
        self.demoted = demoted
        self.state: dict[str, Split | None] = {}
        self.fragment = TpFragment()
        self.shard_cache: dict[tuple[str, int], ir.Value] = {}
        self.counter = 0
        self.n_collectives = 0
        self.gathered: dict[str, ir.Value] = {}
        self.fused_splits: set[str] = set()  # Split nodes cutting a fused (sectioned) column output
        self.input_values = {v.name: v for v in self.graph.inputs}

    # ---------------------------------------------------------------- small utilities
    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"tp_{stem}_{self.counter}"

    def shape(self, value: ir.Value | None) -> tuple | None:
        if value is None:
            return None
        return self.shapes.get(value.name)

    def rank_of(self, value: ir.Value) -> int | None:
        s = self.shape(value)
        return None if s is None else len(s)

    def dtype_of(self, value: ir.Value) -> ir.DataType | None:
        if value.dtype is not None:
            return value.dtype
        if value.const_value is not None:
            return value.const_value.dtype
        return None

    def st(self, value: ir.Value | None) -> Split | None:
        return None if value is None else self.state.get(value.name)

    def const_array(self, value: ir.Value | None, max_elements: int = 4096) -> np.ndarray | None:
        if value is None:
            return None
        tensor = value.const_value
        if tensor is None:
            prod = value.producer()
            if prod is not None and prod.op_type == "Constant" and prod.domain == "":
                attr = prod.attributes.get("value")
                if attr is not None:
                    tensor = attr.as_tensor()
                else:
                    for key in ("value_ints", "value_int", "value_floats", "value_float"):
                        if key in prod.attributes:
                            return np.array(prod.attributes[key].value)
        if tensor is None:
            return None
        if math.prod(int(d) for d in tensor.shape) > max_elements:
            return None
        return tensor.numpy()

    def is_const_tensor(self, value: ir.Value) -> bool:
        if value.const_value is not None and value.name in self.graph.initializers:
            return True
        prod = value.producer()
        return prod is not None and prod.op_type == "Constant" and prod.domain == "" and "value" in prod.attributes

    def is_weight(self, value: ir.Value | None) -> bool:
        """Constant, possibly behind Transpose/Cast/Identity/DequantizeLinear."""
        if value is None:
            return False
        if self.is_const_tensor(value):
            return True
        prod = value.producer()
        if prod is None or prod.op_type not in CHAIN_OPS or prod.domain != "":
            return False
        return self.is_weight(prod.inputs[0]) and all(
            x is None or self.is_const_tensor(x) or self.is_weight(x) for x in prod.inputs[1:]
        )

    def new_initializer(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape([int(d) for d in tensor.shape]), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        self.shapes[name] = tuple(int(d) for d in tensor.shape)
        self.state[name] = None
        return value

    def int_const(self, values, stem: str, dtype=np.int64) -> ir.Value:
        return self.new_initializer(self.fresh(stem), ir.Tensor(np.asarray(values, dtype=dtype)))

    def add_node(self, before: ir.Node, op_type: str, inputs, attributes=(), domain: str = "", stem: str | None = None) -> ir.Node:
        node = ir.Node(domain, op_type, inputs, attributes, name=self.fresh(stem or op_type.lower()))
        node.outputs[0].name = node.name + "_out"
        self.graph.insert_before(before, node)
        return node

    def record_tensor(self, name: str, kind: str, axis: int | None, full_shape, sections: int = 1) -> None:
        entry = self.fragment.tensors.setdefault(
            name, {"kind": kind, "axis": axis, "full_shape": [int(d) for d in full_shape], "shards": {}}
        )
        if axis is not None:
            size = int(full_shape[axis])
            if sections == 1:
                entry["shards"] = {str(t): list(shard_ranges(size, self.tp, t)[0]) for t in range(self.tp)}
            else:  # fused blocks: each rank holds its part of every block, concatenated in block order
                entry["sections"] = sections
                entry["shards"] = {str(t): [list(r) for r in shard_ranges(size, self.tp, t, sections)] for t in range(self.tp)}

    # ---------------------------------------------------------------- weight sharding
    def shard_value(self, value: ir.Value, axis: int, kind: str, sections: int = 1) -> ir.Value:
        """This rank's slice of a constant(-derived) value along ``axis`` (cached per value and axis);
        ``sections`` > 1: the axis holds that many fused blocks and the rank takes its part of each."""
        key = (value.name, axis, sections)
        if key in self.shard_cache:
            return self.shard_cache[key]
        if self.is_const_tensor(value):
            tensor = value.const_value
            if tensor is None:
                tensor = value.producer().attributes["value"].as_tensor()
            full = [int(d) for d in tensor.shape]
            if full[axis] % (self.tp * sections):
                raise _Gather()
            name = f"{value.name}__tp" if value.name in self.graph.initializers else self.fresh("const")
            ranges = shard_ranges(full[axis], self.tp, self.rank, sections)
            new = self.new_initializer(name, _lazy_slice(tensor, axis, ranges, name, last=self.rank == self.tp - 1))
            self.record_tensor(value.name, kind, axis, full, sections)
        else:
            prod = value.producer()
            op = prod.op_type
            if op == "Transpose":
                perm = list(prod.attributes["perm"].as_ints())
                inner = self.shard_value(prod.inputs[0], perm[axis], kind, sections)
                node = self.add_node(prod, "Transpose", [inner], [ir.AttrInt64s("perm", perm)])
            elif op in ("Cast", "Identity"):
                inner = self.shard_value(prod.inputs[0], axis, kind, sections)
                node = self.add_node(prod, op, [inner], list(prod.attributes.values()))
            elif op == "DequantizeLinear":
                x, scale = prod.inputs[0], prod.inputs[1]
                zp = prod.inputs[2] if len(prod.inputs) > 2 else None
                rank = len(self.shape(x))
                q_axis = _norm_axis(prod.attributes["axis"].as_int() if "axis" in prod.attributes else 1, rank)
                block = prod.attributes["block_size"].as_int() if "block_size" in prod.attributes else 0
                new_x = self.shard_value(x, axis, kind, sections)
                scale_rank = len(self.shape(scale) or ())
                new_scale, new_zp = scale, zp
                if scale_rank == 0 or (self.shape(scale) in ((1,),)):
                    pass  # per-tensor scale
                elif block == 0:
                    if q_axis == axis:  # per-channel along the split axis
                        new_scale = self.shard_value(scale, 0, kind, sections)
                        new_zp = self.shard_value(zp, 0, kind, sections) if zp is not None else None
                else:  # blocked: scale has x's rank with x.dim/block along q_axis
                    if sections > 1:
                        raise _Gather()
                    if axis == q_axis and (self.shape(x)[axis] // self.tp) % block:
                        raise UnsupportedModelError(
                            f"--tp {self.tp} splits {x.name!r} inside a quantization block of {block}: use a tp degree "
                            "whose shard size is a multiple of the block size"
                        )
                    new_scale = self.shard_value(scale, axis, kind)
                    new_zp = self.shard_value(zp, axis, kind) if zp is not None else None
                node = self.add_node(prod, "DequantizeLinear", [new_x, new_scale] + ([new_zp] if zp is not None else []),
                                     list(prod.attributes.values()))
            else:  # pragma: no cover - is_weight() admits only the ops above
                raise _Gather()
            new = node.outputs[0]
            new.dtype = self.dtype_of(value)
            full = list(self.shape(value))
            self.shapes[new.name] = tuple(full)
        self.state[new.name] = Split(axis)
        self.shard_cache[key] = new
        return new

    def rank0_only(self, value: ir.Value, before: ir.Node) -> ir.Value:
        """``value`` on rank 0, zeros elsewhere: a bias added once across an AllReduce sum."""
        if self.rank == 0:
            return value
        arr_dtype = self.dtype_of(value)
        shape = self.shape(value)
        zero = ir.Tensor(np.zeros(shape, dtype=np.float32)) if arr_dtype in (None, ir.DataType.FLOAT) else None
        if zero is not None:
            return self.new_initializer(self.fresh("zero_bias"), zero)
        # other dtypes: multiply by a zero of the same type
        z = self.add_node(before, "Sub", [value, value], stem="zero_bias")
        self.shapes[z.outputs[0].name] = shape
        return z.outputs[0]

    # ---------------------------------------------------------------- collectives
    def _collective(self, op: str, value: ir.Value, axis: int | None, keep_name: bool, redirect_uses: bool = True) -> ir.Value:
        """Insert ``op`` right after ``value``'s producer and return its output.

        ``keep_name``: the result takes ``value``'s name (the local value is renamed) and replaces every use
        and graph output of ``value`` (AllReduce of partial sums, gathered graph outputs); otherwise the
        result is a new value the caller wires in.
        """
        original = value.name
        uses = list(value.uses()) if keep_name and redirect_uses else []
        was_output = [i for i, o in enumerate(self.graph.outputs) if o is value] if keep_name else []
        if keep_name:
            value.name = f"{original}__tp_local"
            self.state[value.name] = self.state.get(original)
            self.shapes[value.name] = self.shapes.get(original)
        attrs = [ir.AttrInt64("group_size", self.tp)]
        if axis is not None:
            attrs.append(ir.AttrInt64("axis", axis))
        self.n_collectives += 1
        node = ir.Node(COLLECTIVE_DOMAIN, op, [value], attrs, name=f"tp_{op.lower()}_{self.n_collectives}")
        out = node.outputs[0]
        out.name = original if keep_name else f"{original}__tp_gathered"
        out.dtype = value.dtype
        out.shape = value.shape  # the collective's result has the full (unsharded) shape
        prod = value.producer()
        if prod is not None:
            self.graph.insert_after(prod, node)
        else:  # a graph input: first node of the graph
            self.graph.insert_before(next(iter(self.graph)), node)
        for use in uses:
            use.node.replace_input_with(use.idx, out)
        for i in was_output:
            self.graph.outputs[i] = out
        full = self.shapes.get(original)
        self.shapes[out.name] = full
        self.state[out.name] = None
        numel = math.prod(full) if full and all(isinstance(d, int) for d in full) else None
        per_token = None
        if numel:
            lead = full[0] * (full[1] if len(full) == 3 else 1)
            per_token = numel // lead if lead else None
        self.fragment.collectives.append(
            {
                "op": op,
                "node": node.name,
                "input": value.name,
                "output": out.name,
                "axis": axis,
                "group_size": self.tp,
                "dtype": value.dtype.name if value.dtype is not None else None,
                "elements_per_token": per_token,
            }
        )
        return out

    def gather_input(self, node: ir.Node, index: int) -> None:
        """Feed ``node`` the full tensor of its split input ``index`` (one AllGather per value, shared)."""
        value = node.inputs[index]
        s = self.st(value)
        if s is None:
            return
        out = self.gathered.get(value.name)
        if out is None:
            out = self._collective("AllGather", value, s.axis, keep_name=False)
            self.gathered[value.name] = out
        node.replace_input_with(index, out)

    def all_reduce(self, value: ir.Value) -> ir.Value:
        return self._collective("AllReduce", value, None, keep_name=True)

    # ---------------------------------------------------------------- slicing replicated operands
    def slice_operand(self, node: ir.Node, index: int, axis: int, sections: int = 1) -> None:
        """Make replicated input ``index`` of ``node`` this rank's part along ``axis``."""
        value = node.inputs[index]
        full = self.shape(value)
        if full is None or full[axis] is None or full[axis] % (self.tp * sections):
            raise _Gather()
        if self.is_weight(value):
            node.replace_input_with(index, self.shard_value(value, axis, "sliced", sections))
            return
        if sections > 1:
            raise _Gather()  # a run-time tensor cut into fused blocks: not worth a multi-range Slice
        if value.is_graph_input() and self._only_cache_uses(value, axis, node):
            self._split_graph_input(value, axis)
            return
        n = full[axis] // self.tp
        starts = self.int_const([self.rank * n], "starts")
        ends = self.int_const([(self.rank + 1) * n], "ends")
        axes = self.int_const([axis], "axes")
        sl = self.add_node(node, "Slice", [value, starts, ends, axes])
        out = sl.outputs[0]
        out.dtype = value.dtype
        self.shapes[out.name] = full
        self.state[out.name] = Split(axis)
        node.replace_input_with(index, out)

    def _only_cache_uses(self, value: ir.Value, axis: int, node: ir.Node) -> bool:
        for use in value.uses():
            n = use.node
            if n is node:
                continue
            if n.op_type == "Shape" and n.domain == "":
                start = n.attributes["start"].as_int() if "start" in n.attributes else 0
                end = n.attributes["end"].as_int() if "end" in n.attributes else len(self.shape(value))
                rank = len(self.shape(value))
                start, end = _norm_axis(start, rank), (_norm_axis(end, rank) if end < 0 else min(end, rank))
                if start <= axis < end:
                    return False
                continue
            return False
        return True

    def _split_graph_input(self, value: ir.Value, axis: int) -> None:
        self.state[value.name] = Split(axis, frozenset({f"input:{value.name}"}))
        self.fragment.inputs[value.name] = {"sharding": "split", "axis": axis}
        if value.shape is not None:
            dims = list(value.shape)
            if isinstance(dims[axis], int):
                dims[axis] //= self.tp
            value.shape = ir.Shape(dims)

    # ---------------------------------------------------------------- shape tensors
    def shape_elem(self, value: ir.Value, index: int):
        """(kind, int|None): 'const' with its value, or 'dynamic' when computed at run time."""
        arr = self.const_array(value)
        if arr is not None:
            return "const", int(np.asarray(arr).reshape(-1)[index])
        prod = value.producer()
        if prod is None:
            return "dynamic", None
        if prod.op_type == "Concat":
            offset = 0
            for inp in prod.inputs:
                length = (self.shape(inp) or (None,))[0] if self.shape(inp) else None
                if length is None:
                    return "dynamic", None
                if index < offset + length:
                    return self.shape_elem(inp, index - offset)
                offset += length
            return "dynamic", None
        if prod.op_type in ("Unsqueeze", "Reshape", "Identity", "Cast", "Squeeze"):
            return self.shape_elem(prod.inputs[0], index if prod.op_type in ("Identity", "Cast") else 0)
        return "dynamic", None

    def rewrite_shape_elem(self, value: ir.Value, index: int, new: int, before: ir.Node) -> ir.Value:
        """A copy of shape tensor ``value`` with element ``index`` = ``new`` (shared constants stay intact)."""
        arr = self.const_array(value)
        if arr is not None:
            arr = np.array(arr, copy=True)
            flat = arr.reshape(-1)
            flat[index] = new
            return self.new_initializer(self.fresh("shape"), ir.Tensor(arr))
        prod = value.producer()
        if prod.op_type == "Concat":
            offset = 0
            inputs = list(prod.inputs)
            for k, inp in enumerate(inputs):
                length = self.shape(inp)[0]
                if index < offset + length:
                    inputs[k] = self.rewrite_shape_elem(inp, index - offset, new, before)
                    break
                offset += length
        else:
            inputs = list(prod.inputs)
            inputs[0] = self.rewrite_shape_elem(inputs[0], index if prod.op_type in ("Identity", "Cast") else 0, new, before)
        node = self.add_node(before, prod.op_type, inputs, list(prod.attributes.values()))
        out = node.outputs[0]
        out.dtype = value.dtype
        self.shapes[out.name] = self.shape(value)
        return out

    def set_shape_dim(self, node: ir.Node, input_index: int, dim: int, full_value: int, origins: frozenset) -> None:
        """Rewrite element ``dim`` of the node's shape input from ``full_value`` to its per-rank size."""
        value = node.inputs[input_index]
        kind, current = self.shape_elem(value, dim)
        if kind == "dynamic" or current in (-1, 0, 1):
            return
        if current != full_value:
            raise _Gather()
        if full_value % self.tp:
            raise _Demote(origins, f"{node.name}: {full_value} not divisible by {self.tp}")
        node.replace_input_with(input_index, self.rewrite_shape_elem(value, dim, full_value // self.tp, node))

    # ---------------------------------------------------------------- the propagation
    def run(self) -> TpFragment:
        for value in self.graph.inputs:
            self.state[value.name] = None
        for name in self.graph.initializers:
            self.state[name] = None
        for node in list(self.graph):
            if node.graph is None:
                continue  # removed while rewriting
            self.visit(node)
        self.finish_outputs()
        return self.fragment

    def visit(self, node: ir.Node) -> None:
        inputs = list(node.inputs)
        split_inputs = [i for i, v in enumerate(inputs) if v is not None and self.st(v) is not None]
        if not split_inputs:
            self.visit_replicated(node)
            return
        try:
            self.visit_split(node, split_inputs)
        except _Gather:
            if any(self.st(node.inputs[i]).sections == BLOCKED_ROWS for i in split_inputs if self.st(node.inputs[i])):
                raise UnsupportedModelError(
                    f"tensor parallel: {node.op_type} node {node.name!r} consumes quantization blocks of a split "
                    "tensor in a way that cannot be sharded; partition the unquantized model and quantize each rank"
                ) from None
            for i in split_inputs:
                self.gather_input(node, i)
            self.visit_replicated(node)

    def set_out(self, node: ir.Node, split: Split | None) -> None:
        for out in node.outputs:
            self.state[out.name] = split

    def visit_replicated(self, node: ir.Node) -> None:
        self.set_out(node, None)
        op = node.op_type
        if node.domain != "" or node.name in self.demoted:
            return
        if op == "MatMul" and self.is_weight(node.inputs[1]) and not self.is_weight(node.inputs[0]):
            w = self.shape(node.inputs[1])
            sections = self.fused_sections(node.outputs[0])
            if w is not None and len(w) == 2 and w[1] % (self.tp * sections) == 0 and w[1] >= self.tp:
                node.replace_input_with(1, self.shard_value(node.inputs[1], 1, "column", sections))
                self.set_out(node, Split(len(self.shape(node.outputs[0])) - 1, frozenset({node.name}), sections))
        elif op == "Gemm" and self.is_weight(node.inputs[1]) and not self.is_weight(node.inputs[0]):
            trans_b = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
            w = self.shape(node.inputs[1])
            n_axis = 0 if trans_b else 1
            sections = self.fused_sections(node.outputs[0])
            if w is not None and w[n_axis] % (self.tp * sections) == 0:
                node.replace_input_with(1, self.shard_value(node.inputs[1], n_axis, "column", sections))
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    c = self.shape(node.inputs[2])
                    if c and c[-1] == w[n_axis]:
                        node.replace_input_with(2, self.shard_value(node.inputs[2], len(c) - 1, "column", sections))
                self.set_out(node, Split(1, frozenset({node.name}), sections))
        elif op == "Conv" and self.is_weight(node.inputs[1]) and not self.is_weight(node.inputs[0]):
            group = node.attributes["group"].as_int() if "group" in node.attributes else 1
            w = self.shape(node.inputs[1])
            if group == 1 and w is not None and w[0] % self.tp == 0:
                node.replace_input_with(1, self.shard_value(node.inputs[1], 0, "column"))
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    node.replace_input_with(2, self.shard_value(node.inputs[2], 0, "column"))
                self.set_out(node, Split(1, frozenset({node.name})))
        elif op == "Gather" and self.is_weight(node.inputs[0]) and not self.is_weight(node.inputs[1]):
            axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
            w = self.shape(node.inputs[0])
            if axis == 0 and w is not None and len(w) == 2 and w[0] % self.tp == 0 and w[0] >= 16 * self.tp:
                self.vocab_parallel_embedding(node)

    def fused_sections(self, value: ir.Value) -> int:
        """Blocks a column output is later cut into along its last axis (GPT-2 style fused Q|K|V), else 1.

        Followed through bias Adds and Reshapes that keep the last dim, to an equal-parts Split on it.
        """
        shape = self.shape(value)
        if not shape:
            return 1
        last = shape[-1]
        for _ in range(4):
            consumers = value.consumers()
            if len(consumers) != 1:
                return 1
            node = consumers[0]
            out_shape = self.shape(node.outputs[0]) if node.outputs else None
            if node.op_type == "Split" and node.inputs[0] is value:
                axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
                if _norm_axis(axis, len(shape)) != len(shape) - 1:
                    return 1
                sizes = [self.shape(o)[-1] if self.shape(o) else None for o in node.outputs]
                if len(sizes) > 1 and len(set(sizes)) == 1 and sizes[0] and sizes[0] * len(sizes) == last:
                    self.fused_splits.add(node.name)
                    return len(sizes)
                return 1
            if node.op_type in ("Add", "Reshape", "Identity", "Cast") and out_shape and out_shape[-1] == last:
                value, shape = node.outputs[0], out_shape
                continue
            return 1
        return 1

    def vocab_parallel_embedding(self, node: ir.Node) -> None:
        """Each rank looks up its vocab rows, zeroes ids it does not own, AllReduce sums the one hit."""
        table, ids = node.inputs[0], node.inputs[1]
        vocab = self.shape(table)[0]
        n = vocab // self.tp
        ids_dtype = {ir.DataType.INT32: np.int32}.get(self.dtype_of(ids), np.int64)
        offset = self.int_const(self.rank * n, "vocab_offset", ids_dtype)
        upper = self.int_const(n, "vocab_size", ids_dtype)
        zero_i = self.int_const(0, "zero", ids_dtype)
        local = self.add_node(node, "Sub", [ids, offset]).outputs[0]
        below = self.add_node(node, "Less", [local, zero_i]).outputs[0]
        above = self.add_node(node, "GreaterOrEqual", [local, upper]).outputs[0]
        outside = self.add_node(node, "Or", [below, above]).outputs[0]
        safe = self.add_node(node, "Where", [outside, zero_i, local]).outputs[0]
        node.replace_input_with(0, self.shard_value(table, 0, "vocab"))
        node.replace_input_with(1, safe)
        for v in (local, below, above, outside, safe):
            self.shapes[v.name] = self.shape(ids)
        result = node.outputs[0]
        original = result.name
        # mask after the lookup: insert Where(outside[..., None], 0, emb) between Gather and its users
        uses = list(result.uses())
        was_output = [i for i, o in enumerate(self.graph.outputs) if o is result]
        result.name = f"{original}__tp_lookup"
        axes = self.int_const([-1], "axes")
        mask = ir.Node("", "Unsqueeze", [outside, axes], name=self.fresh("unsqueeze"))
        mask.outputs[0].name = mask.name + "_out"
        dtype = self.dtype_of(result) or self.dtype_of(table) or ir.DataType.FLOAT
        zero_f = self.new_initializer(self.fresh("zero"), ir.Tensor(np.zeros((), dtype=dtype.numpy())))
        where = ir.Node("", "Where", [mask.outputs[0], zero_f, result], name=self.fresh("where"))
        where.outputs[0].name = original
        where.outputs[0].dtype = result.dtype
        self.graph.insert_after(node, [mask, where])
        for use in uses:
            use.node.replace_input_with(use.idx, where.outputs[0])
        for i in was_output:
            self.graph.outputs[i] = where.outputs[0]
        full = self.shape(result) or self.shapes.get(original)
        self.shapes[result.name] = full
        self.shapes[original] = full
        self.shapes[mask.outputs[0].name] = tuple(self.shape(ids)) + (1,) if self.shape(ids) else None
        self.state[result.name] = None
        self.all_reduce(where.outputs[0])

    def visit_split(self, node: ir.Node, split_inputs: list[int]) -> None:
        op = node.op_type
        ins = list(node.inputs)
        out_shape = self.shape(node.outputs[0]) if node.outputs else None
        if node.domain != "":
            raise _Gather()
        origins = frozenset().union(*(self.st(ins[i]).origins for i in split_inputs))

        if op in ("QuantizeLinear", "DequantizeLinear") and len(split_inputs) > 1:
            # blocked (MX) quantization of a split tensor with its per-block scales split alike
            axes = {self.st(ins[i]).axis for i in split_inputs}
            rank = len(self.shape(ins[0]) or ())
            q_axis = _norm_axis(node.attributes["axis"].as_int() if "axis" in node.attributes else 1, rank)
            if len(axes) == 1 and 0 in split_inputs and q_axis not in axes:
                first = self.st(ins[0])
                self.set_out(node, Split(first.axis, origins, first.sections))
                return
            raise _Gather()
        if op in UNARY_OPS and split_inputs == [0]:
            if op in ("QuantizeLinear", "DequantizeLinear") and len(ins) > 1:
                scale_shape = self.shape(ins[1]) or ()
                if len(scale_shape) > 0 and math.prod(scale_shape) > 1:
                    raise _Gather()  # per-axis activation quantization: keep it simple
            self.set_out(node, Split(self.st(ins[0]).axis, origins, self.st(ins[0]).sections))
            return
        if op in BINARY_OPS or (op in UNARY_OPS and op == "Clip"):
            self.elementwise(node, split_inputs, origins)
            return
        if op in ("Softmax", "LogSoftmax", "Hardmax"):
            axis = _norm_axis(node.attributes["axis"].as_int() if "axis" in node.attributes else -1, len(out_shape))
            if axis == self.st(ins[0]).axis:
                raise _Gather()
            self.set_out(node, Split(self.st(ins[0]).axis, origins))
            return
        if op in REDUCE_OPS:
            self.reduce(node, origins)
            return
        if op == "LayerNormalization":
            axis = _norm_axis(node.attributes["axis"].as_int() if "axis" in node.attributes else -1, len(out_shape))
            if split_inputs != [0] or self.st(ins[0]).axis >= axis:
                raise _Gather()
            self.set_out(node, Split(self.st(ins[0]).axis, origins))
            return
        if op == "Transpose":
            perm = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else list(range(len(out_shape)))[::-1]
            self.set_out(node, Split(perm.index(self.st(ins[0]).axis), origins))
            return
        if op == "Reshape":
            if split_inputs != [0]:
                raise _Gather()
            self.reshape(node, origins)
            return
        if op == "Unsqueeze":
            axes = self.const_array(ins[1]) if len(ins) > 1 else np.array(node.attributes["axes"].as_ints())
            if axes is None:
                raise _Gather()
            r = len(out_shape)
            axes = sorted(_norm_axis(int(a), r) for a in np.atleast_1d(axes))
            kept = [i for i in range(r) if i not in axes]
            self.set_out(node, Split(kept[self.st(ins[0]).axis], origins))
            return
        if op == "Squeeze":
            a = self.st(ins[0]).axis
            in_shape = self.shape(ins[0])
            if len(ins) > 1 and ins[1] is not None:
                axes = self.const_array(ins[1])
                if axes is None:
                    raise _Gather()
                axes = [_norm_axis(int(x), len(in_shape)) for x in np.atleast_1d(axes)]
            else:
                axes = [i for i, d in enumerate(in_shape) if d == 1]
            if a in axes:
                raise _Gather()
            self.set_out(node, Split(a - sum(1 for x in axes if x < a), origins))
            return
        if op == "Expand":
            if split_inputs != [0]:
                raise _Gather()
            in_shape = self.shape(ins[0])
            a = self.st(ins[0]).axis + (len(out_shape) - len(in_shape))
            if in_shape[self.st(ins[0]).axis] == out_shape[a]:
                self.set_shape_dim(node, 1, a, out_shape[a], origins)
            else:
                raise _Gather()
            self.set_out(node, Split(a, origins))
            return
        if op == "Concat":
            self.concat(node, split_inputs, origins)
            return
        if op in ("Split", "Slice"):
            if split_inputs != [0]:
                raise _Gather()
            a = self.st(ins[0]).axis
            r = len(self.shape(ins[0]))
            if op == "Split":
                axes = [_norm_axis(node.attributes["axis"].as_int() if "axis" in node.attributes else 0, r)]
            else:
                axes_v = self.const_array(ins[3]) if len(ins) > 3 and ins[3] is not None else np.arange(len(np.atleast_1d(self.const_array(ins[1]) if self.const_array(ins[1]) is not None else [0] * r)))
                if axes_v is None:
                    raise _Gather()
                axes = [_norm_axis(int(x), r) for x in np.atleast_1d(axes_v)]
            if op == "Split" and a in axes and node.name in self.fused_splits and self.st(ins[0]).sections == len(node.outputs):
                if len(ins) > 1 and ins[1] is not None:  # explicit sizes: each block is tp times smaller
                    sizes = self.const_array(ins[1])
                    if sizes is None:
                        raise _Gather()
                    node.replace_input_with(1, self.int_const(np.asarray(sizes) // self.tp, "split_sizes"))
                self.set_out(node, Split(a, origins))
                return
            if a in axes:
                raise _Gather()
            self.set_out(node, Split(a, origins, self.st(ins[0]).sections))
            return
        if op == "Shape":
            self.set_out(node, None)  # local shapes drive per-rank reshapes
            return
        if op == "MatMul":
            self.matmul(node, split_inputs, origins)
            return
        if op == "Gemm":
            if split_inputs == [0] and self.is_weight(ins[1]) and self.st(ins[0]).axis == 1 and not (
                node.attributes["transA"].as_int() if "transA" in node.attributes else 0
            ):
                trans_b = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
                node.replace_input_with(1, self.shard_value(ins[1], 1 if trans_b else 0, "row"))
                if len(ins) > 2 and ins[2] is not None:
                    node.replace_input_with(2, self.rank0_only(ins[2], node))
                self.set_out(node, None)
                self.all_reduce(node.outputs[0])
                return
            raise _Gather()
        if op == "Conv":
            self.conv(node, split_inputs, origins)
            return
        if op in ("BatchNormalization", "InstanceNormalization"):
            if split_inputs != [0] or self.st(ins[0]).axis != 1:
                raise _Gather()
            for i in range(1, len(ins)):
                if ins[i] is not None:
                    self.slice_operand(node, i, 0)
            self.set_out(node, None)
            self.state[node.outputs[0].name] = Split(1, origins)
            return
        if op in CHANNEL_OPS or op == "Resize":
            if split_inputs != [0] or self.st(ins[0]).axis != 1:
                raise _Gather()
            if op == "Resize" and len(ins) > 3 and ins[3] is not None:
                self.set_shape_dim(node, 3, 1, out_shape[1], origins)
            self.set_out(node, Split(1, origins))
            return
        raise _Gather()

    def elementwise(self, node: ir.Node, split_inputs: list[int], origins: frozenset) -> None:
        out_shape = self.shape(node.outputs[0])
        if out_shape is None:
            raise _Gather()
        r = len(out_shape)
        axes = set()
        for i in split_inputs:
            v = node.inputs[i]
            axes.add(self.st(v).axis + (r - len(self.shape(v))))
        if len(axes) != 1:
            raise _Gather()
        a = axes.pop()
        sections = {self.st(node.inputs[i]).sections for i in split_inputs}
        if len(sections) != 1:
            raise _Gather()
        sections = sections.pop()
        for i, v in enumerate(node.inputs):
            if v is None or i in split_inputs:
                continue
            vs = self.shape(v)
            if vs is None:
                raise _Gather()
            ai = a - (r - len(vs))
            if ai < 0 or vs[ai] == 1:
                continue
            self.slice_operand(node, i, ai, sections)
        self.set_out(node, Split(a, origins, sections))

    def reduce(self, node: ir.Node, origins: frozenset) -> None:
        ins = node.inputs
        a = self.st(ins[0]).axis
        r = len(self.shape(ins[0]))
        keep = node.attributes["keepdims"].as_int() if "keepdims" in node.attributes else 1
        if node.op_type in ("ArgMax", "ArgMin"):
            axes = [node.attributes["axis"].as_int() if "axis" in node.attributes else 0]
        elif "axes" in node.attributes:
            axes = list(node.attributes["axes"].as_ints())
        elif len(ins) > 1 and ins[1] is not None:
            arr = self.const_array(ins[1])
            if arr is None:
                raise _Gather()
            axes = [int(x) for x in np.atleast_1d(arr)]
        else:
            raise _Gather()  # reduce over everything
        axes = [_norm_axis(x, r) for x in axes]
        if a in axes:
            raise _Gather()
        self.set_out(node, Split(a if keep else a - sum(1 for x in axes if x < a), origins))

    def reshape(self, node: ir.Node, origins: frozenset) -> None:
        x = node.inputs[0]
        a = self.st(x).axis
        s_in, s_out = self.shape(x), self.shape(node.outputs[0])
        # back to the shape of a split tensor, read at run time: Reshape(t, Shape(y)) is split like y
        shape_src = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if (
            shape_src is not None and shape_src.op_type == "Shape" and not shape_src.attributes
            and self.st(shape_src.inputs[0]) is not None and self.shape(shape_src.inputs[0]) == s_out
        ):
            y = self.st(shape_src.inputs[0])
            self.set_out(node, Split(y.axis, origins | y.origins, y.sections))
            return
        # quantization blocks of the split last axis ([..., C] -> [-1, block], MX activations): rows are
        # per-rank blocks in no global order, fine for row-wise math until a Reshape(.., Shape(y)) above
        if (
            s_in is not None and s_out is not None and len(s_out) == 2 and a == len(s_in) - 1
            and s_out[1] and 1 < s_out[1] < s_in[a] and s_in[a] % s_out[1] == 0
            and self.shape_elem(node.inputs[1], 0) == ("const", -1)
        ):
            if s_in[a] % self.tp or (s_in[a] // self.tp) % s_out[1]:
                # a rank's slice would cut through a quantization block: keep the producers replicated
                raise _Demote(origins, f"{node.name}: shards of {s_in[a] // self.tp} split blocks of {s_out[1]}")
            self.set_out(node, Split(0, origins, BLOCKED_ROWS))
            return
        if s_in is None or s_out is None or any(d is None for d in s_in) or any(d is None for d in s_out):
            raise _Gather()
        prefix = math.prod(s_in[:a])
        target = None
        acc = 1
        for b, d in enumerate(s_out):
            if acc == prefix and d != 1:
                target = b
                break
            acc *= d
        if target is None:
            raise _Gather()
        # the split dim must be the outer part of the output group: sizes nest one way or the other
        if s_out[target] % self.tp or s_in[a] % self.tp:
            raise _Demote(origins, f"{node.name}: reshape of split axis to {s_out[target]} not divisible by {self.tp}")
        if not (s_out[target] % s_in[a] == 0 or s_in[a] % s_out[target] == 0):
            raise _Gather()
        sections = self.st(x).sections
        if sections > 1 and s_out[target] != s_in[a]:
            raise _Gather()
        self.set_shape_dim(node, 1, target, s_out[target], origins)
        self.set_out(node, Split(target, origins, sections))

    def concat(self, node: ir.Node, split_inputs: list[int], origins: frozenset) -> None:
        r = len(self.shape(node.outputs[0]))
        axis = _norm_axis(node.attributes["axis"].as_int(), r)
        axes = {self.st(node.inputs[i]).axis for i in split_inputs}
        if len(axes) != 1:
            raise _Gather()
        a = axes.pop()
        if a == axis:
            raise _Gather()
        for i, v in enumerate(node.inputs):
            if i not in split_inputs:
                if self.shape(v)[a] == 1 and self.shape(node.outputs[0])[a] != 1:
                    raise _Gather()
                self.slice_operand(node, i, a)
        origins = frozenset().union(*(self.st(v).origins for v in node.inputs if self.st(v) is not None))
        self.set_out(node, Split(a, origins))

    def matmul(self, node: ir.Node, split_inputs: list[int], origins: frozenset) -> None:
        A, B = node.inputs
        ra, rb = len(self.shape(A)), len(self.shape(B))
        r = len(self.shape(node.outputs[0]))
        sa, sb = self.st(A), self.st(B)
        if sa is not None and sa.axis == ra - 1 and sb is None and self.is_weight(B) and rb == 2:
            node.replace_input_with(1, self.shard_value(B, 0, "row"))  # row-parallel: partial sums
            self.set_out(node, None)
            self.all_reduce(node.outputs[0])
            return
        if ra < 2 or rb < 2:
            raise _Gather()
        # output axis each split maps to; contraction splits need a reduction we do not plan for
        out_axis = set()
        if sa is not None:
            if sa.axis == ra - 1:
                raise _Gather()
            out_axis.add(sa.axis + (r - ra) if sa.axis < ra - 2 else r - 2)
        if sb is not None:
            if sb.axis == rb - 2:
                raise _Gather()
            out_axis.add(sb.axis + (r - rb) if sb.axis < rb - 2 else r - 1)
        if len(out_axis) != 1:
            raise _Gather()
        a = out_axis.pop()
        # a replicated operand with the full extent on a split batch axis must be sliced too
        if a < r - 2:
            for i, (v, rv, sv) in enumerate(((A, ra, sa), (B, rb, sb))):
                if sv is None:
                    ai = a - (r - rv)
                    if ai >= 0 and self.shape(v)[ai] != 1:
                        self.slice_operand(node, i, ai)
        self.set_out(node, Split(a, origins))

    def conv(self, node: ir.Node, split_inputs: list[int], origins: frozenset) -> None:
        ins = node.inputs
        if split_inputs != [0] or self.st(ins[0]).axis != 1 or not self.is_weight(ins[1]):
            raise _Gather()
        group = node.attributes["group"].as_int() if "group" in node.attributes else 1
        channels = self.shape(ins[0])[1]
        w = self.shape(ins[1])
        if group == 1:
            node.replace_input_with(1, self.shard_value(ins[1], 1, "row"))
            if len(ins) > 2 and ins[2] is not None:
                node.replace_input_with(2, self.rank0_only(ins[2], node))
            self.set_out(node, None)
            self.all_reduce(node.outputs[0])
            return
        if group == channels and w[0] % self.tp == 0:  # depthwise: channels stay independent
            node.replace_input_with(1, self.shard_value(ins[1], 0, "column"))
            if len(ins) > 2 and ins[2] is not None:
                node.replace_input_with(2, self.shard_value(ins[2], 0, "column"))
            node.attributes["group"] = ir.AttrInt64("group", group // self.tp)
            self.set_out(node, Split(1, origins))
            return
        raise _Gather()

    # ---------------------------------------------------------------- outputs and cleanup
    def finish_outputs(self) -> None:
        for i, value in enumerate(list(self.graph.outputs)):
            s = self.st(value)
            if s is None:
                continue
            if any(str(o).startswith("input:") for o in s.origins):
                self.fragment.outputs[value.name] = {"sharding": "split", "axis": s.axis}
                if value.shape is not None:
                    dims = list(value.shape)
                    if isinstance(dims[s.axis], int):
                        dims[s.axis] //= self.tp
                    value.shape = ir.Shape(dims)
                continue
            self._collective("AllGather", value, s.axis, keep_name=True, redirect_uses=False)


def _remove_dead(model: ir.Model) -> None:
    graph = model.graph
    live = {v.name for v in graph.outputs}
    for node in reversed(list(graph)):
        if any(o.name in live for o in node.outputs) or (node.domain == COLLECTIVE_DOMAIN and any(o.uses() for o in node.outputs)):
            for v in node.inputs:
                if v is not None:
                    live.add(v.name)
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    for n in attr.as_graph():
                        live.update(x.name for x in n.inputs if x is not None)
        else:
            for i in range(len(node.inputs)):
                node.replace_input_with(i, None)  # drop its uses so orphaned initializers can go too
            graph.remove(node, safe=False)
    for name in list(graph.initializers):
        value = graph.initializers[name]
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]
    # sharded weights take back their source name when the full weight is gone
    for name in list(graph.initializers):
        if name.endswith("__tp"):
            base = name[: -len("__tp")]
            if base not in graph.initializers:
                value = graph.initializers.pop(name)
                value.name = base
                value.const_value.name = base
                graph.initializers[base] = value


def _finalize(model: ir.Model) -> None:
    _remove_dead(model)
    graph = model.graph
    io = {id(v) for v in graph.inputs} | {id(v) for v in graph.outputs}
    for node in graph:
        for out in node.outputs:
            if id(out) not in io:
                # per-rank sizes differ from the exporter's annotations: keep rank and dtype, let ORT infer sizes
                if out.shape is not None:
                    out.shape = ir.Shape([None] * len(out.shape))
                elif out.type is not None:
                    out.type = None
    if any(n.domain == COLLECTIVE_DOMAIN for n in graph):
        model.opset_imports.setdefault(COLLECTIVE_DOMAIN, 1)
        graph.opset_imports.setdefault(COLLECTIVE_DOMAIN, 1)


def _name_nodes(model: ir.Model) -> None:
    seen = set()
    for i, node in enumerate(model.graph):
        if not node.name or node.name in seen:
            node.name = f"n{i}_{node.op_type}"
        seen.add(node.name)


def plan(model: ir.Model, tp: int, shapes: dict[str, tuple] | None = None) -> tuple[set[str], dict[str, tuple]]:
    """The set of weight ops to keep replicated (demoted) so that every reshape divides; shapes used."""
    if tp < 1:
        raise InvalidOptionError(f"--tp {tp} is invalid: the tensor-parallel degree must be >= 1")
    _name_nodes(model)
    shapes = shapes if shapes is not None else infer_full_shapes(model)
    demoted: set[str] = set()
    for _ in range(MAX_PLAN_ROUNDS):
        try:
            trial = model.clone()
            rewriter = _Rewriter(trial, tp, 0, shapes, demoted)
            rewriter.run()
            plan.last = (trial, rewriter.fragment)  # a finished rank-0 rewrite the caller may reuse
            return demoted, shapes
        except _Demote as exc:
            new = {o for o in exc.origins if not str(o).startswith("input:")}
            if not new - demoted:
                raise UnsupportedModelError(f"tensor parallel --tp {tp}: cannot split {exc}; try a smaller --tp") from exc
            demoted |= new
    raise UnsupportedModelError(f"tensor parallel --tp {tp}: planning did not converge; try a smaller --tp")


plan.last = None


def rewrite_rank(model: ir.Model, tp: int, rank: int, demoted: set[str], shapes: dict[str, tuple]) -> tuple[ir.Model, TpFragment]:
    """This rank's model (``model`` is modified; pass a clone). Weights are lazy slices."""
    rewriter = _Rewriter(model, tp, rank, shapes, demoted)
    fragment = rewriter.run()
    fragment.demoted = sorted(demoted)
    _finalize(model)
    return model, fragment


def split_model(model: ir.Model, tp: int, shapes: dict[str, tuple] | None = None,
                consume: bool = False) -> tuple[list[ir.Model], dict[str, Any]]:
    """``tp`` rank models (lazy weight slices, tensors shared with ``model``) and the manifest fragment.

    Fragment keys: ``inputs``/``outputs`` (split ones only), ``collectives`` (graph order, identical per
    rank), ``tensors`` (source initializer -> kind, axis, full shape, per-rank ranges), ``demoted``.
    ``consume``: the caller gives ``model`` up; the last rank is rewritten in it instead of in a clone.
    """
    if tp == 1:
        return [model], {"inputs": {}, "outputs": {}, "collectives": [], "tensors": {}, "demoted": []}
    _name_nodes(model)
    demoted, shapes = plan(model, tp, shapes)
    rank0, fragment = plan.last
    plan.last = None
    fragment.demoted = sorted(demoted)
    _finalize(rank0)
    ranks = [rank0]
    for rank in range(1, tp):
        base = model if consume and rank == tp - 1 else model.clone()
        rank_model, _ = rewrite_rank(base, tp, rank, demoted, shapes)
        ranks.append(rank_model)
    if not fragment.tensors:
        raise InvalidOptionError(
            f"--tp {tp} divides none of this model's heads, hidden sizes, channels or vocab: choose a --tp that divides them"
        )
    result = fragment.as_dict()
    result["demoted"] = fragment.demoted
    return ranks, result


class TensorParallelPass(onnx_ir.passes.FunctionalPass):
    """The model of tensor-parallel rank ``rank`` out of ``tp`` (Megatron layout, com.microsoft collectives)."""

    def __init__(self, tp: int, rank: int = 0):
        super().__init__()
        if not 0 <= rank < tp:
            raise InvalidOptionError(f"rank {rank} is outside 0..{tp - 1}: pass a rank below --tp")
        self.tp = tp
        self.rank = rank
        self.fragment: dict[str, Any] | None = None

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        if self.tp == 1:
            return onnx_ir.passes.PassResult(model, False)
        model = model.clone()
        _name_nodes(model)
        demoted, shapes = plan(model, self.tp)
        plan.last = None
        rank_model, frag = rewrite_rank(model.clone(), self.tp, self.rank, demoted, shapes)
        self.fragment = frag.as_dict()
        return onnx_ir.passes.PassResult(rank_model, True)
