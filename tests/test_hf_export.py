"""hf:DIR export of tiny Hugging Face checkpoints (Llama, GPT-2 decoders with KV cache; BERT encoder) vs PyTorch:
I/O names, weight names and layout, KV-cache decode, padded encoder inputs, directory errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

transformers = pytest.importorskip("transformers")

from maia_onnx.cli import main  # noqa: E402
from maia_onnx.errors import UserError  # noqa: E402
from maia_onnx.export import export_model, read_config  # noqa: E402
from maia_onnx.ortutil import compare, make_session  # noqa: E402

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def hf_dirs(zoo_dir):
    """The session's tiny zoo checkpoints (tests/zoo.py), shared with the model-zoo matrix."""
    return {name: zoo_dir(name) for name in ("llama", "gpt2", "bert")}


@pytest.fixture(scope="module")
def hf_exports(zoo_export):
    return zoo_export


def _load_torch(directory, cls):
    return cls.from_pretrained(directory, local_files_only=True, attn_implementation="eager").eval()


@pytest.mark.parametrize("name,cls,kv_heads,head_dim", [
    ("llama", "LlamaForCausalLM", 2, 8),
    ("gpt2", "GPT2LMHeadModel", 4, 8),
])
def test_decoder_prefill_and_two_decode_steps_match_pytorch(hf_dirs, hf_exports, name, cls, kv_heads, head_dim):
    result = hf_exports(name)
    assert result.max_rel <= REL_TOL
    model = ir.load(result.path)
    cfg = read_config(model)
    assert (cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]) == (2, kv_heads, head_dim)
    assert [v.name for v in model.graph.inputs] == ["input_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert [v.name for v in model.graph.outputs][:3] == ["logits", "present.0.key", "present.0.value"]

    sess = make_session(result.path)
    out_names = [o.name for o in sess.get_outputs()]
    ids = np.random.default_rng(1).integers(0, 128, size=(2, 7)).astype(np.int64)
    past = {f"past_key_values.{i}.{k}": np.zeros((2, kv_heads, 0, head_dim), np.float32) for i in range(2) for k in ("key", "value")}
    steps = []
    for start, stop in [(0, 5), (5, 6), (6, 7)]:  # prefill, then two single-token decode steps
        outs = dict(zip(out_names, sess.run(out_names, {"input_ids": ids[:, start:stop], **past})))
        steps.append(outs["logits"])
        past = {f"past_key_values.{i}.{k}": outs[f"present.{i}.{k}"] for i in range(2) for k in ("key", "value")}

    reference = _load_torch(hf_dirs[name], getattr(transformers, cls))
    with torch.no_grad():
        ref = reference(input_ids=torch.from_numpy(ids), use_cache=True)
    err = compare(ref.logits.numpy(), np.concatenate(steps, axis=1))
    assert err["max_rel"] <= REL_TOL, err
    ref_k = ref.past_key_values.layers[1].keys.numpy()
    assert ref_k.shape == past["past_key_values.1.key"].shape == (2, kv_heads, 7, head_dim)
    assert compare(ref_k, past["past_key_values.1.key"])["max_rel"] <= REL_TOL


def test_decoder_weight_names_match_the_checkpoint(hf_dirs, hf_exports):
    model = ir.load(hf_exports("llama").path)
    weights = {n.inputs[1].name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].name in model.graph.initializers}
    assert "model.layers.0.self_attn.q_proj.weight" in weights and "lm_head.weight" in weights
    reference = _load_torch(hf_dirs["llama"], transformers.LlamaForCausalLM)
    q = reference.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(model.graph.initializers["model.layers.0.self_attn.q_proj.weight"].const_value.numpy(), q.T)
    gpt2 = ir.load(hf_exports("gpt2").path)
    assert "transformer.h.0.attn.c_attn.weight" in gpt2.graph.initializers
    # GPT-2 ties lm_head to wte: the Gather keeps the embedding name, the head MatMul gets lm_head.weight [in, out]
    head = [n for n in gpt2.graph if n.op_type == "MatMul" and n.inputs[1].name == "lm_head.weight"]
    assert len(head) == 1 and list(head[0].inputs[1].shape) == [32, 128]
    gathers = [n for n in gpt2.graph if n.op_type == "Gather" and n.inputs[0].name == "transformer.wte.weight"]
    assert len(gathers) == 1


def test_encoder_matches_pytorch_with_padding(hf_dirs, hf_exports):
    result = hf_exports("bert")
    assert list(result.inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    assert list(result.outputs) == ["last_hidden_state", "pooler_output"]
    ids = np.random.default_rng(2).integers(0, 128, size=(3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    types = np.zeros_like(ids)
    sess = make_session(result.path)
    hidden, pooled = sess.run(["last_hidden_state", "pooler_output"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    reference = _load_torch(hf_dirs["bert"], transformers.BertModel)
    with torch.no_grad():
        ref = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), token_type_ids=torch.from_numpy(types))
    assert compare(ref.last_hidden_state.numpy(), hidden)["max_rel"] <= REL_TOL
    assert compare(ref.pooler_output.numpy(), pooled)["max_rel"] <= REL_TOL


def test_hf_dir_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export_model(f"hf:{tmp_path / 'missing'}", tmp_path / "o.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        export_model(f"hf:{tmp_path / 'empty'}", tmp_path / "o.onnx")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="no weights"):
        export_model(f"hf:{tmp_path / 'noweights'}", tmp_path / "o.onnx")


def test_hf_cli_missing_directory_one_line(tmp_path, capsys):
    rc = main(["export", f"hf:{tmp_path / 'nope'}", "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err
