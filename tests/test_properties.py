"""Property-based tests (hypothesis) over random small MLP and conv graphs.

* quantize: FP8 weights stay within the format's rounding bound element by element, and the model's outputs
  within the bound that propagates through the layers (linear layers, 1-Lipschitz ReLU);
* partition: TP / PP partitions give the unsharded model's outputs (up to float summation order);
* compile: the compiled model in the Maia shim gives the uncompiled model's outputs.

Profiles live in tests/hypothesis_profiles.py ("ci" by default; HYPOTHESIS_PROFILE=dev for a long hunt).
"""

from __future__ import annotations

import hypothesis_profiles  # noqa: F401  (tests/ is on sys.path: registers and loads the profile)

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, reject, strategies as st
from onnx import TensorProto, helper, numpy_helper

from maia_onnx.errors import UserError

# E4M3FN: 3 mantissa bits -> RNE relative error <= 2^-4; subnormal spacing 2^-9 -> absolute <= 2^-10 (in scale units)
# E5M2:   2 mantissa bits -> 2^-3;                     subnormal spacing 2^-16 -> 2^-17
FP8_BOUND = {"fp8-e4m3": (2.0**-4, 2.0**-10), "fp8-e5m2": (2.0**-3, 2.0**-17)}
FP32_SLACK = 1e-5  # float32 accumulation-order differences, relative to the magnitude of the sums


@dataclass
class Net:
    kind: str  # "mlp" | "conv"
    model: onnx.ModelProto
    weights: dict[str, np.ndarray]
    layers: list[tuple[str, str]]  # (node name, weight name), in order
    feeds: dict[str, np.ndarray]


def _finish(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "prop", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@st.composite
def mlps(draw, hidden_multiple: int = 4):
    """x[b, d0] -> (MatMul W_i -> Add b_i -> Relu)* -> MatMul -> y; hidden widths divisible by ``hidden_multiple``."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    depth = draw(st.integers(2, 3))
    widths = [draw(st.integers(1, 4)) * 4] + [draw(st.integers(1, 4)) * hidden_multiple for _ in range(depth - 1)] + [draw(st.integers(1, 3)) * 2]
    batch = draw(st.integers(1, 3))
    weight_scale = draw(st.sampled_from([0.02, 0.5, 3.0]))
    nodes, inits, weights, layers = [], [], {}, []
    x = "x"
    for i in range(depth):
        w = (rng.standard_normal((widths[i], widths[i + 1])) * weight_scale).astype(np.float32)
        if draw(st.booleans()):
            w[:, rng.integers(0, widths[i + 1])] = 0.0  # an all-zero output channel: zero amax must not give 0 scale
        weights[f"W{i}"] = w
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"fc{i}"))
        layers.append((f"fc{i}", f"W{i}"))
        x = f"m{i}"
        if i < depth - 1:
            b = rng.standard_normal(widths[i + 1]).astype(np.float32) * 0.1
            inits.append(numpy_helper.from_array(b, f"b{i}"))
            nodes.append(helper.make_node("Add", [x, f"b{i}"], [f"a{i}"], name=f"bias{i}"))
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    nodes[-1].output[0] = "y"
    model = _finish(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", widths[-1]])], inits)
    feeds = {"x": rng.standard_normal((batch, widths[0])).astype(np.float32)}
    return Net("mlp", model, weights, layers, feeds)


@st.composite
def convnets(draw, channel_multiple: int = 2):
    """x[b, c0, H, W] -> Conv(k, pad) -> Relu -> Conv -> y; channels divisible by ``channel_multiple``."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    c0 = draw(st.integers(1, 3))
    c1 = draw(st.integers(1, 3)) * channel_multiple
    c2 = draw(st.integers(1, 3)) * 2
    k = draw(st.sampled_from([1, 3]))
    size = draw(st.integers(4, 8))
    w1 = (rng.standard_normal((c1, c0, k, k)) * 0.5).astype(np.float32)
    w2 = (rng.standard_normal((c2, c1, k, k)) * 0.5).astype(np.float32)
    b1 = (rng.standard_normal(c1) * 0.1).astype(np.float32)
    pad = [k // 2] * 4
    nodes = [
        helper.make_node("Conv", ["x", "W0", "b0"], ["c0"], name="conv0", pads=pad),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "W1"], ["y"], name="conv1", pads=pad),
    ]
    inits = [numpy_helper.from_array(w1, "W0"), numpy_helper.from_array(b1, "b0"), numpy_helper.from_array(w2, "W1")]
    model = _finish(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", c0, size, size])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", c2, size, size])], inits)
    feeds = {"x": rng.standard_normal((draw(st.integers(1, 2)), c0, size, size)).astype(np.float32)}
    return Net("conv", model, {"W0": w1, "W1": w2}, [("conv0", "W0"), ("conv1", "W1")], feeds)


