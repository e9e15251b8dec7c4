"""`maia-onnx compile --engine ort`: the EPContext model written by ONNX Runtime's own compile API with the Maia EP.

ONNX Runtime's ``ModelCompiler`` loads the model with the Maia plugin EP (runtime/ep) and ``ep.context_enable=1``:
the EP's GetCapability places the nodes (the capability table), its Compile writes every device partition as a
Maia program (MAIAPRG1, the format of runtime/compile.py) and hands back one ``com.microsoft::EPContext`` node per
partition, which ORT saves in place of the partition. Programs are embedded, or written to ``<output
stem>_maia.bin`` beside the model (a MAIACTX1 side file). The result runs in the plugin EP and in the Python shim
(EmulatorSession) like a model from the Python compiler (``--engine python``, the default).

Differences from the Python engine: no host folding or kernel fusion (ORT sees the graph as it is); a narrow
(FP8/4-bit) value never crosses a partition boundary (the EP cannot add the host-side widening casts, so such
nodes stay on the host); the programs carry no roofline estimate (``plan.estimate`` is empty).
The compile checks itself like the Python engine: the compiled model in the shim against the input model in
plain ONNX Runtime on synthesized inputs (bit-identical in practice; VERIFY_TOLERANCE bounds it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import onnx_ir as ir
import onnxruntime as ort

from maia_onnx.errors import InvalidOptionError, ModelLoadError, UserError
from maia_onnx.inputs import make_inputs
from maia_onnx.io import check_output_path, load_model, quiet_binary_attribute_warnings
from maia_onnx.ortutil import run_model, session_options as plain_options
from maia_onnx.runtime import plugin_ep
from maia_onnx.runtime.capability import get_capability
from maia_onnx.runtime.compile import CompileResult, verify_compiled
from maia_onnx.runtime.session import _is_maia_context

VERIFY_TOLERANCE = 1e-5  # max |diff| / max |reference| per output, as the Python engine's self-check


class OrtCompileResult(CompileResult):
    """A compile by ONNX Runtime: the summary counts the partitions the EP actually wrote."""

    def summary(self) -> dict:
        out = super().summary()
        contexts = [n for n in self.model.graph if _is_maia_context(n)]
        out["engine"] = "ort"
        out["partitions"] = len(contexts)
        out["nodes_cpu"] = len(self.model.graph) - len(contexts)
        out["nodes_device"] = self.device_nodes
        return out


def _device_nodes(model: ir.Model, model_dir: Path | None) -> tuple[int, dict[str, bytes]]:
    """(nodes the programs schedule, embedded programs by partition) of a compiled model."""
    from maia_onnx.runtime.session import _ProgramSource

    source = _ProgramSource(model_dir)
    nodes, programs = 0, {}
    for node in model.graph:
        if not _is_maia_context(node):
            continue
        program = source.program(node)
        nodes += len(program.header["plan"]["schedule"])
        if int(node.attributes["embed_mode"].value) == 1:
            blob = node.attributes["ep_cache_context"].value
            programs[program.name] = blob if isinstance(blob, bytes) else blob.encode("utf-8")
    return nodes, programs


def compile_with_ort(
    model: ir.Model | str | os.PathLike,
    output: str | os.PathLike | None = None,
    device: str = "maia100",
    embed: bool = True,
    excluded_ops: Iterable[str] = (),
    dims: Mapping[str, int] | None = None,
    external_data: bool | None = None,
    verify: bool = True,
) -> OrtCompileResult:
    """Compile ``model`` for ``device`` with ONNX Runtime's ModelCompiler and the Maia plugin EP.

    Same contract as ``compile_model``: ``output`` written atomically (model and side file together, only after
    the self-check passed), ``embed=False`` needs ``output``; the input (path or in-memory model) is never modified.
    """
    quiet_binary_attribute_warnings()
    reason = plugin_ep.unavailable_reason()
    if reason:
        raise UserError(f"--engine ort needs the Maia plugin EP: {reason}; or compile with --engine python")
    if external_data:
        raise InvalidOptionError("--external-data is not supported with --engine ort (ONNX Runtime writes the model): "
                                 "use --engine python, or the default")
    if not embed and output is None:
        raise UserError("--no-embed needs an output path (the side file is written next to it): pass -o")
    source_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    if output is not None:
        check_output_path(output, *([source_path] if source_path else []))
    loaded = load_model(source_path) if source_path else model
    if any(n.op_type == "EPContext" and n.domain == "com.microsoft" for n in loaded.graph):
        raise UserError("model already contains EPContext nodes (it is compiled): compile the original model instead")
    dims = dict(dims or {})
    excluded_ops = [op for op in excluded_ops if op]

    reference = None
    if verify:
        feeds = make_inputs(loaded, seed=0, dims=dims)
        reference = feeds, run_model(source_path if source_path else loaded, feeds)
    placement = get_capability(loaded, device, excluded_ops=excluded_ops, dims=dims)  # the table, for the report

    parent = Path(output).parent if output is not None else Path(tempfile.gettempdir())
    staging = Path(tempfile.mkdtemp(prefix=".maia-ort-compile.", dir=parent if str(parent) else "."))
    try:
        if source_path is None:  # ModelCompiler reads a file (external weights resolve against it)
            from maia_onnx.io import save_model

            source_path = save_model(loaded, staging / "input.onnx")
        staged = staging / (Path(output).name if output is not None else "compiled.onnx")
        options = plugin_ep.session_options(device, excluded_ops, base=plain_options(), dims=dims)
        try:
            compiler = ort.ModelCompiler(options, str(source_path), embed_compiled_data_into_model=embed,
                                         graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            compiler.compile_to_file(str(staged))
        except Exception as exc:  # ORT's exception types: the EP's message as one line
            raise ModelLoadError(f"ONNX Runtime could not compile {source_path.name} with MaiaExecutionProvider: "
                                 f"{plugin_ep.ep_error(exc)}") from None
        side = staged.with_name(f"{staged.stem}_maia.bin")
        verification = (verify_compiled(staged, device, *reference, what="ORT-compiled model", hint="--no-verify skips this check")
                        if reference is not None else None)
        compiled = load_model(staged)
        device_nodes, programs = _device_nodes(compiled, staging)
        if output is None:
            result = OrtCompileResult(model=compiled, placement=placement, programs=programs)
        else:
            output = Path(output)
            final_side = output.with_name(side.name)
            if side.exists():
                os.replace(side, final_side)
            os.replace(staged, output)
            result = OrtCompileResult(model=compiled, placement=placement, programs=programs, path=output,
                                      side_file=final_side if final_side.exists() and not embed else None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.device_nodes = device_nodes
    result.verification = verification
    return result
