"""The model's forward pass on the CPU through numpy/BLAS, on MLX's own buffers.

Decoding reads every weight once per token, so its speed is the speed of the
one-row products `x @ W.T`. MLX's CPU backend computes every float32 matmul with
`cblas_sgemm`; for a single row OpenBLAS packs the weight matrix first and reads
it at a fraction of the memory bandwidth, where `sgemv` on the same matrix reads
it at full speed. MLX's CPU `exp` (softmax, silu) is also slower than numpy's
vectorised one. benchmarks/README.md has the measurements.

`CpuDecoder(model)` is the model with a numpy forward pass: zero-copy views of
the model's MLX weights (`np.asarray` of a CPU array shares its memory), products
split over the cores with BLAS on one thread each (gemv for one token, gemm for a
prompt chunk, blocks for a few rows where the BLAS is faster so), blocked
causal attention. The KV cache stays the model's MLX `KVCache`: new keys/values are
written into its buffer in place while it owns it and has room (`_append`), and RoPE
uses MLX's own cos/sin. `decode_rows` is one token for each of several sequences, each
with its own cache, and optionally prompt chunks of other sequences in the same
products; rows whose caches are slots of one `RowSlab` (`runtime.slab`) are scored
together in a few batched products instead of row by row. Quantized or LoRA layers,
other dtypes and GPU devices take the model's normal MLX path; a rotating cache takes
MLX's attention for one token and the MLX path for a prompt.

`fast_decoder(model)` makes the wrapper where it applies; generation code is
handed the model it should call (`generation.loading.load_for_generation`
decides once, at load time).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..model.cache import KVCache
from ..model.openelm import OpenELM
from .device import on_cpu
from .slab import SlotCache

_PLAIN = (nn.Linear, nn.RMSNorm, nn.Embedding)


@dataclass(frozen=True)
class _LayerViews:
    """numpy views of one block's weights (matrices transposed to (in, out)) and its shape."""

    attn: nn.Module  # the block's MLX Attention, for caches the numpy path does not handle
    attn_norm: np.ndarray  # (d,)
    qkv: np.ndarray  # (d, (q + 2 kv) * head_dim)
    qk_norm: np.ndarray | None  # (q + kv, head_dim): q_norm's weight per query head, then k_norm's
    out: np.ndarray  # (q * head_dim, d)
    ffn_norm: np.ndarray  # (d,)
    proj_1: np.ndarray  # (d, 2 * ffn_dim)
    proj_2: np.ndarray  # (ffn_dim, d)


@dataclass(frozen=True)
class _Views:
    sources: tuple  # the MLX arrays viewed, to notice replaced weights
    embed: np.ndarray  # (vocab, d)
    norm: np.ndarray  # (d,)
    head: np.ndarray  # (d, vocab)
    layers: tuple[_LayerViews, ...]


def _sources(model: OpenELM) -> tuple | None:
    """The float32 weights the step reads (fixed order); None if a layer is not a plain one.

    Checked on every call, so it reads the modules as the dicts they are (an MLX
    module's attribute lookup costs several times a dict lookup).
    """
    t = model["transformer"]
    mods = [t["token_embeddings"], t["norm"], model.output_head()[1]]
    for block in t["layers"]:
        a, f = block["attn"], block["ffn"]
        qk = [a["q_norm"], a["k_norm"]] if "q_norm" in a else [None, None]
        mods += [block["attn_norm"], a["qkv_proj"], *qk, a["out_proj"], block["ffn_norm"]]
        mods += [f["proj_1"], f["proj_2"]]
    if any(m is not None and (type(m) not in _PLAIN or "bias" in m) for m in mods):
        return None  # quantized, LoRA or otherwise replaced layers
    weights = tuple(None if m is None else m["weight"] for m in mods)
    if any(w is not None and w.dtype != mx.float32 for w in weights):
        return None
    return weights


def _make_views(model: OpenELM, sources: tuple) -> _Views:
    arrays = [None if w is None else np.asarray(w) for w in sources]  # zero-copy on the CPU
    layers = []
    for i, block in enumerate(model.transformer.layers):
        an, qkv, qn, kn, out, fn, p1, p2 = arrays[3 + 8 * i : 11 + 8 * i]
        a = block.attn
        qk = None if qn is None else np.stack([qn] * a.n_heads + [kn] * a.n_kv_heads)
        mats = (_operand(m) for m in (qkv, out, p1, p2))
        layers.append(_LayerViews(a, an, next(mats), qk, next(mats), fn, *mats))
    return _Views(sources, arrays[0], arrays[1], _operand(arrays[2]), tuple(layers))


# Weights of at most this many elements are multiplied as (in, out) C-contiguous copies.
_COPIED = 1 << 20


def _operand(weight: np.ndarray) -> np.ndarray:
    """The (in, out) operand of x @ weight.T for a weight (out, in): a zero-copy view of
    MLX's memory, or for a small matrix a C-contiguous copy. OpenBLAS multiplies small
    matrices laid out so faster at every row count (several times faster for a few rows,
    where its small-matrix kernels apply); `benchmarks/bench_kernels.py` prints both."""
    t = weight.T
    return np.ascontiguousarray(t) if t.size <= _COPIED else t


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


# ---- the pieces of one step -----------------------------------------------------


