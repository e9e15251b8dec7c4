"""Tests for device/interconnect profile loading: built-ins, sources, user files, clear errors."""

from __future__ import annotations

import json

import pytest

from maia_onnx.errors import UserError
from maia_onnx.runtime.profiles import (
    list_devices,
    list_interconnects,
    load_device,
    load_interconnect,
)


def test_builtin_devices_have_published_figures():
    m = load_device("maia100")
    assert m.memory_capacity == 64e9 and m.memory_bandwidth == 1.8e12
    assert m.peak_flops == {"bf16": 0.8e15, "mx9": 1.5e15, "mx6": 3.0e15}
    assert "Hot Chips 2024" in m.sources["peak_flops.mx9"]
    m2 = load_device("maia200")
    assert m2.peak("fp4") == 10e15 and m2.peak("fp8") == 5e15 and m2.memory_capacity == 216e9
    assert "peak_flops.bf16" in m2.estimates  # not published: marked estimate
    h = load_device("h100-sxm")
    assert h.peak("bf16") == pytest.approx(989.4e12) and h.memory_bandwidth == 3.35e12


def test_every_builtin_figure_has_a_source():
    for name in list_devices():
        d = load_device(name)
        for key in ("memory_capacity_bytes", "memory_bandwidth_bytes_per_s"):
            assert d.sources.get(key), (name, key)
        for dtype in d.peak_flops:
            assert d.sources.get(f"peak_flops.{dtype}"), (name, dtype)
    for name in list_interconnects():
        ic = load_interconnect(name)
        assert ic.sources.get("bandwidth_bytes_per_s") and ic.sources.get("alpha_s"), name


def test_compute_dtype_map_resolves_unsupported_precisions():
    m = load_device("maia100")
    assert m.compute_dtype("fp32") == "bf16" and m.peak("fp32") == 0.8e15
    assert m.compute_dtype("fp8") == "mx9" and m.peak("fp8") == 1.5e15
    assert m.peak("mxfp4") == 3.0e15


def test_interconnects():
    assert load_interconnect("nvlink4").bandwidth == 450e9
    assert load_interconnect("pcie5").bandwidth == 64e9
    assert load_interconnect("maia-eth").bandwidth == 600e9
    loop = load_interconnect("loopback")
    # calibrated on this host by a gloo sweep: measured figures, not estimates, each naming its source
    assert loop.estimates == set() or not loop.estimates
    assert loop.bandwidth == 1.6e9 and loop.alpha == 8.2e-4
    assert {"nvlink4", "pcie5", "maia-eth", "loopback"} <= set(list_interconnects())


def test_user_profile_file_and_profile_path(tmp_path, monkeypatch):
    f = tmp_path / "mychip.json"
    f.write_text(json.dumps({"name": "mychip", "memory_capacity_bytes": 1e9, "memory_bandwidth_bytes_per_s": 1e11,
                             "peak_flops": {"bf16": 1e14}}))
    d = load_device(str(f))
    assert d.name == "mychip" and d.peak("fp32") == 1e14 and d.vector_flops == pytest.approx(1e14 / 8)
    (tmp_path / "interconnects").mkdir()
    (tmp_path / "interconnects" / "ib400.json").write_text(json.dumps({"bandwidth_bytes_per_s": 50e9, "alpha_s": 5e-6}))
    monkeypatch.setenv("MAIA_ONNX_PROFILE_PATH", str(tmp_path))
    assert load_device("mychip").memory_bandwidth == 1e11
    ic = load_interconnect("ib400")
    assert ic.bandwidth == 50e9 and ic.alpha == 5e-6 and ic.name == "ib400"


def test_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown device profile 'nope'.*maia100"):
        load_device("nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"memory_bandwidth_bytes_per_s": 1e11, "peak_flops": {"bf16": 1e14}}))
    with pytest.raises(UserError, match="lacks 'memory_capacity_bytes'"):
        load_device(bad)
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_device(bad)
    with pytest.raises(UserError, match="is a 'interconnect' profile|expected a device"):
        load_device(load_interconnect("pcie5").path)


def test_map_takes_precedence_over_a_listed_non_tensor_rate():
    h = load_device("h100-sxm")
    # fp32 is listed (66.9 TFLOP/s CUDA cores) but FP32 matmuls run on TF32 tensor cores
    assert h.compute_dtype("fp32") == "tf32" and h.peak("fp32") == pytest.approx(494.7e12)
    assert h.peak("fp8") == pytest.approx(1978.9e12)
