"""QuantizeMxPass: ORT and standard ONNX forms against the NumPy MX/mx9/mx6 reference and the FP32 model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from maia_onnx.passes.quantize_mx import MxLayerRecord, MxPassResult, QuantizeMxPass

from maia_onnx.errors import InvalidOptionError
from maia_onnx.formats.mx import (
    MX_FORMATS,
    fake_quant_mx,
    fake_quant_mx6,
    fake_quant_mx9,
)
from maia_onnx.ortutil import compare, run_model
from maia_onnx.pipeline import validate_model

TEXT = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[B,64] x, float[B,4,6,6] img) => (float[B,64] y, float[B,16] z, float[B,8,4,4] c) {
  h = MatMul (x, w1)
  y = Add (h, b1)
  z = Gemm <transB = 1> (y, w2)
  c = Conv (img, wc)
}
"""


def make_model(seed=0) -> ir.Model:
    rng = np.random.default_rng(seed)
    proto = onnx.parser.parse_model(TEXT)
    weights = {
        "w1": rng.standard_normal((64, 64)).astype(np.float32) * 0.2,
        "b1": rng.standard_normal(64).astype(np.float32),
        "w2": rng.standard_normal((16, 64)).astype(np.float32) * 0.3,  # Gemm transB: reduction is axis 1
        "wc": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
    }
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in weights.items())
    return ir.from_proto(proto)


def feeds(seed=1):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((3, 64)).astype(np.float32),
        "img": rng.standard_normal((3, 4, 6, 6)).astype(np.float32),
    }


def reference(fq_weight, fq_act=None):
    """NumPy model with fake-quantised weights (and activations when fq_act is given)."""
    m = make_model()
    w = {k: v.const_value.numpy() for k, v in m.graph.initializers.items()}
    f = feeds()
    x = fq_act(f["x"]) if fq_act else f["x"]
    y = x.astype(np.float64) @ fq_weight(w["w1"], 0) + w["b1"]
    y = y.astype(np.float32)
    y_in = fq_act(y) if fq_act else y
    z = y_in.astype(np.float64) @ fq_weight(w["w2"], 1).T
    return {"y": y.astype(np.float32), "z": z.astype(np.float32)}


@pytest.mark.parametrize("fmt", list(MX_FORMATS))
def test_ort_form_matches_numpy_reference(fmt):
    model = make_model()
    qp = QuantizeMxPass(fmt)
    result = qp(model)
    assert result.modified
    validate_model(result.model)
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("DequantizeLinear") >= (3 if fmt != "mxfp4" else 0)  # ORT has no FP4 kernel: decoded by Gather
    got = run_model(result.model, feeds())
    act = (lambda a: fake_quant_mx(a, fmt, axis=-1)) if fmt != "mxfp4" else None
    ref = reference(lambda w, axis: fake_quant_mx(w, fmt, axis=axis), act)
    for name in ("y", "z"):
        m = compare(ref[name], got[name])
        # same quantised operands: only float accumulation order differs (except mxint8 activations'
        # [-128, 127] QuantizeLinear range, identical here because no block value rounds to -2X)
        assert m["max_rel"] < 1e-5, (fmt, name, m)
    # weights stored in 1-byte elements (FP8 or INT8); mxfp4 packed two per byte in UINT8
    dtypes = {v.const_value.dtype for k, v in result.model.graph.initializers.items() if k.endswith(("_mx", "_fp4x2"))}
    expected = {"mxint8": ir.DataType.INT8, "mxfp8-e5m2": ir.DataType.FLOAT8E5M2, "mxfp4": ir.DataType.UINT8}.get(
        fmt, ir.DataType.FLOAT8E4M3FN)
    assert dtypes == {expected}
    assert "w1" not in result.model.graph.initializers
    assert isinstance(result, MxPassResult) and all(isinstance(r, MxLayerRecord) for r in result.layers)
    assert {r.weight for r in result.layers} == {"w1", "w2", "wc"}
    assert {r.format for r in result.layers} == {fmt} and {r.form for r in result.layers} == {"ort"}
    # activations are MX-quantised on the MatMul/Gemm data inputs whose last axis is whole blocks (not mxfp4)
    assert {r.weight: r.activations for r in result.layers}["w1"] == (fmt != "mxfp4")
    # 1-byte elements + one float32 scale per 32 elements (the Conv's 4-channel blocks pay more)
    for r in result.layers:
        assert r.sqnr_db > 0
        if r.weight != "wc":
            assert r.bytes_after == r.bytes_before // (8 if fmt == "mxfp4" else 4) + r.bytes_before // (128 if fmt == "mxfp4" else 32)


