"""`maia-onnx run`: run a plain model, a Maia-compiled model or a partition directory; compare, save, report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import click
import numpy as np

from maia_onnx.cli.options import device_option, dims_option, echo_json, json_option, model_argument
from maia_onnx.runtime.distributed import launcher_options


def load_feeds(model, inputs_path: str | None, random: bool, dims: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """Input feeds from an .npz (names = graph inputs) or random values for the model's input specs."""
    from maia_onnx.errors import InvalidOptionError, UserError
    from maia_onnx.ortutil import make_inputs

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
        raise InvalidOptionError("partition directories need --inputs x.npz")
    return make_inputs(model, seed=seed, dims=dims)


def check_feeds(model, feeds: Mapping[str, np.ndarray], source) -> None:
    """Refuse feeds whose dtype, rank or fixed dims differ from the graph inputs (one line naming the input)."""
    from maia_onnx.errors import UserError

    for value in model.graph.inputs:
        if value.name not in feeds or value.dtype is None:
            continue
        arr = feeds[value.name]
        want = value.dtype.numpy()
        if arr.dtype != want:
            raise UserError(f"input {value.name!r} in {source} is {arr.dtype}, the model expects {np.dtype(want).name}: "
                            f"save it as {np.dtype(want).name}")
        if value.shape is None:
            continue
        expected = [d if isinstance(d, int) else str(d) for d in value.shape]
        fixed_ok = all(not isinstance(d, int) or d == n for d, n in zip(value.shape, arr.shape))
        if arr.ndim != len(expected) or not fixed_ok:
            raise UserError(f"input {value.name!r} in {source} has shape {list(arr.shape)}, the model expects {expected}: "
                            f"fix the array's shape")


def run_model_file(model_path: str, feeds, providers, device: str, cpu_ops, repeat: int = 1):
    """Run a model file through maia_onnx.runtime.InferenceSession; returns (outputs dict, session, seconds per run)."""
    from maia_onnx.runtime.session import session_for

    sess = session_for(model_path, providers=providers, device=device, cpu_ops=cpu_ops)
    names = [o.name for o in sess.get_outputs()]
    outputs = dict(zip(names, sess.run(names, feeds)))
    elapsed = 0.0
    for _ in range(max(repeat - 1, 0)):
        t0 = time.perf_counter()
        sess.run(names, feeds)
        elapsed += time.perf_counter() - t0
    return outputs, sess, (elapsed / (repeat - 1) if repeat > 1 else None)


def _partition_input_model(directory: Path):
    """A graph with only the source model's inputs (from the partition manifest), for --random feeds."""
    import onnx_ir as ir

    from maia_onnx.partition import read_manifest

    inputs = []
    for spec in read_manifest(directory).data["source"]["inputs"]:
        shape = None if spec["shape"] is None else ir.Shape([d if d is not None else "unk" for d in spec["shape"]])
        inputs.append(ir.Value(name=spec["name"], type=ir.TensorType(ir.DataType[spec["dtype"]]), shape=shape))
    return ir.Model(ir.Graph(inputs, [], nodes=[]), ir_version=10)


def run_directory(directory: str, feeds, microbatches: int = 1):
    from maia_onnx.runtime.executor import run_partition

    return run_partition(directory, feeds, microbatches=microbatches)


@click.command("run")
@model_argument()
@click.option("--inputs", "inputs_path", type=click.Path(), default=None, help="Input feeds (.npz, names = graph inputs).")
@click.option("--random", is_flag=True, help="Random inputs from the model's input specs (see --dims, --seed).")
@dims_option("Symbolic dims for --random, e.g. --dim batch=1 --dim seq=16.")
@click.option("--seed", default=0, show_default=True, help="Seed for --random.")
@click.option("--providers", default="MaiaExecutionProvider,CPUExecutionProvider", show_default=True,
              help="Comma-separated providers (maia, cpu or the ORT names).")
@device_option
@click.option("--cpu-ops", default="", help="Comma-separated op types to keep on the CPU (plain models).")
@click.option("--save-outputs", type=click.Path(), default=None, help="Write outputs to this .npz.")
@click.option("--compare-to", "compare_to", type=click.Path(), default=None, help="Reference model: run it in plain ORT and compare.")
@click.option("--repeat", default=1, show_default=True, help="Run this many times and report mean latency.")
@click.option("--report", "show_report", is_flag=True, help="Print the placement report (device vs CPU, reasons, est. time).")
@launcher_options
@json_option
@click.pass_context
def command(ctx, model, inputs_path, random, dims, seed, providers, device, cpu_ops, save_outputs, compare_to, repeat,
            show_report, launcher, nproc_per_node, nnodes, rdzv_endpoint, microbatches, decode_steps, dist_timeout,
            interconnect, as_json):
    """Run MODEL (plain, compiled, or a partition directory with manifest.json) and report.

    Partition directories run in this process (one ORT session per rank segment, collectives in NumPy) or,
    with --launcher torchrun, one process per rank with torch.distributed collectives.
    """
    if launcher == "torchrun":
        from maia_onnx.errors import UserError
        from maia_onnx.runtime.distributed import print_timing, run_torchrun

        if not Path(model, "manifest.json").is_file():
            raise UserError(f"--launcher torchrun runs partition directories; {model} has no manifest.json "
                            "(make one with `maia-onnx partition`)")
        result = run_torchrun(model, inputs_path, save_outputs, nproc_per_node=nproc_per_node, nnodes=nnodes,
                              rdzv_endpoint=rdzv_endpoint, microbatches=microbatches, decode_steps=decode_steps,
                              dist_timeout=dist_timeout, interconnect=interconnect)
        print_timing(result, as_json)
        return
    result = run_command(model, inputs_path=inputs_path, random=random, dims=dims, seed=seed, providers=providers,
                         device=device, cpu_ops=cpu_ops, save_outputs=save_outputs, compare_to=compare_to,
                         repeat=repeat, show_report=show_report, microbatches=microbatches)
    print_result(result, as_json)


