"""QatImportPass: fake-quant chains, weight QDQ and folded fake-quant weights -> FP8 QDQ with the learned scales."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from maia_onnx.formats.fp8 import cast_fp8_saturate
from maia_onnx.ortutil import compare, run_model
from maia_onnx.passes.qat_import import QatImportPass, QatImportResult, QatRecord, _fp8_grid_scale
from maia_onnx.pipeline import validate_model

CHAIN = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[4,16] x) => (float[4,8] y) {
  d = Div (x, s_in)
  c = Clip (d, lo, hi)
  c8 = Cast <to = 17> (c)
  cf = Cast <to = 1> (c8)
  xq = Mul (cf, s_in)
  wd = Div (w, s_w)
  w8 = Cast <to = 17> (wd)
  wf = Cast <to = 1> (w8)
  wq = Mul (s_w, wf)
  y = MatMul (xq, wq)
}
"""


def with_inits(text, **arrays) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(a), n) for n, a in arrays.items())
    return ir.from_proto(proto)


def chain_model():
    rng = np.random.default_rng(0)
    return with_inits(
        CHAIN,
        s_in=np.float32(0.011),
        s_w=np.float32(0.0007),
        lo=np.float32(-448),
        hi=np.float32(448),
        w=(rng.standard_normal((16, 8)) * 0.1).astype(np.float32),
    )


def test_cast_chain_becomes_qdq_with_same_numbers():
    x = (np.random.default_rng(1).standard_normal((4, 16)) * 3).astype(np.float32)
    ref = run_model(chain_model(), {"x": x})["y"]
    model = chain_model()
    result = QatImportPass()(model)
    assert isinstance(result, QatImportResult) and result.modified and all(isinstance(r, QatRecord) for r in result.records)
    validate_model(model)
    ops = [n.op_type for n in model.graph]
    assert "Cast" not in ops and "Div" not in ops
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2
    fp8 = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT8E4M3FN]
    assert len(fp8) == 1 and fp8[0].const_value.nbytes == 16 * 8
    w = chain_model().graph.initializers["w"].const_value.numpy()
    np.testing.assert_array_equal(fp8[0].const_value.numpy().astype(np.float32), cast_fp8_saturate(w / np.float32(0.0007)).astype(np.float32))
    got = run_model(model, {"x": x})["y"]
    # same quantised operands in both graphs: identical up to float summation
    assert compare(ref, got)["max_rel"] < 1e-6
    assert {r.kind for r in result.records} == {"fake-quant weight", "fake-quant activation"}
    assert [r.scale for r in result.records if r.kind == "fake-quant weight"] == [pytest.approx(0.0007)]
    assert all(r.source == "graph" and r.exact and r.format == "e4m3fn" for r in result.records)
    assert all("layer" not in r.as_dict() for r in result.records)  # the report's layout: layer only for folded weights


def test_weight_qdq_folds_int8_and_fp8():
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2,8] x) => (float[2,4] y) {
      q = QuantizeLinear (w, s, zp)
      wd = DequantizeLinear (q, s, zp)
      y = MatMul (x, wd)
    }
    """
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    for zp in (np.int8(3), np.zeros((), ml_dtypes.float8_e4m3fn)):
        ref = run_model(with_inits(text, w=w, s=np.float32(0.05), zp=zp), {"x": x})["y"]
        model = with_inits(text, w=w, s=np.float32(0.05), zp=zp)
        QatImportPass()(model)
        assert [n.op_type for n in model.graph] == ["DequantizeLinear", "MatMul"]
        assert "w" not in model.graph.initializers
        np.testing.assert_array_equal(run_model(model, {"x": x})["y"], ref)


def test_folded_grid_weights_inferred_and_plain_weights_untouched():
    rng = np.random.default_rng(3)
    s = np.float32(0.00123)
    w_fq = (cast_fp8_saturate(rng.standard_normal((32, 16)).astype(np.float32) * 0.2 / s).astype(np.float32) * s).astype(np.float32)
    plain = rng.standard_normal((16, 4)).astype(np.float32)
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2,32] x) => (float[2,4] y) {
      h = MatMul (x, wq)
      y = MatMul (h, wp)
    }
    """
    x = rng.standard_normal((2, 32)).astype(np.float32)
    ref = run_model(with_inits(text, wq=w_fq, wp=plain), {"x": x})["y"]
    model = with_inits(text, wq=w_fq, wp=plain)
    result = QatImportPass()(model)
    assert "wp" in model.graph.initializers  # a plain float weight is on no FP8 grid
    assert "wq" not in model.graph.initializers
    (rec,) = result.records
    assert rec.kind == "folded weight" and rec.value == "wq" and rec.source == "inferred" and rec.exact
    assert "layer" in rec.as_dict()
    # the recovered scale equals the learned one up to a power of two
    ratio = rec.scale / float(s)
    assert ratio == 2.0 ** round(np.log2(ratio))
    np.testing.assert_array_equal(run_model(model, {"x": x})["y"], ref)
    assert _fp8_grid_scale(plain, __import__("maia_onnx.formats.fp8", fromlist=["x"]).FP8_E4M3FN) is None


