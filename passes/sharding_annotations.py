"""--annotate-only: write ONNX IR v11 sharding annotations (ShardingSpecProto, pipeline_stage) on the unsharded model.

Instead of splitting, every node gets a ``NodeDeviceConfigurationProto`` for one model configuration
(``ModelProto.configuration``: tp*pp devices): its pipeline stage (the PP plan) and, for each weight the TP
analysis shards, a ``ShardingSpecProto`` (axis, tp shards, the stage's device group). The model is
otherwise unchanged (same graph, same weights) and runs as before in runtimes that ignore the annotations.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import onnx_ir as ir
import onnx_ir.passes

from maia_onnx.errors import InvalidOptionError

IR_VERSION_SHARDING = 11  # first IR version with ModelProto.configuration / NodeProto.device_configurations


def tp_tensor_layout(model: ir.Model, tp: int, tp_fn: Callable | None = None) -> dict[str, dict[str, Any]]:
    """``{initializer: {kind, axis}}`` from the TP engineer's structural analysis (on a clone; weights shared)."""
    if tp == 1:
        return {}
    if tp_fn is None:
        try:
            from maia_onnx.passes import tensor_parallel
        except Exception as exc:  # noqa: BLE001
            raise InvalidOptionError(f"--tp {tp} --annotate-only: the tensor-parallel pass is not available in this build") from exc
        analyze = getattr(tensor_parallel, "tensor_layout", None)
        if analyze is not None:
            return dict(analyze(model, tp))
        tp_fn = getattr(tensor_parallel, "split_model", None)
        if tp_fn is None:
            raise InvalidOptionError(f"--tp {tp} --annotate-only: the tensor-parallel pass has no analysis entry point")
    _, fragment = tp_fn(model.clone(), tp)
    return {name: {"kind": spec.get("kind"), "axis": spec.get("axis")} for name, spec in fragment.get("tensors", {}).items()}


class ShardingAnnotationsPass(onnx_ir.passes.InPlacePass):
    """Annotate (not split) a model for ``tp`` x ``pp`` devices; global device of (stage s, tp rank t) is s*tp+t."""

    def __init__(self, tp: int = 1, pp: int = 1, balance: str = "flops", layout: Mapping[str, Mapping[str, Any]] | None = None,
                 tp_fn: Callable | None = None, name: str | None = None):
        super().__init__()
        if tp < 1 or pp < 1:
            raise InvalidOptionError(f"--tp {tp} --pp {pp} is invalid: both must be >= 1")
        self.tp, self.pp, self.balance = tp, pp, balance
        self.layout = layout
        self.tp_fn = tp_fn
        self.name = name or f"maia_tp{tp}_pp{pp}"
        self.plan = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from maia_onnx.passes.pipeline_parallel import STAGE_KEY, PipelineParallelPass

        layout = dict(self.layout) if self.layout is not None else tp_tensor_layout(model, self.tp, self.tp_fn)
        self.plan = PipelineParallelPass(self.pp, self.balance)(model).plan
        world = self.tp * self.pp
        if any(c.name == self.name for c in model.device_configurations):
            raise InvalidOptionError(f"the model already has a device configuration named {self.name!r}: annotate the unannotated model")
        config = model.add_device_configuration(self.name, num_devices=world, device_names=tuple(f"maia:{d}" for d in range(world)))
        for node in model.graph:
            stage = int(node.metadata_props.pop(STAGE_KEY))
            devices = [stage * self.tp + t for t in range(self.tp)]
            sharded = False
            for value in node.inputs:
                spec = layout.get(value.name) if value is not None else None
                if spec is None or spec.get("axis") is None or spec.get("kind") == "replicated":
                    continue
                node.shard(value, configuration=config, axis=int(spec["axis"]), num_shards=self.tp,
                           device_indices=devices, pipeline_stage=stage)
                sharded = True
            if not sharded:
                node.set_pipeline_stage(config, stage)
        for key in ("maia.pipeline_stages", "maia.pipeline_balance"):
            model.metadata_props.pop(key, None)
        model.metadata_props["maia.sharding_annotations"] = self.name
        if model.ir_version < IR_VERSION_SHARDING:
            model.ir_version = IR_VERSION_SHARDING
        return ir.passes.PassResult(model, modified=True)


def annotate_model(model: ir.Model, tp: int = 1, pp: int = 1, balance: str = "flops", **kwargs) -> ir.Model:
    """Annotate ``model`` in place and return it (see ShardingAnnotationsPass)."""
    return ShardingAnnotationsPass(tp, pp, balance, **kwargs)(model).model


def annotate_file(model_path, output, tp: int = 1, pp: int = 1, balance: str = "flops", external_data: bool | None = None) -> dict[str, Any]:
    """``partition --annotate-only``: load, annotate, save to ``output`` atomically; returns a small report."""
    from maia_onnx.io import check_output_path, load_model, save_model

    check_output_path(output, model_path)
    model = load_model(model_path)
    p = ShardingAnnotationsPass(tp, pp, balance)
    p(model)
    save_model(model, output, external_data=external_data)
    found = read_annotations(model)
    return {
        "output": str(output),
        "configuration": p.name,
        "num_devices": tp * pp,
        "annotated_nodes": len(found["stage_of"]),
        "sharded_nodes": len(found["shards"]),
        "stage_loads": p.plan.loads if p.plan else [],
        "imbalance_pct": round(p.plan.imbalance_pct, 3) if p.plan else 0.0,
    }


def read_annotations(model: ir.Model) -> dict[str, Any]:
    """What the annotations say: ``{configs, stage_of: {node: stage}, shards: {node: [(value, [(axis, [shards])], devices)]}}``."""
    configs = list(model.device_configurations)
    out: dict[str, Any] = {"configs": [c.name for c in configs], "stage_of": {}, "shards": {}}
    for i, node in enumerate(model.graph):
        key = node.name or f"#{i}"  # unnamed nodes by their position
        for ndc in node.device_configurations:
            if ndc.pipeline_stage is not None:
                out["stage_of"][key] = ndc.pipeline_stage
            for spec in ndc.sharding_specs:
                out["shards"].setdefault(key, []).append(
                    (spec.value.name if spec.value is not None else None,
                     [(d.axis, [s.num_shards for s in d.simple_shardings]) for d in spec.sharded_dims],
                     list(spec.device))
                )
    return out


__all__ = ["ShardingAnnotationsPass", "annotate_file", "annotate_model", "read_annotations", "tp_tensor_layout"]
