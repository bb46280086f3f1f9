"""generate_step / stream_generate / generate against mlx-lm and against themselves."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.models import openelm as mlx_lm_openelm
from mlx_lm.sample_utils import make_repetition_penalty as mlx_lm_repetition_penalty

from elm_mlx.generation.generate import (
    ChatSession,
    GenerationSettings,
    StopFilter,
    generate,
    generate_step,
    stream_generate,
)
from elm_mlx.generation.sample import make_repetition_penalty
from elm_mlx.model.cache import ContextLengthError, KVCache
from elm_mlx.model.openelm import OpenELM
from elm_mlx.testing import random_weights, tiny_args

PROMPT = [1, 5, 17, 3, 99, 42, 8, 61, 7, 127, 33, 12]


def build(args, weights) -> OpenELM:
    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return model


def mlx_lm_model(args, weights):
    model = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(args.to_dict()))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return model


def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


def ids_of(steps) -> list[int]:
    return [token for token, _ in steps]


@pytest.fixture(scope="module", params=[dict(num_gqa_groups=2), dict(num_gqa_groups=4, tied=False)])
def tiny(request):
    args = tiny_args(**request.param)
    # Larger weights than the default make the logits decisive, so greedy ids
    # do not hinge on float rounding between implementations.
    weights = {k: v * (1 if "norm" in k else 8) for k, v in random_weights(args, seed=5).items()}
    return args, weights


@pytest.fixture(scope="module")
def model(tiny):
    return build(*tiny)


def test_greedy_equals_mlx_lm(tiny, model):
    ours = ids_of(generate_step(PROMPT, model, max_tokens=24))
    theirs = ids_of(mlx_lm_generate_step(mx.array(PROMPT), mlx_lm_model(*tiny), max_tokens=24))
    assert ours == theirs
    assert len(set(ours)) > 3  # a real continuation, not one repeated token


def test_mlx_lm_generator_drives_our_model(model):
    ours = ids_of(generate_step(PROMPT, model, max_tokens=24))
    assert ids_of(mlx_lm_generate_step(mx.array(PROMPT), model, max_tokens=24)) == ours


def test_repetition_penalty_equals_mlx_lm(tiny, model):
    ours = generate_step(
        PROMPT, model, max_tokens=24, logits_processors=[make_repetition_penalty(1.5, 8)]
    )
    theirs = mlx_lm_generate_step(
        mx.array(PROMPT),
        mlx_lm_model(*tiny),
        max_tokens=24,
        logits_processors=[mlx_lm_repetition_penalty(1.5, 8)],
    )
    plain = ids_of(generate_step(PROMPT, model, max_tokens=24))
    ours = ids_of(ours)
    assert ours == ids_of(theirs)
    assert ours != plain


def test_logprobs_equal_uncached_forward(model):
    steps = list(generate_step(PROMPT, model, max_tokens=6, prefill_step=5))
    tokens = PROMPT + ids_of(steps)
    logits = model(mx.array([tokens]))[0]  # (L, vocab), no cache
    for i, (token, logprobs) in enumerate(steps):
        ref = logits[len(PROMPT) - 1 + i]
        ref = ref - mx.logsumexp(ref)
        assert np.allclose(np.array(logprobs), np.array(ref), atol=1e-4)
        assert token == int(mx.argmax(ref))


@pytest.mark.parametrize("prefill_step", [1, 3, 11, 512])
def test_chunked_prefill_is_invisible(model, prefill_step):
    expected = ids_of(generate_step(PROMPT, model, max_tokens=10))
    assert (
        ids_of(generate_step(PROMPT, model, max_tokens=10, prefill_step=prefill_step)) == expected
    )


def test_reuses_a_callers_cache(model):
    more = [9, 80, 4]
    expected = ids_of(generate_step(PROMPT + more, model, max_tokens=8))
    cache = model.make_cache()
    assert len(ids_of(generate_step(PROMPT, model, max_tokens=1, cache=cache))) == 1
    assert cache[0].offset == len(PROMPT)  # the single token was never fed back
    assert ids_of(generate_step(more, model, max_tokens=8, cache=cache)) == expected


def test_seeded_sampling_is_reproducible(model):
    def run(seed):
        sampler = GenerationSettings(temp=1.0, seed=seed).sampler()
        return ids_of(generate_step(PROMPT, model, max_tokens=30, sampler=sampler))

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_prompt_longer_than_context_fails_before_work(model):
    cache = model.make_cache()
    too_long = [3] * (model.args.max_context_length + 1)
    with pytest.raises(ContextLengthError, match="context"):
        next(generate_step(too_long, model, cache=cache))
    assert cache[0].offset == 0
    with pytest.raises(ValueError, match="empty"):
        next(generate_step([], model))


def test_generation_stops_at_the_context():
    args = dataclasses.replace(tiny_args(), max_context_length=40)
    model = build(args, random_weights(args, seed=1))
    assert len(ids_of(generate_step([3] * 36, model, max_tokens=50))) == 5
    # A rotating window goes on past the context length.
    assert len(ids_of(generate_step([3] * 20, model, max_tokens=60, max_kv_size=16))) == 60


# ---- text level, with the tiny SentencePiece tokenizer ----------------------------


class ScriptedModel:
    """Emits a fixed sequence of token ids, one per call: tests text handling alone."""

    def __init__(self, script: list[int], vocab_size: int):
        self.script, self.vocab_size, self.prompt_len = script, vocab_size, 0
        self.args = tiny_args(vocab_size=vocab_size)

    def make_cache(self, max_kv_size=None):
        return [KVCache(self.args.max_context_length)]

    def __call__(self, ids, cache=None):
        cache[0].offset += ids.shape[1]
        # The token after position offset - 1; scripted from the end of the prompt on.
        step = max(0, cache[0].offset - self.prompt_len)
        token = self.script[min(step, len(self.script) - 1)]
        logits = mx.full((1, ids.shape[1], self.vocab_size), -10.0)
        return logits.at[:, :, token].add(20.0)


def scripted(tokenizer, text: str, extra: list[int] = ()) -> ScriptedModel:
    return ScriptedModel(tokenizer.encode(text, bos=False) + list(extra), tokenizer.vocab_size)


def run_text(model, tokenizer, prompt="Once upon a time", **kw):
    model.prompt_len = len(tokenizer.encode(prompt))
    responses = list(stream_generate(model, tokenizer, prompt, **kw))
    return "".join(r.text for r in responses), responses


def test_eos_ends_generation(tokenizer):
    model = scripted(tokenizer, "The quick fox", [tokenizer.eos_id, 5, 6])
    text, responses = run_text(model, tokenizer, max_tokens=50)
    assert text == "The quick fox"
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].token == tokenizer.eos_id
    assert [r.finish_reason for r in responses[:-1]] == [None] * (len(responses) - 1)


def test_max_tokens_ends_generation(tokenizer):
    model = scripted(tokenizer, "The quick brown fox jumps over")
    ids = model.script[:4]
    text, responses = run_text(model, tokenizer, max_tokens=4)
    assert text == tokenizer.decode(ids)
    assert (len(responses), responses[-1].finish_reason) == (4, "length")
    assert responses[-1].generation_tokens == 4
    assert responses[-1].prompt_tokens == len(tokenizer.encode("Once upon a time"))


@pytest.mark.parametrize("stop", ["fox", "quick br", "k b", "s over the", "dog."])
def test_stop_strings_split_across_tokens(tokenizer, stop):
    sentence = "The quick brown fox jumps over the lazy dog. More"
    model = scripted(tokenizer, sentence, [tokenizer.eos_id])
    text, responses = run_text(model, tokenizer, max_tokens=100, stop=[stop, "never"])
    assert text == sentence[: sentence.find(stop)]
    assert responses[-1].finish_reason == "stop"
    shown = ""
    for r in responses:  # no prefix of the stop string is ever shown early
        shown += r.text
        assert sentence.startswith(shown)


def test_partial_stop_string_released_at_the_end(tokenizer):
    model = scripted(tokenizer, "The lazy dog", [tokenizer.eos_id])
    text, _ = run_text(model, tokenizer, stop=["dog walks"])
    assert text == "The lazy dog"


def test_stop_filter_unit():
    f = StopFilter(["</end>"])
    assert f.push("abc</") == ("abc", False)
    assert f.push("en") == ("", False)
    assert f.push("x") == ("</enx", False)
    assert f.push("</end> tail") == ("", True)


def test_byte_fallback_text_streams_whole_characters(tokenizer):
    model = scripted(tokenizer, "café 😀 ok", [tokenizer.eos_id])
    text, responses = run_text(model, tokenizer)
    assert text == "café 😀 ok"
    assert all("\ufffd" not in r.text for r in responses)


def test_generate_matches_generate_step_on_a_real_model(tokenizer):
    args = tiny_args(vocab_size=tokenizer.vocab_size)
    model = build(args, random_weights(args, seed=2))
    prompt = tokenizer.encode("Once upon a time")
    ids = ids_of(generate_step(prompt, model, max_tokens=20))
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    assert generate(model, tokenizer, "Once upon a time", max_tokens=20) == tokenizer.decode(ids)
    settings = GenerationSettings(max_tokens=20, temp=0.7, seed=0)
    assert generate(model, tokenizer, prompt, settings=settings) == generate(
        model, tokenizer, prompt, settings=settings
    )


def test_stats_are_reported(tokenizer):
    model = scripted(tokenizer, "The quick brown fox jumps over the lazy dog")
    *_, last = run_text(model, tokenizer, "Hi", max_tokens=5)[1]
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory >= 0
    assert last.logprobs.shape == (tokenizer.vocab_size,)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(temp=-1.0), "temp"),
        (dict(top_p=0.0), "top_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(stop=[""]), "stop"),
        (dict(prefill_step=0), "prefill_step"),
        (dict(max_kv_size=2), "max_kv_size"),
    ],
)
def test_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings(**kwargs)


def test_seed_zero_is_a_seed():
    a = GenerationSettings(temp=1.0, seed=0).sampler()
    b = GenerationSettings(temp=1.0, seed=0).sampler()
    logits = mx.zeros((1, 1000))
    assert [a(logits).item() for _ in range(5)] == [b(logits).item() for _ in range(5)]


# ---- chat sessions ----------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tokenizer):
    args = tiny_args(vocab_size=tokenizer.vocab_size)
    return build(args, random_weights(args, seed=6))


def test_chat_feeds_only_new_tokens_and_matches_a_fresh_run(tokenizer, chat_model):
    settings = GenerationSettings(max_tokens=5)
    session = ChatSession(chat_model, tokenizer, system="Be brief.", settings=settings)
    first_ids = session.turn_ids("Tell a story")
    assert first_ids == tokenizer.encode(
        tokenizer.apply_chat_template(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tell a story"},
            ]
        )
    )
    first = [r.token for r in session.send("Tell a story")]
    fed = session.cache[0].offset
    second_ids = session.turn_ids("And then?")
    second = [r.token for r in session.send("And then?")]
    assert session.cache[0].offset > fed  # the cache grew; nothing was recomputed
    # The whole conversation, from scratch, gives the same second reply.
    history = first_ids + first
    assert history[:fed] + second_ids == history + (
        [] if first[-1] == tokenizer.eos_id else [tokenizer.eos_id]
    ) + tokenizer.encode("\n<|user|>\nAnd then?</s>\n<|assistant|>\n", bos=False)
    assert ids_of(generate_step(history[:fed] + second_ids, chat_model, max_tokens=5)) == second


def test_chat_turn_after_an_eos_reply(tokenizer, chat_model):
    session = ChatSession(chat_model, tokenizer, settings=GenerationSettings(max_tokens=3))
    list(session.send("Hi"))
    turn = tokenizer.encode("\n<|user|>\nAgain</s>\n<|assistant|>\n", bos=False)
    session.pending, session.closed = [tokenizer.eos_id], True  # EOS generated, not yet fed
    assert session.turn_ids("Again") == [tokenizer.eos_id] + turn
    session.pending = []  # EOS generated and already fed
    assert session.turn_ids("Again") == turn
    session.pending, session.closed = [7], False  # cut off by max_tokens: close the turn
    assert session.turn_ids("Again") == [7, tokenizer.eos_id] + turn


def test_chat_reset_forgets(tokenizer, chat_model):
    session = ChatSession(chat_model, tokenizer, settings=GenerationSettings(max_tokens=4))
    a = [r.token for r in session.send("Hi")]
    list(session.send("More"))
    session.reset()
    assert session.cache[0].offset == 0
    assert [r.token for r in session.send("Hi")] == a


def test_ids_past_the_tokenizer_vocabulary_are_never_sampled(tokenizer):
    """A model with padded embedding rows (vocab larger than the tokenizer's) must not emit
    ids the tokenizer cannot decode, whatever the sampler draws."""
    import mlx.core as mx

    from elm_mlx.generation.generate import generate
    from elm_mlx.model.openelm import OpenELM
    from elm_mlx.testing import random_weights, tiny_args

    args = tiny_args(vocab_size=tokenizer.vocab_size + 64)
    weights = random_weights(args, seed=0)
    emb = weights["transformer.token_embeddings.weight"]
    emb[tokenizer.vocab_size :] *= 50  # make the padded rows the likeliest next tokens
    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    text = generate(model, tokenizer, "hello", max_tokens=30, temp=1.0, seed=0)
    assert isinstance(text, str)


class _Trap:
    """Make one layer's cache raise `error` on its next update, after the layers before it
    have taken theirs: an error or a Ctrl-C between two layers of one step."""

    def __init__(self, cache, error: BaseException):
        self.cache, self.error = cache, error
        self.original = cache.update_and_fetch
        cache.update_and_fetch = self

    def __call__(self, keys, values):
        self.cache.update_and_fetch = self.original  # once
        raise self.error


def test_a_chat_turn_that_fails_leaves_the_conversation_as_it_was(tokenizer, chat_model):
    settings = GenerationSettings(max_tokens=4)
    session = ChatSession(chat_model, tokenizer, settings=settings)
    reference = ChatSession(chat_model, tokenizer, settings=settings)
    assert [r.token for r in session.send("Hello there")] == [
        r.token for r in reference.send("Hello there")
    ]
    _Trap(session.cache[2], RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        list(session.send("Something else entirely"))
    assert [c.offset for c in session.cache] == [c.offset for c in reference.cache]
    again = [r.token for r in session.send("How are you?")]
    assert again == [r.token for r in reference.send("How are you?")]


def test_ctrl_c_during_a_reply_keeps_what_came(tokenizer, chat_model):
    """A reply cut short between two layers: every layer's cache ends at the same place,
    the reply so far stays in the conversation, and the next turn sees exactly it."""
    session = ChatSession(chat_model, tokenizer, settings=GenerationSettings(max_tokens=10))
    first_ids = session.turn_ids("Tell a story")
    reply = []
    with pytest.raises(KeyboardInterrupt):
        for response in session.send("Tell a story"):
            reply.append(response.token)
            if len(reply) == 2:
                _Trap(session.cache[2], KeyboardInterrupt())
    assert len(reply) == 2 and tokenizer.eos_id not in reply
    offsets = {c.offset for c in session.cache}
    assert len(offsets) == 1
    fed = offsets.pop()
    second_ids = session.turn_ids("And then?")
    history = first_ids + reply
    assert history[:fed] + second_ids == history + [tokenizer.eos_id] + tokenizer.encode(
        "\n<|user|>\nAnd then?</s>\n<|assistant|>\n", bos=False
    )
    second = [r.token for r in session.send("And then?")]
    assert ids_of(generate_step(history[:fed] + second_ids, chat_model, max_tokens=10)) == second


def test_closing_a_reply_early_keeps_it(tokenizer, chat_model):
    """The caller stops reading (Ctrl-C in its own code): closing the generator settles the
    conversation the same way."""
    session = ChatSession(chat_model, tokenizer, settings=GenerationSettings(max_tokens=10))
    first_ids = session.turn_ids("Tell a story")
    replies = session.send("Tell a story")
    reply = [next(replies).token, next(replies).token, next(replies).token]
    replies.close()
    fed = session.cache[0].offset
    assert {c.offset for c in session.cache} == {fed}
    history = first_ids + reply
    assert history[:fed] + session.turn_ids("Go on")[: len(history) - fed] == history


def test_generate_many_gives_each_prompt_what_generate_gives_it_alone(tokenizer):
    """Rows of different lengths and settings decoded together, joining as others finish
    (batch_size 2), prefilled in chunks of 3: each text equals `generate` on that prompt alone.
    The padded vocabulary and the repetition penalty make every row carry logits processors."""
    from elm_mlx.generation.batch import generate_many

    args = tiny_args(vocab_size=tokenizer.vocab_size + 64)
    weights = {k: v * (1 if "norm" in k else 8) for k, v in random_weights(args, seed=4).items()}
    model = build(args, weights)
    base = GenerationSettings(max_tokens=16, prefill_step=3)
    asks = [
        ("Once upon a time", base),
        ("The quick brown fox jumps over the dog", dataclasses.replace(base, temp=0.8, seed=3)),
        ("hello", dataclasses.replace(base, stop=("e", "a"))),
        ("A", dataclasses.replace(base, max_tokens=0)),
        ("It was", dataclasses.replace(base, repetition_penalty=1.5, max_tokens=11)),
    ]
    done = []
    got = generate_many(model, tokenizer, [p for p, _ in asks], [s for _, s in asks],
                        batch_size=2, on_done=done.append)  # fmt: skip
    alone = [generate(model, tokenizer, p, settings=s) for p, s in asks]
    assert got == alone
    assert sorted(done) == list(range(len(asks))) and got[3] == "" and len(got[0]) > 10
