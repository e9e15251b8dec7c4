"""Sensitivity-driven mixed precision: keep the layers that hurt most in BF16 until an end-to-end cosine target holds.

Search (``search_mixed_precision``), all measured in ORT against the FP32 model on the given feeds, the
metric being the worst cosine over all outputs and feeds:

1. quantize everything; done if the target already holds;
2. sensitivity of each candidate layer (MatMul / Gemm / Conv / ConvTranspose): quantize only that layer;
   rank layers by how far their cosine falls;
3. keep the top-k most sensitive layers in BF16 (``keep_dtype="fp32"`` leaves them FP32), finding the
   smallest k that meets the target by doubling k then bisecting (O(log N) evaluations after the N
   sensitivity runs);
4. the result lists every kept layer with its rank and its solo cosine (why it was kept), the cosine
   before and after, and whether the target was met (keeping everything may still miss it).

``MixedPrecisionPass(make_passes, target_cosine, feeds=None | calib_source=None, keep_dtype="bf16")`` plans,
it does not quantize: ``make_passes(kept)`` (the quantize recipe) builds fresh quantization passes that
leave the ``kept`` node names alone; every trial runs them on a copy of the model followed by ``Bf16Pass``
restricted to the kept layers (``kept_passes``).  The pass returns a ``MixedPrecisionPassResult`` whose
``plan`` (``MixedPrecisionPlan``: kept nodes and the dtype they keep, ranking, cosines) is data; the caller
turns it into the final passes with ``kept_passes(make_passes, plan.kept_layers, plan.keep_dtype)``.  The
model itself only gains names for anonymous candidate nodes and the plan's ``maia_onnx.mixed_precision``
metadata.  Trials copy the model through protobuf: meant for models below the 2 GB protobuf limit.
"""

from __future__ import annotations

import glob
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes

from maia_onnx.decode import ort_feeds
from maia_onnx.errors import InvalidOptionError, UnsupportedModelError
from maia_onnx.ortutil import compare, make_inputs, make_session
from maia_onnx.passes.bf16 import Bf16Pass
from maia_onnx.scales import layer_name

PassFactory = Callable[[Sequence[str]], Sequence[onnx_ir.passes.PassBase]]  # kept node names -> passes leaving them out
KEEP_DTYPES = ("bf16", "fp32")

CANDIDATE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


def clone_model(model: ir.Model) -> ir.Model:
    """An independent in-memory copy (weights copied; models under the protobuf limit)."""
    return ir.from_proto(ir.to_proto(model))


def candidate_layers(model: ir.Model, op_types: Sequence[str] = CANDIDATE_OPS) -> list[str]:
    """Names of the main graph's matmul/conv nodes, naming anonymous ones so they can be kept."""
    names = []
    taken = {n.name for n in model.graph if n.name}
    for i, node in enumerate(model.graph):
        if node.op_type not in op_types or node.domain not in ("", "ai.onnx"):
            continue
        if not node.name:
            name, k = f"{node.op_type}_{i}", 1
            while name in taken:
                name, k = f"{node.op_type}_{i}_{k}", k + 1
            node.name = name
            taken.add(name)
        names.append(node.name)
    return names


def _module_names(model: ir.Model) -> dict[str, str]:
    """Node name -> checkpoint module name (``model.layers.0.mlp.down_proj``) where one is known."""
    out = {}
    for node in model.graph:
        if node.name and node.op_type in CANDIDATE_OPS:
            weight = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].is_initializer() else None
            out[node.name] = layer_name(node, weight) or node.name
    return out


def end_to_end_cosine(references: Sequence[Mapping[str, np.ndarray]], model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]]) -> float:
    """Worst output cosine of ``model`` against the FP32 references over all feeds."""
    sess = make_session(model)
    # FP8 outputs (an FP8 KV cache) cannot come back as NumPy: judge the model by its float outputs;
    # float feeds for FP8 inputs are quantised with the graph's own cache scales
    names = [o.name for o in sess.get_outputs() if o.type in _FLOAT_OUTPUTS]
    worst = 1.0
    for ref, f in zip(references, feeds):
        for name, got in zip(names, sess.run_with_ort_values(names, ort_feeds(model, sess, dict(f)))):
            if name in ref:
                worst = min(worst, compare(ref[name], got.numpy())["cosine"])
    return worst


