"""Device rules: what "on the CPU" means and the dtypes used when the user picks none."""

from __future__ import annotations

import mlx.core as mx


def on_cpu(device: mx.Device | None = None) -> bool:
    """Whether `device` (default: MLX's default device) is the CPU."""
    device = device or mx.default_device()
    return device.type == mx.DeviceType.cpu


def default_dtype(device: mx.Device | None = None) -> mx.Dtype:
    """Compute dtype when the user picks none: float32 on the CPU, bfloat16 on a GPU.

    MLX's CPU kernels for half precision are slower than its float32 BLAS path
    (`benchmarks/bench_kernels.py` measures it); GPUs are faster in half precision,
    and bfloat16 (unlike float16) does not overflow in OpenELM-3B.
    """
    return mx.float32 if on_cpu(device) else mx.bfloat16


def default_scales_dtype(model_dtype: mx.Dtype, device: mx.Device | None = None) -> mx.Dtype:
    """Scales and biases dtype of a quantized model when the user picks none.

    float32 on the CPU, where MLX's quantized matmul is much slower in half precision
    (`benchmarks/bench_quantized.py` measures it) and float32 scales keep activations in
    float32; elsewhere the model's own dtype, the format of mlx-community checkpoints.
    """
    return mx.float32 if on_cpu(device) else model_dtype
