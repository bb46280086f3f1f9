"""The server's parts in-process: batched decoding against a plain forward pass, the prompt
cache, the Instruct chat template, queue limits and the install hint."""

from __future__ import annotations

import json
import math
import shutil
import time

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("starlette")

from elm_mlx.generation.batch import decode_step  # noqa: E402
from elm_mlx.runtime.fastpath import CpuDecoder  # noqa: E402
from elm_mlx.serve.prompt_cache import PromptCache  # noqa: E402


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory, sp_model_file):
    """A tiny random checkpoint named like an Instruct model (its layers differ in shape)."""
    from elm_mlx.testing import random_weights, tiny_args, write_hf_checkpoint

    args = tiny_args(vocab_size=384, tied=False)
    weights = random_weights(args, 3)
    weights["lm_head.weight"] *= 5  # sharper logits: no near ties for greedy decoding
    path = write_hf_checkpoint(tmp_path_factory.mktemp("m") / "tiny-Instruct", args, weights)
    shutil.copyfile(sp_model_file, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def loaded(instruct_dir):
    from elm_mlx.generation.loading import load_for_generation

    model, tokenizer, _ = load_for_generation(instruct_dir)
    return model, tokenizer


def _prefilled(model, prompts):
    caches = []
    for p in prompts:
        c = model.make_cache()
        model(mx.array(p[:-1])[None], cache=c)
        mx.eval([x.state for x in c])
        caches.append(c)
    return caches


@pytest.mark.parametrize("fast", [True, False])
def test_decode_step_rows_of_different_lengths_match_a_plain_forward(loaded, fast):
    model = loaded[0]
    raw = getattr(model, "model", model)
    stepper = model if fast else raw
    assert isinstance(stepper, CpuDecoder) == (fast and raw is not model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 384, n).tolist() for n in (5, 17, 2, 40)]
    caches = _prefilled(stepper, prompts)
    tokens = [p[-1] for p in prompts]
    for _ in range(3):
        logits = decode_step(stepper, tokens, caches)  # (B, vocab)
        for b, p in enumerate(prompts):
            ref = raw(mx.array(p)[None])[0, -1]  # no cache at all
            np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(ref), atol=2e-4)
        tokens = mx.argmax(logits, axis=-1).tolist()
        for p, t in zip(prompts, tokens, strict=True):
            p.append(t)


@pytest.mark.parametrize("fast", [True, False])
def test_a_prompt_chunk_in_the_decode_step_fills_its_cache_as_a_prefill_does(loaded, fast):
    """A prompt chunk riding along with the rows' step leaves its caches as a prefill of
    that chunk would, and the rows' logits are unchanged by it."""
    model = loaded[0]
    raw = getattr(model, "model", model)
    stepper = model if fast else raw
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 384, n).tolist() for n in (6, 30)]
    caches = _prefilled(stepper, prompts)
    long = rng.integers(3, 384, 21).tolist()
    riding = stepper.make_cache()
    for lo in range(0, 20, 8):  # chunks of 8, 8 and 4, each in a step of the rows
        chunk = (long[lo : min(lo + 8, 20)], riding)
        logits = decode_step(stepper, [p[-1] for p in prompts], caches, [chunk])
        for b, p in enumerate(prompts):
            ref = raw(mx.array(p)[None])[0, -1]
            np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(ref), atol=2e-4)
        for p, t in zip(prompts, mx.argmax(logits, axis=-1).tolist(), strict=True):
            p.append(t)
    assert all(c.offset == 20 for c in riding)
    logits = decode_step(stepper, [long[-1]], [riding])
    ref = raw(mx.array(long)[None])[0, -1]
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(ref), atol=2e-4)


@pytest.mark.parametrize("fast", [True, False])
def test_prompt_chunks_alone_in_one_step_fill_their_caches(loaded, fast, monkeypatch):
    """Chunks of several prompts in one step with no row decoding: each cache ends as its
    own prefill leaves it (the next token's logits agree with a plain forward). On the CPU
    fast path the chunks' attention is shared out over the cores, a chunk each."""
    from elm_mlx.runtime import fastpath

    shared, real = [], fastpath._parallel
    monkeypatch.setattr(fastpath, "_parallel", lambda fn, n: (shared.append(n), real(fn, n)))
    model = loaded[0]
    raw = getattr(model, "model", model)
    stepper = model if fast else raw
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 384, n).tolist() for n in (9, 3, 25)]
    caches = [stepper.make_cache() for _ in prompts]
    chunks = [(p[:-1], c) for p, c in zip(prompts, caches, strict=True)]
    logits = decode_step(stepper, [], [], chunks)
    assert logits.shape == (0, raw.args.vocab_size)
    assert (len(prompts) in shared) == fast  # every layer's three chunks, on both cores
    logits = decode_step(stepper, [p[-1] for p in prompts], caches)
    for b, p in enumerate(prompts):
        ref = raw(mx.array(p)[None])[0, -1]
        np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(ref), atol=2e-4)
    with pytest.raises(ValueError, match="at least one"):
        decode_step(stepper, [], [])


