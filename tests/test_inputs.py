"""The input synthesizer (maia_onnx.inputs): integer inputs stay inside the tables they index (through casts,
reshapes and constant offsets), masks are {0, 1} with a one at the first position, images lie in [0, 1);
random calibration draws the same way; ``run --random`` on an exported tiny BERT succeeds and equals PyTorch,
and inputs ORT refuses are a one-line user error, never an internal one."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from maia_onnx.calib import make_source
from maia_onnx.cli import main
from maia_onnx.inputs import index_range, is_mask, make_inputs
from maia_onnx.ortutil import compare, run_model


def _model(text: str, inits: dict[str, np.ndarray]) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in inits.items())
    return ir.serde.deserialize_model(proto)


@pytest.fixture()
def embedder() -> ir.Model:
    """ids -> word table (50 rows); types (int32, cast) -> 2-row table; pos + 2 -> 12-row table (OPT-style
    offset); mask gates the sum through Where; pixels [N,3,4,4] pass through."""
    rng = np.random.default_rng(0)
    return _model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (int64[b,s] ids, int32[b,s] types, int64[b,s] pos, int64[b,s] mask, float[b,3,4,4] pixels)
          => (float[b,s,4] y, float[b,3,4,4] p) {
          w = Gather(words, ids)
          t64 = Cast<to=7>(types)
          tr = Reshape(t64, shape)
          t = Gather(token_types, tr)
          q = Add(pos, two)
          e = Gather(positions, q)
          a = Add(w, t)
          sum = Add(a, e)
          m = Cast<to=9>(mask)
          mu = Unsqueeze(m, axes)
          y = Where(mu, sum, zero)
          p = Identity(pixels)
        }""", {"words": rng.standard_normal((50, 4)).astype(np.float32),
               "token_types": rng.standard_normal((2, 4)).astype(np.float32),
               "positions": rng.standard_normal((12, 4)).astype(np.float32),
               "shape": np.array([0, -1], np.int64), "two": np.array(2, np.int64),
               "axes": np.array([-1], np.int64), "zero": np.array(0.0, np.float32)})


def test_integer_inputs_are_sized_from_their_tables(embedder):
    ranges = {v.name: index_range(v) for v in embedder.graph.inputs}
    assert ranges == {"ids": 50, "types": 2, "pos": 10, "mask": None, "pixels": None}
    assert [v.name for v in embedder.graph.inputs if is_mask(v)] == ["mask"]
    feeds = make_inputs(embedder, seed=0, dims={"b": 8, "s": 64})
    assert feeds["ids"].dtype == np.int64 and feeds["types"].dtype == np.int32
    assert feeds["ids"].max() < 50 and feeds["types"].max() == 1 and feeds["pos"].max() == 9  # every value drawn
    assert feeds["ids"].min() == 0 and feeds["types"].min() == 0
    assert set(np.unique(feeds["mask"])) == {0, 1} and feeds["mask"].mean() > 0.8 and feeds["mask"][:, 0].all()
    assert feeds["pixels"].shape == (8, 3, 4, 4) and 0 <= feeds["pixels"].min() and feeds["pixels"].max() < 1
    run_model(embedder, feeds)  # ORT accepts every draw


def test_bool_mask_and_plain_floats():
    model = _model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (bool[b,s] keep, float[b,s] x, int64[b] n) => (float[b,s] y, int64[b] m) {
          y = Where(keep, x, x)
          m = Identity(n)
        }""", {})
    feeds = make_inputs(model, seed=1, dims={"*": 32})
    assert feeds["keep"].dtype == np.bool_ and feeds["keep"][:, 0].all() and not feeds["keep"].all()
    assert feeds["x"].min() < -1 and feeds["x"].max() > 1  # standard normal, not an image range
    assert feeds["n"].min() >= 0 and feeds["n"].max() < 8  # indexes nothing: the default range


def test_random_calibration_uses_the_synthesizer(embedder):
    source = make_source("random", num_samples=5, batch_size=2, seed=4, dims={"s": 16})
    batches = list(source.batches(embedder))
    assert [b["ids"].shape for b in batches] == [(2, 16), (2, 16), (1, 16)]
    assert all(b["types"].max() < 2 and b["pos"].max() < 10 and b["mask"][:, 0].all() for b in batches)


# ------------------------------------------------------------------------------------------ tiny HF BERT
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="exporting the BERT checkpoint needs torch (maia-onnx[export])")
    transformers = pytest.importorskip("transformers", reason="the BERT checkpoint needs transformers (maia-onnx[hf])")
    from maia_onnx.export import export_model

    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, type_vocab_size=2))
    model.save_pretrained(root / "hf")
    export_model(f"hf:{root / 'hf'}", root / "bert.onnx")
    return root / "hf", root / "bert.onnx"


def test_run_random_on_bert_stays_in_its_tables_and_matches_pytorch(bert, tmp_path, capsys):
    import torch
    import transformers

    from maia_onnx.io import load_model

    hf_dir, path = bert
    code = main(["run", str(path), "--random", "--dim", "*=24", "--seed", "5", "--providers", "cpu",
                 "--save-outputs", str(tmp_path / "out.npz")])
    assert code == 0, capsys.readouterr().err
    feeds = make_inputs(load_model(path), seed=5, dims={"*": 24})  # what --random fed
    assert feeds["token_type_ids"].max() == 1 and feeds["token_type_ids"].min() == 0
    assert set(np.unique(feeds["attention_mask"])) == {0, 1} and feeds["attention_mask"][:, 0].all()
    assert feeds["input_ids"].max() < 96 and feeds["input_ids"].max() >= 8  # the whole vocabulary, not [0, 8)
    reference = transformers.BertModel.from_pretrained(hf_dir, local_files_only=True, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = reference(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    with np.load(tmp_path / "out.npz") as got:
        assert compare(ref.last_hidden_state.numpy(), got["last_hidden_state"])["max_rel"] <= 1e-4
        assert compare(ref.pooler_output.numpy(), got["pooler_output"])["max_rel"] <= 1e-4


def test_inputs_ort_refuses_are_a_user_error(bert, tmp_path, capsys):
    from maia_onnx.io import load_model

    _, path = bert
    feeds = make_inputs(load_model(path), seed=0, dims={"*": 4})
    feeds["token_type_ids"][0, 1] = 7  # past the 2-row token type table
    np.savez(tmp_path / "bad.npz", **feeds)
    code = main(["run", str(path), "--inputs", str(tmp_path / "bad.npz"), "--providers", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "refused its inputs" in err and "internal error" not in err
    assert err.count("\n") == 1