def _session(model_or_path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def _run(model_or_path, feeds) -> list[np.ndarray]:
    return _session(model_or_path).run(None, feeds)


# ---------------------------------------------------------------------------------------------- quantize
def _dequantized_weights(model: onnx.ModelProto, net: Net) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """original weight name -> (dequantized weight, per-element scale) read from the DequantizeLinear nodes."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    by_node = {n.name: n for n in model.graph.node}
    out = {}
    for node_name, weight in net.layers:
        node = by_node[node_name]
        dq = producer.get(node.input[1])
        assert dq is not None and dq.op_type == "DequantizeLinear", f"{weight} of {node_name} was not quantized"
        q = inits[dq.input[0]]
        assert q.dtype in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2), f"{weight} stored as {q.dtype}, not FP8"
        scale = inits[dq.input[1]].astype(np.float32)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * q.ndim
            shape[axis] = scale.size
            scale = scale.reshape(shape)
        scale = np.broadcast_to(scale, q.shape)
        out[weight] = (q.astype(np.float32) * scale, scale)
    return out


def _linear(net: Net, x: np.ndarray, w: np.ndarray, node_index: int) -> np.ndarray:
    """The layer's linear map without bias (MatMul or Conv with that layer's attributes)."""
    if net.kind == "mlp":
        return x @ w
    pads = [w.shape[-1] // 2] * 4
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=pads)], "lin",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _run(model, {"x": np.ascontiguousarray(x, np.float32), "w": np.ascontiguousarray(w, np.float32)})[0]


def _output_bound(net: Net, deq: dict, rel: float, sub: float) -> np.ndarray:
    """|y_q - y| <= E, propagated layer by layer: E' = L(E, |W_q|) + L(|h|, dW), through 1-Lipschitz ReLU."""
    inits = {i.name: numpy_helper.to_array(i) for i in net.model.graph.initializer}
    h = net.feeds["x"].astype(np.float64)
    err = np.zeros_like(h)
    for i, (_, wname) in enumerate(net.layers):
        w = net.weights[wname].astype(np.float64)
        w_q, scale = deq[wname]
        d_w = rel * np.abs(w) + sub * scale  # the format's rounding bound per weight
        err = _linear(net, err, np.abs(w_q), i) + _linear(net, np.abs(h), d_w, i)
        h = _linear(net, h, w, i)
        if i < len(net.layers) - 1:
            bias = inits.get(f"b{i}")
            if bias is not None:
                h = h + (bias.reshape(1, -1, 1, 1) if net.kind == "conv" else bias)
            h = np.maximum(h, 0.0)  # ReLU is 1-Lipschitz: err carries over unchanged
    return err


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
@given(net=st.one_of(mlps(), convnets()))
def test_quantize_within_format_error_bound(fmt, net, tmp_path_factory):
    from maia_onnx.quantize import quantize_model

    tmp = tmp_path_factory.mktemp("q")
    onnx.save(net.model, tmp / "float.onnx")
    quantize_model(str(tmp / "float.onnx"), str(tmp / "q.onnx"), format=fmt, weights_only=True, evaluate=False,
                   show_progress=False)
    quantized = onnx.load(tmp / "q.onnx")
    rel, sub = FP8_BOUND[fmt]
    deq = _dequantized_weights(quantized, net)
    for wname, (w_q, scale) in deq.items():
        w = net.weights[wname]
        assert np.all(scale > 0) and np.all(np.isfinite(scale)), f"{wname}: scale must be finite and > 0"
        assert np.all(np.abs(w_q - w) <= rel * np.abs(w) + sub * scale + 1e-12), f"{wname}: FP8 rounding beyond the bound"
    want = _run(net.model, net.feeds)[0].astype(np.float64)
    got = _run(quantized, net.feeds)[0].astype(np.float64)
    bound = _output_bound(net, deq, rel, sub)
    slack = FP32_SLACK * (np.abs(want).max() + 1.0)
    excess = np.abs(got - want) - bound - slack
    assert np.all(excess <= 0), f"output error beyond the propagated FP8 bound by {excess.max():.3g}"


