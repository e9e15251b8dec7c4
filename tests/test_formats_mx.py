"""Numerics of the OCP MX and Maia mx9/mx6 NumPy reference (maia_onnx/formats/mx.py) on hand-worked values."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from maia_onnx.formats.mx import (
    MX_FORMATS,
    e8m0_to_float,
    fake_quant_mx,
    fake_quant_mx6,
    fake_quant_mx9,
    mx_dequantize,
    mx_quantize,
    mx_shared_exponents,
    saturate_cast,
)


def block(values, size=32):
    out = np.zeros(size, np.float32)
    out[: len(values)] = values
    return out


def test_mxfp8_e4m3_scale_is_floor_log2_amax_minus_emax():
    x = block([3.0, 1.0, -0.5])
    elems, exps = mx_quantize(x, "mxfp8-e4m3")
    assert exps.tolist() == [1 - 8 + 127]  # floor(log2 3) = 1, emax(E4M3) = 8
    assert elems.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(elems.astype(np.float32)[:3], [384.0, 128.0, -64.0])
    np.testing.assert_array_equal(mx_dequantize(elems, exps, "mxfp8-e4m3"), x)


def test_mxfp8_e4m3_saturates_instead_of_nan():
    # amax 500 -> X = 2^(8-8) = 1, 500 is above E4M3's 448: must clamp, a plain astype gives NaN.
    x = block([500.0, -500.0, 1.0])
    elems, exps = mx_quantize(x, "mxfp8-e4m3")
    assert exps.tolist() == [127]
    np.testing.assert_array_equal(elems.astype(np.float32)[:3], [448.0, -448.0, 1.0])
    # ...which is what a plain ml_dtypes cast does to the same value
    assert np.isnan(np.array([500.0], np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))[0]


def test_mxfp8_rounds_to_nearest_even():
    # With amax 448 (X = 2^0 ... floor(log2 448) = 8 -> X = 1) the E4M3 grid at 1.0 is 0.125 wide.
    x = block([448.0, 1.0625, 1.1875, -1.0625])
    elems, _ = mx_quantize(x, "mxfp8-e4m3")
    np.testing.assert_array_equal(elems.astype(np.float32)[:4], [448.0, 1.0, 1.25, -1.0])


def test_mxfp8_e5m2_emax_15():
    x = block([1.0, 0.75])
    elems, exps = mx_quantize(x, "mxfp8-e5m2")
    assert exps.tolist() == [0 - 15 + 127]
    np.testing.assert_array_equal(elems.astype(np.float32)[:2], [32768.0, 24576.0])


def test_mxint8_implicit_two_to_minus_six():
    x = block([1.0, 0.3, -1.99])
    elems, exps = mx_quantize(x, "mxint8")
    assert exps.tolist() == [127]  # floor(log2 1.99) = 0, emax 0
    assert elems.dtype == np.int8
    # 0.3 * 64 = 19.2 -> 19; 1.99 * 64 = 127.36 -> 127 (clamped range +-127)
    assert elems[:3].tolist() == [64, 19, -127]
    np.testing.assert_allclose(mx_dequantize(elems, exps, "mxint8")[:3], [1.0, 19 / 64, -127 / 64])


def test_mxfp4_grid_and_saturation():
    # amax 6 -> floor(log2 6) = 2 = emax -> X = 1; the E2M1 grid is 0, .5, 1, 1.5, 2, 3, 4, 6
    x = block([6.0, 2.5, 0.25, 5.0, -0.75, 3.5])
    elems, exps = mx_quantize(x, "mxfp4")
    assert exps.tolist() == [127]
    assert elems.dtype == ml_dtypes.float4_e2m1fn
    # ties go to even mantissa: 2.5 -> 2, 0.25 -> 0, 5 -> 4, 0.75 -> 1 (1.0 has even mantissa), 3.5 -> 4
    np.testing.assert_array_equal(elems.astype(np.float32)[:6], [6.0, 2.0, 0.0, 4.0, -1.0, 4.0])
    # amax 7.9 -> X = 2^(2-2) = 1, 7.9 saturates at 6
    elems, _ = mx_quantize(block([7.9]), "mxfp4")
    assert float(elems[0].astype(np.float32)) == 6.0


def test_zero_and_nan_blocks():
    x = np.concatenate([np.zeros(32, np.float32), block([1.0, np.nan])])
    elems, exps = mx_quantize(x, "mxfp8-e4m3")
    assert exps.tolist() == [0, 255]
    y = mx_dequantize(elems, exps, "mxfp8-e4m3")
    assert np.all(y[:32] == 0) and np.all(np.isnan(y[32:]))
    assert np.isnan(e8m0_to_float(np.array([255], np.uint8))[0])
    assert e8m0_to_float(np.array([0], np.uint8))[0] == np.float32(2.0**-127)


def test_blocks_follow_axis_and_short_last_block():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 3)).astype(np.float32)
    elems, exps = mx_quantize(x, "mxfp8-e4m3", axis=0)
    assert elems.shape == (40, 3) and exps.shape == (2, 3)
    # each column / block is independent: quantising one column alone gives the same answer
    for col in range(3):
        e_col, s_col = mx_quantize(x[:, col], "mxfp8-e4m3", axis=0)
        np.testing.assert_array_equal(s_col, exps[:, col])
        np.testing.assert_array_equal(e_col.astype(np.float32), elems[:, col].astype(np.float32))
    expected_first = np.floor(np.log2(np.abs(x[:32]).max(axis=0))).astype(int) - 8 + 127
    np.testing.assert_array_equal(exps[0], expected_first)
    np.testing.assert_array_equal(exps[1], np.floor(np.log2(np.abs(x[32:]).max(axis=0))).astype(int) - 8 + 127)
    np.testing.assert_array_equal(mx_shared_exponents(x, "mxfp8-e4m3", axis=0), exps)


def test_mx9_micro_exponent_and_mantissa():
    x = np.zeros(16, np.float32)
    x[:4] = [1.5, 0.01, 0.3, 0.2]
    y = fake_quant_mx9(x)
    # block E = 0; sub-block 0 keeps E (step 2^-6); sub-block 1 (amax 0.3 < 1) uses E-1 (step 2^-7)
    np.testing.assert_array_equal(y[:4], np.float32([1.5, 1 / 64, 38 / 128, 26 / 128]))
    assert np.all(y[4:] == 0)


def test_mx6_micro_exponent_and_saturation():
    x = np.zeros(16, np.float32)
    x[:4] = [1.99, -0.3, 0.3, 0.2]
    y = fake_quant_mx6(x)
    # E = 0, step 2^-3: 1.99 -> 16 steps saturates at 15 -> 1.875; -0.3 -> -2.4 -> -2 -> -0.25
    # sub-block 1 at E-1, step 2^-4: 0.3 -> 4.8 -> 5 -> 0.3125; 0.2 -> 3.2 -> 3 -> 0.1875
    np.testing.assert_array_equal(y[:4], np.float32([1.875, -0.25, 0.3125, 0.1875]))


def test_sqnr_ordering_on_gaussian_weights():
    x = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)

    def sqnr(y):
        return 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x - y).astype(np.float64) ** 2))

    s = {f: sqnr(fake_quant_mx(x, f, axis=0)) for f in MX_FORMATS}
    s["mx9"] = sqnr(fake_quant_mx9(x, axis=0))
    s["mx6"] = sqnr(fake_quant_mx6(x, axis=0))
    # more mantissa bits -> more SQNR (about 6 dB per bit)
    assert s["mx9"] > s["mxint8"] > s["mxfp8-e4m3"] > s["mxfp8-e5m2"] > s["mxfp4"]
    assert s["mx9"] > s["mx6"] > s["mxfp4"]
    assert 28 < s["mxfp8-e4m3"] < 33 and 16 < s["mxfp4"] < 21 and 44 < s["mx9"] < 50


finite_arrays = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 3), st.integers(1, 70)),
    elements=st.floats(-1e4, 1e4, width=32, allow_nan=False),
)


@settings(max_examples=40, deadline=None)
@given(finite_arrays, st.sampled_from(list(MX_FORMATS) + ["mx9", "mx6"]))
def test_fake_quant_is_idempotent_and_bounded(x, fmt):
    fq = {"mx9": fake_quant_mx9, "mx6": fake_quant_mx6}.get(fmt) or (lambda a, axis: fake_quant_mx(a, fmt, axis))
    y = fq(x, axis=1)
    assert y.shape == x.shape and np.all(np.isfinite(y))
    np.testing.assert_array_equal(fq(y, axis=1), y)
    # the shared scale never lets a value grow past its block's amax rounded up by one element step
    assert np.all(np.abs(y) <= np.abs(x).max() * 1.5 + 1e-30)


@pytest.mark.parametrize("fmt", list(MX_FORMATS))
def test_dequantize_matches_manual_scale(fmt):
    x = np.random.default_rng(3).standard_normal((64, 4)).astype(np.float32) * 5
    elems, exps = mx_quantize(x, fmt, axis=0)
    manual = elems.astype(np.float32) * np.repeat(2.0 ** (exps.astype(np.float64) - 127), 32, axis=0)
    if fmt == "mxint8":
        manual = manual / 64
    np.testing.assert_array_equal(mx_dequantize(elems, exps, fmt, axis=0), manual.astype(np.float32))


@pytest.mark.parametrize("dtype, max_value", [(ml_dtypes.float4_e2m1fn, 6.0), (ml_dtypes.float8_e4m3fn, 448.0),
                                              (ml_dtypes.float8_e5m2, 57344.0)])
def test_saturate_cast_of_float32_equals_the_float64_formula(dtype, max_value):
    """float32 input is clipped in float32: bit-identical to clipping in float64 on every value near the grid."""
    old = lambda v: np.clip(np.asarray(v, np.float64), -max_value, max_value).astype(dtype)  # noqa: E731
    codes = np.arange(16 if dtype == ml_dtypes.float4_e2m1fn else 256, dtype=np.uint8)
    grid = np.unique(np.abs(codes.view(dtype).astype(np.float32)))
    grid = grid[np.isfinite(grid)]
    # grid points, the ties between them and past the bound, each with its 64 float32 neighbours on either side
    centres = np.concatenate([grid, (grid[:-1] + grid[1:]) / 2, [max_value * 1.5, max_value * 2]]).astype(np.float32)
    near = (centres.view(np.int32)[:, None] + np.arange(-64, 65, dtype=np.int32)).reshape(-1)
    near = near[near >= 0].view(np.float32)
    rng = np.random.default_rng(0)
    x = np.concatenate([
        near, -near,
        rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32),  # every exponent, NaNs
        rng.uniform(-2 * max_value, 2 * max_value, 1 << 16).astype(np.float32),
        np.float32([0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38]),
    ]).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN into E2M1 (which has none) warns on either path
        got = saturate_cast(x, dtype, max_value)
        assert got.dtype == dtype and got.shape == x.shape
        np.testing.assert_array_equal(got.view(np.uint8), old(x).view(np.uint8))
        x64 = x.astype(np.float64) * (1 + 2.0**-40)  # float64 input stays on the float64 path: values between float32s
        np.testing.assert_array_equal(saturate_cast(x64, dtype, max_value).view(np.uint8), old(x64).view(np.uint8))
        np.testing.assert_array_equal(saturate_cast(x, dtype, 5.9).view(np.uint8),  # a bound float32 cannot hold
                                      np.clip(x.astype(np.float64), -5.9, 5.9).astype(dtype).view(np.uint8))
