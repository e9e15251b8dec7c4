"""In-process multi-rank executor: runs a partition directory on one host and returns the unsharded outputs.

ONNX Runtime's CPU build has no kernels for the ``com.microsoft`` AllReduce/AllGather nodes, so every rank
model is cut at its collectives into *segments* (plain ONNX sub-graphs, one ORT session each) and the
collectives are performed between ranks in NumPy:

* phase of a value: 0 for inputs/initializers; a node's outputs take the max phase of its inputs; a
  collective's output is one phase later than its input. Segment ``p`` = the non-collective nodes of phase p.
* execution: for each stage, for each phase p: run segment p on every tp rank, then every collective of
  phase p across the tp ranks (matched by node name, identical in every rank), then phase p + 1.
* stages run in order; stage s on tp rank t reads earlier stages' outputs of tp rank t by name.
* ``microbatches`` splits every input along the manifest's microbatch axis and runs the pipeline per chunk.

Segment sessions load weights from the partition directory by reference (ORT's external-initializer folder),
so no copy of a rank's weights is made beyond what ORT itself allocates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from maia_onnx.errors import UserError
from maia_onnx.partition.manifest import COLLECTIVE_DOMAIN, COLLECTIVE_OPS, Manifest, PartitionError, read_manifest
from maia_onnx.ortutil import ort_run, session_options


def _subgraph_inputs(node) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = []
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs = [attr.g]
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs = list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                names.update(x for x in n.input if x and x not in local)
                names.update(x for x in _subgraph_inputs(n) if x not in local)
    return names


def _node_inputs(node) -> list[str]:
    return [x for x in node.input if x] + sorted(_subgraph_inputs(node))


def _is_collective(node) -> bool:
    return node.domain == COLLECTIVE_DOMAIN and node.op_type in COLLECTIVE_OPS


@dataclass
class Collective:
    op: str
    name: str
    input: str
    output: str
    axis: int
    phase: int


@dataclass
class Segment:
    phase: int
    nodes: list[Any]
    inputs: list[str]
    outputs: list[str]
    session: Any = None


@dataclass
class RankProgram:
    """One rank/stage model cut into segments between collectives."""

    tp_rank: int
    stage: int
    path: Path
    proto: Any
    segments: dict[int, Segment] = field(default_factory=dict)
    collectives: dict[int, list[Collective]] = field(default_factory=dict)
    graph_inputs: list[str] = field(default_factory=list)
    graph_outputs: list[str] = field(default_factory=list)
    types: dict[str, Any] = field(default_factory=dict)

    @property
    def phases(self) -> int:
        keys = list(self.segments) + list(self.collectives)
        return (max(keys) + 1) if keys else 1


def build_program(path: Path, tp_rank: int, stage: int) -> RankProgram:
    """Parse a rank model (weights stay on disk) and cut it into phases."""
    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    init_names = {t.name for t in graph.initializer}
    program = RankProgram(tp_rank, stage, path, proto)
    program.graph_inputs = [i.name for i in graph.input if i.name not in init_names]
    program.graph_outputs = [o.name for o in graph.output]
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        program.types[vi.name] = vi.type

    level: dict[str, int] = {name: 0 for name in program.graph_inputs}
    level.update({name: 0 for name in init_names})
    node_phase: list[int] = []
    consumers_phase: dict[str, int] = {}  # latest phase that reads a value (for segment outputs)
    for node in graph.node:
        ins = _node_inputs(node)
        p = max((level.get(x, 0) for x in ins), default=0)
        if _is_collective(node):
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            program.collectives.setdefault(p, []).append(
                Collective(node.op_type, node.name, node.input[0], node.output[0], axis, p)
            )
            level[node.output[0]] = p + 1
            node_phase.append(-1)
        else:
            for o in node.output:
                if o:
                    level[o] = p
            node_phase.append(p)
        for x in ins:
            consumers_phase[x] = max(consumers_phase.get(x, -1), p + (1 if _is_collective(node) else 0))

    produced_in: dict[str, int] = {}
    for node, p in zip(graph.node, node_phase):
        if p >= 0:
            for o in node.output:
                if o:
                    produced_in[o] = p
    collective_inputs = {c.input for cs in program.collectives.values() for c in cs}
    by_phase: dict[int, list[Any]] = {}
    for node, p in zip(graph.node, node_phase):
        if p >= 0:
            by_phase.setdefault(p, []).append(node)
    outputs_set = set(program.graph_outputs)
    for p, nodes in sorted(by_phase.items()):
        made = {o for n in nodes for o in n.output if o}
        needed: list[str] = []
        seen: set[str] = set()
        for n in nodes:
            for x in _node_inputs(n):
                if x not in made and x not in init_names and x not in seen:
                    seen.add(x)
                    needed.append(x)
        outs = [
            o
            for n in nodes
            for o in n.output
            if o and (o in outputs_set or o in collective_inputs or consumers_phase.get(o, -1) > p)
        ]
        program.segments[p] = Segment(p, nodes, needed, list(dict.fromkeys(outs)))
    return program


def _np_to_elem_type(arr: np.ndarray) -> int:
    special = {
        np.dtype(ml_dtypes.bfloat16): 16,
        np.dtype(ml_dtypes.float8_e4m3fn): 17,
        np.dtype(ml_dtypes.float8_e5m2): 19,
    }
    if arr.dtype in special:
        return special[arr.dtype]
    return helper.np_dtype_to_tensor_dtype(arr.dtype)


def segment_session(program: RankProgram, segment: Segment, feeds: Mapping[str, np.ndarray], sess_options_factory):
    """Build (once) the ORT session for one segment; input types come from the actual feeds."""
    graph = program.proto.graph
    used = {x for n in segment.nodes for x in _node_inputs(n)}
    inits = [t for t in graph.initializer if t.name in used]
    inputs = []
    for name in segment.inputs:
        arr = feeds[name]
        inputs.append(helper.make_tensor_value_info(name, _np_to_elem_type(arr), [None] * arr.ndim))  # any size: decode steps, microbatches
    produced = {o for n in segment.nodes for o in n.output}
    value_info = [vi for vi in graph.value_info if vi.name in produced]
    sub = helper.make_graph(segment.nodes, f"{graph.name}_seg{segment.phase}", inputs, [], initializer=inits, value_info=value_info)
    model = helper.make_model(sub, opset_imports=list(program.proto.opset_import), ir_version=program.proto.ir_version)
    model.functions.extend(program.proto.functions)
    typed = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                typed[vi.name] = vi.type
    except Exception:  # unknown contrib ops: fall back on the rank model's own type annotations
        pass
    for name in segment.outputs:
        vi = onnx.ValueInfoProto()
        vi.name = name
        t = typed.get(name) or program.types.get(name)
        if t is not None:
            vi.type.tensor_type.elem_type = t.tensor_type.elem_type
        model.graph.output.append(vi)
    so = sess_options_factory()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(program.path.parent))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _all_reduce(arrays: list[np.ndarray]) -> np.ndarray:
    """Sum in rank order; low-precision floats accumulate in float32 like NCCL's ring on-device reduction."""
    dtype = arrays[0].dtype
    acc_dtype = dtype if dtype in (np.float32, np.float64) or dtype.kind in "iu" else np.dtype(np.float32)
    acc = arrays[0].astype(acc_dtype, copy=True)
    for a in arrays[1:]:
        acc += a.astype(acc_dtype, copy=False)
    return acc.astype(dtype, copy=False)