_FLOAT_OUTPUTS = ("tensor(float)", "tensor(float16)", "tensor(double)")


@dataclass
class MixedPrecisionPlan:
    """The per-node precision plan: which layers stay in ``keep_dtype``, why, and the cosines measured."""

    target_cosine: float
    cosine_all_quantized: float
    final_cosine: float
    met: bool
    keep_dtype: str
    kept: list[dict[str, Any]] = field(default_factory=list)
    sensitivities: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0

    @property
    def kept_layers(self) -> list[str]:
        return [k["layer"] for k in self.kept]

    @property
    def node_dtypes(self) -> dict[str, str]:
        """Node name -> the dtype it keeps instead of the quantized format."""
        return {name: self.keep_dtype for name in self.kept_layers}

    def as_dict(self) -> dict[str, Any]:
        return {
            "target_cosine": self.target_cosine,
            "metric": "min output cosine vs FP32",
            "cosine_all_quantized": self.cosine_all_quantized,
            "final_cosine": self.final_cosine,
            "met": self.met,
            "keep_dtype": self.keep_dtype,
            "kept": self.kept,
            "sensitivities": self.sensitivities,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
        }


def search_mixed_precision(
    fp32_model: ir.Model,
    quantize_fn: Callable[[ir.Model, list[str]], ir.Model],
    feeds: Sequence[Mapping[str, np.ndarray]],
    target_cosine: float,
    candidates: Sequence[str] | None = None,
    keep_dtype: str = "bf16",
    progress: Callable[[str], None] | None = None,
) -> MixedPrecisionPlan:
    """Rank layers by sensitivity and keep the fewest most-sensitive ones unquantized to meet ``target_cosine``.

    ``quantize_fn(model_copy, kept_layer_names) -> quantized model`` must leave the named layers out of the
    low-precision format (and may put them in BF16); it gets a fresh copy of ``fp32_model`` every call.
    """
    if not 0 < target_cosine <= 1:
        raise InvalidOptionError(f"--target-cosine must be in (0, 1], got {target_cosine}")
    feeds = list(feeds)
    if not feeds:
        raise InvalidOptionError("mixed-precision search needs at least one input batch (--calib)")
    t0 = time.perf_counter()
    sess = make_session(fp32_model)
    out_names = [o.name for o in sess.get_outputs()]
    references = [dict(zip(out_names, sess.run(out_names, dict(f)))) for f in feeds]
    del sess
    candidates = list(candidates) if candidates is not None else candidate_layers(fp32_model)
    if not candidates:
        raise UnsupportedModelError("no MatMul/Gemm/Conv layers to rank: mixed precision has nothing to choose from")
    evaluations = 0
    cache: dict[tuple[str, ...], float] = {}

    def evaluate(kept: Iterable[str]) -> float:
        nonlocal evaluations
        key = tuple(sorted(kept))
        if key not in cache:
            evaluations += 1
            cache[key] = end_to_end_cosine(references, quantize_fn(clone_model(fp32_model), list(key)), feeds)
        return cache[key]

    say = progress or (lambda msg: None)
    all_quantized = evaluate([])
    result = MixedPrecisionPlan(target_cosine, all_quantized, all_quantized, all_quantized >= target_cosine, keep_dtype)
    if not result.met:
        solo = []
        for i, layer in enumerate(candidates):
            say(f"sensitivity {i + 1}/{len(candidates)}: {layer}")
            solo.append((evaluate([c for c in candidates if c != layer]), layer))
        ranked = sorted(solo, key=lambda s: (s[0], s[1]))  # lowest solo cosine = most sensitive first
        modules = _module_names(fp32_model)
        result.sensitivities = [
            {"rank": r + 1, "layer": layer, "module": modules.get(layer, layer), "solo_cosine": cos, "solo_drop": 1.0 - cos}
            for r, (cos, layer) in enumerate(ranked)
        ]
        order = [layer for _, layer in ranked]

        def meets(k: int) -> bool:
            return evaluate(order[:k]) >= target_cosine

        # doubling, then bisection on the first k that meets the target (cosine grows ~monotonically with k)
        hi = 1
        while hi < len(order) and not meets(hi):
            hi *= 2
        hi = min(hi, len(order))
        if meets(hi):
            lo = hi // 2  # known to fail (or 0)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if meets(mid):
                    hi = mid
                else:
                    lo = mid
            k, result.met = hi, True
        else:
            k, result.met = len(order), False
        result.final_cosine = evaluate(order[:k])
        for s in result.sensitivities[:k]:
            result.kept.append(
                {
                    **s,
                    "reason": (
                        f"rank {s['rank']}/{len(order)} most sensitive: quantized alone the model's cosine is "
                        f"{s['solo_cosine']:.6f}; keeping the top {k} in {keep_dtype.upper()} "
                        + (f"reaches {result.final_cosine:.6f} >= {target_cosine}" if result.met else f"still gives {result.final_cosine:.6f} < {target_cosine}")
                    ),
                }
            )
    result.evaluations = evaluations
    result.seconds = time.perf_counter() - t0
    return result


