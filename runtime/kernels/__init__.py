"""Triton kernels for FP8/MX (de)quantization and dequant-fused matmul (the `kernels` extra).

Drop-in, bit-exact replacements for the NumPy reference in ``maia_onnx.formats`` with the same
signatures: ``quantize_fp8``, ``dequantize_fp8``, ``mx_quantize``, ``mx_dequantize``, plus the fused
``fp8_matmul`` / ``mx_matmul`` (``a @ dequant(W)``, FP32 accumulation).  NumPy arrays in -> NumPy arrays out
(copied to and from the GPU); torch CUDA tensors in -> torch tensors out, no copies.

``available()`` is True when Triton is installed and a CUDA device is present (the Maia emulator then
routes through these kernels; the NumPy path stays the default on CPU).  Under ``TRITON_INTERPRET=1`` the
kernels also run on CPU torch tensors (slowly), which is how the tests check them without a GPU.
Triton is imported lazily, so importing this package never requires it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "quantize_fp8": "fp8",
    "dequantize_fp8": "fp8",
    "mx_quantize": "mx",
    "mx_dequantize": "mx",
    "fp8_matmul": "matmul",
    "mx_matmul": "matmul",
    "reference_fp8_matmul": "matmul",
    "reference_mx_matmul": "matmul",
}

_REFERENCES = {
    "quantize_fp8": "maia_onnx.formats.fp8",
    "dequantize_fp8": "maia_onnx.formats.fp8",
    "mx_quantize": "maia_onnx.formats.mx",
    "mx_dequantize": "maia_onnx.formats.mx",
}

__all__ = ["available", "triton_installed", "select", *_EXPORTS]


def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(allow_interpreter: bool = False) -> bool:
    """True when the kernels can run fast here: Triton installed and a CUDA GPU present.

    With ``allow_interpreter`` also True on CPU when ``TRITON_INTERPRET=1`` (correct but slow).
    """
    if not triton_installed():
        return False
    from maia_onnx.runtime.kernels._launch import interpreting

    if interpreting():
        return allow_interpreter
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def select(name: str):
    """The function to call for ``name``: the Triton kernel when ``available()`` (a CUDA GPU), else the NumPy
    reference from ``maia_onnx.formats`` (same signature, same bits) -- what the Maia emulator uses."""
    if name not in _REFERENCES:
        raise ValueError(f"no reference/kernel pair named {name!r}; choose one of {', '.join(_REFERENCES)}")
    if available():
        return __getattr__(name)
    return getattr(importlib.import_module(_REFERENCES[name]), name)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"maia_onnx.runtime.kernels.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