@pytest.mark.parametrize("fmt", list(MX_FORMATS))
def test_standard_form_identical_dequantised_weights(fmt):
    """The E8M0 form (onnx.reference) and the ORT form (ORT) dequantise to the same bits."""
    from onnx.reference import ReferenceEvaluator

    forms = {}
    for form in ("ort", "standard"):
        model = make_model()
        QuantizeMxPass(fmt, form=form, activations=False)(model)
        dq_outs = sorted((n.outputs[0] for n in model.graph if n.outputs[0].name.endswith("_dq")), key=lambda v: v.name)
        model.graph.outputs.extend(dq_outs)
        forms[form] = model
    std = forms["standard"]
    assert std.opset_imports[""] >= 24
    scale_types = {std.graph.initializers[n.inputs[1].name].const_value.dtype for n in std.graph if n.op_type == "DequantizeLinear"
                   and n.inputs[1].is_initializer()}
    assert scale_types == {ir.DataType.FLOAT8E8M0}
    if fmt == "mxfp4":
        assert std.graph.initializers["w1_fp4"].const_value.dtype == ir.DataType.FLOAT4E2M1
        assert std.graph.initializers["w1_fp4"].const_value.nbytes == 64 * 64 // 2  # packed, 2 per byte
    onnx.checker.check_model(ir.to_proto(std), full_check=True)
    ort_out = run_model(forms["ort"], feeds())
    names = [v.name for v in std.graph.outputs]
    ref_out = dict(zip(names, ReferenceEvaluator(ir.to_proto(std)).run(None, feeds())))
    for name in ("w1_dq", "w2_dq", "wc_dq"):
        np.testing.assert_array_equal(ref_out[name], ort_out[name])
    w1 = make_model().graph.initializers["w1"].const_value.numpy()
    np.testing.assert_array_equal(ort_out["w1_dq"], fake_quant_mx(w1, fmt, axis=0))
    assert compare(ort_out["y"], ref_out["y"])["max_rel"] < 1e-5


@pytest.mark.parametrize("activations", [True, False])
@pytest.mark.parametrize("fmt,fq", [("mx9", fake_quant_mx9), ("mx6", fake_quant_mx6)])
def test_mx9_mx6_fake_quant_weights_and_activations(fmt, fq, activations):
    model = make_model()
    qp = QuantizeMxPass(fmt) if activations else QuantizeMxPass(fmt, activations=False)
    result = qp(model)
    assert result.modified
    # stored as packed fields (sign-magnitude / nibble elements, micro-exponent bits, exponent bytes), no FP32 copy
    inits = result.model.graph.initializers
    assert "w1" not in inits and inits[f"w1_{fmt}_exponents"].const_value.dtype == ir.DataType.UINT8
    validate_model(result.model)
    calls = [n for n in result.model.graph if n.op_type == "MxFakeQuant"]
    assert len(calls) == (3 if activations else 0)  # MatMul, Gemm and Conv data inputs
    if activations:
        assert {n.domain for n in calls} == {"maia"} and ("maia", "MxFakeQuant", "") in result.model.functions
        by_input = {n.inputs[0].name: n.attributes.get_int("axis") for n in calls}
        assert by_input == {"x": -1, "y": -1, "img": 1}  # Conv blocks run along the channels
    assert all(r.activations == activations and r.form == "packed" for r in result.layers)
    got = run_model(result.model, feeds())
    ref = reference(lambda w, axis: fq(w, axis=axis), (lambda a: fq(a, axis=-1)) if activations else None)
    for name in ("y", "z"):
        assert compare(ref[name], got[name])["max_rel"] < 1e-5, (name, compare(ref[name], got[name]))
    fp32 = run_model(make_model(), feeds())
    cos = compare(fp32["y"], got["y"])["cosine"]
    assert cos > (0.9999 if fmt == "mx9" else 0.99)
    assert cos < 1.0  # it did quantise


