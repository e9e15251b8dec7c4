"""Model I/O: lazy loading, external data, atomic saves, clear errors for bad files."""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import pytest

from maia_onnx.errors import ModelLoadError, UserError
from maia_onnx.io import atomic_dir, atomic_write, check_output_path, load_model, save_model, sha256_file
from maia_onnx.ortutil import run_model

TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 64] x) => (float[2, 32] y) <float[64, 32] w = {W}> {
    y = MatMul(x, w)
}
"""


def _model(seed: int = 0) -> tuple[ir.Model, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    model = ir.from_onnx_text(TEXT.replace("{W}", "{" + ",".join(repr(float(v)) for v in w.ravel()) + "}"))
    return model, w


def test_roundtrip_inline_and_external(tmp_path):
    model, w = _model()
    x = np.ones((2, 64), np.float32)
    inline = save_model(model, tmp_path / "a.onnx", external_data=False)
    ext = save_model(model, tmp_path / "b.onnx", external_data=True)
    assert not (tmp_path / "a.onnx.data").exists()
    assert (tmp_path / "b.onnx.data").stat().st_size == w.nbytes
    for path in (inline, ext):
        np.testing.assert_array_equal(run_model(path, {"x": x})["y"], x @ w)
    loaded = load_model(ext)
    tensor = loaded.graph.initializers["w"].const_value
    assert isinstance(tensor, ir.ExternalTensor)  # lazy: not read at load time
    # re-saving an externally backed model inline must not point at the old data file
    save_model(loaded, tmp_path / "c.onnx", external_data=False)
    os.unlink(tmp_path / "b.onnx.data")
    np.testing.assert_array_equal(run_model(tmp_path / "c.onnx", {"x": x})["y"], x @ w)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "c.onnx"]  # no temp leftovers


@pytest.mark.parametrize(
    "content, fragment",
    [(b"", "empty"), (b"not an onnx model at all" * 3, "cannot parse")],
)
def test_bad_files(tmp_path, content, fragment):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=fragment):
        load_model(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="directory"):
        load_model(tmp_path)


def test_missing_or_truncated_external_data(tmp_path):
    model, _ = _model()
    path = save_model(model, tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    blob = data.read_bytes()
    data.write_bytes(blob[:10])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(path)
    data.unlink()
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(path)


def test_check_output_path(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(b"x")
    with pytest.raises(UserError, match="is the input"):
        check_output_path(src, src)
    with pytest.raises(UserError, match="does not exist"):
        check_output_path(tmp_path / "no" / "out.onnx", src)
    assert check_output_path(tmp_path / "out.onnx", src) == tmp_path / "out.onnx"


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_atomic_write_disk_full_is_user_error(tmp_path, monkeypatch):
    import errno

    target = tmp_path / "r.bin"

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="no space left"):
        with atomic_write(target) as f:
            monkeypatch.setattr(os, "fsync", full)
            f.write(b"abc")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_whole(tmp_path):
    out = tmp_path / "part"
    with atomic_dir(out) as d:
        (d / "a.txt").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(out) as d:
            (d / "b.txt").write_text("2")
            raise ValueError
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part"]


def test_sha256_changes_with_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    assert sha256_file(a) != sha256_file(b)