class PartitionExecutor:
    """Runs a partition directory; sessions are built once and reused across calls (prefill, then decode)."""

    def __init__(self, directory: str | os.PathLike, disable_optimizations: bool = True,
                 progress: Callable[[str], None] | None = None, threads_per_session: int | None = 1):
        self.threads_per_session = threads_per_session
        self.manifest: Manifest = read_manifest(directory)
        self.directory = Path(directory)
        self.disable_optimizations = disable_optimizations
        self.progress = progress
        self.programs: dict[tuple[int, int], RankProgram] = {}
        self.collective_log: list[dict[str, Any]] = []  # bytes moved per collective on the last run
        for entry in self.manifest.ranks:
            key = (entry["tp_rank"], entry["stage"])
            self.programs[key] = build_program(self.directory / entry["file"], *key)
        self._check_symmetric()

    def _check_symmetric(self) -> None:
        for s in range(self.manifest.pp):
            ref = self.programs[(0, s)]
            for t in range(1, self.manifest.tp):
                other = self.programs[(t, s)]
                a = {p: [c.name for c in cs] for p, cs in ref.collectives.items()}
                b = {p: [c.name for c in cs] for p, cs in other.collectives.items()}
                if a != b:
                    raise PartitionError(
                        f"rank {t} stage {s} has different collectives than rank 0 ({b} vs {a}); the partition is corrupt, re-run partition"
                    )

    def _session_options(self):
        so = session_options(self.disable_optimizations)
        if self.threads_per_session:
            # many small segment sessions: one thread pool each would oversubscribe the host
            so.intra_op_num_threads = self.threads_per_session
            so.inter_op_num_threads = 1
        return so

    def _shard_input(self, name: str, value: np.ndarray, tp_rank: int) -> np.ndarray:
        spec = self.manifest.inputs.get(name, {"sharding": "replicated"})
        if spec["sharding"] == "split":
            axis = spec["axis"]
            tp = self.manifest.tp
            if value.shape[axis] % tp:
                raise UserError(
                    f"input {name!r} has size {value.shape[axis]} on axis {axis}, not divisible by tp={tp}; pass a full (unsharded) input"
                )
            return np.split(value, tp, axis=axis)[tp_rank]
        return value

    def _run_one(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        m = self.manifest
        tp = m.tp
        stage_values: dict[int, dict[str, np.ndarray]] = {t: {} for t in range(tp)}
        for s in range(m.pp):
            envs = []
            for t in range(tp):
                prog = self.programs[(t, s)]
                env: dict[str, np.ndarray] = {}
                for name in prog.graph_inputs:
                    if name in stage_values[t]:
                        env[name] = stage_values[t][name]
                    elif name in feeds:
                        env[name] = self._shard_input(name, np.asarray(feeds[name]), t)
                    else:
                        raise UserError(f"missing input {name!r} for stage {s}: pass it in the inputs (.npz)")
                envs.append(env)
            progs = [self.programs[(t, s)] for t in range(tp)]
            for p in range(progs[0].phases):
                for t, prog in enumerate(progs):
                    seg = prog.segments.get(p)
                    if seg is None or not seg.nodes:
                        continue
                    if seg.session is None:
                        seg.session = segment_session(prog, seg, envs[t], self._session_options)
                    results = ort_run(seg.session, seg.outputs, {k: envs[t][k] for k in seg.inputs})
                    envs[t].update(zip(seg.outputs, results))
                for i, coll in enumerate(progs[0].collectives.get(p, [])):
                    parts = [envs[t][progs[t].collectives[p][i].input] for t in range(tp)]
                    if coll.op == "AllReduce":
                        out = _all_reduce(parts)
                    else:
                        out = np.concatenate(parts, axis=coll.axis)
                    self.collective_log.append({"stage": s, "op": coll.op, "name": coll.name, "bytes": int(parts[0].nbytes)})
                    for t in range(tp):
                        envs[t][progs[t].collectives[p][i].output] = out
            for t in range(tp):
                for name in self.programs[(t, s)].graph_outputs:
                    stage_values[t][name] = envs[t][name]
        outputs = {}
        for name in m.source_output_names():
            spec = m.outputs.get(name, {"sharding": "replicated"})
            if name not in stage_values[0]:
                raise PartitionError(f"output {name!r} is produced by no stage; the manifest and models are mismatched, re-run partition")
            if spec["sharding"] == "split":
                outputs[name] = np.concatenate([stage_values[t][name] for t in range(tp)], axis=spec["axis"])
            else:
                outputs[name] = stage_values[0][name]
        return outputs

    def run(self, feeds: Mapping[str, np.ndarray], microbatches: int = 1) -> dict[str, np.ndarray]:
        """Outputs of the unsharded model for full (unsharded) ``feeds``; ``microbatches`` > 1 pipelines the batch."""
        self.collective_log = []
        expected = set(self.manifest.source_input_names())
        missing = sorted(expected - set(feeds))
        if missing:
            raise UserError(f"missing inputs {missing} for partition {self.directory}: the model needs {sorted(expected)}")
        if microbatches <= 1:
            return self._run_one(feeds)
        axis = self.manifest.data.get("microbatch", {}).get("axis", 0)
        sizes = {np.asarray(v).shape[axis] for v in feeds.values() if np.ndim(v) > axis}
        if len(sizes) != 1:
            raise UserError(f"inputs disagree on the batch size along axis {axis} ({sorted(sizes)}): cannot split into microbatches")
        batch = sizes.pop()
        if microbatches > batch:
            raise UserError(f"{microbatches} microbatches for batch size {batch}: use at most {batch}")
        chunks = [
            {k: np.array_split(np.asarray(v), microbatches, axis=axis)[i] for k, v in feeds.items()} for i in range(microbatches)
        ]
        results = [self._run_one(c) for c in chunks]
        return {k: np.concatenate([r[k] for r in results], axis=axis) for k in results[0]}


def run_partition(directory: str | os.PathLike, feeds: Mapping[str, np.ndarray], microbatches: int = 1, **kwargs) -> dict[str, np.ndarray]:
    """Run a partition directory on this host and return the unsharded model's outputs."""
    return PartitionExecutor(directory, **kwargs).run(feeds, microbatches=microbatches)
