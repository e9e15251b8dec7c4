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

DEFAULT_HESSIAN_BYTES = 512 << 20  # of layer-input Hessians alive at once while calibration streams

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
    """Streams ``2/n * sum x^T x`` over calibration rows of one layer input (``[..., in]``).

    ``normalize_tokens``: every row (token) enters scaled to norm ``sqrt(in)``, so each token weighs the same.  In
    transformers a few tokens carry activations orders of magnitude larger than the rest (attention sinks) and would
    own the plain Hessian, while the next LayerNorm divides every token by its own norm: what matters downstream is
    each token's error relative to its size.  ``dtype``: float32 halves the memory of wide layers (a 5632-column
    FFN input: 127 MB instead of 254) at a relative error ~1e-7 per batch, far below the damping GPTQ adds."""

    FLUSH_ROWS = 1024  # rows gathered before one x^T x product: a 64-token batch alone would re-read the whole sum

    def __init__(self, columns: int, normalize_tokens: bool = False, dtype=np.float64):
        self._sum = np.zeros((columns, columns), dtype=dtype)  # sum x^T x: one in-place add per flush
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self.rows = 0
        self.normalize_tokens = normalize_tokens

    @property
    def h(self) -> np.ndarray:
        self._flush()
        return self._sum * self._sum.dtype.type(2.0 / self.rows) if self.rows else np.zeros_like(self._sum)

    def take(self) -> np.ndarray:
        """``h`` made in place, for the last reader: the accumulator is empty afterwards (no second copy)."""
        self._flush()
        h, self._sum = self._sum, np.zeros((0, 0), self._sum.dtype)
        if self.rows:
            h *= h.dtype.type(2.0 / self.rows)
        return h

    def update(self, x: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add a batch's inputs ``[batch, seq, ..., in]`` (or ``[batch * seq, in]`` token rows, a Gemm after a
        flatten); ``valid`` is the batch's ``[batch, seq]`` real-position mask."""
        x = np.asarray(x, dtype=self._sum.dtype)
        if valid is not None and x.ndim >= 3 and x.shape[:2] == valid.shape:
            x = x[valid]  # padded positions say nothing about the layer
        elif valid is not None and x.ndim == 2 and x.shape[0] == valid.size:
            x = x[valid.reshape(-1)]
        x = x.reshape(-1, x.shape[-1])
        if self.normalize_tokens:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = x * np.where(norms > 0, np.sqrt(x.shape[1]) / np.where(norms > 0, norms, 1.0), 0.0).astype(x.dtype)
        if x.shape[0] == 0:
            return
        self._pending.append(np.array(x, copy=not self.normalize_tokens))  # a view of the caller's batch is not ours
        self._pending_rows += x.shape[0]
        self.rows += x.shape[0]
        if self._pending_rows >= self.FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            x = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending, self._pending_rows = [], 0
            self._sum += x.T @ x


@dataclass
class HessianFactor:
    """What GPTQ needs of one input's Hessian, computed once for every layer reading that input (q/k/v share one).

    ``hinv``: the upper Cholesky factor of the damped ``H^-1`` in processing order (row i: how column i's rounding
    error moves the columns after it); ``perm``: the processing order (``act_order``) or None; ``dead``: input
    channels that never carried a value (their weights are zeroed: nothing can observe them)."""

    hinv: np.ndarray
    perm: np.ndarray | None
    dead: np.ndarray


