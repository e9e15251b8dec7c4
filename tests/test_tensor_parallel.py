"""Tensor-parallel pass: structural Megatron split, collectives, per-rank weights, numerics vs the unsharded model."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import ShapeInferencePass

from maia_onnx import quantize
from maia_onnx.errors import InvalidOptionError, UnsupportedModelError
from maia_onnx.io import load_model
from maia_onnx.ortutil import compare, make_inputs, run_model
from maia_onnx.partition import new_manifest, read_manifest, write_partition
from maia_onnx.passes.tensor_parallel import TensorParallelPass, plan, split_model
from maia_onnx.runtime.executor import PartitionExecutor, run_partition

FP32_RTOL = 1e-5  # max error relative to the reference's largest magnitude


def _weights(rng, *shape):
    return "{" + ", ".join(f"{v:.6f}" for v in rng.standard_normal(shape).ravel() * 0.3) + "}"


def mlp_block_text(hidden=8, inner=16, seed=0) -> str:
    rng = np.random.default_rng(seed)
    return f"""
    <ir_version: 9, opset_import: ["" : 18]>
    mlp (float[B, S, {hidden}] x) => (float[B, S, {hidden}] y)
      <float[{hidden}, {inner}] w_up = {_weights(rng, hidden, inner)},
       float[{inner}] b_up = {_weights(rng, inner)},
       float[{inner}, {hidden}] w_down = {_weights(rng, inner, hidden)},
       float[{hidden}] b_down = {_weights(rng, hidden)}>
    {{
        up = MatMul(x, w_up)
        up_b = Add(up, b_up)
        act = Relu(up_b)
        down = MatMul(act, w_down)
        down_b = Add(down, b_down)
        y = Add(x, down_b)
    }}
    """


def attention_block_text(heads=4, head_dim=2, seed=1) -> str:
    """Self-attention with head-count constants in Reshape shapes, closing at a residual Add."""
    rng = np.random.default_rng(seed)
    h = heads * head_dim
    return f"""
    <ir_version: 9, opset_import: ["" : 18]>
    attn (float[2, 3, {h}] x) => (float[2, 3, {h}] y)
      <float[{h}, {h}] wq = {_weights(rng, h, h)}, float[{h}, {h}] wk = {_weights(rng, h, h)},
       float[{h}, {h}] wv = {_weights(rng, h, h)}, float[{h}, {h}] wo = {_weights(rng, h, h)},
       int64[4] heads_shape = {{2, 3, {heads}, {head_dim}}}, int64[3] merged_shape = {{2, 3, {h}}}>
    {{
        q = MatMul(x, wq)
        k = MatMul(x, wk)
        v = MatMul(x, wv)
        q4 = Reshape(q, heads_shape)
        k4 = Reshape(k, heads_shape)
        v4 = Reshape(v, heads_shape)
        qt = Transpose <perm = [0, 2, 1, 3]> (q4)
        kt = Transpose <perm = [0, 2, 3, 1]> (k4)
        vt = Transpose <perm = [0, 2, 1, 3]> (v4)
        scores = MatMul(qt, kt)
        probs = Softmax <axis = -1> (scores)
        ctx = MatMul(probs, vt)
        ctx_t = Transpose <perm = [0, 2, 1, 3]> (ctx)
        merged = Reshape(ctx_t, merged_shape)
        out = MatMul(merged, wo)
        y = Add(x, out)
    }}
    """


def _partition_in_memory(model: ir.Model, tp: int, out_dir):
    """split_model + write_partition (the TP-only path without the pipeline pass)."""
    ranks, fragment = split_model(model, tp)
    manifest = new_manifest(tp, 1, model, None, None)
    manifest["stages"] = [
        {"stage": 0, "inputs": [v.name for v in ranks[0].graph.inputs], "outputs": [v.name for v in ranks[0].graph.outputs]}
    ]
    manifest["inputs"] = {v.name: fragment["inputs"].get(v.name, {"sharding": "replicated", "axis": None}) for v in model.graph.inputs}
    manifest["outputs"] = {
        v.name: dict(fragment["outputs"].get(v.name, {"sharding": "replicated", "axis": None}), stage=0)
        for v in model.graph.outputs
    }
    manifest["collectives"] = [
        dict(c, id=i, stage=0, group=list(range(tp))) for i, c in enumerate(fragment["collectives"])
    ]
    manifest["tensors"] = fragment["tensors"]
    write_partition(out_dir, {(t, 0): m for t, m in enumerate(ranks)}, manifest)
    return fragment


@pytest.mark.parametrize("tp", [2, 4])
def test_mlp_block_column_then_row_with_one_allreduce(tmp_path, tp):
    model = ir.from_onnx_text(mlp_block_text())
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)}
    reference = run_model(ir.from_onnx_text(mlp_block_text()), feeds)
    fragment = _partition_in_memory(model, tp, tmp_path / "p")
    assert [c["op"] for c in fragment["collectives"]] == ["AllReduce"]
    assert fragment["tensors"]["w_up"]["kind"] == "column" and fragment["tensors"]["w_up"]["axis"] == 1
    assert fragment["tensors"]["w_down"]["kind"] == "row" and fragment["tensors"]["w_down"]["axis"] == 0
    assert fragment["tensors"]["w_up"]["shards"][str(tp - 1)] == [16 - 16 // tp, 16]
    rank1 = load_model(tmp_path / "p" / "rank1_stage0.onnx")
    assert list(rank1.graph.initializers["w_up"].const_value.shape) == [8, 16 // tp]
    assert list(rank1.graph.initializers["w_down"].const_value.shape) == [16 // tp, 8]
    # row-parallel bias kept once: rank 1 adds it after the AllReduce, not before (no partial bias)
    allreduce = next(n for n in rank1.graph if n.op_type == "AllReduce")
    assert allreduce.domain == "com.microsoft" and allreduce.attributes["group_size"].as_int() == tp
    got = run_partition(tmp_path / "p", feeds)
    assert compare(reference["y"], got["y"])["max_rel"] < FP32_RTOL


@pytest.mark.parametrize("tp", [2, 4])
def test_attention_block_rewrites_head_constants(tmp_path, tp):
    model = ir.from_onnx_text(attention_block_text())
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)}
    reference = run_model(ir.from_onnx_text(attention_block_text()), feeds)
    fragment = _partition_in_memory(model, tp, tmp_path / "p")
    assert Counter(c["op"] for c in fragment["collectives"]) == {"AllReduce": 1}
    assert {k: v["kind"] for k, v in fragment["tensors"].items() if k.startswith("w")} == {
        "wq": "column", "wk": "column", "wv": "column", "wo": "row",
    }
    rank0 = load_model(tmp_path / "p" / "rank0_stage0.onnx")
    reshape_shapes = sorted(
        tuple(int(x) for x in n.inputs[1].const_value.numpy()) for n in rank0.graph if n.op_type == "Reshape"
    )
    assert (2, 3, 4 // tp, 2) in reshape_shapes and (2, 3, 8 // tp) in reshape_shapes
    got = run_partition(tmp_path / "p", feeds)
    assert compare(reference["y"], got["y"])["max_rel"] < FP32_RTOL


def test_tp_that_divides_nothing_is_rejected():
    model = ir.from_onnx_text(mlp_block_text(hidden=6, inner=9))
    with pytest.raises(InvalidOptionError, match="--tp 4 divides none"):
        split_model(model, 4)


def test_pass_api_checks_rank_and_returns_rank_model():
    with pytest.raises(InvalidOptionError, match="rank 2 is outside"):
        TensorParallelPass(2, rank=2)
    result = TensorParallelPass(2, rank=1)(ir.from_onnx_text(mlp_block_text()))
    assert result.modified
    assert list(result.model.graph.initializers["w_up"].const_value.shape) == [8, 8]
    assert "com.microsoft" in result.model.opset_imports
    # the typed result: plan, collectives and this rank's bytes
    assert result.plan.ok and result.plan.demoted == {}
    assert [c["op"] for c in result.collectives] == ["AllReduce"]
    assert result.weight_bytes == (8 * 8 + 8 + 8 * 8 + 8) * 4  # halves of w_up, b_up, w_down; b_down whole
    assert result.collective_bytes_per_token is None  # the text model has no value types
    typed = ShapeInferencePass()(ir.from_onnx_text(mlp_block_text())).model
    assert TensorParallelPass(2, rank=1)(typed).collective_bytes_per_token == 8 * 4  # one fp32 hidden vector


def test_pass_at_tp1_returns_an_unmodified_copy():
    model = ir.from_onnx_text(mlp_block_text())
    result = TensorParallelPass(1)(model)
    assert not result.modified and result.model is not model
    assert [n.op_type for n in result.model.graph] == [n.op_type for n in model.graph]


# ----------------------------------------------------------------------------------- planner refusals


def _refusals(found) -> dict[str, str]:
    """Refusal reasons by the output name of the refused node (node names are generated)."""
    model = found.rank0[0] if found.rank0 else None
    by_node = {n.name: n.outputs[0].name for n in model.graph} if model is not None else {}
    return {by_node.get(r.node, r.node): r.reason for r in found.refusals}


def test_planner_says_why_a_weight_stays_replicated(tmp_path):
    """w_up has 9 output features: it cannot split 2 ways, so it stays replicated (with the reason) while w_down
    still splits by columns; the result matches the unsharded model."""
    text = mlp_block_text(hidden=8, inner=9)
    found = plan(ir.from_onnx_text(text), 2)
    assert found.ok and found.reason is None
    assert _refusals(found)["up"] == "weight 'w_up' has 9 output features, not divisible by tp 2"
    assert found.refusals[0].action == "replicate"
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 3, 8)).astype(np.float32)}
    fragment = _partition_in_memory(ir.from_onnx_text(text), 2, tmp_path / "p")
    assert set(fragment["tensors"]) == {"w_down", "b_down"} and fragment["tensors"]["w_down"]["kind"] == "column"
    assert [c["op"] for c in fragment["collectives"]] == ["AllGather"]  # y (split like w_down's columns) gathered
    got = run_partition(tmp_path / "p", feeds)
    assert compare(run_model(ir.from_onnx_text(text), feeds)["y"], got["y"])["max_rel"] < FP32_RTOL


def test_planner_refuses_a_model_nothing_of_which_divides():
    found = plan(ir.from_onnx_text(mlp_block_text(hidden=6, inner=9)), 4)
    assert not found.ok and found.error is InvalidOptionError
    assert found.reason.startswith("--tp 4 divides none of this model's heads")
    assert "'w_up' has 9 output features, not divisible by tp 4" in found.reason
    assert "'w_down' has 6 output features, not divisible by tp 4" in found.reason
    with pytest.raises(InvalidOptionError, match="'w_up' has 9 output features"):
        found.check()


def test_planner_demotes_projections_whose_heads_do_not_divide(tmp_path):
    """3 heads at tp 2: the reshape to heads cannot divide, so Q, K and V are demoted (each with that reason)
    and only the output projection splits (by columns, gathered at the graph output)."""
    text = attention_block_text(heads=3, head_dim=2)
    found = plan(ir.from_onnx_text(text), 2)
    assert found.ok
    assert len(found.demoted) == 3
    assert all(reason.endswith("reshape of split axis to 3 not divisible by 2") for reason in found.demoted.values())
    reasons = _refusals(found)
    assert {k for k, v in reasons.items() if v.startswith("kept replicated by the plan")} == {"q", "k", "v"}
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 3, 6)).astype(np.float32)}
    fragment = _partition_in_memory(ir.from_onnx_text(text), 2, tmp_path / "p")
    assert {k: v["kind"] for k, v in fragment["tensors"].items()} == {"wo": "column"}
    assert len(fragment["demoted"]) == 3
    got = run_partition(tmp_path / "p", feeds)
    assert compare(run_model(ir.from_onnx_text(text), feeds)["y"], got["y"])["max_rel"] < FP32_RTOL


def test_planner_gathers_in_front_of_a_softmax_over_the_split_axis(tmp_path):
    rng = np.random.default_rng(4)
    text = f"""
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[2, 8] x) => (float[2, 8] y)
      <float[8, 8] w1 = {_weights(rng, 8, 8)}, float[8, 8] w2 = {_weights(rng, 8, 8)}>
    {{
        h = MatMul(x, w1)
        p = Softmax <axis = -1> (h)
        y = MatMul(p, w2)
    }}
    """
    found = plan(ir.from_onnx_text(text), 2)
    assert found.ok and _refusals(found) == {"p": "Softmax over the split axis"}
    assert found.refusals[0].action == "gather"
    fragment = _partition_in_memory(ir.from_onnx_text(text), 2, tmp_path / "p")
    assert [(c["op"], c["axis"]) for c in fragment["collectives"]] == [("AllGather", 1), ("AllGather", 1)]
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    got = run_partition(tmp_path / "p", feeds)
    assert compare(run_model(ir.from_onnx_text(text), feeds)["y"], got["y"])["max_rel"] < FP32_RTOL


def test_planner_refuses_to_cut_inside_a_quantization_block():
    """Blocked (block 32) int8 weights: 4 ranks would hold 16 columns each, half a block: refused, not split."""
    rng = np.random.default_rng(5)
    q = "{" + ", ".join(str(v) for v in rng.integers(-127, 128, 64 * 64)) + "}"
    scale = "{" + ", ".join(f"{v:.4f}" for v in rng.uniform(0.01, 0.02, 64 * 2)) + "}"
    text = f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 64] x) => (float[2, 64] y)
      <int8[64, 64] w_q = {q}, float[64, 2] w_scale = {scale}>
    {{
        w = DequantizeLinear <axis = 1, block_size = 32> (w_q, w_scale)
        y = MatMul(x, w)
    }}
    """
    assert plan(ir.from_onnx_text(text), 2).ok
    found = plan(ir.from_onnx_text(text), 4)
    assert not found.ok and found.error is UnsupportedModelError
    assert found.reason == ("--tp 4 splits 'w_q' inside a quantization block of 32: use a tp degree whose shard "
                            "size is a multiple of the block size")
    with pytest.raises(UnsupportedModelError, match="inside a quantization block of 32"):
        split_model(ir.from_onnx_text(text), 4)