def test_running_rows_keep_decoding_while_a_long_prompt_prefills(loaded, monkeypatch):
    """A prompt cut into chunks goes through the running row's forward passes, one chunk a
    step, each prompt token once; both get the text `generate` gives them alone."""
    import threading

    import elm_mlx.serve.engine as engine_mod
    from elm_mlx.generation.batch import generate_many
    from elm_mlx.generation.generate import generate
    from elm_mlx.serve.engine import Engine, Finished, Job, RowSettings, Token

    model, tokenizer = loaded
    calls, real = [], engine_mod.decode_step

    def recorded(model, tokens, caches, prompts=()):
        calls.append((len(tokens), [len(ids) for ids, _ in prompts]))
        return real(model, tokens, caches, prompts)

    monkeypatch.setattr(engine_mod, "decode_step", recorded)
    engine = Engine(model, tokenizer, prefill_step=4)
    events, done = [], threading.Semaphore(0)

    def emit(name):
        def put(event):
            events.append((name, event))
            if isinstance(event, Finished):
                done.release()

        return put

    short = tokenizer.encode("hello")
    long = tokenizer.encode("Once upon a time there was a tiny model that read long prompts")
    settings = RowSettings(max_tokens=150, temp=0.0, logit_bias={tokenizer.eos_id: -100.0})
    engine.start()
    try:
        engine.submit(Job(short, settings, emit("short")))
        _until(lambda: any(name == "short" for name, _ in events))
        engine.submit(Job(long, RowSettings(max_tokens=5, temp=0.0), emit("long")))
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
        _until(lambda: engine.slab.in_use == 0)  # both rows' slots handed back
    finally:
        engine.close(0)
        engine.join(10)
    riding = [chunks for rows, chunks in calls if rows and chunks]  # the long prompt's steps
    assert len(riding) == -(-(len(long) - 1) // 4)  # one chunk of at most 4 tokens a step
    assert all(len(c) == 1 and c[0] <= 4 for c in riding)
    assert sum(c[0] for c in riding) == len(long) - 1  # the last token goes with the rows
    text = {n: "".join(e.text for m, e in events if m == n and isinstance(e, Token))
            for n in ("short", "long")}  # fmt: skip
    assert text["short"] == generate_many(model, tokenizer, [short], [settings])[0]  # with the bias
    assert text["long"] == generate(model, tokenizer, long, max_tokens=5, temp=0.0)


def test_a_prompt_with_nothing_to_prefill_starts_before_chunks_ahead_of_it(loaded):
    """A one-token prompt waiting behind a long one starts running at the next step; the
    step's budget goes to whole chunks in order, at least one."""
    from elm_mlx.serve.engine import Engine, Job, RowSettings, _Row

    model, tokenizer = loaded
    engine = Engine(model, tokenizer, prefill_step=4)  # not started: its steps by hand
    settings = RowSettings(max_tokens=3, temp=0.0)
    long, one, mid = ([5] * n for n in (20, 1, 3))
    rows = [_Row(Job(p, settings, lambda e: None), engine) for p in (long, one, mid)]
    engine._prefilling = list(rows)
    chunks = engine._next_chunks()
    assert engine._running == [rows[1]] and engine._prefilling == [rows[0], rows[2]]
    assert chunks == [(rows[0], 0, 4)]  # the budget is spent
    engine.prefill_step = 6
    assert engine._next_chunks() == [(rows[0], 0, 6)]
    engine.prefill_step = 30
    assert engine._next_chunks() == [(rows[0], 0, 19), (rows[2], 0, 2)]


def test_slots_come_back_from_a_prompt_too_long_and_from_a_shutdown(loaded):
    """A request whose prompt does not fit the context, and rows ended when the grace period
    is over, hand their slab slots back."""
    from elm_mlx.serve.engine import Engine, Failed, Finished, Job, RowSettings

    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=3)  # not started: its steps by hand
    events = []
    too_long = [5] * (model.args.max_context_length + 1)
    fits = [Job([5] * n, RowSettings(max_tokens=3, temp=0.0), events.append) for n in (4, 9)]
    engine._step([Job(too_long, RowSettings(max_tokens=1), events.append), *fits])
    assert isinstance(events[0], Failed) and events[0].status == 400
    assert engine.slab.in_use == 2  # the two that fit hold theirs
    engine._end_all()
    assert engine.slab.in_use == 0
    assert sum(isinstance(e, Finished) for e in events) == 2


