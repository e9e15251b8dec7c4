"""Recipes: the passes a ``QuantizeConfig`` asks for, one builder per format family (fp8, mx, maia-mx, fp4, w4a8, bf16).

A recipe only builds passes; data it needs from the model (calibrated activation scales, imported
scales, KV-cache calibration batches) arrives in ``RecipeInputs``.  ``quantize_passes(config, inputs,
kept)`` leaves the ``kept`` node names out, which is how a mixed-precision plan becomes passes
(``mixed_precision_pass`` plans, ``passes.mixed_precision.kept_passes`` realises the plan).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir.passes

from maia_onnx.formats.registry import FormatSpec
from maia_onnx.passes.bf16 import Bf16Pass
from maia_onnx.passes.gptq import GptqPass
from maia_onnx.passes.hadamard import HadamardRotationPass
from maia_onnx.passes.kv_cache import KvCacheFp8Pass
from maia_onnx.passes.mixed_precision import MixedPrecisionPass, exclude_patterns
from maia_onnx.passes.qat_import import QatImportPass
from maia_onnx.passes.quantize_fp8 import QuantizeFp8Pass
from maia_onnx.passes.quantize_mx import QuantizeMxPass
from maia_onnx.quantize.config import QuantizeConfig

Passes = list[onnx_ir.passes.PassBase]


@dataclass
class RecipeInputs:
    """What the recipes need besides the config: data gathered from the model, its scales file and calibration."""

    activation_scales: dict[str, float] = field(default_factory=dict)  # FP8: activation value name -> scale
    weight_scales: dict[str, np.ndarray] = field(default_factory=dict)  # imported: weight initializer -> scale
    kv_scales: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)  # imported k_scale / v_scale per layer
    kv_feeds: list[dict[str, np.ndarray]] | None = None  # KV-cache calibration batches
    calib_batches: Callable[[Any], Iterable[Mapping[str, np.ndarray]]] | None = None  # GPTQ: model -> batches


def fp8_recipe(config: QuantizeConfig, spec: FormatSpec, inputs: RecipeInputs, exclude: tuple[str, ...]) -> Passes:
    return [
        QuantizeFp8Pass(
            fmt=spec.fp8,
            granularity=config.granularity,
            block_size=config.block_size,
            activation_scales=inputs.activation_scales,
            weight_scales=inputs.weight_scales,
            exclude=exclude,
            attention=config.attention,
            weights_only=config.weights_only,
            embeddings=config.embeddings,
        )
    ]


def mx_recipe(config: QuantizeConfig, spec: FormatSpec, inputs: RecipeInputs, exclude: tuple[str, ...]) -> Passes:
    """OCP MX and Maia mx9/mx6: activations are dynamic (no calibration), on where the format supports them."""
    if spec.four_bit:
        return four_bit_weights(config, spec, inputs, exclude)
    activations = False if config.weights_only else None
    return [QuantizeMxPass(spec.name, form=config.mx_form, block_size=config.block_size, exclude=exclude, activations=activations)]


def four_bit_weights(config: QuantizeConfig, spec: FormatSpec, inputs: RecipeInputs, exclude: tuple[str, ...]) -> Passes:
    """Packed 4-bit weights, rounded to nearest or by GPTQ (``--rounding gptq``) from the calibration batches."""
    fmt = spec.weight_format
    # with calibration data the rotation is judged by the layers' output error on it, not their weight error
    rotation = [HadamardRotationPass(fmt, config.block_size, exclude, batches=inputs.calib_batches)] if config.hadamard else []
    if config.rounding == "gptq":
        if inputs.calib_batches is None:
            raise ValueError("--rounding gptq: the recipe needs RecipeInputs.calib_batches")
        return rotation + [GptqPass(fmt, inputs.calib_batches, form=config.mx_form, block_size=config.block_size,
                                    exclude=exclude, progress=_layer_progress("GPTQ") if config.show_progress else None)]
    return rotation + [QuantizeMxPass(fmt, form=config.mx_form, block_size=config.block_size, exclude=exclude,
                                      activations=False)]


def _layer_progress(desc: str):
    """A progress callback ``(done, total, layer)`` drawing one tqdm bar on stderr (rounding a multi-GB model takes
    minutes)."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int, layer: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, leave=False)
        bar.set_postfix_str(layer[-48:], refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def fp4_recipe(config: QuantizeConfig, spec: FormatSpec, inputs: RecipeInputs, exclude: tuple[str, ...]) -> Passes:
    return four_bit_weights(config, spec, inputs, exclude)


def w4a8_recipe(config: QuantizeConfig, spec: FormatSpec, inputs: RecipeInputs, exclude: tuple[str, ...]) -> Passes:
    """Maia 200's W4A8: packed 4-bit weights, then static FP8 E4M3 QDQ on the activations calibrated for them.

    The FP8 pass runs second and only quantizes values that have a calibrated scale: the linears' decoded
    4-bit weights have none, so they stay as they are (``attention=True`` lets it reach those linears; the
    attention matmuls' inputs have scales only when the config asked for them).
    """
    passes = four_bit_weights(config, spec, inputs, exclude)
    if not config.weights_only:
        passes.append(QuantizeFp8Pass(fmt=spec.fp8, activation_scales=inputs.activation_scales, exclude=exclude,
                                      attention=True))
    return passes


def bf16_recipe(config: QuantizeConfig, spec: FormatSpec, inputs: RecipeInputs, exclude: tuple[str, ...]) -> Passes:
    return [Bf16Pass(exclude=exclude, activations=not config.weights_only)]


RECIPES: dict[str, Callable[[QuantizeConfig, FormatSpec, RecipeInputs, tuple[str, ...]], Passes]] = {
    "fp8": fp8_recipe,
    "mx": mx_recipe,
    "maia-mx": mx_recipe,
    "fp4": fp4_recipe,
    "w4a8": w4a8_recipe,
    "bf16": bf16_recipe,
}


def qat_passes(config: QuantizeConfig, weight_scales: Mapping[str, np.ndarray]) -> Passes:
    """QAT import runs before targets are chosen, so the format's pass only adds what training did not quantize."""
    if not config.qat:
        return []
    spec = config.spec
    return [QatImportPass(weight_scales=weight_scales, fmt=spec.fp8 if spec.family == "fp8" else "e4m3fn")]


def quantize_passes(config: QuantizeConfig, inputs: RecipeInputs, kept: Sequence[str] = ()) -> Passes:
    """The format family's passes (leaving ``kept`` node names alone), then the FP8 KV cache if asked for."""
    spec = config.spec
    passes = RECIPES[spec.family](config, spec, inputs, tuple(config.exclude) + exclude_patterns(kept))
    if config.kv_cache is not None:
        passes.append(KvCacheFp8Pass(config.kv_cache, granularity=config.kv_granularity, scales=inputs.kv_scales,
                                     calib=inputs.kv_feeds))
    return passes


def mixed_precision_pass(config: QuantizeConfig, inputs: RecipeInputs, calib_source) -> MixedPrecisionPass:
    """The planning pass for ``--target-cosine``: trials are this config's passes with some layers kept."""
    return MixedPrecisionPass(
        lambda kept: quantize_passes(config, inputs, kept),
        config.target_cosine,
        calib_source=calib_source,
        keep_dtype=config.keep_dtype,
    )
