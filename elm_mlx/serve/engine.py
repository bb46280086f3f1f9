"""The continuous-batching engine: one thread owns the model and every MLX call.

Each step: forget cancelled requests, then one batched forward pass
(`generation.batch.decode_step`) for every running row, each with its own sampler,
logits processors, stop strings, length limit and logprobs. Prompt chunks of waiting
requests (whole chunks cut where `generate` cuts them, `prefill_step` tokens in all)
go through that same pass: the running rows never wait for a prefill pass of their
own, a long prompt never stalls them for more than one chunk, and prompts that arrive
together share their products. A row's last prompt token goes through the batched
pass, so a batch of one computes what `generate` computes. Finished rows hand their
KV cache to the prompt cache.

Requests come in through `submit` (any thread) and results go out through the
job's `emit` callback, called on the engine thread.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..formats.tokenizer import Tokenizer
from ..generation.batch import (
    RowSampling,
    chunks_per_step,
    decode_step,
    release_caches,
    row_slab,
    sample_rows,
    take_caches,
)
from ..generation.generate import GenerationSettings, TextStream, token_budget
from ..generation.sample import LogitsProcessor, make_logits_processors, make_penalties
from ..model.cache import ContextLengthError
from ..runtime.slab import SlotCache
from .prompt_cache import PromptCache

# The log-probability reported for a token too unlikely to have a finite one: OpenAI's value,
# and one that JSON can carry (-inf and NaN it cannot).
UNLIKELY = -9999.0


class QueueFull(Exception):
    """More requests wait than the queue holds."""


class Closed(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class RowSettings(GenerationSettings):
    """How one request samples and stops: `generate`'s settings and OpenAI's extras."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_logprobs: int | None = None  # None: no logprobs; 0-20: the chosen token plus that many

    def logits_processors(self, n_prompt: int = 0) -> list[LogitsProcessor]:
        processors = make_logits_processors(
            self.repetition_penalty, self.repetition_context_size, self.logit_bias
        )
        if self.presence_penalty or self.frequency_penalty:
            processors.append(
                make_penalties(n_prompt, self.presence_penalty, self.frequency_penalty)
            )
        return processors


@dataclass
class TokenLogprob:
    token: str
    bytes: list[int]
    logprob: float


@dataclass
class Token:
    """One generated token: the text it made final ('' while held back) and its logprobs."""

    text: str
    id: int
    logprob: TokenLogprob | None = None
    top: list[TokenLogprob] | None = None


@dataclass
class Finished:
    reason: str  # "stop" (EOS or a stop string), "length", "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    """The job ended without a result: `status` is the HTTP status the API layer answers
    with (503 while shutting down, 400 for a job the model cannot take, 500 for a bug)."""

    message: str
    status: int = 500


class Job:
    """One request: prompt ids, settings, and where its events go."""

    def __init__(self, prompt: list[int], settings: RowSettings, emit: Callable[[object], None]):
        self.prompt = prompt
        self.settings = settings
        self.emit = emit
        self.cancelled = False  # set by the API layer; the row is dropped at the next step
        self.ended = False  # a Finished or Failed event was emitted: nothing may follow it
        self.on_cancel: Callable[[], None] | None = None  # told of a cancel (another process)

    def cancel(self) -> None:
        if not (self.cancelled or self.ended) and self.on_cancel is not None:
            self.on_cancel()
        self.cancelled = True

    def end(self, event: Finished | Failed) -> None:
        """Emit the job's last event (once: a later one is dropped)."""
        if not self.ended:
            self.ended = True
            self.emit(event)


class _Row:
    """A job being prefilled or decoded, with its caches and text state.

    Raises ContextLengthError when the prompt does not fit the model's context; the
    length limit is cut to what fits.
    """

    def __init__(self, job: Job, engine: Engine):
        s, model = job.settings, engine.model
        self.job = job
        self.caches, self.cached = engine.prompt_cache.fetch(job.prompt, engine.new_caches)
        if self.caches is None:
            self.caches = engine.new_caches()
        n_new = len(job.prompt) - self.cached
        try:
            self.max_tokens = token_budget(model, self.caches, n_new, s.max_tokens)
        except ContextLengthError:
            engine.release(self.caches)
            raise
        self.tokens = list(job.prompt)  # fed and to feed: prompt, then generated tokens
        self.fed = self.cached  # tokens in the caches
        self.generated = 0
        self.sampling = RowSampling(model, engine.tokenizer, s, self.tokens)
        self.text = TextStream(engine.tokenizer, s.stop)

    def chunks(self, step: int) -> list[tuple[int, int]]:
        """The prefill chunks left: all prompt tokens but the last, `step` at a time."""
        end = len(self.job.prompt) - 1
        return [(lo, min(lo + step, end)) for lo in range(self.fed, end, step)]


def _slot(row: _Row) -> int:
    """Where the row's caches are in the slab (rows outside it go last)."""
    c = row.caches[0]
    return c.slot if isinstance(c, SlotCache) else 1 << 30


