"""Calibration on text as users have it (``--calib text:FILE``): the declared inputs are built, padded positions
never reach a statistic (garbage or longer padding gives bit-identical scales), the held-out part is evaluated with
`eval`'s code, and the CLI options reach the config."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from textdata import SENTENCES, tiny_bert, tiny_llama, write_text

from maia_onnx.calib import collect_statistics, compute_scales, make_source, split_holdout
from maia_onnx.cli import main
from maia_onnx.data import Feeds, TextSource, load_tokenizer, real_positions, text_feeds
from maia_onnx.errors import InvalidOptionError, UserError
from maia_onnx.evaluate import evaluate_files
from maia_onnx.export import export_model
from maia_onnx.passes.kv_cache import calibrate_kv_amax
from maia_onnx.passes.quantize_fp8 import DEFAULT_OP_TYPES, activation_values, find_targets
from maia_onnx.quantize import QuantizeConfig, quantize_model

METHODS = ("minmax", "percentile", "mse", "entropy")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibtext")
    out = {"root": root, "text": write_text(root / "data.txt")}
    for name, build in (("llama", tiny_llama), ("bert", tiny_bert)):
        hf_dir = build(root / name)
        out[name] = (hf_dir, export_model(f"hf:{hf_dir}", root / f"{name}.onnx").path)
    return out


class _Batches:
    """A calibration source over fixed batches (the protocol collect_statistics reads)."""

    description = "batches"

    def __init__(self, batches):
        self._batches = batches

    def batches(self, model):
        return iter(self._batches)

    def count(self):
        return len(self._batches)


def _scales(model, names, batch):
    stats = collect_statistics(model, names, _Batches([batch]), show_progress=False)
    return {method: compute_scales(stats, method) for method in METHODS}


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_padded_positions_change_no_statistic(hf_models, name):
    hf_dir, onnx_path = hf_models[name]
    model = ir.load(str(onnx_path))
    names = activation_values(find_targets(model, DEFAULT_OP_TYPES))  # linears and attention matmuls
    batch = next(iter(TextSource(hf_models["text"], hf_dir, seq_len=32, batch_size=6).batches(model)))
    assert (~batch.valid).sum() >= 10  # the sentences differ in length: there is padding to hide
    garbage = Feeds(dict(batch), batch.valid)
    ids = garbage["input_ids"].copy()
    ids[~batch.valid] = np.random.default_rng(1).integers(3, 20, size=int((~batch.valid).sum()))
    garbage["input_ids"] = ids
    tokenizer = load_tokenizer(hf_dir)
    encoded = tokenizer(SENTENCES, padding="max_length", max_length=20, return_tensors="np")
    longer = text_feeds(model, {k: np.asarray(v) for k, v in encoded.items()})
    assert longer["input_ids"].shape[1] == 20 > batch["input_ids"].shape[1]

    reference = _scales(model, names, batch)
    for other in (garbage, longer):
        got = _scales(model, names, other)
        for method in METHODS:
            assert got[method] == reference[method], method  # bit-identical, every activation, every method
    # the mask is what does it: the same batches without it give other scales
    unmasked_pad, unmasked_garbage = _scales(model, names, dict(batch)), _scales(model, names, dict(garbage))
    assert any(unmasked_pad[m] != unmasked_garbage[m] for m in METHODS)
    assert any(unmasked_garbage[m] != reference[m] for m in METHODS)


def test_real_positions_layouts():
    valid = np.array([[True, True, False], [True, False, False]])
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 3, 4))
    np.testing.assert_array_equal(real_positions(hidden, valid), hidden[valid])
    scores = rng.standard_normal((2, 5, 3, 3))  # [batch, heads, query, key]: both position axes
    got = real_positions(scores, valid)
    expect = [scores[b, h, q, k] for b in range(2) for q in range(3) for k in range(3) for h in range(5)
              if valid[b, q] and valid[b, k]]
    np.testing.assert_array_equal(np.sort(got.ravel()), np.sort(np.array(expect)))
    assert got.shape == (2 * 2 + 1, 5)  # (query, key) pairs of real positions, heads kept
    merged = scores.reshape(10, 3, 3)  # [batch * heads, query, key]
    np.testing.assert_array_equal(np.sort(real_positions(merged, valid).ravel()), np.sort(got.ravel()))
    rows = hidden.reshape(6, 4)  # token rows [batch * seq, hidden]
    np.testing.assert_array_equal(real_positions(rows, valid), hidden[valid])
    # a fixed axis that happens to be as long as the sequence is not a position axis
    proj = rng.standard_normal((2, 3, 3))
    np.testing.assert_array_equal(real_positions(proj, valid, ir.Shape(["batch", "seq", 3])), proj[valid])
    assert real_positions(proj, valid).shape == (2 * 2 + 1,)  # undeclared: taken for [batch, query, key]
    assert real_positions(hidden, None) is hidden


@pytest.mark.parametrize("name,task,metric", [("llama", "decoder", "perplexity_delta"),
                                              ("bert", "encoder", "embedding_cosine_mean")])
def test_text_calibrated_quantization_and_its_task_report(hf_models, tmp_path, name, task, metric):
    hf_dir, onnx_path = hf_models[name]
    out = tmp_path / "q.onnx"
    result = quantize_model(onnx_path, out, calib=f"text:{hf_models['text']}", seq_len=16, batch_size=2,
                            eval_samples=2, show_progress=False)
    report = result.report
    # ORT refuses a feed that is not a declared input, and a declared input that is missing: these ran
    assert report["calibration"]["source"] == f"text:{hf_models['text']}"
    assert report["calibration"]["samples"] == len(SENTENCES) - 2
    assert report["calibration"]["activations"] > 0 and all(s > 0 for s in result.activation_scales.values())
    accuracy = report["accuracy"]
    assert accuracy["task"] == task and accuracy["summary"]["min_output_cosine"] > 0.99
    # the report's task metrics are `maia-onnx eval`'s on the held-out sentences (the last two)
    held = tmp_path / "held.txt"
    held.write_text("\n".join(SENTENCES[-2:]) + "\n")
    evaluated = evaluate_files(out, onnx_path, f"text:{held}", seq_len=16, batch_size=2)
    assert accuracy["task_metrics"] == evaluated["task_metrics"]
    assert accuracy["task_metrics"][metric] != (0.0 if task == "decoder" else 1.0)  # FP8 moved something


def test_text_sources_split_and_refuse(hf_models, tmp_path):
    source = make_source(f"text:{hf_models['text']}", batch_size=2, num_samples=5)
    assert isinstance(source, TextSource) and source.total_samples() == 5
    calib, held = split_holdout(source, 2)
    assert calib.texts() == SENTENCES[:3] and held.texts() == SENTENCES[3:5]  # the 6th is not in --samples 5
    assert calib.count() == 2 and held.count() == 1
    with pytest.raises(InvalidOptionError, match="text:PATH"):
        QuantizeConfig(calib="text:")
    with pytest.raises(InvalidOptionError, match="seq-len"):
        QuantizeConfig(seq_len=1)
    with pytest.raises(InvalidOptionError, match="H,W"):
        QuantizeConfig(image_size="224")
    assert QuantizeConfig(image_size="32,48").image_size == (32, 48)
    assert QuantizeConfig.from_dict(QuantizeConfig(image_size=(32, 48)).to_dict()).image_size == (32, 48)
    with pytest.raises(UserError, match="tokenizer"):
        # a model without a recorded hf: directory and no --tokenizer
        model = ir.load(str(hf_models["bert"][1]))
        model.metadata_props.pop("maia_onnx.source")
        quantize_model(model, None, calib=f"text:{hf_models['text']}", show_progress=False)


def test_cli_text_calibration(hf_models, tmp_path, capsys):
    hf_dir, onnx_path = hf_models["bert"]
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    rc = main(["quantize", str(onnx_path), "-o", str(out), "--calib", f"text:{hf_models['text']}", "--tokenizer",
               str(hf_dir), "--seq-len", "8", "--eval-samples", "2", "--method", "mse", "--report", str(report)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "task metrics (encoder)" in captured.out and "embedding_cosine_mean" in captured.out
    data = json.loads(report.read_text())
    assert data["calibration"]["method"] == "mse" and data["accuracy"]["task_metrics"]["samples"] == 2
    rc = main(["quantize", str(onnx_path), "-o", str(tmp_path / "x.onnx"), "--calib", f"text:{tmp_path / 'missing.txt'}"])
    captured = capsys.readouterr()
    assert rc != 0 and "not found" in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "x.onnx").exists()


def test_kv_cache_scales_ignore_padding(hf_models):
    hf_dir, onnx_path = hf_models["llama"]
    model = ir.load(str(onnx_path))
    batch = next(iter(TextSource(hf_models["text"], hf_dir, seq_len=32, batch_size=6).batches(model)))
    garbage = Feeds(dict(batch), batch.valid)
    ids = garbage["input_ids"].copy()
    ids[~batch.valid] = np.random.default_rng(2).integers(3, 20, size=int((~batch.valid).sum()))
    garbage["input_ids"] = ids
    for granularity in ("tensor", "head"):
        masked = calibrate_kv_amax(model, [batch], granularity)
        assert len(masked) == 4
        got = calibrate_kv_amax(model, [garbage], granularity)
        for name in masked:
            np.testing.assert_array_equal(got[name], masked[name], err_msg=name)
    unmasked = calibrate_kv_amax(model, [dict(garbage)])
    assert any(not np.array_equal(unmasked[n], masked_t) for n, masked_t in calibrate_kv_amax(model, [batch]).items())


CONV = """
<ir_version: 10, opset_import: ["" : 21]>
conv (float[N, 3, 8, 8] pixel_values) => (float[N, 4] logits) {
   c = Conv <pads = [1, 1, 1, 1]> (pixel_values, W)
   r = Relu(c)
   p = GlobalAveragePool(r)
   f = Flatten(p)
   logits = MatMul(f, F)
}
"""


def test_image_directory_calibration(tmp_path):
    import onnx
    from PIL import Image

    proto = onnx.parser.parse_model(CONV)
    rng = np.random.default_rng(3)
    proto.graph.initializer.extend([
        onnx.numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "W"),
        onnx.numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "F")])
    model_path = tmp_path / "conv.onnx"
    onnx.save(proto, model_path)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(images / f"{i}.png")
    result = quantize_model(model_path, tmp_path / "q.onnx", calib=f"images:{images}", eval_samples=2, show_progress=False)
    report = result.report
    assert report["calibration"]["source"] == f"images:{images}" and report["calibration"]["samples"] == 4
    # the conv input is the image resized to the declared 8x8 and scaled to [0, 1]: its scale is its amax / 448
    pixels = np.stack([np.asarray(Image.open(images / f"{i}.png").convert("RGB").resize((8, 8), Image.BILINEAR),
                                  np.float32) / 255 for i in range(4)])
    assert result.activation_scales["pixel_values"] == pytest.approx(float(pixels.max()) / 448, rel=1e-6)
    assert report["accuracy"]["task"] == "generic" and report["accuracy"]["summary"]["min_output_cosine"] > 0.99
