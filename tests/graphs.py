"""Small ONNX graphs written from ONNX text for tests that need a model file."""

from __future__ import annotations

from pathlib import Path


MLP_TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[batch, {n_in}] x) => (float[batch, 10] logits) {{
   h = MatMul(x, W1)
   r = Relu(h)
   logits = Gemm <transB = 1> (r, W2, b)
}}
"""


def write_mlp(path: Path, n_in: int = 64, seed: int = 0) -> Path:
    """A 2-layer MLP (MatMul + Relu + Gemm, hidden 64, 10 outputs) from ONNX text with seeded weights, saved at ``path``."""
    import numpy as np
    import onnx
    import onnx_ir as ir

    from maia_onnx.io import save_model

    rng = np.random.default_rng(seed)
    proto = onnx.parser.parse_model(MLP_TEXT.format(n_in=n_in))
    proto.graph.initializer.extend([
        onnx.numpy_helper.from_array(rng.standard_normal((n_in, 64)).astype(np.float32), "W1"),
        onnx.numpy_helper.from_array(rng.standard_normal((10, 64)).astype(np.float32) * 0.2, "W2"),
        onnx.numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b"),
    ])
    save_model(ir.serde.deserialize_model(proto), path)
    return path
