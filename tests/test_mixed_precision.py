"""Sensitivity-driven mixed precision: ranking, minimal kept set, BF16 for kept layers, end-to-end target."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from maia_onnx.errors import InvalidOptionError
from maia_onnx.io import load_model
from maia_onnx.ortutil import make_inputs, run_model
from maia_onnx.passes.bf16 import Bf16Pass
from maia_onnx.passes.mixed_precision import (
    MixedPrecisionPass,
    MixedPrecisionPassResult,
    MixedPrecisionPlan,
    apply_with_kept,
    clone_model,
    end_to_end_cosine,
    exclude_patterns,
    kept_passes,
    search_mixed_precision,
)
from maia_onnx.passes.quantize_mx import QuantizeMxPass
from maia_onnx.pipeline import validate_model

DIMS = {"batch": 1, "seq": 8, "past": 4}


def feeds_for(model, n=2):
    return [make_inputs(model, seed=s, dims=DIMS) for s in range(n)]


def mx(fmt):
    """A recipe: fresh MX passes leaving the kept node names alone."""
    return lambda kept: [QuantizeMxPass(fmt, exclude=exclude_patterns(kept))]


def test_keeps_fewest_most_sensitive_layers_in_bf16(llama_tiny_onnx):
    fp32 = load_model(llama_tiny_onnx)
    feeds = feeds_for(fp32)
    refs = [run_model(fp32, f) for f in feeds]
    model = load_model(llama_tiny_onnx)
    planned = MixedPrecisionPass(mx("mxfp4"), target_cosine=0.995, feeds=feeds)(model)
    assert isinstance(planned, MixedPrecisionPassResult) and isinstance(planned.plan, MixedPrecisionPlan)
    res = planned.plan
    # planning quantizes nothing: the model only gained names and the plan's metadata
    assert not any(n.op_type == "DequantizeLinear" for n in planned.model.graph)
    assert res.node_dtypes == {name: "bf16" for name in res.kept_layers}
    passes = kept_passes(mx("mxfp4"), res.kept_layers)
    assert isinstance(passes[-1], Bf16Pass) and passes[-1].nodes == frozenset(res.kept_layers)
    results = [p(planned.model) for p in passes]
    out = results[-1].model
    validate_model(out)
    # mxfp4 everywhere misses the target; keeping some layers meets it
    assert res.cosine_all_quantized < 0.995 <= res.final_cosine and res.met
    # independent check of the delivered model against FP32
    assert end_to_end_cosine(refs, out, feeds) == pytest.approx(res.final_cosine, abs=1e-9)
    k = len(res.kept)
    assert 0 < k < 15
    # ranking is by solo cosine, kept = its top k, each with a reason
    solo = [s["solo_cosine"] for s in res.sensitivities]
    assert solo == sorted(solo)
    assert res.kept_layers == [s["layer"] for s in res.sensitivities[:k]]
    assert all("rank" in r["reason"] and r["module"] for r in res.kept)
    # minimal: keeping one fewer misses the target
    fewer = apply_with_kept(clone_model(fp32), mx("mxfp4"), res.kept_layers[:-1])
    assert end_to_end_cosine(refs, fewer, feeds) < 0.995
    # kept layers read BF16 weights (through a Cast), the others MX-quantised weights
    by_name = {n.name: n for n in out.graph}
    for name in res.kept_layers:
        w = by_name[name].inputs[1]
        if w.producer() is not None and w.producer().op_type == "Cast":
            assert w.producer().inputs[0].dtype == ir.DataType.BFLOAT16
    assert len(results[0].layers) == 15 - sum(1 for k in res.kept if not k["layer"].startswith("node_matmul"))
    assert not {r.node for r in results[0].layers} & set(res.kept_layers)
    assert out.metadata_props["maia_onnx.mixed_precision"] == ",".join(res.kept_layers)


def test_target_already_met_keeps_nothing(llama_tiny_onnx):
    model = load_model(llama_tiny_onnx)
    plan = MixedPrecisionPass(mx("mx9"), target_cosine=0.99, feeds=feeds_for(model, 1))(model).plan
    assert plan.kept == [] and plan.met and plan.evaluations == 1
    assert kept_passes(mx("mx9"), plan.kept_layers, plan.keep_dtype)[-1].__class__ is QuantizeMxPass  # no BF16 pass


def test_unreachable_target_reports_not_met(llama_tiny_onnx):
    fp32 = load_model(llama_tiny_onnx)
    feeds = feeds_for(fp32, 1)

    def quantize(model, kept):
        return apply_with_kept(model, mx("mxfp4"), kept)

    # even with every layer kept, BF16 rounding alone stays below 0.999999
    res = search_mixed_precision(fp32, quantize, feeds, target_cosine=0.999999)
    assert not res.met and len(res.kept) == len(res.sensitivities) == 19
    assert "still gives" in res.kept[0]["reason"]


def test_bad_target():
    with pytest.raises(InvalidOptionError):
        MixedPrecisionPass(mx("mx9"), target_cosine=1.5)
    with pytest.raises(InvalidOptionError):
        MixedPrecisionPass(mx("mx9"), target_cosine=0.99, keep_dtype="fp16")


def test_search_with_fp8_kv_cache_in_the_passes(llama_tiny_onnx):
    """FP8 cache outputs cannot be compared as NumPy: the search judges the float outputs (logits)."""
    from maia_onnx.passes.kv_cache import KvCacheFp8Pass

    model = load_model(llama_tiny_onnx)
    feeds = feeds_for(model, 1)
    def recipe(kept):
        return [QuantizeMxPass("mx9", exclude=exclude_patterns(kept)), KvCacheFp8Pass("fp8-e4m3", calib=feeds)]

    plan = MixedPrecisionPass(recipe, target_cosine=0.99, feeds=feeds)(model).plan
    assert plan.met and plan.kept == []
    out = apply_with_kept(model, recipe, plan.kept_layers)
    assert any(v.dtype == ir.DataType.FLOAT8E4M3FN for v in out.graph.outputs)
