"""The cross-model TP/PP matrix: partitioned outputs equal the unsharded model (FP32 1e-5 rel, FP8 1e-3).

Models: llama-tiny, Hugging Face Llama and GPT-2 decoders from tiny configs, unet-tiny, yolo-tiny.
Layouts: TP 2 and 4, PP 2 and 3, TP2 x PP2, written with ``partition_model`` and run by the in-process
executor. Decoders run a prefill and two decode steps through their KV cache, each path feeding back
its own ``present`` tensors.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from maia_onnx.io import load_model
from maia_onnx.ortutil import compare, make_inputs, run_model
from maia_onnx.partition import partition_model
from maia_onnx.runtime.executor import PartitionExecutor

LAYOUTS = [(2, 1), (4, 1), (1, 2), (1, 3), (2, 2)]
FP32_REL = 1e-5
FP8_REL = 1e-3
HF_VOCAB = 128


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """hf-llama / hf-gpt2: tiny random Hugging Face decoders saved with save_pretrained, exported once."""
    transformers = pytest.importorskip("transformers")
    import torch

    from maia_onnx.export import export_model

    root = tmp_path_factory.mktemp("hf")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            torch.manual_seed(0)
            if name == "hf-llama":
                config = transformers.LlamaConfig(
                    vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                )
                module = transformers.LlamaForCausalLM(config)
            else:
                config = transformers.GPT2Config(vocab_size=HF_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                 bos_token_id=0, eos_token_id=0)
                module = transformers.GPT2LMHeadModel(config)
            module.save_pretrained(root / name)
            out = root / f"{name}.onnx"
            export_model(f"hf:{root / name}", out)
            cache[name] = out
        return cache[name]

    return get


@pytest.fixture(scope="session")
def model_path(exported_models, hf_models):
    def get(name: str) -> Path:
        if name.startswith("hf-"):
            return hf_models(name)
        return exported_models(name)

    return get


@pytest.fixture(scope="session")
def llama_fp8(exported_models, tmp_path_factory) -> Path:
    from maia_onnx.quantize import quantize_model

    out = tmp_path_factory.mktemp("fp8") / "llama-fp8.onnx"
    with warnings.catch_warnings():  # calibrating on random inputs warns; irrelevant for partition parity
        warnings.simplefilter("ignore")
        quantize_model(exported_models("llama-tiny"), out, format="fp8-e4m3", show_progress=False, evaluate=False)
    return out


def _is_decoder(model) -> bool:
    return any(v.name.startswith("past_key_values.") for v in model.graph.inputs)


def _assert_close(reference: dict, got: dict, tol: float, where: str) -> None:
    assert set(reference) == set(got), where
    for name, ref in reference.items():
        assert got[name].shape == ref.shape, f"{where} {name}"
        err = compare(ref, got[name])["max_rel"]
        assert err <= tol, f"{where}: {name} max_rel {err:.3g} > {tol}"


def _check_layout(path: Path, tp: int, pp: int, out_dir: Path, tol: float) -> None:
    model = load_model(path)
    decoder = _is_decoder(model)
    manifest, plan = partition_model(load_model(path), out_dir, tp=tp, pp=pp)
    assert (manifest.tp, manifest.pp) == (tp, pp)
    assert len(plan.loads) == pp and all(load > 0 for load in plan.loads)
    executor = PartitionExecutor(out_dir)
    if not decoder:
        feeds = make_inputs(model, seed=1, dims={"batch": 2})
        _assert_close(run_model(model, feeds), executor.run(feeds), tol, f"tp{tp} pp{pp}")
        if pp > 1:
            _assert_close(run_model(model, feeds), executor.run(feeds, microbatches=2), tol, f"tp{tp} pp{pp} microbatched")
        return
    # prefill (empty cache), then decode steps of one token through each path's own KV cache
    feeds = make_inputs(model, seed=1, dims={"batch": 2, "seq": 5, "past": 0}, int_high=HF_VOCAB)
    ref_feeds, part_feeds = dict(feeds), dict(feeds)
    rng = np.random.default_rng(2)
    for step in range(3):
        reference = run_model(model, ref_feeds)
        got = executor.run(part_feeds, microbatches=2 if (pp > 1 and step == 0) else 1)
        _assert_close(reference, got, tol, f"tp{tp} pp{pp} step {step}")
        token = rng.integers(0, HF_VOCAB, size=(2, 1)).astype(np.int64)
        ref_feeds = {"input_ids": token}
        part_feeds = {"input_ids": token}
        for name in feeds:
            if name.startswith("past_key_values."):
                present = "present." + name[len("past_key_values."):]
                ref_feeds[name] = reference[present]
                part_feeds[name] = got[present]
    assert ref_feeds["past_key_values.0.key"].shape[2] == 5 + 2


SLOW = {("unet-tiny", 4, 1)}  # the one combination that takes tens of seconds on 2 cores: run with -m slow
MODELS = ["llama-tiny", "hf-llama", "hf-gpt2", "unet-tiny", "yolo-tiny"]
MATRIX = [
    pytest.param(name, tp, pp, id=f"{name}-tp{tp}pp{pp}", marks=[pytest.mark.slow] if (name, tp, pp) in SLOW else [])
    for name in MODELS
    for tp, pp in LAYOUTS
]


@pytest.mark.parametrize("name,tp,pp", MATRIX)
def test_partition_matches_unsharded(name, tp, pp, model_path, tmp_path):
    _check_layout(model_path(name), tp, pp, tmp_path / "part", FP32_REL)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2pp2"])
def test_fp8_llama_partition_matches_fp8_model(llama_fp8, tp, pp, tmp_path):
    from ml_dtypes import float8_e4m3fn

    model = load_model(llama_fp8)
    assert any(v.const_value is not None and v.const_value.dtype.name == "FLOAT8E4M3FN" for v in model.graph.initializers.values())
    _check_layout(llama_fp8, tp, pp, tmp_path / "part", FP8_REL)
    # the shards keep real 1-byte FP8 weights
    shard = load_model(tmp_path / "part" / "rank0_stage0.onnx")
    fp8 = [v for v in shard.graph.initializers.values() if v.const_value.dtype.name == "FLOAT8E4M3FN"]
    assert fp8 and all(v.const_value.numpy().dtype == float8_e4m3fn for v in fp8)
