"""KvCacheFp8Pass + maia_onnx.decode: FP8 past/present tensors, calibrated/imported scales, 32-step greedy decode."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from maia_onnx.decode import DecoderSession, compare_decode, greedy_decode
from maia_onnx.errors import InvalidOptionError, UnsupportedModelError
from maia_onnx.formats.fp8 import dequantize_fp8, quantize_fp8
from maia_onnx.io import load_model
from maia_onnx.ortutil import compare, make_session
from maia_onnx.passes.kv_cache import KvCacheFp8Pass, KvCacheRecord, kv_pairs
from maia_onnx.pipeline import validate_model

KV_HEADS, HEAD_DIM, LAYERS = 2, 16, 2
PATTERN = 5


def empty_past(batch=1):
    return {
        f"past_key_values.{i}.{k}": np.zeros((batch, KV_HEADS, 0, HEAD_DIM), np.float32)
        for i in range(LAYERS)
        for k in ("key", "value")
    }


def calib_feeds(seed=0, batch=2, seq=20):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 64, (batch, seq)), **empty_past(batch)}]


@pytest.fixture(scope="module")
def copy_llama(tmp_path_factory):
    """llama-tiny trained (~130 Adam steps, ~3 s) to continue a repeating 5-token pattern: confident logits
    whose next token depends on the cache (attention back 5 positions), so a decode test can fail."""
    torch = pytest.importorskip("torch")
    from maia_onnx.export import export_spec
    from maia_onnx.models import registry

    spec = registry.build("llama-tiny")
    module = spec.module.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend on the shared CI cores
    try:
        torch.manual_seed(0)
        opt = torch.optim.AdamW(module.parameters(), lr=5e-3)
        past = [torch.zeros(16, KV_HEADS, 0, HEAD_DIM) for _ in range(2 * LAYERS)]
        for _ in range(300):
            ids = torch.randint(0, 64, (16, PATTERN)).repeat(1, 5)
            logits = module(ids, *past)[0]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            acc = (logits[:, PATTERN:-1].argmax(-1) == ids[:, PATTERN + 1 :]).float().mean().item()
            if acc == 1.0 and loss.item() < 1.0:
                break
        assert acc == 1.0, "copy task did not train"
    finally:
        torch.set_num_threads(threads)
    module.eval()
    path = tmp_path_factory.mktemp("copy_llama") / "llama-copy.onnx"
    export_spec(spec, path)
    return path


def test_graph_has_fp8_cache_read_through_dequantize(llama_tiny_onnx):
    model = load_model(llama_tiny_onnx)
    KvCacheFp8Pass("fp8-e4m3", calib=calib_feeds())(model)
    validate_model(model)
    pairs = kv_pairs(model)
    assert len(pairs) == 2 * LAYERS
    for layer, kind, past, present in pairs:
        assert past.dtype == ir.DataType.FLOAT8E4M3FN and present.dtype == ir.DataType.FLOAT8E4M3FN
        assert [u.node.op_type for u in past.uses()] == ["DequantizeLinear"]
        assert present.producer().op_type == "QuantizeLinear"
        # attention reads the float concat only through Q -> DQ
        float_present = present.producer().inputs[0]
        assert [u.node.op_type for u in float_present.uses()] == ["QuantizeLinear"]
    meta = json.loads(model.metadata_props["maia_onnx.kv_cache"])
    assert meta["dtype"] == "FLOAT8E4M3FN" and meta["granularity"] == "tensor" and len(meta["scales"]) == 4
    sess = make_session(model)
    types = {i.name: i.type for i in sess.get_inputs()}
    assert types["past_key_values.0.key"] == "tensor(float8e4m3fn)"


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_one_step_matches_fp32_with_quantised_cache(llama_tiny_onnx, granularity):
    """Feed an FP8 past; present bytes equal the NumPy FP8 reference of the FP32 model's present."""
    import onnxruntime as ort

    fp32 = load_model(llama_tiny_onnx)
    model = load_model(llama_tiny_onnx)
    record = KvCacheFp8Pass("e4m3fn", granularity, calib=calib_feeds())(model).record
    assert isinstance(record, KvCacheRecord) and (record.format, record.granularity) == ("e4m3fn", granularity)
    assert sorted(record.scales) == sorted(f"present.{i}.{k}" for i in range(LAYERS) for k in ("key", "value"))
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 256, (1, 3))
    q_past, f_past = {}, {}
    for i in range(LAYERS):
        for kind in ("key", "value"):
            scale = record.scales[f"present.{i}.{kind}"]
            axis = 1 if np.ndim(scale) else None
            x = rng.standard_normal((1, KV_HEADS, 6, HEAD_DIM)).astype(np.float32)
            q = quantize_fp8(x, scale, "e4m3fn", axis=axis)
            q_past[f"past_key_values.{i}.{kind}"] = q
            f_past[f"past_key_values.{i}.{kind}"] = dequantize_fp8(q, scale, axis=axis)
    ref = dict(zip([o.name for o in make_session(fp32).get_outputs()], make_session(fp32).run(None, {"input_ids": ids, **f_past})))
    sess = make_session(model)
    names = [o.name for o in sess.get_outputs()]
    feeds = {"input_ids": ort.OrtValue.ortvalue_from_numpy(ids)}
    for k, q in q_past.items():
        feeds[k] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(q.view(np.uint8), 17)
    got = dict(zip(names, sess.run_with_ort_values(names, feeds)))
    for i in range(LAYERS):
        for kind in ("key", "value"):
            name = f"present.{i}.{kind}"
            scale = record.scales[name]
            axis = 1 if np.ndim(scale) else None
            codes = got[name].numpy()
            assert codes.dtype == np.uint8 and codes.shape == (1, KV_HEADS, 9, HEAD_DIM)  # 1 byte per element
            # past part round-trips bit-exactly
            np.testing.assert_array_equal(codes[:, :, :6], q_past[f"past_key_values.{i}.{kind}"].view(np.uint8))
            expected = quantize_fp8(ref[name], scale, "e4m3fn", axis=axis).view(np.uint8)
            # new tokens: layer 0 identical inputs -> identical bytes; deeper layers see FP8-read K/V upstream
            same = np.mean(codes == expected)
            assert same == 1.0 if i == 0 else same > 0.9, (name, same)
    m = compare(ref["logits"], got["logits"].numpy())
    assert m["cosine"] > 0.999, m


