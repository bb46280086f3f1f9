"""The kernels behind elm_mlx's CPU path, one at a time, on 270M-sized operands.

    python benchmarks/bench_kernels.py

Prints what MLX's CPU backend does with one-row, eight-row and prompt-sized float32
products (with the system OpenBLAS preloaded, and with the BLAS its wheel bundles), what
numpy does with the same arrays (zero-copy views, whole and in blocks), the shipped
nano model's small matrices as zero-copy views and as the copies the fast path makes, nano
prompt chunks fed in one step (a core each, or each product shared out; the last block in
full or its keys and values only), RoPE's two forms, nano's served decode step (rows in
the slab) and its bookkeeping, one, two and eight rows' decode step, the greedy pick of a
step's logits (MLX's and numpy's argmax), the serving engine alone in this process at
concurrency 1 and 8, MLX's and numpy's `exp`, and MLX's half-precision products.
`--only NAME,...` runs some of these sections (products, few_rows, small_matrices,
prompt_chunks, rope, slab_steps, decode_steps, sampling, engine, transcendentals,
half_precision).
Best of several runs each; the machine may be shared.
"""

from __future__ import annotations

import functools
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

N, K, M = 10240, 1280, 512  # proj_1 of OpenELM-270M's last layer, a 512-token prompt


def timings(fn, n: int) -> list[float]:
    """Seconds of `n` calls of fn, after one to warm up."""
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best(fn, n: int = 7) -> float:
    return min(timings(fn, n))