# ----------------------------------------------------------------------------------- exported models


def _check_partition(src, out_dir, tp, dims, seed=0, int_high=256, pp=1, rtol=FP32_RTOL):
    from maia_onnx.partition import partition_file

    manifest = partition_file(src, out_dir, tp=tp, pp=pp)
    model = load_model(src)
    feeds = make_inputs(model, seed=seed, dims=dims, int_high=int_high)
    reference = run_model(model, feeds)
    got = run_partition(out_dir, feeds)
    for name, ref in reference.items():
        err = compare(ref, got[name])
        assert err["max_rel"] < rtol, (name, err)
    for entry in manifest.ranks:
        onnx.checker.check_model(str(out_dir / entry["file"]))
    return manifest


def _decode_steps(src, part_dir, vocab, steps=2, batch=2, prompt=4, rtol=FP32_RTOL):
    """Prefill then ``steps`` single-token decodes, feeding each side's own present.* back as past."""
    model = load_model(src)
    layers = sum(1 for v in model.graph.inputs if v.name.endswith(".key"))
    kv_heads, head_dim = model.graph.inputs[1].shape[1], model.graph.inputs[1].shape[3]
    rng = np.random.default_rng(7)
    empty = np.zeros((batch, kv_heads, 0, head_dim), np.float32)
    ref_past = {f"past_key_values.{i}.{kind}": empty for i in range(layers) for kind in ("key", "value")}
    part_past = dict(ref_past)
    ids = rng.integers(0, vocab, size=(batch, prompt)).astype(np.int64)
    ex = PartitionExecutor(part_dir)
    from maia_onnx.ortutil import make_session

    sess = make_session(model)
    names = [o.name for o in sess.get_outputs()]
    for _ in range(steps + 1):
        ref = dict(zip(names, sess.run(names, {"input_ids": ids, **ref_past})))
        got = ex.run({"input_ids": ids, **part_past})
        for name in names:
            assert compare(ref[name], got[name])["max_rel"] < rtol, name
        ref_past = {k: ref[k.replace("past_key_values", "present")] for k in ref_past}
        part_past = {k: got[k.replace("past_key_values", "present")] for k in part_past}
        ids = ref["logits"][:, -1:].argmax(-1).astype(np.int64)