def _fake_quant_model(rank: int, axis: int, mantissa_bits: int) -> ir.Model:
    """One maia.MxFakeQuant call on a rank-``rank`` input of unknown dims."""
    from maia_onnx.passes.quantize_mx import smx_fake_quant_function

    dims = ",".join(f"d{i}" for i in range(rank))
    proto = onnx.parser.parse_model(f"""
    <ir_version: 10, opset_import: ["" : 21, "maia" : 1]>
    g (float[{dims}] x) => (float[{dims}] y) {{
      y = maia.MxFakeQuant <axis = {axis}, mantissa_bits = {mantissa_bits}, block_size = 16> (x)
    }}
    """)
    proto.functions.append(smx_fake_quant_function(21))
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    return ir.from_proto(proto)


def _edge_case_inputs(shape, seed):
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    cases = {}
    # magnitudes over float32's whole range, subnormals included
    cases["wide"] = (rng.standard_normal(size) * np.ldexp(1.0, rng.integers(-150, 127, size))).astype(np.float32)
    # exact powers of two and values just below them (floor(log2) boundaries), times mantissa patterns
    p = np.ldexp(np.float32(1.0), rng.integers(-149, 128, size)).astype(np.float32)
    cases["pow2"] = p * rng.choice(np.float32([1, -1, 0.75, 1.5, 1.9921875, -1.0000001]), size).astype(np.float32)
    cases["below_pow2"] = np.nextafter(np.abs(p), np.float32(0)) * rng.choice(np.float32([1, -1]), size)
    # normal data with signed zeros, a huge value in some blocks, NaN and Inf
    x = rng.standard_normal(size).astype(np.float32)
    x[::7], x[3::11] = 0.0, -0.0
    x[5::29] = 3.0e4
    x[1], x[min(40, size - 1)], x[min(70, size - 1)] = np.nan, np.inf, -np.inf
    cases["special"] = x
    # all in the subnormal range / below the 2^-127 shared-exponent floor
    cases["subnormal"] = (rng.standard_normal(size) * 2.0**-140).astype(np.float32)
    # exact rounding ties on the mx6 / mx9 grids: (n + 0.5) steps in blocks whose amax is 1.0
    ties = (rng.integers(-15, 16, size) + 0.5) * np.float32(rng.choice([2.0**-3, 2.0**-6, 2.0**-4, 2.0**-7], size))
    ties[::16] = 1.0
    cases["ties"] = ties.astype(np.float32)
    return {k: v.reshape(shape) for k, v in cases.items()}


@pytest.mark.parametrize("optimizations", ["disable_all", "enable_all"])
@pytest.mark.parametrize("shape,axis", [((3, 64), -1), ((5, 37), 1), ((2, 20, 3, 3), 1), ((33, 4), 0), ((2, 3, 17), -1), ((7,), 0)])
@pytest.mark.parametrize("fmt,fq", [("mx9", fake_quant_mx9), ("mx6", fake_quant_mx6)])
def test_mx_fake_quant_function_bit_exact_in_ort(fmt, fq, shape, axis, optimizations):
    """maia.MxFakeQuant in ORT == fake_quant_mx9/mx6 bit for bit (signed zeros and NaN included)."""
    import onnxruntime as ort
    from maia_onnx.passes.quantize_mx import SMX_MANTISSA_BITS

    model = _fake_quant_model(len(shape), axis, SMX_MANTISSA_BITS[fmt])
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimizations == "disable_all" else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    for case, x in _edge_case_inputs(shape, seed=len(shape) * 100 + axis).items():
        with np.errstate(all="ignore"):
            ref = fq(x, axis=axis)
        got = sess.run(None, {"x": x})[0]
        assert got.shape == x.shape and got.dtype == np.float32
        diff = np.nonzero(ref.view(np.uint32) != got.view(np.uint32))[0] if x.ndim == 1 else np.argwhere(ref.view(np.uint32) != got.view(np.uint32))
        assert len(diff) == 0, (case, x.ravel()[:4], diff[:4])
        if case == "special" and x.size >= 64:  # big enough for finite blocks beside the NaN ones
            assert np.isnan(got).any() and (np.signbit(got) & (got == 0)).any()  # the edge cases are really there
            assert not np.isnan(got).all()