def test_a_job_ends_once():
    """A job's Finished or Failed is its last event: a failure after it is not sent."""
    from elm_mlx.serve.engine import Failed, Finished, Job, RowSettings

    sent = []
    job = Job([1, 2], RowSettings(), sent.append)
    job.end(Finished("stop", 2, 1, 0))
    job.end(Failed("internal error while generating; see the server log"))
    assert [type(e) for e in sent] == [Finished] and job.ended


def test_prompt_cache_longest_prefix_lru_and_independent_copies(loaded):
    model = loaded[0]
    raw = getattr(model, "model", model)
    a, b = list(range(3, 23)), list(range(3, 13)) + list(range(50, 60))
    ca, cb = _prefilled(raw, [a + [0], b + [0]])
    cache = PromptCache(max_bytes=10**9)
    cache.store(a, ca)
    cache.store(b, cb)
    got, n = cache.fetch(a[:15] + [99, 98], raw.make_cache)
    assert n == 15 and got[0].offset == 15
    kept = np.asarray(ca[2].state[0][..., :15, :])
    np.testing.assert_array_equal(np.asarray(got[2].state[0]), kept)
    raw(mx.array([[7, 8, 9]]), cache=got)  # writing to the copy...
    mx.eval([c.state for c in got])
    again, n = cache.fetch(a + [1], raw.make_cache)  # ...leaves the kept entry as it was
    assert n == 20
    np.testing.assert_array_equal(np.asarray(again[1].state[1]), np.asarray(ca[1].state[1]))
    assert cache.fetch(a, raw.make_cache)[1] == 19  # the last token is always computed
    assert cache.fetch([200, 201], raw.make_cache) == (None, 0)
    assert cache.fetch([3, 200, 201], raw.make_cache) == (None, 0)  # one token: not worth it
    # a longer sequence supersedes its prefix; the byte bound evicts least recently used
    (cc,) = _prefilled(raw, [a + [5, 6, 0]])
    cache.store(a + [5, 6], cc)
    assert len(cache) == 2
    small = PromptCache(max_bytes=sum(c.nbytes for c in cc) + 1)
    small.store(a, ca)
    small.store(b, cb)
    assert len(small) == 1 and small.fetch(b + [1], raw.make_cache)[1] == len(b)
    assert PromptCache(0).store(a, ca) is None and len(PromptCache(0)) == 0


def test_prompt_cache_copies_a_prefix_into_a_slab_slot(loaded):
    """A kept prefix fetched into a slot of the rows' slab (numpy copies it in) holds the
    kept keys and values; the slot's later writes never reach the kept entry."""
    from elm_mlx.runtime.slab import RowSlab, SlotCache

    raw = getattr(loaded[0], "model", loaded[0])
    a = list(range(3, 23))
    (ca,) = _prefilled(raw, [a + [0]])
    cache = PromptCache(max_bytes=10**9)
    cache.store(a, ca)
    slab = RowSlab.for_model(raw, 2)
    slab.take()  # slot 0 taken: the copy goes to slot 1
    got, n = cache.fetch(a[:12] + [99], slab.take)
    assert n == 12 and isinstance(got[0], SlotCache) and got[0].slot == 1
    for c, kept in zip(got, ca, strict=True):
        assert c.offset == 12
        for mine, theirs in zip(c.state, kept.state, strict=True):
            np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs)[..., :12, :])
    before = np.array(ca[0].state[0])
    np.asarray(got[0].keys)[...] = 7.0  # the slot's own memory
    np.testing.assert_array_equal(np.asarray(ca[0].state[0]), before)


def _token_caches(n: int) -> list:
    from elm_mlx.model.cache import KVCache

    c = KVCache()
    c.state = [mx.zeros((1, 1, n, 2)), mx.zeros((1, 1, n, 2))]
    return [c]


def test_prompt_cache_finds_the_longest_prefix_among_many_entries():
    """Every entry is compared at once: the longest shared prefix as a one-by-one
    comparison finds it, and prefixes of a stored sequence go."""
    from elm_mlx.model.cache import KVCache

    rng = np.random.default_rng(0)
    cache, kept = PromptCache(max_bytes=10**9), []
    for _ in range(60):
        tokens = [1] + rng.integers(2, 5, rng.integers(1, 12)).tolist()  # many shared prefixes
        cache.store(tokens, _token_caches(len(tokens)))
        kept = [k for k in kept if k != tokens[: len(k)]] + [tokens]
    assert len(cache) == len(kept)
    for _ in range(50):
        prompt = [1] + rng.integers(2, 5, rng.integers(1, 14)).tolist()
        shared = [_shared(k, prompt) for k in kept]
        want = min(max(shared), len(prompt) - 1)
        got, n = cache.fetch(prompt, lambda: [KVCache()])
        assert n == (want if want >= PromptCache.MIN_REUSE else 0)  # a lone BOS: not kept
        if n:
            assert got[0].offset == n


