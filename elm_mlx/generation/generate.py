"""Text generation: `generate_step` (ids in, ids out), `stream_generate` (text), `generate`.

All three reuse a caller's KV cache: when the cache already holds tokens, pass
only the new prompt ids and generation continues from where the cache stands.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from ..formats.tokenizer import StreamingDetokenizer, Tokenizer
from ..model.cache import ContextLengthError
from ..runtime.fastpath import CpuDecoder
from .sample import (
    LogitsProcessor,
    Sampler,
    check_processing,
    check_sampling,
    greedy,
    make_logits_processors,
    make_sampler,
    make_vocab_limit,
)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that shapes one generation, checked when built."""

    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 20
    seed: int | None = None
    stop: tuple[str, ...] = ()
    max_kv_size: int | None = None
    prefill_step: int = 512

    def __post_init__(self) -> None:
        check_sampling(self.temp, self.top_p, self.top_k, self.min_p)
        check_processing(self.repetition_penalty, self.repetition_context_size)
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens}")
        if not isinstance(self.prefill_step, int) or self.prefill_step < 1:
            raise ValueError(f"prefill_step must be an integer >= 1, got {self.prefill_step}")
        if self.max_kv_size is not None and self.max_kv_size < 8:
            raise ValueError(f"max_kv_size must be at least 8 tokens, got {self.max_kv_size}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)}")

    def sampler(self) -> Sampler:
        key = None if self.seed is None else mx.random.key(self.seed)
        return make_sampler(self.temp, self.top_p, self.top_k, self.min_p, key=key)

    def logits_processors(self, n_prompt: int = 0) -> list[LogitsProcessor]:
        """The processors these settings ask for; `n_prompt`: how many of the tokens a
        processor sees are the prompt (settings that act on generated tokens only)."""
        return make_logits_processors(self.repetition_penalty, self.repetition_context_size)


@dataclass
class GenerationResponse:
    """One generated token and the text it made final, with running statistics."""

    text: str
    token: int
    logprobs: mx.array  # (vocab,)
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    # "stop" (EOS or stop string), "length" (max_tokens), "context" (the cache is full), or None
    finish_reason: str | None = None


# ---- token level ----------------------------------------------------------------


def _forward(model, ids: mx.array, cache) -> mx.array:
    """The one place the model is called: (1, L) ids -> (1, L, vocab) logits."""
    return model(ids, cache=cache)


def token_budget(model, cache, n_prompt: int, max_tokens: int) -> int:
    """How many tokens may be generated after `n_prompt` new prompt tokens.

    Raises ContextLengthError before any work when the prompt does not fit.
    A rotating cache (`max_kv_size`) never runs out.
    """
    first = cache[0]
    if hasattr(first, "keep"):  # rotating window
        return max_tokens
    limit = getattr(first, "max_size", None) or model.args.max_context_length
    room = limit - first.offset
    if n_prompt > room:
        held = f" (the cache already holds {first.offset})" if first.offset else ""
        raise ContextLengthError(
            f"the prompt has {n_prompt} tokens but only {room} fit in the {limit}-token "
            f"context{held}; shorten the prompt or use a rotating window (max_kv_size)"
        )
    return min(max_tokens, room - n_prompt + 1)


