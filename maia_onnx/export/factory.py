"""``package.module:factory`` -> ModelSpec: the factory contract (inputs bound by name or position, nested varargs shapes, output names)."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Mapping

from maia_onnx.errors import UserError
from maia_onnx.export.core import call_module, named_outputs
from maia_onnx.extras import require


def load_factory(ref: str):
    """``package.module:factory`` -> ModelSpec.

    The factory returns ``(module, example_inputs)``, ``(module, example_inputs, output_names)``, a dict with keys
    module / example_inputs (+ input_names, output_names, dynamic_shapes, config), or an object with those attributes.
    """
    require("torch", "export", f"exporting {ref}")
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
    return spec_from_factory_result(made, ref)


_FIELDS = ("module", "example_inputs", "input_names", "output_names", "dynamic_shapes", "config")


def _unpack(made, ref: str) -> dict[str, Any]:
    if isinstance(made, Mapping) and "module" in made:
        fields = {k: made.get(k) for k in _FIELDS}
        if fields["example_inputs"] is None:
            fields["example_inputs"] = made.get("inputs")
        return fields
    if hasattr(made, "module") and hasattr(made, "example_inputs"):
        return {k: getattr(made, k, None) for k in _FIELDS}
    if isinstance(made, (tuple, list)) and len(made) in (2, 3):
        return {**dict.fromkeys(_FIELDS), "module": made[0], "example_inputs": made[1],
                "output_names": made[2] if len(made) == 3 else None}
    raise UserError(
        f"factory {ref!r} returned {type(made).__name__}; it must return (module, example_inputs[, output_names]), "
        "a dict with 'module' and 'example_inputs', or a spec with .module and .example_inputs"
    )


def bind_by_name(module, named: Mapping[str, Any], ref: str) -> tuple[dict, bool]:
    """Decide how a dict of example inputs reaches ``forward``: by name when its keys are forward()'s parameters.

    Returns (inputs in forward() parameter order, by_name). A dict whose keys name no parameter at all is taken
    positionally (its keys only label the ONNX inputs); a dict mixing parameter names with unknown keys is refused,
    since binding it either way would feed a tensor to the wrong argument.
    """
    params = inspect.signature(module.forward).parameters
    named_params = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    known = [k for k in named if k in named_params]
    if not known and not takes_kwargs:
        return dict(named), False
    unknown = [k for k in named if k not in named_params]
    if unknown and not takes_kwargs:
        raise UserError(
            f"factory {ref!r}: example input(s) {', '.join(map(repr, unknown))} are not parameters of "
            f"{type(module).__name__}.forward({', '.join(named_params)}): name them after forward()'s parameters"
        )
    order = {n: i for i, n in enumerate(named_params)}
    ordered = dict(sorted(named.items(), key=lambda kv: order.get(kv[0], len(order))))
    return ordered, True


def nest_for_varargs(module, dynamic_shapes, count: int):
    """A flat per-input dynamic_shapes tuple -> the nesting torch.export wants for ``forward(a, *rest)``: (da, (dr1, dr2, ...))."""
    if not isinstance(dynamic_shapes, (tuple, list)) or len(dynamic_shapes) != count:
        return dynamic_shapes
    params = list(inspect.signature(module.forward).parameters.values())
    var = [i for i, p in enumerate(params) if p.kind == p.VAR_POSITIONAL]
    if not var:
        return dynamic_shapes
    head = var[0]
    if len(dynamic_shapes) > head and isinstance(dynamic_shapes[head], (tuple, list)) and len(dynamic_shapes) == head + 1:
        return dynamic_shapes  # already nested
    flat = list(dynamic_shapes)
    return tuple(flat[:head]) + (tuple(flat[head:]),)


def _default_dynamic_shapes(named: Mapping[str, Any], by_name: bool, module):
    """First dim of every input of size >= 2 is the batch (shared); sizes 0/1 would be specialized by torch.export."""
    from torch.export import Dim

    batch = Dim("batch")
    per_input = [{0: batch} if t.dim() >= 1 and t.shape[0] >= 2 else {} for t in named.values()]
    if by_name:
        return dict(zip(named, per_input))
    return nest_for_varargs(module, tuple(per_input), len(per_input))


def spec_from_factory_result(made, ref: str, spec_cls=None):
    """Validate what a factory returned and turn it into a ModelSpec (names, binding, dynamic shapes, config)."""
    import torch

    if spec_cls is None:
        from maia_onnx.models.registry import ModelSpec as spec_cls
    fields = _unpack(made, ref)
    module, inputs = fields["module"], fields["example_inputs"]
    input_names = list(fields["input_names"] or [])
    output_names = list(fields["output_names"] or [])
    dyn, config = fields["dynamic_shapes"], dict(fields["config"] or {})
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"factory {ref!r} returned {type(module).__name__} as the module; expected a torch.nn.Module")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, Mapping):
        named, by_name = bind_by_name(module, inputs, ref)
    elif isinstance(inputs, (tuple, list)):
        named = {(input_names[i] if i < len(input_names) else f"input_{i}"): t for i, t in enumerate(inputs)}
        by_name = False
    else:
        raise UserError(f"factory {ref!r} returned {type(inputs).__name__} as example inputs; expected a tuple or dict of tensors")
    for k, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise UserError(f"factory {ref!r}: example input {k!r} is a {type(t).__name__}, expected a torch.Tensor")
    module = module.eval()
    if not output_names:
        try:
            produced = call_module(module, named, by_name)
        except Exception as exc:
            raise UserError(f"factory {ref!r}: running the module on its example inputs raised {type(exc).__name__}: {exc}") from exc
        output_names = [name for name, _ in named_outputs(produced)]
    if dyn is None:
        dyn = _default_dynamic_shapes(named, by_name, module)
    elif not by_name:
        dyn = nest_for_varargs(module, dyn, len(named))
    config = {"model": ref, **config}
    return spec_cls(
        name=ref, module=module, example_inputs=named, input_names=list(named), output_names=output_names,
        dynamic_shapes=dyn, config=config, by_name=by_name,
    )
