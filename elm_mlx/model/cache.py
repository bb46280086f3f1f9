"""Per-layer KV caches, passed into the model, never stored on it.

OpenELM's KV head count differs per layer, so each layer owns one cache that
shapes itself from the first keys it sees. Buffers grow in steps of `step`
tokens (no concatenation per token) and live in MLX's unified memory.

The interface (`offset`, `update_and_fetch`, `state`, `trim`, `make_mask`)
matches mlx-lm's caches, so mlx-lm's generator can drive an elm_mlx model.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx


class ContextLengthError(ValueError):
    """More tokens than the cache may hold."""


class KVCache:
    """Keys and values of one layer, preallocated in steps, bounded by `max_size`."""

    step = 256
    _META = ("offset", "max_size")  # what `meta_state` records besides the arrays

    def __init__(self, max_size: int | None = None):
        self.keys: mx.array | None = None  # (B, n_kv, capacity, head_dim)
        self.values: mx.array | None = None
        self.offset = 0
        self.max_size = max_size
        # True while the buffers are ones `_grow` made for this cache, so that positions
        # past `offset` are its alone; False once `state` sets arrays that may be views
        # of another cache's (a prompt cache's copies). The CPU fast path writes new
        # positions in place only into buffers the cache owns.
        self.owned = False

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, n_kv, _, k_dim = keys.shape
        capacity = ((needed + self.step - 1) // self.step) * self.step
        if self.max_size is not None:
            capacity = min(capacity, self.max_size)
        # Zeros after the kept `offset` entries (the old buffer is cut at `offset` below).
        shape = (B, n_kv, capacity - (0 if self.keys is None else self.offset))
        new_k = mx.zeros((*shape, k_dim), keys.dtype)
        new_v = mx.zeros((*shape, values.shape[3]), values.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)
        self.owned = True

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, n_kv, L, head_dim) keys/values; return everything cached so far."""
        L = keys.shape[2]
        end = self.offset + L
        self.check_room(end)
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values, end)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def check_room(self, end: int) -> None:
        """Raise ContextLengthError when holding `end` tokens would pass `max_size`."""
        if self.max_size is not None and end > self.max_size:
            raise ContextLengthError(
                f"{end} tokens exceed the context length of {self.max_size}; "
                "shorten the prompt or generation, or use a rotating window "
                "(max_kv_size)"
            )

    def make_mask(self, n: int, window_size=None, return_array: bool = False):
        """Attention mask for `n` new queries: None for one token, else causal."""
        if n == 1:
            return None
        if return_array:
            return causal_mask(n, self.offset)
        return "causal"

    # ---- state, shared with mlx-lm's interface ---------------------------
    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else list(self._temporal())

    @state.setter
    def state(self, v: list[mx.array]) -> None:
        self.keys, self.values = v
        self.owned = False
        self._filled(self.keys.shape[2])

    @property
    def meta_state(self) -> tuple[str, ...]:
        return tuple(str(getattr(self, name) or 0) for name in self._META)  # max_size None: 0

    @meta_state.setter
    def meta_state(self, v: tuple[str, ...]) -> None:
        for name, value in zip(self._META, v, strict=True):
            setattr(self, name, int(value) or (None if name == "max_size" else 0))

    def _temporal(self) -> tuple[mx.array, mx.array]:
        """Cached keys/values in temporal order."""
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _filled(self, n: int) -> None:
        """The buffers now hold `n` tokens (set from `state`)."""
        self.offset = n

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens; return how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class RotatingKVCache(KVCache):
    """Keeps the first `keep` tokens and the last `max_size - keep`, for unbounded generation.

    RoPE is applied before caching, so a single new token may attend to the
    ring buffer in any order; multi-token updates are written in temporal order
    and masked to the window.
    """

    _META = ("offset", "max_size", "keep")

    def __init__(self, max_size: int, keep: int = 4):
        if not 0 <= keep < max_size:
            raise ValueError(f"keep={keep} must be >= 0 and < max_size={max_size}")
        super().__init__(max_size)
        self.keep = keep
        self._idx = 0  # next ring slot to write

    def _temporal(self) -> tuple[mx.array, mx.array]:
        if self._idx == self.keys.shape[2] or self.offset < self.max_size:
            return self.keys[..., : min(self.offset, self.max_size), :], self.values[
                ..., : min(self.offset, self.max_size), :
            ]
        order = [slice(None, self.keep), slice(self._idx, None), slice(self.keep, self._idx)]
        k = mx.concatenate([self.keys[..., s, :] for s in order], axis=2)
        v = mx.concatenate([self.values[..., s, :] for s in order], axis=2)
        return k, v

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if keys.shape[2] == 1 and self.keys is not None and self.offset >= self.max_size:
            return self._update_ring(keys, values)
        return self._update_concat(keys, values)

    def _update_ring(self, keys, values):
        if self._idx == self.max_size:
            self._idx = self.keep
        self.keys[..., self._idx : self._idx + 1, :] = keys
        self.values[..., self._idx : self._idx + 1, :] = values
        self._idx += 1
        self.offset += 1
        return self.keys, self.values

    def _update_concat(self, keys, values):
        L = keys.shape[2]
        if self.keys is None:
            k, v = keys, values
        else:
            old_k, old_v = self._temporal()
            k = mx.concatenate([old_k, keys], axis=2)
            v = mx.concatenate([old_v, values], axis=2)
        self.offset += L
        full_k, full_v = k, v
        # Keep `keep` sink tokens and the most recent tokens, max_size in all.
        if k.shape[2] > self.max_size:
            tail = self.max_size - self.keep
            k = mx.concatenate([k[..., : self.keep, :], k[..., -tail:, :]], axis=2)
            v = mx.concatenate([v[..., : self.keep, :], v[..., -tail:, :]], axis=2)
        self.keys, self.values = k, v
        self._idx = k.shape[2]
        return full_k, full_v

    def make_mask(self, n: int, window_size=None, return_array: bool = False):
        """Query at position p sees the `keep` sink tokens and the last `max_size - keep`."""
        if n == 1:
            return None
        if self.offset <= self.max_size:
            cached = mx.arange(self.offset)
        else:
            recent = mx.arange(self.offset - (self.max_size - self.keep), self.offset)
            cached = mx.concatenate([mx.arange(self.keep), recent])
        q = mx.arange(self.offset, self.offset + n)[:, None]
        k = mx.concatenate([cached, q[:, 0]])[None]  # positions of the keys attended to
        return (k <= q) & ((k < self.keep) | (k > q - (self.max_size - self.keep)))

    def _filled(self, n: int) -> None:
        self._idx = n  # `offset` comes from meta_state

    def is_trimmable(self) -> bool:
        return self.offset < self.max_size

    def trim(self, n: int) -> int:
        if not self.is_trimmable():
            raise ValueError("a rotating cache that has wrapped around cannot be trimmed")
        n = super().trim(n)
        self._idx = self.offset
        return n