def run_command(model, inputs_path=None, random=False, dims="", seed=0, providers="MaiaExecutionProvider,CPUExecutionProvider",
                device="maia100", cpu_ops="", save_outputs=None, compare_to=None, repeat=1, show_report=False, microbatches=1) -> dict:
    """The work behind `maia-onnx run` (importable; options map 1:1)."""
    from maia_onnx.cli.compile import _dims, _split
    from maia_onnx.errors import UserError
    from maia_onnx.io import atomic_write, load_model
    from maia_onnx.ortutil import compare_outputs, run_model

    dims_map = _dims(dims)
    path = Path(model)
    result: dict = {"model": str(path)}
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise UserError(f"{path} is a directory without manifest.json: pass a model file or a partition directory")
        feeds = load_feeds(_partition_input_model(path) if random else None, inputs_path, random, dims_map, seed)
        outputs = run_directory(str(path), feeds, microbatches)
        result["kind"] = "partition"
    else:
        ir_model = load_model(path)
        feeds = load_feeds(ir_model, inputs_path, random, dims_map, seed)
        del ir_model
        outputs, sess, latency = run_model_file(str(path), feeds, _split(providers), device, _split(cpu_ops), repeat)
        result.update(kind="model", providers=sess.get_providers(), stages=sess.stage_summary(), latency_s=latency)
        if show_report:
            from maia_onnx.runtime.session import placement_report

            result["placement"] = placement_report(path, device=device, cpu_ops=_split(cpu_ops), dims=dims_map)
    result["outputs"] = {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for k, v in outputs.items()}
    if compare_to:
        reference = run_model(load_model(compare_to), feeds)
        result["compare"] = compare_outputs(reference, outputs)
    if save_outputs:
        with atomic_write(save_outputs) as f:
            np.savez(f, **{k: np.asarray(v) for k, v in outputs.items()})
        result["saved"] = save_outputs
    return result


def print_result(result: dict, as_json: bool) -> None:
    from maia_onnx.report import print_table

    if as_json:
        echo_json(result)
        return
    rows = [{"output": k, **v} for k, v in result["outputs"].items()]
    title = f"{result['model']}" + (f" on {', '.join(result['providers'])}" if result.get("providers") else "")
    print_table(rows, ["output", "shape", "dtype"], title=title)
    if result.get("latency_s") is not None:
        click.echo(f"latency: {result['latency_s'] * 1e3:.3f} ms/run")
    if "compare" in result:
        click.echo()
        print_table([{"output": k, **v} for k, v in result["compare"].items()], ["output", "max_abs", "max_rel", "cosine"],
                    title="vs --compare-to (plain ONNX Runtime)")
    placement = result.get("placement")
    if placement:
        click.echo()
        if placement.get("compiled"):
            print_table(placement["partitions"], ["partition", "nodes", "flops", "bytes", "est_time_us", "arena_bytes"],
                        title=f"compiled model: {placement['device_nodes']} device nodes, {placement['cpu_nodes']} CPU nodes")
        else:
            s = placement["summary"]
            rows: dict = {}
            for n in placement["nodes"]:
                row = rows.setdefault((n["op_type"], n["device"], n["reason"]),
                                      {"op": n["op_type"], "where": n["device"], "nodes": 0, "flops": 0.0, "reason": n["reason"]})
                row["nodes"] += 1
                row["flops"] += n["flops"]
            print_table(sorted(rows.values(), key=lambda r: (r["where"], r["op"])), ["op", "where", "nodes", "flops", "reason"],
                        title=f"placement on {s['device']}: {s['nodes_device']} device / {s['nodes_cpu']} CPU nodes, "
                              f"FLOPs {s['flops_device']:.3g} device / {s['flops_cpu']:.3g} CPU, "
                              f"est. device time {s['est_device_time_s'] * 1e6:.2f} us")
    if result.get("saved"):
        click.echo(f"outputs written to {result['saved']}")
