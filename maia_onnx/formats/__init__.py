"""The one NumPy reference for every number format (FP8, MX, mx9/mx6, BF16)."""
