"""Several ONNX graphs of one model (encoder + decoder, diffusers components) exported into one directory that is
published only once every graph is parity-checked and the graphs pass their joint check."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from maia_onnx.errors import UserError
from maia_onnx.export.core import DEFAULT_OPSET, REL_TOLERANCE, ExportResult, _publish, export_spec, log
from maia_onnx.io import check_output_path


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
