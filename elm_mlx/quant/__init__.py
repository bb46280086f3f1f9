"""Quantization: recipes and quantize, the CPU quantized layers, the quality report."""
