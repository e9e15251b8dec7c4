"""The fusion rules: decomposed subgraphs of exported transformers -> the one ONNX op the device runs as a kernel.

Each rule is an onnxscript rewrite rule (``pattern`` / ``fused_check`` / ``rewrite``) on top of
``runtime.fusions.FusionRule``, which adds the partition and quantization checks. ``exact`` records whether
ONNX Runtime's CPU kernel for the fused op gives the same bits as the unfused ops (measured, and held by
tests/test_compile_quality.py): Attention and Swish do; RMSNormalization, LayerNormalization, RotaryEmbedding and
Gelu round differently in the last bit, so they are refused where a QuantizeLinear reads their output.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from maia_onnx.runtime.fusions import FusionRule


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def _scalar(value: ir.Value | None) -> float | None:
    array = _const(value)
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None


def _ints(value: ir.Value | None) -> list[int] | None:
    array = _const(value)
    return None if array is None or array.dtype.kind not in "iu" else [int(x) for x in array.reshape(-1)]


def _static_last_dim(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None or len(value.shape) == 0:
        return None
    last = value.shape[-1]
    return last if isinstance(last, int) else None


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


class RmsNormFusion(FusionRule):
    """x * 1/sqrt(mean(x^2) + eps) * scale -> RMSNormalization(x, scale, axis=-1, epsilon)."""

    op, exact = "RMSNormalization", False

    def __init__(self, scale_first: bool):
        super().__init__(f"RMSNorm{'' if scale_first else '-scale-last'}")
        self._scale_first = scale_first

    def pattern(self, op, x, scale, epsilon):
        mean = op.ReduceMean(op.Pow(x, 2.0), [-1], keepdims=1)
        normalized = op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean, epsilon))))
        return op.Mul(scale, normalized) if self._scale_first else op.Mul(normalized, scale)

    def fused_check(self, context, x, scale, epsilon, **_) -> str | None:
        if _scalar(epsilon) is None:
            return "epsilon is not a constant scalar"
        if not (_is_float(x) and _is_float(scale)) or x.dtype != scale.dtype:
            return "input and scale are not the same float type"
        hidden = _static_last_dim(x)
        if hidden is None or scale.shape is None or list(scale.shape) != [hidden]:
            return "scale is not a vector over the normalized (static) last axis"
        return None

    def rewrite(self, op, x, scale, epsilon, **_):
        return op.RMSNormalization(x, scale, axis=-1, epsilon=_scalar(epsilon), stash_type=int(ir.DataType.FLOAT))


class LayerNormFusion(FusionRule):
    """(x - mean) / sqrt(var + eps) * scale + bias -> LayerNormalization(x, scale, bias, axis=-1, epsilon)."""

    op, exact = "LayerNormalization", False

    def __init__(self):
        super().__init__("LayerNorm")

    def pattern(self, op, x, scale, bias, epsilon):
        deviation = op.Sub(x, op.ReduceMean(x, [-1], keepdims=1))
        variance = op.ReduceMean(pattern.OrValue([op.Mul(deviation, deviation), op.Pow(deviation, 2.0)]), [-1], keepdims=1)
        std = op.Sqrt(op.Add(variance, epsilon))
        normalized = pattern.OrValue([op.Div(deviation, std), op.Mul(deviation, op.Reciprocal(std))])
        return op.Add(op.Mul(normalized, scale), bias)

    def fused_check(self, context, x, scale, bias, epsilon, **_) -> str | None:
        if _scalar(epsilon) is None:
            return "epsilon is not a constant scalar"
        hidden = _static_last_dim(x)
        for name, value in (("scale", scale), ("bias", bias)):
            if not _is_float(value) or value.dtype != x.dtype or value.shape is None or list(value.shape) != [hidden]:
                return f"{name} is not a vector over the normalized (static) last axis"
        return None

    def rewrite(self, op, x, scale, bias, epsilon, **_):
        return op.LayerNormalization(x, scale, bias, axis=-1, epsilon=_scalar(epsilon), stash_type=int(ir.DataType.FLOAT))


def _same_computation(a: ir.Value, b: ir.Value) -> bool:
    """Whether two values are one value or outputs of identical nodes on the same inputs."""
    if a is b:
        return True
    pa, pb = a.producer(), b.producer()
    if pa is None or pb is None or (pa.domain, pa.op_type) != (pb.domain, pb.op_type):
        return False
    if list(pa.inputs) != list(pb.inputs) or pa.outputs.index(a) != pb.outputs.index(b):
        return False
    return {k: v.value for k, v in pa.attributes.items()} == {k: v.value for k, v in pb.attributes.items()}


def _half_repeated_trig(value: ir.Value, trig: str) -> str | None:
    """Why ``value`` is not Unsqueeze(Cos|Sin(Concat(f, f)), [1]) (HF's cos/sin with both halves equal)."""
    unsqueeze = value.producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or _ints(unsqueeze.inputs[1]) != [1]:
        return f"{trig.lower()} is not unsqueezed on the head axis"
    node = unsqueeze.inputs[0].producer()
    if node is None or node.op_type != trig:
        return f"{trig.lower()} table is not computed by {trig} in the graph"
    concat = node.inputs[0].producer()
    if (concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2
            or concat.attributes.get("axis") is None or concat.attributes["axis"].value != -1
            or not _same_computation(concat.inputs[0], concat.inputs[1])):
        return f"{trig.lower()} table halves are not provably equal (Concat(freqs, freqs))"
    return None


class RotaryFusion(FusionRule):
    """x * cos + rotate_half(x) * sin (HF, non-interleaved) -> RotaryEmbedding(x, cos[..., :D/2], sin[..., :D/2])."""

    op, exact = "RotaryEmbedding", False

    def __init__(self):
        super().__init__("Rotary")

    def pattern(self, op, x, cos4, sin4, start1, end1, axes1, steps1, start2, end2, axes2, steps2):
        x1 = op.Slice(x, start1, end1, axes1, steps1)
        x2 = op.Slice(x, start2, end2, axes2, steps2)
        rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        return op.Add(op.Mul(x, cos4), op.Mul(rotated, sin4))

    def fused_check(self, context, x, cos4, sin4, start1, end1, axes1, steps1, start2, end2, axes2, steps2, **_):
        if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[1], int) or not isinstance(x.shape[3], int):
            return "input is not (batch, heads, seq, head_dim) with static heads and head_dim"
        half = x.shape[3] // 2
        if x.shape[3] % 2:
            return "head_dim is odd"
        if _ints(axes1) not in ([3], [-1]) or _ints(axes2) not in ([3], [-1]) or _ints(steps1) != [1] or _ints(steps2) != [1]:
            return "slices are not unit-step slices of the last axis"
        end2_value = _ints(end2)
        if _ints(start1) != [0] or _ints(end1) != [half] or _ints(start2) != [half] or not end2_value or end2_value[0] < 2 * half:
            return "x is not split into two equal halves"
        return _half_repeated_trig(cos4, "Cos") or _half_repeated_trig(sin4, "Sin")

    def rewrite(self, op, x, cos4, sin4, **_):
        half = x.shape[3] // 2
        caches = [op.Slice(value.producer().inputs[0], op.Constant(value_ints=[0]), op.Constant(value_ints=[half]),
                           op.Constant(value_ints=[-1])) for value in (cos4, sin4)]
        return op.RotaryEmbedding(x, caches[0], caches[1], interleaved=0)


