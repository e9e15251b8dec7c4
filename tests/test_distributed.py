"""Real multi-process runs of partition directories under torchrun (gloo, loopback): outputs equal the
single-process model within 1e-5 relative (prefill + 4 greedy decode steps through each stage's own KV
cache), also when two torchrun agents on this machine play two nodes (c10d rendezvous on 127.0.0.1), and a
rank that dies or hangs ends the run with an error naming it, within the timeout."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from maia_onnx.io import load_model  # noqa: E402
from maia_onnx.ortutil import compare, make_inputs, run_model  # noqa: E402
from maia_onnx.cli import main  # noqa: E402
from maia_onnx.cli.run import print_timing  # noqa: E402
from maia_onnx.errors import InvalidOptionError, UserError  # noqa: E402
from maia_onnx.run import run_distributed  # noqa: E402
from maia_onnx.runtime.distributed import FAULT_ENV, DistributedRunError, launch, rendezvous_args  # noqa: E402

REL = 1e-5
DECODE_STEPS = 4


@pytest.fixture(scope="module")
def partitions(exported_models, tmp_path_factory):
    from maia_onnx.partition import partition_model

    root = tmp_path_factory.mktemp("dist")
    cache = {}

    def get(name: str, tp: int, pp: int):
        key = (name, tp, pp)
        if key not in cache:
            out = root / f"{name}-tp{tp}pp{pp}"
            partition_model(load_model(exported_models(name)), out, tp=tp, pp=pp)
            cache[key] = out
        return cache[key]

    return get


def reference_decode(model_path, feeds, steps):
    """Single-process outputs per step with the same greedy continuation the workers use."""
    model = load_model(model_path)
    results = []
    cur = dict(feeds)
    for step in range(steps + 1):
        out = run_model(model, cur)
        results.append(out)
        token = np.argmax(out["logits"][:, -1, :], axis=-1).astype(np.int64)[:, None]
        nxt = {"input_ids": token}
        for name in feeds:
            if name.startswith("past_key_values."):
                nxt[name] = out["present." + name[len("past_key_values."):]]
        cur = nxt
    return results


def assert_step_close(reference: dict, got: dict, prefix: str, where: str):
    for name, ref in reference.items():
        actual = got[f"{prefix}{name}"]
        assert actual.shape == ref.shape, f"{where} {name}: {actual.shape} vs {ref.shape}"
        err = compare(ref, actual)["max_rel"]
        assert err <= REL, f"{where}: {name} max_rel {err:.3g} > {REL}"


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2pp2"])
def test_llama_tiny_torchrun_matches_single_process(tp, pp, partitions, llama_tiny_onnx, tmp_path):
    directory = partitions("llama-tiny", tp, pp)
    feeds = make_inputs(load_model(llama_tiny_onnx), seed=1, dims={"batch": 2, "seq": 5, "past": 0})
    np.savez(tmp_path / "in.npz", **feeds)
    out_path = tmp_path / "out.npz"
    report = launch(directory, tmp_path / "in.npz", out_path, microbatches=2 if pp > 1 else 1,
                    decode_steps=DECODE_STEPS, timeout=60)
    with np.load(out_path) as data:
        got = {k: data[k] for k in data.files}
    reference = reference_decode(llama_tiny_onnx, feeds, DECODE_STEPS)
    for step, ref in enumerate(reference):
        assert_step_close(ref, got, f"step{step}.", f"tp{tp} pp{pp} step {step}")
    assert got["tokens"].shape == (2, DECODE_STEPS)
    assert got["step4.present.0.key"].shape[2] == 5 + DECODE_STEPS  # the cache grew inside the stage processes
    ranks = report["ranks"]
    assert len(ranks) == tp * pp and all(r["compute_s"] > 0 for r in ranks)
    if tp > 1:
        assert all(r["collectives"] > 0 and r["collective_bytes"] > 0 for r in ranks)
    if pp > 1:
        assert any(r["stage"] == 1 and r["wait_s"] > 0 for r in ranks)  # the later stage waited on the earlier one


def test_yolo_tiny_tp2_torchrun_matches_single_process(partitions, yolo_tiny_onnx, tmp_path, capsys):
    directory = partitions("yolo-tiny", 2, 1)
    model = load_model(yolo_tiny_onnx)
    feeds = make_inputs(model, seed=1, dims={"batch": 2})
    np.savez(tmp_path / "in.npz", **feeds)
    result = run_distributed(directory, tmp_path / "in.npz", tmp_path / "out.npz", dist_timeout=60)
    with np.load(tmp_path / "out.npz") as data:
        got = {k: data[k] for k in data.files}
    assert_step_close(run_model(model, feeds), got, "", "yolo tp2")
    assert sorted(result["outputs"]) == sorted(["boxes", "scores", "step0.boxes", "step0.scores"])
    rows = result["ranks"]
    assert [r["rank"] for r in rows] == [0, 1]
    # every collective was priced with the loopback profile of the cost model
    assert all(r["collectives"] > 0 and r["predicted_collective_s"] > 0 for r in rows)
    print_timing(result)
    table = capsys.readouterr().out
    assert "collective_s" in table and "predicted_collective_s" in table


def test_torchrun_needs_inputs(partitions):
    with pytest.raises(UserError, match="--inputs"):
        run_distributed(partitions("llama-tiny", 2, 1), None)


def test_rendezvous_options_are_checked():
    assert rendezvous_args() == ["--nnodes=1", "--standalone"]
    assert rendezvous_args(2, 1, master_addr="10.0.0.1") == [
        "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400"]
    with pytest.raises(InvalidOptionError, match="--master-addr"):
        rendezvous_args(2, 0)
    with pytest.raises(InvalidOptionError, match="--node-rank 2"):
        rendezvous_args(2, 2, master_addr="127.0.0.1")
    with pytest.raises(InvalidOptionError, match="pass one"):
        rendezvous_args(2, 0, rdzv_endpoint="127.0.0.1:1", master_addr="127.0.0.1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_tp2pp2_match_single_process(partitions, llama_tiny_onnx, tmp_path, capsys):
    """Two torchrun agents (--nnodes 2, node ranks 0 and 1, 2 processes each, c10d rendezvous on 127.0.0.1)
    run a TP2 x PP2 partition: node 0 holds stage 0 and the outputs, node 1 stage 1; the outputs equal the
    unsharded model's. Node 1 starts first, so the rendezvous most likely numbers its processes 0 and 1:
    the roles still follow --node-rank."""
    directory = partitions("llama-tiny", 2, 2)
    feeds = make_inputs(load_model(llama_tiny_onnx), seed=3, dims={"batch": 2, "seq": 5, "past": 0})
    np.savez(tmp_path / "in.npz", **feeds)
    port = _free_port()
    node1: dict = {}

    def second_node():
        try:
            node1["report"] = launch(directory, tmp_path / "in.npz", tmp_path / "out1.npz", nnodes=2, node_rank=1,
                                     master_addr="127.0.0.1", master_port=port, microbatches=2, decode_steps=2,
                                     timeout=60)
        except Exception as exc:  # reported by the main thread
            node1["error"] = exc

    thread = threading.Thread(target=second_node)
    thread.start()
    time.sleep(1.0)
    code = main(["run", str(directory), "--launcher", "torchrun", "--inputs", str(tmp_path / "in.npz"),
                 "--save-outputs", str(tmp_path / "out0.npz"), "--nnodes", "2", "--node-rank", "0",
                 "--master-addr", "127.0.0.1", "--master-port", str(port), "--microbatches", "2",
                 "--decode-steps", "2", "--timeout", "60", "--json"])
    thread.join(timeout=120)
    assert code == 0, capsys.readouterr().err
    assert "error" not in node1, node1.get("error")
    assert not (tmp_path / "out1.npz").exists() and "ranks" not in node1["report"]  # node 1 holds no outputs
    import json

    result = json.loads(capsys.readouterr().out)
    assert [(r["rank"], r["tp_rank"], r["stage"]) for r in result["ranks"]] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    assert sorted(r["process_rank"] for r in result["ranks"]) == [0, 1, 2, 3]
    assert all(r["collectives"] > 0 for r in result["ranks"])
    with np.load(tmp_path / "out0.npz") as data:
        got = {k: data[k] for k in data.files}
    for step, ref in enumerate(reference_decode(llama_tiny_onnx, feeds, 2)):
        assert_step_close(ref, got, f"step{step}.", f"two nodes step {step}")


@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_dead_or_stuck_rank_fails_the_run_with_its_name(mode, partitions, llama_tiny_onnx, tmp_path):
    directory = partitions("llama-tiny", 2, 1)
    feeds = make_inputs(load_model(llama_tiny_onnx), seed=1, dims={"batch": 1, "seq": 3, "past": 0})
    np.savez(tmp_path / "in.npz", **feeds)
    timeout = 10
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        launch(directory, tmp_path / "in.npz", tmp_path / "out.npz", decode_steps=2, timeout=timeout,
               extra_env={FAULT_ENV: f"rank=1,at=1,mode={mode}"})
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "rank" in message and message.count("\n") == 0
    if mode == "kill":
        # torchrun's report names the signal when it reaped the killed rank first; otherwise the peers' lost
        # connections point at the rank that went silent
        assert "rank 1 died (signal 9)" in message or "rank 1 died (no error of its own" in message, message
    else:
        assert "rank 0" in message and "time" in message.lower()  # the healthy rank timed out waiting for rank 1
    assert elapsed < timeout + 45
    assert not (tmp_path / "out.npz").exists()  # no partial outputs
    psutil = pytest.importorskip("psutil")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # no rank outlives the failed run
        left = [p for p in psutil.process_iter(["cmdline"]) if str(directory) in " ".join(p.info["cmdline"] or [])]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"ranks still running: {[p.pid for p in left]}"


WIRE_SCRIPT = '''
import datetime, sys, numpy as np, ml_dtypes, torch.distributed as dist
from maia_onnx.runtime.dist_protocol import send_array, recv_array
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
arrays = [np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2], np.array([[True, False]]),
          np.arange(5).astype(ml_dtypes.bfloat16), np.linspace(-3, 3, 7).astype(ml_dtypes.float8_e4m3fn).reshape(7, 1),
          np.zeros((0, 4), np.float32), np.asarray(np.int64(5)), np.arange(4, dtype=np.int64)]
if dist.get_rank() == 0:
    for a in arrays:
        send_array(a, 1)
else:
    for a in arrays:
        b = recv_array(0)
        if not (b.dtype == a.dtype and b.shape == a.shape and b.tobytes() == np.ascontiguousarray(a).tobytes()):
            sys.exit(f"mismatch {a!r} -> {b!r}")
    print("WIRE-OK")
dist.destroy_process_group()
'''


def test_pipeline_wire_keeps_dtype_shape_and_bytes(tmp_path):
    """Cross-stage tensors of any dtype (bf16, fp8, bool, 0-d, empty, strided) arrive bit for bit."""
    import subprocess
    import sys

    script = tmp_path / "wire.py"
    script.write_text(WIRE_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WIRE-OK" in proc.stdout
