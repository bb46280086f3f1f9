"""Rows' caches as slots of one buffer per layer (`RowSlab`): the batched decode attention
over the slab against each row alone on the MLX path, growth, and slot hand-back."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from elm_mlx.generation.batch import row_slab
from elm_mlx.model.cache import ContextLengthError, KVCache
from elm_mlx.runtime import fastpath
from elm_mlx.runtime.fastpath import CpuDecoder
from elm_mlx.runtime.slab import RowSlab, SlotCache
from elm_mlx.testing import random_model, tiny_args


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def model():
    args = dataclasses.replace(tiny_args(num_gqa_groups=2), max_context_length=600)
    m = random_model(args, seed=5)
    mx.eval(m.parameters())
    return m


def _no_row_attention(monkeypatch):
    """Fail if any row is scored on its own: the slab's rows must go batched."""

    def refuse(*a):
        raise AssertionError("a slab row was scored on its own")

    monkeypatch.setattr(fastpath, "_row_attention", refuse)


@pytest.mark.parametrize(
    "order, lengths",
    [
        pytest.param([4, 0, 2], (9, 30, 17), id="scattered-slots"),
        pytest.param([0, 1, 2], (9, 30, 17), id="slot-order"),
        pytest.param([0, 1, 2], (12, 12, 12), id="slot-order-same-lengths"),
    ],
)
def test_rows_in_slab_slots_match_each_row_alone(model, monkeypatch, order, lengths):
    """Rows of different (or equal) lengths in scattered slots (freed slots between them,
    rows not in slot order) or in slots 0, 1, 2 decode as each row alone does on the MLX
    path."""
    fast = CpuDecoder(model)
    slab = RowSlab.for_model(model, 5)
    taken = [slab.take() for _ in range(5)]
    for slot in set(range(5)) - set(order):
        slab.release(taken[slot])
    rows = [taken[slot] for slot in order]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, model.args.vocab_size, n).tolist() for n in lengths]
    plain = [model.make_cache() for _ in prompts]
    for p, c, ref in zip(prompts, rows, plain, strict=True):
        fast(mx.array(p)[None], cache=c)
        model(mx.array(p)[None], cache=ref)
    _no_row_attention(monkeypatch)
    tokens = [3, 4, 5]
    for _ in range(6):
        got = fast.decode_rows(tokens, rows)
        for b, t in enumerate(tokens):
            want = model(mx.array([[t]]), cache=plain[b])[0, -1]
            assert rel_err(got[b], want) < 1e-5, b
        tokens = np.asarray(mx.argmax(got, axis=-1)).tolist()
    for row, ref in zip(rows, plain, strict=True):
        assert row[0].offset == ref[0].offset
        assert rel_err(row[-1].state[0], ref[-1].state[0]) < 1e-5


def test_the_slab_grows_for_every_slot_and_keeps_what_they_hold(model):
    """A row passing the slab's capacity grows the buffers of every slot: the other rows'
    caches point at the new buffers and hold what they held."""
    fast = CpuDecoder(model)
    slab = RowSlab.for_model(model, 2)
    short, long_ = slab.take(), slab.take()
    fast(mx.array([[5, 6, 7]]), cache=short)
    before = [np.array(c.state[0]) for c in short]
    assert slab.capacity(0) == KVCache.step
    fast(mx.array(np.arange(KVCache.step + 10) % model.args.vocab_size)[None], cache=long_)
    assert slab.capacity(0) == 2 * KVCache.step
    for layer, c in enumerate(short):
        assert c.keys.shape[2] == 2 * KVCache.step
        np.testing.assert_array_equal(np.array(c.state[0]), before[layer])
        c_np = np.asarray(c.keys)
        assert np.shares_memory(c_np, slab.keys[layer])  # still its slot of the new buffer
    plain = model.make_cache()
    model(mx.array(np.arange(KVCache.step + 10) % model.args.vocab_size)[None], cache=plain)
    assert rel_err(long_[-1].state[1], plain[-1].state[1]) < 1e-5


