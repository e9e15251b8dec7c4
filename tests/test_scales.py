"""Scales import/export: vLLM / ModelOpt names <-> ONNX weights, activations and KV-cache inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from maia_onnx.errors import UserError
from maia_onnx.io import load_model
from maia_onnx.scales import decoder_layer_index, emit_scales, layer_name, load_scales, map_scales, weight_targets, write_scales


def test_json_and_safetensors_round_trip(tmp_path):
    scales = {
        "model.layers.0.self_attn.q_proj.weight_scale": np.float32(0.0125),
        "model.layers.0.mlp.up_proj.weight_scale": np.array([0.5, 0.25, 0.125], np.float32),
        "model.layers.0.self_attn.k_scale": np.float32(0.03),
    }
    for ext in ("json", "safetensors"):
        path = write_scales(tmp_path / f"s.{ext}", scales)
        back = load_scales(path)
        assert set(back) == set(scales)
        for k, v in scales.items():
            np.testing.assert_array_equal(back[k], np.asarray(v, np.float32))
            assert back[k].shape == np.shape(v)
    assert json.loads((tmp_path / "s.json").read_text())["model.layers.0.self_attn.q_proj.weight_scale"] == pytest.approx(0.0125)


def test_safetensors_checkpoint_reads_only_scales(tmp_path):
    from safetensors.numpy import save_file

    save_file(
        {
            "model.layers.0.self_attn.q_proj.weight": np.ones((4, 4), np.float32),  # not a scale: ignored
            "model.layers.0.self_attn.q_proj.weight_scale": np.array(0.5, np.float32),
            "model.layers.0.self_attn.q_proj.input_scale": np.array([0.25], np.float32),
        },
        str(tmp_path / "ckpt.safetensors"),
    )
    got = load_scales(tmp_path / "ckpt.safetensors")
    assert sorted(got) == ["model.layers.0.self_attn.q_proj.input_scale", "model.layers.0.self_attn.q_proj.weight_scale"]


@pytest.mark.parametrize(
    "content,needle",
    [
        ("{not json", "not valid JSON"),
        ('{"a.weight": 1.0}', "no scales found"),
        ('{"a.weight_scale": -1.0}', "finite and > 0"),
        ('{"a.weight_scale": "x"}', "not a number"),
    ],
)
def test_bad_scale_files(tmp_path, content, needle):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(UserError, match=needle):
        load_scales(p)
    with pytest.raises(UserError, match="not found"):
        load_scales(tmp_path / "missing.json")
    with pytest.raises(UserError, match=r"\.json or \.safetensors"):
        write_scales(tmp_path / "out.txt", {"a.weight_scale": 1.0})


def test_decoder_layer_index():
    assert decoder_layer_index("model.layers.12.self_attn.k_scale") == 12
    assert decoder_layer_index("transformer.h.3.attn.k_scale") == 3
    assert decoder_layer_index("lm_head.weight_scale") is None


def test_layer_names_from_dynamo_metadata():
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2,4] x) => (float[2,4] y) {
      y = MatMul (x, val_3)
    }
    """
    import onnx

    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "val_3"))
    model = ir.from_proto(proto)
    node = model.graph.node(0)
    w = model.graph.initializers["val_3"]
    node.metadata_props["pkg.torch.onnx.name_scopes"] = "['', 'model.layers.0', 'model.layers.0.mlp.up_proj', 'linear']"
    assert layer_name(node, w) == "model.layers.0.mlp.up_proj"
    w.metadata_props["pkg.onnxscript.optimizer.folded_from"] = "['model.layers.0.mlp.gate_proj.weight']"
    assert layer_name(node, w) == "model.layers.0.mlp.gate_proj"


def vllm_style_scales():
    return {
        "model.layers.0.self_attn.q_proj.weight_scale": np.float32(0.002),
        "model.layers.0.self_attn.k_proj.weight_scale": np.float32(0.003),
        "model.layers.0.self_attn.q_proj.input_scale": np.float32(0.01),
        "model.layers.0.self_attn.k_proj.input_scale": np.float32(0.02),  # same input as q_proj: max wins
        "model.layers.0.mlp.down_proj.weight_scale": np.linspace(0.001, 0.002, 64).astype(np.float32),  # per channel
        "model.layers.0.self_attn.k_scale": np.float32(0.05),
        "model.layers.1.self_attn.v_scale": np.float32(0.07),
        "layers.1.mlp.up_proj.weight_scale": np.float32(0.004),  # no "model." prefix: suffix match
        "model.layers.9.mlp.up_proj.weight_scale": np.float32(1.0),  # no such layer
        "model.vision_tower.proj.input_scale": np.float32(1.0),  # no such layer
    }


