"""QuantizeFp8Pass: QDQ structure, 1-byte FP8 weights, and ORT numerics equal to a NumPy fake-quant emulation."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from maia_onnx.formats.fp8 import amax_along, dequantize_fp8, fp8_amax_scale, get_fp8_format, quantize_fp8
from maia_onnx.io import load_model, save_model, sha256_file
from maia_onnx.ortutil import run_model
from maia_onnx.passes.quantize_fp8 import Fp8PassResult, LayerRecord, QuantizeFp8Pass, activation_values, find_targets

# ORT's float32 kernels vs NumPy on the same fake-quantized operands: only summation order differs
RTOL, ATOL = 1e-5, 1e-5


def _model(text: str, weights: dict[str, np.ndarray]) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in weights.items())
    return ir.serde.deserialize_model(proto)


def qdq(x: np.ndarray, scale: float, fmt="e4m3fn") -> np.ndarray:
    return dequantize_fp8(quantize_fp8(x, np.float32(scale), fmt), np.float32(scale))


def wq(w: np.ndarray, axis, fmt="e4m3fn", block=None) -> np.ndarray:
    scale = fp8_amax_scale(amax_along(w, axis, block), fmt)
    return dequantize_fp8(quantize_fp8(w, scale, fmt, axis=axis, block_size=block), scale, axis=axis, block_size=block)


MLP = """
<ir_version: 10, opset_import: ["" : 21]>
mlp (float[N, 16] x) => (float[N, 8] y) {
   h = MatMul(x, W1)
   r = Relu(h)
   y = Gemm <transB = 1> (r, W2, b)
}
"""


@pytest.fixture
def mlp():
    rng = np.random.default_rng(0)
    weights = {
        "W1": (rng.standard_normal((16, 32)) * rng.uniform(0.1, 3, (1, 32))).astype(np.float32),
        "W2": rng.standard_normal((8, 32)).astype(np.float32),
        "b": rng.standard_normal(8).astype(np.float32),
    }
    x = rng.standard_normal((5, 16)).astype(np.float32)
    return _model(MLP, weights), weights, x


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_mlp_per_channel_matches_numpy_emulation(mlp, fmt):
    model, w, x = mlp
    sx, sr = 3.0 / 448, 9.0 / 448
    result = QuantizeFp8Pass(fmt, activation_scales={"x": sx, "r": sr})(model)
    assert isinstance(result, Fp8PassResult) and result.modified
    spec = get_fp8_format(fmt)
    # weights: real 1-byte FP8 initializers; FP32 originals gone
    fp8_inits = {k: v for k, v in model.graph.initializers.items() if v.const_value.dtype == spec.ir_dtype and v.shape.rank()}
    assert sorted(fp8_inits) == ["W1_quantized", "W2_quantized"]
    assert all(v.const_value.nbytes == v.const_value.size for v in fp8_inits.values())
    assert "W1" not in model.graph.initializers and "W2" not in model.graph.initializers
    ops = [n.op_type for n in model.graph]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 4 and "Relu" in ops
    dq_w1 = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name == "W1_quantized")
    assert dq_w1.attributes["axis"].value == 1  # MatMul [K, N]: output channels on axis 1
    dq_w2 = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name == "W2_quantized")
    assert dq_w2.attributes["axis"].value == 0  # Gemm transB [N, K]: output channels on axis 0
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    assert q.inputs[2].const_value.dtype == spec.ir_dtype  # FP8 zero point decides the output type
    onnx.checker.check_model(ir.to_proto(model), full_check=True)

    got = run_model(model, {"x": x})["y"]
    h = qdq(x, sx, fmt) @ wq(w["W1"], 1, fmt)
    expect = qdq(np.maximum(h, 0), sr, fmt) @ wq(w["W2"], 0, fmt).T + w["b"]
    np.testing.assert_allclose(got, expect, rtol=RTOL, atol=ATOL)
    assert all(isinstance(r, LayerRecord) for r in result.records)
    assert [(r.node, r.op_type, r.outputs, r.weight) for r in result.records] == [("MatMul_0", "MatMul", ["h"], "W1"),
                                                                                     ("Gemm_1", "Gemm", ["y"], "W2")]
    assert [r.activation_scales for r in result.records] == [{"x": pytest.approx(sx)}, {"r": pytest.approx(sr)}]
    assert [r.weight_granularity for r in result.records] == ["channel", "channel"]
    assert all(r.weight_sqnr_db > (28 if fmt == "e4m3fn" else 22) for r in result.records)


def test_relu_before_qdq_is_kept_and_negative_inputs_matter(mlp):
    # ORT's quantize_static drops ReLU before FP8 QDQ; without zero-point clipping that changes results
    model, w, x = mlp
    QuantizeFp8Pass(activation_scales={"r": 9.0 / 448})(model)
    got = run_model(model, {"x": x})["y"]
    relu_in = x @ wq(w["W1"], 1)
    assert (relu_in < 0).any()
    expect = qdq(np.maximum(relu_in, 0), 9.0 / 448) @ wq(w["W2"], 0).T + w["b"]
    wrong = qdq(relu_in, 9.0 / 448) @ wq(w["W2"], 0).T + w["b"]
    np.testing.assert_allclose(got, expect, rtol=RTOL, atol=ATOL)
    assert np.abs(got - wrong).max() > 0.1


@pytest.mark.parametrize("granularity,block", [("tensor", None), ("block", 8)])
def test_tensor_and_block_granularity(mlp, granularity, block):
    model, w, x = mlp
    QuantizeFp8Pass(granularity=granularity, block_size=block, weights_only=True)(model)
    dqs = {n.inputs[0].name: n for n in model.graph if n.op_type == "DequantizeLinear"}
    if granularity == "tensor":
        assert "axis" not in dqs["W1_quantized"].attributes and dqs["W1_quantized"].inputs[1].shape.rank() == 0
        expect = (x @ wq(w["W1"], None)).clip(0) @ wq(w["W2"], None).T + w["b"]
    else:
        a = dqs["W1_quantized"].attributes
        assert a["block_size"].value == 8 and a["axis"].value == 0  # blocks along K of [K, N]
        assert tuple(dqs["W1_quantized"].inputs[1].shape) == (2, 32)
        assert dqs["W2_quantized"].attributes["axis"].value == 1  # K is axis 1 of Gemm transB [N, K]
        expect = (x @ wq(w["W1"], 0, block=8)).clip(0) @ wq(w["W2"], 1, block=8).T + w["b"]
    assert not any(n.op_type == "QuantizeLinear" for n in model.graph)
    np.testing.assert_allclose(run_model(model, {"x": x})["y"], expect, rtol=RTOL, atol=ATOL)


def test_attention_matmuls_quantize_both_activations():
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    attn (float[2, 4, 8] q, float[2, 8, 4] kt, float[2, 4, 8] v) => (float[2, 4, 8] o) {
       s = MatMul(q, kt)
       p = Softmax <axis = -1> (s)
       o = MatMul(p, v)
    }
    """
    model = _model(text, {})
    targets = find_targets(model)
    assert [t.activation_inputs for t in targets] == [[0, 1], [0, 1]]
    assert activation_values(targets) == ["q", "kt", "p", "v"]
    scales = {"q": 3 / 448, "kt": 3 / 448, "p": 1 / 448, "v": 3 / 448}
    QuantizeFp8Pass(activation_scales=scales)(model)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph) == 4
    rng = np.random.default_rng(1)
    feeds = {"q": rng.standard_normal((2, 4, 8)).astype(np.float32), "kt": rng.standard_normal((2, 8, 4)).astype(np.float32),
             "v": rng.standard_normal((2, 4, 8)).astype(np.float32)}
    s = qdq(feeds["q"], scales["q"]) @ qdq(feeds["kt"], scales["kt"])
    e = np.exp(s - s.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    expect = qdq(p.astype(np.float32), scales["p"]) @ qdq(feeds["v"], scales["v"])
    np.testing.assert_allclose(run_model(model, feeds)["o"], expect, rtol=RTOL, atol=ATOL)
    # --no-attention leaves them alone
    assert find_targets(_model(text, {}), attention=False) == []


CONV = """
<ir_version: 10, opset_import: ["" : 21]>
conv (float[1, 3, 8, 8] x) => (float[1, 4, 16, 16] y) {
   c = Conv <pads = [1, 1, 1, 1]> (x, Wc, bc)
   y = ConvTranspose <strides = [2, 2]> (c, Wt)
}
"""


def test_conv_and_conv_transpose_per_channel_axes():
    rng = np.random.default_rng(2)
    w = {"Wc": rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "bc": rng.standard_normal(6).astype(np.float32),
         "Wt": rng.standard_normal((6, 4, 2, 2)).astype(np.float32)}
    model = _model(CONV, w)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    scales = {"x": 4 / 448, "c": 12 / 448}
    QuantizeFp8Pass(activation_scales=scales)(model)
    dqs = {n.inputs[0].name: n for n in model.graph if n.op_type == "DequantizeLinear"}
    assert dqs["Wc_quantized"].attributes["axis"].value == 0  # Conv [M, C, kh, kw]
    assert dqs["Wt_quantized"].attributes["axis"].value == 1  # ConvTranspose [C, M, kh, kw]
    assert "bc" in model.graph.initializers  # bias stays float
    got = run_model(model, {"x": x})["y"]
    # emulation: the FP32 graph fed with fake-quantized weights; activations fake-quantized in between
    ref_conv = _model(CONV.replace("y = ConvTranspose <strides = [2, 2]> (c, Wt)", "y = Identity(c)").replace(
        "float[1, 4, 16, 16] y", "float[1, 6, 8, 8] y"), {**w, "Wc": wq(w["Wc"], 0)})
    c = run_model(ref_conv, {"x": qdq(x, scales["x"])})["y"]
    ref_t = _model("""
    <ir_version: 10, opset_import: ["" : 21]>
    convt (float[1, 6, 8, 8] c) => (float[1, 4, 16, 16] y) { y = ConvTranspose <strides = [2, 2]> (c, Wt) }
    """, {"Wt": wq(w["Wt"], 1)})
    expect = run_model(ref_t, {"c": qdq(c, scales["c"])})["y"]
    np.testing.assert_allclose(got, expect, rtol=RTOL, atol=ATOL)


def test_exclude_by_name_and_op_type(mlp):
    model, _, _ = mlp
    names = [n.name for n in model.graph]
    assert [t.node.op_type for t in find_targets(model, exclude=["Gemm"])] == ["MatMul"]
    model.graph.node(0).name = "proj_in"
    assert [t.node.op_type for t in find_targets(model, exclude=["proj_*"])] == ["Gemm"]
    assert names  # graph untouched by find_targets
    QuantizeFp8Pass(exclude=["Gemm"], weights_only=True)(model)
    assert "W2" in model.graph.initializers and "W1" not in model.graph.initializers


def test_tied_weight_quantized_once():
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    tied (float[2, 8] x) => (float[2, 8] y) {
       h = MatMul(x, W)
       y = MatMul(h, W)
    }
    """
    w = np.random.default_rng(3).standard_normal((8, 8)).astype(np.float32)
    model = _model(text, {"W": w})
    QuantizeFp8Pass(weights_only=True)(model)
    assert [k for k in model.graph.initializers if k.startswith("W")] == ["W_quantized", "W_scale"]
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph) == 1
    x = np.random.default_rng(4).standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(model, {"x": x})["y"], x @ wq(w, 1) @ wq(w, 1), rtol=RTOL, atol=ATOL)


def test_external_weights_are_quantized_lazily_and_bit_exact(tmp_path, mlp):
    model, w, x = mlp
    src = tmp_path / "src.onnx"
    big = {"W1": np.random.default_rng(5).standard_normal((16, 4096)).astype(np.float32)}
    text = MLP.replace("float[N, 8] y", "float[N, 4096] y").replace("y = Gemm <transB = 1> (r, W2, b)", "y = Identity(r)")
    save_model(_model(text, big), src, external_data=True)
    before = sha256_file(str(src) + ".data")
    lazy = load_model(src)
    assert isinstance(lazy.graph.initializers["W1"].const_value, ir.ExternalTensor)
    QuantizeFp8Pass(weights_only=True)(lazy)
    assert isinstance(lazy.graph.initializers["W1_quantized"].const_value, ir.LazyTensor)
    out = tmp_path / "out.onnx"
    save_model(lazy, out, external_data=True)
    assert sha256_file(str(src) + ".data") == before  # input untouched
    reloaded = load_model(out)
    q = reloaded.graph.initializers["W1_quantized"].const_value
    scale = fp8_amax_scale(np.abs(big["W1"]).max(axis=0))
    np.testing.assert_array_equal(q.numpy().view(np.uint8), quantize_fp8(big["W1"], scale, axis=1).view(np.uint8))
    assert (tmp_path / "out.onnx.data").stat().st_size < big["W1"].nbytes / 3
    np.testing.assert_allclose(run_model(out, {"x": x})["y"], np.maximum(x @ wq(big["W1"], 1), 0), rtol=RTOL, atol=ATOL)


def test_old_opset_is_upgraded(mlp):
    model, w, x = mlp
    model.opset_imports[""] = 18
    QuantizeFp8Pass(activation_scales={"x": 3 / 448})(model)
    assert model.opset_imports[""] >= 21
    expect = np.maximum(qdq(x, 3 / 448) @ wq(w["W1"], 1), 0) @ wq(w["W2"], 0).T + w["b"]
    np.testing.assert_allclose(run_model(model, {"x": x})["y"], expect, rtol=RTOL, atol=ATOL)


def test_bad_options():
    from maia_onnx.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError):
        QuantizeFp8Pass(granularity="row")
    with pytest.raises(InvalidOptionError):
        QuantizeFp8Pass(granularity="block")
    with pytest.raises(ValueError):
        QuantizeFp8Pass(fmt="e3m4")


def test_imported_weight_scale_is_used(mlp):
    model, w, x = mlp
    scale = np.full(32, 0.05, np.float32)
    QuantizeFp8Pass(weights_only=True, weight_scales={"W1": scale}, exclude=["Gemm"])(model)
    q = model.graph.initializers["W1_quantized"].const_value.numpy()
    np.testing.assert_array_equal(q.view(np.uint8), quantize_fp8(w["W1"], scale, axis=1).view(np.uint8))
    assert q.dtype == ml_dtypes.float8_e4m3fn


# ------------------------------------------------------------------------------------------------
# End to end through maia_onnx.quantize.quantize_model on the built-in families and an HF decoder.
# Thresholds: measured cosine (random calibration, seed 0, 4 held-out random samples) minus a margin;
# FP8 E4M3 keeps ~3 significant bits, so a random-weight tiny model loses ~28 dB SNR per layer.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def hf_decoder_onnx(tmp_path_factory):
    pytest.importorskip("transformers")
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from maia_onnx.export import export_model

    root = tmp_path_factory.mktemp("hf_qwen2")
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(root / "ckpt")
    out = root / "qwen2.onnx"
    export_model(f"hf:{root / 'ckpt'}", out)
    return out


@pytest.fixture(params=["llama", "unet", "yolo", "hf"])
def family(request):
    fixture = {"llama": "llama_tiny_onnx", "unet": "unet_tiny_onnx", "yolo": "yolo_tiny_onnx", "hf": "hf_decoder_onnx"}[request.param]
    return request.param, request.getfixturevalue(fixture)


# (family -> minimum output cosine) per format; every FP8 method is held to the format's bar
MIN_COSINE = {
    "fp8-e4m3": {"llama": 0.996, "unet": 0.988, "yolo": 0.9999, "hf": 0.997},
    "fp8-e5m2": {"llama": 0.985, "unet": 0.96, "yolo": 0.9999, "hf": 0.99},
    "bf16": {"llama": 0.9999, "unet": 0.9999, "yolo": 0.9999, "hf": 0.9999},
}


def _quantize(path, **kw):
    import warnings

    from maia_onnx.quantize import quantize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_model(path, None, show_progress=False, **kw)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_fp8_e4m3_every_method_on_every_family(family, method):
    name, path = family
    r = _quantize(path, format="fp8-e4m3", method=method)
    acc = r.report["accuracy"]
    assert acc["summary"]["quantized_layers"] >= 15
    assert all(np.isfinite(row["sqnr_db"]) and row["sqnr_db"] > 12 for row in acc["layers"])
    assert acc["summary"]["min_output_cosine"] >= MIN_COSINE["fp8-e4m3"][name], acc["outputs"]
    assert r.activation_scales and all(0 < s < 1 for s in r.activation_scales.values())


@pytest.mark.parametrize("fmt", ["fp8-e5m2", "bf16"])
def test_e5m2_and_bf16_on_every_family(family, fmt):
    name, path = family
    r = _quantize(path, format=fmt)
    assert r.report["accuracy"]["summary"]["min_output_cosine"] >= MIN_COSINE[fmt][name], r.report["accuracy"]["outputs"]


MX_MIN_COSINE = {
    "mxfp8-e4m3": {"llama": 0.996, "unet": 0.988, "yolo": 0.9999, "hf": 0.997},
    "mxfp8-e5m2": {"llama": 0.985, "unet": 0.965, "yolo": 0.9999, "hf": 0.99},
    "mxint8": {"llama": 0.999, "unet": 0.999, "yolo": 0.9999, "hf": 0.9995},
    "mxfp4": {"llama": 0.97, "unet": 0.89, "yolo": 0.9999, "hf": 0.975},
    # mx9/mx6 emulate weights AND activations (maia.MxFakeQuant); measured llama 0.99993/0.99578,
    # unet 0.99973/0.98196, hf 0.99996/0.99767
    "mx9": {"llama": 0.9998, "unet": 0.9995, "yolo": 0.9999, "hf": 0.9999},
    "mx6": {"llama": 0.993, "unet": 0.975, "yolo": 0.9999, "hf": 0.995},
}


@pytest.mark.parametrize("fmt", list(MX_MIN_COSINE))
def test_mx_formats_through_the_api_on_every_family(family, fmt):
    name, path = family
    r = _quantize(path, format=fmt)
    summary = r.report["accuracy"]["summary"]
    assert summary["min_output_cosine"] >= MX_MIN_COSINE[fmt][name], r.report["accuracy"]["outputs"]
    assert r.report["mx_layers"]  # the MX pass reports every weight it quantized


def test_llama_e4m3_per_channel_weight_ptq_reaches_0999(llama_tiny_onnx, tmp_path):
    # Issue 3's bar, on the E4M3 per-output-channel weight PTQ recipe (W8A16: every linear incl. lm_head stores
    # 1-byte E4M3 weights, activations stay FP32): logits cosine >= 0.999 vs FP32 (measured 0.99908 on 8 samples).
    r = _quantize(llama_tiny_onnx, format="fp8-e4m3", weights_only=True, eval_samples=8)
    assert r.report["accuracy"]["summary"]["quantized_layers"] == 15
    assert r.report["accuracy"]["outputs"]["logits"]["cosine"] >= 0.999
    assert r.report["accuracy"]["outputs"]["logits"]["top1_agree"] >= 0.9
    # lm_head kept in high precision, as vLLM / ModelOpt FP8 checkpoints do: more margin (measured 0.99939)
    r = _quantize(llama_tiny_onnx, format="fp8-e4m3", weights_only=True, exclude=["*lm_head*"], eval_samples=8)
    assert r.report["accuracy"]["summary"]["quantized_layers"] == 14
    assert r.report["accuracy"]["outputs"]["logits"]["cosine"] >= 0.9992


def test_llama_w8a8_error_is_the_e4m3_mantissa_not_the_calibration(llama_tiny_onnx):
    # W8A8 (activations in FP8 too) stays short of 0.999 on this random-weight model, whatever the calibration:
    # FP8's error is relative (3 mantissa bits), the scale only sets where saturation starts, and with no
    # clipping every method leaves the same per-tensor noise; each FP8 tensor costs about as much as its
    # weight (docs/benchmarks.md has the per-layer budget).
    cosines = {m: _quantize(llama_tiny_onnx, format="fp8-e4m3", method=m, eval_samples=8).report["accuracy"]["outputs"]["logits"]["cosine"]
               for m in ("minmax", "mse")}
    assert abs(cosines["minmax"] - cosines["mse"]) < 3e-4, cosines
    # measured 0.99742 (minmax) / 0.99751 (mse) on 8 held-out samples: a floor only, so a better recipe still passes
    assert all(c > 0.997 for c in cosines.values()), cosines
    # the production W8A8 recipe (linears only; attention matmuls and lm_head in high precision) gains ~45%
    # of the error back, still short of 0.999
    prod = _quantize(llama_tiny_onnx, format="fp8-e4m3", attention=False, exclude=["*lm_head*"], eval_samples=8)
    cos = prod.report["accuracy"]["outputs"]["logits"]["cosine"]
    assert 1 - cos < 0.7 * (1 - cosines["minmax"]) and cos >= 0.998, cos


def test_fp8_file_is_about_a_quarter_and_input_untouched(llama_tiny_onnx, tmp_path):
    from maia_onnx.quantize import quantize_model

    before = sha256_file(llama_tiny_onnx)
    out = tmp_path / "q.onnx"
    r = quantize_model(llama_tiny_onnx, out, format="fp8-e4m3", weights_only=True, evaluate=False, show_progress=False)
    assert sha256_file(llama_tiny_onnx) == before
    model = load_model(out)
    fp8 = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT8E4M3FN and v.const_value.size > 1]
    assert len(fp8) == 15  # 7 linears x 2 layers + lm_head
    # 1 byte per weight: the 15 linears hold 90112 parameters (embedding and norms stay FP32)
    assert sum(v.const_value.nbytes for v in fp8) == 90112
    assert r.report["sizes"]["ratio"] < 0.55  # of a 0.43 MB file, graph structure is a large share


def test_embedding_table_per_row_when_enabled():
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    emb (int64[2, 3] ids) => (float[2, 3, 8] y) {
       y = Gather(table, ids)
    }
    """
    table = (np.random.default_rng(6).standard_normal((20, 8)) * np.linspace(0.01, 10, 20)[:, None]).astype(np.float32)
    model = _model(text, {"table": table})
    assert not QuantizeFp8Pass()(model).modified  # off by default: Gather is not a compute op
    QuantizeFp8Pass(embeddings=True)(model)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dq.attributes["axis"].value == 0 and tuple(dq.inputs[1].shape) == (20,)
    ids = np.array([[0, 5, 19], [3, 3, 7]], np.int64)
    np.testing.assert_allclose(run_model(model, {"ids": ids})["y"], wq(table, 0)[ids], rtol=RTOL, atol=ATOL)


def test_second_run_leaves_quantized_model_alone(mlp):
    model, _, x = mlp
    QuantizeFp8Pass(activation_scales={"x": 3 / 448, "r": 9 / 448})(model)
    before = run_model(model, {"x": x})["y"]
    n_nodes = len(list(model.graph))
    # inputs that come out of DequantizeLinear are already quantized: nothing left to do
    assert find_targets(model) == []
    assert not QuantizeFp8Pass(activation_scales={"x": 1.0})(model).modified
    assert len(list(model.graph)) == n_nodes
    np.testing.assert_array_equal(run_model(model, {"x": x})["y"], before)


def test_api_on_in_memory_model_leaves_it_untouched(mlp):
    model, w, x = mlp
    before = [n.op_type for n in model.graph]
    r = _quantize(model, format="fp8-e4m3", method="mse", num_samples=4, eval_samples=2)
    assert [n.op_type for n in model.graph] == before
    np.testing.assert_array_equal(model.graph.initializers["W1"].const_value.numpy(), w["W1"])
    assert sum(n.op_type == "QuantizeLinear" for n in r.model.graph) == 2
    assert r.report["accuracy"]["outputs"]["y"]["cosine"] > 0.995
    assert set(r.activation_scales) == {"x", "r"}


# --- stock ONNX Runtime (default ORT_ENABLE_ALL) must compute the same FP8 model as the ONNX semantics -------------
# Its Level-2 rewrites ReluQuantFusion / ClipQuantFusion match Relu/Clip -> QuantizeLinear and assume an integer
# zero point: the first deletes the Relu (FP8 has no zero-point clipping), the second aborts on an FP8 zero point.


def _stock_and_exact(model: ir.Model, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    data = ir.to_proto(model).SerializeToString()
    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        outs.append(ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0])
    return outs[0], outs[1]


CLAMPED = """
<ir_version: 10, opset_import: ["" : 21]>
clamped (float[N, 16] x) => (float[N, 8] y) {
   lo = Constant <value = float {0.0}> ()
   hi = Constant <value = float {6.0}> ()
   h = MatMul(x, W1)
   r = ACTIVATION
   y = MatMul(r, W2)
}
"""


@pytest.mark.parametrize("activation,clamp,amax", [
    ("Relu(h)", lambda h: np.maximum(h, 0), 24.0),
    ("Clip(h, lo, hi)", lambda h: np.clip(h, 0, 6), 8.0),
    ("Clip(h, lo)", lambda h: np.maximum(h, 0), 24.0),
])
def test_relu_and_clip_before_fp8_qdq_survive_stock_ort_optimizations(activation, clamp, amax):
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((16, 32)) * 2).astype(np.float32)
    w2 = rng.standard_normal((32, 8)).astype(np.float32)
    model = _model(CLAMPED.replace("ACTIVATION", activation), {"W1": w1, "W2": w2})
    # Clip: 6 / (8/448) = 336 lies halfway between the E4M3 neighbours 320 and 352, so the bound itself rounds
    sx, sr = 4.0 / 448, amax / 448
    QuantizeFp8Pass(activation_scales={"x": sx, "r": sr})(model)
    quantized_inputs = {n.inputs[0].producer().op_type for n in model.graph
                        if n.op_type == "QuantizeLinear" and n.inputs[0].producer() is not None}
    assert quantized_inputs == {"MatMul"}  # Q reads the clamp's input; the clamp runs after the DQ
    # the original clamp (and its Constant bounds) are gone, not duplicated
    assert [n.op_type for n in model.graph if n.op_type in ("Relu", "Clip")] == [activation[:4]]
    constants = {n.outputs[0].name for n in model.graph if n.op_type == "Constant"}
    assert not constants & {b for b in ("lo", "hi") if b in activation}
    onnx.checker.check_model(ir.to_proto(model), full_check=True)

    x = rng.standard_normal((64, 16)).astype(np.float32)
    h = qdq(x, sx) @ wq(w1, 1)
    assert (h < 0).any() and (h > 6).any()  # both sides of the clamp are exercised
    expect = qdq(clamp(h), sr) @ wq(w2, 1)  # the ONNX semantics of the QDQ placed on the clamp's output
    stock, exact = _stock_and_exact(model, {"x": x})
    np.testing.assert_allclose(exact, expect, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stock, exact, rtol=RTOL, atol=ATOL)
    fp32 = clamp(x @ w1) @ w2
    assert np.abs(stock - fp32).max() <= 0.1 * np.abs(fp32).max()


