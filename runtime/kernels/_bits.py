"""Triton device functions that decode and encode FP8/FP4/INT8/E8M0/BF16 bit patterns with integer ops.

Everything is done on integer bit patterns (never with the hardware float8 conversions) so the very same
code gives the same bits under ``TRITON_INTERPRET=1`` on the CPU and compiled on a GPU, and matches the
NumPy reference in ``maia_onnx.formats`` bit for bit: round-to-nearest-even, saturation to +-max,
NaN kept with its sign, subnormals exact.

Element codes (the ``ELEM`` constexpr): 0 FP8 E4M3FN, 1 FP8 E5M2, 2 INT8, 3 FP4 E2M1 (one code per byte,
low nibble, as ``ml_dtypes.float4_e2m1fn`` stores it).
"""

from __future__ import annotations

import triton
import triton.language as tl

ELEM_E4M3FN = 0
ELEM_E5M2 = 1
ELEM_INT8 = 2
ELEM_FP4 = 3


@triton.jit
def with_sign(mag, b, SIGN_BIT: tl.constexpr):
    """Magnitude (float32 >= 0) with the sign bit of code ``b`` set by bit operations (so -0 stays -0)."""
    sign = ((b >> SIGN_BIT) & 1) << 31
    return (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def decode_element(b, ELEM: tl.constexpr, NATIVE: tl.constexpr):
    """Element code (int32 0..255, or the int8 value for INT8) -> exact float32 value (no scale).

    NaN codes decode to 0x7FC00000 with the code's sign, as the reference's ml_dtypes casts do.
    ``NATIVE`` uses the GPU's FP8 conversion instructions (exact); otherwise integer bit tricks.
    """
    if ELEM == 0:
        if NATIVE:
            v = b.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            # E4M3FN bits placed in an FP16's exponent/mantissa field give value * 2^-8 (normal and
            # subnormal alike, since the exponent biases differ by 8); FP16 -> FP32 is exact.
            mag = ((b & 0x7F) << 7).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
            v = with_sign(mag, b, 7)
        nan_bits = ((b & 0x80) << 24) | 0x7FC00000
        v = tl.where((b & 0x7F) == 0x7F, nan_bits.to(tl.float32, bitcast=True), v)
    elif ELEM == 1:
        if NATIVE:
            v = b.to(tl.uint8).to(tl.float8e5, bitcast=True).to(tl.float32)
        else:
            # E5M2 is the top byte of an FP16 (Inf included).
            mag = ((b & 0x7F) << 8).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            v = with_sign(mag, b, 7)
        nan_bits = ((b & 0x80) << 24) | 0x7FC00000
        v = tl.where((b & 0x7F) > 0x7C, nan_bits.to(tl.float32, bitcast=True), v)
    elif ELEM == 2:
        v = b.to(tl.float32)
    else:
        e = (b >> 1) & 3
        m = b & 1
        normal = ((e + 126) << 23 | (m << 22)).to(tl.float32, bitcast=True)
        v = with_sign(tl.where(e == 0, m.to(tl.float32) * 0.5, normal), b, 3)
    return v


@triton.jit
def encode_fp4(v):
    """float32 -> FP4 E2M1 code: RNE on the grid 0, .5, 1, 1.5, 2, 3, 4, 6 (ties to the even code), saturating;
    NaN -> 0x8 (+NaN) / 0x0 (-NaN), which is what the reference's ml_dtypes cast writes."""
    a = tl.abs(v)
    code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
            + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
    negative = v.to(tl.int32, bitcast=True) < 0
    code = tl.where(negative, code | 8, code)
    return tl.where(v != v, tl.where(negative, 0, 8), code)


@triton.jit
def encode_fp8(y, E5M2: tl.constexpr, NAN_POS: tl.constexpr, NAN_NEG: tl.constexpr, NATIVE: tl.constexpr):
    """float32 -> FP8 code (int32): saturating RNE, NaN -> NAN_POS/NAN_NEG by its sign bit.

    ``NATIVE``: the GPU's ``cvt.rn.satfinite`` (RNE, finite values and Inf saturate to +-max).
    """
    if NATIVE:
        if E5M2:
            code = y.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True).to(tl.int32)
        else:
            code = y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True).to(tl.int32)
        negative = y.to(tl.int32, bitcast=True) < 0
        code = tl.where(y != y, tl.where(negative, NAN_NEG, NAN_POS), code)
    else:
        if E5M2:
            code = encode_float(y, 2, 15, 57344.0, 7, NAN_POS, NAN_NEG)
        else:
            code = encode_float(y, 3, 7, 448.0, 7, NAN_POS, NAN_NEG)
    return code


@triton.jit
def store_f32_or_bf16(ptr, off, v, mask, OUT_BF16: tl.constexpr, NATIVE: tl.constexpr):
    """Store float32, or bfloat16 (RNE, NaN -> 0x7FC0 with sign, as ml_dtypes) through an int16 view."""
    if OUT_BF16:
        if NATIVE:
            bits = v.to(tl.bfloat16).to(tl.int16, bitcast=True)
            sign_nan = (((v.to(tl.int32, bitcast=True) >> 16) & 0x8000) | 0x7FC0).to(tl.int16)
            tl.store(ptr + off, tl.where(v != v, sign_nan, bits), mask=mask)
        else:
            tl.store(ptr + off, f32_to_bf16_bits(v), mask=mask)
    else:
        tl.store(ptr + off, v, mask=mask)


