"""The Maia plugin EP (runtime/ep, runtime/plugin_ep.py) in a plain onnxruntime.InferenceSession.

Every EP session runs in a child process, so an EP crash fails its test instead of the whole run. Outputs are
compared bit for bit with the Python shim (EmulatorSession), which is itself bit-exact with plain ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from maia_onnx.ortutil import make_inputs
from maia_onnx.runtime import EmulatorSession, plugin_ep
from maia_onnx.runtime.compile import compile_model

MAIA = ["MaiaExecutionProvider", "CPUExecutionProvider"]
DIMS = {"batch": 2, "seq": 5, "past": 3}

# The child: run one model through a plain ORT session with the plugin EP, pickle outputs and what it saw.
CHILD = r"""
import json, pickle, sys
args = json.loads(sys.argv[1])
from maia_onnx.errors import UserError
from maia_onnx.ortutil import ort_run, session_options
from maia_onnx.runtime import plugin_ep
result = {}
try:
    if args.get("compile"):  # a user's own ORT code: ModelCompiler with the plugin EP's session options
        import onnxruntime as ort
        c = args["compile"]
        so = plugin_ep.session_options(c.get("device", "maia100"), base=session_options(), dims=c.get("dims"))
        ort.ModelCompiler(so, c["src"], embed_compiled_data_into_model=c["embed"]).compile_to_file(c["out"])
    if args.get("devices"):
        result["devices"] = [(d.ep_name, dict(d.ep_metadata)) for d in plugin_ep.ep_devices()]
    if args.get("model"):
        with open(args["feeds"], "rb") as f:
            feeds = pickle.load(f)
        so = session_options()
        if args.get("log"):
            so.log_severity_level = 1  # INFO: the EP says what it fused
        if args.get("profile"):
            so.enable_profiling = True
            so.profile_file_prefix = args["profile"]
        sess = plugin_ep.plugin_session(args["model"], so, device=args.get("device", "maia100"),
                                        cpu_ops=args.get("cpu_ops", []))
        names = [o.name for o in sess.get_outputs()]
        result["outputs"] = dict(zip(names, ort_run(sess, names, feeds)))
        result["providers"] = sess.get_providers()
        if args.get("profile"):
            result["profile"] = sess.end_profiling()
except UserError as exc:
    result["error"] = (type(exc).__name__, str(exc))
with open(args["out"], "wb") as f:
    pickle.dump(result, f)