@pytest.mark.parametrize("tp", [2, 4])
def test_llama_tiny_prefill_and_decode(llama_tiny_onnx, tmp_path, tp):
    manifest = _check_partition(llama_tiny_onnx, tmp_path / "p", tp, {"batch": 2, "seq": 3, "past": 4})
    # 2 KV heads: split by TP2 (each rank owns its heads' cache), replicated at TP4
    kv = manifest.inputs["past_key_values.0.key"]
    assert kv == ({"sharding": "split", "axis": 1} if tp == 2 else {"sharding": "replicated", "axis": None})
    ops = Counter(c["op"] for c in manifest.collectives)
    assert ops == {"AllReduce": 5, "AllGather": 1}  # embedding + 2 x (attention, MLP); logits gather
    kinds = manifest.tensors
    assert kinds["model.embed_tokens.weight"]["kind"] == "vocab"
    assert kinds["lm_head.weight"]["kind"] == "column"
    assert kinds["model.layers.0.self_attn.o_proj.weight"]["kind"] == "row"
    assert kinds["model.layers.0.mlp.down_proj.weight"]["kind"] == "row"
    source_bytes = sum(v.const_value.nbytes for v in load_model(llama_tiny_onnx).graph.initializers.values())
    for entry in manifest.ranks:  # sharded weights dominate: each rank holds about 1/tp of them
        assert entry["weight_bytes"] < source_bytes / tp * 1.25
    _decode_steps(llama_tiny_onnx, tmp_path / "p", vocab=256)


