"""The CPU matrix-vector decoding step against the model's own MLX path, and the BLAS preload."""

import dataclasses
import functools
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from elm_mlx.generation.generate import generate_step
from elm_mlx.model.cache import RotatingKVCache
from elm_mlx.runtime import fastpath
from elm_mlx.runtime.blas import find_openblas
from elm_mlx.runtime.device import default_dtype, default_scales_dtype
from elm_mlx.runtime.fastpath import CpuDecoder, fast_decoder, fast_path_description
from elm_mlx.testing import random_model, tiny_args

VARIANTS = [
    pytest.param(dict(num_gqa_groups=4, tied=True), id="gqa4-tied"),
    pytest.param(dict(num_gqa_groups=2, tied=False), id="gqa2-untied"),
    pytest.param(dict(num_gqa_groups=1, tied=True, layers=3), id="mha-tied"),
]


def build(args, seed=3):
    model = random_model(args, seed)
    mx.eval(model.parameters())
    return model


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(params=VARIANTS)
def model(request):
    return build(tiny_args(**request.param))


def steps_agree(model, make_cache, prompt_len: int, steps: int, tol=1e-5) -> None:
    """Prefill both caches, each on its own path, then decode token by token on both."""
    rng = np.random.default_rng(0)
    fast = CpuDecoder(model)
    plain_cache, fast_cache = make_cache(), make_cache()
    prompt = mx.array(rng.integers(0, model.args.vocab_size, (1, prompt_len)))
    assert rel_err(fast(prompt, cache=fast_cache), model(prompt, cache=plain_cache)) < tol
    for tok in rng.integers(0, model.args.vocab_size, steps):
        ids = mx.array([[int(tok)]])
        want, got = model(ids, cache=plain_cache), fast(ids, cache=fast_cache)
        assert got.shape == want.shape == (1, 1, model.args.vocab_size)
        assert rel_err(got, want) < tol
    assert fast_cache[0].offset == plain_cache[0].offset == prompt_len + steps
    for a, b in zip(fast_cache, plain_cache, strict=True):
        assert rel_err(a.state[0], b.state[0]) < tol
        assert rel_err(a.state[1], b.state[1]) < tol


def test_decode_steps_match_mlx_path(model):
    steps_agree(model, model.make_cache, prompt_len=7, steps=40)


def test_cache_growth_between_steps(model):
    """Buffers grow while decoding (small step), and the numpy views follow."""

    def small_steps():
        cache = model.make_cache()
        for c in cache:
            c.step = 8
        return cache

    steps_agree(model, small_steps, prompt_len=3, steps=30)


def test_decode_from_an_empty_cache(model):
    steps_agree(model, model.make_cache, prompt_len=1, steps=5)
    fast = CpuDecoder(model)
    cache = model.make_cache()
    got = fast(mx.array([[9]]), cache=cache)  # first token, nothing cached yet
    assert rel_err(got, model(mx.array([[9]]))) < 1e-5
    assert cache[0].offset == 1


def test_without_a_cache(model):
    ids = mx.array([[11]])
    assert rel_err(CpuDecoder(model)(ids), model(ids)) < 1e-5


def test_rotating_window_uses_mlx_attention(model):
    """A rotating cache takes MLX's attention per layer; results still match past the wrap."""
    steps_agree(model, lambda: model.make_cache(max_kv_size=12), prompt_len=5, steps=20)


def test_prompt_in_chunks(model):
    """Chunks after the first attend to the cache and causally among themselves."""
    rng = np.random.default_rng(1)
    ids = mx.array(rng.integers(0, model.args.vocab_size, (1, 250)))
    fast, fast_cache, plain_cache = CpuDecoder(model), model.make_cache(), model.make_cache()
    for c in fast_cache + plain_cache:
        c.step = 64  # buffers grow inside chunks
    for lo, hi in [(0, 7), (7, 8), (8, 150), (150, 250)]:
        chunk = ids[:, lo:hi]
        assert rel_err(fast(chunk, cache=fast_cache), model(chunk, cache=plain_cache)) < 1e-5
    for a, b in zip(fast_cache, plain_cache, strict=True):
        assert rel_err(a.state[0], b.state[0]) < 1e-5
        assert rel_err(a.state[1], b.state[1]) < 1e-5
    assert rel_err(CpuDecoder(model)(ids), model(ids)) < 1e-5  # no cache at all


