"""`maia-onnx quantize`: outputs, --report / --json, calibration files, and one-line user errors."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from graphs import write_mlp

from maia_onnx.cli import main
from maia_onnx.io import load_model, sha256_file
from maia_onnx.ortutil import run_model

@pytest.fixture
def model_path(tmp_path):
    return write_mlp(tmp_path / "mlp.onnx", n_in=16)


def test_quantize_fp8_with_npz_calibration_and_report(tmp_path, model_path, capsys):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((20, 16)).astype(np.float32))
    before = sha256_file(model_path)
    out, report = tmp_path / "q.onnx", tmp_path / "report.json"
    rc = main(["quantize", str(model_path), "-o", str(out), "--calib", str(tmp_path / "calib.npz"), "--method", "percentile",
               "--batch-size", "4", "--report", str(report)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sha256_file(model_path) == before
    assert "per-layer accuracy" in captured.out and "end-to-end accuracy" in captured.out and "wrote" in captured.out
    data = json.loads(report.read_text())
    assert data["format"] == "fp8-e4m3" and data["calibration"]["method"] == "percentile"
    assert data["calibration"]["samples"] == 16  # 4 of 20 samples held out for the report
    assert data["accuracy"]["outputs"]["logits"]["cosine"] > 0.995
    assert {row["op"] for row in data["accuracy"]["layers"]} == {"MatMul", "Gemm"}
    model = load_model(out)
    assert sum(v.const_value.dtype == ir.DataType.FLOAT8E4M3FN and v.const_value.size > 1
               for v in model.graph.initializers.values()) == 2
    x = rng.standard_normal((3, 16)).astype(np.float32)
    ref, got = run_model(model_path, {"x": x})["logits"], run_model(out, {"x": x})["logits"]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.995


@pytest.mark.parametrize("fmt", ["fp8-e5m2", "bf16"])
def test_json_output_for_other_formats(tmp_path, model_path, capsys, fmt):
    out = tmp_path / "q.onnx"
    rc = main(["quantize", str(model_path), "-o", str(out), "--format", fmt, "--json", "--samples", "4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads(captured.out)
    assert data["format"] == fmt and data["sizes"]["output_bytes"] == out.stat().st_size
    assert data["accuracy"]["summary"]["min_output_cosine"] > (0.99 if fmt == "fp8-e5m2" else 0.9999)


def test_weights_only_block_granularity_needs_no_calibration(tmp_path, model_path, capsys):
    out = tmp_path / "q.onnx"
    rc = main(["quantize", str(model_path), "-o", str(out), "--weights-only", "--granularity", "block", "--block-size", "16",
               "--no-eval", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads(captured.out)
    assert "calibration" not in data and data["activation_scales"] == {}
    dq = [n for n in load_model(out).graph if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 and all(n.attributes["block_size"].value == 16 for n in dq)


@pytest.mark.parametrize("args,message", [
    (["--format", "fp9"], "Invalid value for '--format'"),
    (["--calib", "missing.npz"], "not found"),
    (["--granularity", "block"], "--block-size"),
    (["--method", "percentile", "--percentile", "150"], "--percentile"),
])
def test_user_errors_are_one_line(tmp_path, model_path, capsys, args, message):
    out = tmp_path / "q.onnx"
    rc = main(["quantize", str(model_path), "-o", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_refuses_to_overwrite_input_and_missing_model(tmp_path, model_path, capsys):
    assert main(["quantize", str(model_path), "-o", str(model_path)]) == 2
    assert "is the input path" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "q.onnx")]) == 2
    assert "not found" in capsys.readouterr().err


def test_kv_cache_on_a_model_without_one_fails_before_any_work(tmp_path, model_path, capsys):
    rc = main(["quantize", str(model_path), "-o", str(tmp_path / "q.onnx"), "--kv-cache", "fp8-e4m3"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no KV cache" in err and "calibrating" not in err
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("args,message", [
    (["--format", "bf16", "--mx-form", "standard", "--no-eval"], "--mx-form applies to the OCP MX formats"),
    (["--format", "mxfp4", "--mx-form", "standard"], "add --no-eval"),
    (["--format", "mxint8", "--granularity", "tensor"], "FP8 weights only"),
    (["--format", "mx9", "--block-size", "15"], "multiple of 2"),
    (["--format", "bf16", "--embeddings"], "--embeddings"),
    (["--samples", "0"], "--samples must be >= 1"),
])
def test_bad_option_combinations_fail_before_reading_the_model(tmp_path, capsys, args, message):
    out = tmp_path / "q.onnx"
    rc = main(["quantize", str(tmp_path / "missing.onnx"), "-o", str(out), *args])  # refused before the model is read
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_mx_form_standard_through_the_cli(tmp_path, model_path, capsys):
    """--mx-form standard: FLOAT8E8M0 scales, opset 24, same dequantised weights as the default ORT form."""
    outs = {}
    for form in ("ort", "standard"):
        outs[form] = tmp_path / f"{form}.onnx"
        rc = main(["quantize", str(model_path), "-o", str(outs[form]), "--format", "mxfp8-e4m3", "--mx-form", form,
                   "--weights-only", "--no-eval", "--json"])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        assert {row["form"] for row in json.loads(captured.out)["mx_layers"]} == {form}
    standard = load_model(outs["standard"])
    assert standard.opset_imports[""] >= 24
    scales = [v for v in standard.graph.initializers.values() if v.name.endswith("_mx_scale")]
    assert scales and all(v.const_value.dtype == ir.DataType.FLOAT8E8M0 for v in scales)
    ort_scales = [v for v in load_model(outs["ort"]).graph.initializers.values() if v.name.endswith("_mx_scale")]
    assert all(v.const_value.dtype == ir.DataType.FLOAT for v in ort_scales)


def test_kv_cache_scales_roundtrip_and_target_cosine_on_llama(tmp_path, llama_tiny_onnx, capsys):
    """The MX/KV/QAT engineer's passes, wired through the CLI: FP8 KV cache, scale export/import, mixed precision."""
    out, scales = tmp_path / "kv.onnx", tmp_path / "scales.json"
    rc = main(["quantize", str(llama_tiny_onnx), "-o", str(out), "--kv-cache", "fp8-e4m3", "--emit-scales", str(scales),
               "--no-attention", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads(captured.out)
    assert len(data["kv_cache"]["scales"]) == 4
    assert load_model(out).graph.inputs[1].dtype == ir.DataType.FLOAT8E4M3FN  # past_key_values.0.key in FP8
    assert data["accuracy"]["outputs"]["logits"]["cosine"] > 0.995  # evaluated through float I/O around the FP8 cache
    emitted = json.loads(scales.read_text())
    assert "lm_head.weight_scale" in emitted and "model.layers.1.self_attn.k_scale" in emitted

    # importing the emitted scales needs no calibration and reproduces the same FP8 weights
    out2 = tmp_path / "imported.onnx"
    rc = main(["quantize", str(llama_tiny_onnx), "-o", str(out2), "--scales", str(scales), "--kv-cache", "fp8-e4m3",
               "--no-attention", "--calib", "random", "--json"])
    data2 = json.loads(capsys.readouterr().out)
    assert rc == 0 and data2["scales_import"]["unmatched"] == [] and "calibration" not in data2
    a, b = load_model(out).graph.initializers, load_model(out2).graph.initializers
    for name, value in a.items():
        if value.const_value.dtype == ir.DataType.FLOAT8E4M3FN and not name.startswith("kv_cache"):
            np.testing.assert_array_equal(value.const_value.numpy().view(np.uint8), b[name].const_value.numpy().view(np.uint8))

    rc = main(["quantize", str(llama_tiny_onnx), "-o", str(tmp_path / "mp.onnx"), "--target-cosine", "0.999"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "mixed precision: kept" in captured.out and "met" in captured.out
