"""Sampling many rows at once against each row sampled alone, and the engine's own bound on
a job's length (a job that did not come through the HTTP layer's checks)."""

from __future__ import annotations

import queue

import mlx.core as mx
import numpy as np
import pytest

from elm_mlx.generation.batch import RowSampling, sample_rows
from elm_mlx.generation.generate import GenerationSettings
from elm_mlx.generation.sample import greedy
from elm_mlx.testing import random_model, tiny_args


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_args(vocab_size=300), 1)


def _alone(model, tokenizer, settings, history, logits):
    """One row sampled by itself: processors, log-softmax, its own sampler."""
    s = RowSampling(model, tokenizer, settings, list(history))
    row = s.process(logits[None]) if s.processors else logits[None]
    logprobs = row - mx.logsumexp(row, axis=-1, keepdims=True)
    return s.sampler(logprobs)[0].item(), logprobs[0]


def test_rows_sample_as_they_would_alone(model, tokenizer):
    """Greedy and seeded rows, with and without a repetition penalty, in one batch: each
    row's token and log-probabilities are those it gets alone."""
    rng = np.random.default_rng(0)
    logits = mx.array(rng.standard_normal((5, 300)).astype(np.float32) * 3)
    settings = [
        GenerationSettings(),
        GenerationSettings(repetition_penalty=3.0),
        GenerationSettings(temp=0.8, seed=4),
        GenerationSettings(temp=1.0, top_k=5, seed=9, repetition_penalty=1.5),
        GenerationSettings(),
    ]
    histories = [[1, 5, 7], [int(mx.argmax(logits[1]).item()), 3], [2], [4, 4], []]
    rows = [
        RowSampling(model, tokenizer, s, list(h)) for s, h in zip(settings, histories, strict=True)
    ]
    ys, logprobs = sample_rows(logits, rows)
    for b, (s, h) in enumerate(zip(settings, histories, strict=True)):
        y, lp = _alone(model, tokenizer, s, h, logits[b])
        assert ys[b].item() == y, b
        np.testing.assert_allclose(np.asarray(logprobs[b]), np.asarray(lp), atol=1e-5)
    assert ys[1].item() != histories[1][0]  # the penalty moved the greedy choice
    assert ys[0].item() == int(mx.argmax(logits[0]).item())


def test_greedy_rows_take_the_first_of_equal_maxima(model, tokenizer):
    """All-greedy rows with nothing to process take numpy's argmax: the same token as MLX's
    argmax, the first of equal maxima included, and the same log-probabilities."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 300)).astype(np.float32)
    x[1, [7, 250]] = x[1].max() + 1.0  # a tie: the first wins
    x[2, :] = 0.5  # all equal
    logits = mx.array(x)
    rows = [RowSampling(model, tokenizer, GenerationSettings(), []) for _ in range(4)]
    assert all(r.sampler is greedy and not r.processors for r in rows)  # numpy's argmax
    for dtype in (mx.float32, mx.float16, mx.bfloat16):  # bfloat16: MLX's (numpy has none)
        ys, logprobs = sample_rows(logits.astype(dtype), rows)
        assert ys.dtype == mx.uint32
        assert ys.tolist() == mx.argmax(logits.astype(dtype), axis=-1).tolist(), dtype
        assert ys.tolist()[1:3] == [7, 0]
    ys, logprobs = sample_rows(logits, rows)
    expected = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(expected), atol=1e-6)


def test_engine_bounds_a_job_by_the_context_itself(model, tokenizer):
    from elm_mlx.serve.engine import Engine, Failed, Finished, Job, RowSettings

    context = model.args.max_context_length
    engine = Engine(model, tokenizer)
    engine.start()
    try:
        events = queue.Queue()
        engine.submit(Job([5] * (context + 3), RowSettings(max_tokens=4), events.put))
        failed = events.get(timeout=60)
        assert isinstance(failed, Failed) and failed.status == 400
        assert str(context) in failed.message
        events = queue.Queue()
        no_eos = {tokenizer.eos_id: -1e9}
        engine.submit(
            Job([5] * (context - 3), RowSettings(max_tokens=50, logit_bias=no_eos), events.put)
        )
        while not isinstance(event := events.get(timeout=60), Finished | Failed):
            pass
        assert isinstance(event, Finished), event
        assert (event.reason, event.completion_tokens) == ("length", 4)  # 3 + the newest
    finally:
        engine.close(grace=0)
        engine.join(30)
