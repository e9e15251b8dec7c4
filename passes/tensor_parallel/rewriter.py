"""One rank's tensor-parallel rewrite: walks the graph in order, keeps each value's ``Split`` state, and gives the
op handlers their tools (weight shards, collectives, operand slices, per-rank shape constants).

The rewriter decides nothing about individual ops: it is given two tables of handlers by op type (the planner
passes ``handlers.SOURCE_HANDLERS`` and ``handlers.SPLIT_HANDLERS``): source handlers may start a split at a
weight op whose inputs are replicated, split handlers carry one through an op with split inputs. A handler
that cannot answers with a ``Refusal`` (``layout``); the rewriter then gathers the split inputs in front of
the node (``GATHER``), notes it (``REPLICATE``), or stops and hands it to the planner (``DEMOTE``,
``UNSUPPORTED``). Every refusal it went on from is kept in ``refusals``, attributed to its node.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np
import onnx_ir as ir

from .layout import (
    BLOCKED_ROWS,
    COLLECTIVE_DOMAIN,
    DEMOTE,
    UNSUPPORTED,
    Refusal,
    Split,
    TpFragment,
    demote,
    divides,
    gather,
    norm_axis,
    refused,
    replicate,
    unsupported,
)
from .slices import lazy_slice, shard_ranges

CHAIN_OPS = {"Transpose", "Cast", "Identity", "DequantizeLinear"}  # weight -> MatMul paths we can shard through

SourceHandler = Callable[["RankRewriter", ir.Node], "Refusal | None"]
SplitHandler = Callable[["RankRewriter", ir.Node, list, frozenset], "Refusal | None"]
PartialHandler = Callable[["RankRewriter", ir.Node, list], "Refusal | None"]


class RankRewriter:
    """One rank's rewrite of a (cloned) model; ``run`` returns None when done, or the refusal that stopped it."""

    def __init__(self, model: ir.Model, tp: int, rank: int, shapes: dict[str, tuple], demoted: Mapping[str, str], *,
                 source_handlers: Mapping[str, SourceHandler], split_handlers: Mapping[str, SplitHandler],
                 partial_handlers: Mapping[str, PartialHandler] | None = None, ep: bool = False):
        self.model = model
        self.source_handlers = source_handlers
        self.split_handlers = split_handlers
        self.partial_handlers = partial_handlers or {}
        self.ep = ep  # MoE experts placed whole on ranks (expert parallel) instead of each expert split
        self.graph = model.graph
        self.tp = tp
        self.rank = rank
        self.shapes = dict(shapes)
        self.demoted = demoted  # op name -> why the plan keeps it replicated
        self.state: dict[str, Split | None] = {}
        self.fragment = TpFragment()
        self.refusals: list[Refusal] = []
        self.shard_cache: dict[tuple[str, int, int], ir.Value] = {}
        self.counter = 0
        self.n_collectives = 0
        self.gathered: dict[str, ir.Value] = {}
        self.fused_splits: set[str] = set()  # Split nodes cutting a fused (sectioned) column output
        self.fused_slices: dict[str, int] = {}  # Slice nodes cutting one segment out of a fused column output
        self.local_shapes: dict[str, ir.Value] = {}  # full-size Shape(x) of a split x -> the local Shape(x)
        self.expert_down: set[str] = set()  # expert-parallel: MatMuls whose output is an expert's contribution
        self.input_values = {v.name: v for v in self.graph.inputs}

    # ---------------------------------------------------------------- small utilities
    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"tp_{stem}_{self.counter}"

    def shape(self, value: ir.Value | None) -> tuple | None:
        if value is None:
            return None
        return self.shapes.get(value.name)

    def dtype_of(self, value: ir.Value) -> ir.DataType | None:
        if value.dtype is not None:
            return value.dtype
        if value.const_value is not None:
            return value.const_value.dtype
        return None

    def st(self, value: ir.Value | None) -> Split | None:
        return None if value is None else self.state.get(value.name)

    def set_out(self, node: ir.Node, split: Split | None) -> None:
        for out in node.outputs:
            self.state[out.name] = split

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

    def local_ids(self, before: ir.Node, ids: ir.Value, rows: int, stem: str) -> tuple[ir.Value, ir.Value]:
        """Ids into a table whose ``rows``-row blocks are spread over the ranks: (this rank's local ids, with
        foreign ids at 0 so the lookup stays in range; the mask of foreign ids)."""
        dtype = {ir.DataType.INT32: np.int32}.get(self.dtype_of(ids), np.int64)
        offset = self.int_const(self.rank * rows, f"{stem}_offset", dtype)
        upper = self.int_const(rows, f"{stem}_rows", dtype)
        zero = self.int_const(0, "zero", dtype)
        local = self.add_node(before, "Sub", [ids, offset]).outputs[0]
        below = self.add_node(before, "Less", [local, zero]).outputs[0]
        above = self.add_node(before, "GreaterOrEqual", [local, upper]).outputs[0]
        foreign = self.add_node(before, "Or", [below, above]).outputs[0]
        safe = self.add_node(before, "Where", [foreign, zero, local]).outputs[0]
        for v in (local, below, above, foreign, safe):
            self.shapes[v.name] = self.shape(ids)
        safe.dtype = self.dtype_of(ids)
        return safe, foreign

    def record_tensor(self, name: str, kind: str, axis: int | None, full_shape, sections: int = 1) -> None:
        entry = self.fragment.tensors.setdefault(
            name, {"kind": kind, "axis": axis, "full_shape": [int(d) for d in full_shape], "shards": {}}
        )
        if axis is not None:
            size = int(full_shape[axis])
            if isinstance(sections, tuple):  # fused segments; a segment that is not split is held by every rank
                entry["sections"] = [[n, split] for n, split in sections]
                entry["shards"] = {str(t): [list(r) for r in shard_ranges(size, self.tp, t, sections)] for t in range(self.tp)}
            elif sections == 1:
                entry["shards"] = {str(t): list(shard_ranges(size, self.tp, t)[0]) for t in range(self.tp)}
            else:  # fused blocks: each rank holds its part of every block, concatenated in block order
                entry["sections"] = sections
                entry["shards"] = {str(t): [list(r) for r in shard_ranges(size, self.tp, t, sections)] for t in range(self.tp)}

    # ---------------------------------------------------------------- weight sharding
    def shard_value(self, value: ir.Value, axis: int, kind: str, sections: int = 1) -> ir.Value | Refusal:
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
            if not divides(full[axis], self.tp, sections):
                return gather(f"{value.name!r} dim {axis} ({full[axis]}) does not divide into {sections} x tp {self.tp} parts")
            name = f"{value.name}__tp" if value.name in self.graph.initializers else self.fresh("const")
            ranges = shard_ranges(full[axis], self.tp, self.rank, sections)
            new = self.new_initializer(name, lazy_slice(tensor, axis, ranges, name, last=self.rank == self.tp - 1))
            self.record_tensor(value.name, kind, axis, full, sections)
        else:
            node = self._shard_chain(value.producer(), axis, kind, sections)
            if refused(node):
                return node
            new = node.outputs[0]
            new.dtype = self.dtype_of(value)
            self.shapes[new.name] = tuple(self.shape(value))
        self.state[new.name] = Split(axis)
        self.shard_cache[key] = new
        return new

    def _shard_chain(self, prod: ir.Node, axis: int, kind: str, sections: int) -> ir.Node | Refusal:
        """A copy of weight-chain op ``prod`` (see ``CHAIN_OPS``) over the shards of its inputs."""
        op = prod.op_type
        if op == "Transpose":
            perm = list(prod.attributes["perm"].as_ints())
            inner = self.shard_value(prod.inputs[0], perm[axis], kind, sections)
            if refused(inner):
                return inner
            return self.add_node(prod, "Transpose", [inner], [ir.AttrInt64s("perm", perm)])
        if op in ("Cast", "Identity"):
            inner = self.shard_value(prod.inputs[0], axis, kind, sections)
            if refused(inner):
                return inner
            return self.add_node(prod, op, [inner], list(prod.attributes.values()))
        if op != "DequantizeLinear":  # pragma: no cover - is_weight() admits only the ops above
            return gather(f"cannot shard a weight through {op}")
        x, scale = prod.inputs[0], prod.inputs[1]
        zp = prod.inputs[2] if len(prod.inputs) > 2 else None
        rank = len(self.shape(x))
        q_axis = norm_axis(prod.attributes["axis"].as_int() if "axis" in prod.attributes else 1, rank)
        block = prod.attributes["block_size"].as_int() if "block_size" in prod.attributes else 0
        new_x = self.shard_value(x, axis, kind, sections)
        if refused(new_x):
            return new_x
        scale_rank = len(self.shape(scale) or ())
        new_scale, new_zp = scale, zp
        if scale_rank == 0 or (self.shape(scale) in ((1,),)):
            pass  # per-tensor scale
        elif block == 0:
            if q_axis == axis:  # per-channel along the split axis
                new_scale = self.shard_value(scale, 0, kind, sections)
                new_zp = self.shard_value(zp, 0, kind, sections) if zp is not None else None
        else:  # blocked: scale has x's rank with x.dim/block along q_axis
            if sections != 1:
                return gather(f"{x.name!r}: blocked quantization scales of fused blocks are not sliced")
            if axis == q_axis and (self.shape(x)[axis] // self.tp) % block:
                return unsupported(
                    f"--tp {self.tp} splits {x.name!r} inside a quantization block of {block}: use a tp degree "
                    "whose shard size is a multiple of the block size"
                )
            new_scale = self.shard_value(scale, axis, kind)
            new_zp = self.shard_value(zp, axis, kind) if zp is not None else None
        for part in (new_scale, new_zp):
            if refused(part):
                return part
        return self.add_node(prod, "DequantizeLinear", [new_x, new_scale] + ([new_zp] if zp is not None else []),
                             list(prod.attributes.values()))

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
    def collective(self, op: str, value: ir.Value, axis: int | None, keep_name: bool, redirect_uses: bool = True) -> ir.Value:
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
            out = self.collective("AllGather", value, s.axis, keep_name=False)
            self.gathered[value.name] = out
        node.replace_input_with(index, out)

    def all_reduce(self, value: ir.Value) -> ir.Value:
        return self.collective("AllReduce", value, None, keep_name=True)

    def mark_partial(self, value: ir.Value, origins: frozenset = frozenset()) -> None:
        """``value`` is this rank's partial sum: it is AllReduced where it stops flowing (see ``visit``)."""
        self.state[value.name] = Split(-1, frozenset(origins), partial=True)

    def is_partial(self, value: ir.Value | None) -> bool:
        s = self.st(value)
        return s is not None and s.partial

    def reduce_input(self, node: ir.Node, index: int) -> None:
        """Sum the partial input ``index`` of ``node`` over ranks: one AllReduce right after its producer, which
        takes the value's name and every use (a row-parallel output closes where it is made, as before)."""
        if self.is_partial(node.inputs[index]):
            self.all_reduce(node.inputs[index])

    # ---------------------------------------------------------------- slicing replicated operands
    def slice_operand(self, node: ir.Node, index: int, axis: int, sections: int = 1) -> Refusal | None:
        """Make replicated input ``index`` of ``node`` this rank's part along ``axis``."""
        value = node.inputs[index]
        full = self.shape(value)
        if full is None or full[axis] is None or not divides(full[axis], self.tp, sections):
            return gather(f"operand {value.name!r} (shape {full}) does not slice into {sections} x tp {self.tp} parts on axis {axis}")
        if self.is_weight(value):
            shard = self.shard_value(value, axis, "sliced", sections)
            if refused(shard):
                return shard
            node.replace_input_with(index, shard)
            return None
        if sections != 1:
            return gather(f"operand {value.name!r} is computed at run time and would be cut into fused blocks")
        if value.is_graph_input() and self._only_cache_uses(value, axis, node):
            self._split_graph_input(value, axis)
            return None
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
        return None

    def _only_cache_uses(self, value: ir.Value, axis: int, node: ir.Node) -> bool:
        for use in value.uses():
            n = use.node
            if n is node:
                continue
            if n.op_type == "Shape" and n.domain == "":
                start = n.attributes["start"].as_int() if "start" in n.attributes else 0
                end = n.attributes["end"].as_int() if "end" in n.attributes else len(self.shape(value))
                rank = len(self.shape(value))
                start, end = norm_axis(start, rank), (norm_axis(end, rank) if end < 0 else min(end, rank))
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

    def set_shape_dim(self, node: ir.Node, input_index: int, dim: int, full_value: int, origins: frozenset,
                      local: int | None = None) -> Refusal | None:
        """Rewrite element ``dim`` of the node's shape input from ``full_value`` to its per-rank size ``local``
        (default ``full_value // tp``).

        A shape computed at run time holds the unsharded graph's values (``Shape`` of a split tensor is
        rewritten to report the full size, see ``flow.shape``), so its element is replaced at run time, where
        it is a size (> 1) rather than -1 (infer), 0 (copy) or 1 (broadcast)."""
        value = node.inputs[input_index]
        kind, current = self.shape_elem(value, dim)
        if kind == "const" and current in (-1, 0, 1):
            return None
        if kind == "const" and current != full_value:
            return gather(f"shape element {dim} is {current}, not the split dim's {full_value}")
        if local is None:
            if full_value % self.tp:
                return demote(origins, f"{node.name}: {full_value} not divisible by {self.tp}")
            local = full_value // self.tp
        if kind == "const":
            node.replace_input_with(input_index, self.rewrite_shape_elem(value, dim, local, node))
            return None
        length = (self.shape(value) or (None,))[0]
        if length is None:
            return gather(f"shape input {value.name!r} of unknown length")
        pick = np.zeros(length, dtype=bool)
        pick[dim] = True
        fill = np.zeros(length, dtype=np.int64)
        fill[dim] = local
        is_size = self.add_node(node, "Greater", [value, self.int_const(1, "one")]).outputs[0]
        cond = self.add_node(node, "And", [is_size, self.new_initializer(self.fresh("pick"), ir.Tensor(pick))]).outputs[0]
        out = self.add_node(node, "Where", [cond, self.int_const(fill, "local_dim"), value]).outputs[0]
        out.dtype = self.dtype_of(value)
        for v in (is_size, cond, out):
            self.shapes[v.name] = self.shape(value)
        node.replace_input_with(input_index, out)
        return None

    # ---------------------------------------------------------------- the propagation
    def run(self) -> Refusal | None:
        """Rewrite every node; None when the rank model is complete, else the refusal the planner must handle."""
        for value in self.graph.inputs:
            self.state[value.name] = None
        for name in self.graph.initializers:
            self.state[name] = None
        for node in list(self.graph):
            if node.graph is None:
                continue  # removed while rewriting
            stop = self.visit(node)
            if stop is not None:
                return stop
        for value in self.graph.outputs:
            s = self.st(value)
            if s is not None and s.sections not in (1, BLOCKED_ROWS) and not s.partial:
                return demote(s.origins, f"graph output {value.name!r} is a fused (blocked) projection output")
        self.finish_outputs()
        return None

    def visit(self, node: ir.Node) -> Refusal | None:
        """Rewrite one node; returns a refusal only when the whole rewrite must stop (DEMOTE, UNSUPPORTED)."""
        partial = [i for i, v in enumerate(node.inputs) if self.is_partial(v)]
        if partial:
            if self.visit_partial(node, partial) is None:
                return None
            for i in partial:  # the sum stops here: AllReduce it first
                self.reduce_input(node, i)
        split_inputs = [i for i, v in enumerate(node.inputs) if v is not None and self.st(v) is not None]
        if not split_inputs:
            return self.visit_replicated(node)
        refusal = self.visit_split(node, split_inputs)
        if refusal is None:
            return None
        if refusal.action in (DEMOTE, UNSUPPORTED):
            return refusal.at(node.name)
        fused = [self.st(node.inputs[i]) for i in split_inputs if self.st(node.inputs[i]).sections not in (1, BLOCKED_ROWS)]
        if fused:  # a gather would interleave the ranks' blocks: keep the fused projection replicated instead
            return demote(frozenset().union(*(s.origins for s in fused)),
                          f"{node.op_type} needs the whole of a fused (blocked) projection output: {refusal.reason}").at(node.name)
        if any(self.st(node.inputs[i]).sections == BLOCKED_ROWS for i in split_inputs if self.st(node.inputs[i])):
            return unsupported(
                f"tensor parallel: {node.op_type} node {node.name!r} consumes quantization blocks of a split "
                "tensor in a way that cannot be sharded; partition the unquantized model and quantize each rank"
            ).at(node.name)
        self.refusals.append(refusal.at(node.name))
        for i in split_inputs:
            self.gather_input(node, i)
        return self.visit_replicated(node)

    def visit_replicated(self, node: ir.Node) -> Refusal | None:
        """A node whose inputs are all replicated: a weight op may start a split here."""
        self.set_out(node, None)
        if node.domain != "":
            return None
        if node.name in self.demoted:
            if node.op_type in self.source_handlers:
                self.refusals.append(replicate(f"kept replicated by the plan: {self.demoted[node.name]}").at(node.name))
            return None
        handler = self.source_handlers.get(node.op_type)
        refusal = handler(self, node) if handler is not None else None
        if refusal is None:
            return None
        if refusal.action in (DEMOTE, UNSUPPORTED):
            return refusal.at(node.name)
        self.refusals.append(refusal.at(node.name))
        return None

    def visit_partial(self, node: ir.Node, partial: list[int]) -> Refusal | None:
        """Carry partial sums through a linear op (``partial_handlers``); a refusal means: AllReduce them first."""
        handler = self.partial_handlers.get(node.op_type) if node.domain == "" else None
        if handler is None:
            return gather(f"{node.op_type} is not linear in a partial sum")
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if i in partial:
                uses = {id(u.node) for u in v.uses() if not (u.node.op_type == "Shape" and u.node.domain == "")}
                if v.is_graph_output() or len(uses) > 1:
                    return gather("a partial sum used more than once is reduced once, where it is made")
            elif self.st(v) is not None:
                return gather("a partial sum meets a split tensor")
        return handler(self, node, partial)

    def visit_split(self, node: ir.Node, split_inputs: list[int]) -> Refusal | None:
        if node.domain != "":
            return gather(f"custom-domain op {node.domain}::{node.op_type} runs on full tensors")
        handler = self.split_handlers.get(node.op_type)
        if handler is None:
            return gather(f"no tensor-parallel rule for {node.op_type} with split inputs")
        origins = frozenset().union(*(self.st(node.inputs[i]).origins for i in split_inputs))
        return handler(self, node, split_inputs, origins)

    # ---------------------------------------------------------------- outputs
    def finish_outputs(self) -> None:
        """Split graph outputs are gathered (LM-head logits: AllGather over the vocab), except KV-cache outputs
        whose split came from a split graph input: each rank keeps its heads and the manifest says so."""
        for value in list(self.graph.outputs):
            s = self.st(value)
            if s is None:
                continue
            if s.partial:
                self.collective("AllReduce", value, None, keep_name=True, redirect_uses=False)
                continue
            if any(str(o).startswith("input:") for o in s.origins):
                self.fragment.outputs[value.name] = {"sharding": "split", "axis": s.axis}
                if value.shape is not None:
                    dims = list(value.shape)
                    if isinstance(dims[s.axis], int):
                        dims[s.axis] //= self.tp
                    value.shape = ir.Shape(dims)
                continue
            self.collective("AllGather", value, s.axis, keep_name=True, redirect_uses=False)
