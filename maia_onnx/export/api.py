"""MODEL reference -> export: built-in names, package.module:factory, hf:DIR (detected from its files), ultralytics:REF;
multi-graph models (encoder-decoders, diffusers) go to a directory that is published only once every graph checks out."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from maia_onnx.errors import UserError
from maia_onnx.export.core import DEFAULT_OPSET, REL_TOLERANCE, ExportResult, _publish, export_spec, log

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
    from maia_onnx.export.extras import require
    from maia_onnx.models import registry

    registry.resolve_name(name, size)  # an unknown name is the user's mistake even without torch installed
    require("torch", "export", f"exporting {name}")
    log(progress, f"building {name} (size={size}, seed={seed})")
    spec = registry.build(name, size=size, seed=seed, dims=dims)
    return export_spec(
        spec, out_path, opset=opset, dynamic=dynamic, external_data=external_data, check=check,
        source=f"builtin:{spec.name}:{size}", progress=progress, release_module=True,
    )


def export_parts(
    name: str,
    parts: Iterable[tuple[str, Callable[[], Any]]],
    out_dir: str | os.PathLike,
    verify: Callable[[Path], dict] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    external_data: bool | None = None,
    check: bool = True,
    tolerance: float = REL_TOLERANCE,
    progress: Callable[[str], None] | None = None,
    release_modules: bool = False,
) -> ExportResult:
    """Export several graphs of one model (``file name -> spec builder``) into the directory ``out_dir``.

    Every graph is exported and parity-checked into a staging directory beside ``out_dir``; ``verify(staging)``
    then checks them together (e.g. greedy generation vs PyTorch) and returns a report. Only then are the files
    moved into ``out_dir`` (created if needed; other files in it are left alone), so a failure publishes nothing.
    """
    from maia_onnx.io import check_output_path

    out_dir = check_output_path(out_dir)
    names = [file for file, _ in parts] if isinstance(parts, (list, tuple)) else None
    if out_dir.suffix == ".onnx" or (out_dir.exists() and not out_dir.is_dir()):
        listing = f" ({', '.join(names)})" if names else ""
        raise UserError(f"{name} exports several ONNX graphs{listing}: give -o a directory, e.g. -o {out_dir.with_suffix('')}")
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".export", dir=out_dir.parent))
    try:
        results: dict[str, ExportResult] = {}
        for file, build in parts:
            spec = build()
            log(progress, f"exporting {file} of {name}")
            results[file] = export_spec(spec, staging / file, opset=opset, dynamic=dynamic, external_data=external_data,
                                        check=check, tolerance=tolerance, source=f"{name}#{file}", progress=progress,
                                        release_module=release_modules)
        checks = verify(staging) if (verify is not None and check) else {}
        try:
            out_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create output directory {out_dir}: {exc.strerror or exc}") from exc
        for file, result in results.items():
            _publish(staging / file, out_dir / file)
            result.path = out_dir / file
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    first = next(iter(results.values()))
    config = {"model": name, "graphs": list(results)}
    return ExportResult(path=out_dir, parity={}, model=name, opset=first.opset, dynamic=dynamic,
                        seconds=time.perf_counter() - start, config=config, parts=results, checks=checks)


def _export_hf(directory: str, out_path, seed, dims, progress, **options) -> ExportResult:
    from maia_onnx import hf

    kind, raw = hf.detect_kind(directory)
    ref = f"hf:{directory}"
    if kind == hf.SEQ2SEQ:
        from maia_onnx.export import seq2seq

        return seq2seq.export_seq2seq(Path(directory).expanduser(), out_path, raw, seed=seed, dims=dims, progress=progress, **options)
    if kind in (hf.DIFFUSERS_PIPELINE, hf.DIFFUSERS_COMPONENT):
        from maia_onnx.export import diffusion

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
    from maia_onnx.export.extras import require

    options = dict(opset=opset, dynamic=dynamic, external_data=external_data, check=check)
    if ref.startswith("hf:"):
        require("torch", "export", f"exporting {ref}")
        return _export_hf(ref[3:], out_path, seed, dims, progress, **options)
    if ref.startswith(ULTRALYTICS_PREFIX):
        from maia_onnx.export import yolo

        spec = yolo.build_ultralytics_spec(ref[len(ULTRALYTICS_PREFIX):], seed=seed, dims=dims, progress=progress)
        return export_spec(spec, out_path, source=ref, progress=progress, release_module=True, **options)
    if ":" in ref:
        from maia_onnx.export.factory import load_factory

        log(progress, f"calling factory {ref}")
        spec = load_factory(ref)
        return export_spec(spec, out_path, source=f"factory:{ref}", progress=progress, **options)
    return export_builtin(ref, out_path, size=size, seed=seed, dims=dims, progress=progress, **options)
