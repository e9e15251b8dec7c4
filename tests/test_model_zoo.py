"""The models users bring (tests/zoo.py tiny checkpoints) through `export hf:DIR` / `ultralytics:REF`: parity with
PyTorch on the export example and again on fresh inputs of other shapes, greedy generation of encoder-decoders equal
to PyTorch's, diffusers pipelines and components, YOLO; and missing extras as one-line errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx_ir as ir
import pytest
import torch
from zoo import extra_missing

from maia_onnx.cli import main
from maia_onnx.errors import UserError, ValidationError
from maia_onnx.export import MissingExtraError, export_model, read_config
from maia_onnx.ortutil import compare, make_session

REL_TOL = 1e-4

pytestmark = pytest.mark.skipif(extra_missing("transformers") is not None, reason=str(extra_missing("transformers")))


def _run(path, feeds):
    sess = make_session(path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _hf(auto_class, directory, **kw):
    import transformers

    return getattr(transformers, auto_class).from_pretrained(directory, local_files_only=True, **kw).eval()


# ---- decoders (dense, MoE, fused QKV, sliding window / softcapping) ------------------------------------------

DECODERS = ["llama", "qwen2", "qwen3_moe", "mixtral", "phi3", "falcon", "gemma2", "gpt2"]


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_export_matches_pytorch_prefill_and_decode(name, zoo_dir, zoo_export):
    result = zoo_export(name)
    assert result.max_rel <= REL_TOL, result.parity
    model = ir.load(result.path)
    cfg = read_config(model)
    assert cfg["hf_kind"] == "decoder" and cfg["family"] == json.loads((zoo_dir(name) / "config.json").read_text())["model_type"]
    assert all(node.domain in ("", "ai.onnx") for node in model.graph), "custom-domain ops left in the graph"
    if name in ("qwen3_moe", "mixtral"):
        assert cfg["num_experts"] == 4 and cfg["experts_per_token"] == 2
    # prefill 5 tokens then one decode step through the ORT KV cache == the HF model's logits on all 6 tokens
    layers, kv_heads, head_dim = cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]
    ids = np.random.default_rng(7).integers(0, cfg["vocab_size"], size=(3, 6)).astype(np.int64)
    sess = make_session(result.path)
    out_names = [o.name for o in sess.get_outputs()]
    past = {f"past_key_values.{i}.{k}": np.zeros((3, kv_heads, 0, head_dim), np.float32) for i in range(layers) for k in ("key", "value")}
    logits = []
    for start, stop in [(0, 5), (5, 6)]:
        outs = dict(zip(out_names, sess.run(out_names, {"input_ids": ids[:, start:stop], **past})))
        logits.append(outs["logits"])
        past = {f"past_key_values.{i}.{k}": outs[f"present.{i}.{k}"] for i in range(layers) for k in ("key", "value")}
    reference = _hf("AutoModelForCausalLM", zoo_dir(name), attn_implementation="eager", experts_implementation="batched_mm")
    with torch.no_grad():
        ref = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    err = compare(ref, np.concatenate(logits, axis=1))
    assert err["max_rel"] <= REL_TOL, err


# ---- image encoders (ViT; BERT is in test_hf_export.py) -----------------------------------------------------------------


def test_vit_exports_pixel_values_and_matches_pytorch(zoo_dir, zoo_export):
    result = zoo_export("vit")
    assert result.max_rel <= REL_TOL
    assert result.inputs == {"pixel_values": ["batch", 3, 32, 32]}
    assert read_config(ir.load(result.path))["hf_kind"] == "vision-encoder"
    pixels = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    got = _run(result.path, {"pixel_values": pixels})
    with torch.no_grad():
        ref = _hf("AutoModel", zoo_dir("vit"))(pixel_values=torch.from_numpy(pixels))
    assert compare(ref.last_hidden_state.numpy(), got["last_hidden_state"])["max_rel"] <= REL_TOL
    assert compare(ref.pooler_output.numpy(), got["pooler_output"])["max_rel"] <= REL_TOL


# ---- encoder-decoders: encoder.onnx + decoder.onnx with self/cross KV cache, greedy generation -----------


@pytest.mark.parametrize("name,auto", [("t5", "AutoModelForSeq2SeqLM"),
                                       pytest.param("bart", "AutoModelForSeq2SeqLM", marks=pytest.mark.slow),  # CI time: T5 covers it
                                       ("whisper", "AutoModelForSpeechSeq2Seq")])
def test_encoder_decoder_generates_the_same_tokens_as_pytorch(name, auto, zoo_dir, zoo_export):
    from maia_onnx.export.seq2seq import greedy_check

    result = zoo_export(name)
    assert sorted(result.parts) == ["decoder.onnx", "encoder.onnx"] and result.path.is_dir()
    assert result.max_rel <= REL_TOL, {k: p.parity for k, p in result.parts.items()}
    assert result.checks["tokens_equal"] and len(result.checks["tokens"][0]) == 8
    decoder = result.parts["decoder.onnx"]
    assert "past_key_values.1.encoder.value" in decoder.inputs and "present.1.decoder.key" in decoder.outputs
    assert decoder.inputs["past_key_values.0.decoder.key"][2] == "past"
    # independent run: new inputs at another batch size (and source length for text), 10 greedy tokens
    model = _hf(auto, zoo_dir(name), attn_implementation="eager")
    rng = np.random.default_rng(11)
    if name == "whisper":
        feats = rng.standard_normal((3, 8, 32)).astype(np.float32)
        inputs = {"input_features": torch.from_numpy(feats)}
    else:
        ids = rng.integers(3, 128, size=(3, 9))
        mask = np.ones_like(ids)
        mask[2, 5:] = 0
        inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    report = greedy_check(model, result.path / "encoder.onnx", result.path / "decoder.onnx", inputs, tokens=10)
    assert report["tokens_equal"] and report["step_logits"]["max_rel"] <= REL_TOL


def test_multi_graph_export_needs_a_directory_and_a_failed_check_publishes_nothing(zoo_dir, tmp_path):
    from maia_onnx.export import export_parts, spec_from_factory_result

    with pytest.raises(UserError, match="give -o a directory"):
        export_model(f"hf:{zoo_dir('t5')}", tmp_path / "t5.onnx")

    def part(seed):
        torch.manual_seed(seed)
        return lambda: spec_from_factory_result((torch.nn.Linear(4, 3), (torch.randn(2, 4),)), f"part{seed}")

    def wrong(staging):
        assert sorted(p.name for p in staging.iterdir()) == ["a.onnx", "b.onnx"]  # both graphs were made...
        raise ValidationError("greedy generation differs (simulated)")

    with pytest.raises(ValidationError, match="simulated"):
        export_parts("two", [("a.onnx", part(0)), ("b.onnx", part(1))], tmp_path / "out", verify=wrong)
    assert list(tmp_path.iterdir()) == []  # ...and nothing was published, no staging left behind
    result = export_parts("two", [("a.onnx", part(0)), ("b.onnx", part(1))], tmp_path / "out", verify=lambda d: {"ok": True})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.onnx", "b.onnx"] and result.checks == {"ok": True}
    assert result.parts["b.onnx"].path == tmp_path / "out" / "b.onnx" and result.max_rel <= REL_TOL


# ---- diffusers -------------------------------------------------------------------------------------------


def test_diffusers_pipeline_exports_every_component(zoo_dir, zoo_export):
    import diffusers

    result = zoo_export("sd_pipeline")
    assert list(result.parts) == ["unet.onnx", "vae_decoder.onnx", "vae_encoder.onnx", "text_encoder.onnx"]
    assert result.max_rel <= REL_TOL, {k: p.max_rel for k, p in result.parts.items()}
    assert result.config["not_exported"] == []  # tokenizer/scheduler entries name no class in this directory
    unet = result.parts["unet.onnx"]
    assert unet.inputs == {"sample": ["batch", 4, 8, 8], "timestep": ["batch"], "encoder_hidden_states": ["batch", "seq", 16]}
    # fresh inputs, other batch and text length, against diffusers' own (SDPA) attention
    rng = np.random.default_rng(5)
    feeds = {"sample": rng.standard_normal((3, 4, 8, 8)).astype(np.float32), "timestep": np.array([1.0, 500.0, 999.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((3, 4, 16)).astype(np.float32)}
    ref_unet = diffusers.UNet2DConditionModel.from_pretrained(zoo_dir("sd_pipeline") / "unet").eval()
    with torch.no_grad():
        ref = ref_unet(*(torch.from_numpy(v) for v in feeds.values())).sample.numpy()
    assert compare(ref, _run(unet.path, feeds)["out_sample"])["max_rel"] <= REL_TOL
    vae = diffusers.AutoencoderKL.from_pretrained(zoo_dir("sd_pipeline") / "vae").eval()
    image = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    latent = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(image)).latent_dist
        decoded = vae.decode(torch.from_numpy(latent)).sample.numpy()
    enc = _run(result.parts["vae_encoder.onnx"].path, {"sample": image})
    assert compare(dist.mean.numpy(), enc["latent_mean"])["max_rel"] <= REL_TOL
    assert compare(dist.logvar.numpy(), enc["latent_logvar"])["max_rel"] <= REL_TOL
    assert compare(decoded, _run(result.parts["vae_decoder.onnx"].path, {"latent_sample": latent})["sample"])["max_rel"] <= REL_TOL


def test_diffusers_component_directories_are_detected(zoo_dir, tmp_path):
    """A component's own directory (config.json with _class_name); the pipeline test exports the same components."""
    from maia_onnx.hf import DIFFUSERS_COMPONENT, DIFFUSERS_PIPELINE, ENCODER, detect_kind

    pipe = zoo_dir("sd_pipeline")
    assert detect_kind(pipe)[0] == DIFFUSERS_PIPELINE
    assert detect_kind(pipe / "unet") == (DIFFUSERS_COMPONENT, json.loads((pipe / "unet" / "config.json").read_text()))
    assert detect_kind(pipe / "text_encoder")[0] == ENCODER
    with pytest.raises(UserError, match="vae_decoder.onnx, vae_encoder.onnx.*give -o a directory"):
        export_model(f"hf:{pipe / 'vae'}", tmp_path / "vae.onnx")
    (tmp_path / "sched").mkdir()
    (tmp_path / "sched" / "config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    with pytest.raises(UserError, match="DDIMScheduler .* is not supported"):
        export_model(f"hf:{tmp_path / 'sched'}", tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sched"]


# ---- Ultralytics -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ultralytics_ready():
    reason = extra_missing("ultralytics")
    if reason:
        pytest.skip(reason)


def test_ultralytics_yolov8n_from_yaml_and_checkpoint(ultralytics_ready, tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    result = export_model("ultralytics:yolov8n.yaml", tmp_path / "y8.onnx")
    assert result.max_rel <= REL_TOL and result.outputs == {"output0": ["batch", 84, 84]}
    torch.manual_seed(3)
    module = DetectionModel("yolov8n.yaml", verbose=False).eval()
    torch.save({"model": module}, tmp_path / "y8.pt")
    from_pt = export_model(f"ultralytics:{tmp_path / 'y8.pt'}", tmp_path / "y8pt.onnx")
    assert from_pt.max_rel <= REL_TOL
    images = np.random.default_rng(0).random((1, 3, 64, 64)).astype(np.float32)
    head = module.model[-1]
    head.export, head.format, head.dynamic = True, "onnx", True
    with torch.no_grad():
        ref = module.fuse(verbose=False)(torch.from_numpy(images))
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    assert compare(ref.numpy(), _run(from_pt.path, {"images": images})["output0"])["max_rel"] <= REL_TOL


def test_ultralytics_bad_references(ultralytics_ready, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export_model(f"ultralytics:{tmp_path / 'none.pt'}", tmp_path / "o.onnx")
    with pytest.raises(UserError, match="must name a model yaml"):
        export_model("ultralytics:yolov8n", tmp_path / "o.onnx")


# ---- missing optional extras: one line naming the extra --------------------------------------------------


@pytest.mark.parametrize("module,extra,ref", [
    ("torch", "export", "llama-tiny"),
    ("torch", "export", "hf:{pipe}"),
    ("diffusers", "diffusers", "hf:{pipe}"),
    ("ultralytics", "ultralytics", "ultralytics:yolov8n.yaml"),
])
def test_missing_extra_is_a_one_line_install_hint(module, extra, ref, tmp_path, monkeypatch, capsys):
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    monkeypatch.setitem(sys.modules, module, None)  # what `import module` sees when the package is not installed
    with pytest.raises(MissingExtraError, match=rf"install maia-onnx\[{extra}\]"):
        export_model(ref.format(pipe=pipe), tmp_path / "o")
    rc = main(["export", ref.format(pipe=pipe), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and f"maia-onnx[{extra}]" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "o").exists()