def generate_step(
    prompt_ids: Sequence[int] | mx.array,
    model,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    cache: list | None = None,
    prefill_step: int = 512,
    max_kv_size: int | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token id, log-probabilities (vocab,)) for up to `max_tokens` new tokens.

    The prompt goes through the model in chunks of `prefill_step` tokens; each
    next step is queued (`mx.async_eval`) before the current token is yielded.
    `cache` (from `model.make_cache()`) may already hold earlier tokens. `model` is
    called as given: `load_for_generation` returns it ready (on the CPU, usually in the
    numpy decoding path of `runtime.fastpath`).
    """
    prompt = mx.array(prompt_ids, dtype=mx.int32).reshape(-1)  # (L,)
    if prompt.size == 0:
        raise ValueError("the prompt is empty; give at least one token id")
    cache = model.make_cache(max_kv_size) if cache is None else cache
    max_tokens = token_budget(model, cache, prompt.size, max_tokens)
    if max_tokens <= 0:
        return
    sampler = sampler or greedy
    processors = list(logits_processors or [])

    def step(ids: mx.array, history: mx.array) -> tuple[mx.array, mx.array]:
        logits = _forward(model, ids[None], cache)[:, -1, :]  # (1, vocab)
        for process in processors:
            logits = process(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs[0]  # (1,), (vocab,)

    history = prompt  # tokens the processors see (prompt and generated so far)
    y, logprobs = step(prefill(model, prompt, cache, prefill_step), history)
    mx.async_eval(y, logprobs)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            history = mx.concatenate([history, y]) if processors else history
            next_y, next_logprobs = step(y, history)
            mx.async_eval(next_y, next_logprobs)
        yield y.item(), logprobs
        if n + 1 < max_tokens:
            y, logprobs = next_y, next_logprobs


def prefill(model, prompt: mx.array, cache, prefill_step: int) -> mx.array:
    """Feed all but the last prompt token in chunks of `prefill_step`; return the last one.

    Only the cache is evaluated, so no vocabulary-sized head is computed for the
    chunks (on the CPU fast path, nor the last block's work past the keys and values);
    the last token then goes through the model alone.
    """
    while prompt.size > 1:
        n = min(prefill_step, prompt.size - 1)
        fed = isinstance(model, CpuDecoder) and model.feed(prompt[:n].tolist(), cache)
        if not fed:
            _forward(model, prompt[:n][None], cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[n:]
        mx.clear_cache()
    return prompt


# ---- text level -----------------------------------------------------------------


class StopFilter:
    """Holds back text that may be the start of a stop string; cuts at the first stop string."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to show, whether a stop string was found)."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = max((_overlap(buf, s) for s in self.stop), default=0)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that begins `stop` (shorter than `stop`)."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


class TextStream:
    """Detokenizer plus stop-string filter: token ids in, printable text out."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.eos_id = tokenizer.eos_id
        self.detok = StreamingDetokenizer(tokenizer)
        self.stops = StopFilter(stop)

    def add(self, token: int) -> tuple[str, bool]:
        return self.stops.push(self.detok.add_token(token))

    def finish(self) -> tuple[str, bool]:
        text, stopped = self.stops.push(self.detok.finalize())
        return (text, True) if stopped else (text + self.stops.flush(), False)

    def step(self, token: int, last: bool) -> tuple[str, bool]:
        """(the text `token` makes final, whether EOS or a stop string ended the text).

        EOS adds no text; on the `last` token everything held back is let out.
        """
        if token == self.eos_id:
            return self.finish()[0], True
        text, stopped = self.add(token)
        if last and not stopped:
            text += self.finish()[0]
        return text, stopped


def processors_for(
    model, tokenizer: Tokenizer, settings: GenerationSettings, n_prompt: int = 0
) -> list:
    """The logits processors of `settings`, plus a mask on ids the tokenizer has no text for."""
    processors = settings.logits_processors(n_prompt)
    if model.args.vocab_size > tokenizer.vocab_size:  # padded embeddings: ids with no text
        processors.append(make_vocab_limit(tokenizer.vocab_size))
    return processors


def stream_generate(
    model,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    cache: list | None = None,
    settings: GenerationSettings | None = None,
    **overrides,
) -> Iterator[GenerationResponse]:
    """Yield a GenerationResponse per token; the last one carries `finish_reason`.

    `prompt` is text (encoded with BOS; apply a chat template first if wanted) or
    token ids (use ids when `cache` already holds earlier turns). Settings come
    from `settings` and/or keyword overrides (`max_tokens=`, `temp=`, `stop=`...).
    Stop-string text and EOS are never part of `text`.
    """
    settings = dataclasses.replace(settings or GenerationSettings(), **overrides)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    cache = model.make_cache(settings.max_kv_size) if cache is None else cache
    budget = token_budget(model, cache, len(ids), settings.max_tokens)
    processors = processors_for(model, tokenizer, settings, n_prompt=len(ids))
    steps = generate_step(
        ids,
        model,
        max_tokens=budget,
        sampler=settings.sampler(),
        logits_processors=processors,
        cache=cache,
        prefill_step=settings.prefill_step,
    )
    out, clock = TextStream(tokenizer, settings.stop), _Clock(len(ids))
    for n, (token, logprobs) in enumerate(steps, 1):
        clock.tick(n)
        text, stopped = out.step(token, last=n >= budget)
        reason = "stop" if stopped else _length_reason(n, budget, settings.max_tokens)
        yield clock.response(text, token, logprobs, reason)
        if reason is not None:
            return


def _length_reason(n: int, budget: int, max_tokens: int) -> str | None:
    if n < budget:
        return None
    return "length" if budget == max_tokens else "context"


class _Clock:
    """Prompt and generation rates for responses."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.start = time.perf_counter()
        self.first = self.start
        self.prompt_tps = 0.0
        self.n = 0

    def tick(self, n: int) -> None:
        self.n = n
        if n == 1:
            self.first = time.perf_counter()
            self.prompt_tps = self.prompt_tokens / max(self.first - self.start, 1e-9)

    def response(self, text, token, logprobs, reason) -> GenerationResponse:
        elapsed = time.perf_counter() - self.first
        gen_tps = (self.n - 1) / elapsed if self.n > 1 and elapsed > 0 else 0.0
        return GenerationResponse(
            text, token, logprobs, self.prompt_tokens, self.prompt_tps,
            self.n, gen_tps, mx.get_peak_memory() / 1e9, reason,
        )  # fmt: skip


def generate(model, tokenizer: Tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The text `stream_generate(model, tokenizer, prompt, **kwargs)` generates (without the
    prompt, EOS or stop string)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


class ChatSession:
    """A conversation with an Instruct model that keeps its KV cache between turns.

    Each turn feeds only the new tokens: whatever of the last reply the cache has
    not seen, the end of that turn, and the new user message in the chat template.
    """

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        *,
        system: str | None = None,
        settings: GenerationSettings | None = None,
    ):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.settings = settings or GenerationSettings()
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.cache = self.model.make_cache(self.settings.max_kv_size)
        self.pending: list[int] = []  # tokens of the last reply not yet in the cache
        self.closed = True  # whether the last reply ended with EOS

    def turn_ids(self, message: str) -> list[int]:
        """The token ids that the next turn feeds to the model."""
        user = [{"role": "user", "content": message}]
        if self.cache[0].offset == 0:
            return self.tokenizer.encode(chat_prompt(self.tokenizer, message, self.system))
        close = [] if self.closed else [self.tokenizer.eos_id]
        text = "\n" + self.tokenizer.apply_chat_template(user)
        return self.pending + close + self.tokenizer.encode(text, bos=False)

    def send(self, message: str) -> Iterator[GenerationResponse]:
        """Stream the reply to `message`; the cache keeps the whole conversation.

        A reply cut short (an error, Ctrl-C, or the caller closing this generator) stays
        in the conversation as far as it came; a turn that fails before its first reply
        token leaves the conversation as it was before the turn.
        """
        ids = self.turn_ids(message)
        before = self.cache[0].offset
        reply: list[int] = []
        try:
            for response in stream_generate(
                self.model, self.tokenizer, ids, cache=self.cache, settings=self.settings
            ):
                reply.append(response.token)
                yield response
        finally:
            self._settle(before, before + len(ids), reply)

    def _settle(self, before: int, start: int, reply: list[int]) -> None:
        """Bring every layer's cache to one length after a turn, however it ended."""
        offsets = [c.offset for c in self.cache]
        keep = min(offsets) if reply else before  # an interrupt may stop between layers
        if keep < max(offsets) and not all(c.is_trimmable() for c in self.cache):
            self.reset()  # a rotating window that wrapped cannot be rolled back
            return
        for c in self.cache:
            if c.offset > keep:
                c.trim(c.offset - keep)
        if reply:  # each token is fed back before it is yielded, except the last one
            self.pending = reply[max(0, keep - start) :]
            self.closed = reply[-1] == self.tokenizer.eos_id


def chat_prompt(tokenizer: Tokenizer, message: str, system: str | None = None) -> str:
    """`message` (after a `system` message, if any) as the first turn of the chat template."""
    turns = [{"role": "system", "content": system}] if system else []
    return tokenizer.apply_chat_template([*turns, {"role": "user", "content": message}])