MX_ELEMENTS = {  # element type: (RNE relative bound, subnormal absolute bound in scale units, emax, max value)
    "mxfp8-e4m3": (2.0**-4, 2.0**-10, 8, 448.0),
    "mxfp8-e5m2": (2.0**-3, 2.0**-17, 15, 57344.0),
}


@pytest.mark.parametrize("fmt", sorted(MX_ELEMENTS))
@given(net=mlps(hidden_multiple=4))
def test_quantize_mx_within_format_error_bound(fmt, net, tmp_path_factory):
    """OCP MX: per block of 4 along K the shared scale is 2^(floor(log2 amax) - emax), elements round (RNE) and
    clamp at the element max; outputs stay within the bound that propagates from those element bounds."""
    from maia_onnx.quantize import quantize_model

    tmp = tmp_path_factory.mktemp("mx")
    onnx.save(net.model, tmp / "float.onnx")
    quantize_model(str(tmp / "float.onnx"), str(tmp / "q.onnx"), format=fmt, weights_only=True, block_size=4,
                   evaluate=False, show_progress=False)
    quantized = onnx.load(tmp / "q.onnx")
    rel, sub, emax, max_value = MX_ELEMENTS[fmt]
    inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    producer = {o: n for n in quantized.graph.node for o in n.output}
    by_node = {n.name: n for n in quantized.graph.node if n.name}
    deq = {}
    for node_name, wname in net.layers:
        consumer = by_node.get(node_name) or next(n for n in quantized.graph.node if n.op_type == "MatMul"
                                                  and producer.get(n.input[1]) is not None
                                                  and wname in producer[n.input[1]].input[0])
        dq = producer[consumer.input[1]]
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        assert dq.op_type == "DequantizeLinear" and attrs.get("block_size") == 4 and attrs.get("axis", 1) == 0
        elements, scale = inits[dq.input[0]].astype(np.float32), inits[dq.input[1]].astype(np.float32)
        scale_full = np.repeat(scale, 4, axis=0)[: elements.shape[0]]
        w = net.weights[wname]
        # the OCP shared-scale rule, block by block (all-zero blocks may take any scale)
        amax = np.abs(w).reshape(-1, 4, w.shape[1]).max(axis=1)
        nz = amax > 0
        want_scale = np.exp2(np.floor(np.log2(np.where(nz, amax, 1.0))) - emax)
        assert np.array_equal(scale[nz], want_scale[nz].astype(np.float32)), f"{wname}: shared scales break the OCP rule"
        w_q = elements * scale_full
        bound = rel * np.abs(w) + sub * scale_full + np.maximum(np.abs(w) - max_value * scale_full, 0.0)
        assert np.all(np.abs(w_q - w) <= bound + 1e-12), f"{wname}: MX element beyond the rounding/clamp bound"
        deq[wname] = (w_q, scale_full)
    want = _run(net.model, net.feeds)[0].astype(np.float64)
    got = _run(quantized, net.feeds)[0].astype(np.float64)
    # an element either rounds (rel*|w| + sub*s) or clamps (|w| < 2^(emax+1)*s, so error < |w|*(1 - max/2^(emax+1)))
    clamp_rel = max(1.0 - max_value / 2.0 ** (emax + 1), rel)
    bound = _output_bound(net, deq, clamp_rel, sub)
    excess = np.abs(got - want) - bound - FP32_SLACK * (np.abs(want).max() + 1.0)
    assert np.all(excess <= 0), f"output error beyond the propagated MX bound by {excess.max():.3g}"


