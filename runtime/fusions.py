"""Compile-time graph cleanup and kernel fusion for Maia device partitions, on onnxscript's optimizer and rewriter.

Three steps, each exact or checked:

* ``fold_host_arithmetic``: onnxscript constant folding restricted to index arithmetic (int64/int32/bool outputs:
  shapes, positions, masks), so symbolic dims stay symbolic and no weight or QDQ node is ever folded;
  then common-subexpression elimination (the exporter repeats identical shape code and even identical GEMMs).
* ``fuse_device_partitions``: rewrite rules (runtime/fusions_rules.py) turn what the device runs as one kernel
  into one ONNX op (opset-24 ``Attention``, ``RMSNormalization``, ``LayerNormalization``, ``RotaryEmbedding``,
  ``Swish``, ``Gelu``), only inside one device partition. Every rule's check says why it refused a match; the
  common checks here refuse a match that would drop a quantization point (a QuantizeLinear/DequantizeLinear
  inside the fused kernel) and one whose fused kernel is not bit-identical to the unfused ops in ONNX Runtime
  while its output feeds a QuantizeLinear (a rounding change there could flip FP8 values).
* The caller (runtime/compile.py) recomputes the placement afterwards and verifies the compiled model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer, version_converter
from onnxscript.rewriter import pattern

from maia_onnx.runtime.capability import Placement

FUSION_OPSET = 24  # Attention/RMSNormalization/RotaryEmbedding (23), Swish (24); ONNX Runtime >= 1.23 runs them on CPU
MIN_FUSION_OPSET = 18  # older graphs (axes as attributes, legacy Dropout...) are compiled as they are, never converted
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# ops a value crosses unchanged in value on its way to a QuantizeLinear (layout and copies only)
_PASS_THROUGH = frozenset({"Reshape", "Transpose", "Concat", "Slice", "Split", "Squeeze", "Unsqueeze", "Expand",
                           "Identity", "Flatten", "Gather", "Tile"})
_INDEX_DTYPES = frozenset({ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL})


def fold_host_arithmetic(model: ir.Model) -> int:
    """Fold constant index arithmetic (never floats, weights or QDQ) and merge repeated subexpressions; returns folded nodes.

    Graphs older than MIN_FUSION_OPSET are left alone (onnxscript's folding writes newer-opset forms into them).
    """
    opset = _onnx_opset(model)
    if opset is not None and opset < MIN_FUSION_OPSET:
        return 0
    def computing() -> int:
        return sum(1 for n in model.graph if n.op_type != "Constant")

    def should_fold(node: ir.Node) -> bool | None:
        if node.op_type in QDQ_OPS or not node.outputs:
            return False
        if node.op_type in ("Shape", "Size") or all(v.dtype in _INDEX_DTYPES for v in node.outputs):
            return None  # onnxscript's default rules (size limits) decide
        return False

    before = computing()
    optimizer.fold_constants(model, should_fold=should_fold)
    common_passes.CommonSubexpressionEliminationPass()(model)
    common_passes.RemoveUnusedNodesPass()(model)
    return before - computing()


@dataclass
class FusionStats:
    """One rule's outcome: how often it fused, and every refusal's reason with its count."""

    rule: str
    op: str
    exact: bool
    applied: int = 0
    refused: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {"rule": self.rule, "op": self.op, "exact": self.exact, "applied": self.applied,
                "refused": sum(self.refused.values()), "reasons": dict(sorted(self.refused.items()))}


@dataclass
class FusionReport:
    rules: list[FusionStats] = field(default_factory=list)
    folded_nodes: int = 0
    opset: int | None = None  # the default-domain opset the model was converted to for the fused ops, if any
    skipped: str | None = None  # why no rule ran at all

    @property
    def applied(self) -> int:
        return sum(s.applied for s in self.rules)

    def to_dict(self) -> dict:
        return {"folded_nodes": self.folded_nodes, "opset": self.opset, "applied": self.applied, "skipped": self.skipped,
                "rules": [s.to_dict() for s in self.rules]}


def _feeds_quantize(values: Iterable[ir.Value], depth: int = 8) -> ir.Node | None:
    """The first QuantizeLinear ``values`` reach through layout-only ops, else None."""
    frontier = list(values)
    seen: set[int] = set()
    for _ in range(depth):
        nxt = []
        for value in frontier:
            for consumer, _ in value.uses():
                if id(consumer) in seen:
                    continue
                seen.add(id(consumer))
                if consumer.op_type == "QuantizeLinear" and consumer.domain in ("", "ai.onnx"):
                    return consumer
                if consumer.op_type in _PASS_THROUGH:
                    nxt.extend(consumer.outputs)
        frontier = nxt
    return None


class FusionRule(pattern.RewriteRuleClassBase):
    """A fusion: ``pattern`` (onnxscript), ``fused_check`` (None or the reason it refuses), ``rewrite``.

    ``op`` is the fused op, ``exact`` whether ONNX Runtime's kernel for it is bit-identical to the unfused ops
    (tests/test_compile_quality.py holds every rule to its claim). The driver sets ``partition_of`` (id(node) ->
    device partition) before applying the rule.
    """

    op = ""
    exact = False

    def __init__(self, name: str | None = None):
        super().__init__(name or type(self).__name__, remove_nodes=True)
        self.partition_of: dict[int, int] = {}
        self.stats = FusionStats(self.name, self.op, self.exact)
        self._refused_roots: set[int] = set()

    def fused_check(self, context, **bindings) -> str | None:
        return None

    def _refuse(self, context, reason: str) -> pattern.MatchResult:
        if id(context.root) not in self._refused_roots:
            self._refused_roots.add(id(context.root))
            self.stats.refused[reason] += 1
        return pattern.MatchResult().fail(reason)

    def check(self, context, **bindings) -> pattern.MatchResult:
        if not isinstance(context.graph_or_function, ir.Graph):
            return pattern.MatchResult().fail("inside a local function (runs as one op)")
        nodes = list(context.nodes)
        parts = {self.partition_of.get(id(n)) for n in nodes}
        if None in parts:
            return self._refuse(context, "matched nodes run on the host (fusions stay inside device partitions)")
        if len(parts) > 1:
            return self._refuse(context, "matched nodes span device partitions")
        qdq = sorted((n for n in nodes if n.op_type in QDQ_OPS), key=lambda n: n.op_type != "QuantizeLinear")
        if qdq:
            return self._refuse(context, f"would drop a quantization point ({qdq[0].op_type} inside the fused {self.op})")
        reason = self.fused_check(context, **bindings)
        if reason:
            return self._refuse(context, reason)
        if not self.exact:
            quant = _feeds_quantize(context.output_values)
            if quant is not None:
                return self._refuse(context, f"{self.op} is not bit-identical to the unfused ops and its output feeds a "
                                             "QuantizeLinear (the quantized values could change)")
        return pattern.MatchResult()


def _partition_map(model: ir.Model, placement: Placement) -> dict[int, int]:
    nodes = list(model.graph)
    return {id(nodes[p.index]): p.partition for p in placement.nodes if p.partition is not None}


def _onnx_opset(model: ir.Model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def _convert_opset(model: ir.Model) -> int | None:
    """Bring the default-domain opset to FUSION_OPSET (the fused ops need it); returns the new opset or None."""
    current = _onnx_opset(model)
    if current is None or current >= FUSION_OPSET:
        return None
    # The converter inlines local functions first, which would expand maia.MxFakeQuant (one device op) into dozens
    # of primitive ops: the functions step aside and keep their own opset imports (ONNX Runtime accepts that).
    functions = dict(model.functions)
    model.functions.clear()
    try:
        version_converter.convert_version(model, FUSION_OPSET)
    finally:
        model.functions.update(functions)
    return FUSION_OPSET


def fuse_device_partitions(model: ir.Model, placement: Placement, rules: Sequence[FusionRule] | None = None) -> FusionReport:
    """Apply ``rules`` (default: runtime/fusions_rules.default_rules()) inside the device partitions of ``placement``.

    ``placement`` must describe ``model`` as it is now (node order included). The model is modified in place;
    the caller recomputes the placement.
    """
    from maia_onnx.runtime.fusions_rules import default_rules

    rules = list(default_rules() if rules is None else rules)
    report = FusionReport(rules=[r.stats for r in rules])
    if not placement.partitions or not rules:
        return report
    opset = _onnx_opset(model)
    if opset is not None and opset < MIN_FUSION_OPSET:
        report.skipped = f"opset {opset} < {MIN_FUSION_OPSET}: the graph is compiled as it is"
        return report
    partition_of = _partition_map(model, placement)
    for rule in rules:
        rule.partition_of = partition_of
        rewrite = pattern.RewriteRule(rule.pattern, rule.rewrite, rule.check, name=rule.name, remove_nodes=True)
        rule.stats.applied += pattern.RewriteRuleSet([rewrite]).apply_to_model(model)
    if report.applied:  # the fused ops are opset 23/24: only a model that gained one changes its opset
        report.opset = _convert_opset(model)
    return report


def fusion_rows(report: FusionReport) -> list[dict]:
    """Rows for a terminal table: one per rule that matched, one per refusal reason."""
    rows = []
    for stats in report.rules:
        if not stats.applied and not stats.refused:
            continue
        rows.append({"rule": stats.rule, "op": stats.op, "applied": stats.applied,
                     "refused": sum(stats.refused.values()), "reason": ""})
        rows += [{"rule": "", "op": "", "applied": "", "refused": n, "reason": reason} for reason, n in sorted(stats.refused.items())]
    return rows