class AttentionFusion(FusionRule):
    """softmax(q @ k^T * scale [+ mask]) @ v -> Attention(q, k, v[, mask], scale) (4-D, heads on axis 1)."""

    op, exact = "Attention", True

    def __init__(self):
        super().__init__("Attention")

    def pattern(self, op, q, k, v, scale, mask):
        kt = op.Transpose(k, perm=[0, 1, 3, 2])
        # the FP8 recipe quantizes K^T and the probabilities: matched here so that the refusal names them
        kt = pattern.OrValue([op.DequantizeLinear(op.QuantizeLinear(kt, _allow_other_inputs=True), _allow_other_inputs=True), kt])
        logits = op.Mul(op.MatMul(q, kt), scale)
        logits = pattern.OrValue([op.Add(logits, mask), logits])
        probs = op.Softmax(logits, axis=-1)
        probs = pattern.OrValue([op.DequantizeLinear(op.QuantizeLinear(probs, _allow_other_inputs=True), _allow_other_inputs=True), probs])
        return op.MatMul(probs, v)

    def fused_check(self, context, q, k, v, scale, mask, **_) -> str | None:
        for name, value in (("query", q), ("key", k), ("value", v)):
            if not _is_float(value) or value.shape is None or len(value.shape) != 4:
                return f"{name} is not a 4-D float tensor (batch, heads, seq, head_dim)"
        if _scalar(scale) is None:
            return "scale is not a constant scalar"
        if mask is not None and (not _is_float(mask) or mask.shape is None or len(mask.shape) > 4):
            return "mask is not an additive float mask of rank <= 4"
        return None

    def rewrite(self, op, q, k, v, scale, mask, **_):
        inputs = [q, k, v] + ([mask] if mask is not None else [])
        return op.Attention(*inputs, scale=_scalar(scale))