def _matvec(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (L, in) @ w (in, out), split by output columns over the cores.

    Each share is a contiguous row block of the weight; BLAS runs on one thread per
    share (gemv for one row, gemm for a prompt chunk). OpenBLAS's own threads spin
    between calls, which on a busy machine costs several times the work, and would
    compete with the pool for the cores. A small weight stays on the calling thread.
    A few rows (a batch of sequences) may go in blocks (`_row_blocks`).
    """
    if _openblas_threads() is None:  # a BLAS we cannot keep on one thread: let it thread
        return x @ w
    out = np.empty((x.shape[0], w.shape[1]), np.float32)
    size = _row_blocks.size(x, w)

    def cols(lo: int, hi: int) -> None:
        _block_product(x, w, out, lo, hi, size)

    if w.nbytes * max(1, x.shape[0] // 8) < _SMALL_WORK:
        cols(0, w.shape[1])
    else:
        _parallel(cols, w.shape[1])
    return out


# Weight bytes (times an eighth of the rows) below which a product is not worth the
# hand-off to a worker: a few hundred microseconds of work. Eight rows by nano's head
# (160 x 4096, 2.6 MB) took a median 123 us on the calling thread against 164 us shared
# out (the worker's wake-up is most of the difference); sixteen rows are about even.
_SMALL_WORK = 1 << 22


class _RowBlocks:
    """How products of a few rows (2-64) run fastest: whole, or in blocks.

    OpenBLAS (0.3.x, AVX-512 kernels) multiplies a few rows by a large matrix several
    times slower than its bandwidth allows, but has small-matrix kernels for products of
    up to a million multiply-adds; other BLAS builds may not. So a product may go in
    column blocks of a million multiply-adds at most (for 4 rows or more of a zero-copy
    view, of at most 128 columns: wider blocks are slower there; for 2-3 rows, blocks that
    narrow are 1.5-2x slower than wide ones), and, for 4-8 rows of a long inner dimension
    (a feed-forward down projection of 3,000-5,000 inputs), each block in depth chunks of
    about 1,300-1,500 inputs summed up: the few columns a block of such a matrix may have
    make OpenBLAS's kernels slower, most of all with the product shared out over the cores
    (`benchmarks/bench_kernels.py` prints decode steps of OpenELM-270M's shapes with and
    without the chunks and the wide blocks; timing the chunks on a made-up matrix proved
    no guide). The first time it is asked, 8 rows by a fixed matrix are timed in blocks
    and whole (a few milliseconds, once per process, for each layout), and blocks are kept
    when they are clearly faster.
    """

    WORK = 1_000_000  # multiply-adds per block at most
    COLUMNS = 128  # columns per block of a zero-copy view at most...
    FEW = 3  # ...for more rows than this (2-3 rows run fastest in blocks of ~1M multiply-adds)
    DEPTH = 1536  # inputs per depth chunk at most
    CHUNKED = (4, 8, 2560)  # depth chunks for rows in [4, 8] and more inputs than this

    def __init__(self):
        self.faster: bool | None = None  # blocks beat whole products (zero-copy views)
        self.faster_copied: bool | None = None  # the same for small C-contiguous copies

    def size(self, x: np.ndarray, w: np.ndarray) -> tuple[int, int] | None:
        """(columns, inputs) per block for x @ w, or None for one product."""
        m, k = x.shape
        if not 2 <= m <= 64:
            return None
        copied = w.flags.c_contiguous  # a small matrix's copy: blocks of any width
        depth = self._depth(m, k)
        block = self._block(m, depth, None if copied or m <= self.FEW else self.COLUMNS)
        if block is None or block >= w.shape[1] and depth == k:
            return None
        if copied:
            if self.faster_copied is None:
                self.faster_copied = self._blocks_win(copied=True)
            return (block, depth) if self.faster_copied else None
        if self.faster is None:
            self.faster = self._blocks_win()
        return (block, depth) if self.faster else None

    def _depth(self, m: int, k: int) -> int:
        lo, hi, longer = self.CHUNKED
        if not (lo <= m <= hi and k > longer):
            return k
        n = -(-k // self.DEPTH)
        return -(-k // n // 16) * 16  # n chunks (the last one shorter), 16 inputs apart

    def _block(self, m: int, k: int, columns: int | None) -> int | None:
        block = self.WORK // (m * k) // 8 * 8
        block = block if columns is None else min(columns, block)
        return block if block >= 8 else None

    def _blocks_win(self, copied: bool = False) -> bool:
        """Time 8 rows by a matrix in blocks and whole, five times each, taken in turns (a
        slow spell of a shared machine hits both): a (1024, 2048) view of an (out, in)
        matrix, or a small (160, 4096) C-contiguous copy. Blocks win only by a clear
        margin (`clearly_faster`): the two ways round the products' last bits differently,
        so processes that compute the same batches (evaluation's ranks) must not choose
        apart on a moment's noise."""
        k, n = (160, 4096) if copied else (1024, 2048)
        x = np.full((8, k), 0.5, np.float32)
        w = np.full((n, k), 0.25, np.float32).T  # (in, out), laid out like the views
        w = np.ascontiguousarray(w) if copied else w
        block = self._block(8, k, None if copied else self.COLUMNS)
        out = np.empty((8, n), np.float32)
        blocks = whole = float("inf")
        for _ in range(5):
            blocks = min(blocks, self._time(x, w, out, (block, k)))
            whole = min(whole, self._time(x, w, out, None))
        return self.clearly_faster(blocks, whole)

    @staticmethod
    def clearly_faster(blocks: float, whole: float) -> bool:
        """Whether blocks beat whole products by more than a tenth (measured here by
        2-3x where OpenBLAS's small-matrix kernels apply; about even where they do not)."""
        return blocks < 0.9 * whole

    @staticmethod
    def _time(x: np.ndarray, w: np.ndarray, out: np.ndarray, size) -> float:
        start = time.perf_counter()
        _block_product(x, w, out, 0, w.shape[1], size)
        return time.perf_counter() - start


def _block_product(x, w, out, lo: int, hi: int, size: tuple[int, int] | None) -> None:
    """out[:, lo:hi] = x @ w[:, lo:hi], whole (`size` None) or in blocks of (columns,
    inputs): each block's depth chunks are summed in order."""
    if size is None:
        np.matmul(x, w[:, lo:hi], out=out[:, lo:hi])
        return
    cols, depth = size
    k = x.shape[1]
    part = np.empty((x.shape[0], cols), np.float32) if depth < k else None
    for a in range(lo, hi, cols):
        b = min(hi, a + cols)
        o = out[:, a:b]
        np.matmul(x[:, :depth], w[:depth, a:b], out=o)
        for d in range(depth, k, depth):
            t = part[:, : b - a]
            np.matmul(x[:, d : d + depth], w[d : d + depth, a:b], out=t)
            o += t


_row_blocks = _RowBlocks()


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    ms = np.add.reduce(x * x, axis=-1, keepdims=True)  # np.mean has more overhead per call
    ms *= 1.0 / x.shape[-1]
    ms += eps
    return x * (1.0 / np.sqrt(ms)) * weight


def _glu(h: np.ndarray) -> np.ndarray:
    """silu(gate) * up of (L, 2 * ffn_dim); large ones are shared out over the cores."""
    gate, up = _halves(h)  # (L, ffn_dim) each
    out = np.empty_like(gate)

    def rows(lo: int, hi: int) -> None:
        t = np.negative(gate[lo:hi], out=out[lo:hi])
        with np.errstate(over="ignore"):  # exp(-gate) = inf gives silu = -0, as it should
            np.exp(t, out=t)
        t += 1.0
        np.divide(gate[lo:hi], t, out=t)
        t *= up[lo:hi]

    if gate.size < _SHARED_GLU:
        rows(0, len(h))
    else:
        _parallel(rows, len(h))
    return out


# Feed-forward activations from which the GLU is shared out over the cores: below, the
# hand-off costs more than the second core saves (`bench_kernels.py --only prompt_chunks`
# prints a nano prompt chunk's, 127 x 640, and a 270M-sized one's, 127 x 2560).
_SHARED_GLU = 1 << 17


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of (L, heads, head_dim) with `_RopeTable`'s full-width cos [c, c]
    and signed sin [-s, s] (L, 1, head_dim): x * cos + [x2, x1] * sin, four contiguous
    passes where the half-width form takes six strided ones (same values: each half is
    one product plus another, as in x1 * c - x2 * s; `bench_kernels.py --only rope`)."""
    x1, x2 = _halves(x)
    out = x * cos
    swapped = np.concatenate((x2, x1), axis=-1)
    swapped *= sin
    out += swapped
    return out


def _halves(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two halves of the last axis, as views (np.split has more overhead per call)."""
    h = x.shape[-1] // 2
    return x[..., :h], x[..., h:]


def _row_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """One query position of one sequence: q (g, rep, hd), already scaled, against its
    cached keys/values (g, T, hd), the newest position included. Returns (g, rep, hd)."""
    s = q @ keys.transpose(0, 2, 1)  # (g, rep, T)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    out = s @ values  # (g, rep, hd)
    out /= s.sum(axis=-1, keepdims=True)
    return out


def _causal_sdpa(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Causal attention of L new positions, the last L of keys/values (n_kv, T, hd).

    q: (L, n_q, hd), already scaled; query head h reads KV head h // (n_q / n_kv). The query heads
    are shared out over the CPU's cores. Returns (L, n_q * hd).
    """
    L, n_q, hd = q.shape
    n_kv = keys.shape[0]
    rep = n_q // n_kv
    qh = q.transpose(1, 0, 2)  # (n_q, L, hd)
    out = np.empty((n_q, L, hd), np.float32)

    def heads(h0: int, h1: int) -> None:
        for g in range(h0 // rep, (h1 - 1) // rep + 1):
            a, b = max(h0, g * rep), min(h1, (g + 1) * rep)
            _group_attention(qh[a:b], keys[g], values[g], out[a:b])

    if n_q * L * keys.shape[1] * hd < _SMALL_ATTENTION:
        heads(0, n_q)
    else:
        _parallel(heads, n_q)
    return out.transpose(1, 0, 2).reshape(L, n_q * hd)


# Score multiply-adds below which prompt attention stays on the calling thread.
_SMALL_ATTENTION = 1 << 22


def _group_attention(q, keys, values, out, block: int = 128) -> None:
    """Query heads q (r, L, hd) of one KV head (T, hd) into out (r, L, hd).

    Queries go in blocks that score only the keys they may see; only the block's
    own diagonal square needs the causal mask.
    """
    r, L, hd = q.shape
    past = keys.shape[0] - L
    upper = _causal_mask(block)  # (block, block)
    for lo in range(0, L, block):
        hi = min(L, lo + block)
        n, end = hi - lo, past + hi  # rows, keys visible to the last row
        s = (q[:, lo:hi].reshape(r * n, hd) @ keys[:end].T).reshape(r, n, end)
        s[:, :, end - n :] += upper[:n, :n]
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        z = s.sum(axis=-1, keepdims=True)  # (r, n, 1)
        o = s.reshape(r * n, end) @ values[:end]
        out[:, lo:hi] = o.reshape(r, n, hd) / z


@functools.cache
def _causal_mask(n: int) -> np.ndarray:
    """(n, n): -inf above the diagonal, 0 elsewhere (read-only: it is shared)."""
    mask = np.triu(np.full((n, n), -np.inf, np.float32), k=1)
    mask.flags.writeable = False
    return mask


@functools.cache
def _cores() -> int:
    """The cores this process may use (at most 8), asked once: it sizes the worker pool."""
    try:
        return min(8, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return min(8, os.cpu_count() or 1)


_PENDING = object()


class _Workers:
    """Daemon threads that each run one share of a job; the caller runs the first share.

    Plain queues (C-implemented) keep a hand-off cheaper than concurrent.futures';
    a decoded token has about 65 of them. Each share writes its outcome into its job's
    own slot list, and the queue `done` only wakes the caller: a Ctrl-C or SIGTERM that
    lands between taking a wake-up and reading it loses nothing, and a share of an
    interrupted job can never be taken for one of the next job's.
    """

    def __init__(self, n: int):
        self.jobs = [queue.SimpleQueue() for _ in range(n)]
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        for jobs in self.jobs:
            threading.Thread(target=self._serve, args=(jobs,), daemon=True).start()

    def _serve(self, jobs: queue.SimpleQueue) -> None:
        while True:
            fn, lo, hi, slots, i = jobs.get()
            try:
                fn(lo, hi)
                slots[i] = None
            except BaseException as e:  # handed to the caller
                slots[i] = e
            self.done.put(i)

    def run(self, fn, bounds: list[tuple[int, int]]) -> None:
        slots = [_PENDING] * (len(bounds) - 1)
        sent = 0
        try:
            for i, (jobs, (lo, hi)) in enumerate(zip(self.jobs, bounds[1:], strict=False)):
                jobs.put((fn, lo, hi, slots, i))
                sent = i + 1
            fn(*bounds[0])
        finally:
            self._wait(slots, sent)
        for e in slots:
            if e is not None:
                raise e

    def _wait(self, slots: list, n: int) -> None:
        """Wait for the first `n` shares even through Ctrl-C or SIGTERM, then re-raise the
        interrupt as it came: a share still running would race the next job."""
        interrupt = None
        while True:
            try:
                if not any(s is _PENDING for s in slots[:n]):
                    break
                self.done.get()
            except KeyboardInterrupt as e:  # Ctrl-C, or the CLI's SIGTERM (a subclass)
                interrupt = e
        if interrupt is not None:
            raise interrupt


@functools.cache
def _workers() -> _Workers:
    return _Workers(_cores() - 1)


def _parallel(fn, n: int) -> None:
    """fn(lo, hi) over [0, n) shared out over the cores (numpy releases the GIL); within a
    share of `_each_core` it runs on the calling thread."""
    k = min(_cores(), n)
    if k <= 1 or getattr(_share, "inside", False):
        return fn(0, n)
    _workers().run(fn, [(n * i // k, n * (i + 1) // k) for i in range(k)])


_share = threading.local()  # .inside: this thread runs a share of `_each_core`


def _each_core(fn, n: int) -> None:
    """`_parallel` of work coarse enough to run on one core a share: what fn calls runs on
    its own thread (no nested hand-offs, which would wait on the share's own worker)."""

    def share(lo: int, hi: int) -> None:
        _share.inside = True
        try:
            fn(lo, hi)
        finally:
            _share.inside = False

    _parallel(share, n)


@functools.cache
def _openblas_threads():
    """(get, set) of the thread count of numpy's bundled OpenBLAS, or None (another BLAS)."""
    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*")
    for path in glob.glob(libs):
        try:
            lib = ctypes.CDLL(path)  # already loaded by numpy: the same handle
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    return get, set_
    return None


@contextmanager
def _one_blas_thread():
    """Keep numpy's OpenBLAS on one thread; the pool (`_parallel`) shares work out instead."""
    fns = _openblas_threads()
    n = fns[0]() if fns else 1
    if n > 1:
        fns[1](1)
    try:
        yield
    finally:
        if n > 1:
            fns[1](n)


def _numpy_cache(cache) -> bool:
    """Whether the numpy attention handles this cache (a plain float32 KVCache, or a slot
    of a `RowSlab`)."""
    return cache is None or (
        type(cache) in (KVCache, SlotCache)
        and (cache.keys is None or cache.keys.dtype == mx.float32)
    )


_SPLIT_KV = 1 << 19  # cached key elements from which decode attention is shared out


def _append(cache, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Append k, v (n_kv, L, hd) to a plain float32 `cache` (or none); return every cached
    key and value (n_kv, T, hd), the new ones last, as views of the cache's buffers.

    While the buffer has room and the cache owns it (`KVCache.owned`: made by its own
    growth, not set from another cache's arrays), the new positions are written into
    MLX's memory in place (a CPU array's numpy view is its memory). Otherwise MLX's
    `update_and_fetch` appends, copying a shared buffer and growing a full one.
    """
    if cache is None:
        return k, v
    end = cache.offset + k.shape[1]
    if _has_room(cache, k.shape[1]):
        keys, values = np.asarray(cache.keys), np.asarray(cache.values)  # evaluates if pending
        if all(a.flags.c_contiguous and a.flags.writeable for a in (keys, values)):
            keys[0, :, cache.offset : end] = k
            values[0, :, cache.offset : end] = v
            cache.offset = end
            return keys[0, :, :end], values[0, :, :end]
    keys, values = cache.update_and_fetch(mx.array(k)[None], mx.array(v)[None])
    return np.asarray(keys)[0], np.asarray(values)[0]  # (n_kv, T, hd)


def _has_room(cache, n: int) -> bool:
    """Whether `cache` owns a buffer with room for n more positions: `_append` then writes
    them in place."""
    return cache.owned and cache.offset + n <= cache.keys.shape[2]


def _make_room(views: _Views, needs: list[tuple[list, int]]) -> None:
    """For each (per-layer cache list, n): give every plain cache a buffer of its own with
    room for n more positions, all made in one MLX evaluation, so that `_append` writes in
    place. A cache that would pass its `max_size` is left to `update_and_fetch` to refuse.
    """
    grown = []
    for row, n in needs:
        for w, c in zip(views.layers, row, strict=True):
            if c is None or not _numpy_cache(c):
                continue
            end = c.offset + n
            if _has_room(c, n) or c.max_size is not None and end > c.max_size:
                continue
            a = w.attn
            empty = mx.zeros((1, a.n_kv_heads, 0, a.head_dim), mx.float32)
            c._grow(empty, empty, end)
            grown += [c.keys, c.values]
    if grown:
        mx.eval(grown)


def _slab_rows_ready(rows: list[list], layers: int) -> bool:
    """Whether decode rows (per-layer cache lists) are all slots of one slab with room for
    one more position in every layer: numpy writes them, no cache to check or grow one by
    one (per row and layer, that was a tenth of a millisecond a step at eight rows)."""
    if not rows or type(rows[0][0]) is not SlotCache:
        return False
    slab = rows[0][0].slab
    if not all(type(r[0]) is SlotCache and r[0].slab is slab for r in rows):
        return False
    end = max(r[0].offset for r in rows) + 1
    return all(end <= slab.capacity(i) for i in range(layers))


def _split_qkv(w: _LayerViews, qkv: np.ndarray, eps: float, cos, sin):
    """(N, qkv_out_dim) -> q (N, n_q, hd) scaled, k and v (N, n_kv, hd): QK-norm, RoPE."""
    a = w.attn
    n_q, n_kv = a.n_heads, a.n_kv_heads
    qkv = qkv.reshape(qkv.shape[0], n_q + 2 * n_kv, a.head_dim)
    qk, v = qkv[:, : n_q + n_kv], qkv[:, n_q + n_kv :]
    if w.qk_norm is not None:
        qk = _rms_norm(qk, w.qk_norm, eps)  # q_norm and k_norm in one pass
    qk = _rope(qk, cos, sin)
    return qk[:, :n_q] * a.scale, qk[:, n_q:], v


def _prompt_attention(
    w: _LayerViews, qkv: np.ndarray, cache, eps: float, rope, link, layer: int
) -> np.ndarray:
    """L new positions of one sequence: (L, qkv_out_dim) -> (L, q * head_dim); appends them
    to `cache` (a piece of a chunk: after the piece before it, `link`)."""
    q, k, v = _split_qkv(w, qkv, eps, *rope.span(_first_position(cache, link), len(qkv)))
    keys, values = _linked_append(cache, k, v, link, layer)
    return _causal_sdpa(q, keys, values)


def _first_position(cache, link) -> int:
    """The position of a chunk's (or a piece's: `link`) first new token."""
    if link is not None:
        return link.start  # the cache may not have the positions before it yet
    return 0 if cache is None else cache.offset


def _linked_append(cache, k: np.ndarray, v: np.ndarray, link, layer: int):
    """`_append` of k, v (L, n_kv, hd); a piece of a chunk (`link`) waits for the piece
    before it to append this layer's positions first, and tells the one after it."""
    if link is None:
        return _append(cache, k.transpose(1, 0, 2), v.transpose(1, 0, 2))
    link.wait(layer)
    if cache.offset != link.start:  # the piece before failed: it appended nothing
        raise RuntimeError("a prompt piece's cache lacks the positions before it")
    keys, values = _append(cache, k.transpose(1, 0, 2), v.transpose(1, 0, 2))
    link.appended[layer].set()
    return keys, values


def _prompts_attention(
    w: _LayerViews, qkv: np.ndarray, chunks: list, eps: float, rope, layer: int
) -> list:
    """`_prompt_attention` of each prompt chunk (its length, its cache, its `_Link` or None),
    whose positions come first in qkv in turn. Chunks whose attention is small (run on one
    core) and touches only numpy (the cache has room, the positions are in the RoPE table)
    are shared out over the cores, a chunk each: the prompts arriving together at a busy
    server. (Pieces of chunks are already a core's share.)"""
    spans, lo = [], 0
    for n, cache, link in chunks:
        spans.append((lo, n, cache, link))
        lo += n
    out = [None] * len(spans)

    def run(a: int, b: int) -> None:
        for j in range(a, b):
            lo, n, cache, link = spans[j]
            out[j] = _prompt_attention(w, qkv[lo : lo + n], cache, eps, rope, link, layer)

    if len(spans) > 1 and all(
        link is None and _numpy_only(w, n, c, rope) for _, n, c, link in spans
    ):
        _parallel(run, len(spans))
    else:
        run(0, len(spans))
    return out


def _prompts_kv(
    w: _LayerViews, qkv: np.ndarray, chunks: list, eps: float, rope, layer: int
) -> None:
    """The keys and values of each prompt chunk (its length, its cache, its `_Link` or
    None; positions first in qkv in turn), appended to its cache: all a block computes for
    positions whose output nothing reads. The same values as `_split_qkv` gives (the norm
    and RoPE act on each head on its own)."""
    a = w.attn
    n_q, n_kv = a.n_heads, a.n_kv_heads
    lo = 0
    for n, cache, link in chunks:
        part = qkv[lo : lo + n].reshape(n, n_q + 2 * n_kv, a.head_dim)
        k, v = part[:, n_q : n_q + n_kv], part[:, n_q + n_kv :]
        if w.qk_norm is not None:
            k = _rms_norm(k, w.qk_norm[n_q:], eps)
        k = _rope(k, *rope.span(_first_position(cache, link), n))
        _linked_append(cache, k, v, link, layer)
        lo += n


def _numpy_only(w: _LayerViews, n: int, cache, rope) -> bool:
    """Whether n new positions' attention into `cache` runs on one core, in numpy alone."""
    if cache is None or not _numpy_cache(cache) or not _has_room(cache, n):
        return False
    end = cache.offset + n
    a = w.attn
    return rope.covers(end) and a.n_heads * n * end * a.head_dim < _SMALL_ATTENTION


def _decode_attention(
    w: _LayerViews, qkv: np.ndarray, caches: list, eps: float, cos_sin, layer: int, batch=None
):
    """One new position for each of B sequences: (B, qkv_out_dim) -> (B, q * head_dim);
    row b's key and value are appended to `caches[b]`.

    The norms and RoPE run once for all rows. Rows in `batch` (slots of one slab, the
    same at every layer) are scored together (`_slab_attention`); any other row against
    its own cache, shared out over the cores when the caches are long. A row whose cache
    numpy does not handle (a rotating window) takes MLX's attention. `cos_sin`: the rows'
    RoPE tables (`_RopeTable.rows` of their offsets, the same at every layer).
    """
    a = w.attn
    B, n_kv, hd = len(caches), a.n_kv_heads, a.head_dim
    q, k, v = _split_qkv(w, qkv, eps, *cos_sin)
    q = q.reshape(B, n_kv, -1, hd)  # (B, n_kv, rep, hd): query head h reads KV head h // rep
    out = np.empty_like(q)
    slotted = set()
    if batch is not None and batch.matches(caches, layer):
        _slab_attention(q, k, v, batch, layer, caches, out)
        if len(batch.rows) == B:  # every row in the slab (a server's batch): done
            return out.reshape(B, -1)
        slotted = set(batch.rows)
    cached = []
    for b, c in enumerate(caches):
        if b in slotted:
            cached.append(None)
        elif _numpy_cache(c):
            cached.append(_append(c, k[b][:, None], v[b][:, None]))
        else:
            o = a.attend(mx.array(qkv[b : b + 1])[None], None, c)  # (1, 1, q * head_dim)
            mx.eval(o)
            out[b] = np.asarray(o).reshape(n_kv, -1, hd)
            cached.append(None)
    items = [(b, 0, n_kv) for b in range(B) if cached[b] is not None]
    size = sum(cached[b][0].size for b, _, _ in items)
    if size >= _SPLIT_KV and len(items) < _cores():  # few long rows: share out their heads
        parts = min(_cores(), n_kv)
        items = [(b, n_kv * i // parts, n_kv * (i + 1) // parts) for b, _, _ in items
                 for i in range(parts)]  # fmt: skip

    def run(lo: int, hi: int) -> None:
        for b, g0, g1 in items[lo:hi]:
            keys, values = cached[b]
            out[b, g0:g1] = _row_attention(q[b, g0:g1], keys[g0:g1], values[g0:g1])

    if size >= _SPLIT_KV:
        _parallel(run, len(items))
    else:
        run(0, len(items))
    return out.reshape(B, -1)  # heads in order


class _SlabRows:
    """The rows of a decode step whose caches are slots of one `RowSlab` (the first such
    row's): what every layer's batched attention over the slab shares. Made from one
    layer's caches; `matches` checks another layer's."""

    def __init__(self, caches: list):
        slab = next((c.slab for c in caches if type(c) is SlotCache), None)
        self.slab = slab
        self.rows = [b for b, c in enumerate(caches) if type(c) is SlotCache and c.slab is slab]
        self.slots = [caches[b].slot for b in self.rows]
        self.offsets = [caches[b].offset for b in self.rows]
        if len(self.rows) < 2:  # one row is as fast on its own
            return
        self.slot_index, self.positions = np.array(self.slots), np.array(self.offsets)
        self.S, self.T = max(self.slots) + 1, max(self.offsets) + 1
        # rows b = 0..B-1 in slots 0..B-1 (the engine orders its rows so): no reordering
        self.in_order = self.slots == self.rows == list(range(len(caches)))
        lengths = np.full(self.S, self.T)  # slots not in the step: unmasked, never read
        lengths[self.slot_index] = self.positions + 1
        self.mask = None  # all as long as the longest: nothing to mask
        if lengths.min() < self.T:  # -inf past each length
            self.mask = np.zeros((self.S, 1, 1, self.T), np.float32)
            self.mask[np.arange(self.T) >= lengths[:, None, None, None]] = -np.inf

    def matches(self, caches: list, layer: int) -> bool:
        """Whether `caches` (one layer's) hold these rows in the same slots at the same
        lengths, with room for one more token."""
        if len(self.rows) < 2 or self.T > self.slab.capacity(layer):
            return False
        rows = [caches[b] for b in self.rows]
        return all(
            type(c) is SlotCache and c.slab is self.slab and c.layer == layer
            and c.slot == slot and c.offset == offset
            for c, slot, offset in zip(rows, self.slots, self.offsets, strict=True)
        )  # fmt: skip


def _slab_attention(q, k, v, batch: _SlabRows, layer: int, caches: list, out) -> None:
    """One new position for each of `batch.rows`: q (B, n_kv, rep, hd) scaled, k and v
    (B, n_kv, hd). Writes k, v into the rows' slots, then scores every slot up to the
    highest in use against the whole slab in batched products, each masked to its own
    length; row b's output goes to out[b]."""
    rows, slots = batch.rows, batch.slot_index
    slab_keys, slab_values = batch.slab.keys[layer], batch.slab.values[layer]
    if not batch.in_order:
        k, v = k[rows], v[rows]
    slab_keys[slots, :, batch.positions] = k  # (B, n_kv, hd)
    slab_values[slots, :, batch.positions] = v
    for b in rows:
        caches[b].offset += 1
    S, T = batch.S, batch.T
    if batch.in_order:
        qs = q
    else:
        qs = np.zeros((S, *q.shape[1:]), np.float32)  # slots not in the step score zeros
        qs[slots] = q[rows]
    o = np.empty_like(qs)

    def score(lo: int, hi: int) -> None:
        s = qs[lo:hi] @ slab_keys[lo:hi, :, :T].transpose(0, 1, 3, 2)  # (n, n_kv, rep, T)
        if batch.mask is not None:
            s += batch.mask[lo:hi]
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        np.matmul(s, slab_values[lo:hi, :, :T], out=o[lo:hi])  # (n, n_kv, rep, hd)
        o[lo:hi] /= s.sum(axis=-1, keepdims=True)

    if S * slab_keys.shape[1] * T * slab_keys.shape[3] >= _SPLIT_KV:  # long: share out slots
        _parallel(score, S)
    else:
        score(0, S)
    if batch.in_order:
        out[:] = o
    else:
        out[rows] = o[slots]


class _RopeTable:
    """MLX's RoPE cos/sin for every position of the context, as `_rope` takes them: cos
    [c, c] and sin [-s, s], (positions, 1, head_dim) each.

    RoPE of [1, ..., 1, 0, ..., 0] is exactly [c, s], so the numpy rotation uses the
    very values MLX's kernel uses (one evaluation gives every position the same values
    as one per offset). Positions past the context (a rotating window's offsets grow
    without end) take one MLX evaluation each time they are asked for.
    """

    def __init__(self, head_dim: int, base: float, positions: int):
        self.head_dim, self.base = head_dim, base
        self.cos, self.sin = self._evaluate(0, positions)

    def _evaluate(self, offset: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        half = self.head_dim // 2
        unit = mx.broadcast_to(mx.array([1.0] * half + [0.0] * half), (1, 1, n, self.head_dim))
        r = mx.fast.rope(unit, self.head_dim, traditional=False, base=self.base, scale=1.0,
                         offset=offset)  # fmt: skip
        r = np.array(r).reshape(n, 1, self.head_dim)
        c, s = r[..., :half], r[..., half:]
        return np.concatenate((c, c), axis=-1), np.concatenate((-s, s), axis=-1)

    def covers(self, end: int) -> bool:
        """Whether positions 0 .. end - 1 are in the table (no MLX evaluation needed)."""
        return end <= len(self.cos)

    def span(self, offset: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin of positions offset .. offset + n - 1, (n, 1, head_dim) each."""
        if self.covers(offset + n):
            return self.cos[offset : offset + n], self.sin[offset : offset + n]
        return self._evaluate(offset, n)

    def rows(self, offsets: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin of one position for each row, (B, 1, head_dim) each."""
        if self.covers(max(offsets) + 1):
            return self.cos[offsets], self.sin[offsets]
        spans = [self.span(o, 1) for o in offsets]
        return np.concatenate([c for c, _ in spans]), np.concatenate([s for _, s in spans])


class CpuDecoder:
    """`model` computing on the CPU through numpy/BLAS; otherwise exactly `model`.

    Drop-in for the model in generation code: calling it is `model(ids, cache=cache)`,
    and every other attribute (`args`, `make_cache`, `layers`...) is the model's.
    A single sequence (batch 1) of float32 plain layers takes the numpy path (checked
    on every call: weights may be replaced), and `decode_rows` many of them; a prompt
    chunk returns its logits as a lazy MLX product (never computed when only the cache
    is wanted), one token returns them computed.
    """

    def __init__(self, model: OpenELM):
        self.model = model
        self._views: _Views | None = None
        self._rope_table: _RopeTable | None = None  # made on first use

    def __getattr__(self, name: str):
        if name == "model":  # not set yet (e.g. during copying)
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, ids: mx.array, cache: list | None = None) -> mx.array:
        views = self._ready(ids, cache)
        if views is None:
            return self.model(ids, cache=cache)
        return self.forward(views, np.asarray(ids)[0], cache)  # (1, L, vocab)

    def _ready(self, ids: mx.array, cache: list | None) -> _Views | None:
        """Up-to-date weight views when this call can take the numpy path."""
        if not (ids.ndim == 2 and ids.shape[0] == 1 and on_cpu()):
            return None
        if ids.shape[1] > 1 and not all(_numpy_cache(c) for c in cache or []):
            return None  # several tokens into e.g. a rotating window: MLX handles the mask
        return self._current_views()

    def _current_views(self) -> _Views | None:
        """numpy views of the model's weights as they are now (weights may be replaced),
        or None when its layers are not float32 plain layers."""
        sources = _sources(self.model)
        if sources is None:
            return None
        views = self._views
        if views is None or not _same(views.sources, sources):
            views = self._views = _make_views(self.model, sources)
        return views

    def forward(self, views: _Views, tokens: np.ndarray, cache: list | None) -> mx.array:
        """Logits (1, L, vocab) for token ids (L,), appending to `cache` (one per layer)."""
        args = self.model.args
        cache = cache or [None] * len(views.layers)
        _make_room(views, [(cache, len(tokens))])
        one = len(tokens) == 1  # one token takes the one-row decode attention
        with _one_blas_thread():  # the pool shares the work out instead
            h = _blocks(
                views, views.embed[tokens], args.rms_norm_eps, self._rope(),
                prompts=[] if one else [(len(tokens), cache, None)], rows=[cache] if one else [],
            )  # fmt: skip
            if one:
                return mx.array(_matvec(h, views.head))[None]  # (1, 1, vocab)
        return self.model.head(mx.array(h)[None])  # lazy (1, L, vocab)

    def _rope(self) -> _RopeTable:
        if self._rope_table is None:
            args = self.model.args
            self._rope_table = _RopeTable(
                args.head_dim, args.rope_freq_constant, args.max_context_length
            )
        return self._rope_table

    def feed(self, ids: list[int], cache: list) -> bool:
        """Append prompt tokens to `cache` (one per layer) without computing their logits;
        False (nothing done) where the numpy path cannot take them."""
        return self.decode_rows([], [], [(ids, cache)]) is not None

    def chunks_now(self, prompts: list[tuple[list[int], list]]) -> int:
        """How many of `prompts` (token ids, per-layer caches), in order, `decode_rows`
        should take in one step: all of them, or, where their lengths would not deal out
        over the cores (`_deal`) but fewer would, the most that do; the others wait a step.
        (Room in their caches is made by the step itself.)"""
        lengths = [len(t) for t, _ in prompts]
        for n in range(len(prompts), 1, -1):
            if _deal(lengths[:n]) is not None:
                return n
        return len(prompts)

    def decode_rows(
        self, tokens: list[int], caches: list[list], prompts: list[tuple[list[int], list]] = ()
    ) -> mx.array | None:
        """Logits (B, vocab) of one new token for each of B sequences (B may be 0), each with
        its own per-layer cache list (which gains one position); None when the numpy path
        cannot take these rows (the caller then runs the model's MLX modules).

        `prompts` are (token ids, per-layer caches) of prompt chunks of other sequences,
        appended to their caches in the same pass: the products read each weight once for
        the chunks and the rows. The chunks' logits are not computed.
        """
        views = self._current_views() if on_cpu() else None
        if views is None:
            return None
        ready = _slab_rows_ready(caches, len(views.layers))
        every = ([] if ready else caches) + [c for _, c in prompts]
        if not all(_numpy_cache(c) for row in every for c in row):
            return None
        args = self.model.args
        rows = [] if ready else [(row, 1) for row in caches]
        _make_room(views, rows + [(c, len(t)) for t, c in prompts])
        eps, rope = args.rms_norm_eps, self._rope()
        shares = _prompt_shares(prompts, rope)
        with _one_blas_thread():
            if shares is not None:  # the chunks a core each, then the rows

                def run(lo: int, hi: int) -> None:
                    for part in shares[lo:hi]:
                        _feed_part(views, part, eps, rope)

                _each_core(run, len(shares))
            elif prompts and not caches:
                _feed(views, prompts, eps, rope)
            if not caches:
                return mx.zeros((0, views.head.shape[1]), mx.float32)
            if shares is not None:
                prompts = []
            ids = np.asarray([t for chunk, _ in prompts for t in chunk] + list(tokens), np.int32)
            h = _blocks(views, views.embed[ids], eps, rope,
                        prompts=[(len(t), c, None) for t, c in prompts], rows=caches)  # fmt: skip
            return mx.array(_matvec(h, views.head))  # (B, vocab)


def _feed(views: _Views, prompts: list, eps: float, rope: _RopeTable) -> None:
    """Prompt chunks (token ids, per-layer caches[, `_Link`]) into their caches; no logits."""
    ids = np.asarray([t for chunk, *_ in prompts for t in chunk], np.int32)
    chunks = [(len(p[0]), p[1], p[2] if len(p) > 2 else None) for p in prompts]
    _blocks(views, views.embed[ids], eps, rope, prompts=chunks, last=False)


def _feed_part(views: _Views, part: list, eps: float, rope: _RopeTable) -> None:
    """`_feed` of one core's part of `_prompt_shares`; however it ends, no piece on another
    core waits for its pieces any longer."""
    try:
        _feed(views, part, eps, rope)
    finally:
        for *_, link in part:
            if link is not None:
                link.finish()


def _blocks(
    views: _Views, h: np.ndarray, eps: float, rope: _RopeTable, *,
    prompts: list[tuple[int, list, _Link | None]] = (), rows: list[list] = (),
    last: bool = True,
) -> np.ndarray | None:  # fmt: skip
    """Every block and the final norm over (N, d) positions: first the new tokens of each
    prompt chunk in turn (`prompts`: its length, its sequence's per-layer caches, and for a
    piece of a chunk its `_Link`), then
    one new token for each of the sequences `rows` (row b's per-layer caches `rows[b]`).
    The products read each weight once for all positions. Returns the final norm of the
    rows' positions, or of every position when there are no rows: (len(rows) or N, d);
    with `last=False` (only the caches are wanted), None.

    Where the chunks' outputs are not returned (there are rows, or `last=False`), the
    last block computes only their keys and values: its attention, output projection
    and feed-forward serve nothing but logits (a fifth of nano's products)."""
    L = sum(n for n, *_ in prompts)
    if L + len(rows) != h.shape[0] or any(n < 1 for n, *_ in prompts):
        raise ValueError(f"{h.shape[0]} positions for {len(rows)} rows and chunks "
                         f"{[n for n, *_ in prompts]}")  # fmt: skip
    batch = _SlabRows([r[0] for r in rows]) if rows else None
    # the rows' RoPE tables, once: every layer's cache of a row holds as many positions
    cos_sin = rope.rows([0 if r[0] is None else r[0].offset for r in rows]) if rows else None
    final = len(views.layers) - 1 if L and (rows or not last) else -1
    for i, w in enumerate(views.layers):
        qkv = _matvec(_rms_norm(h, w.attn_norm, eps), w.qkv)  # (N, (q + 2 kv) * head_dim)
        chunks = [(n, c[i], link) for n, c, link in prompts]
        if i == final:  # the chunks' outputs are not wanted: only their keys and values
            _prompts_kv(w, qkv[:L], chunks, eps, rope, i)
            if not rows:
                return None
            h, qkv, L, parts = h[L:], qkv[L:], 0, []
        else:
            parts = _prompts_attention(w, qkv, chunks, eps, rope, i)
        if rows:
            caches = [r[i] for r in rows]
            parts.append(_decode_attention(w, qkv[L:], caches, eps, cos_sin, i, batch))
        attn = parts[0] if len(parts) == 1 else np.concatenate(parts)
        h = h + _matvec(attn, w.out)
        g = _matvec(_rms_norm(h, w.ffn_norm, eps), w.proj_1)  # (N, 2 * ffn_dim)
        h = h + _matvec(_glu(g), w.proj_2)
    if not last:
        return None
    return _rms_norm(h[L:] if rows else h, views.norm, eps)


def _prompt_shares(prompts: list, rope: _RopeTable) -> list[list] | None:
    """Prompt chunks (token ids, per-layer caches) dealt out into one part per core (`_deal`),
    each part a list of (token ids, caches, `_Link` or None), when every chunk can go
    through every layer on any core: its caches have room (numpy alone writes them, on
    any thread) and its positions are in the RoPE table. A core a part beats sharing out
    each product and each chunk's attention, layer by layer; else None."""
    parts = _deal([len(t) for t, _ in prompts])
    if parts is None:
        return None
    for t, c in prompts:
        if not rope.covers(c[0].offset + len(t)):
            return None
        if not all(_numpy_cache(x) and _has_room(x, len(t)) for x in c):
            return None
    links: dict[int, _Link] = {}  # a cut chunk's piece that the next one waits for
    out = []
    for part in parts:
        pieces = []
        for i, lo, hi in part:
            t, c = prompts[i]
            link = None
            if (lo, hi) != (0, len(t)):  # a piece: after the one before it, layer by layer
                link = _Link(c[0].offset + lo, links.get(i), len(c))
                links[i] = link
            pieces.append((t[lo:hi], c, link))
        out.append(pieces)
    return out


class _Link:
    """A piece of a prompt chunk cut into pieces that go on different cores (`_deal`).

    At every layer a piece appends its keys and values to the chunk's caches only once the
    piece before it (`before`) has appended its own, which come first and which its
    attention reads: `wait(layer)`, then `appended[layer]` tells the piece after. `start`
    is the piece's first position. A part's pieces come in an order that never waits for
    itself (`_deal`); a part that ends, however it ends, `finish`es its pieces, so nothing
    waits for ever on a piece that failed."""

    def __init__(self, start: int, before: _Link | None, layers: int):
        self.start, self.before = start, before
        self.appended = [threading.Event() for _ in range(layers)]

    def wait(self, layer: int) -> None:
        if self.before is not None:
            self.before.appended[layer].wait()

    def finish(self) -> None:
        for event in self.appended:
            event.set()


def _deal(lengths: list[int]) -> list[list[tuple[int, int, int]]] | None:
    """Prompt chunks of these lengths dealt out into one part per core, each part a list of
    (chunk, lo, hi) pieces; None where there are too few tokens or cores, or the parts
    would not come out within a third of each other.

    Whole chunks where there are several, enough tokens, and they come out even (longest
    first to the least loaded part: no core waits for another). Otherwise (three chunks
    on two cores, one long chunk) the chunks in order are cut into parts of about equal
    length, where each part has enough tokens to be worth a core (`_CUT_PART`) and each
    piece of a cut chunk at least `_PIECE`: the pieces of a chunk then go through the
    layers on different cores, each waiting at every layer for the keys of the piece
    before it (`_Link`). Within a part, the piece whose chunk goes on in the next part
    comes first and the piece that goes on from the part before comes last: no part
    waits for a piece its neighbour has not started on."""
    total, cores = sum(lengths), _cores()
    if cores < 2 or not lengths:
        return None
    if len(lengths) >= 2 and total >= _SHARED_PROMPTS:
        parts: list[list[int]] = [[] for _ in range(min(cores, len(lengths)))]
        sizes = [0] * len(parts)
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            p = sizes.index(min(sizes))
            parts[p].append(i)
            sizes[p] += lengths[i]
        if min(sizes) * 3 >= max(sizes) * 2:
            return [[(i, 0, lengths[i]) for i in part] for part in parts]
    k = min(cores, total // _CUT_PART)
    if k < 2:
        return None
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    ends = [s + n for s, n in zip(starts, lengths, strict=True)]
    cuts = []
    for j in range(1, k):
        cut = round(total * j / k)
        for s, e in zip(starts, ends, strict=True):  # too close to a chunk's end: there
            if s < cut < e and min(cut - s, e - cut) < _PIECE:
                cut = s if cut - s < e - cut else e
        if cuts and cut <= cuts[-1] or cut >= total:
            return None
        cuts.append(cut)
    bounds = [0, *cuts, total]
    spans = list(zip(bounds, bounds[1:], strict=False))
    sizes = [b - a for a, b in spans]
    if min(sizes) < _CUT_PART or min(sizes) * 3 < max(sizes) * 2:
        return None
    dealt = []
    for a, b in spans:
        part = [(i, max(a, s) - s, min(b, e) - s)
                for i, (s, e) in enumerate(zip(starts, ends, strict=True))
                if max(a, s) < min(b, e)]  # fmt: skip
        # first the piece the next part waits for, last the one waiting for the part before
        part.sort(key=lambda p: 2 if p[1] > 0 else 0 if p[2] < lengths[p[0]] else 1)
        dealt.append(part)
    return dealt


# Prompt tokens in a step from which whole chunks go a core each (`_prompt_shares`).
_SHARED_PROMPTS = 128
# The fewest tokens a core's part has where chunks are cut (fewer go faster on one core:
# the two cores then hand Python's lock to each other at every numpy call), and the fewest
# a piece of a cut chunk has.
_CUT_PART, _PIECE = 96, 16


def fast_decoder(model: OpenELM) -> OpenELM | CpuDecoder:
    """`model` in a CpuDecoder when MLX runs on the CPU and it is an OpenELM of float32
    plain layers; otherwise `model` itself (a GPU, quantized, LoRA or half-precision
    layers, or another model class, which may compute differently)."""
    if on_cpu() and isinstance(model, OpenELM) and _sources(model) is not None:
        return CpuDecoder(model)
    return model


def fast_path_description(model) -> str:
    """One line saying whether `model` (as `fast_decoder` left it) decodes through the numpy
    path, and why not."""
    if isinstance(model, CpuDecoder):
        return "on (numpy BLAS: gemv per token, gemm per prompt chunk)"
    if not on_cpu():
        return f"off (MLX runs on {mx.default_device()})"
    if isinstance(model, OpenELM) and _sources(model) is not None:
        return "off (switched off)"
    return (
        "off (float32 models with plain layers only; quantized, LoRA and half-precision "
        "layers take MLX's kernels)"
    )
