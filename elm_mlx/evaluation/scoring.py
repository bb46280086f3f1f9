"""Log-likelihoods of token continuations: each context computed once, continuations batched.

A request is (context ids, continuation ids). Requests with the same context
(every multiple-choice question) are a group. A batch runs in two passes:

1. the contexts of its groups, all but their last token, right-padded, into a
   per-layer key/value record (no output head is computed for them);
2. one row per continuation, `[last context token] + continuation[:-1]`, over
   its group's context keys, each row at its own RoPE offset, masked so that a
   row sees its own context and its own earlier tokens only.

Every token is therefore at the position it has when the request is scored
alone. Rolling windows (long, each with its own context) are better scored one at
a time: given the CPU fast path (`runtime.fastpath.CpuDecoder`) and batches of one,
a window runs as one plain forward pass through its numpy prompt path.

Batches are dealt round-robin to the processes of an `mx.distributed` group and
the results summed back, so every process returns every result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from ..runtime.fastpath import CpuDecoder

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


def process_group():
    """The mx.distributed group when several processes were launched (mlx.launch), else None."""
    group = mx.distributed.init()
    return group if group.size() > 1 else None


@dataclass(frozen=True)
class _Group:
    context: tuple[int, ...]  # at least one token
    items: tuple[tuple[int, tuple[int, ...]], ...]  # (request index, continuation ids)

    @property
    def size(self) -> int:
        return len(self.context) + max(len(c) for _, c in self.items)


def fit_request(context: Sequence[int], continuation: Sequence[int], max_length: int) -> Request:
    """Cut the context from the left so that the model sees at most `max_length` inputs."""
    context, continuation = tuple(int(t) for t in context), tuple(int(t) for t in continuation)
    if not context or not continuation:
        raise ValueError(
            f"a request needs at least one context and one continuation token, got "
            f"{len(context)} and {len(continuation)}"
        )
    if len(continuation) > max_length:
        raise ValueError(
            f"a continuation of {len(continuation)} tokens does not fit the model's "
            f"{max_length}-token context"
        )
    keep = max_length + 1 - len(continuation)
    return context[-keep:], continuation


def _groups(requests: Sequence[Request], max_length: int) -> list[_Group]:
    by_context: dict[tuple[int, ...], list] = {}
    for i, (context, continuation) in enumerate(requests):
        context, continuation = fit_request(context, continuation, max_length)
        by_context.setdefault(context, []).append((i, continuation))
    groups = [_Group(c, tuple(items)) for c, items in by_context.items()]
    # Longest first (the first batch shows whether memory suffices), ties in a fixed order.
    return sorted(groups, key=lambda g: (-g.size, g.context))


def plan_batches(
    requests: Sequence[Request], max_length: int, batch_size: int, max_tokens: int
) -> list[list[_Group]]:
    """Groups dealt into batches of at most `batch_size` rows and about `max_tokens` tokens.

    A group with more continuations than `batch_size` is split; its context is
    then computed once per part.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size}")
    parts = []
    for g in _groups(requests, max_length):
        for s in range(0, len(g.items), batch_size):
            parts.append(_Group(g.context, g.items[s : s + batch_size]))
    batches: list[list[_Group]] = []
    rows = width = 0
    for g in parts:
        n = len(g.items)
        if batches and rows + n <= batch_size and (rows + n) * max(width, g.size) <= max_tokens:
            batches[-1].append(g)
            rows, width = rows + n, max(width, g.size)
        else:
            batches.append([g])
            rows, width = n, g.size
    return batches


class _Record:
    """Phase-1 cache: keeps the keys and values of the padded contexts."""

    offset = 0

    def __init__(self):
        self.keys = self.values = None

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values  # (G, n_kv, P, head_dim)
        return keys, values

    def make_mask(self, n: int, **_):
        return "causal"


class _OverPrefix:
    """Phase-2 cache: each row attends to its group's context keys at its own offset."""

    def __init__(self, record: _Record | None, rows: mx.array, offsets: mx.array, mask):
        self.record, self.rows, self.offset, self.mask = record, rows, offsets, mask

    def update_and_fetch(self, keys, values):
        if self.record is None:
            return keys, values
        k = mx.concatenate([self.record.keys[self.rows], keys], axis=2)  # (R, n_kv, P + N, hd)
        v = mx.concatenate([self.record.values[self.rows], values], axis=2)
        return k, v

    def make_mask(self, n: int, **_):
        return self.mask


def _pad(rows: Sequence[Sequence[int]], width: int) -> mx.array:
    return mx.array([list(r) + [0] * (width - len(r)) for r in rows], dtype=mx.int32)


def _context_pass(model, groups: list[_Group]):
    """Run all but the last token of each context; return per-layer records (or None)."""
    heads = [g.context[:-1] for g in groups]
    width = max(len(h) for h in heads)
    if width == 0:
        return None, width
    records = [_Record() for _ in model.layers]
    model(_pad(heads, width), cache=records)  # logits unused: only the records are evaluated
    mx.eval([(r.keys, r.values) for r in records])
    return records, width


def _mask(prefix_lengths: mx.array, width: int, n: int) -> mx.array:
    """(R, 1, n, width + n): row r sees its first prefix_lengths[r] keys, then causally."""
    q = mx.arange(n)[:, None]  # (n, 1)
    own = mx.arange(n)[None] <= q  # (n, n)
    ctx = mx.arange(width)[None, None] < prefix_lengths[:, None, None]  # (R, 1, width)
    ctx = mx.broadcast_to(ctx, (prefix_lengths.size, n, width))
    own = mx.broadcast_to(own[None], (prefix_lengths.size, n, n))
    return mx.concatenate([ctx, own], axis=2)[:, None]


