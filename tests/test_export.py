"""Export of built-in and factory models: ORT-vs-PyTorch parity, KV-cache decode, clean graphs, CLI and errors."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx_ir as ir
import pytest
import torch

from maia_onnx.cli import main
from maia_onnx.errors import UserError, ValidationError
from maia_onnx.export import DEFAULT_OPSET, check_parity, export_builtin, export_model, read_config
from maia_onnx.models import registry
from maia_onnx.ortutil import compare, make_session

REL_TOL = 1e-4


def _run(path, feeds):
    sess = make_session(path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _assert_close(ref, got, tol=REL_TOL):
    err = compare(ref, got)
    assert err["max_rel"] <= tol, err


@pytest.mark.parametrize("fixture", ["llama_tiny_onnx", "unet_tiny_onnx", "yolo_tiny_onnx"])
def test_builtin_exports_load_with_opset_and_config(fixture, request):
    path = request.getfixturevalue(fixture)
    model = ir.load(path)
    assert model.opset_imports[""] == DEFAULT_OPSET == 21
    config = read_config(model)
    assert config["family"] in fixture
    spec = registry.build(config["model"])
    assert [v.name for v in model.graph.inputs] == spec.input_names
    assert [v.name for v in model.graph.outputs] == spec.output_names


def test_llama_parity_on_new_shapes(llama_tiny_onnx):
    """Dynamic batch/seq/past: shapes other than the export example still match PyTorch within 1e-4."""
    spec = registry.build("llama-tiny")
    cfg = llama_config(spec)
    for batch, seq, past in [(1, 1, 0), (3, 4, 6), (1, 9, 1)]:
        gen = torch.Generator().manual_seed(batch * 100 + seq * 10 + past)
        inputs = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)}
        for i in range(cfg.num_layers):
            for kind in ("key", "value"):
                inputs[f"past_key_values.{i}.{kind}"] = torch.randn(batch, cfg.num_kv_heads, past, cfg.head_dim, generator=gen)
        report = check_parity(llama_tiny_onnx, spec.module, inputs, output_names=spec.output_names)
        assert report["logits"]["max_rel"] <= REL_TOL
        assert set(report) == set(spec.output_names)


def llama_config(spec):
    return spec.module.config


def test_llama_prefill_then_two_decode_steps_through_ort_kv_cache(llama_tiny_onnx):
    spec = registry.build("llama-tiny")
    cfg = llama_config(spec)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 8)).astype(np.int64)
    sess = make_session(llama_tiny_onnx)
    out_names = [o.name for o in sess.get_outputs()]
    past = {f"past_key_values.{i}.{k}": np.zeros((2, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
            for i in range(cfg.num_layers) for k in ("key", "value")}
    logits_steps = []
    for start, stop in [(0, 6), (6, 7), (7, 8)]:  # prefill 6 tokens, then two single-token steps
        outs = dict(zip(out_names, sess.run(out_names, {"input_ids": ids[:, start:stop], **past})))
        logits_steps.append(outs["logits"])
        past = {f"past_key_values.{i}.{k}": outs[f"present.{i}.{k}"] for i in range(cfg.num_layers) for k in ("key", "value")}
    assert past["past_key_values.0.key"].shape == (2, cfg.num_kv_heads, 8, cfg.head_dim)
    with torch.no_grad():
        empty = [torch.zeros(2, cfg.num_kv_heads, 0, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
        full = spec.module(torch.from_numpy(ids), *empty)
    _assert_close(full[0].numpy(), np.concatenate(logits_steps, axis=1))
    _assert_close(full[1].numpy(), past["past_key_values.0.key"])
    _assert_close(full[-1].numpy(), past[f"past_key_values.{cfg.num_layers - 1}.value"])


def test_llama_graph_is_clean_for_downstream_passes(llama_tiny_onnx):
    model = ir.load(llama_tiny_onnx)
    cfg = read_config(model)
    inits = model.graph.initializers
    spec = registry.build("llama-tiny")
    params = dict(spec.module.named_parameters())
    matmul_weights = [n.inputs[1].name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].name in inits]
    # 7 projections per layer + lm_head, each a plain [in, out] initializer named like the torch parameter
    assert len(matmul_weights) == 7 * cfg["num_layers"] + 1
    for name in matmul_weights:
        assert name in params, name
        np.testing.assert_array_equal(inits[name].const_value.numpy(), params[name].detach().numpy().T)
    assert "model.layers.0.self_attn.q_proj.weight" in matmul_weights
    for node in model.graph:
        if node.op_type == "Transpose":
            assert node.inputs[0].name not in inits  # no Transpose of a weight left behind
    ops = [n.op_type for n in model.graph]
    assert ops.count("Softmax") == cfg["num_layers"]  # attention is explicit MatMul/Softmax
    assert not any(op in ("Attention", "MultiHeadAttention", "GroupQueryAttention") for op in ops)
    # head counts are literal constants in the Reshape shapes built for Q/K/V
    assert cfg["num_heads"] == 4 and cfg["num_kv_heads"] == 2 and cfg["head_dim"] == 16
    shapes = {v.name: [d if isinstance(d, int) else str(d) for d in v.shape] for v in model.graph.inputs}
    assert shapes["past_key_values.1.value"] == ["batch", 2, "past", 16]
    out_shapes = {v.name: [d if isinstance(d, int) else str(d) for d in v.shape] for v in model.graph.outputs}
    assert out_shapes["present.0.key"] == ["batch", 2, "past + seq", 16]
    assert out_shapes["logits"] == ["batch", "seq", 256]


def test_gemm_weights_are_in_out_layout(unet_tiny_onnx):
    model = ir.load(unet_tiny_onnx)
    spec = registry.build("unet-tiny")
    params = dict(spec.module.named_parameters())
    gemms = [n for n in model.graph if n.op_type == "Gemm"]
    assert gemms
    for node in gemms:
        assert node.attributes.get("transB") is None or node.attributes["transB"].as_int() == 0
        name = node.inputs[1].name
        np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), params[name].detach().numpy().T)


@pytest.mark.parametrize("name,fixture", [("unet-tiny", "unet_tiny_onnx"), ("yolo-tiny", "yolo_tiny_onnx")])
def test_vision_models_match_pytorch_at_other_batch_sizes(name, fixture, request):
    path = request.getfixturevalue(fixture)
    spec = registry.build(name)
    for batch in (1, 3):
        inputs = registry.build(name, seed=5, dims={"batch": batch}).example_inputs
        report = check_parity(path, spec.module, inputs, output_names=spec.output_names)
        assert all(r["max_rel"] <= REL_TOL for r in report.values())


def test_static_export_fixes_dims(tmp_path):
    result = export_builtin("yolo-tiny", tmp_path / "yolo_static.onnx", dynamic=False, dims={"batch": 1})
    model = ir.load(result.path)
    assert [d for d in model.graph.inputs[0].shape] == [1, 3, 64, 64]
    assert result.max_rel <= REL_TOL


def test_tied_lm_head_exports_as_named_transposed_copy(tmp_path):
    result = export_builtin("llama-tiny", tmp_path / "tied.onnx", dims={"tie_word_embeddings": 1, "num_layers": 1})
    assert result.max_rel <= REL_TOL and result.config["tie_word_embeddings"] is True
    model = ir.load(result.path)
    inits = model.graph.initializers
    embed = inits["model.embed_tokens.weight"].const_value.numpy()
    np.testing.assert_array_equal(inits["lm_head.weight"].const_value.numpy(), embed.T)
    assert [n.op_type for n in model.graph if "lm_head.weight" in [i.name for i in n.inputs if i is not None]] == ["MatMul"]


def test_check_parity_fails_on_a_different_module(yolo_tiny_onnx):
    other = registry.build("yolo-tiny", seed=9)
    with pytest.raises(ValidationError, match="relative error"):
        check_parity(yolo_tiny_onnx, other.module, other.example_inputs, output_names=other.output_names)


def test_export_releases_the_module_before_ort_loads_the_model(tmp_path, monkeypatch):
    """A multi-GB model must never be resident twice: torch weights are gone when ORT loads the ONNX copy."""
    import gc
    import weakref

    import maia_onnx.export.core as export_module

    spec = registry.build("yolo-tiny")
    refs = [weakref.ref(p) for p in spec.module.parameters()]
    alive_at_parity = []
    original = export_module.check_parity

    def spy(*args, **kwargs):
        gc.collect()
        alive_at_parity.append(sum(r() is not None for r in refs))
        return original(*args, **kwargs)

    monkeypatch.setattr(export_module, "check_parity", spy)
    result = export_module.export_spec(spec, tmp_path / "y.onnx", release_module=True)
    assert alive_at_parity == [0] and len(refs) > 10
    assert result.max_rel <= REL_TOL


def test_failed_parity_keeps_previous_output_and_leaves_no_files(tmp_path, monkeypatch):
    import maia_onnx.export.core as export_module

    out = tmp_path / "y.onnx"
    out.write_bytes(b"previous export")

    def failing_check(*args, **kwargs):
        raise ValidationError("simulated mismatch")

    monkeypatch.setattr(export_module, "check_parity", failing_check)
    with pytest.raises(ValidationError, match="simulated mismatch"):
        export_builtin("yolo-tiny", out)
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.onnx"]


def test_external_data_export_is_published_beside_the_model(tmp_path):
    out = tmp_path / "y.onnx"
    export_builtin("yolo-tiny", out, external_data=True)
    assert (tmp_path / "y.onnx.data").stat().st_size > 100_000
    feeds = {"images": registry.build("yolo-tiny").example_inputs["images"].numpy()}
    with_data = _run(out, feeds)
    export_builtin("yolo-tiny", out, external_data=False)  # re-export inline: the stale side file goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.onnx"]
    np.testing.assert_array_equal(_run(out, feeds)["boxes"], with_data["boxes"])


def test_output_that_is_a_directory_is_rejected(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        export_builtin("yolo-tiny", tmp_path)


@pytest.mark.slow
def test_llama_large_export_is_multi_gb_with_external_data(tmp_path):
    result = export_builtin("llama-tiny", tmp_path / "large.onnx", size="large")
    assert result.max_rel <= REL_TOL
    assert (tmp_path / "large.onnx.data").stat().st_size >= 3e9
    assert (tmp_path / "large.onnx").stat().st_size < 50e6


def test_opset_too_old_is_rejected(tmp_path):
    with pytest.raises(UserError, match="--opset 11"):
        export_builtin("yolo-tiny", tmp_path / "x.onnx", opset=11)
    assert not (tmp_path / "x.onnx").exists()


# ---- module:factory ---------------------------------------------------------------------------

FACTORY_SOURCE = textwrap.dedent(
    '''
    import torch

    class TwoLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1 = torch.nn.Linear(6, 12)
            self.fc2 = torch.nn.Linear(12, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    def make():
        return TwoLayer(), (torch.randn(4, 6),)

    def make_dict():
        return TwoLayer(), {"features": torch.randn(4, 6)}

    def wrong():
        return 42

    def not_module():
        return "model", (torch.randn(2, 6),)

    def boom():
        raise RuntimeError("weights missing")

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
                return x * 2
            return x - 1

    def untraceable():
        return DataDependent(), (torch.ones(3, 4),)

    class Seq2SeqLike(torch.nn.Module):
        """forward() with optional keyword inputs, like HF models: a dict must bind by name, not position."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.emb = torch.nn.Embedding(16, 8)
            self.out = torch.nn.Linear(8, 4)

        def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, scale=None):
            enc = self.emb(input_ids) * attention_mask[..., None]
            dec = self.emb(decoder_input_ids)
            return {"logits": self.out(dec + enc.mean(1, keepdim=True)), "encoder_last_hidden_state": enc}

    def by_name():
        # the dict's order differs from forward()'s, and attention_mask is a float mask
        return Seq2SeqLike(), {"decoder_input_ids": torch.randint(0, 16, (2, 3)), "input_ids": torch.randint(0, 16, (2, 5)),
                               "attention_mask": torch.tensor([[1.0, 1, 1, 1, 0], [1, 1, 1, 0, 0]])}

    def mixed_names():
        return Seq2SeqLike(), {"input_ids": torch.randint(0, 16, (2, 5)), "mask": torch.ones(2, 5)}

    class SumAll(torch.nn.Module):
        def forward(self, *xs):
            return sum(x.relu() for x in xs), xs[0] * 2

    def varargs():
        return SumAll(), (torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)), ["total", "doubled"]

    NOT_CALLABLE = 3
    '''
)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_factories"


def test_factory_tuple_and_positional_dict_inputs(factory_module, tmp_path):
    """A dict whose keys name no forward() parameter binds by position: the keys only name the ONNX inputs."""
    r1 = export_model(f"{factory_module}:make", tmp_path / "f1.onnx")
    assert r1.max_rel <= REL_TOL and list(r1.inputs) == ["input_0"] and list(r1.outputs) == ["output"]
    assert r1.inputs["input_0"] == ["batch", 6]
    r2 = export_model(f"{factory_module}:make_dict", tmp_path / "f2.onnx")
    assert list(r2.inputs) == ["features"]
    model = ir.load(r2.path)
    assert "fc1.weight" in model.graph.initializers
    out = _run(r2.path, {"features": np.ones((7, 6), np.float32)})["output"]
    assert out.shape == (7, 3)


def test_factory_dict_inputs_bind_to_forward_by_name(factory_module, tmp_path):
    result = export_model(f"{factory_module}:by_name", tmp_path / "named.onnx")
    # ONNX inputs follow forward()'s parameter order; outputs are named after the returned dict's keys
    assert list(result.inputs) == ["input_ids", "attention_mask", "decoder_input_ids"]
    assert list(result.outputs) == ["logits", "encoder_last_hidden_state"] and result.max_rel <= REL_TOL
    import importlib

    module = importlib.import_module(factory_module).Seq2SeqLike().eval()
    ids, dec = np.array([[1, 2, 3, 4, 5]] * 3), np.array([[9, 8, 7]] * 3)  # batch 3 (dynamic; the rest as exported)
    mask = np.array([[1, 1, 1, 0, 0]] * 3, np.float32)
    got = _run(result.path, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec})
    with torch.no_grad():
        ref = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), decoder_input_ids=torch.from_numpy(dec))
    _assert_close(ref["logits"].numpy(), got["logits"])


def test_factory_varargs_gets_nested_dynamic_shapes_and_named_outputs(factory_module, tmp_path):
    result = export_model(f"{factory_module}:varargs", tmp_path / "va.onnx")
    assert list(result.outputs) == ["total", "doubled"] and result.max_rel <= REL_TOL
    assert result.inputs == {f"input_{i}": ["batch", 4] for i in range(3)}
    xs = [np.random.default_rng(i).standard_normal((5, 4)).astype(np.float32) for i in range(3)]
    got = _run(result.path, {f"input_{i}": x for i, x in enumerate(xs)})
    _assert_close(sum(np.maximum(x, 0) for x in xs), got["total"])


@pytest.mark.parametrize(
    "attr,message",
    [
        ("mixed_names", "'mask' are not parameters of Seq2SeqLike.forward"),
        ("wrong", "returned int"),
        ("not_module", "returned str as the module"),
        ("boom", "raised RuntimeError: weights missing"),
        ("NOT_CALLABLE", "is not callable"),
        ("missing", "has no attribute 'missing'"),
        ("untraceable", "torch.onnx.export cannot export .*data-dependent"),
    ],
)
def test_bad_factories_are_user_errors(factory_module, tmp_path, attr, message):
    with pytest.raises(UserError, match=message):
        export_model(f"{factory_module}:{attr}", tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


# ---- CLI --------------------------------------------------------------------------------------


def test_cli_export_json_report(tmp_path, capsys):
    out = tmp_path / "yolo.onnx"
    rc = main(["export", "yolo-tiny", "-o", str(out), "--json", "--dim", "batch=3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert report["opset"] == 21 and report["model"] == "yolo-tiny"
    assert set(report["parity"]) == {"boxes", "scores"}
    assert report["max_rel"] <= REL_TOL
    assert report["inputs"] == {"images": ["batch", 3, 64, 64]}
    assert "[export] exporting yolo-tiny" in captured.err  # progress goes to stderr
    assert out.exists()


def test_cli_export_table(tmp_path, capsys):
    rc = main(["export", "yolo-tiny", "-o", str(tmp_path / "y.onnx"), "--static"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "max_rel" in captured.out and "boxes" in captured.out and "static shapes" in captured.out


@pytest.mark.parametrize(
    "args,message",
    [
        (["export", "resnet-50"], "unknown built-in model 'resnet-50'"),
        (["export", "no_such_pkg.mod:factory"], "cannot import module 'no_such_pkg.mod'"),
        (["export", "maia_onnx.export:no_such_factory"], "has no attribute 'no_such_factory'"),
        (["export", "hf:/no/such/dir"], "does not exist"),
        (["export", "llama-tiny", "--dim", "seq=abc"], "bad --dim 'seq=abc'"),
    ],
)
def test_cli_bad_arguments_give_one_line(tmp_path, capsys, args, message):
    rc = main(args + ["-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert rc == 2
    error_lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()
