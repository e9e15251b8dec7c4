"""MODEL reference -> export: built-in names, package.module:factory, hf:DIR (detected from its files), ultralytics:REF;
multi-graph models (encoder-decoders, diffusers) go to a directory that is published only once every graph checks out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

from maia_onnx import hf
from maia_onnx.export import diffusion, seq2seq, yolo
from maia_onnx.export.core import DEFAULT_OPSET, ExportResult, export_spec, log
from maia_onnx.extras import require
from maia_onnx.export.factory import load_factory
from maia_onnx.models import registry

ULTRALYTICS_PREFIX = "ultralytics:"


def export_builtin(
    name: str,
    out_path: str | os.PathLike,
    size: str | None = "tiny",
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    external_data: bool | None = None,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Build a built-in model (llama-tiny, unet-tiny, yolo-tiny; size tiny|large) and export it."""

    registry.resolve_name(name, size)  # an unknown name is the user's mistake even without torch installed
    require("torch", "export", f"exporting {name}")
    log(progress, f"building {name} (size={size}, seed={seed})")
    spec = registry.build(name, size=size, seed=seed, dims=dims)
    return export_spec(
        spec, out_path, opset=opset, dynamic=dynamic, external_data=external_data, check=check,
        source=f"builtin:{spec.name}:{size}", progress=progress, release_module=True,
    )


def _export_hf(directory: str, out_path, seed, dims, progress, **options) -> ExportResult:

    kind, raw = hf.detect_kind(directory)
    ref = f"hf:{directory}"
    if kind == hf.SEQ2SEQ:
        return seq2seq.export_seq2seq(Path(directory).expanduser(), out_path, raw, seed=seed, dims=dims, progress=progress, **options)
    if kind in (hf.DIFFUSERS_PIPELINE, hf.DIFFUSERS_COMPONENT):
        return diffusion.export_diffusers(Path(directory).expanduser(), out_path, kind == hf.DIFFUSERS_PIPELINE, raw,
                                          seed=seed, dims=dims, progress=progress, **options)
    spec = hf.build_hf_spec(directory, seed=seed, dims=dims, progress=progress)
    return export_spec(spec, out_path, source=ref, progress=progress, release_module=True, **options)


def export_model(
    ref: str,
    out_path: str | os.PathLike,
    size: str | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    external_data: bool | None = None,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export any supported MODEL reference: built-in name, ``package.module:factory``, ``hf:DIR`` or ``ultralytics:REF``.

    ``out_path`` is a .onnx file, except for models that export several graphs (encoder-decoders: encoder.onnx +
    decoder.onnx; diffusers pipelines and AutoencoderKL: one file per component), where it is a directory.
    """

    options = dict(opset=opset, dynamic=dynamic, external_data=external_data, check=check)
    if ref.startswith("hf:"):
        require("torch", "export", f"exporting {ref}")
        return _export_hf(ref[3:], out_path, seed, dims, progress, **options)
    if ref.startswith(ULTRALYTICS_PREFIX):
        spec = yolo.build_ultralytics_spec(ref[len(ULTRALYTICS_PREFIX):], seed=seed, dims=dims, progress=progress)
        return export_spec(spec, out_path, source=ref, progress=progress, release_module=True, **options)
    if ":" in ref:
        log(progress, f"calling factory {ref}")
        spec = load_factory(ref)
        return export_spec(spec, out_path, source=f"factory:{ref}", progress=progress, **options)
    return export_builtin(ref, out_path, size=size, seed=seed, dims=dims, progress=progress, **options)
