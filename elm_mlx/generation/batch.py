"""Decoding many sequences at once, each with its own KV cache.

`decode_step` is one step for many rows. Rows hold different numbers of tokens,
so each keeps its own per-layer `KVCache` (the very caches `generate` uses: a
prompt is prefilled into one as `generate` does it; no padding, no batched cache
to merge or split when a row joins or leaves). What reads every weight, the
projections and the feed-forward, runs once for all rows as a (B, d) product;
only attention, which reads each row's own cache, runs row by row.

Two paths with the same result: on the CPU, float32 plain layers go through the
numpy kernels of `runtime.fastpath` (gemm over the rows, split over the cores);
everything else (a GPU, quantized or LoRA layers, half precision) through the
model's own MLX modules. A batch of one computes exactly what `generate` computes.
On the CPU path, rows whose caches come from one `row_slab` (one buffer per layer for
all rows) also have their attention scored together, each row masked to its length.

`generate_many` is `generate` for a list of prompts, `batch_size` rows per step,
each row with its own settings; the server's engine does the same with requests
that come and go (`serve.engine`).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from ..formats.tokenizer import Tokenizer
from ..runtime.fastpath import CpuDecoder
from ..runtime.slab import RowSlab, SlotCache
from .generate import GenerationSettings, TextStream, prefill, processors_for, token_budget
from .sample import greedy


def decode_step(
    model, tokens: list[int], caches: list[list], prompts: Sequence[tuple[list[int], list]] = ()
) -> mx.array:
    """Logits (B, vocab) of the next token of each row.

    `tokens[b]` is row b's newest token, not yet in its cache; `caches[b]` is that
    row's per-layer cache list, which gains one position. `prompts` are (token ids,
    per-layer caches) of prompt chunks of other sequences, fed into their caches in the
    same step (on the CPU fast path in the same products; their logits are never
    computed); with chunks to feed there may be no rows (B = 0).
    """
    if not tokens and not prompts:
        raise ValueError("decode_step needs at least one row or prompt chunk")
    if isinstance(model, CpuDecoder):
        logits = model.decode_rows(tokens, caches, list(prompts))
        if logits is not None:
            return logits
    for ids, chunk_caches in prompts:
        model(mx.array(ids, mx.int32)[None], cache=chunk_caches)
        mx.eval([c.state for c in chunk_caches])
    if not tokens:
        return mx.zeros((0, model.args.vocab_size), mx.float32)
    return _mlx_step(model.model if isinstance(model, CpuDecoder) else model, tokens, caches)


def chunks_per_step(model, prompts: Sequence[tuple[list[int], list]]) -> int:
    """How many of `prompts` (token ids, per-layer caches), in order, one `decode_step`
    should feed: all of them, except on the CPU fast path where fewer go faster (a core
    each); the rest wait for the next step."""
    if isinstance(model, CpuDecoder) and prompts:
        return model.chunks_now(list(prompts))
    return len(prompts)


def row_slab(model, slots: int) -> RowSlab | None:
    """Caches for up to `slots` rows of `decode_step` in one buffer per layer, where that
    makes the step faster (the CPU fast path batches their attention); else None (each
    row keeps the model's own caches)."""
    return RowSlab.for_model(model, slots) if isinstance(model, CpuDecoder) else None


def take_caches(model, slab: RowSlab | None) -> list:
    """A new row's per-layer caches: a free slot of `slab` if it has one, else the model's."""
    caches = None if slab is None else slab.take()
    return model.make_cache() if caches is None else caches


def release_caches(slab: RowSlab | None, caches: list, keep: bool = False) -> list | None:
    """Done with a row's caches (from `take_caches`); with `keep`, caches holding the same
    tokens that stay valid (a slot is copied out: it will be reused)."""
    if slab is not None and isinstance(caches[0], SlotCache):
        return slab.release(caches, keep)
    return caches if keep else None


def _mlx_step(model, tokens: list[int], caches: list[list]) -> mx.array:
    t = model.transformer
    h = t.token_embeddings(mx.array(tokens, mx.int32)[:, None])  # (B, 1, d)
    for i, block in enumerate(t.layers):
        attn = block.attn
        qkv = attn.qkv_proj(block.attn_norm(h))  # (B, 1, qkv_out_dim)
        rows = [attn.attend(qkv[b : b + 1], None, row[i]) for b, row in enumerate(caches)]
        h = h + attn.out_proj(mx.concatenate(rows))  # (B, 1, d)
        h = h + block.ffn(block.ffn_norm(h))
    return model.head(t.norm(h))[:, 0]  # (B, vocab)


# ---- sampling many rows ---------------------------------------------------------


class RowSampling:
    """One row's sampler and logits processors, over its token history.

    `history` is the row's own list of token ids (prompt, then generated), which the
    caller appends to; the processors see it as it is at each step.
    """

    def __init__(self, model, tokenizer: Tokenizer, s: GenerationSettings, history: list[int]):
        self.sampler = s.sampler()
        self.processors = processors_for(model, tokenizer, s, n_prompt=len(history))
        self.history = history

    def process(self, logits: mx.array) -> mx.array:  # (1, vocab)
        history = mx.array(self.history, mx.int32)
        for p in self.processors:
            logits = p(history, logits)
        return logits


def sample_rows(logits: mx.array, rows: Sequence[RowSampling]) -> tuple[mx.array, mx.array]:
    """(next token of each row (B,), log-probabilities (B, vocab) it was drawn from).

    Each row's processors and sampler act on its own row. Greedy rows with nothing to
    process (the common case) share one argmax over the batch, taken by numpy (on the
    CPU, eight rows of nano's logits: MLX's argmax, evaluation and `tolist` 75 us, a
    twentieth of the step, numpy's 3 us; `benchmarks/bench_kernels.py --only sampling`);
    the log-probabilities are then returned lazily, computed only if the caller reads them.
    """
    greedy_rows = not any(r.processors for r in rows) and all(r.sampler is greedy for r in rows)
    if greedy_rows and logits.dtype in (mx.float32, mx.float16):  # numpy has no bfloat16
        ys = np.asarray(logits).argmax(axis=-1).astype(np.uint32)  # first of equals, as MLX's
        return mx.array(ys), logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if any(r.processors for r in rows):
        logits = mx.concatenate(
            [r.process(logits[b : b + 1]) if r.processors else logits[b : b + 1]
             for b, r in enumerate(rows)]
        )  # fmt: skip
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (B, vocab)
    if all(r.sampler is greedy for r in rows):
        return mx.argmax(logits, axis=-1), logprobs  # the logprobs' argmax, but for rounding ties
    ys = mx.argmax(logits, axis=-1)  # (B,)
    ys = mx.concatenate(
        [ys[b : b + 1] if r.sampler is greedy else r.sampler(logprobs[b : b + 1])
         for b, r in enumerate(rows)]
    )  # fmt: skip
    return ys, logprobs


# ---- many prompts ---------------------------------------------------------------


class _Row:
    """One prompt being decoded: its cache, sampling and text so far."""

    def __init__(
        self, model, tokenizer: Tokenizer, ids: list[int], s: GenerationSettings, caches: list
    ):
        if s.max_kv_size is not None:
            raise ValueError("generate_many keeps whole caches; leave max_kv_size unset")
        self.caches = caches
        self.budget = token_budget(model, self.caches, len(ids), s.max_tokens)
        self.sampling = RowSampling(model, tokenizer, s, list(ids))
        self.text, self.out = TextStream(tokenizer, s.stop), []
        self.token = ids[-1]  # the newest token, not yet in the caches
        if self.budget > 0:  # the last prompt token goes through the batched step
            prefill(model, mx.array(ids, mx.int32), self.caches, s.prefill_step)

    def take(self, token: int) -> bool:
        """Add the sampled `token`; True when the text is complete."""
        last = len(self.out) + 1 >= self.budget
        text, stopped = self.text.step(token, last)
        self.out.append(text)
        self.token = token
        self.sampling.history.append(token)
        return stopped or last


def generate_many(
    model,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    settings: Sequence[GenerationSettings],
    *,
    batch_size: int = 8,
    on_done: Callable[[int], None] | None = None,
) -> list[str]:
    """The text `generate` gives each prompt with its settings, `batch_size` rows per step.

    Prompts are text (encoded with BOS) or token ids. A row that finishes makes room
    for the next prompt; `on_done(i)` is called as prompt i's text is complete.
    """
    if len(prompts) != len(settings):
        raise ValueError(f"{len(prompts)} prompts but {len(settings)} settings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = [""] * len(prompts)
    waiting, rows = deque(range(len(prompts))), {}
    slab = row_slab(model, batch_size)
    done = functools.partial(_done, rows, texts, on_done=on_done, slab=slab)
    while waiting or rows:
        while waiting and len(rows) < batch_size:
            i = waiting.popleft()
            p = prompts[i]
            ids = tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty; give at least one token id")
            rows[i] = _Row(model, tokenizer, ids, settings[i], take_caches(model, slab))
            if rows[i].budget <= 0:
                done(i)
        if rows:
            _step(model, rows, done)
    return texts


def _step(model, rows: dict[int, _Row], done: Callable[[int], None]) -> None:
    """One batched forward pass; every row samples its next token with its own settings."""
    order = list(rows)
    logits = decode_step(model, [rows[i].token for i in order], [rows[i].caches for i in order])
    ys, _ = sample_rows(logits, [rows[i].sampling for i in order])
    for i, y in zip(order, ys.tolist(), strict=True):
        if rows[i].take(y):
            done(i)


def _done(rows: dict[int, _Row], texts: list[str], i: int, *, on_done, slab) -> None:
    row = rows.pop(i)
    texts[i] = "".join(row.out)
    release_caches(slab, row.caches)
    if on_done is not None:
        on_done(i)