def test_fallbacks_are_the_model_itself(model):
    fast = CpuDecoder(model)
    ids = mx.array([[1, 2, 3]])
    window, plain_window = model.make_cache(max_kv_size=8), model.make_cache(max_kv_size=8)
    assert mx.array_equal(fast(ids, cache=window), model(ids, cache=plain_window))
    batch = mx.array([[4], [5]])
    assert mx.array_equal(fast(batch), model(batch))  # a batch


def test_other_dtypes_and_quantized_layers_fall_back():
    half = build(tiny_args())
    half.set_dtype(mx.bfloat16)
    ids = mx.array([[7]])
    assert mx.array_equal(CpuDecoder(half)(ids), half(ids))
    quant = build(tiny_args())
    fits = lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 32 == 0  # noqa: E731
    nn.quantize(quant, group_size=32, bits=8, class_predicate=fits)
    assert any(isinstance(m, nn.QuantizedLinear) for m in quant.modules())
    assert mx.array_equal(CpuDecoder(quant)(ids), quant(ids))


def test_replaced_weights_are_noticed():
    args = tiny_args(tied=False)
    model, other = build(args, seed=1), build(args, seed=2)
    fast = CpuDecoder(model)
    ids = mx.array([[5]])
    fast(ids)
    model.update(other.parameters())
    assert rel_err(fast(ids), other(ids)) < 1e-5


def test_generate_step_tokens_match(model):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    plain = [t for t, _ in generate_step(prompt, model, max_tokens=24)]
    fast = [t for t, _ in generate_step(prompt, CpuDecoder(model), max_tokens=24)]
    assert fast == plain


def test_wrapper_is_the_model_elsewhere(model):
    fast = fast_decoder(model)
    assert isinstance(fast, CpuDecoder) and fast.model is model  # tests run on the CPU
    assert fast.args is model.args and len(fast.make_cache()) == len(model.layers)
    assert fast_decoder(fast) is fast  # no double wrapping
    assert isinstance(fast.make_cache(max_kv_size=16)[0], RotatingKVCache)
    assert fast_path_description(fast).startswith("on")
    assert fast_path_description(model) == "off (switched off)"


def test_models_the_numpy_path_cannot_run_stay_as_they_are():
    half = build(tiny_args())
    half.set_dtype(mx.bfloat16)
    quant = build(tiny_args())
    fits = lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 32 == 0  # noqa: E731
    nn.quantize(quant, group_size=32, bits=8, class_predicate=fits)
    for model in (half, quant):
        assert fast_decoder(model) is model
        assert fast_path_description(model).startswith("off (float32 models")


def test_default_dtype_per_device():
    assert default_dtype(mx.Device(mx.cpu)) == mx.float32
    assert default_dtype(mx.Device(mx.gpu)) == mx.bfloat16
    assert default_scales_dtype(mx.bfloat16, mx.Device(mx.cpu)) == mx.float32
    assert default_scales_dtype(mx.bfloat16, mx.Device(mx.gpu)) == mx.bfloat16
    assert default_scales_dtype(mx.float16, mx.Device(mx.gpu)) == mx.float16


# ---- BLAS preload (each case in a fresh interpreter: the preload is process-wide) ----


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


PRELOAD = (
    "from elm_mlx.runtime.blas import preload_blas, blas_description\n"
    "path = preload_blas()\n"
    "import mlx.core as mx\n"
    "a = mx.arange(12, dtype=mx.float32).reshape(3, 4)\n"
    "assert (a @ a.T).tolist()[1][2] == 4*8 + 5*9 + 6*10 + 7*11\n"
    "print(path)\n"
    "print(blas_description())\n"
)


def test_preload_turned_off():
    out = run_python(PRELOAD, ELM_MLX_BLAS="0")
    assert out.returncode == 0, out.stderr
    path, description = out.stdout.splitlines()
    assert path == "None" and "ELM_MLX_BLAS=0" in description


def test_preload_too_late():
    out = run_python("import mlx.core\n" + PRELOAD, ELM_MLX_BLAS="")
    assert out.returncode == 0, out.stderr
    path, description = out.stdout.splitlines()
    assert path == "None" and "too late" in description


