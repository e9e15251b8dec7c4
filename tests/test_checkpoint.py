"""Tests for maia_onnx/partition/checkpoint.py: safetensors shard checkpoints, written and swapped back into partitions."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from maia_onnx.partition.checkpoint import (
    load_checkpoint,
    read_safetensors,
    read_safetensors_header,
    save_checkpoint,
    write_safetensors,
)
from maia_onnx.errors import InvalidOptionError, ModelLoadError, UserError
from maia_onnx.io import load_model, sha256_file
from maia_onnx.ortutil import run_model
from maia_onnx.partition import partition_model
from maia_onnx.runtime.executor import run_partition
from test_pipeline_parallel import feeds_for, toy_decoder  # tests/ is on sys.path (pytest prepend mode)


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5)).astype(np.float32) * 100
    return {
        "f32": x,
        "f16": x.astype(np.float16),
        "bf16": x.astype(ml_dtypes.bfloat16),
        "e4m3": np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn),
        "e5m2": x.astype(ml_dtypes.float8_e5m2),
        "i64": np.arange(7, dtype=np.int64),
        "u8": np.arange(4, dtype=np.uint8).reshape(2, 2),
        "flag": np.array([True, False]),
        "scalar": np.array(1.5, dtype=np.float32),
    }


def test_safetensors_round_trip_all_dtypes(tmp_path):
    arrays = _arrays()
    path, digest = write_safetensors(tmp_path / "a.safetensors", [(k, ir.Tensor(v, name=k)) for k, v in arrays.items()], {"who": "test"})
    assert digest == sha256_file(path)
    back = read_safetensors(path)
    for name, arr in arrays.items():
        got = back[name].numpy()
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert got.tobytes() == arr.tobytes(), name  # bit-exact, FP8 included
    header, meta, _ = read_safetensors_header(path)
    assert header["e4m3"]["dtype"] == "F8_E4M3" and header["e5m2"]["dtype"] == "F8_E5M2" and header["bf16"]["dtype"] == "BF16"
    assert meta == {"who": "test"}


def test_files_are_standard_safetensors(tmp_path):
    """The reference safetensors reader gets the same values (numpy for plain dtypes, torch for FP8/BF16)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    arrays = _arrays()
    path, _ = write_safetensors(tmp_path / "a.safetensors", [(k, ir.Tensor(v, name=k)) for k, v in arrays.items()])
    plain = {k: v for k, v in arrays.items() if k in ("f32", "f16", "i64", "u8", "flag", "scalar")}
    path_plain, _ = write_safetensors(tmp_path / "plain.safetensors", [(k, ir.Tensor(v, name=k)) for k, v in plain.items()])
    loaded = load_file(str(path_plain))
    for k, v in plain.items():
        np.testing.assert_array_equal(loaded[k], v)
    torch = pytest.importorskip("torch")
    with safe_open(str(path), "pt") as f:
        e4m3 = f.get_tensor("e4m3")
        assert e4m3.dtype == torch.float8_e4m3fn
        np.testing.assert_array_equal(e4m3.float().numpy(), arrays["e4m3"].astype(np.float32))
        np.testing.assert_array_equal(f.get_tensor("bf16").float().numpy(), arrays["bf16"].astype(np.float32))


