"""Tests for `maia-onnx analyze`: FLOP/byte counts against hand counts, stored-dtype bytes, partitions, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_ir as ir

from maia_onnx.analyze import analyze, analyze_model, build_workload, graph_costs, load_graph, render_text
from maia_onnx.cli import main
from maia_onnx.errors import UserError
from maia_onnx.graph.costs import node_flops
from maia_onnx.graph.shapes import bind_input_shapes, infer_shapes
from maia_onnx.inspect import concretize
from maia_onnx.io import load_model, save_model
from maia_onnx.partition import partition_file
from maia_onnx.partition.manifest import new_manifest
from maia_onnx.quantize import quantize_model
from maia_onnx.runtime.perfmodel import allreduce_time, p2p_time
from maia_onnx.runtime.profiles import load_device, load_interconnect


def save(model: onnx.ModelProto, path) -> str:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def parsed(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text)


def costs_by_type(path, batch=1, seq=1, past=0):
    work = build_workload(load_graph(path), "forward", batch, seq, past)
    out = {}
    for op in work.ops:
        if op.kind != "folded":
            out.setdefault(op.op_type, []).append(op)
    return work, out


def test_matmul_gemm_conv_flops_match_hand_counts(tmp_path):
    w = np.zeros((16, 32), np.float32)
    model = parsed("""
        <ir_version: 9, opset_import: ["" : 21]>
        g (float[batch, seq, 16] x, float[4, 16] a, float[1, 3, 8, 8] img) => (float[batch, seq, 32] y, float[4, 32] z, float[1, 4, 8, 8] c, float[1, 2, 17, 17] d) {
            y = MatMul(x, w)
            z = Gemm(a, w, bias)
            c = Conv <pads = [1, 1, 1, 1]> (img, cw, cb)
            d = ConvTranspose <strides = [2, 2]> (img, tw)
        }""")
    model.graph.initializer.extend([
        numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(32, np.float32), "bias"),
        numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "cw"),
        numpy_helper.from_array(np.zeros(4, np.float32), "cb"),
        numpy_helper.from_array(np.zeros((3, 2, 3, 3), np.float32), "tw"),
    ])
    path = save(model, tmp_path / "m.onnx")
    work, ops = costs_by_type(path, batch=2, seq=8)
    assert ops["MatMul"][0].flops == 2 * (2 * 8) * 16 * 32
    assert ops["Gemm"][0].flops == 2 * 4 * 16 * 32 + 4 * 32
    assert ops["Conv"][0].flops == 2 * (4 * 8 * 8) * (3 * 3 * 3) + 4 * 8 * 8
    assert ops["ConvTranspose"][0].flops == 2 * (3 * 8 * 8) * (2 * 3 * 3)
    # bytes: fp32 activations in + out, weights at their stored size
    mm = ops["MatMul"][0]
    assert mm.act_bytes == 4 * (2 * 8 * 16 + 2 * 8 * 32) and mm.weight_bytes == 16 * 32 * 4
    assert mm.param_bytes == 16 * 32 * 4
    assert ops["Gemm"][0].param_bytes == 32 * 4  # w already owned by the MatMul: counted once


def test_attention_op_flops_match_hand_count(tmp_path):
    b, h, s, t, d = 2, 4, 8, 24, 16
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [b, h, s, d])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [b, h, t, d])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [b, h, t, d])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, h, s, d])
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"])
    model = helper.make_model(helper.make_graph([node], "g", [q, k, v], [y]), opset_imports=[helper.make_opsetid("", 23)])
    path = save(model, tmp_path / "att.onnx")
    model = load_graph(path)
    infer_shapes(model, bind_input_shapes(model, batch=b, seq=s, past=0).shapes)
    assert node_flops(model.graph.node(0)) == 2 * b * h * s * t * d * 2 + 5 * b * h * s * t


def test_llama_tiny_matmul_flops_equal_hand_count(llama_tiny_onnx):
    batch, seq, past = 2, 8, 24
    hidden, heads, kv_heads, hd, inter, vocab, layers = 64, 4, 2, 16, 128, 256, 2
    work = build_workload(load_graph(llama_tiny_onnx), "decode", batch, seq, past)
    tokens = batch * seq
    per_layer = (2 * tokens * hidden * heads * hd          # q
                 + 2 * 2 * tokens * hidden * kv_heads * hd  # k, v
                 + 2 * tokens * heads * hd * hidden        # o
                 + 2 * 2 * tokens * hidden * inter         # gate, up
                 + 2 * tokens * inter * hidden             # down
                 + 2 * 2 * batch * heads * seq * (past + seq) * hd)  # QK^T and PV
    expected = layers * per_layer + 2 * tokens * hidden * vocab
    got = sum(op.flops for op in work.ops if op.op_type == "MatMul")
    assert got == expected
    assert (work.layers, work.hidden, work.vocab, work.num_heads, work.kv_heads, work.head_dim) == (2, 64, 256, 4, 2, 16)
    # KV cache of the graph (present.* at past + seq) equals the formula
    assert work.kv_io_bytes == work.kv_bytes == 2 * layers * kv_heads * hd * (past + seq) * batch * 4


def _weight_model(dtype: str) -> onnx.ModelProto:
    """x @ W with W stored as BF16 (Cast to float) or as FP8 E4M3FN (DequantizeLinear with a scale)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 128)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 256])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 128])
    if dtype == "bf16":
        init = [helper.make_tensor("w", TensorProto.BFLOAT16, w.shape, np.zeros(w.size, np.uint16).tolist())]
        nodes = [helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT)]
    else:
        init = [helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, w.shape, np.zeros(w.size, np.float32).tolist()),
                numpy_helper.from_array(np.array(0.01, np.float32), "scale")]
        nodes = [helper.make_node("DequantizeLinear", ["w", "scale"], ["wf"])]
    nodes.append(helper.make_node("MatMul", ["x", "wf"], ["y"]))
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], init), opset_imports=[helper.make_opsetid("", 21)])


