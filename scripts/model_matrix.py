"""Model support matrix: every architecture of maia_onnx.models.zoo (tiny seeded configs) plus Ultralytics YOLO,
through export -> FP8 -> TP2 -> compile -> run, each step's figure or the one error line it stopped with.

Writes docs/model_support.md (and --json).  Columns: export parity (max rel err vs PyTorch), FP8 E4M3 min output
cosine vs FP32 (random calibration), TP2 max rel err of the shards vs the unsharded FP8 model (the partition's own
self-check), compile placement (device-node fraction, device partitions), and the compiled model run in a plain
ONNX Runtime session with the Maia plugin EP (max rel err vs the FP8 model in ORT).

    python scripts/model_matrix.py [--only llama,bert] [--json out.json] [--out docs/model_support.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _benchutil import ROOT

ULTRALYTICS = {"yolov8n": "ultralytics:yolov8n.yaml"}


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def _graphs(export_path: Path) -> list[tuple[str, Path]]:
    """(graph name, .onnx path) of an export: the file itself, or every graph of a multi-graph directory."""
    if export_path.is_dir():
        return [(p.stem, p) for p in sorted(export_path.glob("*.onnx"))]
    return [("", export_path)]


def _rel(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    scale = np.abs(ref).max() or 1.0
    return float(np.abs(ref - got).max() / scale)


def _run_compiled(compiled: Path, fp8: Path) -> tuple[float, str]:
    import onnx_ir as ir

    from maia_onnx.inputs import make_inputs
    from maia_onnx.ortutil import ort_run, run_model
    from maia_onnx.runtime import InferenceSession

    feeds = make_inputs(ir.load(str(fp8)), seed=0, dims={"batch": 1, "seq": 8, "past": 0})
    reference = run_model(str(fp8), feeds)
    session = InferenceSession(str(compiled), providers=["MaiaExecutionProvider", "CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, ort_run(session, names, feeds)))
    worst = max(_rel(reference[n], got[n]) for n in names if np.issubdtype(np.asarray(reference[n]).dtype, np.floating))
    import onnxruntime

    return worst, "ort+plugin-ep" if isinstance(session, onnxruntime.InferenceSession) else "python shim"


def graph_row(model: str, graph: str, path: Path, work: Path, parity: float | None) -> dict:
    from maia_onnx.partition import partition_file
    from maia_onnx.quantize import quantize_model
    from maia_onnx.runtime.compile import compile_model

    row: dict = {"model": model + (f" / {graph}" if graph else ""), "export_max_rel": parity}
    stem = work / (model + (f"_{graph}" if graph else ""))
    fp8 = stem.with_name(stem.name + "_fp8.onnx")
    try:
        q = quantize_model(path, fp8, format="fp8-e4m3", calib="random", num_samples=4, eval_samples=2, show_progress=False)
        row["fp8_min_cosine"] = q.min_output_cosine
    except Exception as exc:  # noqa: BLE001 - a failing step is a cell of the matrix
        row["error"] = f"quantize: {_line(exc)}"
        return row
    try:
        manifest = partition_file(fp8, stem.with_name(stem.name + "_tp2"), tp=2)
        row["tp2_max_rel"] = manifest.verification.max_rel
        row["tp2_collectives"] = len(manifest.collectives)
    except Exception as exc:  # noqa: BLE001
        row["tp2_error"] = _line(exc)
    compiled = stem.with_name(stem.name + "_ctx.onnx")
    try:
        result = compile_model(fp8, compiled, device="maia100")
        s = result.placement.summary()
        row["device_fraction"] = s["nodes_device"] / max(1, s["nodes_device"] + s["nodes_cpu"])
        row["partitions"] = s["partitions"]
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"compile: {_line(exc)}"
        return row
    try:
        row["run_max_rel"], row["session"] = _run_compiled(compiled, fp8)
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"run: {_line(exc)}"
    return row


def model_rows(name: str, work: Path) -> list[dict]:
    from maia_onnx.export import export_model
    from maia_onnx.models.zoo import CHECKPOINTS, MULTI_GRAPH, write_checkpoint

    t = time.perf_counter()
    try:
        if name in ULTRALYTICS:
            ref = ULTRALYTICS[name]
            out = work / f"{name}.onnx"
        else:
            directory = write_checkpoint(name, work / "hf" / name)
            ref = f"hf:{directory}"
            out = work / name if name in MULTI_GRAPH else work / f"{name}.onnx"
        result = export_model(ref, out)
    except Exception as exc:  # noqa: BLE001
        return [{"model": name, "error": f"export: {_line(exc)}"}]
    parts = result.parts or {"": result}
    rows = []
    for graph, path in _graphs(Path(result.path)):
        part = parts.get(f"{graph}.onnx", parts.get(graph, result))
        parity = max((v.get("max_rel", 0.0) for v in (part.parity or {}).values()), default=None) if part.parity else None
        rows.append(graph_row(name, graph, path, work, parity))
    for row in rows:
        row["seconds"] = round(time.perf_counter() - t, 1)
    return rows


def _fmt(value, digits=3):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 else f"{value:.{digits + 2}f}".rstrip("0").rstrip(".")
    return str(value)


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# Model support",
        "",
        "Generated by `scripts/model_matrix.py` on tiny seeded configs of each architecture (`maia_onnx/models/zoo.py`);",
        f"regenerate with `{command}`. Each cell is a measured figure; a step that fails shows its one error line.",
        "",
        "| model | export parity (max rel) | FP8 min cosine | TP2 max rel (collectives) | device nodes | partitions | run (plugin EP) max rel | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tp2 = r.get("tp2_error") or (f"{_fmt(r.get('tp2_max_rel'))} ({r.get('tp2_collectives')})" if "tp2_max_rel" in r else "")
        frac = f"{100 * r['device_fraction']:.1f}%" if "device_fraction" in r else ""
        note = r.get("error", "")
        if r.get("session") and r["session"] != "ort+plugin-ep":
            note = (note + "; " if note else "") + f"session: {r['session']}"
        lines.append(f"| {r['model']} | {_fmt(r.get('export_max_rel'))} | {_fmt(r.get('fp8_min_cosine'), 5)} | {tp2} | {frac} "
                     f"| {_fmt(r.get('partitions'))} | {_fmt(r.get('run_max_rel'))} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from maia_onnx.models.zoo import CHECKPOINTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated subset of the models")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "model_support.md")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = list(CHECKPOINTS) + list(ULTRALYTICS)
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="model_matrix.") as tmp:
        for name in names:
            for row in model_rows(name, Path(tmp)):
                print(json.dumps(row), flush=True)
                rows.append(row)
    command = "python scripts/model_matrix.py" + (f" --only {args.only}" if args.only else "")
    args.out.write_text(markdown(rows, command))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
