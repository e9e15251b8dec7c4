"""Triton FP8/MX kernels vs the NumPy reference in maia_onnx.formats: bit-exact (de)quantization, fused matmul
within FP32-accumulation tolerance.  Runs under TRITON_INTERPRET=1 on CPU (set by conftest) or natively on CUDA."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from maia_onnx.formats import fp8 as ref_fp8  # noqa: E402
from maia_onnx.formats import mx as ref_mx  # noqa: E402
from maia_onnx.runtime import kernels  # noqa: E402

if not kernels.available(allow_interpreter=True):
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

BF16 = np.dtype(ml_dtypes.bfloat16)


def bits(a: np.ndarray) -> np.ndarray:
    """Raw bit patterns (so NaN payloads, signed zeros and subnormals are all compared)."""
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape
    g, w = bits(got), bits(want)
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, f"{bad.size} mismatches, first at {bad[:5]}: got {g.flat[bad[:5]]} want {w.flat[bad[:5]]}"


def edge_tensor(shape, seed=0) -> np.ndarray:
    """Wide dynamic range plus NaN (both signs), +-Inf, +-0, float32 subnormals, values beyond every format's max,
    exact ties, an all-zero row and a row of tiny values."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-40, 40, shape))
    x = x.astype(np.float32)
    flat = x.reshape(-1)
    specials = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -3e-42, 1e-39, 3.4e38, -1e6, 464.0, 480.0,
                61440.0, -57344.0, 0.0009765625, 0.0029296875, 2.0**-10, 2.0**-17, 5.0, 0.25, 0.75, 100000.0]
    flat[: len(specials)] = np.array(specials, dtype=np.float32)
    if len(shape) == 2 and shape[0] > 3:
        x[2, :] = 0.0
        x[3, :] = 1e-44
        x[:, 30] = 0.0  # zero blocks along axis 0 as well
        x[:, 31] = -1e-42
    return x


# ---------------------------------------------------------------------------------------------- FP8
SCALE_CASES = [
    ("per-tensor", None, None),
    ("per-channel axis 1", 1, None),
    ("per-channel axis 0", 0, None),
    ("blocked axis 1 bs 32", 1, 32),
    ("blocked axis 0 bs 16", 0, 16),
]


def make_scale(shape, axis, block_size, rng):
    if axis is None:
        return np.float32(0.37)
    if block_size is None:
        return (rng.random(shape[axis]) * 2 + 0.01).astype(np.float32)
    s = list(shape)
    s[axis] = -(-shape[axis] // block_size)
    return (rng.random(s) * 2 + 0.01).astype(np.float32)


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("name,axis,block_size", SCALE_CASES)
@pytest.mark.parametrize("in_dtype", [np.float32, BF16])
def test_quantize_fp8_bit_exact(fmt, name, axis, block_size, in_dtype):
    shape = (37, 70)  # neither dim a multiple of the block
    x = edge_tensor(shape).astype(in_dtype)
    scale = make_scale(shape, axis, block_size, np.random.default_rng(1))
    got = kernels.quantize_fp8(x, scale, fmt, axis, block_size)
    want = ref_fp8.quantize_fp8(x.astype(np.float32), scale, fmt, axis, block_size)
    assert_same_bits(got, want)


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("name,axis,block_size", SCALE_CASES)
@pytest.mark.parametrize("out_dtype", [np.float32, BF16])
def test_dequantize_fp8_bit_exact(fmt, name, axis, block_size, out_dtype):
    shape = (37, 70)
    f = ref_fp8.get_fp8_format(fmt)
    rng = np.random.default_rng(2)
    q = rng.integers(0, 256, shape, dtype=np.uint8)
    q.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)  # every code, NaN/Inf/subnormals included
    q = q.view(f.np_dtype)
    scale = make_scale(shape, axis, block_size, rng)
    got = kernels.dequantize_fp8(q, scale, axis, block_size, out_dtype)
    want = ref_fp8.dequantize_fp8(q, scale, axis, block_size, out_dtype)
    assert_same_bits(got, want)


