"""`quant.quality.compare` against perplexity, KL and top-1 agreement computed directly in
numpy (float64, from the reference forward pass) for two models that really differ."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from reference import forward as numpy_forward

from elm_mlx.model.openelm import OpenELM
from elm_mlx.quant.quality import compare, token_windows
from elm_mlx.testing import random_weights, tiny_args


def model_of(args, weights: dict) -> OpenELM:
    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return model


def log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def direct(args, weights_a: dict, weights_b: dict, windows: np.ndarray) -> dict:
    """Everything `compare` reports, from float64 logits and the textbook formulas."""
    cfg = args.to_dict()
    a = np.stack([log_softmax(numpy_forward(cfg, weights_a, w[:-1].tolist())) for w in windows])
    b = np.stack([log_softmax(numpy_forward(cfg, weights_b, w[:-1].tolist())) for w in windows])
    targets = windows[:, 1:, None]  # (N, L, 1)
    nll_a = -np.take_along_axis(a, targets, axis=-1).mean()
    nll_b = -np.take_along_axis(b, targets, axis=-1).mean()
    return {
        "tokens": targets.size,
        "ppl_a": np.exp(nll_a),
        "ppl_b": np.exp(nll_b),
        "kl_ab": (np.exp(a) * (a - b)).sum(-1).mean(),  # KL(a || b): a's probabilities weigh
        "kl_ba": (np.exp(b) * (b - a)).sum(-1).mean(),
        "top1": (a.argmax(-1) == b.argmax(-1)).mean(),
    }


def test_compare_equals_a_direct_numpy_computation():
    args = tiny_args(vocab_size=96, tied=False)
    float_weights = {k: v if "norm" in k else 4 * v for k, v in random_weights(args, 1).items()}
    # The other model: a sharper, noisy output head on the same blocks. It agrees on the top
    # token about 60% of the time; its KL from the float model is clearly not the reverse KL.
    noise = random_weights(args, 2)["lm_head.weight"]
    other_weights = {**float_weights, "lm_head.weight": 2.5 * float_weights["lm_head.weight"]}
    other_weights["lm_head.weight"] += 4 * noise
    float_model, other_model = model_of(args, float_weights), model_of(args, other_weights)
    ids = np.random.default_rng(3).integers(0, args.vocab_size, 190)
    windows = token_windows(ids.tolist(), seq_len=31)  # (6, 32): batches of 4 and 2
    assert windows.shape == (6, 32)
    want = direct(args, float_weights, other_weights, np.asarray(windows))
    # The two models differ enough that swapping any two quantities (or the KL's direction)
    # would show, far beyond the tolerances below.
    assert abs(want["ppl_a"] / want["ppl_b"] - 1) > 0.05
    assert abs(want["kl_ab"] / want["kl_ba"] - 1) > 0.05
    assert 0.2 < want["top1"] < 0.9

    got = compare(float_model, other_model, windows, batch_size=4)
    assert got.tokens == want["tokens"] == 6 * 31
    assert np.isclose(got.ppl_float, want["ppl_a"], rtol=1e-4)
    assert np.isclose(got.ppl_quant, want["ppl_b"], rtol=1e-4)
    assert np.isclose(got.mean_kl, want["kl_ab"], rtol=1e-3)  # KL(float || quantized)
    assert abs(got.top1_agreement - want["top1"]) <= 1 / want["tokens"]
