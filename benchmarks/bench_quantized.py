"""Prompt and decode speed of quantized OpenELM-270M-shaped models, ours and mlx-lm's.

    python benchmarks/bench_quantized.py [--prompt 64] [--decode 16] [--no-mlx-lm]

Random weights with the published 270M shapes (elm_mlx.testing), OpenBLAS
preloaded for MLX's float matmuls (elm_mlx.runtime.blas). Each variant is warmed up on
an 8-token prompt (MLX compiles its CPU kernels on first use), then timed:
prompt tok/s is the prompt length over the time to the first new token, decode
tok/s the remaining tokens over their time, greedy. Variants:

- float32 / bfloat16: the float model.
- q4/q8 f32 model, f32 scales: our CPU default (activations stay float32).
- q4/q8 bf16 model, bf16 scales: the usual mlx-community format.
- q4 bf16 scales cast to f32: that format after `cast_scales(model, mx.float32)`.

mlx-lm rows load the same quantized weights from a saved directory into
mlx-lm's own OpenELM and time its generate_step. Other processes on the machine
skew the numbers; compare rows of one run.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elm_mlx.runtime.blas import preload_blas  # noqa: E402  (imports no MLX)

# (name, model dtype, bits or None, scales dtype, cast scales to float32 after quantizing)
VARIANTS = [
    ("float32", "float32", None, None, False),
    ("bfloat16", "bfloat16", None, None, False),
    ("q4 f32 model, f32 scales", "float32", 4, "float32", False),
    ("q4 bf16 model, bf16 scales", "bfloat16", 4, "bfloat16", False),
    ("q4 bf16 scales cast to f32", "bfloat16", 4, "bfloat16", True),
    ("q8 f32 model, f32 scales", "float32", 8, "float32", False),
    ("q8 bf16 model, bf16 scales", "bfloat16", 8, "bfloat16", False),
]


def build(args, weights, dtype: str, bits: int | None, scales: str | None, cast: bool):
    import mlx.core as mx

    from elm_mlx.model.openelm import OpenELM
    from elm_mlx.quant import quantize as q

    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    model.set_dtype(getattr(mx, dtype))
    if bits is not None:
        q.quantize_model(model, q.QuantizeSpec(bits, 64, scales_dtype=scales))
        if cast:
            q.cast_scales(model, mx.float32)
    mx.eval(model.parameters())
    return model


def timed(generate, prompt: list[int], decode: int) -> tuple[float, float]:
    """(prompt tok/s, decode tok/s) of `generate(prompt, max_tokens)` after a short warm-up
    (it builds MLX's kernels for the prompt and the one-token paths)."""
    for _ in itertools.islice(generate(prompt[:8], 2), 2):
        pass
    start = time.perf_counter()
    tokens = generate(prompt, decode)
    next(tokens)  # the whole prompt has gone through the model
    first = time.perf_counter()
    n = sum(1 for _ in tokens)
    end = time.perf_counter()
    return len(prompt) / (first - start), n / (end - first)


def ours(model):
    from elm_mlx.generation.generate import generate_step

    return lambda prompt, n: generate_step(prompt, model, max_tokens=n)


def theirs(model):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return lambda prompt, n: generate_step(mx.array(prompt), model, max_tokens=n)


def mlx_lm_model(model, workdir: Path, name: str):
    from mlx_lm.utils import load_model

    from elm_mlx.formats import modeldir as mio

    path = mio.save_model(workdir / name.replace(" ", "_").replace(",", ""), model, model.args)
    return load_model(path)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=16, help="new tokens")
    parser.add_argument("--no-mlx-lm", action="store_true", help="skip the mlx-lm rows")
    parser.add_argument("--only", help="run only variants whose name contains this")
    opts = parser.parse_args()
    blas = preload_blas()

    import numpy as np

    from elm_mlx.model.config import preset
    from elm_mlx.quant.quantize import bits_per_weight
    from elm_mlx.testing import random_weights

    args = preset("OpenELM-270M")
    weights = random_weights(args, seed=0)
    prompt = np.random.default_rng(0).integers(3, args.vocab_size, opts.prompt).tolist()
    print(f"OpenELM-270M shapes, random weights; prompt {opts.prompt}, decode {opts.decode}; "
          f"BLAS preload: {blas or 'none'}")  # fmt: skip
    print(f"{'impl':<8} {'variant':<28} {'bits/w':>6} {'prompt tok/s':>13} {'decode tok/s':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, dtype, bits, scales, cast in VARIANTS:
            if opts.only and opts.only not in name:
                continue
            model = build(args, weights, dtype, bits, scales, cast)
            runs = [("elm_mlx", ours(model))]
            if bits is not None and not cast and not opts.no_mlx_lm:
                runs.append(("mlx-lm", theirs(mlx_lm_model(model, Path(tmp), name))))
            for impl, generate in runs:
                p, d = timed(generate, prompt, opts.decode)
                bpw = bits_per_weight(model)
                print(f"{impl:<8} {name:<28} {bpw:>6.2f} {p:>13.1f} {d:>13.2f}", flush=True)
            del model, runs


if __name__ == "__main__":
    main()