def test_prompt_cache_evicts_least_recently_used_and_packs_its_table():
    """A byte bound some hundred entries wide, a thousand stores: what is kept, evicted
    and found follows a one-by-one model of the LRU through every change (the table's
    blanked rows packed away again and again, its rows widened past 256 tokens). Of
    equally long prefixes, the entry kept first is taken."""
    from elm_mlx.model.cache import KVCache

    size = sum(c.nbytes for c in _token_caches(1))  # bytes a token
    rng = np.random.default_rng(1)
    cache = PromptCache(max_bytes=700 * size)
    kept, born = [], {}  # tokens, least recently used first; when each was stored
    for i in range(1000):
        length = int(rng.integers(1, 8) if i % 100 else rng.integers(250, 300))
        if kept and rng.random() < 0.3:  # a continuation of a kept sequence
            tokens = kept[rng.integers(len(kept))] + rng.integers(2, 6, length).tolist()
        else:
            tokens = [1] + rng.integers(2, 6, length).tolist()
        prompt = tokens + [7]
        shared = [_shared(k, prompt) for k in kept]
        want = min(max(shared, default=0), len(prompt) - 1)
        got, n = cache.fetch(prompt, lambda: [KVCache()])
        assert n == (want if want >= PromptCache.MIN_REUSE else 0)
        if n:  # of the longest, the first kept is now the most recently used
            used = min((k for k, m in zip(kept, shared, strict=True) if m == max(shared)),
                       key=lambda k: born[tuple(k)])  # fmt: skip
            assert got[0].offset == n
            kept.remove(used)
            kept.append(used)
        cache.store(tokens, _token_caches(len(tokens)))
        kept = [k for k in kept if k != tokens[: len(k)]] + [tokens]
        born[tuple(tokens)] = i
        while sum(len(k) for k in kept) * size > cache.max_bytes:
            kept.pop(0)
        assert len(cache) == len(kept)
        assert cache.nbytes == sum(len(k) for k in kept) * size