def fq_fp8(torch, x, s, ste: bool):
    q = (x / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype)
    if ste:  # LSQ-style straight-through estimator: gradient reaches x and the scale
        q = x / s + (q - x / s).detach()
    return q * s


@pytest.fixture(scope="module")
def qat_export(tmp_path_factory):
    """A 2-layer MLP trained 40 steps with FP8 fake quant (learned per-layer scales), exported by maia_onnx.export."""
    torch = pytest.importorskip("torch")
    from maia_onnx.export import export_spec
    from maia_onnx.models.registry import ModelSpec

    class QLinear(torch.nn.Module):
        def __init__(self, i, o, gen):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(o, i, generator=gen) * 0.1)
            self.bias = torch.nn.Parameter(torch.zeros(o))
            self.weight_scale = torch.nn.Parameter(torch.tensor(0.4 / 448))
            self.input_scale = torch.nn.Parameter(torch.tensor(4.0 / 448))
            self.ste = True

        def forward(self, x):
            w = fq_fp8(torch, self.weight, self.weight_scale.abs(), self.ste)  # scales stay positive
            return torch.nn.functional.linear(fq_fp8(torch, x, self.input_scale.abs(), self.ste), w, self.bias)

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.fc1, self.fc2 = QLinear(64, 96, gen), QLinear(96, 32, gen)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    model = Mlp()
    target = torch.nn.Linear(64, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        x = torch.randn(32, 64)
        loss = torch.nn.functional.mse_loss(model(x), target(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for m in (model.fc1, model.fc2):
        m.ste = False
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(7))
    path = tmp_path_factory.mktemp("qat") / "qat.onnx"
    export_spec(ModelSpec("qat-mlp", model, {"x": x}, ["x"], ["y"]), path)
    with torch.no_grad():
        expected = model(x).numpy()
    scales = {f"{n}.{k}": float(getattr(getattr(model, n), k).detach().abs()) for n in ("fc1", "fc2") for k in ("weight_scale", "input_scale")}
    return path, x.numpy(), expected, scales


def test_qat_round_trip_matches_pytorch_fake_quant(qat_export):
    from maia_onnx.io import load_model
    from maia_onnx.scales import emit_scales, map_scales

    path, x, expected, learned = qat_export
    assert learned["fc1.input_scale"] != pytest.approx(4.0 / 448)  # training moved the scales
    model = load_model(path)
    # the exporter folded the weight fake quant; the checkpoint's weight_scale names put the learned scales back
    smap, unmatched = map_scales(model, {k: np.float32(v) for k, v in learned.items()})
    assert unmatched == []
    result = QatImportPass(weight_scales=smap.weight_scales)(model)
    assert result.modified
    validate_model(model)
    ops = [n.op_type for n in model.graph]
    assert "Cast" not in ops
    assert ops.count("DequantizeLinear") == 4 and ops.count("QuantizeLinear") == 2
    weights = [r for r in result.records if "weight" in r.kind]
    assert len(weights) == 2 and all(r.exact for r in weights)
    got = run_model(model, {"x": x})["y"]
    m = compare(expected, got)
    assert m["max_rel"] < 1e-4 and m["cosine"] > 0.999999, m
    emitted = emit_scales(model)
    for k, v in learned.items():
        assert float(emitted[k]) == pytest.approx(v, rel=1e-6), k  # learned scales kept, same names


def test_qat_round_trip_with_inferred_weight_scales(qat_export):
    from maia_onnx.io import load_model

    path, x, expected, _ = qat_export
    model = load_model(path)
    result = QatImportPass()(model)
    assert sum(r.kind == "folded weight" for r in result.records) == 2
    fp8_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT8E4M3FN)
    assert fp8_bytes == 64 * 96 + 96 * 32
    assert compare(expected, run_model(model, {"x": x})["y"])["max_rel"] < 1e-4


def test_has_fake_quant_detects_qat_graphs():
    from maia_onnx.passes.qat_import import has_fake_quant

    assert has_fake_quant(chain_model())
    plain = with_inits(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,4] x) => (float[2,4] y) { y = MatMul (x, w) }""",
        w=np.eye(4, dtype=np.float32),
    )
    assert not has_fake_quant(plain)
