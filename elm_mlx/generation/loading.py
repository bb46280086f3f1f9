"""Loading a model for generation: the one place that picks the compute dtype, applies
adapters and decides whether the CPU decodes through the numpy path; and what a model
directory suggests for generating with it (sampling defaults, the chat template)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..formats.modeldir import (
    GENERATION_CONFIG,
    as_dtype,
    default_model_path,
    dtype_name,
    load,
    read_generation_config,
    require_tokenizer,
)
from ..formats.tokenizer import Tokenizer
from ..runtime.blas import blas_description
from ..runtime.device import default_dtype
from ..runtime.fastpath import fast_decoder, fast_path_description
from .generate import GenerationSettings
from .sample import check_sampling

# generation_config.json keys (Hugging Face's names) -> GenerationSettings fields.
_SUGGESTED = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k"}


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
    fast_path: bool = True,
) -> tuple[object, Tokenizer, LoadReport]:
    """(model, tokenizer, report) ready for `generate_step`, `stream_generate` or a server.

    `path` is a model directory or hub id (None: the shipped nano model). `dtype="auto"`
    computes a float model in float32 on the CPU and bfloat16 on a GPU; quantized models
    keep their scales' dtype. `fast_path=True` decodes single sequences through the numpy
    path where it applies (MLX on the CPU, float32 plain layers); False keeps MLX's kernels.
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
    if fast_path:
        model = fast_decoder(model)
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


def sampling_defaults(path: str | Path | None = None) -> dict:
    """`GenerationSettings` fields (`temp`, `top_p`, `top_k`) that a local model directory's
    generation_config.json suggests; {} without one or when it does not sample
    (`do_sample` false). A file that cannot be used raises ValueError naming it."""
    directory = default_model_path() if path is None else Path(path)
    config = read_generation_config(directory) or {}
    if not config.get("do_sample"):
        return {}
    fields = {}
    for key, field in _SUGGESTED.items():
        value = config.get(key)
        if value is None:
            continue
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"must be a number, got {value!r}")
            check_sampling(**{field: value})
        except ValueError as e:
            file = directory / GENERATION_CONFIG
            raise ValueError(f"{file}: {key} cannot be used: {e}") from None
        fields[field] = value if field == "top_k" else float(value)
    return fields


def generation_settings(path: str | Path | None = None, **given) -> GenerationSettings:
    """Settings for generating with the model at `path`: `given` fields (None: not given)
    win over the model's `sampling_defaults`, which win over GenerationSettings' own."""
    chosen = {k: v for k, v in given.items() if v is not None}
    return GenerationSettings(**{**sampling_defaults(path), **chosen})


def is_instruct(path: str | Path | None) -> bool:
    """Whether a model's name (directory or hub id) marks an Instruct model, whose prompts
    go through the chat template. None (the shipped nano model) is a base model."""
    name = str(path or "").rstrip("/\\").replace("\\", "/").split("/")[-1]
    return "instruct" in name.lower()
