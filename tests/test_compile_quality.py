"""Compile quality: whole device partitions for exported HF decoders, kernel fusions (exact where claimed, refused
with reasons where they would change quantized values), and compile's self-check refusing a wrong rewrite."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from maia_onnx.cli import cli
from maia_onnx.errors import ValidationError
from maia_onnx.inputs import make_inputs
from maia_onnx.ortutil import compare, run_model
from maia_onnx.runtime.capability import HOISTED, get_capability
from maia_onnx.runtime.compile import VERIFY_TOLERANCE, compile_model
from maia_onnx.runtime.fusions import FusionRule, fold_host_arithmetic, fuse_device_partitions
from maia_onnx.runtime.fusions_rules import (AttentionFusion, GeluErfFusion, GeluTanhFusion, LayerNormFusion,
                                             RmsNormFusion, RotaryFusion, SiluFusion, default_rules)
from maia_onnx.runtime.session import EmulatorSession

DECODERS = ["llama", "qwen2", "phi3", "gemma2", "gpt2", "mistral"]
DIMS = {"batch": 2, "seq": 3, "past": 2}
# Mistral is not in the zoo: the zoo's dense decoder shape
MISTRAL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def hf_decoder(zoo_dir, zoo_export, tmp_path_factory):
    """name -> (FP32 path, FP8 path) of the tiny HF decoder, exported (parity-checked) and FP8-quantized once."""
    from maia_onnx.export import export_model
    from maia_onnx.quantize import quantize_model

    root = tmp_path_factory.mktemp("quality")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            if name == "mistral":
                import torch
                import transformers

                directory = root / "mistral_ckpt"
                torch.manual_seed(0)
                transformers.MistralForCausalLM(transformers.MistralConfig(**MISTRAL)).save_pretrained(directory)
                fp32 = export_model(f"hf:{directory}", root / "mistral.onnx").path
            else:
                fp32 = zoo_export(name).path
            fp8 = root / f"{name}_fp8.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # synthesized calibration data
                quantize_model(fp32, fp8, format="fp8-e4m3", show_progress=False, evaluate=False)
            cache[name] = (fp32, fp8)
        return cache[name]

    return get


def _outputs(model, feeds):
    return run_model(model, feeds)


# ---------------------------------------------------------------------------------------------------------------
# whole partitions


@pytest.mark.parametrize("name", DECODERS)
def test_hf_decoders_compile_into_one_partition_fp32_and_fp8(name, hf_decoder, tmp_path):
    fp32, fp8 = hf_decoder(name)
    for kind, path in (("fp32", fp32), ("fp8", fp8)):
        before = get_capability(ir.load(path), "maia100", dims=DIMS)
        result = compile_model(path, tmp_path / f"{kind}.onnx", dims=DIMS)
        summary = result.summary()
        assert summary["partitions"] == 1, (kind, before.summary()["partitions"])
        # only the mask GatherND (unsupported) and the index arithmetic feeding it run on the host
        cpu = [n for n in result.placement.nodes if n.device == "cpu"]
        assert {n.op_type for n in cpu if n.reason != HOISTED} == {"GatherND"}, kind
        assert summary["nodes_device"] / (summary["nodes_device"] + summary["nodes_cpu"]) > 0.7
        # the self-check ran and held: FP32 within the tolerance, FP8 bit-exact (no fusion touched a rounding)
        assert result.verification and summary["verified"]
        worst = max(r["max_rel"] for r in result.verification.values())
        assert worst <= VERIFY_TOLERANCE if kind == "fp32" else worst == 0.0, (kind, worst)


def test_lone_weight_dequantize_joins_its_consumer_partition():
    # x -> MatMul(DQ w1) -> TopK (host) -> MatMul(DQ w2): the second weight's DQ belongs with its MatMul
    proto = onnx.parser.parse_model("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2,8] x) => (float[2,8] y) {
      w1 = DequantizeLinear<axis=1>(q1, s)
      w2 = DequantizeLinear<axis=1>(q2, s)
      a = MatMul(x, w1)
      v, i = TopK<axis=1>(a, k)
      t = Tile(v, reps)
      y = MatMul(t, w2)
    }""")
    rng = np.random.default_rng(0)
    for name in ("q1", "q2"):
        q = rng.standard_normal((8, 8)).astype(ml_dtypes.float8_e4m3fn)
        proto.graph.initializer.append(onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT8E4M3FN, [8, 8],
                                                               q.view(np.uint8).tobytes(), raw=True))
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(np.full(8, 0.5, np.float32), "s"),
                                    onnx.numpy_helper.from_array(np.array([2], np.int64), "k"),
                                    onnx.numpy_helper.from_array(np.array([1, 4], np.int64), "reps")])
    placement = get_capability(ir.from_proto(proto), "maia100")
    by_name = {n.name: n for n in placement.nodes}
    dq2 = next(n for n in placement.nodes if n.op_type == "DequantizeLinear" and n.index == 1)
    last = next(n for n in placement.nodes if n.op_type == "MatMul" and n.index > 3)
    assert len(placement.partitions) == 2  # before the pull: 3 (the DQ of w2 alone at level 0)
    assert dq2.partition == last.partition != by_name[placement.nodes[2].name].partition