# ---------------------------------------------------------------------------------------------- partition
def _assert_same(got: np.ndarray, want: np.ndarray, what: str):
    # sharded sums add the same products in another order: equal up to float32 reassociation
    tol = 1e-5 * (np.abs(want).max() + 1.0)
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert np.max(np.abs(got - want)) <= tol, f"{what}: max diff {np.max(np.abs(got - want)):.3g} > {tol:.3g}"


@given(net=mlps(hidden_multiple=4), tp=st.sampled_from([1, 2, 4]), pp=st.sampled_from([1, 2]))
def test_partition_matches_unsharded_mlp(net, tp, pp, tmp_path_factory):
    from maia_onnx.partition import partition_file
    from maia_onnx.runtime.executor import run_partition

    tmp = tmp_path_factory.mktemp("p")
    onnx.save(net.model, tmp / "model.onnx")
    try:
        partition_file(tmp / "model.onnx", tmp / "part", tp=tp, pp=pp)
    except UserError:
        # a clean refusal (e.g. a pipeline stage with nothing --tp divides) is allowed; a wrong answer is not
        assert not (tmp / "part").exists(), "a refused partition left a directory behind"
        reject()
    want = _run(net.model, net.feeds)[0]
    got = run_partition(tmp / "part", net.feeds)["y"]
    _assert_same(got, want, f"tp={tp} pp={pp}")


@given(net=convnets(channel_multiple=2), tp=st.sampled_from([1, 2]))
def test_partition_matches_unsharded_conv(net, tp, tmp_path_factory):
    from maia_onnx.partition import partition_file
    from maia_onnx.runtime.executor import run_partition

    tmp = tmp_path_factory.mktemp("p")
    onnx.save(net.model, tmp / "model.onnx")
    partition_file(tmp / "model.onnx", tmp / "part", tp=tp, pp=1)
    want = _run(net.model, net.feeds)[0]
    got = run_partition(tmp / "part", net.feeds)["y"]
    _assert_same(got, want, f"conv tp={tp}")


# ---------------------------------------------------------------------------------------------- compile
@given(net=st.one_of(mlps(), convnets()), embed=st.booleans())
def test_compile_matches_uncompiled(net, embed, tmp_path_factory):
    from maia_onnx.runtime import InferenceSession
    from maia_onnx.runtime.compile import compile_model

    tmp = tmp_path_factory.mktemp("c")
    onnx.save(net.model, tmp / "model.onnx")
    result = compile_model(tmp / "model.onnx", tmp / "compiled.onnx", embed=embed)
    assert result.placement.partitions, "MatMul/Conv graphs should put work on the device"
    session = InferenceSession(str(tmp / "compiled.onnx"), providers=["MaiaExecutionProvider", "CPUExecutionProvider"])
    assert "MaiaExecutionProvider" in session.get_providers()
    want = _run(net.model, net.feeds)[0]
    got = session.run(None, net.feeds)[0]
    _assert_same(got, want, f"compiled {net.kind} (embed={embed})")


@given(net=mlps())
def test_quantized_model_compiles_to_same_outputs(net, tmp_path_factory):
    """FP8 weights through compile: the emulator must reproduce ORT's QDQ arithmetic on the quantized model."""
    from maia_onnx.quantize import quantize_model
    from maia_onnx.runtime import InferenceSession
    from maia_onnx.runtime.compile import compile_model

    tmp = tmp_path_factory.mktemp("qc")
    onnx.save(net.model, tmp / "model.onnx")
    quantize_model(str(tmp / "model.onnx"), str(tmp / "q.onnx"), format="fp8-e4m3", weights_only=True, evaluate=False,
                   show_progress=False)
    compile_model(tmp / "q.onnx", tmp / "qc.onnx")
    want = _run(tmp / "q.onnx", net.feeds)[0]
    got = InferenceSession(str(tmp / "qc.onnx"), providers=["MaiaExecutionProvider", "CPUExecutionProvider"]).run(None, net.feeds)[0]
    _assert_same(got, want, "compiled FP8 model")