def test_fp8_roundtrip_3d_middle_axis_and_torch_io():
    x = edge_tensor((3, 50, 5), seed=3)
    scale = (np.random.default_rng(4).random((3, 2, 5)) + 0.1).astype(np.float32)
    q = kernels.quantize_fp8(torch.from_numpy(x), torch.from_numpy(scale), "e4m3fn", 1, 32)
    assert isinstance(q, torch.Tensor) and q.dtype == torch.uint8
    want = ref_fp8.quantize_fp8(x, scale, "e4m3fn", 1, 32)
    assert_same_bits(q.cpu().numpy(), bits(want))
    deq = kernels.dequantize_fp8(q, torch.from_numpy(scale), 1, 32, torch.float32, fmt="e4m3fn")
    assert_same_bits(deq.cpu().numpy(), ref_fp8.dequantize_fp8(want, scale, 1, 32))


def test_fp8_saturates_and_keeps_nan_sign():
    x = np.array([1000.0, -1e30, np.inf, -np.inf, np.nan, -np.nan, 448.0, 464.0, 465.0], dtype=np.float32)
    q = bits(kernels.quantize_fp8(x, np.float32(1.0), "e4m3fn"))
    # 464 is the tie between 448 (0x7E) and the NaN slot: saturates; 465 too.
    assert q.tolist() == [0x7E, 0xFE, 0x7E, 0xFE, 0x7F, 0xFF, 0x7E, 0x7E, 0x7E]


# ----------------------------------------------------------------------------------------------- MX
MX_FORMATS = list(ref_mx.MX_FORMATS)


@pytest.mark.parametrize("fmt", MX_FORMATS)
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("in_dtype", [np.float32, BF16])
def test_mx_quantize_bit_exact(fmt, axis, in_dtype):
    x = edge_tensor((37, 70), seed=5).astype(in_dtype)
    x_f32 = x.astype(np.float32)
    x_f32_rows = x_f32.copy()
    x_f32_rows[7, :40] = 3e38  # a block whose scale hits the top of the E8M0 range
    x_in = x_f32_rows.astype(in_dtype)
    got_e, got_s = kernels.mx_quantize(x_in, fmt, axis)
    want_e, want_s = ref_mx.mx_quantize(x_in.astype(np.float32), fmt, axis)
    assert_same_bits(got_s, np.ascontiguousarray(want_s))
    assert_same_bits(got_e, np.ascontiguousarray(want_e))
    assert (want_s == 255).any() and (want_s == 0).any()  # NaN blocks and all-zero blocks were exercised


