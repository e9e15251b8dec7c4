"""Calibration: feed batches from .npz / a directory of .npz / random inputs / ``text:FILE`` / ``images:DIR``
(maia_onnx.data) through ORT and turn streamed activation statistics (running amax + a power-of-two-growing |x|
histogram) into per-tensor FP8 scales.  Padded token positions (``Feeds.valid``) never reach a statistic.

Methods: ``minmax`` (amax), ``percentile`` (e.g. 99.99 of |x|), ``mse`` (clip value minimising the expected
FP8 quantisation MSE over the histogram) and ``entropy`` (clip value minimising KL(P || Q) between the
clipped histogram and its FP8-quantised version).  Only one batch of activations is alive at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from maia_onnx.data import ImageSource, TextSource, data_kind, feeds_valid, make_data_source, real_positions
from maia_onnx.errors import InvalidOptionError, UserError
from maia_onnx.formats.fp8 import Fp8Format, cast_fp8_saturate, fp8_amax_scale, get_fp8_format
from maia_onnx.formats.gptq import DEFAULT_HESSIAN_BYTES, HessianAccumulator
from maia_onnx.inputs import make_inputs
from maia_onnx.io import give_back_free_memory
from maia_onnx.ortutil import session_options
from maia_onnx.segments import DEFAULT_SEGMENT_BYTES, run_segments

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "mse", "entropy")
DEFAULT_BINS = 2048
DEFAULT_PERCENTILE = 99.99
MIN_KL_BINS = 128


# --------------------------------------------------------------------------------------------------
# Data sources
# --------------------------------------------------------------------------------------------------
def _feed_inputs(model: ir.Model) -> list[ir.Value]:
    inits = set(model.graph.initializers)
    return [v for v in model.graph.inputs if v.name not in inits]


@dataclass
class CalibrationSource:
    """Where calibration (or evaluation) batches come from; iterate with ``batches(model)``."""

    kind: str  # "random" | "npz" | "dir"
    path: Path | None = None
    num_samples: int | None = None  # None: every sample in the files (random: 8)
    batch_size: int = 1
    seed: int = 0
    dims: dict[str, int] = field(default_factory=dict)
    sample_range: tuple[int, int | None] = (0, None)  # [start, stop) of samples used (held-out splits)

    @property
    def description(self) -> str:
        return "random" if self.kind == "random" else str(self.path)

    def count(self) -> int:
        """Number of batches this source yields (for the progress bar)."""
        if self.kind == "random":
            n = self.num_samples or 8
            return -(-n // self.batch_size)
        total = sum(-(-n // self.batch_size) for n in self._file_sample_counts())
        return total

    def _files(self) -> list[Path]:
        if self.kind == "npz":
            return [self.path]
        files = sorted(self.path.glob("*.npz"))
        if not files:
            raise UserError(f"calibration directory {self.path} has no .npz files: add one array per graph input per file")
        return files

    def _file_sample_counts(self) -> list[int]:
        counts = []
        start, stop = self.sample_range
        seen = 0
        limit = self.num_samples
        for f in self._files():
            lengths = _npz_first_dims(f)  # headers only: counting must not read every array
            n = min(lengths.values()) if lengths else 0
            lo, hi = max(start - seen, 0), n if stop is None else min(n, max(stop - seen, 0))
            seen += n
            used = max(hi - lo, 0)
            if limit is not None:
                used = min(used, max(limit - sum(counts), 0))
            counts.append(used)
        return counts

    def total_samples(self) -> int:
        if self.kind == "random":
            return self.num_samples or 8
        return sum(self._file_sample_counts())

    def with_range(self, sample_range: tuple[int, int | None]) -> "CalibrationSource":
        """The samples in ``[start, stop)`` only (held-out splits)."""
        return dataclasses.replace(self, sample_range=sample_range, num_samples=None)

    def batches(self, model: ir.Model) -> Iterator[dict[str, np.ndarray]]:
        inputs = _feed_inputs(model)
        if self.kind == "random":
            yield from self._random_batches(model, inputs)
            return
        yield from self._npz_batches(inputs)

    def _random_batches(self, model: ir.Model, inputs: Sequence[ir.Value]) -> Iterator[dict[str, np.ndarray]]:
        n = self.num_samples or 8
        rng = np.random.default_rng(self.seed)
        dims = {"*": 8, **self.dims}
        for start in range(0, n, self.batch_size):
            # the first symbolic dim of every input is taken as the batch dim
            yield make_inputs(model, dims=dims, rng=rng, batch=min(self.batch_size, n - start), inputs=inputs)

    def _npz_batches(self, inputs: Sequence[ir.Value]) -> Iterator[dict[str, np.ndarray]]:
        counts = self._file_sample_counts()
        start, _ = self.sample_range
        seen = 0
        for f, used in zip(self._files(), counts):
            with np.load(f) as data:
                missing = [v.name for v in inputs if v.name not in data.files]
                if missing:
                    raise UserError(
                        f"calibration file {f} lacks arrays for graph inputs {', '.join(missing)}: "
                        f"save one array per input (first axis = samples) with np.savez"
                    )
                n = min(data[v.name].shape[0] for v in inputs)
                lo = max(start - seen, 0)
                seen += n
                arrays = {v.name: data[v.name] for v in inputs}
                _check_calib_arrays(f, inputs, arrays)
            for s in range(lo, lo + used, self.batch_size):
                e = min(s + self.batch_size, lo + used)
                feeds = {}
                for value in inputs:
                    arr = arrays[value.name]
                    rank = len(value.shape) if value.shape is not None else arr.ndim - 1
                    if arr.ndim == rank + 1 and self.batch_size == 1:
                        feeds[value.name] = np.ascontiguousarray(arr[s])  # samples are whole inputs
                    elif arr.ndim == rank + 1:
                        feeds[value.name] = np.concatenate([arr[i] for i in range(s, e)], axis=0)
                    else:
                        feeds[value.name] = np.ascontiguousarray(arr[s:e])  # first axis is the batch axis
                    want = _np_dtype(value.dtype)
                    if want is not None and feeds[value.name].dtype != want:
                        feeds[value.name] = feeds[value.name].astype(want)
                yield feeds


def _npz_first_dims(path: Path) -> dict[str, int]:
    """First-axis length of every array in an .npz, read from the .npy headers (no array data is read)."""
    import zipfile

    lengths = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape = header(fh)[0]
                lengths[info.filename[:-4]] = int(shape[0]) if shape else 1
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise UserError(f"calibration file {path} is not a readable .npz archive ({exc}): save it with np.savez") from None
    return lengths


def _np_dtype(dtype):
    table = {
        ir.DataType.FLOAT: np.float32,
        ir.DataType.FLOAT16: np.float16,
        ir.DataType.INT64: np.int64,
        ir.DataType.INT32: np.int32,
        ir.DataType.BOOL: np.bool_,
    }
    return table.get(dtype)


def _check_calib_arrays(path, inputs: Sequence[ir.Value], arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse calibration data that would silently give wrong scales: wrong dtype kind, NaN or Inf."""
    for value in inputs:
        arr = arrays[value.name]
        want = _np_dtype(value.dtype)
        if want is not None and np.dtype(want).kind != arr.dtype.kind and not (
                np.dtype(want).kind == "f" and arr.dtype.kind == "f"):
            raise UserError(
                f"calibration array {value.name!r} in {path} has dtype {arr.dtype}, but the model input is "
                f"{np.dtype(want).name}: save it as {np.dtype(want).name}")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise UserError(
                f"calibration array {value.name!r} in {path} holds {bad} NaN/Inf value(s): "
                f"remove or replace those samples")


