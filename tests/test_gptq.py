"""GPTQ rounding: lower layer-output error than round-to-nearest, values exactly on the format's grid, Hessians
that ignore padded positions."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from maia_onnx.formats.gptq import (HessianAccumulator, fp4_e4m3_global_scale, fp4_e4m3_quantizer, gptq,
                                    mxfp4_quantizer, output_error)


def _layer(seed=0, out=64, cols=128):
    """Heavy-tailed (trained-like) weights and correlated inputs with a few outlier channels."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=(out, cols)) * 0.02).astype(np.float32)
    x = rng.standard_normal((1024, cols)) @ (np.eye(cols) + 0.3 * rng.standard_normal((cols, cols)) / np.sqrt(cols))
    x[:, :4] *= 8
    return w, x


@pytest.mark.parametrize("make", [lambda w: mxfp4_quantizer(), lambda w: fp4_e4m3_quantizer(fp4_e4m3_global_scale(w))],
                         ids=["mxfp4", "fp4-e4m3-scales"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_beats_round_to_nearest_and_stays_on_the_grid(make, seed):
    w, x = _layer(seed)
    acc = HessianAccumulator(w.shape[1])
    acc.update(x)
    quantizer = make(w)
    rtn, _ = quantizer.fake_quant(w)
    q, scales = gptq(w, acc.h, quantizer)
    assert output_error(w, q, acc.h) < 0.9 * output_error(w, rtn, acc.h)
    elements = np.repeat(scales, quantizer.group_size, axis=1)[:, : w.shape[1]]
    codes = q / elements
    # every value is an FP4 element times its group's scale (up to the float32 product's last bit)
    np.testing.assert_allclose(codes.astype(ml_dtypes.float4_e2m1fn).astype(np.float32), codes, rtol=1e-6, atol=0)
    assert np.abs(codes).max() <= 6.0 * (1 + 1e-6)


def test_hessian_streams_and_skips_padding():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 8))
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=bool)
    padded = x.copy()
    padded[~valid] = 1e6  # garbage where there is no token
    a, b = HessianAccumulator(8), HessianAccumulator(8)
    a.update(padded, valid)
    for row in x[valid]:
        b.update(row[None])
    np.testing.assert_allclose(a.h, b.h, rtol=1e-12)
    np.testing.assert_allclose(a.h, 2 * x[valid].T @ x[valid] / valid.sum(), rtol=1e-12)
