"""Pure builders for samplers and logits processors.

A sampler maps log-probabilities (B, vocab) to token ids (B,). A logits
processor maps (tokens so far (n,), logits (B, vocab)) to new logits. Order, as
in Hugging Face `generate`: processors (repetition penalty), then temperature,
then top-k, top-p and min-p on the tempered distribution, then a draw.

Randomness comes from an `mx.random` key the caller passes in (split on every
draw), or from MLX's global generator when no key is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

_NEG_INF = -math.inf
GREEDY_BELOW = 1e-20  # temperatures this small sample greedily (`make_sampler`)


def check_sampling(
    temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> None:
    """Raise ValueError naming the first invalid sampling value (values are never clamped)."""
    if not temp >= 0 or math.isinf(temp):
        raise ValueError(f"temp must be a finite number >= 0 (0 means greedy), got {temp}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k}")
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p must be in [0, 1) (0 disables it), got {min_p}")


def make_sampler(
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    *,
    key: mx.array | None = None,
) -> Sampler:
    """A sampler over (B, vocab) log-probabilities. `temp=0` is greedy (argmax), and so is
    a temperature below `GREEDY_BELOW` (1 / temp would overflow float32: every logit
    infinite, the draw uniform; a distribution that sharp is the argmax anyway).

    `key` (from `mx.random.key(seed)`) makes the draws reproducible and
    independent of MLX's global generator.
    """
    check_sampling(temp, top_p, top_k, min_p)
    if temp < GREEDY_BELOW:
        return greedy
    filters = []
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    if top_p < 1:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p > 0:
        filters.append(lambda x: apply_min_p(x, min_p))
    state = {"key": key}

    def sample(logprobs: mx.array) -> mx.array:
        logits = logprobs * (1.0 / temp)  # (B, vocab)
        for f in filters:
            logits = f(logits)
        if state["key"] is None:
            return mx.random.categorical(logits)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(logits, key=sub)

    return sample


def greedy(logprobs: mx.array) -> mx.array:
    """The most likely token of each row: (B, vocab) -> (B,)."""
    return mx.argmax(logprobs, axis=-1)


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep exactly the `k` largest logits of each row (ties broken arbitrarily); -inf elsewhere."""
    if k >= logits.shape[-1]:
        return logits
    drop = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., k:]  # (B, vocab - k)
    return mx.put_along_axis(logits, drop, mx.array(_NEG_INF, logits.dtype), axis=-1)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches `p` (nucleus)."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)  # (B, vocab)
    order = mx.argsort(-probs, axis=-1)
    sorted_p = mx.take_along_axis(probs, order, axis=-1)
    mass_before = mx.cumsum(sorted_p, axis=-1) - sorted_p  # mass of more likely tokens
    drop_sorted = mass_before >= p  # the most likely token always stays
    drop = mx.put_along_axis(mx.zeros(drop_sorted.shape, mx.bool_), order, drop_sorted, axis=-1)
    return mx.where(drop, mx.array(_NEG_INF, logits.dtype), logits)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Keep tokens whose probability is at least `min_p` times the most likely one's."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (B, vocab)
    threshold = logprobs.max(axis=-1, keepdims=True) + math.log(min_p)  # (B, 1)
    return mx.where(logprobs < threshold, mx.array(_NEG_INF, logits.dtype), logits)


def check_processing(repetition_penalty: float = 1.0, repetition_context_size: int = 20) -> None:
    """Raise ValueError for an invalid repetition penalty or window."""
    if not repetition_penalty > 0 or math.isinf(repetition_penalty):
        raise ValueError(
            f"repetition_penalty must be a finite number > 0 (1 disables it), "
            f"got {repetition_penalty}"
        )
    if not isinstance(repetition_context_size, int) or repetition_context_size < 1:
        raise ValueError(
            f"repetition_context_size must be an integer >= 1, got {repetition_context_size}"
        )


def make_logits_processors(
    repetition_penalty: float = 1.0,
    repetition_context_size: int = 20,
    logit_bias: dict[int, float] | None = None,
) -> list[LogitsProcessor]:
    """Processors for a repetition penalty over the last tokens and an additive logit bias."""
    check_processing(repetition_penalty, repetition_context_size)
    processors: list[LogitsProcessor] = []
    if logit_bias:
        ids = mx.array(list(logit_bias), mx.int32)
        bias = mx.array(list(logit_bias.values()), mx.float32)

        def add_bias(tokens: mx.array, logits: mx.array) -> mx.array:
            return logits.at[:, ids].add(bias.astype(logits.dtype))

        processors.append(add_bias)
    if repetition_penalty != 1:
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    return processors


def make_penalties(n_prompt: int, presence: float, frequency: float) -> LogitsProcessor:
    """OpenAI's presence and frequency penalties over the generated tokens (those after
    the first `n_prompt`): a seen token loses `presence`, and `frequency` per occurrence."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        out = tokens[n_prompt:]
        if out.size == 0:
            return logits
        counts = mx.zeros((logits.shape[-1],), mx.float32).at[out].add(1.0)  # (vocab,)
        return logits - (presence * (counts > 0) + frequency * counts).astype(logits.dtype)

    return process


def make_vocab_limit(n_valid: int) -> LogitsProcessor:
    """Never sample ids >= `n_valid`: embedding rows past the tokenizer's vocabulary."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        valid = mx.arange(logits.shape[-1]) < n_valid  # (vocab,)
        return mx.where(valid, logits, mx.array(-mx.inf, logits.dtype))

    return process


def make_repetition_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """Divide positive logits (multiply negative ones) of tokens seen in the last `context_size`.

    The CTRL / Hugging Face rule: a seen token's logit `x` becomes `x / penalty`
    if `x > 0`, else `x * penalty`; each token is penalised once however often it repeats.
    """
    check_processing(penalty, context_size)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        recent = tokens[-context_size:]  # (n,)
        seen = mx.zeros((logits.shape[-1],), mx.int32).at[recent].add(1) > 0  # (vocab,)
        penalised = mx.where(logits > 0, logits / penalty, logits * penalty)  # (B, vocab)
        return mx.where(seen, penalised, logits)

    return process
