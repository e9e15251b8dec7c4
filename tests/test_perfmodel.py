"""Tests for the analytic performance model: hand-computed roofline, collective, bubble and TP/PP cases."""

from __future__ import annotations

import pytest

from maia_onnx.runtime.perfmodel import (
    OpCost,
    Workload,
    allgather_time,
    allreduce_time,
    best_config,
    bubble_fraction,
    estimate_config,
    kv_cache_bytes,
    op_time,
    p2p_time,
    roofline_time,
    split_stages,
    sweep,
)
from maia_onnx.runtime.profiles import DeviceProfile, InterconnectProfile, load_interconnect


def toy_device(capacity=1e9):
    # 100 TFLOP/s tensor, 10 TFLOP/s vector, 1 TB/s: ridge point at 100 FLOP/byte
    return DeviceProfile(name="toy", description="", memory_capacity=capacity, memory_bandwidth=1e12,
                         peak_flops={"bf16": 100e12}, vector_flops=10e12, compute_dtype_map={"fp32": "bf16"})


def test_allreduce_33_5_mb_over_8_ranks_matches_hand_numbers():
    size = 33.5e6
    # 2 * 7/8 * 33.5e6 / 450e9 = 0.1303 ms; / 64e9 = 0.916 ms
    assert allreduce_time(size, 8, 450e9) == pytest.approx(0.13028e-3, rel=1e-4)
    assert allreduce_time(size, 8, 64e9) == pytest.approx(0.91602e-3, rel=1e-4)
    nv, pcie = load_interconnect("nvlink4"), load_interconnect("pcie5")
    assert allreduce_time(size, 8, nv.bandwidth) == pytest.approx(0.13e-3, abs=0.005e-3)
    assert allreduce_time(size, 8, pcie.bandwidth) == pytest.approx(0.92e-3, abs=0.005e-3)
    # alpha adds 2(n-1) steps
    assert allreduce_time(size, 8, 450e9, alpha=1e-6) - allreduce_time(size, 8, 450e9) == pytest.approx(14e-6)
    assert allreduce_time(size, 1, 450e9, alpha=1e-6) == 0.0


def test_allgather_and_bubble():
    # (n-1)/n S/B + (n-1) alpha: 4 ranks, 8 MB gathered, 100 GB/s, 2 us
    assert allgather_time(8e6, 4, 100e9, 2e-6) == pytest.approx(3 / 4 * 8e6 / 100e9 + 3 * 2e-6)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(1, 1) == 0.0
    assert bubble_fraction(2, 1) == pytest.approx(0.5)


def test_roofline_and_kv_cache():
    assert roofline_time(1e12, 1e9, 100e12, 1e12) == (pytest.approx(0.01), "compute")
    assert roofline_time(1e9, 1e9, 100e12, 1e12) == (pytest.approx(1e-3), "memory")
    # llama-tiny at batch 2, 12 tokens, fp32: 2 * 2 layers * 2 kv heads * 16 * 12 * 2 * 4 bytes
    assert kv_cache_bytes(2, 2, 16, 12, 2, 4) == 2 * 2 * 2 * 16 * 12 * 2 * 4


def test_op_time_scales_with_tp_and_microbatch():
    dev = toy_device()
    mm = OpCost("mm", "MatMul", "matmul", flops=2e12, weight_bytes=1e9, act_bytes=1e9, compute_dtype="fp32", sharded=True)
    assert op_time(mm, dev) == (pytest.approx(0.02), "compute")
    assert op_time(mm, dev, tp=4)[0] == pytest.approx(0.005)
    # half a batch: half the flops (0.01 s) but the full weight read: 1.5 GB / 1 TB/s = 1.5 ms -> still compute
    assert op_time(mm, dev, batch_fraction=0.5)[0] == pytest.approx(0.01)
    vec = OpCost("add", "Add", "vector", flops=1e9, act_bytes=3e9)
    assert op_time(vec, dev, tp=4) == (pytest.approx(3e-3), "memory")  # replicated: tp does not help