def test_preload_bad_path_is_an_error(tmp_path):
    out = run_python(PRELOAD, ELM_MLX_BLAS=str(tmp_path / "missing.so"))
    assert out.returncode != 0 and "BlasError" in out.stderr and "missing.so" in out.stderr
    cli = [sys.executable, "-m", "elm_mlx.cli", "info", "OpenELM-270M"]
    env = {**os.environ, "ELM_MLX_BLAS": str(tmp_path / "missing.so")}
    done = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: ELM_MLX_BLAS=")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or find_openblas() is None, reason="no system OpenBLAS"
)
def test_preload_loads_system_openblas():
    out = run_python(PRELOAD + "print(open('/proc/self/maps').read())", ELM_MLX_BLAS="")
    assert out.returncode == 0, out.stderr
    path, description, maps = out.stdout.split("\n", 2)
    assert path == find_openblas() and "OpenBLAS" in description
    assert os.path.realpath(path).rsplit("/", 1)[-1] in maps


FAULTS = (
    "import resource, sys, numpy as np\n"
    "from elm_mlx.runtime.memory import keep_freed_memory\n"
    "kept = keep_freed_memory()\n"
    "def cycle():  # four 1 MB temporaries, written, then freed: a prompt chunk's pattern\n"
    "    a = [np.ones(1 << 18, np.float32) for _ in range(4)]\n"
    "for _ in range(5): cycle()\n"
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "for _ in range(20): cycle()\n"
    "print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_freed_memory_is_kept_for_the_next_step():
    """With `keep_freed_memory` the same temporaries each step take no page faults (with
    glibc's own thresholds, each step's were handed back and faulted in again);
    ELM_MLX_MALLOC=0 leaves malloc as it was."""
    kept = run_python(FAULTS)
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.split() == ["True", "0.0"]
    own = run_python(FAULTS, ELM_MLX_MALLOC="0")
    assert own.returncode == 0, own.stderr
    flag, faults = own.stdout.split()
    assert flag == "False" and float(faults) > 100


def test_parallel_shares_cover_the_range_and_pass_errors_on():
    from elm_mlx.runtime.fastpath import _parallel

    seen = []
    _parallel(lambda lo, hi: seen.extend(range(lo, hi)), 37)
    assert sorted(seen) == list(range(37))

    def fails_at_the_end(lo, hi):
        if hi == 37:
            raise ValueError("share failed")

    with pytest.raises(ValueError, match="share failed"):
        _parallel(fails_at_the_end, 37)
    seen.clear()
    _parallel(lambda lo, hi: seen.extend(range(lo, hi)), 5)  # still usable afterwards
    assert sorted(seen) == list(range(5))


@pytest.mark.parametrize("rows, ffn", [(8, 64), (300, 512)])  # one core; shared out
def test_glu_is_silu_of_the_gate_times_the_up_projection(rows, ffn, monkeypatch):
    shared = []
    real = fastpath._parallel
    monkeypatch.setattr(fastpath, "_parallel", lambda fn, n: (shared.append(n), real(fn, n)))
    h = np.random.default_rng(3).standard_normal((rows, 2 * ffn)).astype(np.float32) * 4
    h[0, :4] = [-100.0, 100.0, 0.0, -0.0]  # exp overflows for -100: silu is -0
    gate, up = h[:, :ffn].astype(np.float64), h[:, ffn:].astype(np.float64)
    want = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(fastpath._glu(h), want, rtol=1e-5, atol=1e-6)
    assert bool(shared) == (rows * ffn >= fastpath._SHARED_GLU)  # inline on one core


def test_generation_takes_the_path_it_is_given(model, monkeypatch):
    """generate_step calls the model it is handed: the wrapper's numpy path, or MLX's."""
    seen = []
    original = fastpath._blocks
    monkeypatch.setattr(fastpath, "_blocks", lambda *a, **k: seen.append(1) or original(*a, **k))
    tokens = [t for t, _ in generate_step([1, 5, 9, 2], fast_decoder(model), max_tokens=4)]
    assert len(seen) == 5  # prefill, last prompt token, three more steps: all numpy
    seen.clear()
    assert [t for t, _ in generate_step([1, 5, 9, 2], model, max_tokens=4)] == tokens
    assert seen == []


def test_single_token_decoding_past_300_positions_matches_mlx_and_mlx_lm():
    """One token at a time for 330 positions: the numpy path, the MLX path and mlx-lm agree
    at every position (an off-by-one in a RoPE position shows up wherever it starts)."""
    from mlx_lm.models import openelm as mlx_lm_openelm
    from mlx_lm.models.cache import make_prompt_cache

    args = dataclasses.replace(tiny_args(num_gqa_groups=2, tied=False), max_context_length=512)
    model = build(args, seed=7)
    theirs = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(args.to_dict()))
    theirs.load_weights(list(tree_flatten(model.parameters())))
    fast = fast_decoder(model)
    assert isinstance(fast, CpuDecoder)
    caches = model.make_cache(), model.make_cache(), make_prompt_cache(theirs)
    tokens = np.random.default_rng(5).integers(0, args.vocab_size, 330)
    worst_fast = worst_mlx_lm = 0.0
    for position, token in enumerate(tokens):
        ids = mx.array([[int(token)]])
        plain = model(ids, cache=caches[0])
        got = fast(ids, cache=caches[1])
        ref = theirs(ids, cache=caches[2])
        assert np.isfinite(np.asarray(got)).all(), position
        worst_fast = max(worst_fast, rel_err(got, plain))
        worst_mlx_lm = max(worst_mlx_lm, rel_err(plain, ref))
    assert caches[1][0].offset == caches[0][0].offset == 330
    assert worst_fast < 1e-5 and worst_mlx_lm < 1e-5, (worst_fast, worst_mlx_lm)


