"""The CPU quantized layers (quant/qlayers.py) with activations and scales of different
dtypes, as a bfloat16 model quantized on the CPU has them (float32 scales by default):
against MLX's own quantized kernels and a numpy dequantization of the packed weights."""

from __future__ import annotations

import itertools

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from elm_mlx.quant.qlayers import DENSE_ROWS, use_cpu_layers

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
BITS, GROUP = 4, 32


def numpy_dequantize(layer) -> np.ndarray:
    """(out, in) float64 weights from the packed uint32 words, low bits first."""
    packed = np.asarray(layer.weight).astype(np.uint64)  # (out, in * bits / 32)
    per_word = 32 // layer.bits
    shifts = (np.arange(per_word, dtype=np.uint64) * layer.bits)[None, None]
    q = (packed[..., None] >> shifts) & ((1 << layer.bits) - 1)  # (out, words, per_word)
    q = q.reshape(packed.shape[0], -1).astype(np.float64)  # (out, in)
    scales = np.asarray(layer.scales.astype(mx.float32), np.float64)  # (out, in / group)
    biases = np.asarray(layer.biases.astype(mx.float32), np.float64)
    return q * np.repeat(scales, layer.group_size, 1) + np.repeat(biases, layer.group_size, 1)


def quantized_pair(kind: str, scales_dtype):
    """(MLX's layer, the same arrays as our CPU layer)."""
    mx.random.seed(0)
    if kind == "linear":
        plain = nn.QuantizedLinear.from_linear(nn.Linear(64, 48, bias=True), GROUP, BITS)
        plain.bias = plain.bias * 10
    else:
        plain = nn.QuantizedEmbedding.from_embedding(nn.Embedding(48, 64), GROUP, BITS)
    plain.scales = plain.scales.astype(scales_dtype)
    plain.biases = plain.biases.astype(scales_dtype)
    ours = type(plain).__new__(type(plain))
    ours.__dict__.update(plain.__dict__)
    dict.update(ours, plain)
    use_cpu_layers(nn.Sequential(ours))  # swaps the class in place
    assert type(ours) is not type(plain)
    return plain, ours


def call(layer, x):
    return layer.as_linear(x) if isinstance(layer, nn.QuantizedEmbedding) else layer(x)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
@pytest.mark.parametrize("x_name, s_name", list(itertools.product(DTYPES, DTYPES)))
@pytest.mark.parametrize("rows", [1, DENSE_ROWS, 40])
def test_mixed_dtypes_match_mlx_kernels_and_numpy(kind, x_name, s_name, rows):
    plain, ours = quantized_pair(kind, DTYPES[s_name])
    x = mx.random.normal((2, rows, 64), key=mx.random.key(rows)).astype(DTYPES[x_name])
    got, want = call(ours, x), call(plain, x)  # (2, rows, 48)
    assert got.dtype == want.dtype  # float32 unless activations and scales share a dtype
    tol = 1e-5 if x_name == s_name == "float32" else 2e-2  # half precision somewhere
    x64 = np.asarray(x.astype(mx.float32), np.float64)
    reference = x64 @ numpy_dequantize(plain).T
    if kind == "linear":
        reference = reference + np.asarray(plain.bias, np.float64)
    for out in (got, want):
        out = np.asarray(out.astype(mx.float32), np.float64)
        assert np.isfinite(out).all()
        assert np.abs(out - reference).max() <= tol * np.abs(reference).max()