def _cholesky_in_place(a: np.ndarray, nb: int = 256) -> None:
    """Lower Cholesky factor of the symmetric positive definite ``a``, written over ``a`` (the strict upper triangle
    zeroed): numpy's ``cholesky`` holds two more matrices of ``a``'s size (a Fortran copy and the result), 254 MB
    beside a 5632-wide FFN Hessian.  Blocked by ``nb`` columns; each trailing update goes one column strip at a time,
    so no temporary exceeds ``n x nb``."""
    n = a.shape[0]
    for j0 in range(0, n, nb):
        j1 = min(j0 + nb, n)
        # the block column j0:j1 minus what the factored columns before it explain
        if j0:
            a[j0:, j0:j1] -= a[j0:, :j0] @ a[j0:j1, :j0].T
        a[j0:j1, j0:j1] = np.linalg.cholesky(a[j0:j1, j0:j1])
        if j1 < n:
            a[j1:, j0:j1] = a[j1:, j0:j1] @ np.linalg.inv(a[j0:j1, j0:j1]).T
        a[j0:j1, j1:] = 0.0


def _lower_inverse_in_place(a: np.ndarray, nb: int = 256) -> None:
    """Inverse of the lower-triangular ``a`` written over it, one row block at a time: the inverse of a leading
    block is the leading block of the inverse, so row block ``[R, D]`` becomes ``[-D^-1 R Lead^-1, D^-1]`` with
    ``Lead^-1`` already in place above it (n^3/3 multiply-adds; numpy has no ``trtri``)."""
    n = a.shape[0]
    for j0 in range(0, n, nb):
        j1 = min(j0 + nb, n)
        d_inv = np.linalg.inv(a[j0:j1, j0:j1])
        if j0:
            a[j0:j1, :j0] = -d_inv @ (a[j0:j1, :j0] @ a[:j0, :j0])
        a[j0:j1, j0:j1] = d_inv


