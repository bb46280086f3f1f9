"""KV states of finished requests, kept in an LRU bounded in bytes, reused by prefix.

A chat client resends the whole conversation every turn, and many requests share
one long system prompt: a new request whose tokens begin with a kept sequence
starts from a copy of that sequence's cache and prefills only the rest.
"""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx
import numpy as np

from ..runtime.slab import SlotCache


class PromptCache:
    """Finished sequences' per-layer caches, least recently used evicted beyond `max_bytes`."""

    # Fewest shared tokens worth a copy: every prompt shares its BOS, which costs less to
    # compute than to copy.
    MIN_REUSE = 2

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (0 turns the cache off), got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, list] = OrderedDict()  # key -> per-layer caches
        self._table = _Table()  # the entries' tokens
        self._next_key = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, prompt: list[int], make_cache) -> tuple[list | None, int]:
        """(fresh caches holding the longest kept prefix of `prompt`, its length) or (None, 0).

        At least the last prompt token is always left to compute (its logits are
        needed). `make_cache()` builds the empty per-layer caches to fill.
        """
        keys, shared = self._table.shared(np.asarray(prompt, np.int64))
        if not keys:
            return None, 0
        i = int(shared.argmax())  # the longest (of equals, the earliest kept)
        best, best_n = keys[i], min(int(shared[i]), len(prompt) - 1)
        if best_n < self.MIN_REUSE:
            return None, 0
        self._entries.move_to_end(best)
        caches = make_cache()
        for c, kept in zip(caches, self._entries[best], strict=True):
            keys, values = kept.keys, kept.values  # evaluated when stored
            if isinstance(c, SlotCache):  # copied in by numpy: no MLX slice to evaluate
                keys, values = np.asarray(keys), np.asarray(values)
            # New array objects: the fresh cache's writes never reach the kept buffer.
            c.state = [keys[..., :best_n, :], values[..., :best_n, :]]
        mx.eval([c.state for c in caches if not isinstance(c, SlotCache)])
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
        for key in self._table.prefixes_of(ids):  # superseded
            self._drop(key)
        self._entries[self._next_key] = caches
        self._table.add(self._next_key, ids)
        self._next_key += 1
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        caches = self._entries.pop(key)
        self.nbytes -= sum(c.nbytes for c in caches)
        self._table.remove(key)


class _Table:
    """The kept sequences' tokens, a row each padded with -1 (no token id). A prompt is
    compared with every row's first few tokens at once, then with more of the rows that
    still match (most rows differ within a few tokens). A new entry is a row appended, a
    dropped one a row blanked; the rows are packed again when most are blank. (Rebuilding
    the table at every change, and comparing every row's every token, cost a busy server
    about a millisecond a request with a few hundred entries kept.)"""

    def __init__(self):
        self.tokens = np.full((16, 256), -1, np.int32)
        self.lengths = np.full(16, -1, np.int64)  # -1: a blank row
        self.keys: list[int | None] = []  # each row's entry, in the order they were kept
        self.rows: dict[int, int] = {}  # entry -> row

    def add(self, key: int, ids: np.ndarray) -> None:
        n, width = len(self.keys), self.tokens.shape[1]
        if n == len(self.tokens) or len(ids) > width:
            rows = len(self.tokens) * (2 if n == len(self.tokens) else 1)
            self._resize(rows, max(width, 1 << (len(ids) - 1).bit_length()))
        self.tokens[n, : len(ids)] = ids
        self.lengths[n] = len(ids)
        self.keys.append(key)
        self.rows[key] = n

    def remove(self, key: int) -> None:
        r = self.rows.pop(key)
        self.tokens[r] = -1
        self.lengths[r] = -1
        self.keys[r] = None
        if len(self.keys) > 64 and 2 * len(self.rows) < len(self.keys):
            self._pack()

    def shared(self, ids: np.ndarray) -> tuple[list[int], np.ndarray]:
        """(the entries' keys, how many leading tokens each shares with `ids`)."""
        if not self.rows:
            return [], np.zeros(0, np.int64)
        used = len(self.keys)
        n = min(self.tokens.shape[1], len(ids))
        counts = np.zeros(used, np.int64)
        rows = np.arange(used)  # the rows that share every token so far
        lo, step = 0, 8
        while len(rows) and lo < n:  # a few columns for all, then more for fewer rows
            hi = min(n, lo + step)
            same = self.tokens[rows, lo:hi] == ids[lo:hi]  # a blank row shares nothing
            whole = same.all(axis=1)
            counts[rows] = lo + np.where(whole, hi - lo, same.argmin(axis=1))
            rows, lo, step = rows[whole], hi, 2 * step
        live = self.lengths[:used] >= 0
        return [k for k in self.keys if k is not None], counts[live]

    def prefixes_of(self, ids: np.ndarray) -> list[int]:
        """The entries whose whole sequence begins `ids`."""
        keys, counts = self.shared(ids)
        lengths = self.lengths[: len(self.keys)]
        return [keys[i] for i in np.flatnonzero(counts == lengths[lengths >= 0])]

    def _resize(self, rows: int, width: int) -> None:
        tokens = np.full((rows, width), -1, np.int32)
        lengths = np.full(rows, -1, np.int64)
        n, w = len(self.keys), min(width, self.tokens.shape[1])
        tokens[:n, :w] = self.tokens[:n, :w]
        lengths[:n] = self.lengths[:n]
        self.tokens, self.lengths = tokens, lengths

    def _pack(self) -> None:
        live = [r for r, k in enumerate(self.keys) if k is not None]
        n = len(live)
        self.tokens[:n] = self.tokens[live]
        self.lengths[:n] = self.lengths[live]
        self.tokens[n : len(self.keys)] = -1
        self.lengths[n : len(self.keys)] = -1
        self.keys = [self.keys[r] for r in live]
        self.rows = {k: i for i, k in enumerate(self.keys)}