def median(fn, n: int = 300) -> float:
    return sorted(timings(fn, n))[n // 2]


def row(label: str, seconds: float, amount: float = 0, unit: str = "B") -> None:
    """One timing and its rate: `amount` (bytes read, FLOP, values) per second, in billions."""
    rate = f"{amount / seconds / 1e9:7.1f} G{unit}/s" if amount else ""
    print(f"  {label:58} {seconds * 1e3:9.2f} ms  {rate}")


def products(mx, np) -> None:
    from elm_mlx.runtime.fastpath import _matvec, _one_blas_thread

    w = mx.random.normal((N, K)) * 0.02  # (out, in), as nn.Linear stores it
    x1, xm = mx.random.normal((1, K)), mx.random.normal((M, K))
    mx.eval(w, x1, xm)
    wn, x1n, xmn = np.asarray(w), np.asarray(x1), np.asarray(xm)  # zero-copy views
    print(f"one row: (1, {K}) @ ({K}, {N}) float32, {wn.nbytes / 1e6:.0f} MB of weights")
    row("MLX x @ W.T (cblas_sgemm, M=1)", best(lambda: mx.eval(x1 @ w.T)), wn.nbytes)
    row("MLX W @ x.T (cblas_sgemm, N=1)", best(lambda: mx.eval(w @ x1.T)), wn.nbytes)
    row("numpy x @ W.T (gemv), BLAS default threads", best(lambda: x1n @ wn.T), wn.nbytes)
    with _one_blas_thread():
        row("numpy x @ W.T (gemv), one thread", best(lambda: x1n @ wn.T), wn.nbytes)
        row(
            "elm_mlx _matvec (gemv per core, blocking pool)",
            best(lambda: _matvec(x1n, wn.T)),
            wn.nbytes,
        )
    flops = 2 * M * N * K
    print(f"prompt: ({M}, {K}) @ ({K}, {N}) float32")
    row("MLX x @ W.T (cblas_sgemm)", best(lambda: mx.eval(xm @ w.T), 3), flops, "FLOP")
    row("numpy x @ W.T, BLAS default threads", best(lambda: xmn @ wn.T, 3), flops, "FLOP")
    with _one_blas_thread():
        row("numpy x @ W.T, one thread", best(lambda: xmn @ wn.T, 3), flops, "FLOP")
        row(
            "elm_mlx _matvec (gemm per core, blocking pool)",
            best(lambda: _matvec(xmn, wn.T), 3),
            flops,
            "FLOP",
        )


def few_rows(mx, np) -> None:
    """8 rows (the server's batch) by one weight: whole sgemm against column blocks."""
    from elm_mlx.runtime import fastpath
    from elm_mlx.runtime.fastpath import _matvec, _one_blas_thread

    rows = 8
    w = mx.random.normal((N, K)) * 0.02
    x = mx.random.normal((rows, K))
    mx.eval(w, x)
    wn, xn = np.asarray(w).T, np.asarray(x)  # (in, out) view, as the fast path holds it
    block = fastpath._row_blocks._block(rows, K, fastpath._RowBlocks.COLUMNS)
    out = np.empty((rows, N), np.float32)

    def blocks() -> None:
        for a in range(0, N, block):
            np.matmul(xn, wn[:, a : a + block], out=out[:, a : a + block])

    print(f"{rows} rows: ({rows}, {K}) @ ({K}, {N}) float32; column blocks of {block}")
    row("MLX x @ W.T (cblas_sgemm, M=8)", best(lambda: mx.eval(x @ w.T)), wn.nbytes)
    with _one_blas_thread():
        row("numpy x @ W.T whole, one thread", best(lambda: xn @ wn), wn.nbytes)
        row("numpy x @ W.T in column blocks, one thread", best(blocks), wn.nbytes)
        for faster in (False, True):
            fastpath._row_blocks.faster = faster
            label = "blocks" if faster else "whole"
            row(f"elm_mlx _matvec ({label}, blocking pool)", best(lambda: _matvec(xn, wn)),
                wn.nbytes)  # fmt: skip
        fastpath._row_blocks.faster = None


def small_matrices(mx, np) -> None:
    """The shipped nano model's widest products (160 inputs) by 1 and 8 rows: a zero-copy
    view of MLX's (out, in) memory against the (in, out) C-contiguous copy the fast path
    makes of matrices this small, whole and in blocks."""
    from elm_mlx.runtime import fastpath
    from elm_mlx.runtime.fastpath import _matvec, _one_blas_thread

    k = 160
    for n in (1280, 4096):
        w = mx.random.normal((n, k)) * 0.02
        mx.eval(w)
        view = np.asarray(w).T
        copy = np.ascontiguousarray(view)
        print(f"small matrix: (rows, {k}) @ ({k}, {n}) float32, {view.nbytes / 1e6:.1f} MB")
        with _one_blas_thread():
            for rows in (1, 8):
                x = np.asarray(mx.random.normal((rows, k)))
                for label, operand in (("zero-copy view", view), ("C-contiguous copy", copy)):
                    blocks = fastpath._row_blocks.size(x, operand)
                    how = "whole" if blocks is None else f"blocks of {blocks[0]}"
                    seconds = best(lambda x=x, o=operand: _matvec(x, o), 50)
                    print(f"  {f'_matvec, {rows} row(s), {label}, {how}':58} "
                          f"{seconds * 1e6:9.1f} us")  # fmt: skip
            # 8 rows by the copy on this thread (as `_matvec` runs a product this small)
            # and shared out over the cores, medians: the best of a few hides how long the
            # worker takes to wake
            x = np.asarray(mx.random.normal((8, k)))
            out, size = np.empty((8, n), np.float32), fastpath._row_blocks.size(x, copy)

            def shared(x=x, c=copy, o=out, s=size, n=n) -> None:
                fastpath._parallel(lambda lo, hi: fastpath._block_product(x, c, o, lo, hi, s), n)

            for label, fn in (("on this thread", lambda x=x, c=copy: _matvec(x, c)),
                              ("shared out over the cores", shared)):  # fmt: skip
                print(f"  {f'8 rows, C-contiguous copy, {label}, median':58} "
                      f"{median(fn) * 1e6:9.1f} us")  # fmt: skip


def prompt_chunks(mx, np) -> None:
    """127-token prompts of the shipped nano model fed in one step (prompts arriving
    together at a busy server): one chunk on one core with malloc's own thresholds and
    with freed memory kept (`runtime.memory`, which the sections after this one keep);
    one, and four a core each through every block against
    each product and each chunk's attention shared out layer by layer; three with the
    middle one cut in two (a part of one and a half chunks a core) against two a core each
    and then the third; one 255-token chunk cut in two against whole, and one 127-token
    chunk cut in two; a chunk's GLU on one core against shared out; then one chunk
    with its last block in full against its keys and values only (its outputs feed
    nothing)."""
    from elm_mlx.generation.batch import decode_step, row_slab
    from elm_mlx.generation.loading import load_for_generation
    from elm_mlx.runtime import fastpath
    from elm_mlx.runtime.memory import keep_freed_memory

    model, _, _ = load_for_generation(None)
    slab = row_slab(model, 4)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 4000, 127).tolist() for _ in range(4)]

    def step(n: int) -> None:
        caches = [slab.take() for _ in range(n)]
        decode_step(model, [], [], list(zip(prompts[:n], caches, strict=True)))
        for c in caches:
            slab.release(c)

    print("127-token prompt chunks fed in one step, nano model")
    views, rope, eps = model._current_views(), model._rope(), model.args.rms_norm_eps

    def one_core() -> None:  # one chunk through every block on this thread
        caches = slab.take()
        fastpath._share.inside = True
        try:
            with fastpath._one_blas_thread():
                fastpath._feed(views, [(prompts[0], caches)], eps, rope)
        finally:
            fastpath._share.inside = False
            slab.release(caches)

    for label, keep in (("malloc's own thresholds", False), ("freed memory kept", True)):
        if keep and not keep_freed_memory():
            break  # not glibc: nothing to compare
        seconds = best(one_core, 20)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            one_core()
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
        row(f"one chunk, one core, {label}, {faults:.0f} faults", seconds)
    row("one chunk", best(lambda: step(1), 20))
    row("four chunks, a core each through every block", best(lambda: step(4), 20))
    dealt, fastpath._prompt_shares = fastpath._prompt_shares, lambda *a: None
    row("four chunks, each product and attention shared out", best(lambda: step(4), 20))
    fastpath._prompt_shares = dealt

    long = rng.integers(3, 4000, 255).tolist()

    def feed(chunks: list, deal=None) -> None:
        """One step of `chunks`, dealt as `_deal` deals them or as `deal` says."""
        caches = [slab.take() for _ in chunks]
        real = fastpath._deal
        fastpath._deal = real if deal is None else deal
        try:
            decode_step(model, [], [], list(zip(chunks, caches, strict=True)))
        finally:
            fastpath._deal = real
            for c in caches:
                slab.release(c)

    whole = lambda lengths: None  # noqa: E731
    cuts = {  # taken in turns, 60 times, medians: a slow spell hits them all
        "three chunks, the middle one cut in two": lambda: feed(prompts[:3]),
        "three chunks: two a core each, then one (no cut)":
            lambda: (feed(prompts[:2]), feed(prompts[2:3], whole)),
        "one 255-token chunk cut in two": lambda: feed([long]),
        "one 255-token chunk whole": lambda: feed([long], whole),
        "one chunk cut in two (64 + 63: not made)":
            lambda: feed(prompts[:1], lambda lengths: [[(0, 0, 64)], [(0, 64, 127)]]),
        "one chunk whole": lambda: feed(prompts[:1], whole),
    }  # fmt: skip
    times = {label: [] for label in cuts}
    for _ in range(60):
        for label, fn in cuts.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    for label, ts in times.items():
        row(f"{label}, median", sorted(ts)[len(ts) // 2])

    def glu(g, shared: bool) -> None:
        real, fastpath._SHARED_GLU = fastpath._SHARED_GLU, 0 if shared else 1 << 62
        try:
            fastpath._glu(g)
        finally:
            fastpath._SHARED_GLU = real

    for ffn in (640, 2560):
        g = np.random.default_rng(1).standard_normal((127, 2 * ffn)).astype(np.float32)
        for label, shared in (("on one core", False), ("shared out over the cores", True)):
            print(f"  {f'GLU of a chunk (127 x {ffn}), {label}, median':58} "
                  f"{median(lambda g=g, s=shared: glu(g, s), 1000) * 1e6:9.1f} us")  # fmt: skip

    h = views.embed[np.asarray(prompts[0], np.int32)]

    def blocks(last: bool) -> None:
        caches = slab.take()
        with fastpath._one_blas_thread():
            fastpath._blocks(views, h, model.args.rms_norm_eps, rope,
                             prompts=[(127, caches, None)], last=last)  # fmt: skip
        slab.release(caches)

    row("one chunk, every block in full", best(lambda: blocks(True), 20))
    row("one chunk, the last block's keys and values only", best(lambda: blocks(False), 20))


def rope(mx, np) -> None:
    """The fast path's RoPE (full-width tables, four contiguous passes) against the
    half-width form (six strided passes), on nano's last layer's queries and keys."""
    from elm_mlx.runtime.fastpath import _rope

    def half_width(x, cos, sin):
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        out = np.empty_like(x)
        o1, o2 = out[..., :h], out[..., h:]
        np.multiply(x1, cos, out=o1)
        o1 -= x2 * sin
        np.multiply(x1, sin, out=o2)
        o2 += x2 * cos
        return out

    rng = np.random.default_rng(0)
    print("RoPE of (positions, 9 heads, 32) float32")
    for n in (127, 8, 1):
        x = rng.standard_normal((n, 9, 32), np.float32)
        cos, sin = rng.standard_normal((2, n, 1, 16), np.float32)
        full_cos, full_sin = np.concatenate((cos, cos), -1), np.concatenate((-sin, sin), -1)
        same = np.array_equal(_rope(x, full_cos, full_sin), half_width(x, cos, sin))
        old = best(functools.partial(half_width, x, cos, sin), 200)
        new = best(functools.partial(_rope, x, full_cos, full_sin), 200)
        for label, seconds in (
            ("half-width, six strided passes", old),
            (f"full-width, four passes (same values: {same})", new),
        ):
            print(f"  {f'{n} position(s), {label}':58} {seconds * 1e6:9.1f} us")  # fmt: skip


def slab_steps(mx, np) -> None:
    """A served batch's decode step on the shipped nano model: one and eight rows in slots
    of the rows' slab (128 cached tokens each), medians; then, for eight rows, the per-step
    bookkeeping the step now does once against what it did for every cache or layer: the
    room check (every row's every cache against the slab's capacity) and RoPE's table
    lookup (at every layer against once)."""
    from elm_mlx.generation.batch import decode_step, row_slab
    from elm_mlx.generation.loading import load_for_generation
    from elm_mlx.runtime import fastpath

    model, _, _ = load_for_generation(None)
    views, rope = model._current_views(), model._rope()
    print("decode step of rows in the slab, nano model, 128 cached tokens a row")
    for n in (1, 8):
        slab = row_slab(model, n)
        rows = [slab.take() for _ in range(n)]
        decode_step(model, [], [], [(list(range(3, 131)), c) for c in rows])

        def step(rows=rows) -> None:
            mx.eval(decode_step(model, [5] * len(rows), rows))
            for c in rows:
                for layer in c:
                    layer.offset -= 1  # the same position every time

        row(f"decode step, {n} row(s), median", median(step, 200))
    layers = len(views.layers)
    offsets = [c[0].offset for c in rows]

    def per_cache() -> None:
        all(fastpath._numpy_cache(c) for r in rows for c in r)
        fastpath._make_room(views, [(r, 1) for r in rows])

    for label, fn in (
        ("room: every row's every cache checked", per_cache),
        ("room: the slab's capacity checked once", lambda: fastpath._slab_rows_ready(rows, layers)),
        ("RoPE lookup at every layer", lambda: [rope.rows(offsets) for _ in range(layers)]),
        ("RoPE lookup once", lambda: rope.rows(offsets)),
    ):
        print(f"  {f'8 rows, {label}, median':58} {median(fn, 2000) * 1e6:9.1f} us")


def decode_steps(mx, np) -> None:
    """CpuDecoder.decode_rows on OpenELM-270M shapes (random weights), 128 cached tokens a
    row: one row, two (and two in blocks capped as for more rows), eight, and eight without
    depth chunks."""
    from elm_mlx.model.config import preset
    from elm_mlx.runtime import fastpath
    from elm_mlx.runtime.fastpath import CpuDecoder
    from elm_mlx.testing import random_model

    model = CpuDecoder(random_model(preset("OpenELM-270M")))
    mx.eval(model.parameters())
    print("decode step, OpenELM-270M shapes, 128 cached tokens per row")
    for rows in (1, 2, 8):
        caches = [model.make_cache() for _ in range(rows)]
        for c in caches:
            model(mx.array([list(range(3, 131))]), cache=c)

        def step(rows=rows, caches=caches) -> None:
            mx.eval(model.decode_rows([5] * rows, caches))
            for c in caches:
                for layer in c:
                    layer.offset -= 1  # the same position every time

        row(f"decode_rows, {rows} row(s)", best(step))
        if rows == 2:  # blocks of a view capped at 128 columns, as for more rows
            few, fastpath._RowBlocks.FEW = fastpath._RowBlocks.FEW, 1
            row(f"decode_rows, {rows} row(s), blocks of at most 128 columns", best(step))
            fastpath._RowBlocks.FEW = few
        if rows > 2:  # the down projections (3,000-5,000 inputs) in blocks without depth chunks
            blocks = fastpath._row_blocks
            chunked, blocks.CHUNKED = blocks.CHUNKED, (0, 0, 0)
            row(f"decode_rows, {rows} row(s), no depth chunks", best(step))
            blocks.CHUNKED = chunked


def sampling(mx, np) -> None:
    """The greedy pick of a decode step's logits (float32, on the CPU): MLX's argmax, its
    evaluation and `tolist` against numpy's argmax of the same array (what
    `generation.batch.sample_rows` takes for rows that are all greedy), medians."""
    print("greedy pick of a step's logits")
    rng = np.random.default_rng(0)
    for vocab in (4096, 32000):  # nano, OpenELM
        for rows in (1, 8):
            logits = mx.array(rng.standard_normal((rows, vocab)).astype(np.float32))
            for label, fn in (
                ("MLX argmax", lambda x=logits: mx.argmax(x, axis=-1).tolist()),
                ("numpy argmax", lambda x=logits: np.asarray(x).argmax(axis=-1).tolist()),
            ):
                label = f"{rows} row(s) of {vocab}, {label}, median"
                print(f"  {label:58} {median(fn, 2000) * 1e6:9.1f} us")


def engine(mx, np) -> None:
    """The serving engine alone, in this process (no HTTP, no client): nano, 64 requests of
    128-token prompts and 64 new tokens (greedy), each client sending its next request the
    moment its last ends, at concurrency 1 and 8; with the step's greedy pick by numpy (as
    shipped) and by MLX's argmax (as before it). Tokens/s of three rounds each, taken in
    turns."""
    import threading

    from elm_mlx.generation import batch
    from elm_mlx.generation.loading import load_for_generation
    from elm_mlx.serve import engine as engine_mod

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_serve import make_prompts

    def mlx_pick(logits, rows):
        if any(r.processors for r in rows) or any(r.sampler is not batch.greedy for r in rows):
            return batch.sample_rows(logits, rows)
        return mx.argmax(logits, axis=-1), logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    model, tokenizer, _ = load_for_generation(None)
    settings = engine_mod.RowSettings(max_tokens=64, temp=0.0)

    def run(concurrency: int, prompts: list[list[int]]) -> float:
        server = engine_mod.Engine(model, tokenizer, max_batch=8, prompt_cache_bytes=1 << 30)
        server.start()
        left, lock, done, tokens = iter(prompts), threading.Lock(), threading.Event(), [0]
        ended = [0]

        def submit() -> None:
            with lock:
                prompt = next(left, None)
            if prompt is not None:
                server.submit(engine_mod.Job(prompt, settings, emit))

        def emit(event) -> None:
            if isinstance(event, engine_mod.Finished | engine_mod.Failed):
                with lock:
                    tokens[0] += getattr(event, "completion_tokens", 0)
                    ended[0] += 1
                    if ended[0] == len(prompts):
                        done.set()
                submit()  # the client's next request, at once

        start = time.perf_counter()
        for _ in range(concurrency):
            submit()
        done.wait()
        seconds = time.perf_counter() - start
        server.close(0)
        server.join()
        return tokens[0] / seconds

    print("serving engine in-process, nano, 64 requests, 128-token prompts, 64 new tokens")
    results = {}
    for r in range(3):
        for c in (1, 8):
            prompts = [
                tokenizer.encode(p) for p in make_prompts(tokenizer, 64, 128, seed=r * 10 + c)
            ]
            for label, pick in (("numpy argmax", batch.sample_rows), ("MLX argmax", mlx_pick)):
                engine_mod.sample_rows = pick
                try:
                    results.setdefault((c, label), []).append(run(c, prompts))
                finally:
                    engine_mod.sample_rows = batch.sample_rows
    for (c, label), rates in results.items():
        rounds = " ".join(f"{x:.0f}" for x in rates)
        print(f"  {f'concurrency {c}, {label}, rounds (tokens/s)':58} {rounds}")
    for label in ("numpy argmax", "MLX argmax"):
        c1 = sorted(results[1, label])[1]
        c8 = sorted(results[8, label])[1]
        print(
            f"  {label}: concurrency 8 {c8:.0f} / concurrency 1 {c1:.0f} = {c8 / c1:.2f}x (medians)"
        )


def transcendentals(mx, np) -> None:
    s = mx.random.normal((20, 512, 512))  # attention scores of one 270M layer, 512 tokens
    mx.eval(s)
    sn = np.asarray(s)
    print(f"exp over {s.size / 1e6:.1f}M float32 (one layer's attention scores at 512 tokens)")
    row("MLX exp", best(lambda: mx.eval(mx.exp(s)), 3), s.size, "exp")
    row(
        "MLX softmax (precise)",
        best(lambda: mx.eval(mx.softmax(s, axis=-1, precise=True)), 3),
        s.size,
        "exp",
    )
    row("numpy exp", best(lambda: np.exp(sn), 3), s.size, "exp")


def half_precision(mx) -> None:
    print("MLX products by dtype (the CPU has no BLAS for half precision)")
    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        w = (mx.random.normal((N // 2, K)) * 0.02).astype(dtype)
        x1, xm = mx.random.normal((1, K)).astype(dtype), mx.random.normal((128, K)).astype(dtype)
        mx.eval(w, x1, xm)
        name = str(dtype).split(".")[-1]
        row(
            f"{name:8} one row  (1, {K}) @ ({K}, {N // 2})",
            best(lambda x=x1, w=w: mx.eval(x @ w.T), 3),
            w.nbytes,
        )
        flops = 2 * 128 * (N // 2) * K
        row(
            f"{name:8} 128 rows ({128}, {K}) @ ({K}, {N // 2})",
            best(lambda x=xm, w=w: mx.eval(x @ w.T), 3),
            flops,
            "FLOP",
        )


def bundled_blas() -> None:
    """MLX's products with the BLAS its wheel bundles (a fresh interpreter, no preload)."""
    import mlx.core as mx

    w, xm = mx.random.normal((N, K)), mx.random.normal((64, K))
    mx.eval(w, xm)
    print("MLX with its bundled BLAS (no preload)")
    row(
        f"MLX (64, {K}) @ ({K}, {N}) (cblas_sgemm)",
        best(lambda: mx.eval(xm @ w.T), 3),
        2 * 64 * N * K,
        "FLOP",
    )


def main() -> None:
    if sys.argv[1:] == ["--bundled"]:
        return bundled_blas()
    from elm_mlx.runtime.blas import blas_description, preload_blas

    preload_blas()
    import mlx.core as mx
    import numpy as np

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"MLX BLAS: {blas_description()}")
    sections = {"products": products, "few_rows": few_rows, "small_matrices": small_matrices,
                "prompt_chunks": prompt_chunks, "rope": rope, "slab_steps": slab_steps,
                "decode_steps": decode_steps, "sampling": sampling, "engine": engine,
                "transcendentals": transcendentals}  # fmt: skip
    only = sys.argv[2].split(",") if sys.argv[1:2] == ["--only"] else None
    for name, section in sections.items():
        if only is None or name in only:
            section(mx, np)
    if only is not None:
        if "half_precision" in only:
            half_precision(mx)
        return print(f"load average after: {os.getloadavg()[0]:.2f}")
    half_precision(mx)
    env = {**os.environ, "ELM_MLX_BLAS": "0"}
    sys.stdout.flush()
    subprocess.run([sys.executable, __file__, "--bundled"], env=env, check=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
