"""The main job end to end (what demo.sh runs): export -> FP8 + FP8 KV cache -> TP2 x PP2 -> compile -> run."""

from __future__ import annotations

import ml_dtypes
import numpy as np

import maia_onnx
from maia_onnx.ortutil import compare, make_inputs, run_model


def test_fp8_kv_cache_model_partitions_compiles_and_runs_exactly(llama_tiny_onnx, tmp_path):
    fp8 = tmp_path / "llama_fp8.onnx"
    result = maia_onnx.quantize_model(llama_tiny_onnx, fp8, format="fp8-e4m3", calib="random", kv_cache="fp8-e4m3",
                                      show_progress=False)
    # FP8 vs FP32 on held-out samples, and the 32-step decode through the FP8 cache
    assert result.report["accuracy"]["outputs"]["logits"]["cosine"] > 0.99
    assert len(result.report["decode"]["steps"]) == 32 and result.report["decode"]["min_cosine"] > 0.98

    model = maia_onnx.load_model(fp8)
    cache_inputs = [v for v in model.graph.inputs if v.name.startswith("past_key_values.")]
    assert cache_inputs and all(v.dtype.name == "FLOAT8E4M3FN" for v in cache_inputs)
    feeds = make_inputs(model, seed=3, dims={"batch": 2, "seq": 5, "past": 4})
    assert feeds[cache_inputs[0].name].dtype == ml_dtypes.float8_e4m3fn
    reference = run_model(fp8, feeds)

    maia_onnx.partition_file(fp8, tmp_path / "tp2pp2", tp=2, pp=2)
    sharded = maia_onnx.run_partition(tmp_path / "tp2pp2", feeds)
    # the shards compute what the whole FP8 model computes (FP32 accumulation order may differ slightly)
    for name, ref in reference.items():
        assert sharded[name].dtype == ref.dtype
        assert compare(ref, sharded[name])["max_rel"] <= 1e-3, name

    maia_onnx.compile_model(fp8, tmp_path / "ctx.onnx", device="maia100")
    sess = maia_onnx.InferenceSession(tmp_path / "ctx.onnx", providers=["MaiaExecutionProvider", "CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    compiled = dict(zip(names, sess.run(names, feeds)))
    for name, ref in reference.items():
        np.testing.assert_array_equal(np.asarray(compiled[name]).view(np.uint8) if ref.dtype.itemsize == 1 else compiled[name],
                                      ref.view(np.uint8) if ref.dtype.itemsize == 1 else ref, err_msg=name)