def test_fp8_model_halves_the_weight_bytes_of_its_bf16_version(tmp_path):
    p_bf16 = save(_weight_model("bf16"), tmp_path / "bf16.onnx")
    p_fp8 = save(_weight_model("fp8"), tmp_path / "fp8.onnx")
    r16 = analyze_model(p_bf16, device="maia200", batch=1, seq=4)["phases"]["forward"]
    r8 = analyze_model(p_fp8, device="maia200", batch=1, seq=4)["phases"]["forward"]
    assert r16["weight_bytes"] == 256 * 128 * 2
    assert r8["weight_bytes"] == 256 * 128 * 1 + 4  # + the fp32 scale
    # the matmul reads the stored bytes (the Cast / DequantizeLinear is folded into it)
    mm16 = [o for o in r16["ops"] if o["op_type"] == "MatMul"][0]
    mm8 = [o for o in r8["ops"] if o["op_type"] == "MatMul"][0]
    act = 4 * (4 * 256 + 4 * 128)
    assert mm16["bytes"] - act == 2 * (mm8["bytes"] - act - 4)
    assert [o["op_type"] for o in r8["ops"]] == ["MatMul"]
    # weight-only FP8: activations are fp32 so the matmul runs at the device's BF16 rate
    assert mm8["dtype"] == "fp32"
    best16, best8 = r16["best"], r8["best"]
    assert best8["weight_bytes"] == pytest.approx(best16["weight_bytes"] / 2, abs=4)


