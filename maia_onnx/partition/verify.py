"""Partition self-check: run freshly written shards (the in-process executor) against the unsharded model (ORT)
on random inputs the model accepts, and refuse the partition when any output disagrees.

``partition`` and ``reshard`` call ``verify_partition`` on the staging directory, before it is renamed into
place, so a refused partition leaves nothing behind. Memory: the reference runs first (ORT on the source file,
or on the in-memory model) and its session is dropped before the executor loads the rank files, so the
weights are never held twice.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir

from maia_onnx.errors import ValidationError
from maia_onnx.inputs import feed_inputs, make_inputs
from maia_onnx.io import initializer_bytes
from maia_onnx.ortutil import compare, make_session, ort_run
from maia_onnx.runtime.executor import PartitionExecutor

FP32_TOLERANCE = 1e-5  # max error relative to the output's max magnitude (float models)
# Quantized (QDQ / MX) and 16-bit shards. A pipeline cut changes no arithmetic: bit-exact (measured so on FP8 and MXFP8
# llama-tiny). A tensor-parallel split cannot be: a row-parallel layer sums its contraction in per-rank fp32
# partial sums added by the AllReduce, an order unlike the unsharded MatMul's. That ~1e-7 difference is rounded
# away by the next QuantizeLinear except where a value lies on a rounding boundary; there it moves one FP8 step
# (1/16 of the value for E4M3) and the step propagates to every later token. Measured over 40 seeds at the
# verification dims, correct TP2/TP4 partitions of FP8 llama-tiny and of a 512-hidden FP8 llama: bit-exact on
# most seeds, on the others max rel err up to 5.6e-2 with cosine >= 0.9996. Wrong partitions: a row-parallel
# layer without its AllReduce or one shard's rows reversed, max rel err >= 0.3; even MXFP8 shards checked
# against the FP8 model (a wrong quantization of the right weights) give cosine <= 0.9947. So tp > 1 needs
# both: max rel err <= 0.1 and cosine >= 0.999 on every output. BF16/FP16 models round the same way at every
# cast (one step: 2^-8 / 2^-11 of the value): BF16 llama-tiny TP2 measured bit-exact to 3.7e-3, cosine 0.999999.
QUANTIZED_TP_TOLERANCE = 1e-1
QUANTIZED_TP_MIN_COSINE = 0.999
VERIFY_DIMS = {"batch": 2, "seq": 8, "past": 3}  # small: verification is one extra forward per partition
OTHER_DIM = 2  # any other symbolic dim
SEED = 0
# above this much weight an in-memory source (e.g. rebuilt from shards by reshard) is streamed to a scratch file
# for ORT instead of serialised: a protobuf would hold every weight twice (message and bytes) next to ORT's
# copy, and cannot pass 2 GiB
IN_MEMORY_REFERENCE_MAX_BYTES = 64 << 20

_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MxFakeQuant", "QLinearMatMul",
              "MatMulInteger", "ConvInteger", "QLinearConv"}
_NARROW = {ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2, ir.DataType.FLOAT8E5M2FNUZ,
           ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4}
_NARROW |= {getattr(ir.DataType, n) for n in ("FLOAT4E2M1", "FLOAT8E8M0") if hasattr(ir.DataType, n)}
_HALF = {ir.DataType.BFLOAT16, ir.DataType.FLOAT16}


@dataclass
class Verification:
    """What the self-check found: ``verified`` (True, or None when skipped), worst error, outputs compared."""

    verified: bool | None
    max_rel: float | None = None
    outputs: int = 0
    tolerance: float | None = None
    min_cosine: float | None = None
    reason: str | None = None  # why it was skipped

    def describe(self) -> str:
        """``true (max rel err 3.9e-07 over 5 outputs)`` or ``skipped (--no-verify)``: the report's line."""
        if self.verified is None:
            return f"skipped ({self.reason})"
        return f"true (max rel err {self.max_rel:.2g} over {self.outputs} outputs)"

    def as_dict(self) -> dict[str, Any]:
        return {"verified": self.verified, "max_rel": self.max_rel, "outputs": self.outputs,
                "tolerance": self.tolerance, "min_cosine": self.min_cosine, "reason": self.reason,
                "summary": self.describe()}


def skipped(reason: str = "--no-verify") -> Verification:
    return Verification(verified=None, reason=reason)


def is_low_precision(model: ir.Model) -> bool:
    """Q/DQ or MX nodes, narrow (8-bit and below) or 16-bit float weights, or casts to 16-bit floats: values
    are rounded to a coarse grid between ops, so a reordered reduction can move one by a whole step."""
    for node in model.graph.all_nodes():
        if node.op_type in _QUANT_OPS:
            return True
        if node.op_type == "Cast" and node.attributes.get_int("to", 0) in _HALF:
            return True
    values = [*model.graph.initializers.values(), *model.graph.inputs, *model.graph.outputs]
    return any(v.dtype in _NARROW or v.dtype in _HALF for v in values)


@dataclass
class Probe:
    """Inputs and acceptance bounds of the check, chosen from the unsharded model before a pass rewrites it."""

    feeds: dict[str, np.ndarray]
    microbatches: int
    tolerance: float  # max rel err; 0: bit-exact
    min_cosine: float | None = None

    def bound(self) -> str:
        if self.tolerance == 0:
            return "bit-exact"
        return f"{self.tolerance:g}" + (f", cosine >= {self.min_cosine:g}" if self.min_cosine is not None else "")


