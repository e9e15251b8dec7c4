"""Pipeline parallelism: annotate every node with its stage and extract the stages as standalone models.

``PipelineParallelPass`` plans the cut points on a topologically sorted graph (``pipeline_plan``), records each
node's stage in ``node.metadata_props["maia.pipeline_stage"]`` and returns the plan in its result;
``extract_stages`` turns an annotated model into K standalone stage models whose boundary tensors are explicit
stage outputs/inputs. Graph inputs (tokens, KV cache) are fed to whichever stage consumes them and graph
outputs come from the stage producing them, so a layer's KV cache stays with its layer. Writing stages to a
partition directory is ``maia_onnx.partition``'s job; running one is ``maia_onnx.runtime.executor``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir
import onnx_ir.passes
from onnx_ir.passes.common import ShapeInferencePass

from maia_onnx.errors import UnsupportedModelError
from maia_onnx.passes.pipeline_plan import (
    BALANCE_MODES,
    PipelinePlan,
    _check_layer_count,
    _producer_index,
    crossing_bytes,
    node_loads,
    plan_pipeline,
    replicable_nodes,
)

STAGE_KEY = "maia.pipeline_stage"


@dataclass
class PipelineResult(ir.passes.PassResult):
    """The annotated model and the plan it was annotated with (loads, boundaries, cut points)."""

    plan: PipelinePlan | None = None


class PipelineParallelPass(onnx_ir.passes.InPlacePass):
    """Assign each node a pipeline stage (``metadata_props['maia.pipeline_stage']``).

    The result's ``plan`` holds the loads and boundaries; ``extract_stages(model)`` splits.
    """

    def __init__(self, num_stages: int, balance: str = "flops"):
        super().__init__()
        self.num_stages = num_stages
        self.balance = balance

    def call(self, model: ir.Model) -> PipelineResult:
        _check_layer_count(model, self.num_stages)
        model.graph.sort()
        plan = plan_pipeline(model, self.num_stages, self.balance)
        for node, stage in zip(model.graph, plan.node_stage):
            node.metadata_props[STAGE_KEY] = str(stage)
        model.metadata_props["maia.pipeline_stages"] = str(self.num_stages)
        model.metadata_props["maia.pipeline_balance"] = self.balance
        return PipelineResult(model, modified=True, plan=plan)


# ---------------------------------------------------------------- stage extraction


@dataclass
class Stage:
    """One pipeline stage as a standalone model plus where its inputs come from."""

    index: int
    model: ir.Model
    inputs: list[str]  # stage input names, in order
    outputs: list[str]
    graph_inputs: list[str]  # of which: inputs of the whole model
    recv: dict[str, int] = field(default_factory=dict)  # boundary input -> producing stage
    send: dict[str, list[int]] = field(default_factory=dict)  # boundary output -> consuming stages


def _stage_of(node: ir.Node) -> int:
    try:
        return int(node.metadata_props[STAGE_KEY])
    except KeyError as exc:
        raise UnsupportedModelError(
            f"node {node.name!r} has no pipeline stage: run PipelineParallelPass before extract_stages"
        ) from exc


def _ensure_types(model: ir.Model, names: set[str]) -> None:
    """Boundary tensors become graph I/O, which needs a type; infer shapes when the exporter left none."""
    missing = [v for n in model.graph for v in n.outputs if v.name in names and v.type is None]
    if not missing:
        return
    ShapeInferencePass()(model)
    still = [v.name for n in model.graph for v in n.outputs if v.name in names and v.type is None]
    if still:
        raise UnsupportedModelError(
            f"cannot type the stage boundary tensor(s) {still[:3]}: run shape inference on the model first"
        )


def extract_stages(model: ir.Model, in_place: bool = False) -> list[Stage]:
    """Split a stage-annotated model into standalone models (weights shared with ``model``, not copied).

    ``in_place``: a single stage is ``model`` itself, rewritten in place (no clone; the caller gives it up).
    """
    nodes = list(model.graph)
    stages_of = [_stage_of(n) for n in nodes]
    num_stages = max(stages_of) + 1 if stages_of else 1
    index = _producer_index(nodes)
    graph_input_names = [v.name for v in model.graph.inputs]
    graph_output_names = [v.name for v in model.graph.outputs]
    replicable = replicable_nodes(nodes)
    # Replicable nodes: duplicated into every stage that uses them, directly or through other replicable nodes.
    consumers_stages: list[set[int]] = [{st} for st in stages_of]
    for i in range(len(nodes) - 1, -1, -1):
        if not replicable[i]:
            continue
        used: set[int] = set()
        for o in nodes[i].outputs:
            for u in o.uses():
                j = index.get(id(u.node))
                if j is not None:
                    used |= consumers_stages[j]
            if o.is_graph_output():
                used.add(stages_of[i])
        consumers_stages[i] = used or {stages_of[i]}
    # Boundary tensors: produced in stage a, consumed in stage b > a.
    producer_stage: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if not replicable[i]:
            for o in node.outputs:
                producer_stage[o.name] = stages_of[i]
    boundary: set[str] = set()
    for i, node in enumerate(nodes):
        for s in consumers_stages[i]:
            for inp in node.inputs:
                if inp is not None and inp.name in producer_stage and producer_stage[inp.name] != s:
                    if producer_stage[inp.name] > s:
                        raise UnsupportedModelError(
                            f"tensor {inp.name!r} flows from stage {producer_stage[inp.name]} back to stage {s}: "
                            "the stage assignment is not in topological order"
                        )
                    boundary.add(inp.name)
    _ensure_types(model, boundary)
    value_consumer_stages: dict[str, set[int]] = {}
    for i, node in enumerate(nodes):
        for inp in node.inputs:
            if inp is not None:
                value_consumer_stages.setdefault(inp.name, set()).update(consumers_stages[i])

    stages = []
    for s in range(num_stages):
        clone = model if in_place and num_stages == 1 else model.clone()
        cnodes = list(clone.graph)
        keep = [s in consumers_stages[i] for i in range(len(cnodes))]
        values = {v.name: v for n in cnodes for v in n.outputs}
        for v in clone.graph.inputs:
            values[v.name] = v
        keep_ids = {id(n) for n, k in zip(cnodes, keep) if k}
        needed_inputs: list[ir.Value] = []
        seen_in: set[str] = set()
        recv: dict[str, int] = {}
        for n, k in zip(cnodes, keep):
            if not k:
                continue
            for inp in n.inputs:
                if inp is None or inp.name in seen_in:
                    continue
                if inp.is_graph_input() or (inp.name in boundary and producer_stage[inp.name] != s):
                    seen_in.add(inp.name)
                    needed_inputs.append(inp)
                    if inp.name in boundary and not inp.is_graph_input():
                        recv[inp.name] = producer_stage[inp.name]
        outs: list[ir.Value] = []
        send: dict[str, list[int]] = {}
        for name in graph_output_names:
            v = values.get(name)
            producer = v.producer() if v is not None else None
            if producer is None or id(producer) not in keep_ids:
                continue
            if replicable[cnodes.index(producer)]:
                if stages_of[cnodes.index(producer)] == s:
                    outs.append(v)
            elif producer_stage[name] == s:
                outs.append(v)
        for i, n in enumerate(cnodes):
            if not keep[i] or replicable[i]:
                continue
            for o in n.outputs:
                if o.name in boundary:
                    send[o.name] = sorted(value_consumer_stages[o.name] - {s})
                    if o not in outs:
                        outs.append(o)
        # Graph inputs feeding later stages only are dropped here; boundary inputs become graph inputs.
        drop = [n for n, k in zip(cnodes, keep) if not k]
        clone.graph.outputs.clear()
        # Detach boundary values from their (dropped) producers by giving the stage fresh input values.
        new_inputs = []
        for v in needed_inputs:
            if v.is_graph_input():
                new_inputs.append(v)
            else:
                fresh = ir.Value(name=v.name, type=v.type, shape=v.shape)
                v.replace_all_uses_with(fresh)
                new_inputs.append(fresh)
        clone.graph.remove(drop, safe=True)  # safe: also detaches them from the initializers they read
        clone.graph.inputs.clear()
        clone.graph.inputs.extend(new_inputs)
        clone.graph.outputs.extend(outs)
        for name in [n for n, v in clone.graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
            clone.graph.initializers.pop(name)
        for n in clone.graph:
            n.metadata_props.pop(STAGE_KEY, None)
        clone.metadata_props["maia.pipeline_stage"] = str(s)
        stages.append(
            Stage(
                index=s,
                model=clone,
                inputs=[v.name for v in new_inputs],
                outputs=[v.name for v in outs],
                graph_inputs=[v.name for v in new_inputs if v.name in graph_input_names],
                recv=recv,
                send=send,
            )
        )
    return stages


def split_pipeline(model: ir.Model, num_stages: int, balance: str = "flops",
                   in_place: bool = False) -> tuple[PipelinePlan, list[Stage]]:
    """Plan and extract in one call (the model is annotated in place; ``in_place``: see ``extract_stages``)."""
    result = PipelineParallelPass(num_stages, balance)(model)
    return result.plan, extract_stages(model, in_place=in_place)



__all__ = [
    "BALANCE_MODES",
    "STAGE_KEY",
    "PipelineParallelPass",
    "PipelinePlan",
    "PipelineResult",
    "Stage",
    "crossing_bytes",
    "extract_stages",
    "node_loads",
    "plan_pipeline",
    "split_pipeline",
]
