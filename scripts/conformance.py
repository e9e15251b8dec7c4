#!/usr/bin/env python
"""Conformance on ONNX's own backend test models: compile + Maia shim session vs plain ONNX Runtime and references.

For every model shipped in ``onnx/backend/test/data/{light,simple,pytorch-converted,pytorch-operator,real}``:

1. plain ONNX Runtime (CPU, ORT_DISABLE_ALL) runs the reference inputs and is checked against the reference
   outputs (rtol 1e-3 as in ONNX's runner). Cases ORT itself fails are *skipped* (not our bug to judge).
2. ``compile_model`` writes the compiled model to a temp dir; ``maia_onnx.runtime.InferenceSession`` loads it and
   runs the same inputs. Its outputs must match ORT's (rtol 1e-4, atol 1e-5): **pass** when at least one device
   partition ran, **fallback** when everything stayed on the CPU; a mismatch is **wrong**, a crash **error**.
3. Models with quantisable ops (MatMul/Gemm/Conv with constant weights) are FP8-quantised (weights only, per
   channel) and must load and stay within the FP8 E4M3 error bound of the float model.

``python scripts/conformance.py`` prints the table and writes ``docs/conformance.md``; tests/test_conformance.py
runs the same loop and asserts zero wrong answers.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KINDS = ("light", "simple", "pytorch-converted", "pytorch-operator", "real")
SHIM_RTOL, SHIM_ATOL = 1e-4, 1e-5
REF_RTOL, REF_ATOL = 1e-3, 1e-5
QUANT_OPS = {"MatMul", "Gemm", "Conv"}


def data_root() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data"


@dataclass
class Case:
    kind: str
    name: str
    model: Path
    inputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    outputs: list[list[np.ndarray] | None] = field(default_factory=list)


@dataclass
class Result:
    kind: str
    name: str
    status: str  # pass | fallback | wrong | error | skip
    detail: str = ""
    device_nodes: int = 0
    cpu_nodes: int = 0
    max_abs: float = 0.0
    quant: str = ""  # "" (not applicable) | ok | bad: ... | error: ...
    seconds: float = 0.0


def _read_tensor(path: str) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return numpy_helper.to_array(t)


def discover(kinds=KINDS) -> list[Case | tuple[str, str, str]]:
    """Every case with its data sets; entries that cannot run here come back as (kind, name, reason)."""
    import onnx

    root = data_root()
    found: list = []
    for kind in kinds:
        base = root / kind
        if not base.is_dir():
            continue
        if kind == "light":
            from onnx.backend.test.runner import Runner

            for model_path in sorted(base.glob("light_*.onnx")):
                name = model_path.stem
                proto = onnx.load(str(model_path), load_external_data=False)
                inits = {i.name for i in proto.graph.initializer}
                feeds = {x.name: Runner.generate_dummy_data(x, seed=0, name=name, random=False)
                         for x in proto.graph.input if x.name not in inits}
                refs = []
                for i in range(len(proto.graph.output)):
                    ref = model_path.with_name(f"{name}_output_{i}.pb")
                    if not ref.exists():
                        refs = None
                        break
                    refs.append(_read_tensor(str(ref)))
                found.append(Case(kind, name, model_path, [feeds], [refs]))
            continue
        for case_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            model_path = case_dir / "model.onnx"
            if not model_path.exists():
                found.append((kind, case_dir.name, "model not shipped (downloaded on demand)"))
                continue
            proto = onnx.load(str(model_path), load_external_data=False)
            inits = {i.name for i in proto.graph.initializer}
            input_names = [x.name for x in proto.graph.input if x.name not in inits]
            output_names = [o.name for o in proto.graph.output]
            case = Case(kind, case_dir.name, model_path)
            for ds in sorted(case_dir.glob("test_data_set_*")):
                ins = sorted(glob.glob(str(ds / "input_*.pb")), key=lambda p: int(Path(p).stem.split("_")[1]))
                outs = sorted(glob.glob(str(ds / "output_*.pb")), key=lambda p: int(Path(p).stem.split("_")[1]))
                try:
                    arrays = [_read_tensor(p) for p in ins]
                    refs = [_read_tensor(p) for p in outs]
                except Exception as exc:  # sequences / optional types: not tensors
                    found.append((kind, case_dir.name, f"non-tensor test data ({type(exc).__name__})"))
                    break
                # inputs are positional over graph.input; legacy models list initializers there too
                names = input_names if len(arrays) == len(input_names) else [x.name for x in proto.graph.input]
                case.inputs.append(dict(zip(names, arrays)))
                case.outputs.append(refs if len(refs) == len(output_names) else None)
            else:
                found.append(case)
    return found


def _ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _close(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> tuple[bool, float]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False, float("inf")
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        same_nan = np.array_equal(np.isnan(a64), np.isnan(b64))
        diff = np.where(np.isnan(a64) | np.isnan(b64), 0.0, np.abs(a64 - b64))
        finite = np.isfinite(a64) & np.isfinite(b64)
        same_inf = np.array_equal(np.where(finite, 0, np.nan_to_num(a64, nan=0.0)), np.where(finite, 0, np.nan_to_num(b64, nan=0.0)))
        diff = np.where(finite, diff, 0.0)
        max_abs = float(diff.max()) if diff.size else 0.0
        ok = same_nan and same_inf and bool(np.all(diff <= atol + rtol * np.abs(np.where(finite, b64, 0.0))))
        return ok, max_abs
    return bool(np.array_equal(a, b)), 0.0 if np.array_equal(a, b) else float("inf")


def _quantisable(model_path: Path) -> bool:
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    consts = {i.name for i in proto.graph.initializer}
    consts |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return any(n.op_type in QUANT_OPS and len(n.input) > 1 and n.input[1] in consts for n in proto.graph.node)


def fp8_weight_bound(model_path: Path, feeds: dict, ref: list[np.ndarray], quantized: Path) -> tuple[bool, str]:
    """FP8 E4M3 weights (3 mantissa bits: relative rounding error <= 2^-4 per weight) give outputs close to float.

    The bound we hold the quantised model to: cosine >= 0.99 and max |err| <= 0.125 * max|ref| per output, which an
    RNE-rounded E4M3 weight (relative error <= 1/16) keeps for these shallow graphs; a wrong model misses it by far.
    """
    got = _ort_session(quantized).run(None, feeds)
    for r, g in zip(ref, got):
        r64, g64 = np.asarray(r, np.float64).ravel(), np.asarray(g, np.float64).ravel()
        if r64.shape != g64.shape or not np.all(np.isfinite(g64) == np.isfinite(r64)):
            return False, "shape or non-finite mismatch"
        fin = np.isfinite(r64)
        r64, g64 = r64[fin], g64[fin]
        if r64.size == 0 or not np.any(r64):
            continue
        cos = float(r64 @ g64 / (np.linalg.norm(r64) * np.linalg.norm(g64) + 1e-30))
        err = float(np.abs(r64 - g64).max() / np.abs(r64).max())
        if cos < 0.99 or err > 0.125:
            return False, f"cosine {cos:.4f}, max rel err {err:.3f}"
    return True, ""


def run_case(case: Case, workdir: Path, quantize: bool = True) -> Result:
    from maia_onnx.runtime import InferenceSession
    from maia_onnx.runtime.compile import compile_model

    start = time.perf_counter()
    res = Result(case.kind, case.name, "skip")
    try:
        sess = _ort_session(case.model)
        ort_outputs = [sess.run(None, feeds) for feeds in case.inputs]
    except Exception as exc:
        message = str(exc).replace(str(case.model), f"{case.kind}/{case.name}").replace(str(data_root()) + os.sep, "")
        res.detail = f"ONNX Runtime fails: {message.splitlines()[0][:160]}"
        return res
    for refs, got in zip(case.outputs, ort_outputs):
        if refs is None:
            continue
        for r, g in zip(refs, got):
            ok, _ = _close(g, r, REF_RTOL, REF_ATOL)
            if not ok:
                res.detail = "ONNX Runtime itself misses the reference outputs"
                return res
    out = workdir / f"{case.kind}_{case.name}.onnx"
    try:
        result = compile_model(case.model, out)
        res.device_nodes = sum(len(p.node_indices) for p in result.placement.partitions)
        res.cpu_nodes = sum(1 for _ in result.model.graph) - len(result.placement.partitions)
        shim = InferenceSession(str(out), providers=["MaiaExecutionProvider", "CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        for feeds, expected in zip(case.inputs, ort_outputs):
            got = shim.run(names, feeds)
            for name, e, g in zip(names, expected, got):
                ok, max_abs = _close(g, e, SHIM_RTOL, SHIM_ATOL)
                res.max_abs = max(res.max_abs, max_abs)
                if not ok:
                    res.status = "wrong"
                    res.detail = f"output {name!r} differs from ONNX Runtime (max abs {max_abs:.3g})"
                    return res
        res.status = "pass" if res.device_nodes else "fallback"
    except Exception as exc:
        res.status = "error"
        res.detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        if os.environ.get("CONFORMANCE_DEBUG"):
            traceback.print_exc()
        return res
    finally:
        for p in workdir.glob(f"{case.kind}_{case.name}*"):
            p.unlink()
    if quantize and _quantisable(case.model) and all(np.asarray(v).dtype == np.float32 for v in case.inputs[0].values()):
        qout = workdir / f"q_{case.kind}_{case.name}.onnx"
        try:
            from maia_onnx.quantize import quantize_model

            quantize_model(str(case.model), str(qout), format="fp8-e4m3", weights_only=True, evaluate=False, show_progress=False)
            ok, why = fp8_weight_bound(case.model, case.inputs[0], ort_outputs[0], qout)
            res.quant = "ok" if ok else f"bad: {why}"
        except Exception as exc:
            msg = str(exc).splitlines()[0][:120] if str(exc) else ""
            from maia_onnx.errors import UserError

            # a clear refusal (e.g. nothing quantisable after exclusions) is fine; a crash is not
            res.quant = f"refused: {msg}" if isinstance(exc, UserError) else f"error: {type(exc).__name__}: {msg}"
        finally:
            for p in workdir.glob(f"q_{case.kind}_{case.name}*"):
                p.unlink()
    res.seconds = time.perf_counter() - start
    return res


def run_all(kinds=KINDS, quantize: bool = True, progress: bool = False, max_seconds_per_model: float | None = None) -> list[Result]:
    import logging
    import warnings

    logging.getLogger("maia_onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results: list[Result] = []
    cases = discover(kinds)
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="conformance", unit="model", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="maia-conformance-") as tmp:
        for case in iterator:
            if isinstance(case, tuple):
                results.append(Result(case[0], case[1], "skip", case[2]))
                continue
            results.append(run_case(case, Path(tmp), quantize=quantize))
    return results


def counts(results: list[Result]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for r in results:
        row = table.setdefault(r.kind, {"pass": 0, "fallback": 0, "skip": 0, "wrong": 0, "error": 0,
                                        "quantized_ok": 0, "quantize_bad": 0})
        row[r.status] += 1
        if r.quant == "ok":
            row["quantized_ok"] += 1
        elif r.quant.startswith(("bad", "error")):
            row["quantize_bad"] += 1
    return table


def render_markdown(results: list[Result], seconds: float) -> str:
    import onnx
    import onnxruntime

    table = counts(results)
    cols = ["pass", "fallback", "skip", "wrong", "error", "quantized_ok", "quantize_bad"]
    lines = [
        "# Conformance on ONNX's backend test models",
        "",
        f"Generated by `python scripts/conformance.py` (onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"{seconds:.0f} s on this machine). The same loop runs in CI as `tests/test_conformance.py`.",
        "",
        "Every model under `onnx/backend/test/data/{light,simple,pytorch-converted,pytorch-operator,real}` is compiled "
        "with `maia_onnx.runtime.compile.compile_model` and run through `maia_onnx.runtime.InferenceSession` "
        f"(Maia partitions in the emulator, the rest on ORT CPU); outputs must match plain ONNX Runtime "
        f"(ORT_DISABLE_ALL) within rtol {SHIM_RTOL:g} / atol {SHIM_ATOL:g}.",
        "",
        "- **pass**: at least one device partition ran and the outputs match ONNX Runtime;",
        "- **fallback**: nothing was placed on the device (every node on CPU), outputs match;",
        "- **skip**: ONNX Runtime itself fails or misses the reference outputs, the test data are not tensors, "
        "or the model is not shipped with the package (`real`: downloaded on demand);",
        "- **wrong** / **error**: the shim gives a different answer / crashes where ONNX Runtime passes (must be 0);",
        "- **quantized_ok** / **quantize_bad**: models with MatMul/Gemm/Conv weights, FP8 E4M3 weight-only quantised: "
        "loads and stays within the FP8 bound (cosine >= 0.99, max error <= 12.5% of max |output|) / does not. "
        "The `light` models build their weights with ConstantOfShape at run time, so they have no constant weights "
        "to quantise.",
        "",
        "Legacy encodings are covered explicitly in `tests/test_conformance.py` (initializers listed as graph inputs, "
        "ConstantOfShape weights, opset 9 / IR 3 models, quantised and compiled).",
        "",
        "Stock ONNX Runtime with default graph optimizations rewrites Relu/Clip followed by QuantizeLinear "
        "(ReluQuantFusion, ClipQuantFusion) as if FP8 had zero-point clipping; maia-onnx's FP8 pass therefore "
        "quantizes the Relu/Clip input and re-applies it after DequantizeLinear (exactly equivalent), so quantized "
        "models give the same answers under ORT_ENABLE_ALL and ORT_DISABLE_ALL (checked in tests/test_conformance.py "
        "and tests/test_quantize_fp8.py).",
        "",
        "| set | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    total = {c: 0 for c in cols}
    for kind in KINDS:
        if kind not in table:
            continue
        row = table[kind]
        lines.append(f"| {kind} | " + " | ".join(str(row[c]) for c in cols) + " |")
        for c in cols:
            total[c] += row[c]
    lines.append("| **total** | " + " | ".join(f"**{total[c]}**" for c in cols) + " |")
    notable = [r for r in results if r.status in ("wrong", "error") or r.quant.startswith(("bad", "error"))]
    skips = [r for r in results if r.status == "skip"]
    lines += ["", "## Skipped", ""]
    lines += [f"- `{r.kind}/{r.name}`: {r.detail}" for r in skips] or ["(none)"]
    lines += ["", "## Failures", ""]
    lines += [f"- `{r.kind}/{r.name}`: {r.status} {r.detail} {r.quant}".rstrip() for r in notable] or ["(none)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated sets to run")
    parser.add_argument("--no-quantize", action="store_true", help="skip the FP8 quantisation check")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "docs" / "conformance.md"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run_all(args.kinds.split(","), quantize=not args.no_quantize, progress=True)
    seconds = time.perf_counter() - start
    from maia_onnx.io import write_text_atomic
    from maia_onnx.report import print_table

    rows = [{"set": k, **v} for k, v in counts(results).items()]
    print_table(rows, ["set", "pass", "fallback", "skip", "wrong", "error", "quantized_ok", "quantize_bad"], title="conformance")
    for r in results:
        if r.status in ("wrong", "error") or r.quant.startswith(("bad", "error")):
            print(f"FAIL {r.kind}/{r.name}: {r.status} {r.detail} {r.quant}")
    write_text_atomic(args.output, render_markdown(results, seconds))
    print(f"wrote {args.output} ({seconds:.0f} s)")
    bad = sum(r.status in ("wrong", "error") for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