def exclude_patterns(names: Iterable[str]) -> tuple[str, ...]:
    """fnmatch patterns matching exactly these node names (for a pass's ``exclude``)."""
    return tuple(glob.escape(n) for n in names)


def kept_passes(make_passes: PassFactory, kept: Sequence[str], keep_dtype: str = "bf16") -> list[onnx_ir.passes.PassBase]:
    """The passes that realise a plan: ``make_passes(kept)``, then BF16 on the kept layers (unless kept in FP32)."""
    passes = list(make_passes(list(kept)))
    if kept and keep_dtype == "bf16":
        passes.append(Bf16Pass(nodes=kept))
    return passes


def apply_with_kept(model: ir.Model, make_passes: PassFactory, kept: Sequence[str], keep_dtype: str = "bf16") -> ir.Model:
    """Run ``kept_passes(make_passes, kept, keep_dtype)`` on ``model``."""
    for p in kept_passes(make_passes, kept, keep_dtype):
        model = p(model).model
    return model


@dataclass
class MixedPrecisionPassResult(onnx_ir.passes.PassResult):
    plan: MixedPrecisionPlan | None = None


class MixedPrecisionPass(onnx_ir.passes.InPlacePass):
    """Plan which layers stay in BF16 so that quantizing the rest keeps the output cosine >= ``target_cosine``.

    Args:
        make_passes: kept node names -> fresh quantization passes that leave those nodes alone (the recipe).
        target_cosine: end-to-end goal, worst output cosine against the FP32 model.
        feeds: evaluation batches (list of input dicts); or ``calib_source`` with ``batches(model)``.
        max_batches: batches taken from ``calib_source``.
        keep_dtype: "bf16" (default) or "fp32" for the kept layers.
    """

    def __init__(
        self,
        make_passes: PassFactory,
        target_cosine: float,
        feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
        calib_source: Any = None,
        max_batches: int = 2,
        keep_dtype: str = "bf16",
        progress: Callable[[str], None] | None = None,
    ):
        super().__init__()
        if keep_dtype not in KEEP_DTYPES:
            raise InvalidOptionError(f"keep_dtype {keep_dtype!r}: use one of {', '.join(KEEP_DTYPES)}")
        if not 0 < target_cosine <= 1:
            raise InvalidOptionError(f"--target-cosine must be in (0, 1], got {target_cosine}")
        self.make_passes = make_passes
        self.target_cosine = float(target_cosine)
        self.feeds = list(feeds) if feeds is not None else None
        self.calib_source = calib_source
        self.max_batches = max_batches
        self.keep_dtype = keep_dtype
        self.progress = progress

    def _feeds(self, model: ir.Model) -> list[dict[str, np.ndarray]]:
        if self.feeds is not None:
            return self.feeds
        if self.calib_source is not None:
            out = []
            for batch in self.calib_source.batches(model):
                out.append(dict(batch))
                if len(out) >= self.max_batches:
                    break
            return out
        return [make_inputs(model, seed=1234)]

    def call(self, model: ir.Model) -> MixedPrecisionPassResult:
        feeds = self._feeds(model)
        candidates = candidate_layers(model)

        def quantize(copy_of_model: ir.Model, kept: list[str]) -> ir.Model:
            return apply_with_kept(copy_of_model, self.make_passes, kept, self.keep_dtype)

        plan = search_mixed_precision(model, quantize, feeds, self.target_cosine, candidates, self.keep_dtype, self.progress)
        model.metadata_props["maia_onnx.mixed_precision"] = ",".join(plan.kept_layers)
        return MixedPrecisionPassResult(model, True, plan)  # anonymous candidates got names, the plan its metadata