def test_split_stages_balances_contiguous_cost():
    assert split_stages([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert split_stages([3, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert split_stages([1, 1], 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def transformer_workload(batch=4, seq=128, layers=4, hidden=1024, vocab=32000):
    ops = []
    for i in range(layers * 2):  # two compute-bound weight matmuls per layer
        ops.append(OpCost(f"mm{i}", "MatMul", "matmul", flops=1e12, weight_bytes=1e8, act_bytes=1e7,
                          param_bytes=1e8, sharded=True))
        ops.append(OpCost(f"norm{i}", "Mul", "vector", flops=1e6, act_bytes=1e8))
    return Workload(phase="prefill", ops=ops, batch=batch, seq=seq, layers=layers, hidden=hidden, vocab=vocab,
                    num_heads=16, kv_heads=8, head_dim=64, act_bytes_per_elem=2, kv_bytes_per_elem=2)


def test_estimate_config_megatron_collectives_and_memory():
    dev = toy_device()
    link = InterconnectProfile(name="l", description="", bandwidth=100e9, alpha=0.0)
    work = transformer_workload()
    one = estimate_config(work, dev, link, 1, 1)
    assert one.comm_s == 0 and one.collectives == 0 and one.bubble_s == 0
    # compute: 8 matmuls at 10 ms + 8 norms at 0.1 ms (memory-bound)
    assert one.compute_s == pytest.approx(8 * 0.01 + 8 * 1e-4)
    two = estimate_config(work, dev, link, 2, 1)
    assert two.compute_s == pytest.approx(8 * 0.005 + 8 * 1e-4)
    hidden_msg = 4 * 128 * 1024 * 2
    logits_msg = 4 * 128 * 32000 * 2
    assert two.collectives == 2 * 4 + 1
    assert two.comm_s == pytest.approx(8 * allreduce_time(hidden_msg, 2, 100e9) + allgather_time(logits_msg, 2, 100e9))
    assert two.collective_bytes == pytest.approx(8 * hidden_msg + logits_msg)
    assert two.weight_bytes == pytest.approx(8 * 1e8 / 2)
    # KV: 2 * 4 layers * 8 heads * 64 * 128 tokens * 4 batch * 2 bytes, split over tp
    assert two.kv_bytes == pytest.approx(kv_cache_bytes(4, 8, 64, 128, 4, 2) / 2)


def test_estimate_config_pipeline_bubble_matches_formula():
    dev = toy_device()
    link = InterconnectProfile(name="l", description="", bandwidth=100e9, alpha=0.0)
    work = transformer_workload()
    est = estimate_config(work, dev, link, 1, 4, microbatches=4)
    assert est.bubble_s / est.total_s == pytest.approx(bubble_fraction(4, 4))
    assert est.weight_bytes == pytest.approx(2 * 1e8)  # one layer's two matmuls per stage


def test_best_config_respects_memory_limit():
    dev = toy_device(capacity=1e9)
    link = InterconnectProfile(name="l", description="", bandwidth=100e9, alpha=1e-6)
    work = transformer_workload()
    ests = sweep(work, dev, [link], (1, 2, 4, 8), (1, 2, 4))
    best = best_config(ests)
    assert best is not None and best.fits
    # 800 MB of weights + KV + activations do not fit 0.5 GB on one device
    small = sweep(work, dev, [link], (1, 2, 4, 8), (1, 2, 4), memory_limit=0.5e9)
    assert not [e for e in small if e.tp == 1 and e.pp == 1][0].fits
    assert best_config(small).memory_bytes <= 0.5e9
    assert best_config(sweep(work, dev, [link], (1,), (1,), memory_limit=1e6)) is None


def test_p2p_time_is_alpha_plus_size_over_bandwidth():
    # 1 MB over 100 GB/s with 3 us latency: 3 us + 10 us
    assert p2p_time(1e6, 100e9, alpha=3e-6) == pytest.approx(13e-6)
    assert p2p_time(0, 100e9, alpha=3e-6) == 0.0


def test_estimate_config_reports_pipeline_sends_inside_comm():
    dev = toy_device()
    link = InterconnectProfile(name="l", description="", bandwidth=100e9, alpha=2e-6)
    work = transformer_workload()
    assert estimate_config(work, dev, link, 1, 1).p2p_s == 0.0
    est = estimate_config(work, dev, link, 1, 2, microbatches=4)
    # stage 0 (the slowest-or-equal one) sends the [1, 128, 1024] bf16 hidden state once per microbatch
    msg = 1 * 128 * 1024 * 2
    assert est.p2p_bytes == pytest.approx(4 * msg)
    assert est.p2p_s == pytest.approx(4 * (2e-6 + msg / 100e9))
    assert est.comm_s >= est.p2p_s and est.to_dict()["p2p_bytes"] == est.p2p_bytes


def test_pipeline_send_is_the_full_hidden_state_on_every_tp_rank():
    # tp rank r of stage s sends its replicated [microbatch, seq, hidden] copy to tp rank r of stage s+1,
    # as partition directories do (tests/test_analyze.py checks a real TP2 x PP2 partition sends this much)
    dev = toy_device()
    link = InterconnectProfile(name="l", description="", bandwidth=100e9, alpha=2e-6)
    work = transformer_workload(vocab=0)  # no logits all-gather: stage 0 (compute + its send) is the slowest
    est = estimate_config(work, dev, link, 2, 2, microbatches=4)
    msg = 1 * 128 * 1024 * 2
    assert est.p2p_bytes == 4 * msg
    assert est.p2p_s == pytest.approx(4 * (2e-6 + msg / 100e9))