def factor_hessian(hessian: np.ndarray, damp: float = 0.01, act_order: bool = False, dtype=None) -> HessianFactor:
    """Damp ``hessian`` by ``damp`` times its mean diagonal and factor its inverse (in ``dtype``, default the
    Hessian's own).

    GPTQ wants the upper factor ``U`` of ``H^-1 = U^T U``.  With ``R`` the order-reversing permutation and
    ``R H R = L L^T`` (Cholesky), ``U = R L^-1 R``: one Cholesky and one triangular inverse (2n^3/3 multiply-adds)
    instead of a general inverse and a second Cholesky, all in one working copy of the Hessian."""
    diag = np.diag(hessian).astype(np.float64)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * np.mean(diag)
    order = np.arange(len(diag))
    perm = None
    if act_order:
        # outlier input channels (largest diagonal) first, while the most freedom is left to compensate their error
        perm = order = np.argsort(-diag, kind="stable")
    reverse = order[::-1]  # R H R in the same single gather
    h = np.asarray(hessian[np.ix_(reverse, reverse)], dtype=dtype or hessian.dtype)
    h[np.diag_indices(h.shape[0])] = diag[reverse]
    _cholesky_in_place(h)
    _lower_inverse_in_place(h)
    for i in range(h.shape[0] // 2):  # U = R L^-1 R: reverse rows and columns in place, a row pair at a time
        top, bottom = h[i, ::-1].copy(), h[-1 - i, ::-1].copy()
        h[i], h[-1 - i] = bottom, top
    if h.shape[0] % 2:
        middle = h.shape[0] // 2
        h[middle] = h[middle, ::-1].copy()
    return HessianFactor(h, perm, dead)


SUB_BLOCK = 16  # columns whose errors move their block-mates one by one (the rest move in one matrix product)


def gptq_rows(weight: np.ndarray, factor: HessianFactor, quantizer: GroupQuantizer, block: int = 128,
              rtn_scales: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of ``[rows, in]`` output rows under a factored Hessian: (dequantized values, per-group scales
    ``[rows, groups]``).  Output rows are independent, so a large weight is rounded a slice of rows at a time.

    With ``factor.perm`` (act_order) the group scales are fixed up front from the weights as given (static groups:
    the groups are no longer reached in order); without it a group's scale is taken from the weights as they stand
    when GPTQ reaches the group (compensation included).  ``rtn_scales``: ``quantizer.fake_quant(weight)``'s scales
    when the caller has them already (the static groups), so they are not computed twice."""
    dtype = factor.hinv.dtype
    w = np.array(weight, dtype=dtype, copy=True)
    rows, cols = w.shape
    if factor.hinv.shape != (cols, cols):
        raise ValueError(f"Hessian {factor.hinv.shape} does not match {cols} input channels")
    group = quantizer.group_size
    w[:, factor.dead] = 0.0
    perm = factor.perm
    if perm is not None:
        # static groups: the round-to-nearest scales
        scales = rtn_scales if rtn_scales is not None else quantizer.fake_quant(np.asarray(weight, np.float32))[1]
        w = w[:, perm]
        col_scale = np.ascontiguousarray(scales[:, perm // group].T, dtype=np.float32)  # [in, rows]: per column
    else:
        block = max(group, block - block % group)  # a group never straddles two blocks
        scales = np.empty((rows, -(-cols // group)), np.float32)
        col_scale = None
    hinv = factor.hinv
    sub = max(group, SUB_BLOCK - SUB_BLOCK % group)  # a group's scale must see every earlier column's update
    # columns are walked one at a time: keep them as contiguous rows of transposed copies (a strided column of a
    # [rows, 128] block costs a cache line per element)
    q_t = np.empty((cols, rows), dtype)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb = np.ascontiguousarray(w[:, b0:b1].T)  # [block, rows]
        err = np.empty_like(wb)
        hb = hinv[b0:b1, b0:b1]
        size = b1 - b0
        for s0 in range(0, size, sub):
            # rank-1 updates only inside a sub-block; the rest of the block gets one rank-``sub`` update after it
            s1 = min(s0 + sub, size)
            for i in range(s0, s1):
                col = b0 + i
                if col_scale is not None:
                    scale = col_scale[col]
                elif col % group == 0:
                    scale = quantizer.scale(wb[i:i + group].T.astype(np.float32))[:, 0]
                    scales[:, col // group] = scale
                wc = wb[i]
                qc = quantizer.round(wc.astype(np.float32), scale).astype(dtype)
                q_t[col] = qc
                e = (wc - qc) / hb[i, i]
                if i + 1 < s1:
                    wb[i + 1:s1] -= np.outer(hb[i, i + 1:s1], e)
                err[i] = e
            if s1 < size:
                wb[s1:] -= hb[s0:s1, s1:].T @ err[s0:s1]
        if b1 < cols:
            w[:, b1:] -= err.T @ hinv[b0:b1, b1:]
    q = q_t.T
    if perm is not None:
        unpermuted = np.empty_like(q)
        unpermuted[:, perm] = q
        q = unpermuted
    return q.astype(weight.dtype), scales


def gptq(weight: np.ndarray, hessian: np.ndarray, quantizer: GroupQuantizer, damp: float = 0.01,
         block: int = 128, act_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ-rounded ``[out, in]`` weight (dequantized values) and the per-group scales ``[out, groups]`` it used:
    every value is an element of the format times its group's scale, so it packs exactly (``gptq_rows`` of every
    row under ``factor_hessian``, in float64)."""
    return gptq_rows(weight, factor_hessian(hessian, damp, act_order, np.float64), quantizer, block)


def output_error(weight: np.ndarray, quantized: np.ndarray, hessian: np.ndarray) -> float:
    """Mean squared output error ``tr(D H D^T) / 2`` of using ``quantized`` for ``weight`` on the calibration inputs."""
    return output_error_sum(weight, quantized, hessian) / 2.0 / np.shape(weight)[0]


def output_error_sum(weight: np.ndarray, quantized: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(D H D^T)`` in the Hessian's precision: summed over row slices it gives ``output_error`` of the whole."""
    d = np.asarray(weight, hessian.dtype) - np.asarray(quantized, hessian.dtype)
    return float(np.sum((d @ hessian) * d, dtype=np.float64))


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