@pytest.mark.parametrize("fmt", MX_FORMATS)
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("out_dtype", [np.float32, BF16])
def test_mx_dequantize_bit_exact(fmt, axis, out_dtype):
    f = ref_mx.mx_format(fmt)
    rng = np.random.default_rng(6)
    shape = (37, 70)
    if f.element_dtype == np.int8:
        elems = rng.integers(-128, 128, shape, dtype=np.int16).astype(np.int8)
    else:
        codes = rng.integers(0, 16 if f.bits == 4 else 256, shape, dtype=np.uint8)
        elems = codes.view(f.element_dtype)
    exp_shape = list(shape)
    exp_shape[axis] = -(-shape[axis] // 32)
    exps = rng.integers(0, 256, exp_shape, dtype=np.uint8)
    exps.reshape(-1)[:4] = [0, 1, 254, 255]  # subnormal scales, the largest scale, NaN
    got = kernels.mx_dequantize(elems, exps, fmt, axis, 32, out_dtype)
    want = ref_mx.mx_dequantize(elems, exps, fmt, axis, 32, out_dtype)
    assert_same_bits(got, np.ascontiguousarray(want))


def test_mx_odd_block_size_and_3d():
    x = edge_tensor((4, 45, 3), seed=7)
    got_e, got_s = kernels.mx_quantize(x, "mxfp8-e4m3", axis=1, block_size=12)
    want_e, want_s = ref_mx.mx_quantize(x, "mxfp8-e4m3", axis=1, block_size=12)
    assert_same_bits(got_s, np.ascontiguousarray(want_s))
    assert_same_bits(got_e, np.ascontiguousarray(want_e))
    got = kernels.mx_dequantize(want_e, want_s, "mxfp8-e4m3", 1, 12)
    assert_same_bits(got, np.ascontiguousarray(ref_mx.mx_dequantize(want_e, want_s, "mxfp8-e4m3", 1, 12)))


# ------------------------------------------------------------------------------------------- matmul
def assert_matmul_close(got: np.ndarray, a: np.ndarray, w_deq: np.ndarray, want: np.ndarray) -> None:
    """|got - want| <= (K + 2) * 2^-24 * (|a| @ |w|): the worst case of an FP32-accumulated dot of length K
    plus the FP32 rounding of the dequantized weight (the reference is float64)."""
    K = a.shape[-1]
    bound = (K + 2) * 2.0**-24 * (np.abs(a.astype(np.float64)) @ np.abs(w_deq.astype(np.float64))) + 1e-30
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"
    assert np.max(np.abs(want)) > 0


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("name,axis,block_size", [
    ("per-tensor", None, None), ("per-output-channel", 1, None), ("per-input-row", 0, None),
    ("blocked along K", 0, 32), ("blocked along N", 1, 16),
])
@pytest.mark.parametrize("act_dtype", [np.float32, BF16])
def test_fp8_matmul(fmt, name, axis, block_size, act_dtype):
    rng = np.random.default_rng(8)
    M, K, N = 5, 80, 40  # not multiples of the tiles or of the block
    a = rng.standard_normal((M, K)).astype(act_dtype)
    w = rng.standard_normal((K, N)).astype(np.float32)
    scale = make_scale((K, N), axis, block_size, rng) * np.float32(0.01)
    q = ref_fp8.quantize_fp8(w, scale, fmt, axis, block_size)
    got = kernels.fp8_matmul(a, q, scale, axis, block_size)
    assert got.shape == (M, N) and got.dtype == np.float32
    want = kernels.reference_fp8_matmul(a.astype(np.float32), q, scale, axis, block_size)
    assert_matmul_close(got, a, ref_fp8.dequantize_fp8(q, scale, axis, block_size), want)


@pytest.mark.parametrize("fmt", MX_FORMATS)
@pytest.mark.parametrize("axis", [0, 1])
def test_mx_matmul(fmt, axis):
    rng = np.random.default_rng(9)
    a = rng.standard_normal((2, 3, 70)).astype(np.float32)  # leading batch dims, K not a multiple of 32
    w = rng.standard_normal((70, 33)).astype(np.float32) * np.exp2(rng.integers(-8, 8, (70, 33))).astype(np.float32)
    elems, exps = ref_mx.mx_quantize(w, fmt, axis)
    got = kernels.mx_matmul(a, elems, exps, fmt, axis)
    assert got.shape == (2, 3, 33)
    want = kernels.reference_mx_matmul(a, elems, exps, fmt, axis)
    assert_matmul_close(got, a, ref_mx.mx_dequantize(elems, exps, fmt, axis), want)


def test_matmul_bf16_output_and_torch_io():
    rng = np.random.default_rng(10)
    a = torch.from_numpy(rng.standard_normal((16, 64)).astype(np.float32)).to(torch.bfloat16)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    scale = (np.abs(w).max(0) / 448).astype(np.float32)
    q = ref_fp8.quantize_fp8(w, scale, "e4m3fn", 1)
    got = kernels.fp8_matmul(a, q, scale, 1, out_dtype=torch.bfloat16)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16
    a_np = a.float().numpy()
    want = kernels.reference_fp8_matmul(a_np, q, scale, 1)
    # FP32 result rounded once to BF16 (RNE): within half a BF16 ulp (<= 2^-8 relative) plus the accumulation bound
    bound = 2.0**-8 * np.abs(want) + 66 * 2.0**-24 * (np.abs(a_np) @ np.abs(ref_fp8.dequantize_fp8(q, scale, 1)))
    assert np.all(np.abs(got.float().cpu().numpy() - want) <= bound)


def test_available_matches_environment():
    from maia_onnx.runtime.kernels._launch import interpreting

    assert kernels.available() == (not interpreting() and torch.cuda.is_available())
    assert kernels.available(allow_interpreter=True)


def test_select_falls_back_to_the_reference_without_a_gpu():
    from maia_onnx.formats.fp8 import dequantize_fp8 as reference

    chosen = kernels.select("dequantize_fp8")
    if kernels.available():
        assert chosen is kernels.dequantize_fp8
    else:
        assert chosen is reference
    with pytest.raises(ValueError):
        kernels.select("nope")
