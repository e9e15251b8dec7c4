"""Tensor parallelism: rewrite one ONNX model into ``tp`` rank models (Megatron layout) with collectives.

The layout is found structurally by propagating a *sharding state* through the graph in topological order
(never from tensor names):

* a MatMul/Gemm/Conv whose activation is replicated and whose weight is a constant (initializer, possibly
  behind Transpose / Cast / DequantizeLinear) becomes **column-parallel**: its output features/channels are
  split, and per-channel / per-block quantization scales are sliced with the weight;
* the split flows through elementwise ops, RoPE, Reshape/Transpose/Expand to heads, attention MatMuls and
  Softmax; Reshape/Expand shape constants that encode head counts or hidden sizes are rewritten per rank;
* a weight MatMul/Gemm/Conv whose input is split on its contraction axis becomes **row-parallel**: it takes
  the matching rows of the weight and is followed by one ``com.microsoft`` ``AllReduce`` (a bias is kept on
  rank 0 only), which closes the chain before the residual Add;
* ``Gather`` embeddings are **vocab-parallel** (offset, mask, look up, AllReduce); the LM head is column
  parallel and its logits are collected by an ``AllGather`` (``axis`` = vocab);
* grouped-query attention: K/V projections are split when their head count divides by ``tp``; otherwise the
  reshape to heads fails to divide, the projection is *demoted* to replicated and the planner re-runs, so
  every rank computes all KV heads and slices the heads its queries use;
* a KV-cache graph input concatenated with a split K/V is itself split (each rank holds its heads' cache);
  the matching ``present`` output stays split and the manifest says how to reassemble it;
* a row-parallel output is a *partial sum* that flows through linear ops (reshapes, a scale, a top-k sum, the
  sum of parallel attention + MLP) and is AllReduced once, where it meets anything else (``partial``);
* fused projections (GPT-2/Phi3/Falcon Q|K|V, gate|up) are cut block by block, each rank's fused weight
  ``[q_r | k_r | v_r]``; a block whose heads do not divide (Falcon's one K/V head) is held by every rank
  (``fused``); no AllGather;
* MoE experts looked up from stacked tables (``batched_mm`` exports) are split per expert (gate|up by columns,
  down by rows, one AllReduce per block) or, with ``ep``, placed whole on ranks; the router stays
  replicated (``moe``);
* the shape of a split tensor reads as the unsharded one, so shapes computed at run time (diffusers, T5) hold
  the source graph's values; Reshape/Expand targets are cut per rank where they meet the split tensor;
* ops that cannot work on a split tensor (GroupNorm over split channels, a reduction over the split axis,
  Concat along it, ...) get an ``AllGather`` in front (conv nets: output-channel split with matching gathers).

``split_model(model, tp)`` returns the rank models plus the manifest fragment the partition writer and the
pipeline pass consume; ``TensorParallelPass(tp, rank)`` is the same rewrite as an onnx_ir pass, returning a
``TensorParallelResult`` (the plan, the collectives, this rank's bytes). ``plan(model, tp)`` alone says what
would split and why the rest does not (``Plan.refusals``, ``Plan.reason``).
Weights are sliced lazily (``ir.LazyTensor`` over the memory-mapped source), so nothing is read until a
rank file is written, one tensor at a time.

Modules, one job each: ``shapes`` (probe shapes), ``slices`` (lazy weight slices), ``layout`` (split state,
refusals, manifest fragment), ``handlers`` (weight ops: column/row parallel, vocab-parallel embedding, conv
channels), ``flow`` (ops a split passes through, reshapes to heads included), ``partial`` (ops a partial sum
passes through), ``fused`` (fused projections cut by blocks), ``moe`` (experts and router), ``rewriter`` (one
rank's walk), ``planner`` (demotion rounds, refusal reasons), ``pass_`` (the entry points).
"""

from .handlers import SOURCE_HANDLERS, SPLIT_HANDLERS
from .layout import COLLECTIVE_DOMAIN, Refusal, Split, TpFragment
from .partial import PARTIAL_HANDLERS
from .pass_ import TensorParallelPass, TensorParallelResult, split_model
from .planner import Plan, plan, rewrite_rank
from .shapes import PROBE_DIMS, infer_full_shapes, probe_dims
from .slices import SlicedTensor, SourceCache, lazy_slice, shard_ranges

__all__ = [
    "COLLECTIVE_DOMAIN", "PARTIAL_HANDLERS", "PROBE_DIMS", "SOURCE_HANDLERS", "SPLIT_HANDLERS", "Plan", "Refusal", "SlicedTensor",
    "SourceCache", "Split", "TensorParallelPass", "TensorParallelResult", "TpFragment", "infer_full_shapes",
    "lazy_slice", "plan", "probe_dims", "rewrite_rank", "shard_ranges", "split_model",
]
