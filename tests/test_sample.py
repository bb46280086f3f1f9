"""Samplers and logits processors on crafted logits."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from elm_mlx.generation.sample import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_repetition_penalty,
    make_sampler,
)

# Probabilities 0.05, 0.5, 0.15, 0.3 in a shuffled order, so sorting matters.
PROBS = np.array([0.05, 0.5, 0.15, 0.3])
LOGPROBS = mx.array(np.log(PROBS)[None], mx.float32)  # (1, 4)


def kept(logits: mx.array) -> set[int]:
    return {int(i) for i in np.flatnonzero(np.isfinite(np.array(logits[0])))}


def draw_counts(sampler, logprobs: mx.array, n: int = 20000) -> np.ndarray:
    tokens = sampler(mx.broadcast_to(logprobs, (n, logprobs.shape[-1])))  # (n,)
    return np.bincount(np.array(tokens), minlength=logprobs.shape[-1]) / n


def test_greedy_is_argmax():
    logits = mx.array([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert make_sampler(0.0)(logits).tolist() == [1, 0]


@pytest.mark.parametrize("temp", [1e-40, 1e-30, 1e-21])
def test_a_vanishing_temperature_draws_the_argmax(temp):
    """1 / temp overflows float32 below about 3e-39: every logit became infinite and the
    draw uniform. A distribution that sharp is its argmax."""
    logprobs = mx.broadcast_to(LOGPROBS, (2000, 4))
    assert set(np.array(make_sampler(temp, key=mx.random.key(3))(logprobs)).tolist()) == {1}


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_top_k_keeps_exactly_k(k):
    rng = np.random.default_rng(k)
    logits = rng.standard_normal((3, 10)).astype(np.float32)
    out = np.array(apply_top_k(mx.array(logits), k))
    for row, orig in zip(out, logits, strict=True):
        finite = np.flatnonzero(np.isfinite(row))
        assert len(finite) == k
        assert set(finite) == set(np.argsort(-orig)[:k])
        assert np.array_equal(row[finite], orig[finite])


def test_top_k_larger_than_vocab_is_identity():
    assert kept(apply_top_k(LOGPROBS, 10)) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "p, expected", [(0.4, {1}), (0.75, {1, 3}), (0.9, {1, 2, 3}), (1.0, {0, 1, 2, 3})]
)
def test_top_p_nucleus(p, expected):
    assert kept(apply_top_p(LOGPROBS, p)) == expected


@pytest.mark.parametrize(
    "min_p, expected", [(0.05, {0, 1, 2, 3}), (0.2, {1, 2, 3}), (0.5, {1, 3}), (0.9, {1})]
)
def test_min_p_threshold(min_p, expected):
    # Keeps p >= min_p * 0.5 (the largest probability).
    assert kept(apply_min_p(LOGPROBS, min_p)) == expected


def test_samplers_only_draw_kept_tokens():
    assert set(np.flatnonzero(draw_counts(make_sampler(1.0, top_k=2), LOGPROBS))) == {1, 3}
    assert set(np.flatnonzero(draw_counts(make_sampler(1.0, top_p=0.75), LOGPROBS))) == {1, 3}
    assert set(np.flatnonzero(draw_counts(make_sampler(1.0, min_p=0.4), LOGPROBS))) == {1, 3}


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temp):
    expected = PROBS ** (1 / temp) / (PROBS ** (1 / temp)).sum()
    freq = draw_counts(make_sampler(temp, key=mx.random.key(1)), LOGPROBS, n=40000)
    assert np.abs(freq - expected).max() < 0.015


def test_filtered_draws_follow_renormalised_probabilities():
    freq = draw_counts(make_sampler(1.0, top_k=2, key=mx.random.key(2)), LOGPROBS, n=40000)
    assert np.allclose(freq[[1, 3]], [0.5 / 0.8, 0.3 / 0.8], atol=0.015)


def test_seeded_draws_reproducible_including_seed_zero():
    logits = mx.zeros((1, 50))

    def run(seed):
        sampler = make_sampler(1.0, key=mx.random.key(seed))
        return [sampler(logits).item() for _ in range(40)]

    mx.random.seed(123)
    a = run(0)
    mx.random.seed(456)  # the global generator does not matter when a key is given
    assert run(0) == a
    assert run(1) != a
    assert len(set(a)) > 1  # successive draws differ: the key is split, not reused


def test_repetition_penalty_math():
    logits = mx.array([[2.0, -2.0, 1.0, 0.5, 0.0]])
    out = make_repetition_penalty(2.0, context_size=3)(mx.array([3, 0, 1, 1]), logits)
    # Window = last 3 tokens {0, 1}; token 3 fell out of it; 0 stays 0.
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5, 0.0]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, 0.5, 0.0]]  # input untouched
    out = make_repetition_penalty(0.5, context_size=10)(mx.array([0, 1, 4]), logits)
    assert out.tolist() == [[4.0, -1.0, 1.0, 0.5, 0.0]]


def test_repetition_penalty_empty_history():
    logits = mx.array([[1.0, 2.0]])
    assert make_repetition_penalty(1.5)(mx.array([], mx.int32), logits).tolist() == [[1.0, 2.0]]


def test_logits_processors_builder():
    assert make_logits_processors(1.0) == []
    procs = make_logits_processors(1.2, 5, logit_bias={1: 10.0})
    out = mx.array([[1.0, 1.0, 1.0]])
    for proc in procs:
        out = proc(mx.array([0]), out)
    assert np.allclose(np.array(out), [[1 / 1.2, 11.0, 1.0]])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temp=-0.1), "temp"),
        (dict(temp=math.nan), "temp"),
        (dict(temp=math.inf), "temp"),
        (dict(temp=1.0, top_p=0.0), "top_p"),
        (dict(temp=1.0, top_p=1.5), "top_p"),
        (dict(temp=1.0, top_k=-1), "top_k"),
        (dict(temp=1.0, top_k=2.5), "top_k"),
        (dict(temp=1.0, min_p=1.0), "min_p"),
        (dict(temp=1.0, min_p=-0.1), "min_p"),
        (dict(temp=0.0, top_p=2.0), "top_p"),  # checked even when greedy
    ],
)
def test_sampler_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.2), "repetition_penalty"),
        (dict(repetition_penalty=1.2, repetition_context_size=0), "repetition_context_size"),
    ],
)
def test_processors_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_logits_processors(**kwargs)
