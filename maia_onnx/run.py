"""The `run` verb: run a plain model, a Maia-compiled model or a partition directory (in process or one process
per rank under torchrun), compare with a reference, save the outputs, and return the report as data.

``maia-onnx run`` (``maia_onnx/cli/run.py``) parses options into these calls and prints what they return.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from maia_onnx.errors import InputError, InvalidOptionError, UserError
from maia_onnx.inputs import input_shape, make_inputs, synthesize
from maia_onnx.io import atomic_write, load_model
from maia_onnx.ortutil import compare_outputs, run_model
from maia_onnx.partition.manifest import read_manifest
from maia_onnx.runtime.distributed import launch, timing_rows
from maia_onnx.runtime.executor import run_partition
from maia_onnx.runtime.session import placement_report, session_for

DEFAULT_PROVIDERS = ("MaiaExecutionProvider", "CPUExecutionProvider")


def _names(value: str | Sequence[str] | None) -> list[str]:
    """A comma-separated string or a sequence of names -> list of names."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [t.strip() for t in items if t and t.strip()]


def load_feeds(model: ir.Model | None, inputs_path: str | None, random: bool, dims: Mapping[str, int] | None,
               seed: int) -> dict[str, np.ndarray]:
    """Input feeds from an .npz (names = graph inputs) or synthesized for the model's inputs (``maia_onnx.inputs``)."""
    if inputs_path and random:
        raise InvalidOptionError("--inputs and --random exclude each other: pass one")
    if inputs_path:
        path = Path(inputs_path)
        if not path.is_file():
            raise UserError(f"inputs file not found: {path} (an .npz with one array per graph input)")
        try:
            with np.load(path, allow_pickle=False) as data:
                feeds = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {path} as .npz ({exc}): save inputs with numpy.savez") from exc
        if model is not None:
            names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
            missing = [n for n in names if n not in feeds]
            if missing:
                raise UserError(f"{path} lacks inputs {', '.join(missing)} (has {', '.join(feeds) or 'none'}): add them")
            check_feeds(model, feeds, path)
        return feeds
    if model is None:
        raise InvalidOptionError("--inputs x.npz or --random: pass one")
    return make_inputs(model, seed=seed, dims=dims)


def check_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray], source) -> None:
    """Refuse feeds whose dtype, rank or fixed dims differ from the graph inputs (one line naming the input)."""
    for value in model.graph.inputs:
        if value.name not in feeds or value.dtype is None:
            continue
        arr = feeds[value.name]
        want = value.dtype.numpy()
        if arr.dtype != want:
            raise InputError(f"input {value.name!r} in {source} is {arr.dtype}, the model expects {np.dtype(want).name}: "
                             f"save it as {np.dtype(want).name}")
        if value.shape is None:
            continue
        expected = [d if isinstance(d, int) else str(d) for d in value.shape]
        fixed_ok = all(not isinstance(d, int) or d == n for d, n in zip(value.shape, arr.shape))
        if arr.ndim != len(expected) or not fixed_ok:
            raise InputError(f"input {value.name!r} in {source} has shape {list(arr.shape)}, the model expects {expected}: "
                             f"fix the array's shape")