class Engine:
    """Owns the model on one thread; `submit` jobs, `close` to drain and stop."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_step: int = 512,
        prompt_cache_bytes: int = 0,
    ):
        for name, value in (("max_batch", max_batch), ("prefill_step", prefill_step)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        # The weights are evaluated here, on the thread that loaded them: a lazily loaded or
        # cast array is tied to its thread's stream, and evaluating it on the engine's thread
        # fails ("There is no Stream(cpu, 0) in current thread": half-precision models, which
        # only MLX's kernels run, failed every request).
        mx.eval(model.parameters())
        self.max_batch, self.max_queue, self.prefill_step = max_batch, max_queue, prefill_step
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.slab = row_slab(model, max_batch)  # the rows' caches, where one buffer is faster
        self._waiting: deque[Job] = deque()
        self._admitted: list[Job] = []  # taken from the queue, rows not built yet
        self._prefilling: list[_Row] = []
        self._running: list[_Row] = []
        self._wake = threading.Condition()
        self._closing = False
        self._deadline = math.inf
        self._cancelled = 0  # rows dropped because their client went away
        self._thread = threading.Thread(target=self._loop, name="elm-mlx-engine", daemon=True)
        self.after_step: Callable[[], None] | None = None  # called after each step's events
        self._pieces = [self._piece(i) for i in range(tokenizer.vocab_size)]

    # ---- any thread ----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`; raises QueueFull or Closed."""
        with self._wake:
            if self._closing:
                raise Closed("the server is shutting down")
            # waiting: the jobs beyond the batch's free rows (as `EngineProcess` counts them)
            busy = len(self._running) + len(self._prefilling) + len(self._admitted)
            waiting = len(self._waiting) + busy - self.max_batch
            if waiting >= self.max_queue:
                raise QueueFull(f"{max(0, waiting)} requests are already waiting")
            self._waiting.append(job)
            self._wake.notify()

    def close(self, grace: float = 10.0) -> None:
        """Take no new jobs; let running ones finish for `grace` seconds, then end them."""
        with self._wake:
            self._closing = True
            self._deadline = min(
                self._deadline, time.monotonic() + grace
            )  # a 2nd signal never delays
            self._wake.notify()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def alive(self) -> bool:
        """Whether the engine thread still runs (after `close`, until its rows have ended)."""
        return self._thread.is_alive()

    @property
    def context(self) -> int:
        """The model's context length, as it defines it."""
        return self.model.args.max_context_length

    def stats(self) -> dict:
        return {
            "waiting": len(self._waiting),
            "running": len(self._running) + len(self._prefilling) + len(self._admitted),
            "cancelled": self._cancelled,
            "prompt_cache_entries": len(self.prompt_cache),
            "prompt_cache_bytes": self.prompt_cache.nbytes,
        }

    # ---- the engine thread ---------------------------------------------------

    def new_caches(self) -> list:
        """A row's per-layer caches: a slot of the slab where there is one free."""
        return take_caches(self.model, self.slab)

    def release(self, caches: list, keep: bool = False) -> list | None:
        return release_caches(self.slab, caches, keep)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or self._prefilling or self._running or self._closing):
                    self._wake.wait()
                if self._closing and time.monotonic() >= self._deadline:
                    self._end_all()
                if self._closing and not (self._waiting or self._prefilling or self._running):
                    return
                admitted = self._admit()
            try:
                self._step(admitted)
            except Exception:  # a bug, not a bad request: fail these jobs, keep serving
                traceback.print_exc(file=sys.stderr)
                jobs = {id(j): j for j in admitted + [r.job for r in self._prefilling]}
                jobs.update((id(r.job), r.job) for r in self._running)
                for job in jobs.values():
                    job.end(Failed("internal error while generating; see the server log"))
                self._prefilling, self._running, self._admitted = [], [], []
                if self.slab is not None:
                    self.slab.release_all()
                mx.clear_cache()
            if self.after_step is not None:
                self.after_step()

    def _admit(self) -> list[Job]:
        """Waiting jobs that fit in the batch (called holding the lock).

        Here and in `_drop_cancelled` a job is counted before it leaves where it was:
        `stats` (read from other threads without the lock) never misses one.
        """
        busy = len(self._running) + len(self._prefilling)
        while self._waiting and busy + len(self._admitted) < self.max_batch:
            job = self._waiting[0]
            if job.cancelled:
                self._cancelled += 1
            else:
                self._admitted.append(job)
            self._waiting.popleft()
        return self._admitted

    def _end_all(self) -> None:
        """The grace period is over: end every row now, refuse every waiting job."""
        for job in self._waiting:
            job.end(Failed("the server is shutting down", 503))
        self._waiting.clear()
        for row in self._prefilling + self._running:
            self._finish(row, "length", store=False)
        self._prefilling, self._running = [], []

    def _step(self, admitted: list[Job]) -> None:
        for job in admitted:
            try:
                self._prefilling.append(_Row(job, self))
            except ContextLengthError as e:
                job.end(Failed(str(e), 400))
        self._admitted = []
        self._drop_cancelled()
        chunks = self._next_chunks()
        if self._running or chunks:
            self._forward(chunks)

    def _drop_cancelled(self) -> None:
        gone = {id(r) for r in self._prefilling + self._running if r.job.cancelled}
        if not gone:
            return
        self._cancelled += len(gone)
        for rows in (self._prefilling, self._running):
            for r in rows:
                if id(r) in gone:
                    self.release(r.caches)
            rows[:] = [r for r in rows if id(r) not in gone]
        mx.clear_cache()  # their caches are garbage now: hand MLX's buffers back

    def _next_chunks(self) -> list[tuple[_Row, int, int]]:
        """The prompt chunks (row, lo, hi) for this step: whole chunks of the prefilling rows
        in order, `prefill_step` tokens in all (at least one chunk), one per row. Rows with
        none left start running first, whatever waits ahead of them."""
        for row in [r for r in self._prefilling if not r.chunks(self.prefill_step)]:
            self._prefilling.remove(row)
            self._running.append(row)
        chunks, budget = [], self.prefill_step
        for row in self._prefilling:
            lo, hi = row.chunks(self.prefill_step)[0]
            if hi - lo > budget and chunks:
                break
            chunks.append((row, lo, hi))
            budget -= hi - lo
            if budget <= 0:
                break
        n = chunks_per_step(self.model, [(r.job.prompt[lo:hi], r.caches) for r, lo, hi in chunks])
        return chunks[:n]

    def _forward(self, chunks: list[tuple[_Row, int, int]]) -> None:
        """One token for every running row, and `chunks` (row, lo, hi) of prefilling rows'
        prompts, all in one forward pass: the running rows never wait for a prefill pass
        of their own, and prompts arriving together share their products."""
        rows = sorted(self._running, key=_slot)  # in slot order: the slab needs no reordering
        prompts = [(row.job.prompt[lo:hi], row.caches) for row, lo, hi in chunks]
        logits = decode_step(
            self.model, [r.tokens[r.fed] for r in rows], [r.caches for r in rows], prompts
        )
        for r in rows:
            r.fed += 1
        for row, _, hi in chunks:
            row.fed = hi
            if not row.chunks(self.prefill_step):  # prefilled: decodes from the next step
                self._prefilling.remove(row)
                self._running.append(row)
        if not rows:
            return
        ys, logprobs = sample_rows(logits, [r.sampling for r in rows])  # (B,), (B, vocab)
        if any(r.job.settings.top_logprobs is not None for r in rows):
            chosen = mx.take_along_axis(logprobs, ys[:, None], axis=-1)[:, 0]  # (B,)
            mx.eval(ys, chosen)
            chosen = chosen.tolist()
        else:
            chosen = [None] * len(rows)
        done = []
        for i, (r, y, lp) in enumerate(zip(rows, ys.tolist(), chosen, strict=True)):
            if self._emit_token(r, y, lp, logprobs, i):
                done.append(r)
        for r in done:
            self._running.remove(r)
        if done:
            mx.clear_cache()

    def _emit_token(self, row: _Row, token: int, logprob, logprobs: mx.array, i: int) -> bool:
        """Send one token's text (and its logprobs, row `i` of `logprobs`, when asked for);
        True when the row is finished (and reported)."""
        row.tokens.append(token)
        row.generated += 1
        s = row.job.settings
        last = row.generated >= row.max_tokens
        text, stopped = row.text.step(token, last)
        reason = "stop" if stopped else "length" if last else None
        event = Token(text, token)
        if s.top_logprobs is not None:
            event.logprob = self._logprob(token, logprob)
            event.top = self._top(logprobs[i], s.top_logprobs)
        row.job.emit(event)
        if reason is not None:
            self._finish(row, reason)
        return reason is not None

    def _finish(self, row: _Row, reason: str, store: bool = True) -> None:
        prompt = len(row.job.prompt)
        row.job.end(Finished(reason, prompt, row.generated, row.cached))
        # kept when every token but the newest is cached
        store = store and self.prompt_cache.max_bytes > 0 and row.fed == len(row.tokens) - 1
        kept = self.release(row.caches, keep=store)
        if store:
            self.prompt_cache.store(row.tokens[: row.fed], kept)

    # ---- logprobs ------------------------------------------------------------

    def _piece(self, i: int) -> tuple[str, list[int]]:
        kind, value = self.tokenizer.piece_table()[i]
        if kind == 1:  # a byte piece
            return bytes((value,)).decode("utf-8", errors="replace"), [value]
        return value, list(value.encode("utf-8"))

    def _logprob(self, token: int, logprob: float) -> TokenLogprob:
        text, raw = self._pieces[token] if token < len(self._pieces) else ("", [])
        if not math.isfinite(logprob):  # -inf (a token ruled out), or overflowed settings
            logprob = UNLIKELY
        return TokenLogprob(text, raw, logprob)

    def _top(self, logprobs: mx.array, k: int) -> list[TokenLogprob]:
        if k == 0:
            return []
        lp = np.asarray(logprobs.astype(mx.float32))  # (vocab,)
        ids = np.argpartition(-lp, k - 1)[:k]
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        return [self._logprob(int(i), float(lp[i])) for i in ids]