def test_quantized_conv_relu_net_matches_in_stock_ort_and_fp32(tmp_path):
    from maia_onnx.ortutil import compare
    from maia_onnx.quantize import quantize_model

    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    net (float[N, 3, 12, 12] img) => (float[N, 4] y) {
       c1 = Conv <pads = [1, 1, 1, 1]> (img, K1, B1)
       r1 = Relu(c1)
       c2 = Conv <pads = [1, 1, 1, 1]> (r1, K2, B2)
       r2 = Relu(c2)
       p = GlobalAveragePool(r2)
       f = Flatten(p)
       g = Gemm <transB = 1> (f, W, b)
       y = Relu(g)
    }
    """
    rng = np.random.default_rng(4)
    weights = {"K1": rng.standard_normal((8, 3, 3, 3)), "B1": rng.standard_normal(8), "K2": rng.standard_normal((8, 8, 3, 3)) / 4,
               "B2": rng.standard_normal(8), "W": rng.standard_normal((4, 8)), "b": rng.standard_normal(4)}
    model = _model(text, {k: v.astype(np.float32) for k, v in weights.items()})
    save_model(model, tmp_path / "net.onnx")
    np.savez(tmp_path / "calib.npz", img=rng.standard_normal((8, 1, 3, 12, 12)).astype(np.float32))
    r = quantize_model(str(tmp_path / "net.onnx"), str(tmp_path / "q.onnx"), calib=str(tmp_path / "calib.npz"),
                       evaluate=False, show_progress=False)
    assert set(r.activation_scales) == {"img", "r1", "f"}
    img = rng.standard_normal((4, 3, 12, 12)).astype(np.float32)
    stock, exact = _stock_and_exact(load_model(tmp_path / "q.onnx"), {"img": img})
    np.testing.assert_allclose(stock, exact, rtol=RTOL, atol=ATOL)
    fp32 = run_model(model, {"img": img})["y"]
    assert (fp32 == 0).any()  # the final Relu clips some outputs
    assert compare(fp32, stock)["cosine"] >= 0.999


def test_emitted_scales_include_the_input_scale_of_a_layer_after_relu(tmp_path):
    import json

    from maia_onnx.quantize import quantize_model

    rng = np.random.default_rng(8)
    model = _model(CLAMPED.replace("ACTIVATION", "Relu(h)"), {"W1": rng.standard_normal((16, 32)).astype(np.float32),
                                                            "W2": rng.standard_normal((32, 8)).astype(np.float32)})
    r = quantize_model(model, None, calib="random", num_samples=4, evaluate=False, show_progress=False,
                       emit_scales=tmp_path / "scales.json")
    emitted = json.loads((tmp_path / "scales.json").read_text())
    input_scales = sorted(v for k, v in emitted.items() if k.endswith(".input_scale"))
    # both layers' static activation scales, the second one read through the DQ -> Relu placement
    assert len(input_scales) == 2
    np.testing.assert_allclose(input_scales, sorted(r.activation_scales.values()), rtol=1e-6)
