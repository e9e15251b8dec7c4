"""`maia-onnx analyze`: per-op FLOPs/bytes/roofline and the TP x PP interconnect what-if (weights never read).

``workload`` turns a model into OpCosts for one phase, ``core`` prices models and partition directories,
``render`` writes the text table and the PNG breakdown.
"""

from maia_onnx.analyze.core import (
    DEFAULT_PPS,
    DEFAULT_TPS,
    PHASES,
    analyze,
    analyze_model,
    analyze_partition,
    op_rows,
    phase_summary,
    stage_sends,
)
from maia_onnx.analyze.render import plot_breakdown, render_text
from maia_onnx.analyze.workload import build_workload, graph_costs, load_graph, model_structure

__all__ = [
    "DEFAULT_PPS", "DEFAULT_TPS", "PHASES", "analyze", "analyze_model", "analyze_partition", "build_workload",
    "graph_costs", "load_graph", "model_structure", "op_rows", "phase_summary", "plot_breakdown", "render_text",
    "stage_sends",
]