def make_source(
    spec: str | os.PathLike | None,
    num_samples: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    *,
    tokenizer: str | os.PathLike | None = None,
    seq_len: int = 128,
    image_size: tuple[int, int] | None = None,
) -> CalibrationSource | TextSource | ImageSource:
    """``random`` / None, an ``.npz`` file (one array per graph input, first axis = samples), a directory of them,
    ``text:FILE`` (tokenized with ``tokenizer``, default the model's recorded ``hf:`` directory) or ``images:DIR``."""
    if batch_size < 1:
        raise InvalidOptionError(f"calibration batch size must be >= 1, got {batch_size}")
    if data_kind(spec)[0] != "other":
        return make_data_source(str(spec), tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size,
                                num_samples=num_samples, image_size=image_size)
    if spec is None or str(spec) == "random":
        return CalibrationSource("random", None, num_samples, batch_size, seed, dict(dims or {}))
    path = Path(spec)
    if path.is_dir():
        return CalibrationSource("dir", path, num_samples, batch_size, seed, dict(dims or {}))
    if not path.exists():
        raise UserError(f"calibration data {path} not found: pass an .npz file, a directory of .npz files, "
                        f"text:FILE, images:DIR or 'random'")
    if path.suffix != ".npz":
        raise UserError(f"calibration data {path} is not an .npz file: save it with numpy.savez (one array per input), "
                        f"or pass text:{path} for one text sample a line")
    return CalibrationSource("npz", path, num_samples, batch_size, seed, dict(dims or {}))