@pytest.mark.skipif(fastpath._cores() < 2, reason="one core: no worker threads")
def test_workers_stay_in_step_after_ctrl_c():
    """Ctrl-C while the caller waits for the other shares: every share of that job is
    still collected, so the next job does not take its leftovers for its own."""
    import signal
    import threading
    import time

    def slow(lo, hi):
        if lo > 0:
            time.sleep(0.5)

    main = threading.main_thread().ident
    timer = threading.Timer(0.1, signal.pthread_kill, (main, signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        fastpath._parallel(slow, 64)
    timer.join()

    def record(lo, hi, seen):
        if lo > 0:
            time.sleep(0.2)
        seen.extend(range(lo, hi))

    for _ in range(3):
        seen = []
        fastpath._parallel(functools.partial(record, seen=seen), 64)
        assert sorted(seen) == list(range(64))


def test_a_lost_wake_up_or_a_sigterm_never_hangs_the_pool():
    """An interrupt landing between taking a share's wake-up and reading it used to lose
    that share's outcome, and the caller then waited forever (seen under SIGTERM during
    generation). Outcomes live in the job's slots: a job whose shares are all done returns
    whatever is left in the wake-up queue; and the interrupt is re-raised as it came
    (the CLI's SIGTERM, a KeyboardInterrupt subclass, must stay itself)."""
    import threading

    pool = fastpath._Workers(1)
    done = threading.Event()
    threading.Thread(target=lambda: (pool._wait([None, None], 2), done.set()), daemon=True).start()
    assert done.wait(5), "waited for wake-ups of shares that had already finished"

    class Term(KeyboardInterrupt):
        pass

    def share(lo, hi):
        if lo == 0:  # the caller's own share
            raise Term

    with pytest.raises(Term):
        pool.run(share, [(0, 1), (1, 2)])
    seen = []
    pool.run(lambda lo, hi: seen.append(lo), [(0, 1), (1, 2)])
    assert sorted(seen) == [0, 1]


def _rows_agree(model, lengths, steps=4, tol=1e-5) -> None:
    """decode_rows over rows of different lengths against each row alone on the MLX path."""
    rng = np.random.default_rng(2)
    fast = CpuDecoder(model)
    prompts = [rng.integers(0, model.args.vocab_size, n).tolist() for n in lengths]
    rows, plain = [model.make_cache() for _ in prompts], [model.make_cache() for _ in prompts]
    for p, c, ref in zip(prompts, rows, plain, strict=True):
        fast(mx.array(p)[None], cache=c)
        model(mx.array(p)[None], cache=ref)
    tokens = [1] * len(prompts)
    for _ in range(steps):
        got = fast.decode_rows(tokens, rows)  # (B, vocab)
        for b, t in enumerate(tokens):
            want = model(mx.array([[t]]), cache=plain[b])[0, -1]
            assert rel_err(got[b], want) < tol, b
        tokens = np.asarray(mx.argmax(got, axis=-1)).tolist()
    for row, ref in zip(rows, plain, strict=True):
        assert row[0].offset == ref[0].offset
        assert rel_err(row[-1].state[0], ref[-1].state[0]) < tol


@pytest.mark.parametrize("blocked", [True, False])
def test_rows_in_column_blocks_or_whole_match(blocked, monkeypatch):
    """A few rows go through the products in column blocks or whole, as timed, by a
    zero-copy view of MLX's (out, in) memory or by a small matrix's C-contiguous copy; all
    agree with the MLX path (the tiny weights are blocked and shared out as a large
    model's are)."""
    for copied in (False, True):  # the timing itself runs
        assert isinstance(fastpath._RowBlocks()._blocks_win(copied), bool)
    # blocks round differently: they are chosen only by a margin noise does not make
    assert fastpath._RowBlocks.clearly_faster(0.5, 1.0)
    assert not fastpath._RowBlocks.clearly_faster(0.95, 1.0)
    assert not fastpath._RowBlocks.clearly_faster(1.2, 1.0)
    monkeypatch.setattr(fastpath._RowBlocks, "WORK", 6000)  # blocks of a few columns
    monkeypatch.setattr(fastpath, "_SMALL_WORK", 0)
    monkeypatch.setattr(fastpath, "_row_blocks", fastpath._RowBlocks())
    fastpath._row_blocks.faster = fastpath._row_blocks.faster_copied = blocked
    model = build(tiny_args(num_gqa_groups=2, tied=False))
    x = np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32)
    weight = np.random.default_rng(1).standard_normal((200, 64), dtype=np.float32)  # (out, in)
    for w in (weight.T, np.ascontiguousarray(weight.T)):
        assert (fastpath._row_blocks.size(x, w) is not None) == blocked
        np.testing.assert_allclose(fastpath._matvec(x, w), x @ w, rtol=1e-5, atol=1e-5)
    if blocked:  # a copy's blocks, and a view's for 2-3 rows, are as wide as the work bound
        monkeypatch.setattr(fastpath._RowBlocks, "COLUMNS", 16)  # allows; a view's capped
        assert fastpath._row_blocks.size(x, w)[0] == 6000 // (3 * 64) // 8 * 8 == 24
        assert fastpath._row_blocks.size(x, weight.T)[0] == 24
        x4 = np.ones((4, 64), np.float32)
        assert fastpath._row_blocks.size(x4, weight.T)[0] == 16
        assert fastpath._row_blocks.size(x4, w)[0] == 6000 // (4 * 64) // 8 * 8 == 16
        np.testing.assert_allclose(fastpath._matvec(x4, weight.T), x4 @ weight.T, rtol=1e-5)
    _rows_agree(model, [5, 17, 2, 40, 9])


def test_rows_in_depth_chunks_match(monkeypatch):
    """Blocks of a long inner dimension summed over depth chunks (the last one shorter)
    give the product, and decoded rows agree with the MLX path."""
    monkeypatch.setattr(fastpath._RowBlocks, "WORK", 6000)
    monkeypatch.setattr(fastpath._RowBlocks, "DEPTH", 24)
    monkeypatch.setattr(fastpath._RowBlocks, "CHUNKED", (2, 8, 40))
    monkeypatch.setattr(fastpath, "_SMALL_WORK", 0)
    monkeypatch.setattr(fastpath, "_row_blocks", fastpath._RowBlocks())
    fastpath._row_blocks.faster = fastpath._row_blocks.faster_copied = True
    x = np.random.default_rng(0).standard_normal((3, 100), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal((100, 70), dtype=np.float32)
    cols, depth = fastpath._row_blocks.size(x, w)
    assert depth == 32 and 100 % depth  # four chunks, the last one shorter
    out = np.zeros((3, 70), np.float32)
    fastpath._block_product(x, w, out, 0, 70, (cols, depth))  # whatever BLAS numpy has
    np.testing.assert_allclose(out, x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fastpath._matvec(x, w), x @ w, rtol=1e-5, atol=1e-5)
    _rows_agree(build(tiny_args(num_gqa_groups=2, tied=False)), [5, 17, 2, 40, 9])


def test_rows_share_out_long_caches_by_heads(monkeypatch):
    """Few rows with long caches: their KV heads are shared out over the cores."""
    monkeypatch.setattr(fastpath, "_SPLIT_KV", 0)
    calls = []
    real = fastpath._parallel
    monkeypatch.setattr(fastpath, "_parallel", lambda fn, n: (calls.append(n), real(fn, n)))
    model = build(tiny_args(num_gqa_groups=1, tied=True))  # several KV heads per layer
    _rows_agree(model, [30])
    assert calls, "the attention was never shared out"
    _rows_agree(model, [30, 3, 12])


def test_appending_in_place_never_reaches_a_cache_it_was_seeded_from(model):
    """Caches seeded from a kept cache's keys (the server's prompt cache) decode into their
    own buffers: the kept cache and a sibling seeded from it are unchanged."""
    fast = CpuDecoder(model)
    kept = model.make_cache()
    fast(mx.array([[3, 4, 5, 6, 7, 8]]), cache=kept)
    before = [np.array(c.keys) for c in kept]  # the whole buffer, room past `offset` too

    def seeded(n: int) -> list:
        caches = model.make_cache()
        for c, k in zip(caches, kept, strict=True):
            c.state = [k.keys[..., :n, :], k.values[..., :n, :]]
        return caches

    a, b = seeded(4), seeded(4)
    fast.decode_rows([9, 10], [a, b])
    fast.decode_rows([11, 12], [a, b])
    for c, was in zip(kept, before, strict=True):
        np.testing.assert_array_equal(np.array(c.keys), was)
    fresh = model.make_cache()
    fast(mx.array([[3, 4, 5, 6, 10, 12]]), cache=fresh)
    assert rel_err(b[-1].state[0], fresh[-1].state[0]) < 1e-6


def test_a_trimmed_copy_of_a_full_kept_cache_never_writes_into_it():
    """A cache seeded with the whole of another's buffer (the kept one is exactly full),
    then trimmed, has room in a buffer it does not own: its next token goes elsewhere."""
    from elm_mlx.model.cache import KVCache

    kept, ones = KVCache(), np.ones((2, 1, 4), np.float32)
    for _ in range(KVCache.step):
        fastpath._append(kept, ones, ones)
    assert kept.keys.shape[2] == kept.offset == KVCache.step  # full
    copy = KVCache()
    copy.state = [kept.keys[..., : kept.offset, :], kept.values[..., : kept.offset, :]]
    mx.eval(copy.state)
    copy.trim(1)
    keys, _ = fastpath._append(copy, ones * 9, ones * 9)
    assert keys[0, -1, 0] == 9 and copy.offset == KVCache.step
    assert (np.array(kept.keys) == 1).all() and (np.array(kept.values) == 1).all()


def test_a_cache_the_mlx_path_wrote_between_numpy_steps(model):
    """numpy, then MLX, then numpy steps on one cache agree with MLX steps alone (the numpy
    path reads the cache's current buffers, whoever wrote last)."""
    fast = CpuDecoder(model)
    mixed, plain = model.make_cache(), model.make_cache()
    prompt = mx.array([[5, 6, 7]])
    fast(prompt, cache=mixed)
    model(prompt, cache=plain)
    for i, tok in enumerate([8, 9, 10, 11, 12, 13]):
        ids = mx.array([[tok]])
        got = (model if i % 2 else fast)(ids, cache=mixed)
        want = model(ids, cache=plain)
        assert rel_err(got, want) < 1e-5, i
    for a, b in zip(mixed, plain, strict=True):
        assert rel_err(a.state[0], b.state[0]) < 1e-5


def test_rope_table_stays_the_context_long():
    """A rotating window decodes past the context: positions beyond it are computed when
    asked for, never added to the table, and rotate as MLX's RoPE does."""
    args = dataclasses.replace(tiny_args(num_gqa_groups=2), max_context_length=16)
    model = build(args)
    fast = CpuDecoder(model)
    cache, plain = fast.make_cache(max_kv_size=8), model.make_cache(max_kv_size=8)
    for tok in range(24):
        ids = mx.array([[tok % 7 + 1]])
        assert rel_err(fast(ids, cache=cache), model(ids, cache=plain)) < 1e-5, tok
    assert cache[0].offset == 24
    assert fast._rope_table.cos.shape[0] == 16


def test_caches_get_buffers_of_their_own_before_a_step(model, monkeypatch):
    """Fresh, seeded-and-trimmed (room in a buffer it does not own) and full caches get
    owned buffers with room before the numpy path writes, so it never needs MLX's
    `update_and_fetch`; the seed is untouched, and a cache that would pass max_size is
    still refused."""
    from elm_mlx.model.cache import ContextLengthError, KVCache

    monkeypatch.setattr(KVCache, "step", 8)  # a full buffer within the context
    fast = CpuDecoder(model)
    kept = model.make_cache()
    fast(mx.array([[3, 4, 5, 6]]), cache=kept)
    before = [np.array(c.keys) for c in kept]
    real = KVCache.update_and_fetch

    def refused(self, keys, values):
        raise AssertionError("the numpy path fell back to update_and_fetch")

    monkeypatch.setattr(KVCache, "update_and_fetch", refused)
    fresh = model.make_cache()
    fast(mx.array([[3, 4, 5]]), cache=fresh)
    assert all(c.owned and c.keys.shape[2] == KVCache.step for c in fresh)
    seeded = model.make_cache()
    for c, k in zip(seeded, kept, strict=True):
        c.state = [k.keys[..., :4, :], k.values[..., :4, :]]
        c.trim(1)  # room at position 3, in the kept entry's memory
    fast.decode_rows([7], [seeded])
    assert all(c.owned and c.offset == 4 for c in seeded)
    for c, was in zip(kept, before, strict=True):
        np.testing.assert_array_equal(np.array(c.keys), was)
    full = model.make_cache()
    fast(mx.array([list(range(3, 3 + KVCache.step))]), cache=full)
    fast.decode_rows([7], [full])
    assert all(c.offset == KVCache.step + 1 and c.keys.shape[2] == 2 * KVCache.step for c in full)
    monkeypatch.setattr(KVCache, "update_and_fetch", real)
    bounded = [KVCache(max_size=3) for _ in fresh]
    fast(mx.array([[3, 4, 5]]), cache=bounded)
    with pytest.raises(ContextLengthError):
        fast.decode_rows([6], [bounded])


@pytest.mark.parametrize(
    "lengths, dealt",
    [
        ((70, 50, 45), True),
        ((40, 40, 40, 40), True),
        ((127, 127, 127), True),  # the middle chunk cut in two, a piece on each core
        ((230,), True),  # one chunk cut in two
        ((150, 20), False),
        ((30, 20), False),
    ],
)
def test_prompt_chunks_a_core_each_fill_their_caches(model, lengths, dealt, monkeypatch):
    """Several prompt chunks in one step go a core each through every block when they
    come out even (at least 128 tokens, parts within a third of each other), or cut into
    parts of about equal length (a chunk's pieces on different cores, the later piece
    waiting at each layer for the earlier one's keys); each cache ends as the MLX path's
    prefill of that prompt leaves it. The last block computes only the chunks' keys and
    values: one feed-forward fewer than there are blocks."""
    if fastpath._cores() < 2:
        pytest.skip("one core: nothing to deal out")
    cores, glus = [], []
    real_each, real_glu = fastpath._each_core, fastpath._glu
    monkeypatch.setattr(fastpath, "_each_core", lambda fn, n: (cores.append(n), real_each(fn, n)))
    monkeypatch.setattr(fastpath, "_glu", lambda h: (glus.append(len(h)), real_glu(h))[1])
    rng = np.random.default_rng(5)
    fast = CpuDecoder(model)
    prompts = [rng.integers(0, model.args.vocab_size, n).tolist() for n in lengths]
    caches = [model.make_cache() for _ in prompts]
    assert fast.decode_rows([], [], list(zip(prompts, caches, strict=True))) is not None
    assert bool(cores) == dealt
    assert sum(glus) == sum(lengths) * (len(model.layers) - 1)
    for p, c in zip(prompts, caches, strict=True):
        plain = model.make_cache()
        model(mx.array(p)[None], cache=plain)
        assert [x.offset for x in c] == [len(p)] * len(c)
        for a, b in zip(c, plain, strict=True):
            assert rel_err(a.state[0], b.state[0]) < 1e-5
            assert rel_err(a.state[1], b.state[1]) < 1e-5


@pytest.mark.parametrize(
    "lengths, parts",
    [
        ([127], None),  # too short to be worth two cores
        ([40, 40, 40], None),
        ([70, 50, 45], [[(0, 0, 70)], [(1, 0, 50), (2, 0, 45)]]),  # whole chunks: even
        ([255], [[(0, 0, 128)], [(0, 128, 255)]]),
        # the piece the next part waits for first, the piece that waits last
        ([127, 127, 127], [[(1, 0, 63), (0, 0, 127)], [(2, 0, 127), (1, 63, 127)]]),
        ([300, 20], [[(0, 0, 160)], [(1, 0, 20), (0, 160, 300)]]),
        ([120, 100, 5], [[(0, 0, 120)], [(1, 0, 100), (2, 0, 5)]]),  # no piece under 16
        ([150, 20], None),  # 85 a part: too few
    ],
)
def test_chunks_are_dealt_whole_or_cut_into_even_parts(lengths, parts, monkeypatch):
    monkeypatch.setattr(fastpath, "_cores", lambda: 2)
    assert fastpath._deal(lengths) == parts


def test_a_piece_that_fails_never_leaves_the_other_waiting(model, monkeypatch):
    """The chunk's first piece fails at its second layer: the other piece, waiting for
    its keys there, goes on and finds them missing; the step raises, in seconds."""
    import threading

    if fastpath._cores() < 2:
        pytest.skip("one core: nothing to deal out")
    real = fastpath._linked_append
    calls = []

    def failing(cache, k, v, link, layer):
        calls.append((link is not None and link.before is None, layer))
        if link is not None and link.before is None and layer == 1:
            raise MemoryError("out of memory")
        return real(cache, k, v, link, layer)

    monkeypatch.setattr(fastpath, "_linked_append", failing)
    fast = CpuDecoder(model)
    ids = np.random.default_rng(4).integers(0, model.args.vocab_size, 230).tolist()
    errors = []

    def run() -> None:
        try:
            fast.feed(ids, model.make_cache())
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the step hangs"
    assert len(errors) == 1 and isinstance(errors[0], MemoryError | RuntimeError)
    assert (False, 1) in calls  # the waiting piece got as far as the failed layer


@pytest.mark.parametrize(
    "lengths, now",
    [
        ([128], 1),  # one chunk: all there is
        ([128, 128], 2),
        ([128, 128, 128], 3),  # three on two cores: the middle one cut in two
        ([128, 20, 20], 3),  # uneven, too few tokens to cut: all in one pass
        ([128, 64, 64], 3),  # dealt [128 | 64 + 64]: even
        ([128, 128, 128, 128, 128], 5),  # dealt [3 | 2]: within a third
        ([40, 40, 40], 3),  # too few tokens to deal out at all: all in one pass
    ],
)
def test_a_step_takes_the_chunks_that_go_a_core_each(model, lengths, now, monkeypatch):
    """Where the chunks of a step would not go a core each but fewer would, the step takes
    those (the others wait for the next step); otherwise it takes them all. Fresh caches,
    no room made yet: the lengths decide (the step makes the room)."""
    from elm_mlx.generation.batch import chunks_per_step

    monkeypatch.setattr(fastpath, "_cores", lambda: 2)
    fast = CpuDecoder(model)
    rng = np.random.default_rng(7)
    prompts = [(rng.integers(0, model.args.vocab_size, n).tolist(), model.make_cache())
               for n in lengths]  # fmt: skip
    assert chunks_per_step(fast, prompts) == now
    assert chunks_per_step(model, prompts) == len(lengths)  # MLX's path: all of them


def test_a_prompt_fed_alone_skips_the_last_blocks_output(model, monkeypatch):
    """`feed` (generate's prefill) fills the cache as the model's forward pass does and
    computes no output for the last block; a cache numpy cannot write is left alone."""
    glus = []
    real_glu = fastpath._glu
    monkeypatch.setattr(fastpath, "_glu", lambda h: (glus.append(len(h)), real_glu(h))[1])
    fast = CpuDecoder(model)
    ids = np.random.default_rng(6).integers(0, model.args.vocab_size, 37).tolist()
    cache, plain = model.make_cache(), model.make_cache()
    assert fast.feed(ids, cache)
    model(mx.array(ids)[None], cache=plain)
    assert glus == [37] * (len(model.layers) - 1)
    for a, b in zip(cache, plain, strict=True):
        assert rel_err(a.state[0], b.state[0]) < 1e-5
        assert rel_err(a.state[1], b.state[1]) < 1e-5
    window = [RotatingKVCache(max_size=16, keep=4) for _ in model.layers]
    assert not fast.feed(ids, window)
    assert all(c.offset == 0 for c in window)
