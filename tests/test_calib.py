"""Calibration: streamed histograms, the four scale methods, and the npz / directory / random data sources."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from maia_onnx.calib import (
    HistogramStat,
    calibrate,
    collect_statistics,
    compute_scales,
    make_source,
    split_holdout,
)
from maia_onnx.errors import InvalidOptionError, UserError
from maia_onnx.formats.fp8 import FP8_E4M3FN, cast_fp8_saturate


def _fp8_mse(x: np.ndarray, clip: float) -> float:
    scale = np.float32(clip / 448.0)
    q = cast_fp8_saturate(x / scale).astype(np.float32) * scale
    return float(np.mean((x.astype(np.float64) - q) ** 2))


def test_histogram_growth_merges_exactly():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(10_000).astype(np.float32) * s for s in (0.1, 1.0, 7.0, 0.5)]
    stat = HistogramStat(bins=1024)
    for b in batches:
        stat.update(b)
    everything = np.abs(np.concatenate(batches))
    assert stat.count == everything.size == stat.hist.sum()
    assert stat.amax == float(everything.max())
    assert stat.range >= stat.amax
    # the merged histogram equals a histogram of all data on the final range (bins merged by powers of two)
    expect = np.bincount(np.minimum((everything * np.float32(stat.bins / stat.range)).astype(np.int64), stat.bins - 1),
                         minlength=stat.bins)
    # values binned before a range change may land one (coarser) bin apart at exact edges only
    assert np.abs(np.cumsum(stat.hist) - np.cumsum(expect)).max() <= 2


def test_percentile_within_one_bin_of_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(200_000).astype(np.float32)
    stat = HistogramStat()
    for chunk in np.array_split(x, 7):
        stat.update(chunk)
    for pct in (50.0, 99.0, 99.99):
        assert abs(stat.percentile_amax(pct) - np.percentile(np.abs(x), pct)) <= 2 * stat.bin_width
    assert stat.percentile_amax(100.0) == pytest.approx(float(np.abs(x).max()))


@pytest.mark.parametrize("dist", ["normal", "laplace", "outliers"])
def test_mse_choice_is_near_the_true_optimum(dist):
    rng = np.random.default_rng(2)
    x = {"normal": rng.standard_normal, "laplace": lambda n: rng.laplace(size=n), "outliers": rng.standard_normal}[dist](100_000).astype(np.float32)
    if dist == "outliers":
        x[:3] = [4000.0, -3500.0, 3000.0]
    stat = HistogramStat()
    for chunk in np.array_split(x, 4):
        stat.update(chunk)
    clip = stat.mse_amax(FP8_E4M3FN)
    assert 0 < clip <= stat.amax
    # measured on the real data, the histogram's choice is close to the best of a dense sweep
    best = min(_fp8_mse(x, c) for c in np.geomspace(stat.amax / 64, stat.amax, 200))
    assert _fp8_mse(x, clip) <= 1.25 * best
    assert _fp8_mse(x, clip) <= _fp8_mse(x, stat.amax) * 1.0001


def test_entropy_keeps_well_behaved_range_and_stays_in_bounds():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(50_000).astype(np.float32)
    stat = HistogramStat()
    stat.update(x)
    clip = stat.entropy_amax(FP8_E4M3FN)
    assert 0.5 * stat.amax <= clip <= stat.amax


def test_compute_scales_methods_and_errors():
    stat = HistogramStat()
    stat.update(np.linspace(-8, 8, 10_001, dtype=np.float32))
    scales = {m: compute_scales({"a": stat}, m)["a"] for m in ("minmax", "percentile", "mse", "entropy")}
    assert scales["minmax"] == pytest.approx(8 / 448)
    assert scales["percentile"] <= scales["minmax"]
    assert all(0 < s <= scales["minmax"] * 1.0001 for s in scales.values())
    assert compute_scales({"a": stat}, "minmax", "e5m2")["a"] == pytest.approx(8 / 57344)
    with pytest.raises(InvalidOptionError):
        compute_scales({"a": stat}, "kl")
    with pytest.raises(InvalidOptionError):
        compute_scales({"a": stat}, "percentile", percentile=0)
    empty = HistogramStat()
    assert compute_scales({"a": empty}, "mse")["a"] == 1.0  # never seen data: neutral scale, no crash


EMB = """
<ir_version: 10, opset_import: ["" : 21]>
emb (int64[batch, seq] ids, float[batch, seq, 4] bias) => (float[batch, seq, 4] y) {
   e = Gather(table, ids)
   s = Add(e, bias)
   y = MatMul(s, W)
}
"""


@pytest.fixture
def emb_model():
    proto = onnx.parser.parse_model(EMB)
    rng = np.random.default_rng(4)
    proto.graph.initializer.extend([
        onnx.numpy_helper.from_array(rng.standard_normal((50, 4)).astype(np.float32), "table"),
        onnx.numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W"),
    ])
    return ir.serde.deserialize_model(proto)


def test_random_source_uses_vocab_range_and_dims(emb_model):
    src = make_source("random", num_samples=5, batch_size=2, dims={"seq": 3})
    batches = list(src.batches(emb_model))
    assert [b["ids"].shape for b in batches] == [(2, 3), (2, 3), (1, 3)]
    ids = np.concatenate([b["ids"].ravel() for b in batches])
    assert ids.max() < 50 and ids.max() >= 8  # drawn over the embedding's 50 rows, not a tiny default
    assert batches[0]["bias"].dtype == np.float32 and src.count() == 3


def test_npz_per_sample_and_batch_layouts(tmp_path, emb_model):
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 50, (6, 1, 3))
    bias = rng.standard_normal((6, 1, 3, 4)).astype(np.float32)
    np.savez(tmp_path / "per_sample.npz", ids=ids, bias=bias)  # rank + 1: first axis = samples
    got = list(make_source(tmp_path / "per_sample.npz").batches(emb_model))
    assert len(got) == 6 and got[2]["ids"].shape == (1, 3)
    np.testing.assert_array_equal(got[2]["bias"], bias[2])
    np.savez(tmp_path / "flat.npz", ids=ids[:, 0], bias=bias[:, 0])  # rank: first axis is the batch axis
    got = list(make_source(tmp_path / "flat.npz", batch_size=4).batches(emb_model))
    assert [g["ids"].shape for g in got] == [(4, 3), (2, 3)]


def test_directory_source_and_holdout_split(tmp_path, emb_model):
    rng = np.random.default_rng(6)
    d = tmp_path / "calib"
    d.mkdir()
    for i in range(3):
        np.savez(d / f"part{i}.npz", ids=rng.integers(0, 50, (4, 3)), bias=np.full((4, 3, 4), i, np.float32))
    src = make_source(d, batch_size=2)
    assert src.total_samples() == 12
    calib, held = split_holdout(src, 3)
    assert calib.total_samples() == 9 and held.total_samples() == 3
    held_bias = np.concatenate([b["bias"] for b in held.batches(emb_model)])
    np.testing.assert_array_equal(held_bias, 2.0)  # the last samples (part2) are held out
    calib_bias = np.concatenate([b["bias"] for b in calib.batches(emb_model)])
    assert calib_bias.shape[0] == 9 and calib_bias[-1, 0, 0] == 2.0 and calib_bias[0, 0, 0] == 0.0


def test_source_errors(tmp_path, emb_model):
    with pytest.raises(UserError, match="not found"):
        make_source(tmp_path / "missing.npz")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(UserError, match="npz"):
        make_source(tmp_path / "data.txt")
    np.savez(tmp_path / "partial.npz", ids=np.zeros((2, 3), np.int64))
    with pytest.raises(UserError, match="bias"):
        list(make_source(tmp_path / "partial.npz").batches(emb_model))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .npz"):
        make_source(tmp_path / "empty").total_samples()


def test_streamed_calibration_matches_direct_statistics(tmp_path, emb_model):
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 50, (8, 3))
    bias = rng.standard_normal((8, 3, 4)).astype(np.float32)
    np.savez(tmp_path / "c.npz", ids=ids, bias=bias)
    scales, stats = calibrate(emb_model, ["s", "bias"], make_source(tmp_path / "c.npz", batch_size=3), show_progress=False)
    table = emb_model.graph.initializers["table"].const_value.numpy()
    s = table[ids] + bias
    assert stats["s"].count == s.size and stats["bias"].count == bias.size
    assert scales["s"] == pytest.approx(float(np.abs(s).max()) / 448, rel=1e-6)
    assert scales["bias"] == pytest.approx(float(np.abs(bias).max()) / 448, rel=1e-6)
    # the model itself is untouched by calibration (extra outputs live only in the session)
    assert [o.name for o in emb_model.graph.outputs] == ["y"]
    stats2 = collect_statistics(emb_model, ["s"], make_source(tmp_path / "c.npz", batch_size=8), show_progress=False)
    assert stats2["s"].amax == stats["s"].amax