def split_holdout(source, holdout: int):
    """(calibration, evaluation) sources with disjoint samples: the last ``holdout`` samples (at most half) are held
    out; random sources get a different seed.  Works for every source with ``total_samples`` and ``with_range``."""
    if getattr(source, "kind", None) == "random":
        return source, dataclasses.replace(source, seed=source.seed + 7919, num_samples=holdout)
    total = source.total_samples()
    if total < 2:
        logger.warning("only %d calibration sample(s): the accuracy report reuses them (not held out)", total)
        return source, source
    holdout = min(max(1, holdout), total // 2)
    start = source.sample_range[0]  # ranges are absolute sample indices; num_samples may have cut the end
    return (source.with_range((start, start + total - holdout)),
            source.with_range((start + total - holdout, start + total)))


# --------------------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------------------
class HistogramStat:
    """Running amax and a histogram of |x| over [0, range); the range doubles (bins merge exactly) as needed."""

    def __init__(self, bins: int = DEFAULT_BINS):
        if bins < 16 or bins & (bins - 1):
            raise ValueError("bins must be a power of two >= 16")
        self.bins = bins
        self.hist = np.zeros(bins, dtype=np.int64)
        self.range = 0.0
        self.amax = 0.0
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, dtype=np.float32)).ravel()
        a = a[np.isfinite(a)]
        if a.size == 0:
            return
        batch_max = float(a.max())
        self.amax = max(self.amax, batch_max)
        self.count += a.size
        if batch_max == 0.0 and self.range == 0.0:
            self.hist[0] += a.size
            return
        if self.range == 0.0:
            self.range = batch_max
        elif batch_max >= self.range:
            grow = math.ceil(math.log2(batch_max / self.range) + 1e-12)
            grow = max(grow, 1)
            factor = 1 << min(grow, int(math.log2(self.bins)))
            merged = self.hist.reshape(-1, factor).sum(axis=1)
            self.hist = np.zeros(self.bins, dtype=np.int64)
            self.hist[: merged.size] = merged
            self.range *= 2.0**grow
        idx = (a * np.float32(self.bins / self.range)).astype(np.int64)
        np.minimum(idx, self.bins - 1, out=idx)
        self.hist += np.bincount(idx, minlength=self.bins)

    @property
    def bin_width(self) -> float:
        return self.range / self.bins if self.range else 0.0

    def centers(self) -> np.ndarray:
        return (np.arange(self.bins) + 0.5) * self.bin_width

    def percentile_amax(self, percentile: float) -> float:
        if self.count == 0 or self.range == 0:
            return self.amax
        cum = np.cumsum(self.hist)
        target = percentile / 100.0 * cum[-1]
        i = int(np.searchsorted(cum, target, side="left"))
        return float(min((i + 1) * self.bin_width, self.amax))

    def _candidates(self, n: int = 128) -> np.ndarray:
        lo = self.amax / 64.0
        return np.unique(np.geomspace(max(lo, 1e-12), self.amax, n))

    def mse_amax(self, fmt: Fp8Format) -> float:
        if self.count == 0 or self.amax == 0:
            return self.amax
        centers = self.centers().astype(np.float32)
        weights = self.hist.astype(np.float64)
        nz = weights > 0
        centers, weights = centers[nz], weights[nz]
        best, best_err = self.amax, math.inf
        for clip in self._candidates():
            scale = np.float32(clip / fmt.max)
            q = cast_fp8_saturate(centers / scale, fmt).astype(np.float32) * scale
            err = float(np.sum(weights * (centers.astype(np.float64) - q) ** 2))
            if err < best_err:
                best, best_err = float(clip), err
        return best

    def entropy_amax(self, fmt: Fp8Format) -> float:
        """Clip value minimising KL(P || Q): P the observed |x| histogram, Q its FP8 quantise-dequantise.

        Q moves every bin's mass to the FP8 level its centre rounds to (bins above the clip saturate to the
        top level) and spreads each level's mass evenly over the non-empty bins below the clip that round
        to it (TensorRT's expansion).  Clipped bins keep no mass in Q, so clipping outliers costs KL in
        proportion to their mass; a coarser top of the grid costs KL through the spreading.
        """
        if self.count == 0 or self.amax == 0:
            return self.amax
        last_bin = min(self.bins, int(math.ceil(self.amax / self.bin_width)))
        p = self.hist[:last_bin].astype(np.float64)
        p /= p.sum()
        centers = self.centers()[:last_bin].astype(np.float32)
        nonempty = p > 0
        eps = 1e-8  # floor for empty Q bins: finite KL, still a steep price for clipped mass
        # fewer than MIN_KL_BINS bins under the clip would make FP8 rounding invisible at this resolution
        min_bins = min(MIN_KL_BINS, last_bin)
        best, best_kl = self.amax, math.inf
        for clip in self._candidates():
            i = min(last_bin, max(min_bins, int(math.ceil(clip / self.bin_width))))
            clip_value = i * self.bin_width
            scale = np.float32(clip_value / fmt.max)
            codes = cast_fp8_saturate(centers / scale, fmt).view(np.uint8)
            members = nonempty.copy()
            members[i:] = False
            level_mass = np.bincount(codes, weights=p, minlength=256)
            level_bins = np.bincount(codes, weights=members.astype(np.float64), minlength=256)
            q = np.zeros_like(p)
            q[members] = (level_mass / np.maximum(level_bins, 1))[codes[members]]
            orphan = (level_mass > 0) & (level_bins == 0)  # a level whose bins were all clipped
            if orphan.any():
                q[i - 1] += level_mass[orphan].sum()
            kl = float(np.sum(p[nonempty] * np.log(p[nonempty] / np.maximum(q[nonempty], eps))))
            if kl < best_kl - 1e-12:
                best, best_kl = float(clip_value), kl
        return min(best, self.amax)

    def clip_amax(self, method: str, fmt: Fp8Format, percentile: float = DEFAULT_PERCENTILE) -> float:
        if method == "minmax":
            return self.amax
        if method == "percentile":
            return self.percentile_amax(percentile)
        if method == "mse":
            return self.mse_amax(fmt)
        if method == "entropy":
            return self.entropy_amax(fmt)
        raise InvalidOptionError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")