def _shared(a: list, b: list) -> int:
    """How many leading tokens `a` and `b` share, one by one."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture
def app_client(loaded, instruct_dir):
    from starlette.testclient import TestClient

    from elm_mlx.serve.app import ServerConfig, create_app
    from elm_mlx.serve.engine import Engine

    def make(start: bool = True, **engine_kw):
        model, tokenizer = loaded
        engine = Engine(model, tokenizer, **engine_kw)
        config = ServerConfig(model_id="tiny-Instruct", chat_template=True)
        if start:
            engine.start()
        engines.append(engine)
        return TestClient(create_app(engine, tokenizer, config)), engine

    engines = []
    yield make
    for e in engines:
        e.close(0)
        e.join(10)


def test_instruct_chat_template_and_greedy_equal_generate(app_client, loaded):
    from elm_mlx.generation.generate import generate

    model, tokenizer = loaded
    client, _ = app_client(max_batch=4, prompt_cache_bytes=2**24)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Explain unified memory."},
    ]
    body = {"model": "tiny-Instruct", "messages": messages, "max_tokens": 12, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    text = tokenizer.apply_chat_template(messages)
    assert r.json()["usage"]["prompt_tokens"] == len(tokenizer.encode(text))
    expected = generate(model, tokenizer, text, max_tokens=12, temp=0.0)
    assert r.json()["choices"][0]["message"]["content"] == expected


def test_queue_full_and_shutting_down_are_503_with_retry_after(app_client, loaded):
    from elm_mlx.serve.engine import Job, QueueFull, RowSettings

    # not started: what is submitted stays where it is
    client, engine = app_client(start=False, max_batch=2, max_queue=1)
    prompt = loaded[1].encode("hello")
    for _ in range(3):  # the batch's two rows and the one place in the queue
        engine.submit(Job(prompt, RowSettings(max_tokens=2), lambda event: None))
    with pytest.raises(QueueFull, match="1 requests are already waiting"):
        engine.submit(Job(prompt, RowSettings(max_tokens=2), lambda event: None))
    body = {"model": "tiny-Instruct", "prompt": "hello", "max_tokens": 2}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "busy" in r.json()["error"]["message"]
    engine.close(0)
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    assert client.get("/health").status_code == 503


def test_no_queue_still_serves_while_the_batch_has_room(app_client):
    client, _ = app_client(max_batch=2, max_queue=0)
    body = {"model": "tiny-Instruct", "prompt": "hello", "max_tokens": 2}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text


def test_a_prompt_too_long_to_fit_is_refused_before_it_is_tokenized(app_client, monkeypatch):
    client, _ = app_client()
    tokenizer = client.app.app.routes[0].endpoint.__self__.tokenizer
    encode = tokenizer.encode

    def guarded(text, *args, **kwargs):
        assert len(text) < 100_000, "a megabyte prompt was tokenized"
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", guarded)
    body = {"model": "tiny-Instruct", "prompt": "To be, or not " * 100_000, "max_tokens": 2}
    r = client.post("/v1/completions", json=body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded", r.text
    assert "1,400,000 characters" in error["message"] and error["param"] == "prompt"
    messages = [{"role": "user", "content": "x" * 500_000}]
    body = {"model": "tiny-Instruct", "messages": messages, "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=body).json()["error"]["param"] == "messages"
    body = {"model": "tiny-Instruct", "prompt": "To be, or not", "max_tokens": 2}
    assert client.post("/v1/completions", json=body).status_code == 200  # tokenized as before


def test_a_logprob_json_cannot_carry_is_openais_floor(loaded):
    from elm_mlx.serve.engine import UNLIKELY, Engine

    engine = Engine(*loaded, max_batch=1)
    for value in (-math.inf, math.nan):
        assert engine._logprob(5, value).logprob == UNLIKELY == -9999.0
    assert engine._logprob(5, -1.5).logprob == -1.5


def test_the_apps_context_limit_is_the_models(app_client, loaded):
    model, tokenizer = loaded
    client, _ = app_client()  # nothing but the model says how long its context is
    context, n = model.args.max_context_length, len(tokenizer.encode("hello"))
    assert context != 2048  # not the default of ModelArgs
    body = {"model": "tiny-Instruct", "prompt": "hello", "max_tokens": context - n + 1}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert f"has {n} tokens" in r.text and f"{context + 1} in all" in r.text
    assert f"{context}-token context" in r.text
    body = {"model": "tiny-Instruct", "prompt": [5] * context}  # no room for one token
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and f"context is {context} tokens" in r.text


def test_missing_web_stack_names_the_extra(monkeypatch):
    from elm_mlx.cli import serve
    from elm_mlx.cli.common import CliError

    for name in ("elm_mlx.serve.app", "elm_mlx.serve.server", "starlette", "uvicorn"):
        monkeypatch.setitem(__import__("sys").modules, name, None)
    with pytest.raises(CliError, match=r"pip install 'elm-mlx\[serve\]'"):
        serve._server_modules()


def test_decode_step_on_a_quantized_model_takes_mlx_and_matches_its_forward():
    from elm_mlx.formats.modeldir import default_model_path, load
    from elm_mlx.quant.quantize import QuantizeSpec, quantize_model
    from elm_mlx.runtime.fastpath import fast_decoder

    model, _ = load(default_model_path())  # the nano model: every width a multiple of 32
    quantize_model(model, QuantizeSpec(bits=8, group_size=32))
    assert fast_decoder(model) is model and not isinstance(model, CpuDecoder)  # MLX's kernels
    prompts = [[5, 9, 40, 7], [3, 200, 100, 12, 13, 14, 15, 99, 1]]
    logits = decode_step(model, [p[-1] for p in prompts], _prefilled(model, prompts))
    for b, p in enumerate(prompts):
        ref = model(mx.array(p)[None])[0, -1]
        np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(ref), atol=2e-4)


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "q8"])
def test_the_engine_thread_serves_lazily_loaded_models_the_numpy_path_does_not_take(kind):
    """Half-precision and quantized weights, loaded lazily on this thread, decode on the
    engine's own thread (MLX ties a lazy array to the stream of the thread that made it):
    greedy text equal to `generate` on this thread."""
    import queue

    from elm_mlx.generation.generate import generate
    from elm_mlx.generation.loading import load_for_generation
    from elm_mlx.quant.quantize import QuantizeSpec, quantize_model
    from elm_mlx.serve.engine import Engine, Failed, Finished, Job, RowSettings

    model, tokenizer, _ = load_for_generation(None, dtype="float32" if kind == "q8" else kind)
    if kind == "q8":
        quantize_model(model.model if isinstance(model, CpuDecoder) else model,
                       QuantizeSpec(bits=8, group_size=32))  # fmt: skip
        model = model.model if isinstance(model, CpuDecoder) else model
    assert not isinstance(model, CpuDecoder)  # MLX's kernels, on the engine's thread
    prompt = tokenizer.encode("To be, or not to be")
    settings = RowSettings(max_tokens=6, temp=0.0)
    engine = Engine(model, tokenizer)
    engine.start()
    try:
        events = queue.Queue()
        engine.submit(Job(prompt, settings, events.put))
        tokens = []
        while not isinstance(event := events.get(timeout=120), Finished | Failed):
            tokens.append(event.text)
        assert isinstance(event, Finished), event
    finally:
        engine.close(grace=0)
        engine.join(30)
    assert "".join(tokens) == generate(model, tokenizer, prompt, settings=settings)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(app_client, monkeypatch):
    import elm_mlx.serve.engine as engine_mod

    client, engine = app_client()
    body = {"model": "tiny-Instruct", "prompt": "hello", "max_tokens": 3}
    real = engine_mod.decode_step

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine_mod, "decode_step", broken)
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 500 and "Traceback" not in r.text
    assert r.json()["error"]["type"] == "server_error"
    assert engine.slab.in_use == 0  # the failed rows' slots are free again
    monkeypatch.setattr(engine_mod, "decode_step", real)
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_a_client_that_leaves_mid_stream_has_its_row_dropped(loaded, monkeypatch):
    """Over real HTTP (uvicorn in a thread): once the leaving client's row has its first token,
    decoding waits until the server has seen the client go, so the row cannot finish first
    however busy the machine. It is dropped at the next step and counted once; a request sent
    with it gets what `generate` gives it alone."""
    import socket
    import threading

    import httpx
    import uvicorn

    import elm_mlx.serve.engine as engine_mod
    from elm_mlx.generation.generate import generate
    from elm_mlx.serve.app import ServerConfig, create_app
    from elm_mlx.serve.engine import Engine, Job

    model, tokenizer = loaded
    long, tokens, left = 200, [], threading.Event()
    real_init, real_cancel, real_step = Job.__init__, Job.cancel, engine_mod.decode_step

    def init(job, prompt, settings, emit):  # count the leaving request's tokens
        def counted(event):
            if isinstance(event, engine_mod.Token):
                tokens.append(event)
            emit(event)

        real_init(job, prompt, settings, counted if settings.max_tokens == long else emit)

    def cancel(job):
        real_cancel(job)
        if job.settings.max_tokens == long:
            left.set()

    def gated(*args):
        if tokens and not left.wait(60):
            raise AssertionError("the server never saw the client go")
        return real_step(*args)

    monkeypatch.setattr(Job, "__init__", init)
    monkeypatch.setattr(Job, "cancel", cancel)
    monkeypatch.setattr(engine_mod, "decode_step", gated)
    engine = Engine(model, tokenizer)
    config = ServerConfig(model_id="tiny-Instruct")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(
        uvicorn.Config(create_app(engine, tokenizer, config), host="127.0.0.1", port=port,
                       log_level="warning", lifespan="off")
    )  # fmt: skip
    engine.start()
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        _until(lambda: uv.started or not thread.is_alive())
        assert uv.started, "uvicorn did not start"
        url = f"http://127.0.0.1:{port}/v1/completions"
        no_eos = {str(tokenizer.eos_id): -100}  # the row could only end by the client going
        beside = {"model": "tiny-Instruct", "prompt": "hello", "max_tokens": 6, "temperature": 0}
        result = {}
        other = threading.Thread(
            target=lambda: result.update(httpx.post(url, json=beside, timeout=60).json())
        )
        other.start()
        body = {"model": "tiny-Instruct", "prompt": "Once upon a time", "max_tokens": long,
                "temperature": 0, "stream": True, "logit_bias": no_eos}  # fmt: skip
        with httpx.stream("POST", url, json=body) as r:
            lines = r.iter_lines()  # kept: dropping it would close the connection now
            assert next(lines).startswith("data: ")
            _until(lambda: tokens)  # its row has begun; now the client goes
        other.join(60)
        assert left.wait(30)
        _until(lambda: not engine.stats()["running"])
        assert engine.stats()["cancelled"] == 1
        _until(lambda: engine.slab.in_use == 0)  # its slot too
        assert len(tokens) <= 2  # its first token, and the one of the step that was held
        expected = generate(model, tokenizer, "hello", max_tokens=6, temp=0.0)
        assert result["choices"][0]["text"] == expected
    finally:
        uv.should_exit = True
        thread.join(10)
        engine.close(0)
        engine.join(10)


def _until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class _FailingEngine:
    """Ends every job at once with `Failed(message, status)`: the app's side of a failure."""

    closing = False

    def __init__(self, model, message: str, status: int):
        self.model, self.message, self.status = model, message, status
        self.context = model.args.max_context_length

    def submit(self, job) -> None:
        from elm_mlx.serve.engine import Failed

        job.emit(Failed(self.message, self.status))

    def stats(self) -> dict:
        return {}


