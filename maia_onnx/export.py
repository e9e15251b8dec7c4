"""PyTorch -> ONNX export (torch dynamo exporter) with clean weight layout/names, metadata and an ORT-vs-PyTorch parity check."""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx_ir as ir

from maia_onnx.errors import InvalidOptionError, UserError, ValidationError

# Opset 21: FP8 QuantizeLinear/DequantizeLinear with blocked quantization, and the dynamo exporter
# (torchlib targets 18) version-converts to it cleanly.
DEFAULT_OPSET = 21
MIN_OPSET = 18
REL_TOLERANCE = 1e-4  # FP32 parity bound: max|ort - torch| / max|torch| per output

CONFIG_METADATA_KEY = "maia_onnx.config"
SOURCE_METADATA_KEY = "maia_onnx.source"

# node metadata the exporter attaches that is only debugging noise downstream (stack traces are large)
_DROP_NODE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


@dataclass
class ExportResult:
    path: Path
    parity: dict[str, dict[str, float]]  # output name -> {max_abs, max_rel, cosine}
    model: str = ""
    opset: int = DEFAULT_OPSET
    dynamic: bool = True
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    inputs: dict[str, list] = field(default_factory=dict)  # ONNX input name -> symbolic shape
    outputs: dict[str, list] = field(default_factory=dict)

    @property
    def max_rel(self) -> float:
        return max((p["max_rel"] for p in self.parity.values()), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "model": self.model,
            "opset": self.opset,
            "dynamic": self.dynamic,
            "seconds": round(self.seconds, 3),
            "parity": self.parity,
            "max_rel": self.max_rel,
            "tolerance": REL_TOLERANCE,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "config": self.config,
        }