def test_index_arithmetic_feeding_a_host_op_moves_to_the_host():
    # a mask built from shapes (device-capable index ops) read by GatherND (host): computed first, fed in
    proto = onnx.parser.parse_model("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2,4] x, int64[2,1] idx) => (float[2,4] y) {
      s = Shape(x)
      n = Gather<axis=0>(s, one)
      r = Range(zero, n, one)
      c = Less(r, three)
      e = Expand(c, s)
      m = GatherND(e, idx)
      h = MatMul(x, w)
      z = Relu(h)
      y = Where(m, z, h)
    }""")
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")] + [
        onnx.numpy_helper.from_array(np.array(v, np.int64), k) for k, v in (("zero", 0), ("one", 1), ("three", 3))])
    placement = get_capability(ir.from_proto(proto), "maia100")
    hoisted = {n.op_type for n in placement.nodes if n.reason == HOISTED}
    assert hoisted == {"Shape", "Gather", "Range", "Less", "Expand"}  # before: their own partition, and Where cut off
    assert len(placement.partitions) == 1
    assert {placement.nodes[i].op_type for i in placement.partitions[0].node_indices} == {"MatMul", "Relu", "Where"}
    feeds = {"x": np.arange(8, dtype=np.float32).reshape(2, 4) - 3, "idx": np.array([[1], [0]])}
    result = compile_model(ir.from_proto(proto))  # the host part runs first, the device partition gets its mask
    got = EmulatorSession(result.model).run(None, feeds)[0]
    np.testing.assert_array_equal(got, run_model(ir.from_proto(proto), feeds)["y"])


def test_folding_touches_only_index_arithmetic():
    proto = onnx.parser.parse_model("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[batch,4] x) => (float[batch,4] y) {
      s = Shape<start=1>(x)
      n = Reshape(x, s2)
      q = QuantizeLinear(w, sc, z)
      d = DequantizeLinear(q, sc, z)
      w2 = Mul(w, two)
      a = MatMul(x, d)
      b = MatMul(a, w2)
      e = Expand(b, s)
      y = Add(e, n)
    }""")
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
                                    onnx.numpy_helper.from_array(np.array(0.5, np.float32), "sc"),
                                    onnx.helper.make_tensor("z", onnx.TensorProto.FLOAT8E4M3FN, [], [0]),
                                    onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                                    onnx.numpy_helper.from_array(np.array([-1, 4], np.int64), "s2")])
    model = ir.from_proto(proto)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    reference = _outputs(ir.from_proto(proto), feeds)
    assert fold_host_arithmetic(model) == 1  # Shape of the static dim; symbolic batch, QDQ and float Mul stay
    assert [n.op_type for n in model.graph] == ["Constant", "Reshape", "QuantizeLinear", "DequantizeLinear", "Mul", "MatMul",
                                                "MatMul", "Expand", "Add"]
    np.testing.assert_array_equal(_outputs(model, feeds)["y"], reference["y"])


# ---------------------------------------------------------------------------------------------------------------
# fusions on exported decoders


EXPECTED = {  # rule -> fused count on the tiny FP32 exports (2 layers: 2x2+1 norms, 2x2 ropes, 2 attentions, 2 MLPs)
    "llama": {"RMSNorm": 5, "Rotary": 4, "Attention": 2, "SiLU": 2},
    "gemma2": {"RMSNorm-scale-last": 9, "Rotary": 4},  # soft-capped logits: no Attention pattern
    "gpt2": {"Attention": 2, "GELU-tanh": 2},  # LayerNormalization and Gemm come exported
}