def partition_feeds(directory: str | Path, dims: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthesized feeds for the source inputs of a partition directory: shapes and types from the manifest,
    value ranges (table sizes, masks) from the tp-rank-0 models that read each input (weights stay on disk;
    a vocab-split table bounds its index by one rank's rows, which the whole table also accepts)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    readers: dict[str, ir.Value] = {}
    for entry in manifest.ranks:
        if entry["tp_rank"] == 0:
            for value in ir.load(directory / entry["file"]).graph.inputs:
                readers.setdefault(value.name, value)
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in manifest.data["source"]["inputs"]:
        value = ir.Value(name=spec["name"], type=ir.TensorType(ir.DataType[spec["dtype"]]),
                         shape=None if spec["shape"] is None else
                         ir.Shape([d if d is not None else "unk" for d in spec["shape"]]))
        feeds[value.name] = synthesize(readers.get(value.name, value), input_shape(value, dims), rng)
    return feeds


def _refused(where, exc: Exception, inputs_path, random: bool) -> InputError:
    """ONNX Runtime refused the feeds: a problem with the inputs (or the --dim sizes), not an internal error."""
    first = (str(exc).strip().splitlines() or [""])[0]
    fix = ("check the --dim sizes (a sequence longer than the model's positions?)" if random
           else f"check the arrays in {inputs_path} (indices within their tables, shapes that fit)")
    return InputError(f"{where} refused its inputs: {first}: {fix}")


def run_model_file(model_path: str | Path, feeds: Mapping[str, np.ndarray], providers=DEFAULT_PROVIDERS,
                   device: str = "maia100", cpu_ops: Sequence[str] = (), repeat: int = 1):
    """Run a model file through maia_onnx.runtime.InferenceSession; returns (outputs dict, session, seconds per run)."""
    sess = session_for(str(model_path), providers=_names(providers), device=device, cpu_ops=_names(cpu_ops))
    names = [o.name for o in sess.get_outputs()]
    outputs = dict(zip(names, sess.run(names, feeds)))
    elapsed = 0.0
    for _ in range(max(repeat - 1, 0)):
        t0 = time.perf_counter()
        sess.run(names, feeds)
        elapsed += time.perf_counter() - t0
    return outputs, sess, (elapsed / (repeat - 1) if repeat > 1 else None)


def run_path(model: str | Path, inputs_path: str | None = None, random: bool = False,
             dims: Mapping[str, int] | None = None, seed: int = 0, providers: str | Sequence[str] = DEFAULT_PROVIDERS,
             device: str = "maia100", cpu_ops: str | Sequence[str] = (), save_outputs: str | Path | None = None,
             compare_to: str | Path | None = None, repeat: int = 1, show_report: bool = False,
             microbatches: int = 1) -> dict[str, Any]:
    """The work behind ``maia-onnx run MODEL``: run a model file or partition directory (in this process).

    Returns the report: ``kind``, output shapes/dtypes, providers and stages, latency, the placement report
    (``show_report``), per-output errors against ``compare_to`` run in plain ORT, and where outputs were saved.
    """
    dims = dict(dims or {})
    path = Path(model)
    result: dict[str, Any] = {"model": str(path)}
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise UserError(f"{path} is a directory without manifest.json: pass a model file or a partition directory")
        feeds = partition_feeds(path, dims, seed) if random else load_feeds(None, inputs_path, False, dims, seed)
        try:
            outputs = run_partition(str(path), feeds, microbatches=microbatches)
        except InvalidArgument as exc:
            raise _refused(path, exc, inputs_path, random) from exc
        result["kind"] = "partition"
    else:
        ir_model = load_model(path)
        feeds = load_feeds(ir_model, inputs_path, random, dims, seed)
        del ir_model
        try:
            outputs, sess, latency = run_model_file(path, feeds, providers, device, _names(cpu_ops), repeat)
        except InvalidArgument as exc:
            raise _refused(path, exc, inputs_path, random) from exc
        result.update(kind="model", providers=sess.get_providers(), stages=sess.stage_summary(), latency_s=latency)
        if show_report:
            result["placement"] = placement_report(path, device=device, cpu_ops=_names(cpu_ops), dims=dims)
    result["outputs"] = {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for k, v in outputs.items()}
    if compare_to:
        reference = run_model(load_model(compare_to), feeds)
        result["compare"] = compare_outputs(reference, outputs)
    if save_outputs:
        with atomic_write(save_outputs) as f:
            np.savez(f, **{k: np.asarray(v) for k, v in outputs.items()})
        result["saved"] = str(save_outputs)
    return result


def run_distributed(directory: str | Path, inputs_path: str | Path | None = None,
                    save_outputs: str | Path | None = None, random: bool = False,
                    dims: Mapping[str, int] | None = None, seed: int = 0, nproc_per_node: int | None = None,
                    nnodes: str | int = "1", node_rank: int | None = None, master_addr: str | None = None,
                    master_port: int | None = None, rdzv_endpoint: str | None = None, microbatches: int = 1,
                    decode_steps: int = 0, dist_timeout: float = 300.0,
                    interconnect: str = "loopback") -> dict[str, Any]:
    """The work behind ``maia-onnx run DIR --launcher torchrun``: one process per rank of this node.

    Returns outputs' names and per-rank timing rows; on a node that does not hold role 0 (multi-node runs
    write outputs and timings on the node started with node rank 0) both are empty.
    """
    directory = Path(directory)
    if not (directory / "manifest.json").is_file():
        raise UserError(f"--launcher torchrun runs partition directories; {directory} has no manifest.json "
                        "(make one with `maia-onnx partition`)")
    if not inputs_path and not random:
        raise UserError("--launcher torchrun needs --inputs x.npz (full, unsharded inputs; every rank reads its part) "
                        "or --random")
    with tempfile.TemporaryDirectory(prefix="maia-run-") as tmp:
        if random:
            feeds = partition_feeds(directory, dims, seed)
            inputs_path = Path(tmp) / "inputs.npz"
            np.savez(inputs_path, **feeds)
        elif not Path(inputs_path).is_file():
            raise UserError(f"inputs file not found: {inputs_path} (an .npz with one array per graph input)")
        report = launch(directory, inputs_path, save_outputs, nproc_per_node=nproc_per_node, nnodes=nnodes,
                        node_rank=node_rank, master_addr=master_addr, master_port=master_port,
                        rdzv_endpoint=rdzv_endpoint, microbatches=microbatches, decode_steps=decode_steps,
                        timeout=dist_timeout, interconnect=interconnect)
    holds_outputs = bool(report.get("ranks"))
    return {"model": str(directory), "kind": "partition", "launcher": "torchrun", "outputs": report.get("outputs", []),
            "saved": str(save_outputs) if save_outputs and holds_outputs else None,
            "ranks": timing_rows(report.get("ranks", []))}
