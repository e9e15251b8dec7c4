#!/usr/bin/env python
"""Export llama-tiny size="large" (>= 3 GB FP32, external data) once into .cache/llama-large/model.onnx for scale benchmarks."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _benchutil import LARGE_DIR as DEFAULT_DIR
from _benchutil import current_rss_bytes, max_rss_bytes


_T0 = time.perf_counter()


def _progress(msg: str) -> None:
    rss = current_rss_bytes() / 2**30
    print(f"[export {time.perf_counter() - _T0:6.1f}s] {msg} (rss {rss:.1f} GiB, peak {max_rss_bytes() / 2**30:.1f} GiB)",
          file=sys.stderr, flush=True)


def make_llama_large(out_dir: Path = DEFAULT_DIR, force: bool = False, check: bool = True) -> Path:
    """Write out_dir/model.onnx (+ model.onnx.data) atomically; skip when it already exists."""
    from maia_onnx.export import export_builtin
    from maia_onnx.io import atomic_dir

    model_path = out_dir / "model.onnx"
    if model_path.exists() and (out_dir / "model.onnx.data").exists() and not force:
        print(f"{model_path} exists, skipping (use --force to rebuild)", file=sys.stderr)
        return model_path
    start = time.perf_counter()
    # the whole directory appears at once: readers never see a half-written model
    with atomic_dir(out_dir) as tmp:
        result = export_builtin(
            "llama-tiny", tmp / "model.onnx", size="large", external_data=True, check=check, progress=_progress,
        )
    out_dir.chmod(0o755)  # the temp dir was created 0700; benchmarks of other users read it
    seconds = time.perf_counter() - start
    data_bytes = (out_dir / "model.onnx.data").stat().st_size
    print(
        f"wrote {model_path}: {data_bytes / 1e9:.2f} GB external data, {seconds:.0f} s, peak RSS {max_rss_bytes() / 2**30:.1f} GiB, "
        f"parity max rel {result.max_rel:.2e}",
        file=sys.stderr,
    )
    return model_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--force", action="store_true", help="rebuild even if the model exists")
    parser.add_argument("--no-check", action="store_true", help="skip the ORT-vs-PyTorch parity check")
    args = parser.parse_args(argv)
    make_llama_large(args.out_dir, force=args.force, check=not args.no_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