@pytest.mark.parametrize(
    "status, message, kind, code",
    [
        (400, "the prompt needs a longer context than this model has", "invalid_request_error",
         None),
        (500, "a bug while shutting down a row", "server_error", None),  # the words don't matter
        (503, "the model is being replaced", "server_error", "overloaded"),
    ],
)  # fmt: skip
def test_a_failed_job_answers_with_the_engines_status(loaded, status, message, kind, code):
    from starlette.testclient import TestClient

    from elm_mlx.serve.app import ServerConfig, create_app

    model, tokenizer = loaded
    app = create_app(_FailingEngine(model, message, status), tokenizer, ServerConfig("tiny"))
    client = TestClient(app)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == {"message": message, "type": kind, "param": None, "code": code}
    assert r.headers.get("retry-after") == ("1" if status == 503 else None)
    r = client.post("/v1/completions", json={**body, "stream": True})
    events = [json.loads(x.removeprefix("data: ")) for x in r.text.split("\n\n")[:-2]]
    assert events[-1]["error"] == {"message": message, "type": kind, "param": None, "code": code}
    assert r.text.endswith("data: [DONE]\n\n")


class _BrokenPipe:
    """stderr whose reader has gone."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


class _BrokenModel:
    """A model whose every computation fails: the engine logs a traceback and fails the job."""

    def __init__(self, model):
        self.args, self.make_cache, self.parameters = model.args, model.make_cache, model.parameters

    def __call__(self, *args, **kwargs):
        raise RuntimeError("boom")

    def __getattr__(self, name: str):
        raise RuntimeError("boom")


def test_the_engines_failures_are_logged_to_a_broken_stderr_without_stopping_it(
    loaded, monkeypatch
):
    import queue
    import sys

    from elm_mlx.serve.engine import Engine, Failed, Job, RowSettings
    from elm_mlx.serve.server import forgiving_stderr

    model, tokenizer = loaded
    monkeypatch.setattr(sys, "stderr", _BrokenPipe())
    events = queue.Queue()
    with forgiving_stderr():
        engine = Engine(_BrokenModel(model), tokenizer)
        engine.start()
        try:
            for prompt in ([5, 6, 7], [8]):  # the engine thread lives on after the first
                engine.submit(Job(prompt, RowSettings(max_tokens=3), events.put))
                assert isinstance(events.get(timeout=30), Failed)
                print("a line nobody reads", file=sys.stderr, flush=True)
        finally:
            engine.close(0)
            engine.join(10)


def test_events_queued_behind_a_write_leave_in_one_write_in_order():
    """A stream whose client reads slower than the engine writes: the tokens that queued up
    go out together, in order, each as its own server-sent event, and the stream ends."""
    import asyncio
    from types import SimpleNamespace

    from elm_mlx.serve import app as app_mod
    from elm_mlx.serve.engine import Finished, Job, RowSettings, Token

    async def run() -> list[str]:
        channel = app_mod._Channel()
        for text in ("a", "b", "", "c"):
            channel.queue.put_nowait(Token(text, 7))
        channel.queue.put_nowait(Finished("stop", 3, 4, 0))
        api = SimpleNamespace()  # _stream reads nothing of the app's own state
        fmt = app_mod._TextFormat(app_mod.ServerConfig("tiny"))
        job = Job([1], RowSettings(), channel.emit)
        stream = app_mod._Api._stream(api, job, channel, fmt, True, {})
        return [part async for part in stream]

    parts = asyncio.run(run())
    assert len(parts) == 3, parts  # the opening chunk, everything queued, [DONE]
    events = [json.loads(e[len("data: ") :]) for e in parts[1].split("\n\n") if e]
    assert [e["choices"][0]["text"] for e in events[:3]] == ["a", "b", "c"]  # "" is skipped
    assert events[3]["choices"][0]["finish_reason"] == "stop"
    assert events[4]["usage"]["completion_tokens"] == 4 and events[4]["choices"] == []
    assert parts[2] == "data: [DONE]\n\n"


@pytest.mark.parametrize("model_id", ['tiny "model" \\ é', "odd\x00name"])
@pytest.mark.parametrize("kind", ["_TextFormat", "_ChatFormat"])
def test_a_streamed_tokens_event_is_its_chunk_rendered(kind, model_id):
    """The event of a token's text, made from the chunk rendered once, is exactly the
    chunk rendered for that text, whatever the text holds (and rendered each time when
    the model's name holds the mark that stands for the text)."""
    from elm_mlx.serve import app as app_mod
    from elm_mlx.serve.engine import Token

    fmt = getattr(app_mod, kind)(app_mod.ServerConfig(model_id))
    sse = fmt.token_sse("cmpl-1", 1700000000)
    for text in ["a", " b", 'say "hi"\n', "\\", "\t\x00\x1f", "é ünï 中文 🙂", "\u2028", ""]:
        chunk = fmt.chunk("cmpl-1", token=Token(text, 5), created=1700000000)
        assert sse(text) == app_mod._sse(chunk)
        assert json.loads(sse(text)[len("data: ") :]) == chunk


def test_engine_events_reach_each_stream_in_order_with_one_wake_up_per_batch():
    """Events sent from the engine thread while the loop is busy are handed over together
    (the loop is woken once), each stream's in the order sent."""
    import asyncio
    import threading

    from elm_mlx.serve import app as app_mod

    async def run():
        loop = asyncio.get_running_loop()
        wakes, real = [], loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakes.append(a), real(*a))
        channels = [app_mod._Channel() for _ in range(3)]

        def engine():
            for i in range(50):
                for c, ch in enumerate(channels):
                    ch.emit((c, i))

        thread = threading.Thread(target=engine)
        thread.start()
        thread.join()  # the loop has not run meanwhile: one hand-over holds everything
        got = [[await ch.queue.get() for _ in range(50)] for ch in channels]
        return got, len(wakes)

    got, wakes = asyncio.run(run())
    assert got == [[(c, i) for i in range(50)] for c in range(3)]
    assert wakes == 1


