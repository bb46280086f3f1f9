"""Loading a model for generation: the one place that picks the compute dtype, applies
adapters and decides whether the CPU decodes through the numpy path."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..formats.modeldir import as_dtype, default_model_path, dtype_name, load, require_tokenizer
from ..runtime.blas import blas_description
from ..runtime.device import default_dtype
from ..runtime.fastpath import fast_decoder, fast_path_description
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class LoadReport:
    """What `load_for_generation` chose, for `-v` output."""

    path: str
    parameters: int
    seconds: float
    stored: mx.Dtype
    compute: mx.Dtype
    dtype_rule: str
    blas: str
    fast_path: str

    def lines(self) -> list[str]:
        how = "as stored" if self.compute == self.stored else f"stored {dtype_name(self.stored)}"
        if self.dtype_rule:
            how += f"; {self.dtype_rule}"
        return [
            f"loaded {self.path}: {self.parameters / 1e6:.1f}M parameters, {self.seconds:.2f}s",
            f"compute dtype: {dtype_name(self.compute)} ({how})",
            f"BLAS: {self.blas}",
            f"CPU fast path: {self.fast_path}",
        ]


def load_for_generation(
    path: str | Path | None = None,
    *,
    adapter_path: str | Path | None = None,
    dtype: str | mx.Dtype = "auto",
    fast_path: bool | None = None,
) -> tuple[object, Tokenizer, LoadReport]:
    """(model, tokenizer, report) ready for `generate_step`, `stream_generate` or a server.

    `path` is a model directory or hub id (None: the shipped nano model). `dtype="auto"`
    computes a float model in float32 on the CPU and bfloat16 on a GPU; quantized models
    keep their scales' dtype. `fast_path=None` decodes single sequences through the numpy
    path when MLX runs on the CPU; False keeps MLX's kernels everywhere.
    """
    start = time.perf_counter()
    path = str(default_model_path()) if path is None else str(path)
    model, tokenizer = load(path)
    tokenizer = require_tokenizer(tokenizer, path)
    stored = model.transformer.norm.weight.dtype
    rule = ""
    if model.args.quantization is None:
        want = default_dtype() if dtype == "auto" else as_dtype(dtype)
        if dtype == "auto":
            rule = "dtype auto: float32 on the CPU, bfloat16 on a GPU"
        if want != stored:
            model.set_dtype(want)
    compute = model.transformer.norm.weight.dtype
    if adapter_path is not None:
        from ..training.lora import apply_adapters

        apply_adapters(model, adapter_path)
    model = fast_decoder(model, enabled=fast_path)
    report = LoadReport(
        path=path,
        parameters=model.args.num_parameters(),
        seconds=time.perf_counter() - start,
        stored=stored,
        compute=compute,
        dtype_rule=rule,
        blas=blas_description(),
        fast_path=fast_path_description(model),
    )
    return model, tokenizer, report