@triton.jit
def encode_float(y, MANT: tl.constexpr, BIAS: tl.constexpr, MAXV: tl.constexpr, SIGN_SHIFT: tl.constexpr,
                 NAN_POS: tl.constexpr, NAN_NEG: tl.constexpr):
    """float32 -> minifloat code (int32): saturating RNE; NaN -> NAN_POS/NAN_NEG by the NaN's sign bit.

    Normal results round on the float32 bit pattern (the carry walks into the exponent, which is what
    RNE wants); results below the format's smallest normal are the integer mantissa shifted right with
    RNE on the remainder.  Saturation happens before rounding, which gives the same code as rounding and
    then clamping because rounding is monotonic and max is representable.
    """
    bits = y.to(tl.int32, bitcast=True)
    negative = bits < 0
    a = tl.minimum(tl.abs(y), MAXV)  # +Inf -> max; NaN handled at the end
    ab = a.to(tl.int32, bitcast=True)
    drop: tl.constexpr = 23 - MANT
    rounded = ab + ((1 << (drop - 1)) - 1) + ((ab >> drop) & 1)
    normal = (rounded >> drop) - ((127 - BIAS) << MANT)
    exponent = ab >> 23
    mant = (ab & 0x7FFFFF) | tl.where(exponent > 0, 0x800000, 0)
    shift = (151 - BIAS - MANT) - tl.maximum(exponent, 1)
    shift = tl.minimum(shift, 30)  # mant < 2^24: any shift >= 25 already gives 0 with no round-up
    q = mant >> shift
    rem = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    sub = q + up.to(tl.int32)
    code = tl.where(exponent < 128 - BIAS, sub, normal)
    code = tl.where(negative, code | (1 << SIGN_SHIFT), code)
    code = tl.where(y != y, tl.where(negative, NAN_NEG, NAN_POS), code)
    return code


@triton.jit
def round_int8(y):
    """float32 -> int32 in [-127, 127]: clamp, then round half to even (NaN/Inf -> 0, as the MX reference)."""
    finite = tl.abs(y) < float("inf")
    c = tl.minimum(tl.maximum(y, -127.0), 127.0)
    a = tl.abs(c)
    # Adding and subtracting 2^23 rounds |c| < 2^23 to an integer with the FPU's round-half-even.
    r = (a + 8388608.0) - 8388608.0
    r = tl.where(c < 0, -r, r)
    return tl.where(finite, r, 0.0).to(tl.int32)


@triton.jit
def f32_to_bf16_bits(v):
    """float32 -> bfloat16 bit pattern (int16), RNE like ml_dtypes; NaN -> 0x7FC0 with its sign."""
    b = v.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where(v != v, ((b >> 16) & 0x8000) | 0x7FC0, r)
    return r.to(tl.int16)


@triton.jit
def pow2(p):
    """2^p as float32 for integer p (int32 tensor) in [-126, 127], built from its exponent bits."""
    return ((p + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e8m0_factors(e, LOG2_IMPLICIT: tl.constexpr):
    """Biased E8M0 byte (int32) -> two normal float32 factors whose product is 2^(e - 127 + LOG2_IMPLICIT).

    Scales below 2^-126 are float32 subnormals, which a GPU may flush to zero; ``(v * s1) * s2`` with
    both factors normal is exact in the first multiply and correctly rounded in the second, exactly
    like one multiply by the true scale.  0xFF gives s2 = NaN.
    """
    p = e - 127 + LOG2_IMPLICIT
    s1 = tl.where(p >= -126, 1.0, pow2(tl.maximum(p + 126, -126)))
    s2 = pow2(tl.maximum(tl.minimum(p, 127), -126))
    s2 = tl.where(e == 255, float("nan"), s2)
    return s1, s2


@triton.jit
def numpy_nan(v, first, second):
    """Give a NaN result of ``first (op) second`` the bits NumPy gets on x86-64 (SSE), so results match
    bit for bit: a NaN operand propagates quieted with its sign (the first one if both are NaN), an
    invalid operation (0*Inf, Inf-Inf, 0/0) gives the 'default NaN' 0xFFC00000.  GPUs return one
    canonical NaN instead, and the E5M2 decode leaves a payload bit the reference does not have.
    """
    fb = first.to(tl.int32, bitcast=True)
    sb = second.to(tl.int32, bitcast=True)
    # (bits >> 31) << 31 keeps just the sign bit, in int32 (a literal 0x80000000 would be int64)
    from_second = tl.where(second != second, ((sb >> 31) << 31) | 0x7FC00000, -4194304)
    bits = tl.where(first != first, ((fb >> 31) << 31) | 0x7FC00000, from_second)
    return tl.where(v != v, bits.to(tl.float32, bitcast=True), v)