def test_a_connection_that_fails_while_watched_counts_as_gone():
    """The disconnect watcher of a non-streaming request ends cleanly when receiving fails,
    and the request is answered as a client that left."""
    import asyncio
    from types import SimpleNamespace

    from elm_mlx.serve import app as app_mod

    async def broken():
        raise OSError("connection reset")

    async def run():
        channel = app_mod._Channel()
        task = asyncio.create_task(app_mod._on_disconnect(SimpleNamespace(receive=broken), channel))
        await task
        return task.exception(), channel.queue.get_nowait()

    error, event = asyncio.run(run())
    assert error is None and event is app_mod._GONE


def test_the_engine_process_queues_cancels_and_closes(instruct_dir, loaded):
    """EngineProcess, without HTTP: jobs beyond the batch wait, beyond the queue are
    refused; a cancelled job is forgotten at once (its place is free); close ends the
    running row ("length") and refuses the waiting one, and the child exits."""
    import threading

    from elm_mlx.generation.generate import generate
    from elm_mlx.serve.engine import Failed, Finished, Job, QueueFull, RowSettings, Token
    from elm_mlx.serve.worker import EngineProcess, LoadSpec

    engine = EngineProcess(LoadSpec(str(instruct_dir)), {"max_batch": 1, "max_queue": 1}, 256)
    engine.start()
    ended = {i: threading.Event() for i in range(4)}
    events: dict[int, list] = {i: [] for i in range(4)}

    def job(i: int, prompt: str, max_tokens: int) -> Job:
        def emit(event):
            events[i].append(event)
            if isinstance(event, Finished | Failed):
                ended[i].set()

        ids = loaded[1].encode(prompt)
        no_eos = {loaded[1].eos_id: -1e9}  # rows end by length or by close, never by EOS
        return Job(ids, RowSettings(max_tokens=max_tokens, logit_bias=no_eos), emit)

    try:
        quick = job(0, "hello there", 5)
        engine.submit(quick)
        assert ended[0].wait(60)
        text = "".join(e.text for e in events[0] if isinstance(e, Token))
        assert text == generate(*loaded, "hello there", settings=quick.settings)
        assert isinstance(events[0][-1], Finished) and events[0][-1].completion_tokens == 5
        running, waiting = job(1, "a", 250), job(2, "b", 250)
        engine.submit(running)
        deadline = time.monotonic() + 60
        while not events[1] and time.monotonic() < deadline:  # its row is decoding
            time.sleep(0.001)
        engine.submit(waiting)
        with pytest.raises(QueueFull):
            engine.submit(job(3, "c", 5))
        waiting.cancel()  # forgotten here at once: the queue has room again
        late = job(3, "c", 250)
        engine.submit(late)
        engine.close(0)
        assert ended[1].wait(60) and ended[3].wait(60)
        assert events[1][-1].reason == "length"
        assert isinstance(events[3][-1], Failed) and events[3][-1].status == 503
        engine.join(30)
        assert events[2] == []  # cancelled: nothing reaches a job its client has left
        assert engine.death is None and not engine._process.is_alive()
    finally:
        engine.kill()


def test_the_child_forgets_a_cancelled_job_at_once():
    """A cancelled row ends without an event: the engine process drops the job when the
    cancel arrives (it stayed in the child's table for good before), and cancels it."""
    from elm_mlx.serve import worker

    class Job:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    class Conn:
        def __init__(self, messages):
            self.messages = list(messages)

        def poll(self, timeout) -> bool:
            return True

        def recv(self):
            if not self.messages:
                raise EOFError
            return self.messages.pop(0)

        def send(self, message) -> None:
            pass

    class Engine:
        after_step = None
        alive = False

        def stats(self) -> dict:
            return {}

        def start(self) -> None:
            pass

        def close(self, grace) -> None:
            pass

        def join(self) -> None:
            pass

    child = worker._Child(Conn([("cancel", 0), ("cancel", 5)]), Engine())
    job = child.jobs[0] = Job()
    child.jobs[1] = Job()
    child.run()  # two cancels (one for a job already gone), then the parent goes away
    assert job.cancelled and set(child.jobs) == {1}
