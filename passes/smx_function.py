"""``maia.MxFakeQuant``: Maia 100's shared-microexponent (mx9/mx6) activation rounding as an ONNX local function.

Built from standard ops only, so ONNX Runtime inlines and runs it; bit-exact to ``formats.mx.fake_quant_smx``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as h
import onnx.numpy_helper
from onnx import TensorProto

SMX_FUNCTION_DOMAIN = "maia"
SMX_FUNCTION_NAME = "MxFakeQuant"
_POW2_MIN, _POW2_MAX = -149, 128  # the function's table of 2^k: every float32 subnormal power up to 2^128 = +inf


def smx_fake_quant_function(opset: int):
    """The ``maia.MxFakeQuant`` FunctionProto: shared-microexponent fake quant from standard ONNX ops.

    Attributes: ``axis`` (the block axis, negative allowed), ``mantissa_bits`` (7: mx9, 4: mx6),
    ``block_size`` (16; even).  Bit-exact to ``maia_onnx.formats.mx.fake_quant_smx``: every step is a
    power of two taken from a constant table (never Pow/Exp), so ``x / step`` and ``q * step`` are exact
    and Round is the only rounding; signed zeros survive (Round(-0.3) = -0).
    """
    nodes = []
    counter = [0]

    def fresh(stem: str) -> str:
        counter[0] += 1
        return f"t{counter[0]}_{stem}"

    def op(op_type, inputs, **attrs):
        out = fresh(op_type.lower())
        nodes.append(h.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(value, dtype):
        return op("Constant", [], value=onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype)))

    def attr_const(attr):
        out = fresh(attr)
        node = h.make_node("Constant", [], [out])
        node.attribute.append(h.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name=attr))
        nodes.append(node)
        return op("Unsqueeze", [out, const([0], np.int64)])

    i64, f32 = np.int64, np.float32
    with np.errstate(over="ignore"):
        pow2 = np.ldexp(np.float32(1.0), np.arange(_POW2_MIN, _POW2_MAX + 1)).astype(np.float32)
    table = const(pow2, f32)

    def pow2_of(exponent):  # exact 2^exponent for an int64 exponent in [_POW2_MIN, _POW2_MAX]
        return op("Gather", [table, op("Add", [exponent, const(-_POW2_MIN, i64)])])

    zero, one, two = const([0], i64), const([1], i64), const([2], i64)
    axis, block, mbits = attr_const("axis"), attr_const("block_size"), attr_const("mantissa_bits")
    # view x as [prod(shape[:axis]), D, prod(shape[axis+1:])] and zero-pad D to whole blocks
    shape = op("Shape", ["x"])
    rank = op("Size", [shape])
    ax = op("Mod", [op("Add", [axis, rank]), rank])
    ax_next = op("Add", [ax, one])
    pre = op("ReduceProd", [op("Concat", [one, op("Slice", [shape, zero, ax])], axis=0)], keepdims=1)
    length = op("Slice", [shape, ax, ax_next])
    post = op("ReduceProd", [op("Concat", [one, op("Slice", [shape, ax_next, const([np.iinfo(i64).max], i64)])], axis=0)], keepdims=1)
    x3 = op("Reshape", ["x", op("Concat", [pre, length, post], axis=0)])
    nblocks = op("Div", [op("Sub", [op("Add", [length, block]), one]), block])
    padded = op("Mul", [nblocks, block])
    xp = op("Pad", [x3, op("Concat", [zero, zero, zero, zero, op("Sub", [padded, length]), zero], axis=0)])
    # [pre, blocks, sub-blocks, 2, post]
    xb = op("Reshape", [xp, op("Concat", [pre, nblocks, op("Div", [block, two]), two, post], axis=0)])
    # NaN/Inf anywhere in a block makes the whole block NaN (x * 0 is NaN exactly for NaN/Inf); the
    # rest of the arithmetic runs on the block with those zeroed so no index goes out of range
    bad = op("IsNaN", [op("Mul", [xb, const(0.0, f32)])])
    block_bad = op("Cast", [op("ReduceMax", [op("Cast", [bad], to=TensorProto.FLOAT), const([2, 3], i64)], keepdims=1)], to=TensorProto.BOOL)
    xc = op("Where", [bad, const(0.0, f32), xb])
    sub_amax = op("ReduceMax", [op("Abs", [xc]), const([3], i64)], keepdims=1)
    amax = op("ReduceMax", [sub_amax, const([2], i64)], keepdims=1)
    # floor(log2 amax): Log is good to a few ulp, so its floor is at most one off next to a power of two;
    # two compares against the exact table fix it.  Log sees amax floored at 2^-126 (subnormal logs are
    # not trusted); the compares see the true amax, and the shared exponent is clamped to [-127, 127].
    log2 = op("Mul", [op("Log", [op("Max", [amax, const(2.0**-126, f32)])]), const(1.0 / np.log(2.0), f32)])
    e0 = op("Cast", [op("Clip", [op("Floor", [log2]), const(-126.0, f32), const(127.0, f32)])], to=TensorProto.INT64)
    too_big = op("Cast", [op("Greater", [pow2_of(e0), amax])], to=TensorProto.INT64)
    too_small = op("Cast", [op("LessOrEqual", [pow2_of(op("Add", [e0, one])), amax])], to=TensorProto.INT64)
    e = op("Add", [op("Sub", [e0, too_big]), too_small])
    shared = op("Min", [op("Max", [e, const(-127, i64)]), const(127, i64)])
    # 1-bit micro-exponent: a sub-block whose amax sits below 2^E uses E - 1
    micro = op("Cast", [op("Less", [sub_amax, pow2_of(shared)])], to=TensorProto.INT64)
    step = pow2_of(op("Sub", [op("Sub", [shared, micro]), op("Sub", [mbits, one])]))
    qmax = op("Sub", [pow2_of(mbits), const(1.0, f32)])
    q = op("Clip", [op("Round", [op("Div", [xc, step])]), op("Neg", [qmax]), qmax])
    y = op("Where", [block_bad, const(np.nan, f32), op("Mul", [q, step])])
    y = op("Slice", [op("Reshape", [y, op("Concat", [pre, padded, post], axis=0)]), zero, length, one])
    nodes.append(h.make_node("Reshape", [y, shape], ["y"]))
    defaults = [h.make_attribute("axis", -1), h.make_attribute("mantissa_bits", 7), h.make_attribute("block_size", 16)]
    return h.make_function(
        SMX_FUNCTION_DOMAIN, SMX_FUNCTION_NAME, ["x"], ["y"], nodes, [h.make_opsetid("", opset)],
        attribute_protos=defaults,
        doc_string="Maia shared-microexponent (mx9/mx6) fake quant; bit-exact to maia_onnx.formats.mx.fake_quant_smx",
    )