def test_mx_fake_quant_function_on_empty_and_single_blocks():
    model = _fake_quant_model(2, -1, 7)
    sess_out = run_model(model, {"x": np.zeros((0, 16), np.float32)})["y"]
    assert sess_out.shape == (0, 16)
    x = np.array([[1.0, 0.00390625, -3.0, 200.0]], np.float32)  # one block, zero-padded to 16
    y = run_model(model, {"x": x})["y"]
    np.testing.assert_array_equal(y, fake_quant_mx9(x))
    assert y[0, 1] == 0.0 and y[0, 3] == 200.0  # 2^-8 is below the block's smallest step (2^7 / 2^6 / 2)


GROUPED = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[B,6,5,5] img, float[B,32,4,4] wide, float[8,B] at) => (float[B,4,3,3] c, float[B,32,4,4] d, float[B,16] e) {
  c = Conv <group = 2> (img, wc)
  d = Conv <group = 2, pads = [1, 1, 1, 1]> (wide, wd)
  e = Gemm <transA = 1> (at, wg)
}
"""


@pytest.mark.parametrize("fmt,fq", [("mx9", fake_quant_mx9), ("mx6", fake_quant_mx6)])
def test_grouped_conv_and_transposed_gemm_activation_blocks(fmt, fq):
    """Grouped Conv blocks stay inside each group; Gemm transA blocks run along axis 0."""
    rng = np.random.default_rng(3)
    proto = onnx.parser.parse_model(GROUPED)
    weights = {
        "wc": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),  # 3 channels per group: padded blocks
        "wd": rng.standard_normal((32, 16, 3, 3)).astype(np.float32),  # 16 per group: plain channel blocks
        "wg": rng.standard_normal((8, 16)).astype(np.float32),
    }
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in weights.items())
    model = ir.from_proto(proto)
    QuantizeMxPass(fmt)(model)
    validate_model(model)
    calls = {n.inputs[0].name: n for n in model.graph if n.op_type == "MxFakeQuant"}
    assert set(calls) == {"img_grouped", "wide", "at"}
    assert calls["img_grouped"].attributes.get_int("axis") == 2 and calls["at"].attributes.get_int("axis") == 0
    outs = [n.outputs[0] for n in calls.values()] + [n.outputs[0] for n in model.graph if n.op_type == "Reshape" and n.name.startswith("img_ungroup")]
    model.graph.outputs.extend(outs)
    f = {
        "img": rng.standard_normal((2, 6, 5, 5)).astype(np.float32),
        "wide": rng.standard_normal((2, 32, 4, 4)).astype(np.float32),
        "at": rng.standard_normal((8, 2)).astype(np.float32),
    }
    got = run_model(model, f)
    img_ref = fq(f["img"].reshape(2, 2, 3, 25), axis=2).reshape(2, 6, 5, 5)
    np.testing.assert_array_equal(got[outs[-1].name], img_ref)
    np.testing.assert_array_equal(got[calls["wide"].outputs[0].name], fq(f["wide"], axis=1))
    np.testing.assert_array_equal(got[calls["at"].outputs[0].name], fq(f["at"], axis=0))
    e_ref = fq(f["at"], axis=0).T.astype(np.float64) @ fq(weights["wg"], axis=0)
    assert compare(e_ref.astype(np.float32), got["e"])["max_rel"] < 1e-5


def test_quantize_api_weights_only_turns_mx9_activations_off(tmp_path):
    from maia_onnx.io import save_model
    from maia_onnx.quantize import quantize_model

    src = tmp_path / "m.onnx"
    save_model(make_model(), src)
    ops = {}
    for weights_only in (False, True):
        out = tmp_path / f"q{weights_only}.onnx"
        quantize_model(src, out, format="mx9", weights_only=weights_only, calib=None if weights_only else "random",
                       evaluate=False, show_progress=False)
        ops[weights_only] = [n.op_type for n in ir.load(out).graph]
    assert ops[False].count("MxFakeQuant") == 3 and "MxFakeQuant" not in ops[True]


def test_exclude_keeps_layer_in_fp32():
    model = make_model()
    result = QuantizeMxPass("mxfp8-e4m3", exclude=["w2"])(model)
    assert "w2" in model.graph.initializers and "w2_mx" not in model.graph.initializers
    assert {r.weight for r in result.layers} == {"w1", "wc"}


def test_activation_blocks_exact_at_powers_of_two():
    """floor(log2 amax) built from Log/Div must be exact where amax is a power of two (and just below)."""
    model = make_model()
    QuantizeMxPass("mxfp8-e4m3")(model)
    x = np.zeros((3, 64), np.float32)
    x[0, 0], x[1, 5], x[2, 40] = 8.0, np.nextafter(np.float32(8.0), np.float32(0)), 2.0**-20
    x[:, 1:4] = 0.3
    f = feeds()
    f["x"] = x
    got = run_model(model, f)["y"]
    w = make_model().graph.initializers
    ref = fake_quant_mx(x, "mxfp8-e4m3", axis=-1) @ fake_quant_mx(w["w1"].const_value.numpy(), "mxfp8-e4m3", axis=0)
    ref = ref + w["b1"].const_value.numpy()
    assert compare(ref, got)["max_rel"] < 1e-6


def test_bad_options():
    with pytest.raises(InvalidOptionError):
        QuantizeMxPass("mxfp7")
    with pytest.raises(InvalidOptionError):
        QuantizeMxPass("mxfp8-e4m3", form="nvidia")
    with pytest.raises(InvalidOptionError):
        QuantizeMxPass("mxfp4", activations=True)
    QuantizeMxPass("mx6", activations=True)  # mx9/mx6 emulate activations too


@pytest.mark.parametrize("fmt", ["mxfp8-e4m3", "mxint8", "mxfp4", "mx9", "mx6"])
@pytest.mark.parametrize("family", ["llama-tiny", "unet-tiny", "yolo-tiny"])
def test_builtin_families_close_to_fp32(exported_models, family, fmt):
    from maia_onnx.io import load_model
    from maia_onnx.ortutil import make_inputs

    path = exported_models(family)
    fp32 = load_model(path)
    f = make_inputs(fp32, seed=0, dims={"batch": 1, "seq": 8, "past": 4, "*": 2})
    ref = run_model(fp32, f)
    result = QuantizeMxPass(fmt)(load_model(path))
    q = result.model
    validate_model(q)
    got = run_model(q, f)
    # random-init models: floors sit under the measured cosines (docs/benchmarks.md) with margin
    # (mx9/mx6 weights + activations: lowest measured 0.99973 / 0.98105, unet-tiny)
    floor = {"mxfp8-e4m3": 0.99, "mxint8": 0.999, "mxfp4": 0.9, "mx9": 0.9995, "mx6": 0.97}[fmt]
    for name, r in ref.items():
        c = compare(r, got[name])["cosine"]
        assert c > floor, (family, fmt, name, c)
    assert any(not np.array_equal(r, got[name]) for name, r in ref.items())  # it did quantise
    assert len(result.layers) >= 3
    if fmt in ("mx9", "mx6"):  # activations emulated on every quantised layer; ORT's optimizer keeps the numerics
        assert all(r.activations for r in result.layers)
        opt = run_model(q, f, disable_optimizations=False)
        for name, r in got.items():
            assert compare(r, opt[name])["max_rel"] < 1e-4, (name, compare(r, opt[name]))


@pytest.mark.parametrize("fmt", ["mxfp8-e4m3", "mx9"])
def test_chunked_and_external_data_paths_are_identical(tmp_path, monkeypatch, fmt):
    """Large weights are quantised in slices (and, from external data, lazily): same bytes as in one piece."""
    import functools

    from maia_onnx.passes import quantize_mx

    from maia_onnx.io import load_model, save_model

    whole = make_model()
    QuantizeMxPass(fmt)(whole)
    monkeypatch.setattr(quantize_mx, "_chunks", functools.partial(quantize_mx._chunks, max_elements=100))
    src = tmp_path / "src.onnx"
    save_model(make_model(), src, external_data=True)
    model = load_model(src)
    assert isinstance(model.graph.initializers["w1"].const_value, ir.ExternalTensor)
    QuantizeMxPass(fmt)(model)
    out = tmp_path / "out.onnx"
    save_model(model, out)
    back = load_model(out)
    for name, v in whole.graph.initializers.items():
        np.testing.assert_array_equal(back.graph.initializers[name].const_value.numpy(), v.const_value.numpy(), err_msg=name)
    np.testing.assert_array_equal(run_model(back, feeds())["y"], run_model(whole, feeds())["y"])
    assert len(quantize_mx._chunks((64, 64), 0)) > 1  # the slicing really happened


@pytest.mark.parametrize("fmt", ["mxfp8-e4m3", "mxint8", "mxfp4"])
def test_standard_form_llama_in_reference_evaluator_matches_ort_form(llama_tiny_onnx, fmt):
    """Whole llama-tiny: E8M0/FP4 form in onnx.reference == float-scale form in ORT (same dequantised operands)."""
    from onnx.reference import ReferenceEvaluator

    from maia_onnx.io import load_model
    from maia_onnx.ortutil import make_inputs

    f = make_inputs(load_model(llama_tiny_onnx), seed=0, dims={"batch": 1, "seq": 4, "past": 2})
    std = load_model(llama_tiny_onnx)
    QuantizeMxPass(fmt, form="standard")(std)
    validate_model(std)
    ref_eval = ReferenceEvaluator(ir.to_proto(std)).run(["logits"], f)[0]
    ort_form = load_model(llama_tiny_onnx)
    QuantizeMxPass(fmt, form="ort")(ort_form)
    got = run_model(ort_form, f)["logits"]
    assert compare(got, ref_eval)["max_rel"] < 1e-5
    fp32 = run_model(load_model(llama_tiny_onnx), f)["logits"]
    assert 0.95 < compare(fp32, ref_eval)["cosine"] < 1.0


def test_mx9_llama_compiles_runs_in_shim_and_partitions(llama_tiny_onnx, tmp_path):
    """maia.MxFakeQuant survives the Maia compile + shim session (bit-exact) and the TP partitioner."""
    from maia_onnx.runtime import InferenceSession
    from maia_onnx.runtime.compile import compile_model
    from maia_onnx.runtime.executor import run_partition

    from maia_onnx.io import load_model, save_model
    from maia_onnx.ortutil import make_inputs
    from maia_onnx.partition import partition_file

    model = load_model(llama_tiny_onnx)
    QuantizeMxPass("mx9")(model)
    src = tmp_path / "mx9.onnx"
    save_model(model, src)
    feeds = make_inputs(model, seed=3, dims={"batch": 2, "seq": 5, "past": 3})
    plain = run_model(load_model(src), feeds)
    compiled = compile_model(src, tmp_path / "mx9_ctx.onnx")
    sess = InferenceSession(str(compiled.path), providers=["MaiaExecutionProvider", "CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for name, ref in plain.items():
        np.testing.assert_array_equal(got[name], ref, err_msg=name)
    partition_file(src, tmp_path / "tp2", tp=2)
    sharded = run_partition(tmp_path / "tp2", feeds)
    for name, ref in plain.items():
        assert compare(ref, sharded[name])["max_rel"] < 1e-4, name



@pytest.mark.parametrize("fmt,fq", [("mx9", fake_quant_mx9), ("mx6", fake_quant_mx6)])
def test_mx_fake_quant_function_matches_reference_on_any_float32(fmt, fq):
    """Hypothesis: any float32 values (NaN, Inf, subnormals, signed zeros), any length: same bits."""
    import onnxruntime as ort
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
    from maia_onnx.passes.quantize_mx import SMX_MANTISSA_BITS

    sess = ort.InferenceSession(
        ir.to_proto(_fake_quant_model(2, -1, SMX_MANTISSA_BITS[fmt])).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    values = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)

    @settings(max_examples=150, deadline=None)
    @given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=40), elements=values))
    def check(x):
        with np.errstate(all="ignore"):
            ref = fq(x, axis=-1)
        got = sess.run(None, {"x": x})[0]
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))

    check()
