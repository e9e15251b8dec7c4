"""Graph passes over onnx_ir models (one pass per file): quantization, KV cache, partitioning."""
