"""The MLX OpenELM against independent implementations on the same random weights."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import openelm as mlx_lm_openelm
from reference import forward as numpy_forward

from elm_mlx.model.openelm import OpenELM
from elm_mlx.testing import random_weights, tiny_args

VARIANTS = [
    pytest.param(dict(num_gqa_groups=4, tied=True), id="gqa4-tied"),
    pytest.param(dict(num_gqa_groups=2, tied=False), id="gqa2-untied"),
    pytest.param(dict(num_gqa_groups=1, tied=True, layers=3), id="mha-tied"),
]


def build(args, weights, dtype=mx.float32):
    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    model.set_dtype(dtype)
    return model


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(params=VARIANTS)
def tiny(request):
    args = tiny_args(**request.param)
    return args, random_weights(args, seed=3)


def test_layers_really_differ(tiny):
    args, _ = tiny
    assert len(set(args.num_query_heads)) > 1
    assert len({args.ffn_dim(i) for i in range(args.num_transformer_layers)}) > 1


def test_matches_numpy_float64_reference(tiny):
    args, weights = tiny
    ids = [5, 17, 3, 99, 42, 8, 61, 0, 127, 33, 12]
    ours = build(args, weights)(mx.array([ids]))[0]
    ref = numpy_forward(args.to_dict(), weights, ids)
    assert rel_err(ours, ref) < 1e-4


def test_matches_mlx_lm(tiny):
    args, weights = tiny
    theirs = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(args.to_dict()))
    theirs.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    ids = mx.array(np.random.default_rng(0).integers(0, args.vocab_size, (2, 13)))
    ours = build(args, weights)(ids)
    assert ours.shape == (2, 13, args.vocab_size)
    assert rel_err(ours, theirs(ids)) < 1e-4


def test_cached_decoding_equals_full_recompute(tiny):
    args, weights = tiny
    model = build(args, weights)
    ids = mx.array(np.random.default_rng(1).integers(0, args.vocab_size, (2, 20)))
    full = model(ids)
    cache = model.make_cache()
    steps = [model(ids[:, :7], cache=cache)]  # a prompt, then a chunk, then single tokens
    steps.append(model(ids[:, 7:12], cache=cache))
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)]
    assert cache[0].offset == 20
    assert rel_err(mx.concatenate(steps, axis=1), full) < 1e-5


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_close_to_float32(tiny, dtype):
    args, weights = tiny
    ids = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    ref = build(args, weights)(ids)
    half = build(args, weights, dtype)(ids)
    assert half.dtype == dtype
    assert rel_err(half.astype(mx.float32), ref) < 0.05


def test_parameter_count_matches_module():
    args = tiny_args(tied=False)
    from mlx.utils import tree_flatten

    n = sum(v.size for _, v in tree_flatten(OpenELM(args).parameters()))
    assert n == args.num_parameters()
