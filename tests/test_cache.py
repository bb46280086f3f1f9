"""KV caches: growth in steps, trim, save/restore, context limit, rotating window."""

import mlx.core as mx
import numpy as np
import pytest

from elm_mlx.model.cache import ContextLengthError, KVCache, RotatingKVCache, load_cache, save_cache
from elm_mlx.testing import random_model, tiny_args


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_args(num_gqa_groups=2), 5)


def ids(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 128, (1, n)))


def test_one_cache_per_layer_shaped_by_its_own_kv_heads(model):
    cache = model.make_cache()
    model(ids(5), cache=cache)
    assert [c.keys.shape[1] for c in cache] == model.args.num_kv_heads
    assert all(c.keys.shape[2] == KVCache.step for c in cache)  # preallocated, not 5


def test_buffer_grows_in_steps_not_per_token():
    c = KVCache()
    k = mx.ones((1, 2, 1, 4))
    buffers = set()
    for _ in range(300):
        c.update_and_fetch(k, k)
        buffers.add(c.keys.shape[2])
    assert buffers == {256, 512}


def test_trim_then_continue_equals_fresh(model):
    x = ids(12)
    cache = model.make_cache()
    model(x[:, :10], cache=cache)
    assert [c.trim(4) for c in cache][0] == 4
    out = model(x[:, 6:12], cache=cache)
    fresh = model(x)[:, 6:12]
    assert np.allclose(out, fresh, atol=1e-5)


def test_save_and_restore_prompt_cache(model, tmp_path):
    x = ids(9)
    cache = model.make_cache()
    model(x[:, :8], cache=cache)
    save_cache(tmp_path / "prompt.safetensors", cache, {"prompt": "hello"})
    restored, meta = load_cache(tmp_path / "prompt.safetensors")
    assert meta == {"prompt": "hello"}
    assert [c.offset for c in restored] == [8] * len(cache)
    a = model(x[:, 8:9], cache=cache)
    b = model(x[:, 8:9], cache=restored)
    assert np.array_equal(a, b)


def test_context_length_is_enforced(model):
    cache = model.make_cache()
    limit = model.args.max_context_length
    model(ids(limit - 1), cache=cache)
    model(ids(1), cache=cache)
    with pytest.raises(ContextLengthError, match="rotating window"):
        model(ids(1), cache=cache)


@pytest.mark.parametrize("chunks", [[10, 29, 1], [39, 1], [40]])
def test_rotating_window_chunked_equals_ring_steps(model, chunks):
    """Single-token steps (ring buffer) and long chunks (windowed mask) see the same tokens:
    the `keep` sink tokens plus the most recent ones."""
    x = ids(40, seed=2)
    ring = model.make_cache(max_kv_size=16)
    assert isinstance(ring[0], RotatingKVCache)
    model(x[:, :10], cache=ring)
    for t in range(10, 40):
        out = model(x[:, t : t + 1], cache=ring)
    assert ring[0].offset == 40 and ring[0].keys.shape[2] == 16
    chunked, start = model.make_cache(max_kv_size=16), 0
    for n in chunks:
        out2 = model(x[:, start : start + n], cache=chunked)
        start += n
    assert np.allclose(out[:, -1], out2[:, -1], atol=1e-4)


def test_rotating_window_inside_the_window_is_exact(model):
    x = ids(12, seed=3)
    window = model.make_cache(max_kv_size=64)
    steps = [model(x[:, :5], cache=window)] + [
        model(x[:, t : t + 1], cache=window) for t in range(5, 12)
    ]
    assert np.allclose(mx.concatenate(steps, axis=1), model(x), atol=1e-5)


def test_empty_cache_cannot_be_saved(model, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        save_cache(tmp_path / "c.safetensors", model.make_cache())