@pytest.mark.parametrize("name", DECODERS)
def test_fused_decoder_matches_unfused(name, hf_decoder):
    fp32, _ = hf_decoder(name)
    model = ir.load(fp32)
    feeds = make_inputs(model, seed=1, dims=DIMS)
    reference = _outputs(fp32, feeds)
    fold_host_arithmetic(model)
    report = fuse_device_partitions(model, get_capability(model, "maia100"))
    applied = {s.rule: s.applied for s in report.rules if s.applied}
    assert applied == EXPECTED.get(name, EXPECTED["llama"])
    assert not any(s.refused for s in report.rules)
    ops = {n.op_type for n in model.graph}
    assert "Softmax" not in ops or name == "gemma2"
    got = _outputs(model, feeds)
    for out, ref in reference.items():
        assert compare(ref, got[out])["max_rel"] <= 1e-5, out


def test_fp8_decoder_refuses_fusions_that_would_change_quantized_values(hf_decoder):
    _, fp8 = hf_decoder("llama")
    model = ir.load(fp8)
    feeds = make_inputs(model, seed=1, dims=DIMS)
    reference = _outputs(fp8, feeds)
    report = fuse_device_partitions(model, get_capability(model, "maia100"))
    stats = {s.rule: s for s in report.rules}
    assert dict(stats["Attention"].refused) == {"would drop a quantization point (QuantizeLinear inside the fused Attention)": 2}
    not_exact = "is not bit-identical to the unfused ops and its output feeds a QuantizeLinear (the quantized values could change)"
    assert dict(stats["RMSNorm"].refused) == {f"RMSNormalization {not_exact}": 5}
    assert dict(stats["Rotary"].refused) == {f"RotaryEmbedding {not_exact}": 4}
    assert stats["SiLU"].applied == 2 and not stats["SiLU"].refused  # exact: the Mul after it is quantized as before
    got = _outputs(model, feeds)
    for out, ref in reference.items():
        np.testing.assert_array_equal(got[out], ref, err_msg=out)  # the quantized path is untouched bit for bit
    # the compile report carries the same table
    row = next(r for r in report.to_dict()["rules"] if r["rule"] == "Attention")
    assert row["applied"] == 0 and row["refused"] == 2


def test_fusion_never_swallows_a_host_node(hf_decoder, tmp_path):
    fp32, _ = hf_decoder("llama")
    result = compile_model(fp32, tmp_path / "c.onnx", excluded_ops=["Softmax"], dims=DIMS)
    stats = {s.rule: s for s in result.fusions.rules}
    assert stats["Attention"].applied == 0
    assert dict(stats["Attention"].refused) == {"matched nodes run on the host (fusions stay inside device partitions)": 2}
    assert stats["RMSNorm"].applied == 5


# ---------------------------------------------------------------------------------------------------------------
# each rule on its own: the fused op appears, exactness as claimed, the check says why it refuses


def _run_text(text: str, inits: dict, feeds: dict, rules: list[FusionRule]):
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in inits.items())
    reference = _outputs(ir.from_proto(proto), feeds)
    model = ir.from_proto(proto)
    report = fuse_device_partitions(model, get_capability(model, "maia100"), rules)
    return model, report, reference, _outputs(model, feeds)


RMS = """<ir_version: 10, opset_import: ["" : 21]>
g (float[2,5,{d}] x) => (float[2,5,{d}] y) {{
  p = Pow(x, two)
  m = ReduceMean<keepdims=1>(p, axes)
  a = Add(m, eps)
  s = Sqrt(a)
  r = Reciprocal(s)
  n = Mul(x, r)
  y = Mul(w, n)
}}"""