def causal_mask(n: int, offset: int) -> mx.array:
    """Boolean (n, offset + n) mask: query i sees keys up to its own position."""
    q = mx.arange(offset, offset + n)[:, None]
    return mx.arange(offset + n)[None] <= q


def make_cache(
    num_layers: int, max_context: int | None = None, max_kv_size: int | None = None
) -> list[KVCache]:
    """One cache per layer: bounded by the context length, or a rotating window."""
    if max_kv_size is not None:
        return [RotatingKVCache(max_kv_size) for _ in range(num_layers)]
    return [KVCache(max_context) for _ in range(num_layers)]


_CLASSES = {cls.__name__: cls for cls in (KVCache, RotatingKVCache)}


def save_cache(path: str | Path, cache: list[KVCache], metadata: dict | None = None) -> None:
    """Write a prompt cache to a .safetensors file (atomically) for later reuse."""
    arrays, meta = {}, {f"user.{k}": str(v) for k, v in (metadata or {}).items()}
    for i, c in enumerate(cache):
        if c.empty():
            raise ValueError(f"layer {i} cache is empty; run a prompt through the model first")
        arrays[f"{i}.keys"], arrays[f"{i}.values"] = c.state
        meta[f"{i}.class"] = type(c).__name__
        meta[f"{i}.meta"] = ",".join(c.meta_state)
    meta["num_layers"] = str(len(cache))
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, meta)
    tmp.replace(path)


def load_cache(path: str | Path) -> tuple[list[KVCache], dict]:
    """Read a cache written by `save_cache`; returns (cache, user metadata)."""
    arrays, meta = mx.load(str(path), return_metadata=True)
    if "num_layers" not in meta:
        raise ValueError(f"{path} is not an elm_mlx prompt cache (no num_layers metadata)")
    cache = []
    for i in range(int(meta["num_layers"])):
        c = _CLASSES[meta[f"{i}.class"]].__new__(_CLASSES[meta[f"{i}.class"]])
        c.state = [arrays[f"{i}.keys"], arrays[f"{i}.values"]]
        c.meta_state = tuple(meta[f"{i}.meta"].split(","))
        cache.append(c)
    user = {k.removeprefix("user."): v for k, v in meta.items() if k.startswith("user.")}
    return cache, user