def make_probe(model: ir.Model, tp: int, pp: int, seed: int = SEED) -> Probe:
    """Random feeds the model accepts (tiny dims; tables, masks and images respected by ``maia_onnx.inputs``).

    With ``pp`` > 1 and one symbolic batch dim leading every input and output, the batch is split into ``pp``
    microbatches (at least 2 rows), so the pipeline schedule is exercised the way ``run`` drives it.
    """
    inputs = feed_inputs(model)
    firsts = {str(v.shape[0]) if v.shape is not None and len(v.shape) and not isinstance(v.shape[0], int) else None
              for v in inputs}
    batch_dim = firsts.pop() if len(firsts) == 1 else None
    dims: dict[str, int] = dict(VERIFY_DIMS)
    for value in inputs:
        for d in value.shape or ():
            if not isinstance(d, int):
                dims.setdefault(str(d), OTHER_DIM)
    microbatches = 1
    # microbatching concatenates outputs along the batch: only when every output leads with that dim too
    batch_major = batch_dim is not None and all(
        v.shape is not None and len(v.shape) and str(v.shape[0]) == batch_dim for v in model.graph.outputs)
    if pp > 1 and batch_major:
        dims[batch_dim] = max(dims[batch_dim], pp)
        microbatches = pp if dims[batch_dim] % pp == 0 else 1
    feeds = make_inputs(model, seed=seed, dims=dims)
    if not is_low_precision(model):
        return Probe(feeds, microbatches, FP32_TOLERANCE)
    if tp == 1:
        return Probe(feeds, microbatches, 0.0)
    return Probe(feeds, microbatches, QUANTIZED_TP_TOLERANCE, QUANTIZED_TP_MIN_COSINE)


def reference_outputs(source: ir.Model | str | os.PathLike, feeds: Mapping[str, np.ndarray],
                      scratch_parent: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The unsharded model's outputs in ORT (a file path is loaded by ORT itself; nothing is copied here).

    A large in-memory model is saved under ``scratch_parent`` first (weights streamed one at a time), then removed.
    """
    scratch = None
    try:
        if isinstance(source, ir.Model) and initializer_bytes(source) > IN_MEMORY_REFERENCE_MAX_BYTES:
            scratch = Path(tempfile.mkdtemp(prefix=".maia-verify-", dir=scratch_parent))
            ir.save(source, scratch / "source.onnx", external_data="source.onnx.data")
            source = scratch / "source.onnx"
        session = make_session(source)
        names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names, ort_run(session, names, feeds)))
        del session
        return outputs
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _error(reference: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """(max rel err, cosine) of ``actual`` against ``reference``; NaN where both are NaN counts as equal."""
    ref = np.asarray(reference)
    act = np.asarray(actual)
    if ref.shape != act.shape:
        return math.inf, 0.0
    if ref.dtype.kind not in "fc" or act.dtype.kind not in "fc":  # ints, bools (indices, masks): equal or wrong
        return (0.0, 1.0) if np.array_equal(ref, act) else (math.inf, 0.0)
    ref64 = ref.astype(np.float64)
    act64 = act.astype(np.float64)
    if np.array_equal(ref64, act64, equal_nan=True):
        return 0.0, 1.0
    both_nan = np.isnan(ref64) & np.isnan(act64)
    if both_nan.any():
        ref64, act64 = ref64[~both_nan], act64[~both_nan]
    found = compare(ref64, act64)
    err, cosine = found["max_rel"], found["cosine"]
    if err != err or cosine != cosine:  # NaN where the reference has none: wrong
        return math.inf, 0.0
    return err, cosine


def verify_partition(directory: str | os.PathLike, source: ir.Model | str | os.PathLike, probe: Probe) -> Verification:
    """Run the partition at ``directory`` and the unsharded ``source`` on ``probe``'s feeds; refuse disagreement.

    Raises ``ValidationError`` (one line: output, error, tolerance) when an output differs by more than the
    probe's bounds or the shards fail to run.
    """
    directory = Path(directory)
    expected = reference_outputs(source, probe.feeds, scratch_parent=directory.parent)
    gc.collect()  # the reference session's weights go before the shards' are loaded
    try:
        actual = PartitionExecutor(directory).run(probe.feeds, microbatches=probe.microbatches)
    except Exception as exc:  # noqa: BLE001 - any failure of the shards is a wrong partition, said in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise ValidationError(
            f"partition self-check: the shards fail to run on inputs the unsharded model accepts "
            f"({type(exc).__name__}: {first[:300]}); the partition was not written"
        ) from exc
    worst_name, worst = None, 0.0
    for name, ref in expected.items():
        if name not in actual:
            raise ValidationError(f"partition self-check: the shards do not produce output {name!r}; the partition was not written")
        err, cosine = _error(ref, actual[name])
        bad = err > probe.tolerance or (probe.min_cosine is not None and cosine < probe.min_cosine)
        if bad:
            raise ValidationError(
                f"partition self-check: output {name!r} of the shards differs from the unsharded model by max rel err "
                f"{err:.3g} (cosine {cosine:.6f}; tolerance {probe.bound()}); the partition was not written"
            )
        if worst_name is None or err > worst:
            worst_name, worst = name, err
    return Verification(verified=True, max_rel=float(worst), outputs=len(expected), tolerance=probe.tolerance,
                        min_cosine=probe.min_cosine)


__all__ = ["FP32_TOLERANCE", "QUANTIZED_TP_MIN_COSINE", "QUANTIZED_TP_TOLERANCE", "Probe", "Verification",
           "is_low_precision", "make_probe", "reference_outputs", "skipped", "verify_partition"]
