"""Host-side plumbing for the Triton kernels: device choice, NumPy <-> torch views, tensor layouts.

Kernels run on CUDA when a GPU is present and Triton is compiled for it, or on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1``, set before ``triton`` is imported).  NumPy inputs come back as NumPy
outputs with the reference's dtypes (ml_dtypes float8/float4/bfloat16), torch inputs as torch tensors on
the kernel's device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np


# Launch parameters (scripts/bench_kernels.py --sweep measures alternatives on a GPU and reports the best).
TUNING = {
    "elementwise_block": 4096,  # elements per program of the FP8 / MX dequantize kernels
    "elementwise_warps": 4,
    "mx_elements_per_program": 2048,  # MX quantize: blocks per program = this / block size
    "mx_warps": 4,
    "matmul_tiles": None,  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) to force, or None
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def kernel_device():
    """The torch device the kernels run on: CPU under the interpreter, else the current CUDA device."""
    import torch

    if interpreting():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    raise RuntimeError(
        "Triton kernels need a CUDA device or TRITON_INTERPRET=1; on this machine use the NumPy "
        "reference in maia_onnx.formats"
    )


# NumPy dtypes stored as raw bytes / 16-bit words on the torch side (torch has no ml_dtypes types).
_BYTE_DTYPES = {
    np.dtype(ml_dtypes.float8_e4m3fn),
    np.dtype(ml_dtypes.float8_e5m2),
    np.dtype(ml_dtypes.float4_e2m1fn),
    np.dtype(ml_dtypes.float8_e8m0fnu),
}
BF16 = np.dtype(ml_dtypes.bfloat16)


def to_torch(a, device, dtype=None):
    """NumPy array (ml_dtypes included) or torch tensor -> contiguous torch tensor on ``device``.

    float8/float4/e8m0 arrays become uint8 tensors of their bytes, bfloat16 arrays torch.bfloat16.
    ``dtype`` (a NumPy dtype) converts plain arrays first (e.g. float scales to float32).
    """
    import torch

    if isinstance(a, torch.Tensor):
        return a.to(device).contiguous()
    a = np.asarray(a)
    if dtype is not None and a.dtype != np.dtype(dtype):
        a = a.astype(dtype)
    if a.dtype in _BYTE_DTYPES:
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.uint8))
    elif a.dtype == BF16:
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device)


def bf16_bits(t):
    """A bfloat16 tensor viewed as int16 (kernels read bf16 as bits so the interpreter needs no bf16)."""
    import torch

    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def to_numpy(t, np_dtype):
    """torch result -> NumPy array of the reference dtype (reinterpreting bytes for ml_dtypes types)."""
    import torch

    np_dtype = np.dtype(np_dtype)
    t = t.detach().cpu()
    if np_dtype in _BYTE_DTYPES:
        return t.view(torch.uint8).numpy().view(np_dtype)
    if np_dtype == BF16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy().astype(np_dtype, copy=False)


def is_bf16(dtype) -> bool:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype == torch.bfloat16
    return np.dtype(dtype) == BF16


def torch_out_dtype(dtype):
    """Output dtype request (NumPy/ml_dtypes/torch) -> torch.float32 or torch.bfloat16."""
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"kernels write float32 or bfloat16, not {dtype}")
        return dtype
    if np.dtype(dtype) == BF16:
        return torch.bfloat16
    if np.dtype(dtype) == np.float32:
        return torch.float32
    raise ValueError(f"kernels write float32 or bfloat16, not {np.dtype(dtype)}")


@dataclass(frozen=True)
class AxisLayout:
    """A tensor seen as [outer, length, inner] around ``axis``; blocked scales have ``nblocks`` on it."""

    outer: int
    length: int
    inner: int
    block: int
    nblocks: int


def axis_layout(shape: tuple[int, ...], axis: int, block: int) -> AxisLayout:
    ndim = len(shape)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}-D tensor")
    axis %= ndim
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1 :], dtype=np.int64))
    length = int(shape[axis])
    return AxisLayout(outer, length, inner, block, -(-length // block))


def check_size(n: int) -> None:
    if n >= 2**31:
        raise ValueError(f"tensor of {n} elements: the kernels index with int32; split it below 2^31 elements")
