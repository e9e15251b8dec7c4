"""Run calibration batches through a model one segment of its nodes at a time, so only one segment's weights are
ever loaded in ONNX Runtime (GPTQ of a multi-GB model: ``passes/gptq.py``).

``plan_segments`` cuts the top-level nodes, in topological order, into contiguous segments of at most
``max_weight_bytes`` of initializers and ``max_cost`` of caller-given per-value costs (GPTQ: the Hessian bytes of
each wanted layer input), cutting where the fewest activations cross (between decoder layers rather than inside
attention).  Nodes that no wanted value depends on are never run (a decoder's LM head when only its input is
wanted).  ``run_segments`` builds each segment as a small ONNX model whose inputs are the values it reads from earlier
segments or the graph inputs and whose outputs are what later segments read plus the wanted values; its weights
stay references into the source's external data, so ORT reads them from the file and releases them with the
segment's session.  Every batch's crossing activations are held in memory between segments (calibration
activations, not weights), and each segment's wanted values are handed to ``on_values`` batch by batch, then
``on_segment`` is told the segment is done (every wanted value it made has been seen for every batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from maia_onnx.data import feeds_valid
from maia_onnx.errors import UserError
from maia_onnx.io import give_back_free_memory, initializer_proto, proto_without_initializers
from maia_onnx.ortutil import session_options

DEFAULT_SEGMENT_BYTES = 256 << 20


@dataclass
class Segment:
    index: int
    nodes: list[int]  # indices into the model's top-level nodes (topological order), pruned of unneeded nodes
    initializers: list[str] = field(default_factory=list)  # what its nodes read from the model's initializers
    inputs: list[str] = field(default_factory=list)  # values read from earlier segments or the graph inputs
    keep: list[str] = field(default_factory=list)  # values made here that later segments read
    wanted: list[str] = field(default_factory=list)  # the caller's values available once this segment ran
    weight_bytes: int = 0


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Outer-scope names a subgraph (If/Loop/Scan body) reads: what it uses but neither defines nor declares."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n and n not in defined)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                used.update(n for n in _subgraph_reads(sub) if n not in defined)
        defined.update(node.output)
    used.update(o.name for o in graph.output if o.name not in defined)
    return used


def _reads(node: onnx.NodeProto) -> list[str]:
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            names += sorted(_subgraph_reads(sub))
    return list(dict.fromkeys(names))


def _tensor_bytes(t: onnx.TensorProto) -> int:
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    return count * max(1, onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize) if t.data_type else 0


class _Graph:
    """The top-level graph as index tables: what each node reads / writes, where each value is made and last read."""

    def __init__(self, proto: onnx.ModelProto, wanted: Sequence[str], init_bytes: Mapping[str, int] | None = None):
        g = proto.graph
        self.nodes = list(g.node)
        self.init_bytes = dict(init_bytes) if init_bytes is not None else {t.name: _tensor_bytes(t) for t in g.initializer}
        self.inits = self.init_bytes.keys()
        self.graph_inputs = [v.name for v in g.input if v.name not in self.inits]
        self.reads = [_reads(n) for n in self.nodes]
        self.maker: dict[str, int] = {name: -1 for name in self.graph_inputs}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.maker[out] = i
        missing = [n for n in wanted if n not in self.maker]
        if missing:
            raise UserError(f"no node or graph input makes {missing[0]!r}: it cannot be calibrated")
        for i, reads in enumerate(self.reads):
            late = [n for n in reads if self.maker.get(n, -1) >= i]
            if late:
                raise UserError(f"node {self.nodes[i].name or i} reads {late[0]!r} before it is made: "
                                f"the graph is not in topological order (re-save it with onnx)")
        # only what a wanted value depends on runs
        needed = set(wanted)
        self.live_nodes: list[int] = []
        for i in range(len(self.nodes) - 1, -1, -1):
            if any(o in needed for o in self.nodes[i].output):
                self.live_nodes.append(i)
                needed.update(self.reads[i])
        self.live_nodes.reverse()


def plan_segments(proto: onnx.ModelProto, wanted: Sequence[str], max_weight_bytes: int = DEFAULT_SEGMENT_BYTES,
                  cost: Mapping[str, int] | None = None, max_cost: int | None = None,
                  init_bytes: Mapping[str, int] | None = None) -> list[Segment]:
    """Contiguous segments of the nodes the wanted values need (see the module docstring).  A single node heavier
    than a budget gets a segment of its own.  ``init_bytes`` names the initializers (and their sizes) when the
    proto was made without them."""
    graph = _Graph(proto, wanted, init_bytes)
    cost = dict(cost or {})
    order = graph.live_nodes
    position = {i: pos for pos, i in enumerate(order)}
    wanted_at: dict[int, list[str]] = {}  # position in ``order`` -> wanted values made there
    for name in dict.fromkeys(wanted):
        maker = graph.maker[name]
        wanted_at.setdefault(0 if maker < 0 else position[maker], []).append(name)

    def node_inits(pos: int) -> list[str]:
        return [n for n in graph.reads[order[pos]] if n in graph.inits]

    # crossing activations at each cut position: made before it (or a graph input), read at or after it
    last_read: dict[str, int] = {}
    for pos, i in enumerate(order):
        for n in graph.reads[i]:
            if n not in graph.inits:
                last_read[n] = pos
    crossing = np.zeros(len(order) + 1, np.int64)
    for name, last in last_read.items():
        made = graph.maker.get(name, -1)
        first = 0 if made < 0 else position[made] + 1
        if first <= last:
            crossing[first:last + 1] += 1

    bounds: list[tuple[int, int]] = []
    start = 0
    while start < len(order):
        seen: set[str] = set()
        weight = spent = 0
        end = start
        weights_to: list[int] = []  # weight of [start, pos) for each pos in (start, end]
        while end < len(order):
            new = [n for n in node_inits(end) if n not in seen]
            add_w = sum(graph.init_bytes[n] for n in new)
            add_c = sum(cost.get(n, 0) for n in wanted_at.get(end, []))
            over = weight + add_w > max_weight_bytes or (max_cost is not None and spent + add_c > max_cost)
            if over and end > start:
                break
            seen.update(new)
            weight += add_w
            spent += add_c
            end += 1
            weights_to.append(weight)
        if end < len(order):
            # cut where the fewest activations cross, among cuts that keep at least half this segment's weights
            best = max(range(start + 1, end + 1),
                       key=lambda pos: (weights_to[pos - start - 1] * 2 >= weight, -crossing[pos], pos))
            end = best
        bounds.append((start, end))
        start = end
    if not bounds and wanted_at:
        bounds.append((0, 0))  # only graph inputs are wanted: one segment that runs nothing and hands them over

    segments: list[Segment] = []
    made_in: dict[str, int] = {name: 0 for name in graph.graph_inputs}
    for k, (a, b) in enumerate(bounds):
        seg = Segment(k, [order[p] for p in range(a, b)])
        for p in range(a, max(b, a + 1)):  # an empty segment (only graph inputs wanted) still hands them over
            seg.wanted += wanted_at.get(p, [])
        for i in seg.nodes:
            for out in graph.nodes[i].output:
                if out:
                    made_in[out] = k
        seg.initializers = sorted({n for i in seg.nodes for n in graph.reads[i] if n in graph.inits})
        seg.weight_bytes = sum(graph.init_bytes[n] for n in seg.initializers)
        segments.append(seg)
    # what each segment reads from before it, and keeps for after it
    for seg in segments:
        made_here = {o for i in seg.nodes for o in graph.nodes[i].output if o}
        reads = [n for i in seg.nodes for n in graph.reads[i] if n not in graph.inits and n not in made_here]
        seg.inputs = list(dict.fromkeys(reads))
        for name in seg.inputs:
            if name not in graph.graph_inputs:
                segments[made_in[name]].keep.append(name)
    for seg in segments:
        seg.keep = list(dict.fromkeys(seg.keep))
    return segments


def _segment_model(proto: onnx.ModelProto, graph_nodes: list[onnx.NodeProto], seg: Segment,
                   inits: Mapping[str, ir.Value], examples: Mapping[str, np.ndarray]) -> bytes:
    nodes = [graph_nodes[i] for i in seg.nodes]
    made = {o for node in nodes for o in node.output if o}
    outputs = [n for n in dict.fromkeys(seg.keep + seg.wanted) if n in made]
    g = onnx.helper.make_graph(
        nodes, f"segment_{seg.index}",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(examples[n].dtype),
                                            [None] * examples[n].ndim) for n in seg.inputs],
        [onnx.ValueInfoProto(name=n) for n in outputs],  # ORT infers the types of untyped outputs
        # external weights stay file references; a lazy one (a rotated weight) is computed for this segment only
        initializer=[initializer_proto(inits[n]) for n in seg.initializers])
    model = onnx.helper.make_model(g, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    model.functions.extend(proto.functions)
    return model.SerializeToString()


def run_segments(
    model: ir.Model,
    wanted: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    on_values: Callable[[int, dict[str, np.ndarray], np.ndarray | None], None],
    on_segment: Callable[[Segment], None] | None = None,
    max_weight_bytes: int = DEFAULT_SEGMENT_BYTES,
    cost: Mapping[str, int] | None = None,
    max_cost: int | None = None,
    progress: Callable[[Segment, int], None] | None = None,
) -> tuple[int, list[Segment]]:
    """Stream ``batches`` through ``model`` segment by segment (module docstring): ``on_values(batch_index,
    {wanted name: array}, valid)`` for each segment's wanted values, ``on_segment(segment)`` after each segment.
    Returns (batches, segments)."""
    import onnxruntime as ort

    # each segment serializes only its own initializers: lazy tensors would otherwise all be computed here, and a
    # multi-GB model would not fit a protobuf
    proto = proto_without_initializers(model)
    inits = dict(model.graph.initializers)
    sizes = {name: int(v.const_value.nbytes) if v.const_value is not None else 0 for name, v in inits.items()}
    segments = plan_segments(proto, list(wanted), max_weight_bytes, cost, max_cost, init_bytes=sizes)
    graph_nodes = list(proto.graph.node)
    options = session_options(True)
    external = [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    if external:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external[0].base_dir))
    stores: list[dict[str, np.ndarray]] = []
    valids: list[np.ndarray | None] = []
    for feeds in batches:
        stores.append(dict(feeds))
        valids.append(feeds_valid(feeds))
    if not stores:
        return 0, segments
    needed_later: dict[str, int] = {}  # value -> last segment that reads it
    for seg in segments:
        for name in seg.inputs:
            needed_later[name] = seg.index
    for seg in segments:
        missing = [n for n in seg.inputs if n not in stores[0]]
        if missing:
            raise UserError(f"the calibration batches have no input {missing[0]!r}: feed every graph input")
        outputs = [n for n in dict.fromkeys(seg.keep + seg.wanted) if n not in stores[0]]
        session = None
        if outputs:
            model_bytes = _segment_model(proto, graph_nodes, seg, inits, stores[0])
            session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
            del model_bytes
        for b, store in enumerate(stores):
            made: dict[str, np.ndarray] = {}
            if session is not None:
                try:
                    made = dict(zip(outputs, session.run(outputs, {n: store[n] for n in seg.inputs})))
                except Exception as exc:
                    raise UserError(
                        f"calibration batch {b} failed in ONNX Runtime in segment {seg.index} "
                        f"({str(exc).splitlines()[0][:200]}): check the calibration arrays against the model inputs"
                    ) from exc
            on_values(b, {n: made[n] if n in made else store[n] for n in seg.wanted}, valids[b])
            for name in seg.keep:
                store[name] = made[name]
            for name in [n for n in store if needed_later.get(n, -1) <= seg.index]:
                del store[name]  # no later segment reads it
            if progress is not None:
                progress(seg, b)
        del session
        give_back_free_memory()  # the session's weights, before the caller allocates its own working set
        if on_segment is not None:
            on_segment(seg)  # frees what it made itself (calib.collect_hessians trims after each Hessian)
    return len(stores), segments
