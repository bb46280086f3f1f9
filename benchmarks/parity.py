"""Print how closely elm_mlx's OpenELM matches mlx-lm's and a float64 numpy reference.

Same random weights for all three; relative error = max |a - b| / max |b| over the logits.

    python benchmarks/parity.py            # tiny configs and the 270M shapes
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models import openelm as mlx_lm_openelm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import forward as numpy_forward  # noqa: E402

from elm_mlx.model.config import preset  # noqa: E402
from elm_mlx.model.openelm import OpenELM  # noqa: E402
from elm_mlx.testing import random_weights, tiny_args  # noqa: E402


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def load(cls, args, weights):
    model = cls(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return model


def compare(name: str, args, seed: int = 0, length: int = 16) -> None:
    t = time.perf_counter()
    weights = random_weights(args, seed)
    ids = np.random.default_rng(seed).integers(0, args.vocab_size, length).tolist()
    ours = load(OpenELM, args, weights)
    theirs = load(mlx_lm_openelm.Model, mlx_lm_openelm.ModelArgs.from_dict(args.to_dict()), weights)
    x = mx.array([ids])
    a, b = ours(x)[0], theirs(x)[0]
    ref = numpy_forward(args.to_dict(), weights, ids)
    cache = ours.make_cache()
    steps = [ours(x[:, : length // 2], cache=cache)[0]]
    steps += [ours(x[:, t : t + 1], cache=cache)[0] for t in range(length // 2, length)]
    cached = mx.concatenate(steps, axis=0)
    print(
        f"{name:<22} vs mlx-lm {rel_err(a, b):.2e}   vs numpy float64 {rel_err(a, ref):.2e}   "
        f"mlx-lm vs numpy {rel_err(b, ref):.2e}   cached vs full {rel_err(cached, a):.2e}   "
        f"({time.perf_counter() - t:.1f} s)"
    )


def main() -> None:
    print("relative error of float32 logits (max |diff| / max |reference|), 16 tokens")
    compare("tiny gqa4 tied", tiny_args(num_gqa_groups=4, tied=True))
    compare("tiny gqa2 untied", tiny_args(num_gqa_groups=2, tied=False))
    compare("OpenELM-270M shapes", preset("OpenELM-270M"))


if __name__ == "__main__":
    main()