@pytest.mark.parametrize("name", ["unet-tiny", "yolo-tiny"])
@pytest.mark.parametrize("tp", [2, 4])
def test_conv_nets_output_channel_split(exported_models, tmp_path, name, tp):
    src = exported_models(name)
    manifest = _check_partition(src, tmp_path / "p", tp, {"batch": 2})
    conv_kinds = {v["kind"] for k, v in manifest.tensors.items() if "conv" in k and v["axis"] is not None}
    assert {"column", "row"} & conv_kinds
    assert any(c["op"] == "AllGather" and c["axis"] == 1 for c in manifest.collectives)


@pytest.fixture(scope="module")
def hf_decoders(tmp_path_factory):
    """Tiny HF Llama (GQA) and GPT2 (fused QKV, Conv1D) exported through maia_onnx.export."""
    transformers = pytest.importorskip("transformers")
    import torch

    from maia_onnx.export import export_model

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(llama).save_pretrained(root / "llama")
    gpt2 = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                   eos_token_id=0)
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2")
    paths = {}
    for name in ("llama", "gpt2"):
        export_model(f"hf:{root / name}", root / f"{name}.onnx")
        paths[name] = root / f"{name}.onnx"
    return paths


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("tp", [2, 4])
def test_hf_decoders(hf_decoders, tmp_path, family, tp):
    manifest = _check_partition(hf_decoders[family], tmp_path / "p", tp, {"batch": 2, "seq": 3, "past": 2}, int_high=128)
    ops = Counter(c["op"] for c in manifest.collectives)
    assert ops["AllReduce"] >= 5 and ops["AllGather"] == 1  # embedding(s) + attention + MLP per layer; logits
    if family == "gpt2":  # fused Q|K|V (c_attn) is cut per block, so the Split after it needs no gather
        c_attn = manifest.tensors["transformer.h.0.attn.c_attn.weight"]
        assert c_attn["sections"] == 3 and c_attn["kind"] == "column"
        assert c_attn["shards"]["1"][0] == [64 // tp, 2 * 64 // tp]
    _decode_steps(hf_decoders[family], tmp_path / "p", vocab=128, steps=1)


@pytest.fixture(scope="module")
def llama_fp8(llama_tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "llama-fp8.onnx"
    with pytest.warns(UserWarning):
        quantize.quantize_model(llama_tiny_onnx, out, show_progress=False, evaluate=False)
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_fp8_llama_shards_fp8_weights_and_scales(llama_fp8, tmp_path, tp):
    manifest = _check_partition(llama_fp8, tmp_path / "p", tp, {"batch": 2, "seq": 3, "past": 4}, rtol=1e-3)
    rank = load_model(tmp_path / "p" / "rank0_stage0.onnx")
    q = rank.graph.initializers["model.layers.0.mlp.up_proj.weight_quantized"].const_value
    scale = rank.graph.initializers["model.layers.0.mlp.up_proj.weight_scale"].const_value
    assert q.dtype == ir.DataType.FLOAT8E4M3FN and list(q.shape) == [64, 128 // tp]
    assert list(scale.shape) == [128 // tp]  # per-output-channel scales follow their columns
    assert manifest.tensors["model.layers.0.mlp.up_proj.weight_scale"]["axis"] == 0
    src = load_model(llama_fp8).graph.initializers
    full_scale = src["model.layers.0.mlp.up_proj.weight_scale"].const_value.numpy()
    np.testing.assert_array_equal(scale.numpy(), full_scale[: 128 // tp])
    assert read_manifest(tmp_path / "p").tp == tp


@pytest.fixture(scope="module")
def llama_quantized(llama_tiny_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    made = {}

    def get(fmt):
        if fmt not in made:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random calibration warning
                quantize.quantize_model(llama_tiny_onnx, root / f"{fmt}.onnx", format=fmt, show_progress=False, evaluate=False)
            made[fmt] = root / f"{fmt}.onnx"
        return made[fmt]

    return get


@pytest.mark.parametrize("fmt, tp", [("bf16", 2), ("mxfp8-e4m3", 2), ("mxfp8-e4m3", 4), ("mxint8", 4)])
def test_bf16_and_mx_llama(llama_quantized, tmp_path, fmt, tp):
    manifest = _check_partition(llama_quantized(fmt), tmp_path / "p", tp, {"batch": 2, "seq": 3, "past": 4}, rtol=1e-3)
    mlp = next(k for k in manifest.tensors if "layers.0.mlp.up_proj" in k and manifest.tensors[k]["kind"] == "column")
    assert manifest.tensors[mlp]["full_shape"][-1] == 128
    if fmt.startswith("mx") and tp == 4:
        # 64-wide attention shards of 16 would cut MX blocks of 32: attention stays replicated, the MLP splits
        assert "model.layers.0.self_attn.q_proj.weight" not in {k.split("_quantized")[0] for k in manifest.tensors
                                                              if manifest.tensors[k]["kind"] == "column"}
        assert sum(1 for c in manifest.collectives if c["op"] == "AllReduce") == 3