def _log(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def stderr_progress(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# graph clean-up


def _name_scope_module(node: ir.Node) -> str | None:
    """The torch module path ('model.layers.0.self_attn.q_proj') a node came from, if the exporter recorded it."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        import ast

        parts = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    # last entry is the aten op name ('linear_3'), the one before it the owning module
    return parts[-2] if len(parts) >= 2 and parts[-2] else None


def _transposed_lazy(tensor: ir.TensorProtocol, name: str) -> ir.LazyTensor:
    """W^T computed only when serialized, so a multi-GB model never holds a second full copy of its weights."""
    shape = ir.Shape([tensor.shape[1], tensor.shape[0]])

    def compute():
        return ir.Tensor(np.ascontiguousarray(tensor.numpy().T), name=name)

    return ir.LazyTensor(compute, dtype=tensor.dtype, shape=shape, name=name, cache=False)


def fold_weight_transposes(model: ir.Model) -> int:
    """Transpose(perm=[1,0]) of a 2-D initializer feeding MatMul/Gemm -> one [in, out] initializer.

    The folded weight takes the torch parameter's name (``...q_proj.weight``) so TP and scale import can
    map names; when the original is also used elsewhere (tied embeddings) it is named after the module.
    """
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or src.name not in graph.initializers or src.const_value is None:
            continue
        perm = node.attributes.get("perm")
        if len(src.shape) != 2 or (perm is not None and list(perm.as_ints()) != [1, 0]):
            continue
        out = node.outputs[0]
        consumers = [use.node for use in out.uses()]
        if not consumers or any(c.op_type not in ("MatMul", "Gemm") for c in consumers):
            continue
        other_users = [use.node for use in src.uses() if use.node is not node]
        if other_users:
            module = _name_scope_module(consumers[0]) or _name_scope_module(node)
            new_name = f"{module}.weight" if module else f"{src.name}.transposed"
            if new_name == src.name:
                # a tied parameter exported under the head's name: the shared original takes its other
                # user's (the embedding's) module name, so the MatMul weight can be lm_head.weight
                other = _name_scope_module(other_users[0])
                if other and f"{other}.weight" not in graph.initializers:
                    graph.initializers.pop(src.name)
                    src.name = f"{other}.weight"
                    graph.register_initializer(src)
            if new_name in graph.initializers:
                new_name = f"{src.name}.transposed"
        else:
            new_name = src.name
        tensor = src.const_value
        new_value = ir.Value(name=new_name, shape=ir.Shape([src.shape[1], src.shape[0]]), type=src.type)
        new_value.const_value = _transposed_lazy(tensor, new_name)
        out.replace_all_uses_with(new_value)
        graph.remove(node, safe=True)
        if not other_users:
            graph.initializers.pop(src.name)
            src.const_value = None  # the lazy transpose holds the data now; nothing else should
        graph.register_initializer(new_value)
        folded += 1
    return folded


def _initializer_weighted(graph: ir.Graph, op_types: tuple[str, ...]):
    """(node, weight) for each node of ``op_types`` whose second input (the weight) is an initializer of ``graph``."""
    for node in graph:
        if node.op_type not in op_types or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is None or weight.name not in graph.initializers:
            continue
        yield node, weight


def untranspose_gemm_weights(model: ir.Model) -> int:
    """Gemm(transB=1) on an initializer -> Gemm(transB=0) on its [in, out] transpose: one weight layout everywhere."""
    changed = 0
    for node, weight in _initializer_weighted(model.graph, ("Gemm",)):
        trans_b = node.attributes.get("transB")
        if trans_b is None or trans_b.as_int() != 1:
            continue
        if weight.const_value is None or len(weight.shape) != 2 or len(list(weight.uses())) != 1:
            continue
        old = weight.const_value
        weight.const_value = _transposed_lazy(old, weight.name)
        weight.shape = ir.Shape([old.shape[1], old.shape[0]])
        node.attributes["transB"] = ir.AttrInt64("transB", 0)
        changed += 1
    return changed


def rename_linear_weights(model: ir.Model) -> int:
    """Give MatMul/Gemm weights the optimizer folded into anonymous constants their module's name."""
    graph = model.graph
    renamed = 0
    for node, weight in _initializer_weighted(graph, ("MatMul", "Gemm")):
        if not (weight.name.startswith("val_") or weight.name.startswith("_val")):
            continue
        module = _name_scope_module(node)
        if not module:
            continue
        new_name = f"{module}.weight"
        if new_name in graph.initializers:
            continue
        graph.initializers.pop(weight.name)
        weight.name = new_name
        graph.register_initializer(weight)
        renamed += 1
    return renamed


def strip_initializer_prefix(model: ir.Model, prefix: str) -> int:
    """'model.transformer.h.0...' -> 'transformer.h.0...': drop a wrapper module's prefix so names match the checkpoint."""
    graph = model.graph
    renamed = 0
    for name in list(graph.initializers):
        if name.startswith(prefix) and name[len(prefix):] and name[len(prefix):] not in graph.initializers:
            value = graph.initializers.pop(name)
            value.name = name[len(prefix):]
            graph.register_initializer(value)
            renamed += 1
    return renamed


def clean_exported_model(model: ir.Model, config: Mapping[str, Any] | None = None, source: str | None = None,
                         param_prefix: str = "") -> ir.Model:
    """Downstream-friendly graph: [in, out] weight initializers named like parameters, lean node metadata."""
    fold_weight_transposes(model)
    untranspose_gemm_weights(model)
    rename_linear_weights(model)
    if param_prefix:
        strip_initializer_prefix(model, param_prefix)
    normalize_symbolic_dims(model)
    for node in model.graph:
        for key in _DROP_NODE_METADATA:
            node.metadata_props.pop(key, None)
    if config is not None:
        model.metadata_props[CONFIG_METADATA_KEY] = json.dumps(dict(config), sort_keys=True, default=str)
    if source is not None:
        model.metadata_props[SOURCE_METADATA_KEY] = source
    model.producer_name = "maia-onnx"
    return model


def normalize_symbolic_dims(model: ir.Model) -> None:
    """'seq + past' and 'past + seq' are the same dim: write sums with sorted terms so outputs agree."""
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        if value.shape is None:
            continue
        dims = []
        changed = False
        for d in value.shape:
            text = None if isinstance(d, int) else str(d)
            if text and "+" in text and all(t.strip().isidentifier() for t in text.split("+")):
                new = " + ".join(sorted(t.strip() for t in text.split("+")))
                changed |= new != text
                dims.append(new)
            else:
                dims.append(d if isinstance(d, int) else (text if text is not None else None))
        if changed:
            value.shape = ir.Shape(dims)


def read_config(model: ir.Model) -> dict:
    """The ``maia_onnx.config`` metadata (num_layers, num_heads, ...) of an exported model, or {}."""
    text = model.metadata_props.get(CONFIG_METADATA_KEY)
    return json.loads(text) if text else {}


def _symbolic_shape(value: ir.Value) -> list:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else str(d) for d in value.shape]


# ----------------------------------------------------------------------------------------------
# parity


def _to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def torch_outputs(module, inputs: Mapping[str, Any], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run the module on inputs (in forward() order) and flatten its outputs into name -> array."""
    import torch

    with torch.no_grad():
        out = module(*inputs.values())
    flat = _flatten_outputs(out)
    names = output_names or [f"output_{i}" for i in range(len(flat))]
    if len(names) != len(flat):
        raise ValidationError(f"module returned {len(flat)} tensors but {len(names)} output names were given")
    return {n: _to_numpy(t) for n, t in zip(names, flat)}


def _flatten_outputs(out) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten_outputs(v)]
    raise ValidationError(f"module returned a {type(out).__name__}; expected tensors (tuple/list/dict of tensors)")


def _ort_run(onnx_path: str | os.PathLike, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from maia_onnx.ortutil import make_session

    sess = make_session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    result = sess.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, result))


def check_parity(
    onnx_path: str | os.PathLike,
    module=None,
    inputs: Mapping[str, Any] | None = None,
    tolerance: float = REL_TOLERANCE,
    reference: Mapping[str, np.ndarray] | None = None,
    output_names: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Run the ONNX model in ORT (optimizations off) and the module in PyTorch on the same inputs.

    Returns output name -> {max_abs, max_rel, cosine}; raises ValidationError when any output's relative
    error exceeds ``tolerance``. Pass ``reference`` (precomputed torch outputs) to skip running the module.
    """
    from maia_onnx.ortutil import compare

    feeds = {k: _to_numpy(v) for k, v in (inputs or {}).items()}
    got = _ort_run(onnx_path, feeds)
    if reference is None:
        if module is None:
            raise ValueError("check_parity needs module or reference")
        reference = torch_outputs(module, inputs, output_names or list(got))
    report = {}
    for name, ref in reference.items():
        if name not in got:
            raise ValidationError(f"exported model {onnx_path} lacks output {name!r} (has {', '.join(got)})")
        if tuple(np.shape(ref)) != tuple(np.shape(got[name])):
            raise ValidationError(f"output {name!r} shape {np.shape(got[name])} in ONNX vs {np.shape(ref)} in PyTorch")
        report[name] = compare(ref, got[name])
    bad = {n: r for n, r in report.items() if not r["max_rel"] <= tolerance}
    if bad:
        worst = max(bad, key=lambda n: bad[n]["max_rel"] if bad[n]["max_rel"] == bad[n]["max_rel"] else float("inf"))
        raise ValidationError(
            f"ONNX/PyTorch mismatch in {onnx_path}: output {worst!r} relative error {bad[worst]['max_rel']:.3e} "
            f"> {tolerance:g} (max abs {bad[worst]['max_abs']:.3e}); the export is numerically wrong"
        )
    return report


# ----------------------------------------------------------------------------------------------
# export


def export_spec(
    spec,
    out_path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    external_data: bool | None = None,
    check: bool = True,
    tolerance: float = REL_TOLERANCE,
    source: str | None = None,
    progress: Callable[[str], None] | None = None,
    release_module: bool = False,
) -> ExportResult:
    """Export a ModelSpec to ``out_path`` (atomic), then parity-check it in ORT against PyTorch.

    ``release_module=True`` drops the spec's module before ORT loads the model, so a multi-GB model is
    never resident twice (torch + ORT).
    """
    import torch

    from maia_onnx.io import check_output_path, save_model

    if opset < MIN_OPSET:
        raise InvalidOptionError(f"--opset {opset} is too old for the dynamo exporter: use {MIN_OPSET} or newer (default {DEFAULT_OPSET})")
    out_path = check_output_path(out_path)
    if out_path.is_dir():
        raise UserError(f"-o {out_path} is a directory: give a file path such as {out_path / (spec.name.split(':')[-1].split('/')[-1] + '.onnx')}")
    start = time.perf_counter()
    module = spec.module
    module.eval()
    reference = None
    if check:
        _log(progress, f"running {spec.name} in PyTorch on example inputs")
        reference = torch_outputs(module, spec.example_inputs, spec.output_names)
    _log(progress, f"exporting {spec.name} with torch.onnx.export(dynamo=True, opset={opset}, dynamic={dynamic})")
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                module,
                spec.args,
                dynamo=True,
                opset_version=opset,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_shapes=spec.dynamic_shapes if dynamic else None,
                optimize=False,
                verbose=False,
            )
    except Exception as exc:  # torch raises many internal types; the user needs to know the model is not exportable
        raise UnsupportedExportError(
            f"torch.onnx.export cannot export {spec.name}: {_export_failure_reason(exc)} "
            "(rewrite the unsupported part or wrap the model in a package.module:factory)"
        ) from exc
    model = program.model
    _log(progress, "folding weight transposes, optimizing graph")
    # fold Transpose(weight) first: lazily, so the optimizer's size limits never leave a Transpose behind
    fold_weight_transposes(model)
    import onnxscript.optimizer

    model = onnxscript.optimizer.optimize(model)
    clean_exported_model(model, spec.config, source or spec.name, getattr(spec, "param_prefix", ""))
    # stage beside the output: the model only replaces out_path once it is saved and parity-checked, so a
    # failed check (or an interrupt) leaves any previous file untouched and no partial output behind
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".export", dir=out_path.parent))
    try:
        staged = staging / out_path.name
        _log(progress, f"saving {out_path}")
        save_model(model, staged, external_data=external_data)
        inputs_desc = {v.name: _symbolic_shape(v) for v in model.graph.inputs}
        outputs_desc = {v.name: _symbolic_shape(v) for v in model.graph.outputs}
        if release_module:
            # onnxscript's rewrite rules keep module-level references to the last graph they matched, which
            # would keep every weight alive; detach the data so only the torch module (released next) owns it
            for value in model.graph.initializers.values():
                value.const_value = None
        del program, model
        if release_module:
            spec.module = None
            del module
        gc.collect()
        parity: dict = {}
        if check:
            _log(progress, "checking parity in ONNX Runtime (ORT_DISABLE_ALL)")
            parity = check_parity(staged, inputs=spec.example_inputs, reference=reference, tolerance=tolerance)
        _publish(staged, out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(
        path=Path(out_path),
        parity=parity,
        model=spec.name,
        opset=opset,
        dynamic=dynamic,
        seconds=time.perf_counter() - start,
        config=dict(spec.config),
        inputs=inputs_desc,
        outputs=outputs_desc,
    )


def _export_failure_reason(exc: BaseException) -> str:
    """The informative line of a torch exporter error (its first line is a generic banner)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        idx = lines.index("## Exception summary")
        if idx + 1 < len(lines):
            return lines[idx + 1][:300]
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:300]}"
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's warnings (missing torchvision, axis renames) are noise for users of this tool."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    import io

    try:
        # torch.export prints graph dumps on some failures; the one-line reason goes into our error instead
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class UnsupportedExportError(UserError):
    """The PyTorch model cannot be traced/exported by torch.export (first line of torch's reason)."""


def _publish(staged: Path, out_path: Path) -> None:
    """Move a staged model (and its .data side file) onto out_path; drop a stale side file of an older export."""
    data_name = f"{out_path.name}.data"
    try:
        if (staged.parent / data_name).exists():
            os.replace(staged.parent / data_name, out_path.parent / data_name)
        elif (out_path.parent / data_name).exists():
            os.unlink(out_path.parent / data_name)
        os.replace(staged, out_path)
    except OSError as exc:
        raise UserError(f"cannot write {out_path}: {exc.strerror or exc}; choose a writable -o") from exc


def export_builtin(
    name: str,
    out_path: str | os.PathLike,
    size: str | None = "tiny",
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    external_data: bool | None = None,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Build a built-in model (llama-tiny, unet-tiny, yolo-tiny; size tiny|large) and export it."""
    from maia_onnx.models import registry

    _log(progress, f"building {name} (size={size}, seed={seed})")
    spec = registry.build(name, size=size, seed=seed, dims=dims)
    return export_spec(
        spec, out_path, opset=opset, dynamic=dynamic, external_data=external_data, check=check,
        source=f"builtin:{spec.name}:{size}", progress=progress, release_module=True,
    )


def load_factory(ref: str):
    """``package.module:factory`` -> ModelSpec. The factory returns (module, inputs) or a ModelSpec-like object."""
    from maia_onnx.models.registry import ModelSpec

    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise UserError(f"bad factory reference {ref!r}: write it as package.module:factory")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`, let users point at modules in the current directory
    try:
        mod = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserError(f"cannot import module {module_name!r} of {ref!r} ({exc}): check the name and PYTHONPATH") from exc
    except Exception as exc:
        raise UserError(f"importing {module_name!r} of {ref!r} failed: {type(exc).__name__}: {exc}") from exc
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"module {module_name!r} has no attribute {attr!r}: check the factory name in {ref!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{ref!r} is not callable: it must be a function returning (module, example_inputs)")
    try:
        made = obj()
    except Exception as exc:
        raise UserError(f"factory {ref!r} raised {type(exc).__name__}: {exc}") from exc
    return spec_from_factory_result(made, ref, ModelSpec)


def spec_from_factory_result(made, ref: str, spec_cls=None):
    import torch

    if spec_cls is None:
        from maia_onnx.models.registry import ModelSpec as spec_cls
    if hasattr(made, "module") and hasattr(made, "example_inputs"):
        module, inputs = made.module, made.example_inputs
        input_names = list(getattr(made, "input_names", None) or [])
        output_names = list(getattr(made, "output_names", None) or [])
        dyn = getattr(made, "dynamic_shapes", None)
        config = dict(getattr(made, "config", None) or {})
    elif isinstance(made, (tuple, list)) and len(made) == 2:
        module, inputs = made
        input_names, output_names, dyn, config = [], [], None, {}
    else:
        raise UserError(
            f"factory {ref!r} returned {type(made).__name__}; it must return (module, example_inputs) or a spec "
            "with .module and .example_inputs"
        )
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"factory {ref!r} returned {type(module).__name__} as the module; expected a torch.nn.Module")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, Mapping):
        named = dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        named = {(input_names[i] if i < len(input_names) else f"input_{i}"): t for i, t in enumerate(inputs)}
    else:
        raise UserError(f"factory {ref!r} returned {type(inputs).__name__} as example inputs; expected a tuple or dict of tensors")
    for k, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise UserError(f"factory {ref!r}: example input {k!r} is a {type(t).__name__}, expected a torch.Tensor")
    if isinstance(inputs, Mapping):
        input_names = list(named)
    if not output_names:
        flat = _flatten_outputs(_run_quiet(module, named))
        output_names = ["output"] if len(flat) == 1 else [f"output_{i}" for i in range(len(flat))]
    if dyn is None:
        # default: first dim of every input is the batch
        from torch.export import Dim

        batch = Dim("batch")
        dyn = tuple({0: batch} if t.dim() >= 1 and t.shape[0] >= 2 else {} for t in named.values())
    config = {"model": ref, **config}
    return spec_cls(
        name=ref, module=module.eval(), example_inputs=named, input_names=list(named), output_names=output_names,
        dynamic_shapes=dyn, config=config,
    )


def _run_quiet(module, named):
    import torch

    with torch.no_grad():
        return module.eval()(*named.values())


def export_model(
    ref: str,
    out_path: str | os.PathLike,
    size: str | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    external_data: bool | None = None,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export any supported MODEL reference: built-in name, ``package.module:factory`` or ``hf:DIR``."""
    if ref.startswith("hf:"):
        from maia_onnx.hf import build_hf_spec

        spec = build_hf_spec(ref[3:], seed=seed, dims=dims, progress=progress)
        return export_spec(spec, out_path, opset=opset, dynamic=dynamic, external_data=external_data, check=check,
                           source=ref, progress=progress, release_module=True)
    if ":" in ref:
        _log(progress, f"calling factory {ref}")
        spec = load_factory(ref)
        return export_spec(spec, out_path, opset=opset, dynamic=dynamic, external_data=external_data, check=check,
                           source=f"factory:{ref}", progress=progress)
    return export_builtin(ref, out_path, size=size, opset=opset, dynamic=dynamic, seed=seed, dims=dims,
                          external_data=external_data, check=check, progress=progress)
