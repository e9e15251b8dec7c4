"""Partition directories, one home: schema and reader (``manifest``), writer, the partition API (``plan``),
re-sharding and safetensors checkpoints.

The manifest names are imported here eagerly (``manifest`` is light and is what the runtime needs); the rest
load on first use, so ``import maia_onnx.partition.manifest`` never pulls in the writer or the passes.
(``maia_onnx.partition.reshard`` is the submodule; its function is ``maia_onnx.partition.reshard.reshard``.)
"""

from __future__ import annotations

import importlib

from maia_onnx.partition.manifest import (
    COLLECTIVE_DOMAIN,
    COLLECTIVE_OPS,
    FORMAT,
    MANIFEST,
    SOURCE_GRAPH,
    VERSION,
    Manifest,
    PartitionError,
    check_source,
    global_rank,
    io_spec,
    is_partition_dir,
    load_rank_model,
    new_manifest,
    rank_file_name,
    read_manifest,
    validate_partition,
)

# public name -> submodule that defines it (imported when first asked for)
_LAZY = {
    "PartitionWriter": "writer",
    "write_model_streaming": "writer",
    "write_partition": "writer",
    "write_source_graph": "writer",
    "merge_tp_fragments": "plan",
    "partition_file": "plan",
    "partition_model": "plan",
    "pipeline_manifest": "plan",
    "source_fingerprint": "plan",
    "summary_rows": "plan",
    "rebuild_source": "reshard",
    "reshard_directory": "reshard",
    "stage_report": "reshard",
    "CHECKPOINT_INDEX": "checkpoint",
    "ShardFile": "checkpoint",
    "load_checkpoint": "checkpoint",
    "partition_shards": "checkpoint",
    "read_safetensors": "checkpoint",
    "read_safetensors_header": "checkpoint",
    "save_checkpoint": "checkpoint",
    "swap_weights": "checkpoint",
    "write_safetensors": "checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted([
    "COLLECTIVE_DOMAIN", "COLLECTIVE_OPS", "FORMAT", "MANIFEST", "SOURCE_GRAPH", "VERSION", "Manifest", "PartitionError",
    "check_source", "global_rank", "io_spec", "is_partition_dir", "load_rank_model", "new_manifest", "rank_file_name",
    "read_manifest", "validate_partition", *_LAZY,
])
