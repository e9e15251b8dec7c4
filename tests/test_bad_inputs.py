"""Bad-input catalogue: every verb refuses broken input with one clear line, no traceback, no output, input intact.

Each case builds its inputs in a fresh directory, hashes every file there, runs the CLI in-process and asserts:
non-zero exit, exactly one stderr line starting ``error:`` (and not an "internal error", which would be a bug),
no ``Traceback``, none of the named outputs (nor any temp file) left behind, and every input byte-identical.
A few cases run the real console script in a subprocess to prove the same end to end.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from maia_onnx.cli import main
from maia_onnx.io import sha256_file

HIDDEN = 16  # divisible by 2 and 4 (TP works) but not by 3 (TP 3 must be refused)


# ---------------------------------------------------------------------------------------------- builders
def write_mlp(path: Path, opset: int = 17, zero_weights: bool = False) -> Path:
    """x[batch,8] -> MatMul(8x16) -> Relu -> MatMul(16x4) -> y; small enough for every verb."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, HIDDEN)).astype(np.float32)
    w2 = rng.standard_normal((HIDDEN, 4)).astype(np.float32)
    if zero_weights:
        w1[:] = 0.0
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def write_relu_only(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def write_external(path: Path) -> Path:
    """The MLP with its weights in ``<name>.data`` beside it."""
    src = path.with_name("src_" + path.name)
    write_mlp(src)
    onnx.save(onnx.load(src), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)
    src.unlink()
    return path


def with_opset(path: Path, version: int) -> Path:
    write_mlp(path)
    model = onnx.load(path)
    model.opset_import[0].version = version
    onnx.save(model, path)
    return path


# ---------------------------------------------------------------------------------------------- the checker
@dataclass
class Case:
    name: str
    # builds inputs in the directory, returns (argv, outputs that must not exist)
    setup: Callable[[Path], tuple[list[str], list[str]]]
    expect: str = ""  # a word the error line must contain (names the problem)
    patch: Callable | None = None  # (monkeypatch, dir) -> None: simulate an environment fault
    skip_if: Callable[[], str | None] = field(default=lambda: None)


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_clean_failure(rc: int, err: str, out: str, directory: Path, before: dict[str, str], outputs: list[str],
                         expect: str = "") -> str:
    """The contract for every bad input; returns the error line."""
    assert rc != 0, f"exit code 0 for a bad input; stdout: {out[-300:]!r} stderr: {err[-300:]!r}"
    assert "Traceback" not in err + out, f"traceback leaked:\n{err}"
    # progress bars redraw with \r: split on every line break, ignore blank redraw fragments
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]
    assert len(errors) == 1, f"expected exactly one error line, got {errors!r}"
    line = errors[0][errors[0].lower().index("error:"):]
    assert not line.startswith("error: internal error"), f"a bad input reached an internal error (a bug): {line}"
    assert len(line) > len("error: ") + 20, f"error line too terse to say what and how to fix: {line!r}"
    if expect:
        assert expect.lower() in line.lower(), f"error line does not name the problem ({expect!r}): {line}"
    for name in outputs:
        assert not (directory / name).exists(), f"partial output {name} left behind after: {line}"
    after = _snapshot(directory)
    for name, digest in before.items():
        assert after.get(name) == digest, f"input {name} was modified or removed by a failing command"
    leftovers = sorted(set(after) - set(before))
    assert not leftovers, f"files left behind by a failed command: {leftovers}"
    return line


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---------------------------------------------------------------------------------------------- the catalogue
def _file_bytes(name: str, data: bytes):
    def setup(d: Path):
        (d / name).write_bytes(data)
        return name

    return setup


def _case_model(verb_args: Callable[[str], tuple[list[str], list[str]]], make: Callable[[Path], Path]):
    def setup(d: Path):
        model = make(d)
        return verb_args(model.name)

    return setup


def q(model):  # quantize
    return ["quantize", model, "-o", "q.onnx", "--no-eval"], ["q.onnx", "q.onnx.data"]


def c(model):  # compile
    return ["compile", model, "-o", "c.onnx"], ["c.onnx", "c.onnx.data", "c_maia.bin"]


def p(model, *extra):  # partition
    return ["partition", model, "-o", "part", *extra], ["part"]


def _garbage(d):
    (d / "garbage.onnx").write_bytes(b"this is not an onnx protobuf \x00\xff" * 8)
    return d / "garbage.onnx"