def check_method(method: str, percentile: float = DEFAULT_PERCENTILE) -> None:
    if method not in METHODS:
        raise InvalidOptionError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    if not 0 < percentile <= 100:
        raise InvalidOptionError(f"--percentile must be in (0, 100], got {percentile}")


def _session_with_outputs(model: ir.Model, names: Sequence[str]):
    """An ORT session of ``model`` that also returns the named intermediate values (model is not modified)."""
    import onnx

    proto = ir.to_proto(model)
    existing = {o.name for o in proto.graph.output}
    dtypes = {}
    for node in model.graph:
        for out in node.outputs:
            if out.name in names:
                dtypes[out.name] = out.dtype
    for v in model.graph.inputs:
        if v.name in names:
            dtypes[v.name] = v.dtype
    for name in names:
        if name in existing:
            continue
        elem = dtypes.get(name) or ir.DataType.FLOAT
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, int(elem), None))
    options = session_options(True)
    external = [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    if external:
        # ORT reads the weights from their files itself: loading them into the proto would hold a second copy
        # of every weight and stop at protobuf's 2 GB
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external[0].base_dir))
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def declared_shapes(model: ir.Model, names: Sequence[str]) -> dict[str, ir.Shape]:
    """The graph's declared shape of each named value that has one (tells position axes from fixed ones)."""
    wanted, out = set(names), {}
    values = list(model.graph.inputs) + [o for node in model.graph for o in node.outputs]
    for value in values:
        if value.name in wanted and value.shape is not None:
            out[value.name] = value.shape
    return out


def run_with_intermediates(model: ir.Model, names: Sequence[str], batches: Iterable[Mapping[str, np.ndarray]], callback, progress=None) -> int:
    """For each batch run the model once and call ``callback(batch_index, {name: array})``; returns batches run."""
    sess = _session_with_outputs(model, names)
    graph_outputs = [o.name for o in sess.get_outputs()]
    wanted = list(dict.fromkeys(list(names) + graph_outputs))
    n = 0
    for feeds in batches:
        try:
            values = sess.run(wanted, dict(feeds))
        except Exception as exc:
            raise UserError(
                f"calibration batch {n} failed in ONNX Runtime ({str(exc).splitlines()[0][:200]}): "
                f"check the calibration arrays' shapes and dtypes against the model inputs"
            ) from exc
        # graph inputs are fed, not produced: take them from the feeds
        results = dict(zip(wanted, values))
        for k, v in feeds.items():
            if k in names:
                results[k] = v
        callback(n, results)
        n += 1
        if progress is not None:
            progress.update(1)
    return n


