"""Bit-exactness of the fast FP8 conversion against an exact reference, ml_dtypes and ORT QuantizeLinear."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from maia_onnx.formats.fp8 import (
    FP8_E4M3FN,
    FP8_E5M2,
    cast_fp8_saturate,
    dequantize_fp8,
    float32_to_fp8_codes,
    fp8_amax_scale,
    fp8_codes_reference,
    get_fp8_format,
    quantize_fp8,
)

FORMATS = ["e4m3fn", "e5m2"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_top16_pattern_matches_reference(fmt):
    # every sign/exponent/top-7-mantissa pattern, with low halves that hit exact ties and sticky bits
    hi = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    for low in (0, 1, 0x7FFF, 0x8000, 0xFFFF):
        x = (hi | np.uint32(low)).view(np.float32)
        np.testing.assert_array_equal(float32_to_fp8_codes(x, fmt), fp8_codes_reference(x, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_bit_patterns_match_reference(fmt):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2**32, size=1 << 18, dtype=np.uint64).astype(np.uint32).view(np.float32)
    np.testing.assert_array_equal(float32_to_fp8_codes(x, fmt), fp8_codes_reference(x, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_in_range_values_match_ml_dtypes(fmt):
    spec = get_fp8_format(fmt)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(1 << 16) * rng.choice([1e-4, 1e-2, 1, 100], 1 << 16)).astype(np.float32)
    x = x[np.abs(x) <= spec.max]
    np.testing.assert_array_equal(float32_to_fp8_codes(x, fmt), x.astype(spec.np_dtype).view(np.uint8))


@pytest.mark.parametrize("spec", [FP8_E4M3FN, FP8_E5M2])
def test_saturation_specials_and_ties(spec):
    mx = spec.max
    x = np.array([np.inf, -np.inf, 1e30, -1e30, mx * 1.06, np.nan, -0.0, 0.0], dtype=np.float32)
    got = cast_fp8_saturate(x, spec).view(np.uint8)
    assert list(got[:5]) == [spec.max_code, 0x80 | spec.max_code, spec.max_code, 0x80 | spec.max_code, spec.max_code]
    assert got[5] & 0x7F == spec.nan_code
    assert list(got[6:]) == [0x80, 0x00]
    # half the smallest subnormal is a tie that rounds to zero (even); just above rounds to the subnormal
    tiny = spec.min_subnormal
    ties = np.array([tiny / 2, np.nextafter(np.float32(tiny / 2), np.float32(1)), 1.5 * tiny, 2.5 * tiny], dtype=np.float32)
    assert list(cast_fp8_saturate(ties, spec).view(np.uint8)) == [0, 1, 2, 2]
    # 1 + half an ulp ties down to 1.0 (even), 1 + 3/2 ulp ties up
    ulp = 2.0 ** -spec.mantissa_bits
    vals = cast_fp8_saturate(np.array([1 + ulp / 2, 1 + 1.5 * ulp], np.float32), spec).astype(np.float32)
    np.testing.assert_array_equal(vals, [1.0, 1 + 2 * ulp])


def test_parallel_path_matches_small_chunks():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(3 * (1 << 20) + 17) * 300).astype(np.float32)
    np.testing.assert_array_equal(float32_to_fp8_codes(x), fp8_codes_reference(x))


def _ort_qdq(x, scale, fmt, axis=None, block_size=None, opset=21):
    """Run QuantizeLinear -> DequantizeLinear in ORT and return the float result."""
    elem = TensorProto.FLOAT8E4M3FN if fmt == "e4m3fn" else TensorProto.FLOAT8E5M2
    scale = np.asarray(scale, np.float32)
    zero = np.zeros(scale.shape, dtype=get_fp8_format(fmt).np_dtype)
    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if block_size:
        attrs["block_size"] = block_size
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
    ]
    z = helper.make_tensor("z", elem, list(zero.shape), zero.view(np.uint8).tobytes(), raw=True)
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [onnx.numpy_helper.from_array(scale, "s"), z],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["tensor", "axis0", "axis1", "block"])
def test_quantize_dequantize_bit_exact_vs_ort(fmt, mode):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((64, 96)) * rng.uniform(0.01, 10, (64, 1))).astype(np.float32)
    x[0, :3] = [1e9, -1e9, 0.0]
    spec = get_fp8_format(fmt)
    if mode == "tensor":
        scale, axis, block = fp8_amax_scale(np.abs(x).max() / 4, spec), None, None
    elif mode == "axis0":
        scale, axis, block = fp8_amax_scale(np.abs(x).max(axis=1), spec), 0, None
    elif mode == "axis1":
        scale, axis, block = fp8_amax_scale(np.abs(x).max(axis=0), spec), 1, None
    else:
        block = 32
        scale = fp8_amax_scale(np.abs(x.reshape(64, 3, 32)).max(axis=2), spec)
        axis = 1
    q = quantize_fp8(x, scale, spec, axis=axis, block_size=block)
    assert q.dtype == spec.np_dtype and q.nbytes == x.size
    ours = dequantize_fp8(q, scale, axis=axis, block_size=block)
    np.testing.assert_array_equal(ours, _ort_qdq(x, scale, fmt, axis, block))


def test_blocked_quantize_large_tensor_parallel_matches_reference():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1024, 1536)).astype(np.float32)
    scale = fp8_amax_scale(np.abs(x.reshape(32, 32, 1536)).max(axis=1))  # blocks along axis 0
    q = quantize_fp8(x, scale, axis=0, block_size=32)
    expect = fp8_codes_reference(x / np.repeat(scale, 32, axis=0))
    np.testing.assert_array_equal(q.view(np.uint8), expect)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_all_codes(fmt):
    spec = get_fp8_format(fmt)
    codes = np.arange(256, dtype=np.uint8).view(spec.np_dtype)
    got = dequantize_fp8(codes, np.float32(2.0))
    expect = codes.astype(np.float32) * 2
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expect))
    finite = ~np.isnan(expect)
    np.testing.assert_array_equal(got[finite], expect[finite])


def test_amax_scale_and_errors():
    np.testing.assert_allclose(fp8_amax_scale([448.0, 0.0, 57344.0]), [1.0, 1.0, 128.0])
    np.testing.assert_allclose(fp8_amax_scale(57344.0, "e5m2"), 1.0)
    with pytest.raises(ValueError):
        get_fp8_format("e3m4")
    with pytest.raises(ValueError):
        quantize_fp8(np.ones((4, 4), np.float32), np.ones(3, np.float32), axis=0)
    assert ml_dtypes.float8_e4m3fn(quantize_fp8(np.float32(1000.0), 1.0)) == 448


def test_flush_to_zero_mode_does_not_change_codes():
    # libraries (torch, MKL) may switch the thread to flush-denormals; FP8 subnormals must stay exact
    torch = pytest.importorskip("torch")
    x = (np.arange(1, 2000, dtype=np.float32) * np.float32(2.0**-12)).astype(np.float32)
    expect = fp8_codes_reference(x)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        np.testing.assert_array_equal(float32_to_fp8_codes(x), expect)
    finally:
        torch.set_flush_denormal(False)