def _empty(d):
    (d / "empty.onnx").write_bytes(b"")
    return d / "empty.onnx"


def _truncated(d):
    write_mlp(d / "full.onnx")
    data = (d / "full.onnx").read_bytes()
    (d / "full.onnx").unlink()
    (d / "truncated.onnx").write_bytes(data[: len(data) // 2])
    return d / "truncated.onnx"


def _a_directory(d):
    (d / "model.onnx").mkdir()
    (d / "model.onnx" / "keep.txt").write_text("a directory, not a model")
    return d / "model.onnx"


def _missing_external(d):
    path = write_external(d / "ext.onnx")
    (d / "ext.onnx.data").unlink()
    return path


def _truncated_external(d):
    path = write_external(d / "ext.onnx")
    data = (d / "ext.onnx.data").read_bytes()
    (d / "ext.onnx.data").write_bytes(data[:100])
    return path


def _checker_fails(d):
    path = write_mlp(d / "dangling.onnx")
    model = onnx.load(path)
    model.graph.node[1].input[0] = "no_such_value"  # Relu reads a value nobody produces
    onnx.save(model, path)
    return path


def _edited_mlp(d: Path, edit) -> Path:
    """The MLP with one structural defect the ONNX checker rejects."""
    path = write_mlp(d / "broken.onnx")
    model = onnx.load(path)
    edit(model)
    onnx.save(model, path)
    return path

def _mlp(d):
    return write_mlp(d / "mlp.onnx")


def _calib(name: str, **arrays):
    def setup(d: Path):
        write_mlp(d / "mlp.onnx")
        np.savez(d / name, **arrays)
        return ["quantize", "mlp.onnx", "-o", "q.onnx", "--calib", name, "--no-eval"], ["q.onnx"]

    return setup


def _scales(text: str):
    def setup(d: Path):
        write_mlp(d / "mlp.onnx")
        (d / "scales.json").write_text(text)
        return ["quantize", "mlp.onnx", "-o", "q.onnx", "--scales", "scales.json", "--no-eval"], ["q.onnx"]

    return setup


def _partition_dir(d: Path) -> Path:
    """A valid TP=2 partition of the MLP, built through the CLI (the setup of the manifest cases)."""
    write_mlp(d / "mlp.onnx")
    assert main(["partition", "mlp.onnx", "-o", str(d / "part"), "--tp", "2", "--json"]) == 0
    return d / "part"


def _manifest_missing_shard(d):
    part = _partition_dir(d)
    (part / "rank1_stage0.onnx").unlink()
    (d / "feeds.npz").write_bytes(b"")
    np.savez(d / "feeds.npz", x=np.ones((1, 8), np.float32))
    return ["run", "part", "--inputs", "feeds.npz", "--save-outputs", "out.npz"], ["out.npz"]


def _manifest_tampered_shard(d):
    part = _partition_dir(d)
    other = onnx.load(part / "rank0_stage0.onnx")
    onnx.save(other, part / "rank1_stage0.onnx")  # a valid model, but not the shard the manifest describes
    np.savez(d / "feeds.npz", x=np.ones((1, 8), np.float32))
    return ["run", "part", "--inputs", "feeds.npz", "--save-outputs", "out.npz"], ["out.npz"]


def _manifest_garbage(d):
    part = _partition_dir(d)
    (part / "manifest.json").write_text("{ not json")
    return ["reshard", "part", "-o", "resharded", "--tp", "1"], ["resharded"]


def _manifest_wrong_rank_count(d):
    part = _partition_dir(d)
    manifest = json.loads((part / "manifest.json").read_text())
    manifest["mesh"]["tp"] = 4
    manifest["mesh"]["world_size"] = 4
    (part / "manifest.json").write_text(json.dumps(manifest))
    return ["reshard", "part", "-o", "resharded", "--tp", "1"], ["resharded"]


def _job_file(text: str, name: str = "jobs.yaml"):
    def setup(d: Path):
        write_mlp(d / "mlp.onnx")
        (d / name).write_text(text)
        return ["batch", name, "--output-dir", "bout", "--cache-dir", "bcache", "--no-progress"], ["bout", "bcache"]

    return setup


def _enospc_open(monkeypatch, directory):
    """Simulated full disk: the model file write gets half its bytes down, then ENOSPC."""
    import maia_onnx.io as mio

    real_open = open

    class HalfFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return HalfFile(f) if "w" in mode and os.path.abspath(file).startswith(str(directory)) else f

    monkeypatch.setattr(mio, "open", fake_open, raising=False)
    real_fdopen = os.fdopen

    def fake_fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        return HalfFile(f) if "w" in mode else f

    monkeypatch.setattr(mio.os, "fdopen", fake_fdopen)


def _compiled(embed: bool, then, damage: str | None = None):
    """Compile the MLP first (setup), optionally damage its side file, then run the command ``then()`` returns."""
    def setup(d: Path):
        _mlp(d)
        argv = ["compile", "mlp.onnx", "-o", "c.onnx", "--json"] + ([] if embed else ["--no-embed"])
        assert main(argv) == 0
        side = d / "c_maia.bin"
        if damage == "delete":
            side.unlink()
        elif damage == "truncate":
            side.write_bytes(side.read_bytes()[:200])
        return then()

    return setup


def _interrupt_write(monkeypatch, directory):
    """Ctrl-C while the output is being written: exit 130, and no partial file."""
    import maia_onnx.io as mio

    def interrupted(src, dst, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mio.os, "replace", interrupted)


def _root() -> str | None:
    return "root ignores directory permissions" if hasattr(os, "geteuid") and os.geteuid() == 0 else None


def _readonly_dir(d):
    write_mlp(d / "mlp.onnx")
    (d / "ro").mkdir()
    os.chmod(d / "ro", 0o555)
    return ["quantize", "mlp.onnx", "-o", "ro/q.onnx", "--no-eval"], ["ro/q.onnx"]


def _parent_is_a_file(d):
    write_mlp(d / "mlp.onnx")
    (d / "notadir").write_text("a file where the output directory should be")
    return ["compile", "mlp.onnx", "-o", "notadir/c.onnx"], ["notadir/c.onnx"]


CASES = [
    # --- unreadable model files, across verbs
    Case("empty-file-inspect", _case_model(lambda m: (["inspect", m], []), _empty), "empty"),
    Case("empty-file-analyze", _case_model(lambda m: (["analyze", m], []), _empty), "empty"),
    Case("truncated-file-quantize", _case_model(q, _truncated), "truncated"),
    Case("not-onnx-compile", _case_model(c, _garbage), "not onnx"),
    Case("not-onnx-analyze", _case_model(lambda m: (["analyze", m], []), _garbage), "not onnx"),
    Case("directory-for-file-partition", _case_model(p, _a_directory), "directory"),
    Case("directory-for-file-run", _case_model(lambda m: (["run", m, "--random"], []), _a_directory), "directory"),
    Case("missing-file-run", lambda d: (["run", "nope.onnx", "--random"], []), "not found"),
    Case("missing-external-data-quantize", _case_model(q, _missing_external), "external data"),
    Case("missing-external-data-run", _case_model(lambda m: (["run", m, "--random"], []), _missing_external), "external data"),
    Case("truncated-external-data-compile", _case_model(c, _truncated_external), "truncated"),
    Case("truncated-external-data-partition", _case_model(p, _truncated_external), "truncated"),
    # --- models ONNX Runtime / ONNX reject
    Case("opset-too-old-inspect", _case_model(lambda m: (["inspect", m], []), lambda d: with_opset(d / "old.onnx", 5)), "opset 5"),
    Case("opset-too-old-analyze", _case_model(lambda m: (["analyze", m], []), lambda d: with_opset(d / "old.onnx", 5)), "opset 5"),
    Case("opset-too-new-quantize", _case_model(q, lambda d: with_opset(d / "new.onnx", 99)), "opset 99"),
    Case("opset-too-new-compile", _case_model(c, lambda d: with_opset(d / "new.onnx", 99)), "opset 99"),
    Case("fails-checker-compile", _case_model(c, _checker_fails), "no_such_value"),
    Case("fails-checker-partition", _case_model(p, _checker_fails), "no_such_value"),
    Case("unknown-standard-op-compile", _case_model(c, lambda d: _edited_mlp(d, lambda m: setattr(m.graph.node[1], "op_type", "NoSuchOp"))), "NoSuchOp"),
    Case("wrong-arity-quantize", _case_model(q, lambda d: _edited_mlp(d, lambda m: m.graph.node[1].input.pop())), "inputs"),
    Case("duplicate-producer-inspect", _case_model(lambda m: (["inspect", m], []), lambda d: _edited_mlp(
        d, lambda m: (m.graph.node[2].output.__setitem__(0, "h"), setattr(m.graph.output[0], "name", "h")))), "redeclared"),
    Case("export-opset-too-old", lambda d: (["export", "llama-tiny", "--opset", "5", "-o", "e.onnx"], ["e.onnx"]), "opset"),
    Case("export-unknown-model", lambda d: (["export", "no-such-model", "-o", "e.onnx"], ["e.onnx"]), "no-such-model"),
    # --- quantization inputs
    Case("nothing-quantisable", _case_model(q, lambda d: write_relu_only(d / "relu.onnx")), "nothing to quantize"),
    Case("calib-wrong-names", _calib("calib.npz", not_x=np.zeros((4, 1, 8), np.float32)), "x"),
    Case("calib-wrong-shape", _calib("calib.npz", x=np.zeros((4, 1, 9), np.float32)), "shape"),
    Case("calib-wrong-dtype", _calib("calib.npz", x=np.zeros((4, 1, 8), np.int32)), "dtype"),
    Case("calib-nan", _calib("calib.npz", x=np.full((4, 1, 8), np.nan, np.float32)), "nan"),
    Case("calib-inf", _calib("calib.npz", x=np.full((4, 1, 8), np.inf, np.float32)), "inf"),
    Case("calib-not-npz", lambda d: (_mlp(d), (d / "calib.npz").write_bytes(b"garbage"))[0] and
         (["quantize", "mlp.onnx", "-o", "q.onnx", "--calib", "calib.npz", "--no-eval"], ["q.onnx"]), "calib"),
    Case("scales-unknown-names", _scales('{"model.layers.99.mlp.down_proj.weight_scale": 0.1}'), "matches"),
    Case("scales-zero", _scales('{"W1.weight_scale": 0.0}'), "> 0"),
    Case("scales-negative", _scales('{"W1.weight_scale": -0.5}'), "> 0"),
    Case("scales-nan", _scales('{"W1.weight_scale": NaN}'), "finite"),
    Case("scales-not-json", _scales("{ nope"), "json"),
    # --- partitioning
    Case("tp-divides-nothing", _case_model(lambda m: p(m, "--tp", "3"), _mlp), "--tp 3"),
    Case("more-stages-than-layers", _case_model(lambda m: p(m, "--pp", "5"), _mlp), "--pp 5"),
    Case("manifest-missing-shard", _manifest_missing_shard, "rank1_stage0.onnx"),
    Case("manifest-shard-mismatch", _manifest_tampered_shard, "rank1_stage0.onnx"),
    Case("manifest-not-json", _manifest_garbage, "manifest"),
    Case("manifest-wrong-rank-count", _manifest_wrong_rank_count, "manifest"),
    # --- output paths and the file system
    Case("output-is-input-quantize", lambda d: (_mlp(d), (["quantize", "mlp.onnx", "-o", "mlp.onnx"], []))[1], "input"),
    Case("output-is-input-compile", lambda d: (_mlp(d), (["compile", "mlp.onnx", "-o", "./mlp.onnx"], []))[1], "input"),
    Case("output-dir-missing", lambda d: (_mlp(d), (["quantize", "mlp.onnx", "-o", "nodir/q.onnx"], ["nodir"]))[1], "does not exist"),
    Case("output-dir-readonly", _readonly_dir, "writable", skip_if=_root),
    Case("output-parent-is-file", _parent_is_a_file, "not a directory"),
    Case("disk-full-quantize", _case_model(q, _mlp), "no space", patch=_enospc_open),
    Case("disk-full-compile", _case_model(c, _mlp), "no space", patch=_enospc_open),
    Case("disk-full-compile-side-file", lambda d: (_mlp(d), (["compile", "mlp.onnx", "-o", "c.onnx", "--no-embed"],
                                                           ["c.onnx", "c_maia.bin"]))[1], "no space", patch=_enospc_open),
    # --- profiles and job files
    Case("unknown-device-compile", lambda d: (_mlp(d), (["compile", "mlp.onnx", "-o", "c.onnx", "--device", "tpu9"], ["c.onnx"]))[1], "tpu9"),
    Case("unknown-device-analyze", lambda d: (_mlp(d), (["analyze", "mlp.onnx", "--device", "tpu9"], []))[1], "tpu9"),
    Case("unknown-interconnect", lambda d: (_mlp(d), (["analyze", "mlp.onnx", "--interconnect", "warp-drive"], []))[1], "warp-drive"),
    Case("malformed-device-json", lambda d: (_mlp(d), (d / "dev.json").write_text("{ broken"),
                                             (["compile", "mlp.onnx", "-o", "c.onnx", "--device", "dev.json"], ["c.onnx"]))[2], "dev.json"),
    Case("job-file-syntax", _job_file("jobs: [ {name: a,\n"), "jobs.yaml"),
    Case("job-file-unknown-step", _job_file("version: 1\njobs:\n  - name: a\n    model: mlp.onnx\n    steps: [frobnicate]\n"), "frobnicate"),
    Case("job-file-missing", lambda d: (["batch", "nojobs.yaml"], []), "nojobs.yaml"),
    Case("run-inputs-wrong-shape", lambda d: (_mlp(d), np.savez(d / "in.npz", x=np.ones((1, 9), np.float32)),
                                              (["run", "mlp.onnx", "--inputs", "in.npz", "--save-outputs", "o.npz"], ["o.npz"]))[2], "shape"),
    Case("run-inputs-wrong-dtype", lambda d: (_mlp(d), np.savez(d / "in.npz", x=np.ones((1, 8), np.int64)),
                                              (["run", "mlp.onnx", "--inputs", "in.npz", "--save-outputs", "o.npz"], ["o.npz"]))[2], "int64"),
    Case("run-unknown-provider", lambda d: (_mlp(d), (["run", "mlp.onnx", "--random", "--providers", "TPUExecutionProvider"], []))[1], "provider"),
    Case("compile-already-compiled", _compiled(embed=True, then=lambda: (["compile", "c.onnx", "-o", "c2.onnx"], ["c2.onnx"])), "compiled"),
    Case("run-side-file-missing", _compiled(embed=False, damage="delete",
                                            then=lambda: (["run", "c.onnx", "--random", "--save-outputs", "o.npz"], ["o.npz"])), "c_maia.bin"),
    Case("run-side-file-truncated", _compiled(embed=False, damage="truncate",
                                              then=lambda: (["run", "c.onnx", "--random", "--save-outputs", "o.npz"], ["o.npz"])), "truncated"),
    Case("partition-tp-zero", _case_model(lambda m: p(m, "--tp", "0"), _mlp), ">= 1"),
    Case("quantize-block-size-zero", lambda d: (_mlp(d), (["quantize", "mlp.onnx", "-o", "q.onnx", "--granularity", "block",
                                                           "--block-size", "0"], ["q.onnx"]))[1], "block-size"),
    Case("compile-bad-dims", lambda d: (_mlp(d), (["compile", "mlp.onnx", "-o", "c.onnx", "--dims", "batch=many"], ["c.onnx"]))[1], "--dim"),
    Case("analyze-bad-tp-list", lambda d: (_mlp(d), (["analyze", "mlp.onnx", "--tp", "two"], []))[1], "--tp"),
    Case("output-is-a-directory", lambda d: (_mlp(d), (d / "out.onnx").mkdir(),
                                             (["quantize", "mlp.onnx", "-o", "out.onnx", "--no-eval"], []))[2], "out.onnx"),
    Case("reshard-not-a-partition", lambda d: (_mlp(d), (["reshard", "mlp.onnx", "-o", "resharded"], ["resharded"]))[1], "partition"),
    Case("reshard-output-is-input", lambda d: (_partition_dir(d), (["reshard", "part", "-o", "part", "--tp", "1"], []))[1], "input"),
    Case("job-file-not-a-mapping", _job_file("- just\n- a list\n"), "mapping"),
    Case("job-file-empty", _job_file(""), "jobs.yaml"),
    Case("interrupted-mid-write", _case_model(q, _mlp), "interrupted", patch=_interrupt_write),
    Case("run-inputs-wrong-names", lambda d: (_mlp(d), np.savez(d / "in.npz", nope=np.ones((1, 8), np.float32)),
                                              (["run", "mlp.onnx", "--inputs", "in.npz", "--save-outputs", "o.npz"], ["o.npz"]))[2], "x"),
]


def _verb(case: Case) -> str:
    return case.name


def test_catalogue_is_broad(tmp_path, monkeypatch, capsys):
    """The issue asks for >= 25 classes of bad input across all nine verbs."""
    assert len({c.name for c in CASES}) == len(CASES) >= 25
    verbs = set()
    for i, case in enumerate(CASES):
        work = tmp_path / str(i)
        work.mkdir()
        monkeypatch.chdir(work)
        argv, _ = case.setup(work)
        verbs.add(argv[0])
    capsys.readouterr()
    assert verbs == {"export", "inspect", "quantize", "partition", "reshard", "compile", "run", "analyze", "batch"}


@pytest.mark.parametrize("case", CASES, ids=_verb)
def test_bad_input(case: Case, tmp_path, capsys, monkeypatch):
    reason = case.skip_if()
    if reason:
        pytest.skip(reason)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv, outputs = case.setup(work)
    before = _snapshot(work)
    if case.patch is not None:
        case.patch(monkeypatch, work)
    try:
        rc, out, err = run_cli(argv, capsys)
    finally:
        if (work / "ro").exists():
            os.chmod(work / "ro", 0o755)
    assert_clean_failure(rc, err, out, work, before, outputs, case.expect)


def test_all_zero_weights_and_calibration_stay_finite(tmp_path, capsys, monkeypatch):
    """All-zero tensors give a zero amax: the scale must not become 0 (division by zero -> NaN model)."""
    import onnxruntime as ort

    monkeypatch.chdir(tmp_path)
    write_mlp(tmp_path / "zero.onnx", zero_weights=True)
    np.savez(tmp_path / "zeros.npz", x=np.zeros((4, 1, 8), np.float32))
    assert main(["quantize", "zero.onnx", "-o", "q.onnx", "--calib", "zeros.npz", "--no-eval"]) == 0
    model = onnx.load(tmp_path / "q.onnx")
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init).astype(np.float32)
        assert np.all(np.isfinite(arr)), f"{init.name} holds NaN/Inf"
        if "scale" in init.name:
            assert np.all(arr > 0), f"{init.name} has a zero scale"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(tmp_path / "zero.onnx"), so).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), so).run(None, {"x": x})[0]
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref, atol=1e-6)  # W1 = 0 -> y = 0 exactly in both


