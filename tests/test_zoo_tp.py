"""TP2 over every architecture of the model zoo: the shards are really split (collectives, each rank holding less than
the whole model) and equal the unsharded model (the partition's own self-check, FP32 rel 1e-5, re-checked here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from maia_onnx.inputs import make_inputs
from maia_onnx.ortutil import run_model
from maia_onnx.partition import partition_file
from maia_onnx.runtime.executor import run_partition

ARCHITECTURES = ["llama", "qwen2", "qwen3_moe", "mixtral", "phi3", "falcon", "gemma2", "gpt2", "bert", "vit", "t5",
                 "whisper", "unet", "vae"]
REL_TOL = 1e-5


def _graphs(path: Path) -> list[Path]:
    return sorted(path.glob("*.onnx")) if path.is_dir() else [path]


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_tp2_shards_equal_the_unsharded_model(name, zoo_export, tmp_path):
    export = zoo_export(name)
    for graph in _graphs(Path(export.path)):
        out = tmp_path / f"{graph.stem}_tp2"
        manifest = partition_file(graph, out, tp=2)
        assert manifest.verification.verified is True
        assert manifest.verification.max_rel <= REL_TOL, (graph.name, manifest.verification.as_dict())
        assert manifest.collectives, f"{graph.name}: nothing was split"
        source_bytes = _weight_bytes(ir.load(str(graph)))
        for rank in manifest.ranks:
            shard = ir.load(str(out / rank["file"]))
            assert _weight_bytes(shard) < 0.9 * source_bytes, (graph.name, rank["file"])
        # re-check independently of the partition's own check, on other inputs
        model = ir.load(str(graph))
        feeds = make_inputs(model, seed=7, dims={"batch": 1, "seq": 5, "past": 2})
        reference = run_model(str(graph), feeds)
        sharded = run_partition(out, feeds)
        for key, ref in reference.items():
            ref = np.asarray(ref, np.float64)
            err = np.abs(ref - np.asarray(sharded[key], np.float64)).max() / (np.abs(ref).max() or 1.0)
            assert err <= REL_TOL, (graph.name, key, err, json.dumps(manifest.verification.as_dict()))
