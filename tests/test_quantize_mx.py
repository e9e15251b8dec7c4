"""QuantizeMxPass: ORT and standard ONNX forms against the NumPy MX/mx9/mx6 reference and the FP32 model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from maia_onnx.errors import InvalidOptionError
from maia_onnx.formats.mx import MX_FORMATS, fake_quant_mx, fake_quant_mx6, fake_quant_mx9
from maia_onnx.ortutil import compare, run_model
from maia_onnx.pipeline import validate_model
from maia_onnx.passes.quantize_mx import QuantizeMxPass

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
    assert ops.count("DequantizeLinear") >= 3
    got = run_model(result.model, feeds())
    act = (lambda a: fake_quant_mx(a, fmt, axis=-1)) if fmt != "mxfp4" else None
    ref = reference(lambda w, axis: fake_quant_mx(w, fmt, axis=axis), act)
    for name in ("y", "z"):
        m = compare(ref[name], got[name])
        # same quantised operands: only float accumulation order differs (except mxint8 activations'
        # [-128, 127] QuantizeLinear range, identical here because no block value rounds to -2X)
        assert m["max_rel"] < 1e-5, (fmt, name, m)
    # weights stored in 1-byte elements (FP8 or INT8); mxfp4 as FP8 carrying E2M1 values
    dtypes = {v.const_value.dtype for k, v in result.model.graph.initializers.items() if k.endswith("_mx")}
    expected = {"mxint8": ir.DataType.INT8, "mxfp8-e5m2": ir.DataType.FLOAT8E5M2}.get(fmt, ir.DataType.FLOAT8E4M3FN)
    assert dtypes == {expected}
    assert "w1" not in result.model.graph.initializers
    assert {r["weight"] for r in qp.layers} == {"w1", "w2", "wc"}
    # 1-byte elements + one float32 scale per 32 elements (the Conv's 4-channel blocks pay more)
    for r in qp.layers:
        if r["weight"] != "wc":
            assert r["bytes_after"] == r["bytes_before"] // 4 + r["bytes_before"] // 32


@pytest.mark.parametrize("fmt", list(MX_FORMATS))
def test_standard_form_identical_dequantised_weights(fmt):
    """The E8M0 form (onnx.reference) and the ORT form (ORT) dequantise to the same bits."""
    from onnx.reference import ReferenceEvaluator

    forms = {}
    for form in ("ort", "standard"):
        model = make_model()
        QuantizeMxPass(fmt, form=form, activations=False)(model)
        dq_outs = sorted((n.outputs[0] for n in model.graph if n.op_type == "DequantizeLinear"), key=lambda v: v.name)
        model.graph.outputs.extend(dq_outs)
        forms[form] = model
    std = forms["standard"]
    assert std.opset_imports[""] >= 24
    scale_types = {std.graph.initializers[n.inputs[1].name].const_value.dtype for n in std.graph if n.op_type == "DequantizeLinear"}
    assert scale_types == {ir.DataType.FLOAT8E8M0}
    if fmt == "mxfp4":
        assert std.graph.initializers["w1_mx"].const_value.dtype == ir.DataType.FLOAT4E2M1
        assert std.graph.initializers["w1_mx"].const_value.nbytes == 64 * 64 // 2  # packed, 2 per byte
    onnx.checker.check_model(ir.to_proto(std), full_check=True)
    ort_out = run_model(forms["ort"], feeds())
    names = [v.name for v in std.graph.outputs]
    ref_out = dict(zip(names, ReferenceEvaluator(ir.to_proto(std)).run(None, feeds())))
    for name in ("w1_dq", "w2_dq", "wc_dq"):
        np.testing.assert_array_equal(ref_out[name], ort_out[name])
    w1 = make_model().graph.initializers["w1"].const_value.numpy()
    np.testing.assert_array_equal(ort_out["w1_dq"], fake_quant_mx(w1, fmt, axis=0))
    assert compare(ort_out["y"], ref_out["y"])["max_rel"] < 1e-5


@pytest.mark.parametrize("fmt,fq", [("mx9", fake_quant_mx9), ("mx6", fake_quant_mx6)])
def test_mx9_mx6_fake_quant_weights(fmt, fq):
    model = make_model()
    qp = QuantizeMxPass(fmt)
    result = qp(model)
    assert result.modified
    w1 = result.model.graph.initializers["w1"]
    assert w1.metadata_props["maia.format"] == fmt and w1.metadata_props["maia.block_axis"] == "0"
    got = run_model(result.model, feeds())
    ref = reference(lambda w, axis: fq(w, axis=axis))
    for name in ("y", "z"):
        assert compare(ref[name], got[name])["max_rel"] < 1e-5
    fp32 = run_model(make_model(), feeds())
    cos = compare(fp32["y"], got["y"])["cosine"]
    assert cos > (0.9999 if fmt == "mx9" else 0.995)
    assert cos < 1.0  # it did quantise


def test_exclude_keeps_layer_in_fp32():
    model = make_model()
    qp = QuantizeMxPass("mxfp8-e4m3", exclude=["w2"])
    qp(model)
    assert "w2" in model.graph.initializers and "w2_mx" not in model.graph.initializers
    assert {r["weight"] for r in qp.layers} == {"w1", "wc"}


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


@pytest.mark.parametrize("fmt", ["mxfp8-e4m3", "mxint8", "mxfp4", "mx9", "mx6"])
@pytest.mark.parametrize("family", ["llama-tiny", "unet-tiny", "yolo-tiny"])
def test_builtin_families_close_to_fp32(exported_models, family, fmt):
    pytest.importorskip("maia_onnx.export")
    from maia_onnx.io import load_model
    from maia_onnx.ortutil import make_inputs

    path = exported_models(family)
    fp32 = load_model(path)
    f = make_inputs(fp32, seed=0, dims={"batch": 1, "seq": 8, "past": 4, "*": 2})
    ref = run_model(fp32, f)
    qp = QuantizeMxPass(fmt)
    q = qp(load_model(path)).model
    validate_model(q)
    got = run_model(q, f)
    # random-init models: floors sit under the measured cosines (docs/benchmarks.md) with margin
    floor = {"mxfp8-e4m3": 0.99, "mxint8": 0.999, "mxfp4": 0.9, "mx9": 0.9998, "mx6": 0.985}[fmt]
    for name, r in ref.items():
        c = compare(r, got[name])["cosine"]
        assert c > floor, (family, fmt, name, c)
    assert any(not np.array_equal(r, got[name]) for name, r in ref.items())  # it did quantise
    assert len(qp.layers) >= 3


@pytest.mark.parametrize("fmt", ["mxfp8-e4m3", "mx9"])
def test_chunked_and_external_data_paths_are_identical(tmp_path, monkeypatch, fmt):
    """Large weights are quantised in slices (and, from external data, lazily): same bytes as in one piece."""
    import functools

    from maia_onnx.io import load_model, save_model
    from maia_onnx.passes import quantize_mx

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
