"""Real-data inputs (text:FILE) and `eval`: declared inputs built from text, perplexity equal to PyTorch's,
encoder embedding agreement, padding never counted."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
import transformers
from textdata import SENTENCES, tiny_bert, tiny_llama, write_text

from maia_onnx.data import Feeds, TextSource, make_data_source, read_texts, text_feeds
from maia_onnx.errors import UserError
from maia_onnx.evaluate import evaluate_models
from maia_onnx.export import export_model

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalhf")
    out = {}
    for name, build in (("llama", tiny_llama), ("bert", tiny_bert)):
        hf_dir = build(root / name)
        out[name] = (hf_dir, export_model(f"hf:{hf_dir}", root / f"{name}.onnx").path)
    out["text"] = write_text(root / "data.txt")
    return out


def _model(path):
    return ir.load(str(path))


def test_text_feeds_build_the_declared_inputs(checkpoints):
    hf_dir, onnx_path = checkpoints["llama"]
    model = _model(onnx_path)
    source = TextSource(checkpoints["text"], hf_dir, seq_len=16, batch_size=3)
    batch = next(iter(source.batches(model)))
    declared = {v.name for v in model.graph.inputs}
    assert set(batch) == declared
    ids = batch["input_ids"]
    assert ids.shape[0] == 3 and ids.dtype == np.int64
    for name in declared - {"input_ids"}:
        assert batch[name].shape[2] == 0 and batch[name].shape[0] == 3  # empty past: [batch, kv_heads, 0, head_dim]
    # padded positions are marked invalid; real ones valid
    lengths = [len(s.split()) for s in SENTENCES[:3]]
    assert batch.valid.sum(1).tolist() == lengths

    hf_dir, onnx_path = checkpoints["bert"]
    bert = _model(onnx_path)
    batch = next(iter(TextSource(checkpoints["text"], hf_dir, seq_len=16, batch_size=2).batches(bert)))
    assert set(batch) == {v.name for v in bert.graph.inputs}
    assert set(np.unique(batch["attention_mask"])) <= {0, 1}
    assert (batch["attention_mask"].astype(bool) == batch.valid).all()


def test_jsonl_and_bad_text_files(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"text": "c"}) + "\n")
    assert read_texts(f) == ["a b", "c"]
    f.write_text(json.dumps({"txt": "a"}) + "\n")
    with pytest.raises(UserError, match="'text' field"):
        read_texts(f)
    with pytest.raises(UserError, match="not found"):
        make_data_source(f"text:{tmp_path / 'missing.txt'}")


def test_eval_perplexity_equals_pytorch(checkpoints):
    hf_dir, onnx_path = checkpoints["llama"]
    model = _model(onnx_path)
    torch_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in SENTENCES:
            ids = torch.tensor([tokenizer(s)["input_ids"]])
            logits = torch_model(ids).logits.double()
            logp = torch.log_softmax(logits[0, :-1], -1)
            nll -= logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum().item()
            count += ids.shape[1] - 1
    expected = float(np.exp(nll / count))
    # batched with padding: padded positions must not count
    report = evaluate_models(model, model, TextSource(checkpoints["text"], hf_dir, seq_len=32, batch_size=4).batches(model))
    metrics = report["task_metrics"]
    assert report["task"] == "decoder"
    assert metrics["tokens"] == count
    assert metrics["perplexity_ref"] == pytest.approx(expected, rel=1e-4)
    assert metrics["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert metrics["kl_per_token"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["top1_agree"] == 1.0


def test_eval_encoder_embeddings_and_a_perturbed_model(checkpoints):
    hf_dir, onnx_path = checkpoints["bert"]
    ref = _model(onnx_path)
    source = TextSource(checkpoints["text"], hf_dir, seq_len=16, batch_size=2)
    same = evaluate_models(ref, ref, source.batches(ref))
    assert same["task"] == "encoder"
    assert same["task_metrics"]["embedding_cosine_min"] == pytest.approx(1.0, abs=1e-9)
    assert same["task_metrics"]["neighbour_agree"] == 1.0
    assert same["task_metrics"]["samples"] == len(SENTENCES)
    # perturb one weight: the embeddings move, and eval sees it
    perturbed = _model(onnx_path)
    weight = next(v for name, v in perturbed.graph.initializers.items() if "intermediate" in name and len(v.shape) == 2)
    arr = weight.const_value.numpy()
    weight.const_value = ir.tensor(arr + np.random.default_rng(0).normal(0, 2.0, arr.shape).astype(np.float32), name=weight.name)
    moved = evaluate_models(perturbed, ref, source.batches(ref))
    assert moved["task_metrics"]["embedding_cosine_min"] < 0.999
    assert moved["summary"]["min_output_cosine"] < 0.999


def test_padding_content_never_reaches_metrics(checkpoints):
    hf_dir, onnx_path = checkpoints["llama"]
    model = _model(onnx_path)
    batch = next(iter(TextSource(checkpoints["text"], hf_dir, seq_len=32, batch_size=6).batches(model)))
    garbage = Feeds(dict(batch), batch.valid)
    ids = garbage["input_ids"].copy()
    ids[~batch.valid] = np.random.default_rng(1).integers(3, 20, size=int((~batch.valid).sum()))
    garbage["input_ids"] = ids
    a = evaluate_models(model, model, [batch])["task_metrics"]
    b = evaluate_models(model, model, [garbage])["task_metrics"]
    assert a["perplexity_ref"] == pytest.approx(b["perplexity_ref"], rel=1e-9)
    assert a["tokens"] == b["tokens"]