def test_decode_rows_grow_the_slab_when_a_step_needs_room(model, monkeypatch):
    """Rows filling the slab to its capacity take their next step after it grows (checked
    once for all the slab's rows, not cache by cache), and decode as each row alone does."""
    fast = CpuDecoder(model)
    slab = RowSlab.for_model(model, 2)
    rows, plain = [slab.take(), slab.take()], [model.make_cache(), model.make_cache()]
    rng = np.random.default_rng(2)
    for n, row, ref in zip((KVCache.step - 1, 40), rows, plain, strict=True):
        p = rng.integers(0, model.args.vocab_size, n).tolist()
        fast(mx.array(p)[None], cache=row)
        model(mx.array(p)[None], cache=ref)
    _no_row_attention(monkeypatch)
    tokens = [3, 4]
    for step in range(3):  # positions 255 (the last with room), 256 (grows), 257
        assert fastpath._slab_rows_ready(rows, len(model.layers)) == (step != 1)
        got = fast.decode_rows(tokens, rows)
        for b, t in enumerate(tokens):
            want = model(mx.array([[t]]), cache=plain[b])[0, -1]
            assert rel_err(got[b], want) < 1e-5, (step, b)
        tokens = np.asarray(mx.argmax(got, axis=-1)).tolist()
    assert slab.capacity(0) == 2 * KVCache.step
    assert [r[0].offset for r in rows] == [KVCache.step + 2, 43]


def test_the_mlx_path_and_state_write_into_the_slot(model):
    """Whatever feeds a slot cache (the model's MLX modules, a prompt cache setting its
    state) writes into its slot, so the batched attention sees it."""
    slab = RowSlab.for_model(model, 2)
    fed, seeded = slab.take(), slab.take()
    ids = mx.array([[4, 8, 15, 16, 23]])
    want = model(ids, cache=model.make_cache())
    got = model(ids, cache=fed)  # the MLX path, not the CPU fast path
    assert rel_err(got, want) < 1e-5
    for layer, c in enumerate(fed):
        assert c.offset == 5
        np.testing.assert_array_equal(slab.keys[layer][0, :, :5], np.asarray(c.state[0])[0])
    for c, src in zip(seeded, fed, strict=True):
        c.state = [src.state[0][..., :3, :], src.state[1][..., :3, :]]
    for layer, c in enumerate(seeded):
        assert c.offset == 3 and c.keys is slab.views(layer, 1)[0]
        np.testing.assert_array_equal(slab.keys[layer][1, :, :3], slab.keys[layer][0, :, :3])


def test_a_slot_cache_refuses_tokens_past_the_context(model):
    slab = RowSlab(shapes=[(2, 8)], slots=1, max_size=4)
    (c,) = slab.take()
    c.update_and_fetch(mx.zeros((1, 2, 4, 8)), mx.zeros((1, 2, 4, 8)))
    with pytest.raises(ContextLengthError, match="5 tokens exceed the context length of 4"):
        c.update_and_fetch(mx.zeros((1, 2, 1, 8)), mx.zeros((1, 2, 1, 8)))


def test_released_slots_are_reused_and_kept_copies_stay(model):
    """release(keep=True) hands back plain caches holding a copy: the next row in the slot
    does not change them. Slots run out, then come back."""
    fast = CpuDecoder(model)
    slab = RowSlab.for_model(model, 1)
    first = slab.take()
    assert slab.take() is None
    fast(mx.array([[1, 2, 3, 4]]), cache=first)
    held = [np.array(c.state[0]) for c in first]
    kept = slab.release(first, keep=True)
    assert all(type(c) is KVCache and c.offset == 4 for c in kept)
    assert first[0].keys is None  # the released caches no longer reach the slot
    second = slab.take()
    assert second is not None and second[0].slot == 0
    fast(mx.array([[9, 9, 9, 9, 9, 9]]), cache=second)
    for c, h in zip(kept, held, strict=True):
        np.testing.assert_array_equal(np.array(c.state[0]), h)
    with pytest.raises(ValueError, match="not held"):
        slab.release(first)


def test_row_slab_only_where_the_cpu_fast_path_decodes(model):
    assert isinstance(row_slab(CpuDecoder(model), 4), RowSlab)
    assert row_slab(model, 4) is None  # the MLX path: each row keeps the model's caches
    slab = row_slab(CpuDecoder(model), 4)
    assert all(type(c) is SlotCache for c in slab.take())
