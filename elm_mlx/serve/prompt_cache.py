"""KV states of finished requests, kept in an LRU bounded in bytes, reused by prefix.

A chat client resends the whole conversation every turn, and many requests share
one long system prompt: a new request whose tokens begin with a kept sequence
starts from a copy of that sequence's cache and prefills only the rest.
"""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx
import numpy as np


class PromptCache:
    """Finished sequences' per-layer caches, least recently used evicted beyond `max_bytes`."""

    # Fewest shared tokens worth a copy: every prompt shares its BOS, which costs less to
    # compute than to copy.
    MIN_REUSE = 2

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (0 turns the cache off), got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, tuple[np.ndarray, list]] = OrderedDict()
        self._next_key = 0
        self.nbytes = 0
        self._table: tuple[list[int], np.ndarray] | None = None  # (keys, their tokens padded)

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, prompt: list[int], make_cache) -> tuple[list | None, int]:
        """(fresh caches holding the longest kept prefix of `prompt`, its length) or (None, 0).

        At least the last prompt token is always left to compute (its logits are
        needed). `make_cache()` builds the empty per-layer caches to fill.
        """
        keys, shared = self._shared_prefixes(np.asarray(prompt, np.int64))
        if not keys:
            return None, 0
        i = int(shared.argmax())  # the longest (of equals, the first in the table)
        best, best_n = keys[i], min(int(shared[i]), len(prompt) - 1)
        if best_n < self.MIN_REUSE:
            return None, 0
        self._entries.move_to_end(best)
        caches = make_cache()
        for c, kept in zip(caches, self._entries[best][1], strict=True):
            # New array objects: the fresh cache's writes never reach the kept buffer.
            c.state = [kept.keys[..., :best_n, :], kept.values[..., :best_n, :]]
        mx.eval([c.state for c in caches])
        return caches, best_n

    def store(self, tokens: list[int], caches: list) -> None:
        """Keep `caches` (which hold exactly `tokens`); the caller must not write to them again."""
        if self.max_bytes == 0 or not tokens:
            return
        assert caches[0].offset == len(tokens), "cache and token count differ"
        mx.eval([c.state for c in caches])
        size = sum(c.nbytes for c in caches)
        if size > self.max_bytes:
            return
        ids = np.asarray(tokens, np.int64)
        keys, shared = self._shared_prefixes(ids)
        for key, n in zip(keys, shared.tolist(), strict=True):  # superseded: prefixes of ids
            if n == len(self._entries[key][0]):
                self._drop(key)
        self._entries[self._next_key] = (ids, caches)
        self._table = None
        self._next_key += 1
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        _, caches = self._entries.pop(key)
        self.nbytes -= sum(c.nbytes for c in caches)
        self._table = None

    def _shared_prefixes(self, ids: np.ndarray) -> tuple[list[int], np.ndarray]:
        """(the kept entries' keys, in their order when the table was last built; how many
        leading tokens each shares with `ids`), all entries compared at once."""
        if self._table is None:  # rebuilt after a change: one row per entry, padded with -1
            keys = list(self._entries)
            rows = [self._entries[k][0] for k in keys]
            table = np.full((len(rows), max(map(len, rows), default=0)), -1, np.int64)
            for row, tokens in zip(table, rows, strict=True):
                row[: len(tokens)] = tokens
            self._table = keys, table
        keys, table = self._table
        if not keys:
            return keys, np.zeros(0, np.int64)
        n = min(table.shape[1], len(ids))
        same = table[:, :n] == ids[:n]  # (entries, n)
        return keys, np.where(same.all(axis=1), n, same.argmin(axis=1))