"""


@pytest.fixture(scope="module")
def require_ep():
    """The plugin EP must be usable; CI (scripts/test.sh sets MAIA_REQUIRE_EP=1) fails instead of skipping."""
    reason = plugin_ep.unavailable_reason()
    if reason:
        if os.environ.get("MAIA_REQUIRE_EP") == "1":
            pytest.fail(f"MAIA_REQUIRE_EP=1 but the Maia plugin EP is unavailable: {reason}")
        pytest.skip(f"Maia plugin EP unavailable ({reason}); MAIA_REQUIRE_EP=1 makes this a failure")


def test_ep_library_is_built_when_required():
    if os.environ.get("MAIA_REQUIRE_EP") != "1":
        pytest.skip("MAIA_REQUIRE_EP is not 1 (scripts/test.sh sets it): a missing EP build is allowed here")
    assert plugin_ep.LIBRARY.is_file(), f"{plugin_ep.LIBRARY} was not built by pip install"
    assert plugin_ep.unavailable_reason() is None


def run_child(tmp_path: Path, env=None, **args) -> dict:
    out = tmp_path / f"child_{len(list(tmp_path.glob('child_*')))}.pkl"
    args["out"] = str(out)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"EP child process failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    with open(out, "rb") as f:
        result = pickle.load(f)
    result["stderr"] = proc.stderr
    return result


def run_plugin(tmp_path: Path, model: Path, feeds: dict, **args) -> dict:
    feeds_path = tmp_path / "feeds.pkl"
    with open(feeds_path, "wb") as f:
        pickle.dump(feeds, f)
    return run_child(tmp_path, model=str(model), feeds=str(feeds_path), **args)


def assert_bit_identical(got: dict, ref: dict):
    assert set(got) == set(ref)
    for name, r in ref.items():
        g = got[name]
        assert g.dtype == r.dtype and g.shape == r.shape, name
        np.testing.assert_array_equal(np.ascontiguousarray(g).view(np.uint8), np.ascontiguousarray(r).view(np.uint8),
                                      err_msg=name)


def shim_outputs(compiled: Path, feeds: dict) -> dict:
    sess = EmulatorSession(compiled, providers=MAIA)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def test_ep_devices_one_per_profile_with_user_profiles(require_ep, tmp_path):
    user = tmp_path / "profiles" / "devices"
    user.mkdir(parents=True)
    profile = json.loads((plugin_ep.LIBRARY.parent.parent / "devices" / "maia200.json").read_text())
    profile["name"] = "maia200-lab"
    (user / "maia200-lab.json").write_text(json.dumps(profile))
    result = run_child(tmp_path, env={"MAIA_ONNX_PROFILE_PATH": str(tmp_path / "profiles")}, devices=True)
    devices = {meta["maia.device"]: meta for name, meta in result["devices"] if name == "MaiaExecutionProvider"}
    assert {"maia100", "maia200", "maia200-lab"} <= set(devices)
    assert devices["maia200-lab"]["maia.profile"].endswith("maia200-lab.json")
    assert all(name == "MaiaExecutionProvider" for name, _ in result["devices"])


def _quantized(src: Path, out: Path, **options) -> Path:
    from maia_onnx.quantize import quantize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random calibration data is fine for a numerics test
        quantize_model(src, out, calib="random", evaluate=False, show_progress=False, **options)
    return out


@pytest.fixture(scope="module")
def llama_variants(llama_tiny_onnx, tmp_path_factory):
    """FP32, FP8 weights+activations with an FP8 KV cache, MXFP8 (FP8 elements, E8M0 block scales) and mx9."""
    root = tmp_path_factory.mktemp("llama_variants")
    return {
        "fp32": llama_tiny_onnx,
        "fp8-kv8": _quantized(llama_tiny_onnx, root / "fp8.onnx", format="fp8-e4m3", kv_cache="fp8-e4m3"),
        "mxfp8": _quantized(llama_tiny_onnx, root / "mxfp8.onnx", format="mxfp8-e4m3"),
        "mx9": _quantized(llama_tiny_onnx, root / "mx9.onnx", format="mx9"),
    }


@pytest.mark.parametrize("variant", ["fp32", "fp8-kv8", "mxfp8", "mx9"])
def test_compiled_llama_tiny_bit_identical_toshim_outputs(require_ep, variant, llama_variants, tmp_path):
    plain = llama_variants[variant]
    compiled = compile_model(plain, tmp_path / "ctx.onnx").path
    feeds = make_inputs(ir.load(plain), seed=3, dims=DIMS)
    result = run_plugin(tmp_path, compiled, feeds, profile=str(tmp_path / "prof"))
    assert result["providers"] == MAIA
    assert_bit_identical(result["outputs"], shim_outputs(compiled, feeds))
    if variant == "mxfp8":  # the EP decoded E8M0 scales and blocked FP8 weights itself
        from maia_onnx.runtime.emulator import MaiaProgram
        from maia_onnx.runtime.session import _is_maia_context

        node = next(n for n in ir.load(compiled).graph if _is_maia_context(n))
        formats = {w["format"] for w in MaiaProgram.from_buffer(node.attributes["ep_cache_context"].value).header["weights"]}
        assert {"e8m0", "mx-elements-fp8-e4m3fn"} <= formats
    # the profile shows the partitions ran on the EP
    events = json.loads(Path(result["profile"]).read_text())
    ran = {e["args"].get("provider") for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("kernel_time")}
    assert "MaiaExecutionProvider" in ran


@pytest.mark.parametrize("family", ["unet_tiny_onnx", "yolo_tiny_onnx"])
def test_compiled_vision_models_bit_identical_toshim_outputs(require_ep, family, request, tmp_path):
    plain = request.getfixturevalue(family)
    compiled = compile_model(plain, tmp_path / "ctx.onnx").path
    feeds = make_inputs(ir.load(plain), seed=3, dims=DIMS)
    result = run_plugin(tmp_path, compiled, feeds)
    assert_bit_identical(result["outputs"], shim_outputs(compiled, feeds))


def test_cpu_only_session_refuses_compiled_model(llama_tiny_onnx, tmp_path):
    compiled = compile_model(llama_tiny_onnx, tmp_path / "ctx.onnx").path
    with pytest.raises(Exception, match="EPContext node generated by 'MaiaExecutionProvider' is not compatible"):
        ort.InferenceSession(str(compiled), providers=["CPUExecutionProvider"])


def test_side_file_programs_load_after_the_directory_moves(require_ep, llama_tiny_onnx, tmp_path):
    (tmp_path / "a").mkdir()
    result = compile_model(llama_tiny_onnx, tmp_path / "a" / "m.onnx", embed=False)
    assert result.side_file is not None and result.side_file.is_file()
    moved = tmp_path / "b"
    shutil.move(tmp_path / "a", moved)
    feeds = make_inputs(ir.load(llama_tiny_onnx), seed=5, dims=DIMS)
    got = run_plugin(tmp_path, moved / "m.onnx", feeds)
    assert_bit_identical(got["outputs"], shim_outputs(moved / "m.onnx", feeds))
    (moved / "m_maia.bin").unlink()
    missing = run_plugin(tmp_path, moved / "m.onnx", feeds)
    assert missing["error"][0] == "ModelLoadError"
    assert "side file m_maia.bin of partition 'maia_partition_0' not found" in missing["error"][1]


def test_plain_model_partitioned_by_the_ep_matches_plain_ort(require_ep, make_topk_model, tmp_path):
    # a plain model: GetCapability places nodes from the capability table (TopK stays on the CPU)
    path = make_topk_model("2")
    feeds = make_inputs(ir.load(path), seed=3)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = dict(zip([o.name for o in plain.get_outputs()], plain.run(None, feeds)))
    result = run_plugin(tmp_path, path, feeds, profile=str(tmp_path / "prof"))
    assert_bit_identical(result["outputs"], reference)
    events = json.loads(Path(result["profile"]).read_text())
    providers = {e["args"].get("op_name"): e["args"].get("provider") for e in events
                 if e.get("cat") == "Node" and e.get("name", "").endswith("kernel_time")}
    assert providers.get("TopK") == "CPUExecutionProvider"
    assert list(providers.values()).count("MaiaExecutionProvider") == 2  # MatMul before, Softmax after TopK
    # cpu_ops keeps the named op types on the host
    pinned = run_plugin(tmp_path, path, feeds, profile=str(tmp_path / "prof2"), cpu_ops=["MatMul", "Softmax"])
    assert_bit_identical(pinned["outputs"], reference)
    events = json.loads(Path(pinned["profile"]).read_text())
    assert not [e for e in events if e.get("cat") == "Node" and e["args"].get("provider") == "MaiaExecutionProvider"]


def test_inference_session_is_real_ort_with_the_plugin(require_ep, llama_tiny_onnx, tmp_path):
    # maia_onnx.runtime.InferenceSession returns an onnxruntime.InferenceSession when the plugin is available
    compiled = compile_model(llama_tiny_onnx, tmp_path / "ctx.onnx").path
    code = ("import sys, onnxruntime as ort; from maia_onnx.runtime import InferenceSession; "
            "s = InferenceSession(sys.argv[1]); assert isinstance(s, ort.InferenceSession), type(s); "
            "print(s.get_providers())")
    proc = subprocess.run([sys.executable, "-c", code, str(compiled)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MaiaExecutionProvider" in proc.stdout


def test_inference_session_falls_back_to_the_shim_once(monkeypatch, llama_tiny_onnx, tmp_path):
    from maia_onnx.runtime import InferenceSession, session

    compiled = compile_model(llama_tiny_onnx, tmp_path / "ctx.onnx").path
    monkeypatch.setattr(plugin_ep, "LIBRARY", tmp_path / "missing" / "libmaia_ep.so")
    monkeypatch.setattr(session, "_FALLBACK_WARNED", False)
    with pytest.warns(RuntimeWarning, match="plugin unavailable .*is not built.*Python shim"):
        first = InferenceSession(compiled)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        second = InferenceSession(compiled)
    assert isinstance(first, EmulatorSession) and isinstance(second, EmulatorSession)
    feeds = make_inputs(ir.load(llama_tiny_onnx), seed=3, dims=DIMS)
    assert_bit_identical(dict(zip([o.name for o in first.get_outputs()], first.run(None, feeds))),
                         shim_outputs(compiled, feeds))


# -- fused FP8 fake-quantization ------------------------------------------------------------------------------------

def _qdq_model(fp8: int, scale: np.ndarray, axis: int) -> bytes:
    """x -> QuantizeLinear -> DequantizeLinear -> Mul(1): one activation fake-quant pair on the device."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    zero = helper.make_tensor("zp", fp8, list(scale.shape), [0] * scale.size)
    graph = helper.make_graph([
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], axis=axis),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d"], axis=axis),
        helper.make_node("Mul", ["d", "one"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, None])],
        [numpy_helper.from_array(scale, "s"), zero, numpy_helper.from_array(np.ones((), np.float32), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()


@pytest.mark.parametrize("fp8", ["FLOAT8E4M3FN", "FLOAT8E5M2"])
@pytest.mark.parametrize("per_axis", [False, True])
def test_fused_fake_quant_bit_identical_to_ort_quantize_dequantize(require_ep, fp8, per_axis, tmp_path):
    # every top-16-bit float32 pattern (zeros, subnormals, normals, the FP8 max and its rounding ties, infinities,
    # NaNs of both signs) with five low-bit patterns: the fused pass must give ORT's Q+DQ bits exactly
    from onnx import TensorProto

    high = np.arange(1 << 16, dtype=np.uint32) << 16
    x = np.concatenate([high | low for low in (0, 1, 0x7FFF, 0x8000, 0xFFFF)]).view(np.float32).reshape(4, -1)
    scale = np.array([1.0, 0.37, 3.1e-3, 2.0 ** -10], np.float32) if per_axis else np.array(1.0, np.float32)
    path = tmp_path / "qdq.onnx"
    path.write_bytes(_qdq_model(getattr(TensorProto, fp8), scale, axis=0 if per_axis else 1))
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = {"y": plain.run(None, {"x": x})[0]}
    result = run_plugin(tmp_path, path, {"x": x}, log=True)
    assert "1 FP8 QuantizeLinear->DequantizeLinear pairs run as one fake-quant pass" in result["stderr"]
    assert_bit_identical(result["outputs"], reference)


def test_llama_fp8_pairs_fused_in_the_ep(require_ep, llama_variants, tmp_path):
    compiled = compile_model(llama_variants["fp8-kv8"], tmp_path / "ctx.onnx").path
    feeds = make_inputs(ir.load(llama_variants["fp8-kv8"]), seed=4, dims=DIMS)
    result = run_plugin(tmp_path, compiled, feeds, log=True)
    fused = [int(line.split(": ")[-1].split()[0]) for line in result["stderr"].splitlines() if "fake-quant pass" in line]
    assert fused and sum(fused) >= 14  # every activation pair of the two layers' MatMuls and attention
    assert_bit_identical(result["outputs"], shim_outputs(compiled, feeds))


# -- compile through ONNX Runtime's own ModelCompiler (--engine ort) --------------------------------------------------

def _compile_ort_cli(src: Path, out: Path, *extra: str) -> dict:
    """`maia-onnx compile --engine ort` in a child process (the EP runs inside ModelCompiler)."""
    proc = subprocess.run([sys.executable, "-m", "maia_onnx", "compile", str(src), "-o", str(out), "--engine", "ort",
                           "--json", *extra], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"compile --engine ort failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def _programs(compiled: Path) -> list:
    from maia_onnx.runtime.session import _ProgramSource, _is_maia_context

    source = _ProgramSource(compiled.parent)
    return [source.program(n) for n in ir.load(compiled).graph if _is_maia_context(n)]


@pytest.mark.parametrize("variant,embed", [("fp32", True), ("fp8-kv8", True), ("fp8-kv8", False), ("mxfp8", True),
                                           ("mx9", True)])
def test_ort_engine_compile_runs_in_both_sessions(require_ep, variant, embed, llama_variants, tmp_path):
    plain = llama_variants[variant]
    out = tmp_path / "ort_ctx.onnx"
    report = _compile_ort_cli(plain, out, *([] if embed else ["--no-embed"]))
    summary = report["summary"]
    assert summary["engine"] == "ort" and summary["verified"] and summary["verify_max_rel"] == 0.0
    assert summary["partitions"] >= 1 and summary["nodes_device"] > summary["nodes_cpu"]
    assert all(v["bit_identical"] for v in report["verification"].values())
    assert (tmp_path / "ort_ctx_maia.bin").is_file() != embed
    programs = _programs(out)
    assert [p.header["format_version"] for p in programs] == [1] * len(programs)
    assert all(p.header["plan"]["memory"]["arena_bytes"] > 0 and p.header["plan"]["estimate"] == {} for p in programs)
    if variant == "mxfp8":  # the C++ writer stored MX elements and E8M0 exponent bytes, as the Python compiler does
        formats = {w["format"] for p in programs for w in p.header["weights"]}
        assert {"e8m0", "mx-elements-fp8-e4m3fn"} <= formats
    feeds = make_inputs(ir.load(plain), seed=3, dims=DIMS)
    shim = shim_outputs(out, feeds)
    # the ORT-compiled model in the plugin EP and in the shim
    assert_bit_identical(run_plugin(tmp_path, out, feeds)["outputs"], shim)
    # the Python engine's model without fusions (the same partitions, except around an FP8 KV cache) gives the same
    # outputs in the shim
    python_engine = compile_model(plain, tmp_path / "py_ctx.onnx", optimize=False, verify=False).path
    assert_bit_identical(shim_outputs(python_engine, feeds), shim)


def test_model_compiler_in_user_code_writes_maia_programs(require_ep, llama_variants, tmp_path):
    from maia_onnx.runtime.compile import read_container_index
    from maia_onnx.runtime.emulator import MaiaProgram

    out = tmp_path / "user" / "m_ctx.onnx"
    out.parent.mkdir()
    run_child(tmp_path, compile={"src": str(llama_variants["fp8-kv8"]), "out": str(out), "embed": False,
                                 "dims": {"batch": 1, "seq": 16, "past": 0}})
    data = (out.parent / "m_ctx_maia.bin").read_bytes()
    index = read_container_index(data)
    # the FP8 KV cache stays on the host side of each EPContext node (its schema has no FP8 I/O, and ORT's compile
    # API lets no EP add host casts), so the attention blocks after it are partitions of their own
    assert sorted(index) == sorted(f"maia_partition_{k}" for k in range(len(index)))
    assert all(offset % 64 == 0 and length % 64 == 0 for offset, length in index.values())
    name, (offset, length) = max(index.items(), key=lambda item: item[1][1])
    program = MaiaProgram.from_buffer(data[offset: offset + length])
    header = program.header
    assert header["device"] == "maia100" and header["partition_name"] == name
    assert header["plan"]["memory"]["dims"] == {"batch": 1, "past": 0, "seq": 16}
    assert len(header["plan"]["schedule"]) > 50 and all(w["offset"] % 64 == 0 for w in header["weights"])
    assert {w["format"] for w in header["weights"]} >= {"fp8-e4m3fn", "fp32"}
    import onnx

    assert len(onnx.load_from_string(program.graph_bytes()).graph.node) == len(header["plan"]["schedule"])
    # the model moves with its side file; both sessions run it
    moved = tmp_path / "moved"
    shutil.move(out.parent, moved)
    feeds = make_inputs(ir.load(llama_variants["fp8-kv8"]), seed=6, dims=DIMS)
    assert_bit_identical(run_plugin(tmp_path, moved / "m_ctx.onnx", feeds)["outputs"], shim_outputs(moved / "m_ctx.onnx", feeds))


def test_ort_engine_refuses_a_compiled_model(llama_tiny_onnx, tmp_path):
    from maia_onnx.errors import UserError

    compiled = compile_model(llama_tiny_onnx, tmp_path / "ctx.onnx").path
    with pytest.raises(UserError, match="already contains EPContext nodes"):
        compile_model(compiled, tmp_path / "again.onnx", engine="ort")
    assert not (tmp_path / "again.onnx").exists()


# -- an HF decoder through a plain ORT session ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_llama_onnx(tmp_path_factory) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from textdata import tiny_llama

    from maia_onnx.export import export_model

    root = tmp_path_factory.mktemp("hf_llama")
    return export_model(f"hf:{tiny_llama(root / 'hf')}", root / "llama.onnx").path


@pytest.mark.parametrize("engine", ["python", "ort"])
def test_compiled_hf_decoder_bit_identical_toshim_outputs(require_ep, engine, hf_llama_onnx, tmp_path):
    out = tmp_path / "ctx.onnx"
    if engine == "python":
        compile_model(hf_llama_onnx, out)
    else:
        _compile_ort_cli(hf_llama_onnx, out)
    feeds = make_inputs(ir.load(hf_llama_onnx), seed=3, dims=DIMS)
    result = run_plugin(tmp_path, out, feeds, profile=str(tmp_path / "prof"))
    assert result["providers"] == MAIA
    assert_bit_identical(result["outputs"], shim_outputs(out, feeds))
    events = json.loads(Path(result["profile"]).read_text())
    ran = {e["args"].get("provider") for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("kernel_time")}
    assert "MaiaExecutionProvider" in ran