@pytest.mark.parametrize("argv_builder,expect", [
    (lambda d: ["inspect", str(_empty(d))], "empty"),
    (lambda d: ["quantize", str(_truncated(d)), "-o", str(d / "q.onnx")], "truncated"),
    (lambda d: ["batch", str(d / "missing.yaml")], "missing.yaml"),
], ids=["inspect-empty", "quantize-truncated", "batch-missing"])
def test_console_script_end_to_end(argv_builder, expect, tmp_path):
    """The real process: one error line on stderr, no traceback, non-zero exit."""
    argv = argv_builder(tmp_path)
    before = _snapshot(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "MAIA_ONNX_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "maia_onnx", *argv], capture_output=True, text=True, env=env, timeout=120)
    assert_clean_failure(proc.returncode, proc.stderr, proc.stdout, tmp_path, before, [str(tmp_path / "q.onnx")], expect)


def test_debug_flag_shows_traceback(tmp_path):
    """--debug is the one way to get the traceback (for bug reports)."""
    _empty(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "maia_onnx", "--debug", "inspect", str(tmp_path / "empty.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ModelLoadError" in proc.stderr


def test_real_disk_full_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A genuinely full file system (a 64 KiB tmpfs, where mounting is allowed): clean error, nothing left."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        rng = np.random.default_rng(0)
        w = numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32), "W")  # 256 KiB of weights
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "big",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        source = tmp_path / "big.onnx"
        onnx.save(model, source)
        digest = sha256_file(source)
        monkeypatch.chdir(tmp_path)
        for argv in (["compile", str(source), "-o", str(small / "c.onnx")],
                     ["compile", str(source), "-o", str(small / "c.onnx"), "--no-embed"],
                     ["partition", str(source), "-o", str(small / "part")]):
            rc, out, err = run_cli(argv, capsys)
            assert_clean_failure(rc, err, out, small, {}, ["c.onnx", "c_maia.bin", "part"], "no space")
        assert sha256_file(source) == digest
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
