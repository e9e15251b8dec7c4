"""Triton kernels for FP8/MX (de)quantization and dequant-fused matmul (the `kernels` extra)."""
