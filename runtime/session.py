"""``maia_onnx.runtime.InferenceSession``: the onnxruntime.InferenceSession API over plain and Maia-compiled models.

``InferenceSession(...)`` returns a real ``onnxruntime.InferenceSession`` with the Maia plugin EP
(runtime/plugin_ep.py, runtime/ep) when the library is built and onnxruntime >= 1.23, and otherwise the Python
shim ``EmulatorSession`` (saying so once, as a warning). Both give bit-identical outputs.

``EmulatorSession``: a compiled model's ``com.microsoft::EPContext`` nodes (source ``MaiaExecutionProvider``) are loaded as Maia
programs and run in the emulator; the remaining CPU nodes are grouped into as few ONNX Runtime CPU sessions as
the graph allows (ready CPU nodes are always scheduled before the next partition). Arrays pass from stage to
stage as they are (ORT reads contiguous NumPy inputs in place), so the shim costs one ``run`` call per stage.
A plain model with ``MaiaExecutionProvider`` requested is partitioned and compiled in memory first, the way an
EP's GetCapability+Compile runs at session creation; with CPU only it is a plain ONNX Runtime session.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from maia_onnx.errors import InvalidOptionError, ModelLoadError, UserError
from maia_onnx.runtime.compile import _partition_io, _silence_utf8_warnings
from maia_onnx.ortutil import ort_run

_silence_utf8_warnings()  # embedded programs are binary STRING attributes, as in ORT's own EPContext models

MAIA = "MaiaExecutionProvider"
CPU = "CPUExecutionProvider"
KNOWN_PROVIDERS = (MAIA, CPU)
_PROVIDER_ALIASES = {"maia": MAIA, "cpu": CPU, MAIA.lower(): MAIA, CPU.lower(): CPU}


def normalize_providers(providers: Sequence[Any] | None) -> list[str]:
    """Provider names as ORT spells them (accepts 'maia'/'cpu' and (name, options) tuples)."""
    if not providers:
        return [CPU]
    out = []
    for p in providers:
        name = p[0] if isinstance(p, (tuple, list)) else p
        canon = _PROVIDER_ALIASES.get(str(name).lower(), str(name))
        if canon not in KNOWN_PROVIDERS:
            raise InvalidOptionError(f"unknown provider {name!r}: use {MAIA} and/or {CPU}")
        if canon not in out:
            out.append(canon)
    if CPU not in out:
        out.append(CPU)  # like ORT, the CPU provider is always the fallback
    return out


@dataclass
class NodeArg:
    """What ``get_inputs()`` / ``get_outputs()`` return (the fields of ORT's NodeArg)."""

    name: str
    type: str
    shape: list


_ORT_TYPE = {
    ir.DataType.FLOAT: "tensor(float)", ir.DataType.FLOAT16: "tensor(float16)", ir.DataType.BFLOAT16: "tensor(bfloat16)",
    ir.DataType.DOUBLE: "tensor(double)", ir.DataType.INT64: "tensor(int64)", ir.DataType.INT32: "tensor(int32)",
    ir.DataType.INT8: "tensor(int8)", ir.DataType.UINT8: "tensor(uint8)", ir.DataType.BOOL: "tensor(bool)",
}


def _node_arg(value: ir.Value) -> NodeArg:
    shape = [] if value.shape is None else [d if isinstance(d, int) else (str(d) if d.value else None) for d in value.shape]
    dtype = value.dtype
    return NodeArg(value.name, _ORT_TYPE.get(dtype, f"tensor({dtype.name.lower()})" if dtype is not None else "unknown"), shape)


def _is_maia_context(node: ir.Node) -> bool:
    if node.op_type != "EPContext" or node.domain != "com.microsoft":
        return False
    source = node.attributes.get("source")
    return source is not None and source.value == MAIA


def _cpu_first_order(graph: ir.Graph) -> list[ir.Node]:
    """Topological order that runs every ready CPU node before the next EPContext node (fewest CPU stages)."""
    nodes = list(graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    indegree = [0] * len(nodes)
    consumers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        preds = {index[id(v.producer())] for v in node.inputs if v is not None and v.producer() is not None and id(v.producer()) in index}
        indegree[i] = len(preds)
        for p in preds:
            consumers[p].append(i)
    import heapq

    ready_cpu = [i for i in range(len(nodes)) if indegree[i] == 0 and not _is_maia_context(nodes[i])]
    ready_dev = [i for i in range(len(nodes)) if indegree[i] == 0 and _is_maia_context(nodes[i])]
    heapq.heapify(ready_cpu)
    heapq.heapify(ready_dev)
    order = []
    while ready_cpu or ready_dev:
        i = heapq.heappop(ready_cpu) if ready_cpu else heapq.heappop(ready_dev)
        order.append(nodes[i])
        for c in consumers[i]:
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready_dev if _is_maia_context(nodes[c]) else ready_cpu, c)
    return order


class _CpuStage:
    """Consecutive CPU nodes as one ORT session; initializers handed over as OrtValues without copies."""

    kind = "cpu"

    def __init__(self, model: ir.Model, nodes: list[ir.Node], inputs: list[ir.Value], outputs: list[ir.Value],
                 sess_options_factory, index: int):
        import onnx
        import onnxruntime as ort
        from onnx_ir import serde

        self.name = f"cpu_stage_{index}"
        self.input_names = [v.name for v in inputs]
        self.output_names = [v.name for v in outputs]
        graph = onnx.GraphProto(name=self.name)
        graph.node.extend(serde.serialize_node(n) for n in nodes)
        graph.input.extend(serde.serialize_value(v) for v in inputs)
        graph.output.extend(serde.serialize_value(v) for v in outputs)
        so = sess_options_factory()
        names, values, self._keepalive = [], [], []
        seen = set()
        for node in nodes:
            for v in node.inputs:
                if v is None or v.const_value is None or v.name in seen or v.name in self.input_names:
                    continue
                seen.add(v.name)
                tensor = v.const_value
                if tensor.nbytes < 4096:
                    graph.initializer.append(serde.serialize_tensor(tensor))
                    graph.initializer[-1].name = v.name
                    continue
                arr = np.ascontiguousarray(tensor.numpy())
                t = onnx.TensorProto(name=v.name, data_type=int(tensor.dtype))
                t.dims.extend(arr.shape)
                t.data_location = onnx.TensorProto.EXTERNAL
                for key, val in (("location", "__maia_host__"), ("offset", "0"), ("length", str(arr.nbytes))):
                    e = t.external_data.add()
                    e.key, e.value = key, val
                graph.initializer.append(t)
                from maia_onnx.runtime.emulator import _ortvalue

                names.append(v.name)
                values.append(_ortvalue(arr, int(tensor.dtype)))
                self._keepalive.append(arr)
        if names:
            so.add_external_initializers(names, values)
        self._ortvalues = values
        proto = onnx.ModelProto(ir_version=model.ir_version, producer_name="maia-onnx")
        for domain, version in sorted(model.opset_imports.items()):
            if domain != "com.microsoft" or any(n.domain == domain for n in nodes):
                proto.opset_import.add(domain=domain, version=version)
        for function in model.functions.values():
            proto.functions.append(serde.serialize_function(function))
        proto.graph.CopyFrom(graph)
        self.session = ort.InferenceSession(proto.SerializeToString(), so, providers=[CPU])

    def run(self, feeds: Mapping[str, np.ndarray], run_options=None) -> list[np.ndarray]:
        return ort_run(self.session, self.output_names, {n: feeds[n] for n in self.input_names}, run_options)


class _ProgramSource:
    """Finds each EPContext node's Maia program: embedded bytes, or a side file relative to the model."""

    def __init__(self, model_dir: Path | None):
        self.model_dir = model_dir
        self._files: dict[Path, tuple[Any, dict]] = {}

    def program(self, node: ir.Node):
        from maia_onnx.runtime.compile import read_container_index
        from maia_onnx.runtime.emulator import MaiaProgram

        attrs = {k: a.value for k, a in node.attributes.items()}
        name = attrs.get("partition_name", node.name)
        ctx = attrs.get("ep_cache_context")
        if ctx is None:
            raise ModelLoadError(f"EPContext node {node.name!r} has no ep_cache_context: recompile the model")
        if int(attrs.get("embed_mode", 1)) == 1:
            # onnx_ir hands back bytes, or str when the blob happened to be valid UTF-8
            return MaiaProgram.from_buffer(ctx if isinstance(ctx, bytes) else ctx.encode("utf-8"))
        rel = ctx.decode() if isinstance(ctx, bytes) else ctx
        if self.model_dir is None:
            raise UserError(f"EPContext {name!r} uses a side file ({rel}) but the model came from memory: load it from its path")
        path = (self.model_dir / rel).resolve()
        if path not in self._files:
            if not path.is_file():
                raise ModelLoadError(f"Maia context side file {rel} of partition {name!r} not found in {self.model_dir}: copy it beside the model")
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._files[path] = (mapped, read_container_index(mapped))
        mapped, index = self._files[path]
        if name not in index:
            raise ModelLoadError(f"partition {name!r} missing from side file {path}: recompile the model")
        offset, length = index[name]
        return MaiaProgram.from_buffer(memoryview(mapped)[offset : offset + length], (str(path.parent), path.name, offset))


_FALLBACK_WARNED = False


def _requested(providers, path_or_bytes) -> list[str]:
    """Providers as the session will use them: the default is Maia for compiled models, else the CPU only."""
    if providers is not None:
        return normalize_providers(providers)
    import onnx

    if isinstance(path_or_bytes, (bytes, bytearray)):
        proto = onnx.load_from_string(bytes(path_or_bytes))
    else:
        proto = onnx.load(str(path_or_bytes), load_external_data=False)
    compiled = any(n.op_type == "EPContext" and n.domain == "com.microsoft" and
                   any(a.name == "source" and a.s == MAIA.encode() for a in n.attribute) for n in proto.graph.node)
    return [MAIA, CPU] if compiled else [CPU]


def InferenceSession(path_or_bytes, sess_options=None, providers=None, provider_options=None, device: str | None = None,
                     **kwargs):
    """An ``onnxruntime.InferenceSession`` with the Maia plugin EP when available, else the Python shim.

    ``providers``/``provider_options`` as in ORT (``{"device": "maia100", "cpu_ops": "TopK,..."}`` for Maia);
    the default is Maia for compiled models, the CPU for plain ones. An ``ir.Model`` or a CPU-only request
    always uses ``EmulatorSession`` (which is plain ONNX Runtime for CPU-only plain models).
    """
    global _FALLBACK_WARNED
    from maia_onnx.runtime import plugin_ep

    args = (path_or_bytes, sess_options, providers, provider_options, device)
    if isinstance(path_or_bytes, ir.Model):
        return EmulatorSession(*args, **kwargs)
    requested = _requested(providers, path_or_bytes)
    if MAIA not in requested:
        return EmulatorSession(*args, **kwargs)
    reason = plugin_ep.unavailable_reason()
    if reason:
        if not _FALLBACK_WARNED:
            _FALLBACK_WARNED = True
            import warnings

            warnings.warn(f"MaiaExecutionProvider plugin unavailable ({reason}): using the Python shim", RuntimeWarning,
                          stacklevel=2)
        return EmulatorSession(*args, **kwargs)
    maia_options = _maia_options(providers, provider_options)
    cpu_ops = maia_options.get("cpu_ops", "")
    cpu_ops = [op for op in (cpu_ops.split(",") if isinstance(cpu_ops, str) else cpu_ops) if op]
    return plugin_ep.plugin_session(path_or_bytes, sess_options, device=device or maia_options.get("device", "maia100"),
                                    cpu_ops=cpu_ops)


def _maia_options(providers, provider_options) -> dict:
    for prov, opts in zip(providers or [], provider_options or []):
        name = prov[0] if isinstance(prov, (tuple, list)) else prov
        if _PROVIDER_ALIASES.get(str(name).lower()) == MAIA:
            return dict(opts or {})
    for prov in providers or []:
        if isinstance(prov, (tuple, list)) and _PROVIDER_ALIASES.get(str(prov[0]).lower()) == MAIA:
            return dict(prov[1] or {})
    return {}


class EmulatorSession:
    """Drop-in for ``onnxruntime.InferenceSession`` that runs Maia partitions in the Python emulator.

    ``providers=["MaiaExecutionProvider", "CPUExecutionProvider"]`` (default for compiled models) runs device
    partitions on (emulated) Maia; ``["CPUExecutionProvider"]`` on a plain model is plain ONNX Runtime.
    ``provider_options`` for Maia: ``{"device": "maia100", "cpu_ops": "TopK,..."}``.
    """

    def __init__(self, path_or_bytes, sess_options=None, providers=None, provider_options=None, device: str | None = None, **kwargs):
        from maia_onnx.ortutil import session_options as default_options

        self._sess_options = sess_options
        maia_options = _maia_options(providers, provider_options)
        self.device = device or maia_options.get("device", "maia100")
        self._model_path: Path | None = None
        if isinstance(path_or_bytes, ir.Model):
            model = path_or_bytes
        elif isinstance(path_or_bytes, (bytes, bytearray)):
            import onnx

            model = ir.from_proto(onnx.load_from_string(bytes(path_or_bytes)))
        else:
            from maia_onnx.io import load_model

            self._model_path = Path(path_or_bytes)
            model = load_model(self._model_path)
        compiled = any(_is_maia_context(n) for n in model.graph)
        requested = normalize_providers(providers if providers is not None else ([MAIA, CPU] if compiled else [CPU]))
        if compiled and MAIA not in requested:
            raise InvalidOptionError(
                f"{self._model_path or 'model'} is compiled for Maia (EPContext nodes): include {MAIA} in providers"
            )
        self.placement = None
        self._plain = None
        self._factory = lambda: (self._sess_options_copy() if sess_options is not None else default_options())
        if not compiled and MAIA in requested:
            from maia_onnx.runtime.compile import compile_model

            cpu_ops = maia_options.get("cpu_ops", "")
            cpu_ops = [op for op in (cpu_ops.split(",") if isinstance(cpu_ops, str) else cpu_ops) if op]
            if isinstance(path_or_bytes, ir.Model):
                raise InvalidOptionError("pass a path or bytes to compile in memory (an ir.Model would be modified in place)")
            # a plain model runs as exported (no fusions, like the plugin EP's GetCapability); the session is the check
            result = compile_model(model, device=self.device, excluded_ops=cpu_ops, optimize=False, verify=False)
            self.placement = result.placement
            model = result.model
            compiled = bool(result.placement.partitions)
        self._providers = [MAIA, CPU] if compiled else [CPU]
        self.model = model
        self._inputs = [_node_arg(v) for v in model.graph.inputs if v.name not in model.graph.initializers]
        self._outputs = [_node_arg(v) for v in model.graph.outputs]
        if not compiled:
            import onnxruntime as ort

            so = sess_options or default_options()
            source = str(self._model_path) if self._model_path is not None else (
                bytes(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else ir.to_proto(model).SerializeToString())
            self._plain = ort.InferenceSession(source, so, providers=[CPU])
            self.stages = []
            return
        # Legacy models (IR < 4) list initializers as graph inputs too: the initializer is the input's default value
        # (a feed may override it, as in ONNX Runtime), so it is supplied when the caller does not feed it.
        self._input_defaults = {v.name: v for v in model.graph.inputs if v.const_value is not None}
        self.stages = self._build_stages(model)

    def _sess_options_copy(self):
        """A fresh SessionOptions with the user's settings (ORT binds options to one session's initializers)."""
        import onnxruntime as ort

        src = self._sess_options
        so = ort.SessionOptions()
        for attr in ("graph_optimization_level", "intra_op_num_threads", "inter_op_num_threads", "execution_mode",
                     "log_severity_level", "enable_cpu_mem_arena", "enable_mem_pattern", "use_deterministic_compute"):
            if hasattr(src, attr):
                setattr(so, attr, getattr(src, attr))
        return so

    def _build_stages(self, model: ir.Model):
        from maia_onnx.runtime.emulator import EmulatedPartition

        graph = model.graph
        source = _ProgramSource(self._model_path.parent if self._model_path is not None else None)
        order = _cpu_first_order(graph)
        groups: list[tuple[str, list[ir.Node]]] = []
        for node in order:
            if _is_maia_context(node):
                groups.append(("maia", [node]))
            elif groups and groups[-1][0] == "cpu":
                groups[-1][1].append(node)
            else:
                groups.append(("cpu", [node]))
        stages = []
        self._release_after: list[list[str]] = []
        last_use: dict[str, int] = {}
        for g, (kind, members) in enumerate(groups):
            if kind == "maia":
                node = members[0]
                stage = EmulatedPartition(source.program(node), self._factory())
                stage.kind = "maia"
                # the EPContext node's outputs carry the program's output names
                stage.output_names = [v.name for v in node.outputs]
                stage.input_names = [v.name for v in node.inputs]
            else:
                # fed: graph inputs and values of other groups; returned: values used after the group or graph outputs
                inputs, outputs, _weights = _partition_io(graph, members)
                stage = _CpuStage(model, members, inputs, outputs, self._factory, g)
            for name in stage.input_names:
                last_use[name] = g
            stages.append(stage)
        graph_outputs = {v.name for v in graph.outputs}
        graph_inputs = {v.name for v in graph.inputs}
        self._release_after = [[] for _ in stages]
        for name, g in last_use.items():
            if name not in graph_outputs and name not in graph_inputs:
                self._release_after[g].append(name)
        return stages

    # -- the onnxruntime.InferenceSession API ---------------------------------------------------------------------
    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return list(self._providers)

    def get_session_options(self):
        return self._sess_options

    def get_modelmeta(self):
        return self._plain.get_modelmeta() if self._plain is not None else None

    def run(self, output_names, input_feed: Mapping[str, Any], run_options=None) -> list[np.ndarray]:
        if self._plain is not None:
            return ort_run(self._plain, output_names, dict(input_feed), run_options)
        names = output_names or [o.name for o in self._outputs]
        known = {i.name for i in self._inputs}
        missing = [n for n in known if n not in input_feed]
        if missing:
            raise ValueError(f"Required inputs ({missing}) are missing from input feed ({list(input_feed)}).")
        env = dict(input_feed)
        for name, value in self._input_defaults.items():
            if name not in env:
                env[name] = value.const_value.numpy()
        for stage, release in zip(self.stages, self._release_after):
            env.update(zip(stage.output_names, stage.run(env, run_options)))
            for name in release:
                if name not in names:
                    env.pop(name, None)
        try:
            return [env[n] for n in names]
        except KeyError as exc:
            raise ValueError(f"unknown output name {exc.args[0]!r}: use one of {[o.name for o in self._outputs]}") from None

    def run_with_ort_values(self, output_names, input_feed, run_options=None):
        return self.run(output_names, {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in input_feed.items()}, run_options)

    # -- placement report ---------------------------------------------------------------------------------------
    def stage_summary(self) -> list[dict]:
        return [{"stage": s.name, "runs_on": getattr(s, "kind", "cpu"), "inputs": len(s.input_names), "outputs": len(s.output_names)}
                for s in self.stages]


def placement_report(model_path, device: str = "maia100", cpu_ops: Sequence[str] = (), dims: Mapping[str, int] | None = None) -> dict:
    """The placement report for a plain or compiled model: nodes/FLOPs on device vs CPU, reasons, device time."""
    from maia_onnx.io import load_model
    from maia_onnx.runtime.capability import get_capability

    model = load_model(model_path) if not isinstance(model_path, ir.Model) else model_path
    if any(_is_maia_context(n) for n in model.graph):
        source = _ProgramSource(Path(model_path).parent if not isinstance(model_path, ir.Model) else None)
        partitions = []
        for node in model.graph:
            if _is_maia_context(node):
                prog = source.program(node)
                est = prog.header["plan"]["estimate"]
                partitions.append({"partition": prog.name, "nodes": len(prog.header["plan"]["schedule"]),
                                   "flops": est["flops"], "bytes": est["bytes"], "est_time_us": est["est_time_s"] * 1e6,
                                   "arena_bytes": prog.header["plan"]["memory"]["arena_bytes"]})
        cpu_nodes = [n for n in model.graph if not _is_maia_context(n)]
        devices = sorted({n.attributes["hardware_architecture"].value for n in model.graph
                          if _is_maia_context(n) and "hardware_architecture" in n.attributes})
        return {"compiled": True, "device": ",".join(devices), "partitions": partitions, "cpu_nodes": len(cpu_nodes),
                "device_nodes": sum(p["nodes"] for p in partitions),
                "est_device_time_s": sum(p["est_time_us"] for p in partitions) * 1e-6}
    placement = get_capability(model, device, excluded_ops=cpu_ops, dims=dims)
    out = placement.to_dict()
    out["compiled"] = False
    return out


def session_for(model_path: str | os.PathLike, providers=None, device: str = "maia100", cpu_ops: Sequence[str] = ()):
    opts = [{"device": device, "cpu_ops": ",".join(cpu_ops)}, {}]
    provs = normalize_providers(providers)
    # the shim: the run verb reports its stages (stage_summary)
    return EmulatorSession(model_path, providers=provs, provider_options=opts[: len(provs)] if provs[0] == MAIA else None)