def test_imported_scales_are_used_exactly(llama_tiny_onnx):
    from maia_onnx.scales import map_scales

    model = load_model(llama_tiny_onnx)
    ckpt = {}
    for i in range(LAYERS):
        ckpt[f"model.layers.{i}.self_attn.k_scale"] = np.float32(0.02 * (i + 1))
        ckpt[f"model.layers.{i}.self_attn.v_scale"] = np.array([0.01, 0.03], np.float32)  # per head
    smap, unmatched = map_scales(model, ckpt)
    assert unmatched == []
    record = KvCacheFp8Pass("e4m3fn", "head", scales=smap.kv)(model).record  # no calibration needed
    np.testing.assert_array_equal(record.scales["present.0.value"], np.float32([0.01, 0.03]))
    init = model.graph.initializers
    np.testing.assert_array_equal(init["kv_cache.1.key_scale"].const_value.numpy(), np.float32([0.04, 0.04]))
    np.testing.assert_array_equal(init["kv_cache.0.value_scale"].const_value.numpy(), np.float32([0.01, 0.03]))
    validate_model(model)
    # the emitted scales name them back the checkpoint way
    from maia_onnx.scales import emit_scales

    emitted = emit_scales(model)
    np.testing.assert_array_equal(emitted["model.layers.0.self_attn.v_scale"], np.float32([0.01, 0.03]))


