"""Quantized layers whose many-row products go through BLAS on the CPU.

MLX's CPU quantized matmul works one input row at a time, so prompts and
training batches cost (rows x) a decode step; from a few rows on it is cheaper
to dequantize the matrix once and multiply with BLAS (float32). These subclasses
of `nn.QuantizedLinear` and `nn.QuantizedEmbedding` (the tied head's `as_linear`)
take that route on the CPU for inputs of `DENSE_ROWS` rows or more. Their
parameters, config and saved files are the standard ones (mlx-lm and LoRA see
ordinary quantized layers); one-row decoding and GPUs keep MLX's quantized kernels.

This module imports only MLX and the device rules.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..runtime.device import on_cpu

# Rows from which dequantize + BLAS beats MLX's CPU quantized matmul (the crossover lies
# a little below it on 4- and 8-bit matrices of the published sizes).
DENSE_ROWS = 8


def _dense(x: mx.array) -> bool:
    return x.size >= DENSE_ROWS * x.shape[-1] and on_cpu()


def _dense_matmul(layer: nn.Module, x: mx.array) -> mx.array:
    """x @ dequantized(weight).T in float32, in the dtype the quantized kernel would return."""
    w = mx.dequantize(
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )  # (out, in)
    y = x.astype(mx.float32) @ w.astype(mx.float32).T  # (..., out)
    return y.astype(_result_dtype(x.dtype, layer["scales"].dtype))


def _result_dtype(a: mx.Dtype, b: mx.Dtype) -> mx.Dtype:
    """The dtype MLX's quantized matmul returns for inputs `a` and scales `b`."""
    return a if a == b else mx.float32


class CpuQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear; on the CPU, inputs of DENSE_ROWS rows or more use BLAS."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _dense(x):
            return super().__call__(x)
        y = _dense_matmul(self, x)
        return y + self["bias"] if "bias" in self else y


class CpuQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose `as_linear` (the tied head) uses BLAS for many rows."""

    def as_linear(self, x: mx.array) -> mx.array:
        return _dense_matmul(self, x) if _dense(x) else super().as_linear(x)


_CPU_CLASSES = {
    nn.QuantizedLinear: CpuQuantizedLinear,
    nn.QuantizedEmbedding: CpuQuantizedEmbedding,
}


def use_cpu_layers(model: nn.Module) -> nn.Module:
    """Make every affine quantized layer of `model` one of the classes above, in place.

    The layers keep their arrays (nothing is copied); only the class changes."""
    for _, m in model.named_modules():
        cls = _CPU_CLASSES.get(type(m))
        if cls is not None and m.mode == "affine":
            m.__class__ = cls
    return model
