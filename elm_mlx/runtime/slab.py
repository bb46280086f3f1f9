"""KV caches of several sequences in one buffer per layer, for batched decode attention.

Decoding many sequences at once reads each sequence's cache on its own; with one
buffer per sequence and layer, the CPU fast path scores the rows one by one, and on
a small model that per-row Python work costs as much as the products. A `RowSlab`
keeps every layer's keys (and values) of up to `slots` sequences in one MLX array
(slots, n_kv, capacity, head_dim); each sequence's per-layer caches are `SlotCache`s,
plain `KVCache`s whose buffers are its slot of those arrays (MLX slices share their
array's memory). `runtime.fastpath` then writes a step's new keys for all rows at
once and scores every row against the whole slab in a few batched products, each
row masked to its own length.

A slot's memory is written in place through numpy (the CPU's view of an MLX array
is its memory), never by MLX's functional updates: a `SlotCache` stays in its slot
whatever path feeds it. When a sequence ends, `release` frees its slot, and hands
back plain caches with a copy of what it held when asked (the slot will be reused).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..model.cache import KVCache


class SlotCache(KVCache):
    """One layer's cache of one sequence: its slot of a `RowSlab` layer, grown with it."""

    def __init__(self, slab: RowSlab, layer: int, slot: int):
        super().__init__(slab.max_size)
        self.slab, self.layer, self.slot = slab, layer, slot
        self.keys, self.values = slab.views(layer, slot)  # (1, n_kv, capacity, head_dim)
        self.owned = True

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        self.slab.grow(self.layer, needed)  # every slot's cache of this layer is re-pointed

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (1, n_kv, L, head_dim) keys/values into the slot (evaluates them)."""
        end = self.offset + keys.shape[2]
        self.check_room(end)
        self._write(self.offset, keys, values)
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _write(self, start: int, keys: mx.array, values: mx.array) -> None:
        end = start + keys.shape[2]
        if end > self.keys.shape[2]:
            self._grow(keys, values, end)
        np.asarray(self.keys)[..., start:end, :] = np.asarray(keys)
        np.asarray(self.values)[..., start:end, :] = np.asarray(values)
        self.offset = end

    def _set_state(self, v: list[mx.array]) -> None:
        """Copy (1, n_kv, T, head_dim) keys/values into the slot: it holds T tokens."""
        keys, values = v
        self.check_room(keys.shape[2])
        self._write(0, keys, values)

    state = property(KVCache.state.fget, _set_state)

    def empty(self) -> bool:
        return self.offset == 0


class RowSlab:
    """Per-layer buffers for the caches of up to `slots` sequences (see the module doc).

    `take()` gives a free slot's per-layer caches (None when every slot is taken),
    `release(caches)` frees it. Capacity grows for every slot of a layer at once, in
    `KVCache.step` tokens, up to `max_size`.
    """

    def __init__(self, shapes: list[tuple[int, int]], slots: int, max_size: int | None):
        """`shapes`: (n_kv_heads, head_dim) of each layer."""
        if slots < 1:
            raise ValueError(f"a slab needs at least one slot, got {slots}")
        self.shapes, self.slots, self.max_size = shapes, slots, max_size
        self._taken: list[list[SlotCache] | None] = [None] * slots
        # numpy views of each layer's buffers (slots, n_kv, capacity, head_dim), and the MLX
        # views of its slots
        self.keys: list[np.ndarray | None] = [None] * len(shapes)
        self.values: list[np.ndarray | None] = [None] * len(shapes)
        self._views: list[list[tuple[mx.array, mx.array]]] = [[] for _ in shapes]
        for layer in range(len(shapes)):
            self._allocate(layer, self._capacity(1))

    @classmethod
    def for_model(cls, model, slots: int) -> RowSlab:
        """A slab shaped for `model`'s layers, bounded by its context length."""
        shapes = [(layer.attn.n_kv_heads, layer.attn.head_dim) for layer in model.layers]
        return cls(shapes, slots, model.args.max_context_length)

    def _capacity(self, needed: int) -> int:
        step = KVCache.step
        capacity = -(-needed // step) * step
        return capacity if self.max_size is None else min(capacity, self.max_size)

    def _allocate(self, layer: int, capacity: int) -> None:
        """New zeroed buffers for `layer`, holding what the old ones held."""
        n_kv, hd = self.shapes[layer]
        shape = (self.slots, n_kv, capacity, hd)
        keys, values = mx.zeros(shape, mx.float32), mx.zeros(shape, mx.float32)
        views = [(keys[s : s + 1], values[s : s + 1]) for s in range(self.slots)]
        mx.eval(keys, values, views)  # the views share the buffers' memory
        old_keys, old_values = self.keys[layer], self.values[layer]
        self.keys[layer], self.values[layer] = np.asarray(keys), np.asarray(values)
        if old_keys is not None:
            self.keys[layer][:, :, : old_keys.shape[2]] = old_keys
            self.values[layer][:, :, : old_values.shape[2]] = old_values
        self._views[layer] = views

    def views(self, layer: int, slot: int) -> tuple[mx.array, mx.array]:
        """Slot `slot` of layer `layer`'s buffers, (1, n_kv, capacity, head_dim) each."""
        return self._views[layer][slot]

    def capacity(self, layer: int) -> int:
        return self.keys[layer].shape[2]

    @property
    def in_use(self) -> int:
        """How many slots are taken."""
        return sum(t is not None for t in self._taken)

    def take(self) -> list[SlotCache] | None:
        """The per-layer caches of the lowest free slot (empty), or None when all are taken."""
        for slot, taken in enumerate(self._taken):
            if taken is None:
                caches = [SlotCache(self, i, slot) for i in range(len(self.shapes))]
                self._taken[slot] = caches
                return caches
        return None

    def release(self, caches: list, keep: bool = False) -> list[KVCache] | None:
        """Free the slot of `caches` (taken from this slab); with `keep`, plain caches
        holding a copy of what they held. The released caches must not be used again."""
        slot = caches[0].slot
        if self._taken[slot] is not caches:
            raise ValueError(f"slot {slot} is not held by these caches")
        kept = None
        if keep:
            kept = []
            for layer, c in enumerate(caches):
                plain = KVCache(self.max_size)
                if c.offset:  # a copy: the slot will be reused
                    held = slice(slot, slot + 1), slice(None), slice(0, c.offset)
                    plain.state = [mx.array(self.keys[layer][held]),
                                   mx.array(self.values[layer][held])]  # fmt: skip
                kept.append(plain)
        for c in caches:
            c.keys = c.values = None  # a stray write now fails instead of reaching the slot
        self._taken[slot] = None
        return kept

    def release_all(self) -> None:
        for caches in self._taken:
            if caches is not None:
                self.release(caches)

    def grow(self, layer: int, needed: int) -> None:
        """Give every slot of `layer` room for `needed` tokens (the used part is copied)."""
        capacity = self._capacity(needed)
        if capacity <= self.keys[layer].shape[2]:
            return
        self._allocate(layer, capacity)
        for caches in self._taken:
            if caches is not None:
                c = caches[layer]
                c.keys, c.values = self.views(layer, c.slot)
