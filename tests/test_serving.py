"""--emit-checkpoint: compressed-tensors FP8 checkpoints that transformers (and so vLLM / SGLang) load, matching
the ONNX FP8 model, and whose scales read back."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
import transformers
from textdata import tiny_llama, write_text

from maia_onnx.accuracy import float_io_model
from maia_onnx.errors import InvalidOptionError, UnsupportedModelError, UserError
from maia_onnx.export import export_model
from maia_onnx.ortutil import run_model
from maia_onnx.quantize import quantize_model
from maia_onnx.scales import emit_scales
from maia_onnx.serving import emit_checkpoint, find_scales, read_checkpoint_scales

pytest.importorskip("compressed_tensors", reason="compressed-tensors (dev extra) loads the checkpoint back in transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    hf_dir = tiny_llama(root / "llama")
    fp32 = export_model(f"hf:{hf_dir}", root / "llama.onnx").path
    weights_only = root / "wo.onnx"
    quantize_model(fp32, weights_only, format="fp8-e4m3", weights_only=True, evaluate=False)
    w8a8 = root / "w8a8.onnx"
    quantize_model(fp32, w8a8, format="fp8-e4m3", calib="random", kv_cache="fp8-e4m3", evaluate=False)
    return {"root": root, "hf": hf_dir, "fp32": fp32, "wo": weights_only, "w8a8": w8a8}


def _onnx_logits(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    feeds = {"input_ids": ids}
    for value in model.graph.inputs:
        if value.name != "input_ids":
            feeds[value.name] = np.zeros((ids.shape[0], 2, 0, 8), np.float32)
    return run_model(float_io_model(model), feeds)["logits"]


def _load(directory):
    config = transformers.CompressedTensorsConfig(run_compressed=False)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, quantization_config=config).eval()


def test_weight_only_checkpoint_loads_in_transformers_and_matches_onnx(llama, tmp_path):
    model = ir.load(str(llama["wo"]))
    info = emit_checkpoint(model, tmp_path / "ckpt", activation_scheme="none")
    assert info["linears"] == 15 and info["weight_strategy"] == "channel"  # 7 per layer x 2 + lm_head
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "float-quantized"
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    loaded = _load(tmp_path / "ckpt")
    ids = np.array([[3, 5, 7, 9, 11, 4, 20, 21]], dtype=np.int64)
    with torch.no_grad():
        torch_logits = loaded(torch.from_numpy(ids)).logits.float().numpy()
    onnx_logits = _onnx_logits(model, ids)
    assert np.abs(torch_logits - onnx_logits).max() <= 1e-5 * np.abs(onnx_logits).max()
    # and it is the FP8 model, not the FP32 one
    fp32 = _onnx_logits(ir.load(str(llama["fp32"])), ids)
    assert np.abs(fp32 - onnx_logits).max() > 1e-4 * np.abs(fp32).max()


def test_static_checkpoint_carries_the_onnx_scales(llama, tmp_path):
    model = ir.load(str(llama["w8a8"]))
    found = find_scales(model)
    emit_checkpoint(model, tmp_path / "ckpt")
    scales = read_checkpoint_scales(tmp_path / "ckpt")
    q = "model.layers.0.self_attn.q_proj"
    assert scales[f"{q}.input_scale"] == pytest.approx(found.linears[q].input_scale, rel=0)
    np.testing.assert_array_equal(scales[f"{q}.weight_scale"], found.linears[q].scale)
    assert scales["model.layers.1.self_attn.k_scale"] == pytest.approx(found.kv[1][0], rel=0)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"]["type"] == "float"
    assert config["config_groups"]["group_0"]["input_activations"]["strategy"] == "tensor"
    loaded = _load(tmp_path / "ckpt")  # loads: every tensor is where transformers expects it
    assert loaded.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)


def test_refusals_are_one_line(llama, tmp_path):
    with pytest.raises(UnsupportedModelError, match="no FP8 linear weights"):
        emit_checkpoint(ir.load(str(llama["fp32"])), tmp_path / "x")
    with pytest.raises(UnsupportedModelError, match="no static input scale"):
        emit_checkpoint(ir.load(str(llama["wo"])), tmp_path / "y", activation_scheme="static")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_quantize_emits_a_checkpoint_whose_scales_requantize_identically(llama, tmp_path):
    text = write_text(tmp_path / "calib.txt")
    ckpt, first, second = tmp_path / "ckpt", tmp_path / "first.onnx", tmp_path / "second.onnx"
    # no attention matmuls: every activation scale is a linear's input_scale, so all of them travel in the checkpoint
    options = dict(format="fp8-e4m3", attention=False, kv_cache="fp8-e4m3", show_progress=False)
    made = quantize_model(llama["fp32"], first, calib=f"text:{text}", seq_len=16, eval_samples=2, emit_checkpoint=ckpt,
                          **options)
    info = made.report["checkpoint"]
    assert info["path"] == str(ckpt) and info["activation_scheme"] == "static" and info["kv_cache_layers"] == 2
    assert made.report["accuracy"]["task"] == "decoder"
    assert _load(ckpt).model.layers[1].mlp.down_proj.weight.shape == (32, 64)  # transformers loads it
    emitted = emit_scales(ir.load(str(first)))
    for scales in (ckpt, ckpt / "model.safetensors"):  # the directory, or its .safetensors
        again = quantize_model(llama["fp32"], second, calib=None, scales=str(scales), evaluate=False, **options)
        assert again.report["scales_import"]["unmatched"] == []
        assert {k: np.float32(v) for k, v in again.activation_scales.items()} == \
               {k: np.float32(v) for k, v in made.activation_scales.items()}
        reimported = emit_scales(ir.load(str(second)))
        assert sorted(reimported) == sorted(emitted)
        for name, value in emitted.items():  # input, weight and KV-cache scales, bit for bit
            np.testing.assert_array_equal(reimported[name], value, err_msg=name)


def test_emit_checkpoint_is_refused_before_any_work(llama, tmp_path):
    with pytest.raises(InvalidOptionError, match="compressed-tensors FP8"):
        quantize_model(llama["fp32"], tmp_path / "q.onnx", format="mxfp8-e4m3", emit_checkpoint=tmp_path / "c")
    with pytest.raises(InvalidOptionError, match="quantized activations"):
        quantize_model(llama["fp32"], tmp_path / "q.onnx", weights_only=True, activation_scheme="static",
                       emit_checkpoint=tmp_path / "c")
    model = ir.load(str(llama["fp32"]))
    model.metadata_props.pop("maia_onnx.source")
    with pytest.raises(UserError, match="Hugging Face checkpoint"):
        quantize_model(model, tmp_path / "q.onnx", weights_only=True, emit_checkpoint=tmp_path / "c")
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "c").exists()