def collect_statistics(
    model: ir.Model,
    value_names: Sequence[str],
    source: CalibrationSource,
    bins: int = DEFAULT_BINS,
    show_progress: bool = True,
) -> dict[str, HistogramStat]:
    """Stream ``source`` through the model and keep a histogram per named activation."""
    stats = {name: HistogramStat(bins) for name in value_names}
    if not value_names:
        return stats
    declared = declared_shapes(model, value_names)
    valid: list[np.ndarray | None] = [None]

    def batches():
        for feeds in source.batches(model):
            valid[0] = feeds_valid(feeds)  # read by update() for this very batch (run_with_intermediates is sequential)
            yield feeds

    def update(_, values):
        for name in value_names:
            if name in values:
                stats[name].update(real_positions(values[name], valid[0], declared.get(name)))

    progress = None
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(total=source.count(), desc="calibrating", unit="batch", file=sys.stderr, leave=False)
    try:
        n = run_with_intermediates(model, value_names, batches(), update, progress)
    finally:
        if progress is not None:
            progress.close()
    if n == 0:
        raise UserError(f"calibration data {source.description} yielded no samples: provide at least one sample")
    return stats


def compute_scales(
    stats: Mapping[str, HistogramStat],
    method: str = "minmax",
    fmt: str | Fp8Format = "e4m3fn",
    percentile: float = DEFAULT_PERCENTILE,
) -> dict[str, float]:
    """Per-tensor FP8 scale per activation: clip value from ``method`` divided by the format max."""
    check_method(method, percentile)
    fmt = get_fp8_format(fmt)
    scales = {}
    for name, stat in stats.items():
        clip = stat.clip_amax(method, fmt, percentile)
        scales[name] = float(fp8_amax_scale(clip, fmt))
    return scales


def calibrate(
    model: ir.Model,
    value_names: Sequence[str],
    source: CalibrationSource,
    method: str = "minmax",
    fmt: str | Fp8Format = "e4m3fn",
    percentile: float = DEFAULT_PERCENTILE,
    bins: int = DEFAULT_BINS,
    show_progress: bool = True,
) -> tuple[dict[str, float], dict[str, HistogramStat]]:
    """Scales for ``value_names`` from ``source`` with ``method``; also returns the statistics."""
    check_method(method, percentile)
    stats = collect_statistics(model, value_names, source, bins, show_progress)
    return compute_scales(stats, method, fmt, percentile), stats


def collect_hessians(
    model: ir.Model,
    columns: Mapping[str, int],
    batches: Iterable[Mapping[str, np.ndarray]],
    on_hessian,
    normalize_tokens: bool = True,
    max_segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    max_hessian_bytes: int = DEFAULT_HESSIAN_BYTES,
):
    """Stream ``batches`` once through ``model`` segment by segment (``maia_onnx.segments``) and hand each named
    layer input's Hessian ``2/n X^T X`` (float32, ``columns[name]`` wide, padding masked out by the batches'
    ``valid``) to ``on_hessian(name, hessian, rows)`` as soon as the segment that makes it is done, then drop it:
    at most ``max_hessian_bytes`` of Hessians exist at once.  Returns (batches streamed, segments)."""
    hessians: dict[str, HessianAccumulator] = {}

    def on_values(_, values, valid):
        for name, x in values.items():
            if name not in hessians:
                hessians[name] = HessianAccumulator(columns[name], normalize_tokens, np.float32)
            hessians[name].update(x, valid)

    def on_segment(segment):
        for name in segment.wanted:
            acc = hessians.pop(name)
            rows = acc.rows
            on_hessian(name, acc.take(), rows)
            del acc
            give_back_free_memory()

    return run_segments(model, list(columns), batches, on_values, on_segment, max_weight_bytes=max_segment_bytes,
                        cost={name: c * c * 4 for name, c in columns.items()}, max_cost=max_hessian_bytes)