def score_batch(model, groups: list[_Group]) -> list[tuple[int, float, bool]]:
    """(request index, log-likelihood, greedy) for every continuation of `groups`."""
    if isinstance(model, CpuDecoder):
        if len(groups) == 1 and len(groups[0].items) == 1:
            return [_score_alone(model, groups[0])]
        model = model.model  # padded batches: MLX's kernels
    records, width = _context_pass(model, groups)
    owner, inputs, targets = [], [], []
    for gi, g in enumerate(groups):
        for _, cont in g.items:
            owner.append(gi)
            inputs.append((g.context[-1],) + cont[:-1])
            targets.append(cont)
    n = max(len(t) for t in targets)
    rows = mx.array(owner, dtype=mx.int32)
    prefix = mx.array([len(groups[o].context) - 1 for o in owner], dtype=mx.int32)
    mask = _mask(prefix, width, n)
    caches = [
        _OverPrefix(None if records is None else r, rows, prefix, mask)
        for r in (records or [None] * len(model.layers))
    ]
    logits = model(_pad(inputs, n), cache=caches).astype(mx.float32)  # (R, n, vocab)
    logprob, greedy = _pick(logits, _pad(targets, n))  # (R, n) each
    valid = mx.arange(n)[None] < mx.array([len(t) for t in targets])[:, None]
    greedy = greedy | ~valid
    total = mx.where(valid, logprob, 0.0).sum(axis=1)
    all_greedy = greedy.all(axis=1)
    mx.eval(total, all_greedy)
    index = [i for g in groups for i, _ in g.items]
    return list(zip(index, total.tolist(), all_greedy.tolist(), strict=True))


def _score_alone(decoder: CpuDecoder, group: _Group) -> tuple[int, float, bool]:
    """One request in one forward pass with no cache or padding."""
    ((index, cont),) = group.items
    ids = mx.array(group.context + cont[:-1], dtype=mx.int32)[None]  # (1, L)
    logits = decoder(ids)[0, -len(cont) :].astype(mx.float32)  # (n, vocab)
    logprob, greedy = _pick(logits, mx.array(cont, dtype=mx.int32))
    total, all_greedy = logprob.sum(), greedy.all()
    mx.eval(total, all_greedy)
    return index, total.item(), all_greedy.item()


def _pick(logits: mx.array, target: mx.array) -> tuple[mx.array, mx.array]:
    """Log-probability of each target token and whether it is the argmax: (..., n) each."""
    picked = mx.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    return picked - mx.logsumexp(logits, axis=-1), mx.argmax(logits, axis=-1) == target


def score(
    model,
    requests: Sequence[Request],
    *,
    batch_size: int = 16,
    max_tokens: int = 4096,
    group=None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each request's continuation given its context.

    `model` is an OpenELM or its CPU fast-path wrapper (which scores batches of one
    through its numpy prompt path and larger ones with MLX). `batch_size` bounds the
    sequences in one forward pass, `max_tokens` roughly their padded token count.
    With an `mx.distributed` `group` of several processes, each computes a share of
    the batches and every process returns all results. `progress(n)` is called with
    the number of requests each finished batch scored on this process.
    """
    max_length = model.args.max_context_length
    batches = plan_batches(requests, max_length, batch_size, max_tokens)
    rank, size = (0, 1) if group is None else (group.rank(), group.size())
    results = [(0.0, False)] * len(requests)
    for b, batch in enumerate(batches):
        if b % size != rank:
            continue
        for i, logprob, greedy in score_batch(model, batch):
            results[i] = (logprob, greedy)
        if progress is not None:
            progress(sum(len(g.items) for g in batch))
    return results if size == 1 else _gather(results, batches, rank, size)


def score_windows(
    model,
    windows: Sequence[Request],
    *,
    batch_size: int = 16,
    group=None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """`score` for rolling windows (long, each its own context): given the CPU fast path,
    one window per forward pass through its numpy prompt path, which beats padded batches."""
    if isinstance(model, CpuDecoder):
        batch_size = 1
    return score(model, windows, batch_size=batch_size, group=group, progress=progress)


def _gather(results, batches, rank: int, size: int) -> list[tuple[float, bool]]:
    """Every process's results in every process: a sum where the others hold zeros."""
    mine = [0.0] * (2 * len(results))
    for b, batch in enumerate(batches):
        if b % size == rank:
            for g in batch:
                for i, _ in g.items:
                    mine[2 * i], mine[2 * i + 1] = results[i][0], float(results[i][1])
    summed = mx.distributed.all_sum(mx.array(mine, dtype=mx.float32), stream=mx.cpu).tolist()
    return [(summed[2 * i], summed[2 * i + 1] > 0.5) for i in range(len(results))]


def rolling_windows(
    tokens: Sequence[int], prefix_token: int, max_length: int, stride: int | None = None
) -> list[Request]:
    """Requests that score every token of `tokens` once, after `prefix_token`.

    The first window scores up to `max_length` tokens; each later one scores the
    next `stride` (default `max_length`) tokens after as much left context as fits
    in `max_length` inputs. With the default stride these are lm-eval's disjoint
    rolling windows, the last of them with a full context.
    """
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be between 1 and {max_length}, got {stride}")
    seq = [int(prefix_token)] + [int(t) for t in tokens]
    windows, start = [], 1
    while start < len(seq):
        end = min(len(seq), start + (max_length if start == 1 else stride))
        begin = max(0, end - max_length - 1)
        windows.append((seq[begin:start], seq[start:end]))
        start = end
    return windows
