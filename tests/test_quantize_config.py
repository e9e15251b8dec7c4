"""Quantize as data: the format registry, QuantizeConfig validation / round trip, and the typed result and report."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx_ir as ir
import pytest
from graphs import write_mlp

import maia_onnx
from maia_onnx.cli.quantize import command as quantize_command
from maia_onnx.errors import InvalidOptionError
from maia_onnx.formats.fp8 import FP8_E4M3FN, FP8_E5M2
from maia_onnx.formats.mx import MX_BLOCK_SIZE, SMX_BLOCK_SIZE
from maia_onnx.formats.registry import FAMILIES, FORMAT_NAMES, FORMATS, KV_CACHE_FORMATS, get_format, kv_cache_format
from maia_onnx.ortutil import compare, run_model
from maia_onnx.passes.quantize_fp8 import LayerRecord
from maia_onnx.passes.quantize_mx import MxLayerRecord
from maia_onnx.quantize import QuantizeConfig, QuantizeReport, QuantizeResult, quantize_model
from maia_onnx.quantize.recipes import RECIPES, RecipeInputs, quantize_passes

@pytest.fixture
def mlp_path(tmp_path):
    return write_mlp(tmp_path / "mlp.onnx", n_in=64)


# --- the registry ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_every_format_name_resolves_to_its_spec(name):
    spec = get_format(name)
    assert spec.name == name and spec is FORMATS[name] and get_format(name.upper()) is spec
    assert spec.family in FAMILIES and spec.family in RECIPES
    if spec.family == "fp8":
        assert spec.fp8 in (FP8_E4M3FN, FP8_E5M2) and spec.block_size is None and spec.scale == "float32"
    elif spec.family == "mx":
        assert spec.mx.name == name and spec.block_size == MX_BLOCK_SIZE and spec.scale == "e8m0"
        assert spec.element_bits == spec.mx.bits
    elif spec.family == "maia-mx":
        assert spec.block_size == SMX_BLOCK_SIZE and spec.scale == "microexponent"
    elif spec.family in ("fp4", "w4a8"):  # packed 4-bit weights (w4a8: mxfp4 weights, FP8 E4M3 activations)
        assert spec.four_bit and spec.element_bits == 4 and spec.block_scaled
        assert spec.weight_format in ("mxfp4", "fp4-e4m3") and (spec.family != "w4a8" or spec.fp8 is FP8_E4M3FN)
    else:
        assert spec.element == "bfloat16" and spec.element_bits == 16 and not spec.block_scaled
    assert spec.activations == (name not in ("mxfp4", "fp4-e4m3"))  # the weight-only 4-bit formats


def test_registry_facts_and_aliases():
    assert FORMAT_NAMES == ("fp8-e4m3", "fp8-e5m2", "mxfp8-e4m3", "mxfp8-e5m2", "mxint8", "mxfp4", "fp4-e4m3", "w4a8",
                            "mx9", "mx6", "bf16")
    assert get_format("fp8-e4m3fn") is FORMATS["fp8-e4m3"]
    assert KV_CACHE_FORMATS == ("fp8-e4m3", "fp8-e5m2")
    assert kv_cache_format("fp8-e5m2") is FP8_E5M2 and kv_cache_format("e4m3fn") is FP8_E4M3FN
    assert maia_onnx.formats.get_format is get_format


def test_unknown_format_is_one_line_listing_every_valid_name():
    with pytest.raises(InvalidOptionError) as info:
        get_format("fp9")
    message = str(info.value)
    assert "\n" not in message and "'fp9'" in message
    assert all(name in message for name in FORMAT_NAMES)
    with pytest.raises(InvalidOptionError, match="fp8-e4m3 or fp8-e5m2"):
        kv_cache_format("int8")


def test_cli_choices_are_the_registry():
    params = {p.name: p for p in quantize_command.params}
    assert tuple(params["fmt"].type.choices) == FORMAT_NAMES
    assert tuple(params["kv_cache"].type.choices) == KV_CACHE_FORMATS
    assert tuple(params["mx_form"].type.choices) == ("ort", "standard")


# --- QuantizeConfig ---------------------------------------------------------------------------------------
def test_config_round_trips_through_plain_json():
    config = QuantizeConfig(format="MXINT8", exclude=["*lm_head*"], dims={"seq": 16, "batch": 1}, calib=None,
                            weights_only=True, target_cosine=0.99, kv_cache="fp8-e5m2")
    assert config.format == "mxint8" and config.exclude == ("*lm_head*",) and config.dims_map == {"batch": 1, "seq": 16}
    data = json.loads(json.dumps(config.to_dict()))
    assert set(data) == set(QuantizeConfig.option_names())
    assert QuantizeConfig.from_dict(data) == config and hash(QuantizeConfig.from_dict(data)) == hash(config)
    assert QuantizeConfig.from_dict({}) == QuantizeConfig()
    assert not config.activations and QuantizeConfig(format="mxfp4").activations is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.format = "bf16"


@pytest.mark.parametrize("options,message", [
    ({"format": "fp9"}, "--format 'fp9' is not one of fp8-e4m3"),
    ({"granularity": "row"}, "--granularity 'row'"),
    ({"granularity": "block"}, "--granularity block needs --block-size"),
    ({"block_size": 0}, "--block-size must be positive"),
    ({"format": "mx6", "block_size": 15}, "multiple of 2"),
    ({"format": "bf16", "block_size": 32}, "does not apply to --format bf16"),
    ({"format": "mxfp8-e4m3", "granularity": "tensor"}, "FP8 weights only"),
    ({"format": "fp8-e4m3", "mx_form": "standard", "evaluate": False}, "--mx-form applies to the OCP MX formats"),
    ({"format": "mxint8", "mx_form": "nvidia"}, "--mx-form 'nvidia'"),
    ({"format": "mxint8", "mx_form": "standard"}, "add --no-eval"),
    ({"format": "mx9", "embeddings": True}, "--embeddings"),
    ({"method": "kl"}, "calibration method 'kl'"),
    ({"method": "percentile", "percentile": 150.0}, "--percentile"),
    ({"kv_cache": "int8"}, "--kv-cache 'int8'"),
    ({"kv_granularity": "row"}, "--kv-granularity 'row'"),
    ({"target_cosine": 1.5}, "--target-cosine must be in (0, 1]"),
    ({"keep_dtype": "fp16"}, "keep_dtype 'fp16'"),
    ({"num_samples": 0}, "--samples must be >= 1"),
    ({"batch_size": 0}, "--batch-size must be >= 1"),
    ({"eval_samples": 0}, "--eval-samples must be >= 1"),
    ({"block_size": "32"}, "block_size must be int"),
    ({"weights_only": "yes"}, "weights_only must be bool"),
    ({"formats": "fp8-e4m3"}, "unknown quantize option 'formats': valid options are format, "),
])
def test_bad_options_and_combinations_are_one_line_errors(options, message):
    with pytest.raises(InvalidOptionError) as info:
        QuantizeConfig.from_dict(options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_each_family_recipe_yields_its_passes():
    names = lambda config: [type(p).__name__ for p in quantize_passes(config, RecipeInputs())]  # noqa: E731
    assert names(QuantizeConfig()) == ["QuantizeFp8Pass"]
    assert names(QuantizeConfig(format="mxfp4")) == names(QuantizeConfig(format="mx9")) == ["QuantizeMxPass"]
    assert names(QuantizeConfig(format="bf16", kv_cache="fp8-e4m3")) == ["Bf16Pass", "KvCacheFp8Pass"]
    fp8, kv = quantize_passes(QuantizeConfig(format="fp8-e5m2", exclude=["*lm_head*"], kv_cache="fp8-e4m3"), RecipeInputs(), ["a[1]"])
    assert fp8.fmt is FP8_E5M2 and fp8.exclude == ("*lm_head*", "a[[]1]") and kv.fmt is FP8_E4M3FN
    config = QuantizeConfig(format="mxint8", mx_form="standard", block_size=16, weights_only=True, evaluate=False)
    (mx,) = quantize_passes(config, RecipeInputs())
    assert (mx.fmt, mx.form, mx.block_size, mx.activations) == ("mxint8", "standard", 16, False)


# --- the API: config + overrides, typed result, report layout ---------------------------------------------
def test_config_and_overrides_give_the_same_model_and_typed_report(tmp_path, mlp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((12, 64)).astype(np.float32))
    config = QuantizeConfig(calib=tmp_path / "calib.npz", method="mse", eval_samples=4)
    a = quantize_model(mlp_path, tmp_path / "a.onnx", config, show_progress=False)
    b = quantize_model(str(mlp_path), str(tmp_path / "b.onnx"), calib=str(tmp_path / "calib.npz"), method="mse",
                       show_progress=False)
    assert isinstance(a, QuantizeResult) and isinstance(a.quantize_report, QuantizeReport)
    assert a.config == config.replace(show_progress=False)
    assert a.activation_scales == b.activation_scales and set(a.activation_scales) == {"x", "r"}
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(run_model(tmp_path / "a.onnx", {"x": x})["logits"], run_model(tmp_path / "b.onnx", {"x": x})["logits"])

    report = a.report
    # typed attributes read the very numbers the JSON layout carries
    assert a.min_output_cosine == report["accuracy"]["summary"]["min_output_cosine"] > 0.995
    assert a.size_ratio == report["sizes"]["ratio"] and 0.2 < a.size_ratio < 0.6
    assert a.output_bytes == report["sizes"]["output_bytes"] == (tmp_path / "a.onnx").stat().st_size
    assert a.seconds == report["seconds"] > 0
    cos = compare(run_model(mlp_path, {"x": x})["logits"], run_model(tmp_path / "a.onnx", {"x": x})["logits"])["cosine"]
    assert cos > 0.995
    typed = a.quantize_report
    assert typed.calibration.method == "mse" and typed.calibration.samples == 8 and report["calibration"]["samples"] == 8
    assert [row.op for row in typed.accuracy.layers] == ["MatMul", "Gemm"]
    assert typed.accuracy.summary.source == report["accuracy"]["summary"]["source"]
    assert set(report) == {"input", "output", "format", "weights", "exclude", "passes", "quantize_seconds",
                           "activation_scales", "seconds", "calibration", "accuracy", "save_seconds", "sizes"}
    assert report["weights"] == {"granularity": "channel", "block_size": None}
    assert [p["pass"] for p in report["passes"]] == ["QuantizeFp8Pass"]


def test_mx_report_rows_are_typed_records(tmp_path, mlp_path):
    r = quantize_model(mlp_path, tmp_path / "q.onnx", format="mxfp8-e4m3", show_progress=False, calib="random")
    layers = r.quantize_report.mx_layers
    assert all(isinstance(row, MxLayerRecord) for row in layers) and [row.weight for row in layers] == ["W1", "W2"]
    assert [row.activations for row in layers] == [True, True]  # both data inputs are whole 32-blocks
    assert r.report["mx_layers"] == [row.as_dict() for row in layers] and r.report["mx_layers"][0]["activations"] is True
    assert r.min_output_cosine > 0.99 and "calibration" not in r.report  # MX activations are dynamic


def test_fp8_records_feed_the_accuracy_rows(mlp_path):
    """In memory (no output file): no sizes, no size ratio; the FP8 pass's records are the report's layer rows."""
    model = ir.load(mlp_path)
    r = quantize_model(model, None, QuantizeConfig(weights_only=True, calib=None, show_progress=False))
    assert r.output is None and r.size_ratio is None and r.output_bytes is None and "sizes" not in r.report
    rows = r.quantize_report.accuracy.layers
    assert [(row.weight, row.act_scale) for row in rows] == [("W1", None), ("W2", None)]  # weights only
    assert r.min_output_cosine > 0.999
    assert LayerRecord.__dataclass_fields__.keys() >= {"node", "weight", "activation_scales"}