@pytest.mark.parametrize("width", [32, 64, 1000])
def test_rmsnorm_fuses_within_tolerance(width):
    rng = np.random.default_rng(width)
    inits = {"two": np.array(2.0, np.float32), "axes": np.array([-1]), "eps": np.array(1e-6, np.float32),
             "w": rng.standard_normal(width).astype(np.float32)}
    x = rng.standard_normal((2, 5, width)).astype(np.float32)
    model, report, ref, got = _run_text(RMS.format(d=width), inits, {"x": x}, [RmsNormFusion(True)])
    assert [n.op_type for n in model.graph] == ["RMSNormalization"] and report.applied == 1
    assert compare(ref["y"], got["y"])["max_rel"] <= 1e-6
    # the check's reason when the epsilon is not a constant
    text = RMS.format(d=width).replace("float[2,5,%d] x)" % width, "float[2,5,%d] x, float eps)" % width)
    _, report, _, _ = _run_text(text, {k: v for k, v in inits.items() if k != "eps"},
                                {"x": x, "eps": np.array(1e-6, np.float32)}, [RmsNormFusion(True)])
    assert report.applied == 0 and dict(report.rules[0].refused) == {"epsilon is not a constant scalar": 1}


def test_layernorm_fuses_within_tolerance():
    rng = np.random.default_rng(0)
    text = """<ir_version: 10, opset_import: ["" : 21]>
    g (float[3,7,48] x) => (float[3,7,48] y) {
      mu = ReduceMean<keepdims=1>(x, axes)
      d = Sub(x, mu)
      dd = Mul(d, d)
      var = ReduceMean<keepdims=1>(dd, axes)
      ve = Add(var, eps)
      sd = Sqrt(ve)
      n = Div(d, sd)
      sc = Mul(n, w)
      y = Add(sc, b)
    }"""
    inits = {"axes": np.array([-1]), "eps": np.array(1e-5, np.float32), "w": rng.standard_normal(48).astype(np.float32),
             "b": rng.standard_normal(48).astype(np.float32)}
    model, report, ref, got = _run_text(text, inits, {"x": rng.standard_normal((3, 7, 48)).astype(np.float32)},
                                        [LayerNormFusion()])
    assert [n.op_type for n in model.graph] == ["LayerNormalization"] and report.applied == 1
    assert compare(ref["y"], got["y"])["max_rel"] <= 1e-6


ACT = """<ir_version: 10, opset_import: ["" : 21]>
g (float[4,7,64] x) => (float[4,7,64] y) {{ {body} }}"""


@pytest.mark.parametrize("rule, body, op", [
    (SiluFusion(False), "s = Sigmoid(x)\n y = Mul(x, s)", "Swish"),
    (SiluFusion(True), "s = Sigmoid(x)\n y = Mul(s, x)", "Swish"),
    (GeluErfFusion(), "t = Div(x, c)\n e = Erf(t)\n a = Add(e, one)\n m = Mul(x, a)\n y = Mul(m, half)", "Gelu"),
    (GeluTanhFusion(), "p = Pow(x, three)\n k3 = Mul(p, k)\n i = Add(x, k3)\n j = Mul(i, s2pi)\n t = Tanh(j)\n"
                       " u = Add(t, one)\n h = Mul(x, half)\n y = Mul(h, u)", "Gelu"),
])
def test_activation_fusions_exact_as_claimed(rule, body, op):
    x = (np.random.default_rng(0).standard_normal((4, 7, 64)) * 3).astype(np.float32)
    inits = {"c": np.array(np.sqrt(2.0), np.float32), "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32),
             "three": np.array(3.0, np.float32), "k": np.array(0.044715, np.float32),
             "s2pi": np.array(np.sqrt(2 / np.pi), np.float32)}
    used = {k: v for k, v in inits.items() if k in body.replace("\n", " ").replace(",", " ").replace(")", " ").split()}
    model, report, ref, got = _run_text(ACT.format(body=body), used, {"x": x}, [rule])
    assert [n.op_type for n in model.graph] == [op] and report.applied == 1
    if rule.exact:
        np.testing.assert_array_equal(got["y"], ref["y"])
    else:
        assert compare(ref["y"], got["y"])["max_rel"] <= 1e-6


ATTN = """<ir_version: 10, opset_import: ["" : 21]>
g (float[2,{h},5,8] q, float[2,{h},7,8] k, float[2,{h},7,8] v, float[2,1,5,7] mask) => (float[2,{h},5,8] y) {{
  kt = Transpose<perm=[0,1,3,2]>(k)
  s = MatMul(q, kt)
  t = Mul(s, scale)
  l = Add(t, mask)
  p = Softmax<axis=-1>(l)
  y = MatMul(p, v)
}}"""


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_fusion_is_bit_exact(heads):
    rng = np.random.default_rng(heads)
    feeds = {n: rng.standard_normal((2, heads, s, 8)).astype(np.float32) for n, s in (("q", 5), ("k", 7), ("v", 7))}
    mask = np.where(rng.random((2, 1, 5, 7)) > 0.3, 0, np.finfo(np.float32).min).astype(np.float32)
    mask[..., 0] = 0
    feeds["mask"] = mask
    model, report, ref, got = _run_text(ATTN.format(h=heads), {"scale": np.array(8 ** -0.5, np.float32)}, feeds,
                                        [AttentionFusion()])
    assert [n.op_type for n in model.graph] == ["Attention"] and report.applied == 1
    assert AttentionFusion.exact
    np.testing.assert_array_equal(got["y"], ref["y"])


