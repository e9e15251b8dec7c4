"""GPTQ: error-compensating rounding of one linear layer's weights from its calibration Hessian.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (2022):
columns (input channels) are rounded one at a time and each one's rounding error is spread over the columns not
yet rounded, weighted by the inverse Hessian ``H = 2 X^T X`` of the layer's inputs, so the layer's *output* error
(not the weight error) is what gets minimised.  Block formats (MXFP4, NVFP4-style FP4 with FP8 scales, mx9/mx6)
take their scale for a group of ``group_size`` input channels from the weights as they stand when GPTQ reaches the
group, so the compensation already moved into the group is part of its scale.

Orientation: ``weight`` is ``[out, in]`` (torch.nn.Linear); an ONNX MatMul weight ``[in, out]`` is passed transposed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np

from maia_onnx.formats.fp8 import cast_fp8_saturate
from maia_onnx.formats.mx import MX_BLOCK_SIZE, mx_scale_float, mx_shared_exponents, saturate_cast

ScaleFn = Callable[[np.ndarray], np.ndarray]  # group [out, g] -> per-row scale [out, 1]
RoundFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (column [out, 1], scale [out, 1]) -> dequantized column


@dataclass
class GroupQuantizer:
    """How one format rounds: a per-row block scale from a group of columns, and element rounding under it."""

    scale: ScaleFn
    round: RoundFn
    group_size: int

    def fake_quant(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Round-to-nearest of the whole ``[out, in]`` weight (the baseline GPTQ improves on): (values, scales)."""
        out = np.empty_like(weight)
        scales = np.empty((weight.shape[0], -(-weight.shape[1] // self.group_size)), np.float32)
        for g, start in enumerate(range(0, weight.shape[1], self.group_size)):
            group = weight[:, start:start + self.group_size]
            scales[:, g:g + 1] = self.scale(group)
            out[:, start:start + self.group_size] = self.round(group, scales[:, g:g + 1])
        return out, scales


class HessianAccumulator:
    """Streams ``2/n * sum x^T x`` over calibration rows of one layer input (``[..., in]``), in float64.

    ``normalize_tokens``: every row (token) enters scaled to norm ``sqrt(in)``, so each token weighs the same.  In
    transformers a few tokens carry activations orders of magnitude larger than the rest (attention sinks) and would
    own the plain Hessian, while the next LayerNorm divides every token by its own norm: what matters downstream is
    each token's error relative to its size."""

    def __init__(self, columns: int, normalize_tokens: bool = False):
        self._sum = np.zeros((columns, columns), dtype=np.float64)  # sum x^T x: one in-place add per batch
        self.rows = 0
        self.normalize_tokens = normalize_tokens

    @property
    def h(self) -> np.ndarray:
        return self._sum * (2.0 / self.rows) if self.rows else np.zeros_like(self._sum)

    def update(self, x: np.ndarray, valid: np.ndarray | None = None) -> None:
        x = np.asarray(x, dtype=np.float64)
        if valid is not None and x.ndim >= 3 and x.shape[:2] == valid.shape:
            x = x[valid]  # padded positions say nothing about the layer
        x = x.reshape(-1, x.shape[-1])
        if self.normalize_tokens:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = x * np.where(norms > 0, np.sqrt(x.shape[1]) / np.where(norms > 0, norms, 1.0), 0.0)
        n = x.shape[0]
        if n == 0:
            return
        self._sum += x.T @ x
        self.rows += n


def gptq(weight: np.ndarray, hessian: np.ndarray, quantizer: GroupQuantizer, damp: float = 0.01,
         block: int = 128, act_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ-rounded ``[out, in]`` weight (dequantized values) and the per-group scales ``[out, groups]`` it used:
    every value is an element of the format times its group's scale, so it packs exactly.

    ``act_order``: round the input channels with the largest Hessian diagonal (outlier activations) first, while
    the most freedom is left to compensate their error; the group scales are then fixed up front from the weights
    as given (static groups), since the groups are no longer reached in order.  Without it, a group's scale is
    taken from the weights as they stand when GPTQ reaches the group (compensation included)."""
    w = np.array(weight, dtype=np.float64, copy=True)
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian {hessian.shape} does not match {cols} input channels")
    group = quantizer.group_size
    h = np.array(hessian, dtype=np.float64, copy=True)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(cols)] += damp * np.mean(np.diag(h))
    if act_order:
        _, scales = quantizer.fake_quant(np.asarray(weight, np.float32))  # static groups: the RTN scales
        perm = np.argsort(-np.diag(h), kind="stable")
        w, h = w[:, perm], h[perm][:, perm]
        col_scale = scales[:, perm // group].astype(np.float32)  # [out, in]: each permuted column's group scale
    else:
        block = max(group, block - block % group)  # a group never straddles two blocks
        scales = np.empty((rows, -(-cols // group)), np.float32)
        perm = col_scale = None
    # upper Cholesky factor of H^-1: row i holds how column i's error moves the columns after it
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb = w[:, b0:b1].copy()
        err = np.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col_scale is not None:
                scale = col_scale[:, col:col + 1]
            elif col % group == 0:
                scale = quantizer.scale(wb[:, i:i + group].astype(np.float32))
                scales[:, col // group] = scale[:, 0]
            wc = wb[:, i:i + 1]
            qc = quantizer.round(wc.astype(np.float32), scale).astype(np.float64)
            q[:, col:col + 1] = qc
            e = (wc - qc) / hb[i, i]
            wb[:, i + 1:] -= e @ hb[i:i + 1, i + 1:]
            err[:, i:i + 1] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    if perm is not None:
        unpermuted = np.empty_like(q)
        unpermuted[:, perm] = q
        q = unpermuted
    return q.astype(weight.dtype), scales


def output_error(weight: np.ndarray, quantized: np.ndarray, hessian: np.ndarray) -> float:
    """Mean squared output error ``tr(D H D^T) / 2`` of using ``quantized`` for ``weight`` on the calibration inputs."""
    d = np.asarray(weight, np.float64) - np.asarray(quantized, np.float64)
    return float(np.sum((d @ hessian) * d) / 2.0 / d.shape[0])


def _fp4_round(column: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """E2M1 round-to-nearest-even under ``scale``, saturating at +-6 (the OCP FP4 grid)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(scale > 0, column / scale, 0.0)
    return saturate_cast(v, ml_dtypes.float4_e2m1fn, 6.0).astype(np.float32) * scale


def mxfp4_quantizer(block_size: int = MX_BLOCK_SIZE) -> GroupQuantizer:
    """OCP MXFP4: E2M1 elements, one E8M0 (power-of-two) scale per ``block_size`` input channels."""

    def scale(group: np.ndarray) -> np.ndarray:
        return mx_scale_float(mx_shared_exponents(group, "mxfp4", axis=1, block_size=group.shape[1]), "mxfp4")

    return GroupQuantizer(scale, _fp4_round, block_size)


def fp4_e4m3_global_scale(weight: np.ndarray) -> np.float32:
    """Per-tensor FP32 scale that brings FP4 block scales (amax / 6) into FP8 E4M3's range (max 448)."""
    amax = float(np.max(np.abs(weight))) if weight.size else 0.0
    return np.float32(amax / (6.0 * 448.0)) if amax > 0 else np.float32(1.0)


def fp4_e4m3_quantizer(global_scale: float, block_size: int = 16) -> GroupQuantizer:
    """FP4 E2M1 elements with an FP8 E4M3 scale per ``block_size`` input channels, times one FP32 tensor scale
    (the two-level layout of NVIDIA's NVFP4)."""
    g = np.float32(global_scale)

    def scale(group: np.ndarray) -> np.ndarray:
        amax = np.max(np.abs(group), axis=1, keepdims=True)
        return cast_fp8_saturate(amax / (6.0 * g), "e4m3fn").astype(np.float32) * g

    return GroupQuantizer(scale, _fp4_round, block_size)