class SiluFusion(FusionRule):
    """x * sigmoid(x) -> Swish(x) (SiLU, the gate of SwiGLU MLPs)."""

    op, exact = "Swish", True

    def __init__(self, sigmoid_first: bool):
        super().__init__(f"SiLU{'-sigmoid-first' if sigmoid_first else ''}")
        self._sigmoid_first = sigmoid_first

    def pattern(self, op, x):
        return op.Mul(op.Sigmoid(x), x) if self._sigmoid_first else op.Mul(x, op.Sigmoid(x))

    def fused_check(self, context, x, **_) -> str | None:
        return None if _is_float(x) else "input is not a float tensor"

    def rewrite(self, op, x, **_):
        return op.Swish(x)


class GeluErfFusion(FusionRule):
    """0.5 * x * (1 + erf(x / sqrt(2))) -> Gelu(x)."""

    op, exact = "Gelu", False  # bit-identical for x * (1/sqrt(2)), not for x / sqrt(2): not claimed

    def __init__(self):
        super().__init__("GELU-erf")

    def pattern(self, op, x, c_sqrt, one, half):
        inner = pattern.OrValue([op.Div(x, c_sqrt), op.Mul(x, c_sqrt)], tag_var="divides", tag_values=[True, False])
        return op.Mul(op.Mul(x, op.Add(op.Erf(inner), one)), half)

    def fused_check(self, context, x, c_sqrt, one, half, divides, **_) -> str | None:
        c = _scalar(c_sqrt)
        target = np.sqrt(2.0) if divides else 1 / np.sqrt(2.0)
        if c is None or abs(c - target) > 1e-6 or _scalar(one) != 1.0 or _scalar(half) != 0.5:
            return "constants are not those of the exact GELU (1/sqrt(2), 1, 0.5)"
        return None if _is_float(x) else "input is not a float tensor"

    def rewrite(self, op, x, **_):
        return op.Gelu(x)


class GeluTanhFusion(FusionRule):
    """x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) (GPT-2's gelu_new) -> Gelu(x, approximate='tanh')."""

    op, exact = "Gelu", False

    def __init__(self):
        super().__init__("GELU-tanh")

    def pattern(self, op, x, half, k, c, one):
        inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, 3.0), k)), c)
        return op.Mul(op.Mul(x, half), op.Add(op.Tanh(inner), one))

    def fused_check(self, context, x, half, k, c, one, **_) -> str | None:
        values = [_scalar(half), _scalar(k), _scalar(c), _scalar(one)]
        expected = [0.5, 0.044715, np.sqrt(2 / np.pi), 1.0]
        if any(v is None or abs(v - e) > 1e-6 for v, e in zip(values, expected)):
            return "constants are not those of the tanh GELU (0.5, 0.044715, sqrt(2/pi), 1)"
        return None if _is_float(x) else "input is not a float tensor"

    def rewrite(self, op, x, **_):
        return op.Gelu(x, approximate="tanh")


def default_rules() -> list[FusionRule]:
    """Fresh rule instances (each carries its own statistics), in the order compile applies them."""
    return [RmsNormFusion(True), RmsNormFusion(False), LayerNormFusion(), RotaryFusion(), AttentionFusion(),
            SiluFusion(False), SiluFusion(True), GeluErfFusion(), GeluTanhFusion()]