def test_rotary_fusion_and_its_refusal_reasons(hf_decoder):
    fp32, _ = hf_decoder("llama")
    model = ir.load(fp32)
    report = fuse_device_partitions(model, get_capability(model, "maia100"), [RotaryFusion()])
    assert report.applied == 4 and sum(1 for n in model.graph if n.op_type == "RotaryEmbedding") == 4
    # break the equal-halves proof: the check says so instead of fusing
    model = ir.load(fp32)
    cos = next(n for n in model.graph if n.op_type == "Cos")
    concat = cos.inputs[0].producer()
    concat.replace_input_with(1, concat.inputs[0].producer().inputs[0])  # Concat(freqs, positions): halves differ
    report = fuse_device_partitions(model, get_capability(model, "maia100"), [RotaryFusion()])
    assert report.applied == 0  # cos and sin share the Concat: every rope refuses, with its reason
    assert dict(report.rules[0].refused) == {"cos table halves are not provably equal (Concat(freqs, freqs))": 4}


def test_default_rules_declare_exactness_and_ops():
    rules = default_rules()
    assert {r.op for r in rules} == {"RMSNormalization", "LayerNormalization", "RotaryEmbedding", "Attention", "Swish", "Gelu"}
    assert {r.name for r in rules if r.exact} == {"Attention", "SiLU", "SiLU-sigmoid-first"}


# ---------------------------------------------------------------------------------------------------------------
# the self-check


class _BrokenSilu(FusionRule):
    """Deliberately wrong: x * sigmoid(x) -> Relu(x), claimed exact."""

    op, exact = "Relu", True

    def pattern(self, op, x):
        return op.Mul(x, op.Sigmoid(x))

    def rewrite(self, op, x, **_):
        return op.Relu(x)


def test_verification_refuses_a_broken_rewrite_and_writes_nothing(hf_decoder, tmp_path):
    fp32, _ = hf_decoder("llama")
    out = tmp_path / "out" / "c.onnx"
    out.parent.mkdir()
    with pytest.raises(ValidationError) as err:
        compile_model(fp32, out, fusion_rules=[_BrokenSilu()], embed=False, dims=DIMS)
    message = str(err.value)
    assert "\n" not in message and "output 'logits' relative error" in message and "nothing written" in message
    assert list(out.parent.iterdir()) == []  # no model, no side file, no staging directory
    # --no-verify would keep it: the check is what stopped the broken artifact
    result = compile_model(fp32, out, fusion_rules=[_BrokenSilu()], verify=False, dims=DIMS)
    assert result.verification is None and out.exists()
    feeds = make_inputs(ir.load(fp32), seed=0, dims=DIMS)
    got = EmulatorSession(str(out)).run(["logits"], feeds)[0]
    assert compare(run_model(fp32, feeds)["logits"], got)["max_rel"] > VERIFY_TOLERANCE


def test_cli_reports_fusions_and_no_verify(hf_decoder, tmp_path):
    _, fp8 = hf_decoder("llama")
    runner = CliRunner()
    out = tmp_path / "c.onnx"
    res = runner.invoke(cli, ["compile", str(fp8), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    import json

    report = json.loads(res.output)
    assert report["summary"]["partitions"] == 1 and report["summary"]["verified"]
    rules = {r["rule"]: r for r in report["fusions"]["rules"]}
    assert rules["Attention"]["refused"] == 2 and rules["SiLU"]["applied"] == 2
    assert report["verification"]["logits"]["max_abs"] == 0.0
    res = runner.invoke(cli, ["compile", str(fp8), "-o", str(out), "--no-verify", "--no-optimize"])
    assert res.exit_code == 0, res.output
    assert "1 partitions; 0 fused ops; wrote" in res.output