def test_errors(llama_tiny_onnx):
    with pytest.raises(InvalidOptionError, match="needs scales"):
        KvCacheFp8Pass("e4m3fn")(load_model(llama_tiny_onnx))
    with pytest.raises(InvalidOptionError, match="fp8-e4m3 or fp8-e5m2"):
        KvCacheFp8Pass("int8")
    with pytest.raises(InvalidOptionError, match=r"\[2\]"):
        KvCacheFp8Pass("e4m3fn", "head", scales={0: {"k": [1.0, 2.0, 3.0], "v": 1.0}, 1: {"k": 1.0, "v": 1.0}})(load_model(llama_tiny_onnx))
    model = ir.from_onnx_text(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2] x) => (float[2] y) { y = Relu (x) }"""
    )
    with pytest.raises(UnsupportedModelError, match="no KV cache"):
        KvCacheFp8Pass("e4m3fn", calib=[]).call(model)


@pytest.mark.parametrize("fmt,granularity", [("fp8-e4m3", "tensor"), ("fp8-e4m3", "head"), ("fp8-e5m2", "tensor")])
def test_32_step_greedy_decode_against_fp32(copy_llama, fmt, granularity):
    fp32 = load_model(copy_llama)
    pattern = np.array([[7, 42, 3, 19, 55], [11, 2, 60, 33, 8]])
    prompt = np.concatenate([pattern, pattern], axis=1)
    # the FP32 model continues the pattern: the decode itself is meaningful
    ref = greedy_decode(fp32, prompt, 32)
    np.testing.assert_array_equal(ref.tokens, np.tile(pattern, (1, 7))[:, :32])
    model = load_model(copy_llama)
    calib = [{"input_ids": np.tile(np.random.default_rng(1).integers(0, 64, (4, PATTERN)), (1, 4)), **empty_past(4)}]
    KvCacheFp8Pass(fmt, granularity, calib=calib)(model)
    result = compare_decode(DecoderSession(fp32), DecoderSession(model), prompt, steps=32)
    assert len(result.steps) == 32
    assert result.token_agreement == 1.0 and result.free_running_agreement == 1.0 and result.first_divergence is None
    # measured (docs/benchmarks.md): e4m3 min/mean 0.9993/0.9999 per tensor, 0.9934/0.9996 per head
    # (20-token calibration leaves per-head scales less headroom); e5m2 0.982/0.998
    min_floor, mean_floor = {"fp8-e4m3": (0.99, 0.9995), "fp8-e5m2": (0.97, 0.998)}[fmt]
    assert result.min_cosine > min_floor and result.mean_cosine > mean_floor, result.as_dict()
    assert result.min_cosine < 1.0  # the cache really is quantised
    # 1 byte per cached element: a quarter of FP32, half of BF16
    assert result.cache_bytes_per_token["candidate"] * 4 == result.cache_bytes_per_token["reference"]
    assert result.cache_bytes_per_token["candidate"] == 2 * LAYERS * KV_HEADS * HEAD_DIM


# ---------------------------------------------------------------------------------------------------
# HF decoder (transformers LlamaForCausalLM from a tiny config, exported through maia_onnx.hf): every
# method of this engineer's scope in one place, so the ~30 s export is paid once.
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_decoder(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from maia_onnx.export import export_spec
    from maia_onnx.hf import build_hf_spec

    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "ckpt")
    path = root / "hf.onnx"
    export_spec(build_hf_spec(str(root / "ckpt")), path)
    return path


@pytest.mark.parametrize(
    "fmt,floor", [("mxfp8-e4m3", 0.99), ("mxfp8-e5m2", 0.97), ("mxint8", 0.999), ("mxfp4", 0.9), ("mx9", 0.9998), ("mx6", 0.985)]
)
def test_hf_decoder_mx_formats(hf_decoder, fmt, floor):
    from maia_onnx.ortutil import make_inputs, run_model
    from maia_onnx.passes.quantize_mx import QuantizeMxPass

    fp32 = load_model(hf_decoder)
    feeds = make_inputs(fp32, seed=0, dims={"batch": 1, "seq": 8, "past": 4}, int_high=128)
    ref = run_model(fp32, feeds)
    result = QuantizeMxPass(fmt)(load_model(hf_decoder))
    model = result.model
    validate_model(model)
    got = run_model(model, feeds)
    assert len(result.layers) == 15  # 7 linears x 2 layers + lm_head
    assert {r.layer for r in result.layers} >= {"model.layers.0.self_attn.q_proj", "lm_head"}
    for name, r in ref.items():
        c = compare(r, got[name])["cosine"]
        assert floor < c < 1.0, (fmt, name, c)


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
def test_hf_decoder_fp8_kv_cache_decode(hf_decoder, fmt):
    from maia_onnx.scales import emit_scales, map_scales

    fp32 = load_model(hf_decoder)
    rng = np.random.default_rng(0)
    calib = [{"input_ids": rng.integers(0, 128, (2, 16)), **empty_past(2)}]
    model = load_model(hf_decoder)
    KvCacheFp8Pass(fmt, "head", calib=calib)(model)
    validate_model(model)
    prompt = rng.integers(0, 128, (1, 6))
    result = compare_decode(fp32, model, prompt, steps=32)
    assert len(result.steps) == 32
    # random-init HF weights: near-flat logits, so cosine (teacher-forced) is the meaningful check
    assert result.mean_cosine > (0.999 if fmt == "fp8-e4m3" else 0.995), result.as_dict()
    assert result.min_cosine < 1.0
    assert result.cache_bytes_per_token["candidate"] * 4 == result.cache_bytes_per_token["reference"]
    # the scales come back out under the HF checkpoint's attention module names
    emitted = emit_scales(model)
    assert set(k for k in emitted if k.endswith(("k_scale", "v_scale"))) == {
        f"model.layers.{i}.self_attn.{s}" for i in range(LAYERS) for s in ("k_scale", "v_scale")
    }
    smap, unmatched = map_scales(load_model(hf_decoder), emitted)
    assert unmatched == [] and sorted(smap.kv) == [0, 1]


def test_decode_report_is_json_ready(llama_tiny_onnx):
    from maia_onnx.decode import decode_report, step_rows
    from maia_onnx.report import dumps

    fp32 = load_model(llama_tiny_onnx)
    model = load_model(llama_tiny_onnx)
    KvCacheFp8Pass("fp8-e4m3", calib=calib_feeds())(model)
    report = decode_report(fp32, model, steps=4)
    assert len(report["steps"]) == 4 and len(report["prompt"][0]) == 8
    assert max(report["prompt"][0]) < 256
    text = dumps(report)
    assert '"token_agreement"' in text
    rows = step_rows(report)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all(0.99 < r["cosine"] <= 1.0 for r in rows)