def test_checkpoint_swaps_weights_into_a_partition(tmp_path):
    # Two models with one graph and different weights: A's partition + B's checkpoint = B's outputs.
    model_a, model_b = toy_decoder(4, seed=0), toy_decoder(4, seed=1)
    partition_model(ir.from_proto(model_a), tmp_path / "a", pp=2)
    partition_model(ir.from_proto(model_b), tmp_path / "b", pp=2)
    index = save_checkpoint(tmp_path / "b", tmp_path / "ckpt_b")
    assert sorted(index["files"]) == ["rank0_stage0.safetensors", "rank0_stage1.safetensors"]
    for name, entry in index["files"].items():
        assert entry["sha256"] == sha256_file(tmp_path / "ckpt_b" / name)
    shard = load_model(tmp_path / "b" / "rank0_stage1.onnx")
    saved = read_safetensors(tmp_path / "ckpt_b" / "rank0_stage1.safetensors")
    assert set(saved) == set(shard.graph.initializers)
    for name, value in shard.graph.initializers.items():
        np.testing.assert_array_equal(saved[name].numpy(), value.const_value.numpy())

    report = load_checkpoint(tmp_path / "a", tmp_path / "ckpt_b", tmp_path / "a_with_b")
    assert report["tensors_swapped"] == sum(e["tensors"] for e in index["files"].values())
    feeds = feeds_for(4)
    got = run_partition(tmp_path / "a_with_b", feeds)
    expected = run_model(ir.from_proto(model_b), feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6)
    # the shard files are exactly B's: same layout writer, same weights
    for f in os.listdir(tmp_path / "b"):
        if f.endswith((".onnx", ".data")):
            assert sha256_file(tmp_path / "b" / f) == sha256_file(tmp_path / "a_with_b" / f), f
    # the input partition is untouched
    np.testing.assert_allclose(run_partition(tmp_path / "a", feeds)["out"], run_model(ir.from_proto(model_a), feeds)["out"], rtol=1e-6)


def test_checkpoint_mismatches_are_one_line_errors(tmp_path):
    partition_model(ir.from_proto(toy_decoder(4)), tmp_path / "pp2", pp=2)
    partition_model(ir.from_proto(toy_decoder(4)), tmp_path / "pp3", pp=3)
    partition_model(ir.from_proto(toy_decoder(4, widths=[16, 8, 8, 8])), tmp_path / "wide", pp=2)
    save_checkpoint(tmp_path / "pp3", tmp_path / "ck3")
    save_checkpoint(tmp_path / "wide", tmp_path / "ckwide")
    with pytest.raises(InvalidOptionError, match="holds 3 shard file") as e:
        load_checkpoint(tmp_path / "pp2", tmp_path / "ck3", tmp_path / "out")
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidOptionError, match="expects FLOAT"):
        load_checkpoint(tmp_path / "pp2", tmp_path / "ckwide", tmp_path / "out")
    save_checkpoint(tmp_path / "pp2", tmp_path / "ck2")
    with open(tmp_path / "ck2" / "rank0_stage1.safetensors", "r+b") as f:  # flip one weight byte
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ModelLoadError, match="sha256"):
        load_checkpoint(tmp_path / "pp2", tmp_path / "ck2", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelLoadError, match="no checkpoint.json"):
        load_checkpoint(tmp_path / "pp2", tmp_path / "pp3", tmp_path / "out")
    with pytest.raises(UserError, match="partition directory itself"):
        save_checkpoint(tmp_path / "pp2", tmp_path / "pp2")


def _fp8_model() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    text = """<ir_version: 10, opset_import: ["" : 21]>
fp8 (float[B,16] x) => (float[B,8] y) <float scale = {0.05}>
{
  w = DequantizeLinear(w8, scale)
  y = MatMul(x, w)
}"""
    proto = onnx.parser.parse_model(text)
    w = (rng.standard_normal((16, 8)) * 10).astype(ml_dtypes.float8_e4m3fn)
    tensor = onnx.helper.make_tensor("w8", onnx.TensorProto.FLOAT8E4M3FN, [16, 8], w.view(np.uint8).tobytes(), raw=True)
    proto.graph.initializer.append(tensor)
    onnx.checker.check_model(proto)
    return proto


def test_fp8_weights_stay_one_byte(tmp_path):
    proto = _fp8_model()
    partition_model(ir.from_proto(proto), tmp_path / "p", pp=1)
    save_checkpoint(tmp_path / "p", tmp_path / "ck")
    header, _, _ = read_safetensors_header(tmp_path / "ck" / "rank0_stage0.safetensors")
    assert header["w8"]["dtype"] == "F8_E4M3"
    assert header["w8"]["data_offsets"][1] - header["w8"]["data_offsets"][0] == 16 * 8  # one byte per weight
    load_checkpoint(tmp_path / "p", tmp_path / "ck", tmp_path / "p2")
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_array_equal(run_partition(tmp_path / "p2", {"x": x})["y"], run_model(ir.from_proto(proto), {"x": x})["y"])
    index = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    assert index["files"]["rank0_stage0.safetensors"]["bytes"] == 16 * 8 + 4