def test_fp8_activations_and_weights_use_the_fp8_peak(tmp_path):
    model = _weight_model("fp8")
    g = model.graph
    # quantize the activation too: x -> Q -> DQ -> MatMul
    g.initializer.append(numpy_helper.from_array(np.array(0.05, np.float32), "xs"))
    g.initializer.append(helper.make_tensor("xz", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    q = helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"])
    dq = helper.make_node("DequantizeLinear", ["xq", "xs"], ["xd"])
    g.node[-1].input[0] = "xd"
    g.node.insert(0, dq)
    g.node.insert(0, q)
    path = save(model, tmp_path / "w8a8.onnx")
    ops = analyze_model(path, device="maia100", batch=1, seq=512)["phases"]["forward"]["ops"]
    mm = [o for o in ops if o["op_type"] == "MatMul"][0]
    assert mm["dtype"] == "fp8"
    dev = load_device("maia100")
    # 2*512*256*128 flops at MX9 (1.5 PFLOP/s) vs memory at 1.8 TB/s: max of the two
    flops = 2 * 512 * 256 * 128
    assert mm["time_s"] == pytest.approx(max(flops / 1.5e15, mm["bytes"] / dev.memory_bandwidth))


def test_analysis_never_reads_external_weights(tmp_path, llama_tiny_onnx):
    out = tmp_path / "ext" / "model.onnx"
    out.parent.mkdir()
    save_model(load_model(llama_tiny_onnx), out, external_data=True)
    data = out.parent / "model.onnx.data"
    # garbage of the same size: a result that read any weight byte could not match the reference below
    data.write_bytes(b"\xff" * data.stat().st_size)
    model = load_graph(out)
    external = [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    assert len(external) >= 10
    for phase, seq, past in (("prefill", 16, 0), ("decode", 1, 16)):
        build_workload(model, phase, 1, seq, past)
    # onnx_ir maps an external tensor on first access: both stay None when no weight byte was read
    assert all(t.raw is None and t._array is None for t in external)
    report = analyze(out, device="maia100", batch=1, seq=16, past=16)
    ref = analyze(llama_tiny_onnx, device="maia100", batch=1, seq=16, past=16)
    for phase in ("prefill", "decode"):
        assert report["phases"][phase]["flops"] == ref["phases"][phase]["flops"] > 0
        assert report["phases"][phase]["weight_bytes"] == ref["phases"][phase]["weight_bytes"] > 0


def test_llama_tiny_sweep_has_megatron_collectives_and_best_config(llama_tiny_onnx):
    report = analyze(llama_tiny_onnx, device="maia100", interconnects=["nvlink4", "pcie5"], batch=4, seq=32, past=64)
    prefill = report["phases"]["prefill"]
    cfg = {(c["interconnect"], c["tp"], c["pp"]): c for c in prefill["configs"]}
    assert len(cfg) == 2 * 4 * 3
    tp2 = cfg[("nvlink4", 2, 1)]
    assert tp2["collectives"] == 2 * 2 + 1  # 2 all-reduces per layer + logits all-gather
    hidden_msg = 4 * 32 * 64 * 4
    assert tp2["collective_bytes"] == pytest.approx(4 * hidden_msg + 4 * 32 * 256 * 4)
    assert cfg[("pcie5", 2, 1)]["comm_s"] > tp2["comm_s"]  # slower link, same bytes
    assert cfg[("nvlink4", 8, 1)]["valid"] is False  # 4 heads cannot split 8 ways
    assert report["phases"]["decode"]["seq"] == 1 and report["phases"]["decode"]["past"] == 64
    # a tiny model is fastest on one device
    assert (prefill["best"]["tp"], prefill["best"]["pp"]) == (1, 1)


def _rank_model(hidden=32, group=2) -> onnx.ModelProto:
    """One TP rank: column matmul, row matmul, AllReduce of the [batch, seq, hidden] result."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])
    w1 = numpy_helper.from_array(np.zeros((hidden, 2 * hidden // group), np.float32), "w1")
    w2 = numpy_helper.from_array(np.zeros((2 * hidden // group, hidden), np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["p"]),
             helper.make_node("AllReduce", ["p"], ["y"], domain="com.microsoft", group_size=group)]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w1, w2]),
                             opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def write_partition(part, files: dict, stages: list[dict], tp: int, pp: int) -> None:
    """A partition directory from rank protos {(tp_rank, stage): proto} with a schema-valid manifest."""
    part.mkdir()
    first = files[min(files)]
    manifest = new_manifest(tp, pp, ir.from_proto(first), None, None)
    for (r, st), proto in sorted(files.items()):
        name = f"rank{r}_stage{st}.onnx"
        save(proto, part / name)
        manifest["ranks"].append({"rank": st * tp + r, "tp_rank": r, "stage": st, "file": name, "data": None,
                                  "weight_bytes": 0, "sha256": None})
    manifest["stages"] = stages
    (part / "manifest.json").write_text(json.dumps(manifest))


def test_partition_directory_counts_actual_collectives(tmp_path):
    part = tmp_path / "part"
    write_partition(part, {(r, 0): _rank_model() for r in range(2)}, [{"stage": 0, "inputs": ["x"], "outputs": ["y"]}], 2, 1)
    report = analyze(part, device="h100-sxm", interconnects=["pcie5"], batch=2, seq=64)
    assert report["kind"] == "partition" and report["tp"] == 2
    phase = report["phases"]["forward"]
    ranks = phase["ranks"]
    assert len(ranks) == 2 and all(r["collectives"] == 1 for r in ranks)
    size = 2 * 64 * 32 * 4
    assert ranks[0]["collective_bytes"] == size
    link = load_interconnect("pcie5")
    assert ranks[0]["comm_s"] == pytest.approx(allreduce_time(size, 2, link.bandwidth, link.alpha))
    assert phase["configs"][0]["comm_s"] == pytest.approx(ranks[0]["comm_s"])
    assert ranks[0]["weight_bytes"] == 2 * 32 * 32 * 4


def test_unknown_dim_and_bad_options_are_user_errors(tmp_path):
    model = parsed("""
        <ir_version: 9, opset_import: ["" : 21]>
        g (float[N, C] x) => (float[N, C] y) { y = Relu(x) }""")
    path = save(model, tmp_path / "relu.onnx")
    with pytest.raises(UserError, match="--dim C=N"):
        analyze(path)
    report = analyze(path, dims={"C": 10}, batch=3)
    assert report["phases"]["forward"]["flops"] == 30
    with pytest.raises(UserError, match="unknown device profile"):
        analyze(path, device="tpu9", dims={"C": 10})


def test_cli_json_table_plot_and_errors(tmp_path, llama_tiny_onnx, capsys):
    png = tmp_path / "plot.png"
    rc = main(["analyze", str(llama_tiny_onnx), "--device", "maia200", "--interconnect", "nvlink4,maia200-eth",
               "--batch", "2", "--seq", "16", "--past", "32", "--memory-limit", "80", "--json", "--plot", str(png)])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["memory_limit"] == 80e9 and set(data["phases"]) == {"prefill", "decode"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = main(["analyze", str(llama_tiny_onnx), "--phase", "decode", "--tp", "1,2", "--pp", "1", "--top", "3"])
    text = capsys.readouterr().out
    assert rc == 0 and "== decode: batch 1, seq 1, past 128 ==" in text and "best: tp=" in text
    rc = main(["analyze", str(llama_tiny_onnx), "--interconnect", "warp-drive"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: unknown interconnect profile 'warp-drive'") and err.count("\n") == 1
    rc = main(["analyze", str(tmp_path / "missing.onnx")])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_real_fp8_quantized_llama_halves_bf16_matmul_weight_bytes(tmp_path, llama_tiny_onnx):
    paths = {}
    for fmt in ("bf16", "fp8-e4m3"):
        paths[fmt] = tmp_path / f"{fmt}.onnx"
        quantize_model(llama_tiny_onnx, paths[fmt], format=fmt, show_progress=False)
    mm_bytes = {}
    for fmt, path in paths.items():
        work = build_workload(load_graph(path), "prefill", 1, 8, 0)
        mm_bytes[fmt] = sum(op.param_bytes for op in work.ops if op.op_type == "MatMul")
    fp8 = onnx.load(str(paths["fp8-e4m3"]), load_external_data=False)
    inits = {t.name for t in fp8.graph.initializer}
    dq_inputs = {n.input[1] for n in fp8.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    scale_bytes = sum(4 * int(np.prod(t.dims)) for t in fp8.graph.initializer
                      if t.name in dq_inputs and t.data_type == TensorProto.FLOAT)
    assert mm_bytes["fp8-e4m3"] - scale_bytes == mm_bytes["bf16"] / 2


def test_hf_llama_export_is_analysed_like_the_builtin(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from maia_onnx.export import export_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    export_model(f"hf:{tmp_path / 'hf'}", tmp_path / "hf.onnx")
    batch, seq, past = 2, 16, 8
    report = analyze(tmp_path / "hf.onnx", batch=batch, seq=seq, past=past, tps=(1, 2), pps=(1,))
    decode = report["phases"]["decode"]
    assert decode["structure"] == {"layers": 2, "hidden": 32, "vocab": 128, "num_heads": 4, "kv_heads": 2, "head_dim": 8}
    assert decode["kv_cache_bytes"] == 2 * 2 * 2 * 8 * (past + 1) * batch * 4
    tokens = batch * seq
    prefill_mm = sum(o["flops"] for o in report["phases"]["prefill"]["ops"] if o["op_type"] == "MatMul")
    per_layer = 2 * tokens * 32 * (32 + 2 * 16 + 32) + 2 * 3 * tokens * 32 * 64 + 4 * batch * 4 * seq * seq * 8
    assert prefill_mm == 2 * per_layer + 2 * tokens * 32 * 128
    assert [c["collectives"] for c in decode["configs"]] == [0, 5]


def test_flops_agree_with_inspect_op_by_op(llama_tiny_onnx, yolo_tiny_onnx):
    # analyze (its own load, bind and inference) and inspect (concretize) give every node the same FLOPs
    for path, dims in ((llama_tiny_onnx, {"batch": 2, "seq": 8, "past": 24}), (yolo_tiny_onnx, {"batch": 2})):
        model = load_model(path)
        concretize(model, dims)
        theirs = [node_flops(n) for n in model.graph]
        work = build_workload(load_graph(path), "decode", dims["batch"], dims.get("seq", 1), dims.get("past", 0))
        assert len(work.ops) == len(theirs)
        op_types = set()
        for op, flops in zip(work.ops, theirs):
            if op.kind != "folded":  # folded: constant subgraphs a compiler evaluates offline, priced 0
                assert op.flops == flops, (op.name, op.op_type)
                op_types.add(op.op_type)
        assert {"MatMul", "Softmax", "Mul", "Add"} <= op_types or {"Conv", "Sigmoid", "MaxPool"} <= op_types
        assert sum(op.flops for op in work.ops) > 0


def _stage_model(name_in: str, name_out: str, hidden: int = 64) -> onnx.ModelProto:
    x = helper.make_tensor_value_info(name_in, TensorProto.FLOAT, ["batch", "seq", hidden])
    y = helper.make_tensor_value_info(name_out, TensorProto.FLOAT, ["batch", "seq", hidden])
    w = numpy_helper.from_array(np.eye(hidden, dtype=np.float32), name=f"w_{name_out}")
    node = helper.make_node("MatMul", [name_in, w.name], [name_out])
    return helper.make_model(helper.make_graph([node], "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 21)])


def test_partition_prices_pipeline_send_per_stage_boundary(tmp_path):
    part = tmp_path / "pp2"
    stages = [{"stage": 0, "inputs": ["h0"], "outputs": ["hidden"]}, {"stage": 1, "inputs": ["hidden"], "outputs": ["out"]}]
    write_partition(part, {(0, 0): _stage_model("h0", "hidden"), (0, 1): _stage_model("hidden", "out")}, stages, 1, 2)
    link = load_interconnect("nvlink4")
    for batch, m in ((1, 1), (4, 4)):
        phase = analyze(part, device="maia100", interconnects=["nvlink4"], batch=batch, seq=16, microbatches=m)["phases"]["forward"]
        size = batch * 16 * 64 * 4  # [batch, seq, hidden] FP32
        expected = m * (link.alpha + size / m / link.bandwidth)
        ranks = {r["stage"]: r for r in phase["ranks"]}
        assert ranks[0]["p2p_bytes"] == size and ranks[0]["p2p_tensors"] == ["hidden"]
        assert ranks[0]["p2p_s"] == pytest.approx(expected)
        assert ranks[1]["p2p_bytes"] == 0 and ranks[1]["p2p_s"] == 0
        assert ranks[0]["comm_s"] == pytest.approx(expected)  # no collectives: comm is the send alone
        cfg = phase["configs"][0]
        slowest = max(phase["ranks"], key=lambda r: r["compute_s"] + r["comm_s"])
        assert slowest["stage"] == 0  # same compute as stage 1, plus the send
        assert cfg["p2p_bytes"] == size and cfg["p2p_s"] == pytest.approx(expected)
        busy = slowest["compute_s"] + slowest["comm_s"]
        assert cfg["total_s"] == pytest.approx(busy + cfg["bubble_s"])
        assert cfg["bubble_s"] == pytest.approx(busy * (2 - 1) / m)


def _boundary_bytes(part, tp_rank: int, stage: int, batch: int, seq: int) -> int:
    """Bytes of what rank (tp_rank, stage) outputs for later stages, from its file's declared dtypes and shapes."""
    manifest = json.loads((part / "manifest.json").read_text())
    later = {n for st in manifest["stages"] if st["stage"] > stage for n in st["inputs"]}
    proto = onnx.load(str(part / f"rank{tp_rank}_stage{stage}.onnx"), load_external_data=False)
    total = 0
    for out in proto.graph.output:
        if out.name in later:
            dims = [{"batch": batch, "seq": seq}.get(d.dim_param, d.dim_value) for d in out.type.tensor_type.shape.dim]
            total += int(np.prod(dims)) * helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type).itemsize
    return total


def test_real_tp2_pp2_llama_partition_sends_the_full_hidden_state_per_rank(tmp_path, llama_tiny_onnx):
    out = tmp_path / "llama-tp2pp2"
    partition_file(llama_tiny_onnx, out, tp=2, pp=2)
    batch = 2
    report = analyze(out, device="maia100", interconnects=["nvlink4"], batch=batch, seq=8, microbatches=1)
    link = load_interconnect("nvlink4")
    for phase_name, seq in (("prefill", 8), ("decode", 1)):
        phase = report["phases"][phase_name]
        ranks = {(r["rank"], r["stage"]): r for r in phase["ranks"]}
        assert len(ranks) == 4
        # every tp rank sends its own full [batch, seq, hidden=64] FP32 copy (not 1/tp of it)
        size = batch * seq * 64 * 4
        for tp_rank in range(2):
            sent = ranks[(tp_rank, 0)]
            assert sent["p2p_bytes"] == _boundary_bytes(out, tp_rank, 0, batch, seq) == size
            assert len(sent["p2p_tensors"]) == 1
            assert sent["p2p_s"] == pytest.approx(p2p_time(size, link.bandwidth, link.alpha))
            assert ranks[(tp_rank, 1)]["p2p_bytes"] == _boundary_bytes(out, tp_rank, 1, batch, seq) == 0
        slowest = max(phase["ranks"], key=lambda r: r["compute_s"] + r["comm_s"])
        cfg = phase["configs"][0]
        assert cfg["p2p_bytes"] == _boundary_bytes(out, slowest["rank"], slowest["stage"], batch, seq)
        assert cfg["total_s"] == pytest.approx(slowest["compute_s"] + slowest["comm_s"] + cfg["bubble_s"])
        # the analytic what-if of the unpartitioned model prices the same message per send
        work = build_workload(load_graph(llama_tiny_onnx), phase_name, batch, seq, 0 if seq > 1 else 8)
        assert batch * seq * work.hidden * work.act_bytes_per_elem == size
    assert "p2p_ms" in render_text(report)


def test_partition_validates_batch_seq_past_like_a_model(tmp_path):
    part = tmp_path / "pp2"
    stages = [{"stage": 0, "inputs": ["h0"], "outputs": ["hidden"]}, {"stage": 1, "inputs": ["hidden"], "outputs": ["out"]}]
    write_partition(part, {(0, 0): _stage_model("h0", "hidden"), (0, 1): _stage_model("hidden", "out")}, stages, 1, 2)
    for options in ({"batch": 0}, {"seq": 0}, {"past": -1}):
        with pytest.raises(UserError, match="--batch and --seq must be >= 1 and --past >= 0"):
            analyze(part, **options)
    rc = main(["analyze", str(part), "--seq", "0"])
    assert rc == 2