def test_map_scales_onto_llama_tiny(llama_tiny_onnx):
    model = load_model(llama_tiny_onnx)
    layers = {t.layer for t in weight_targets(model.graph)}
    assert "model.layers.0.self_attn.q_proj" in layers and "lm_head" in layers
    smap, unmatched = map_scales(model, vllm_style_scales())
    assert sorted(unmatched) == ["model.layers.9.mlp.up_proj.weight_scale", "model.vision_tower.proj.input_scale"]
    assert smap.weight_scales["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(0.002)
    assert smap.weight_scales["model.layers.0.mlp.down_proj.weight"].shape == (64,)
    assert smap.weight_scales["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.004)
    # q_proj and k_proj read the same normed activation: one value, the larger scale
    q_node = next(t.node for t in weight_targets(model.graph) if t.layer == "model.layers.0.self_attn.q_proj")
    assert smap.activation_scales == {q_node.inputs[0].name: pytest.approx(0.02)}
    assert float(smap.kv[0]["k"]) == pytest.approx(0.05) and float(smap.kv[1]["v"]) == pytest.approx(0.07)


def test_import_quantize_emit_round_trip(llama_tiny_onnx, tmp_path):
    """--scales FILE -> FP8 quantization with those scales -> --emit-scales gives the same names and values."""
    from maia_onnx.passes.quantize_fp8 import QuantizeFp8Pass

    model = load_model(llama_tiny_onnx)
    imported = {k: v for k, v in vllm_style_scales().items() if "k_scale" not in k and "v_scale" not in k}
    smap, unmatched = map_scales(model, imported)
    QuantizeFp8Pass(weight_scales=smap.weight_scales, activation_scales=smap.activation_scales)(model)
    emitted = emit_scales(model)
    for name in (
        "model.layers.0.self_attn.q_proj.weight_scale",
        "model.layers.0.self_attn.k_proj.weight_scale",
        "model.layers.0.mlp.down_proj.weight_scale",
        "layers.1.mlp.up_proj.weight_scale",
    ):
        key = name if name.startswith("model.") else "model." + name  # emitted under the graph's full name
        np.testing.assert_allclose(emitted[key], np.asarray(imported[name]).reshape(emitted[key].shape), rtol=1e-7)
    assert float(emitted["model.layers.0.self_attn.q_proj.input_scale"]) == pytest.approx(0.02)
    # every quantized linear layer is emitted (15 in llama-tiny), each under its checkpoint name
    assert sum(k.endswith(".weight_scale") for k in emitted) == 15
    assert "lm_head.weight_scale" in emitted
    write_scales(tmp_path / "out.safetensors", emitted)
    back = load_scales(tmp_path / "out.safetensors")
    # re-importing what we wrote lands on the same graph weights
    smap2, unmatched2 = map_scales(load_model(llama_tiny_onnx), back)
    assert unmatched2 == []
    assert set(smap2.weight_scales) == {t.weight.name for t in weight_targets(load_model(llama_tiny_onnx).graph)}



CLAMPED_LAYER = """
<ir_version: 10, opset_import: ["" : 21]>
agraph (float[2, 4] x) => (float[2, 3] y) <
    float8e4m3fn[4, 3] W1 = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12},
    float[3] ws = {0.5, 0.25, 0.125},
    float xs = {0.03},
    float8e4m3fn zp = {0},
    float lo = {0.0},
    float hi = {6.0}
> {
    xq = QuantizeLinear <saturate = 1> (x, xs, zp)
    xd = DequantizeLinear (xq, xs, zp)
    w = DequantizeLinear <axis = 1> (W1, ws)
    CLAMPS
    y = MatMul (LAYER_INPUT, w)
}
"""


@pytest.mark.parametrize("clamps, layer_input, has_input_scale", [
    ("", "xd", True),  # the DQ feeds the layer directly
    ("a = Relu (xd)", "a", True),
    ("a = Clip (xd, lo, hi)", "a", True),
    ("r = Relu (xd)\n    a = Relu (r)", "a", False),  # only one clamp is looked through
    ("a = Sigmoid (xd)", "a", False),  # not a clamp
])
def test_emitted_input_scale_looks_through_one_relu_or_clip(clamps, layer_input, has_input_scale):
    """Q -> DQ -> Relu/Clip -> MatMul (QuantizeFp8Pass's placement after a clamp) still yields <layer>.input_scale."""
    text = CLAMPED_LAYER.replace("CLAMPS", clamps).replace("LAYER_INPUT", layer_input)
    emitted = emit_scales(ir.from_onnx_text(text))
    np.testing.assert_array_equal(emitted["W1.weight_scale"], np.float32([0.5, 0.25, 0.125]))
    if has_input_scale:
        assert emitted["W1.input_scale"].shape == () and float(emitted["W1.input_scale"]) == pytest.approx(0.03)
    else:
        assert "W1.input_scale" not in emitted
