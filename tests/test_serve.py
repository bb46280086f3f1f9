"""elm-mlx serve, live: a server on a free 127.0.0.1 port driven by the official openai client
and by raw HTTP, checked against `generate` alone and the model's own log-softmax."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The shipped nano model behind a key; yields (base url, process, stderr log path)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    cmd = [sys.executable, "-m", "elm_mlx.cli", "serve", "--port", str(port), "--api-key", KEY]
    cmd += ["--shutdown-grace", "0.3", "--max-body-mb", "0.01"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    _until_up(url, proc, log)
    yield url, proc, log
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _until_up(url: str, proc: subprocess.Popen, log=None) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{log.read_text() if log else ''}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def nano():
    from elm_mlx.generation.loading import load_for_generation

    model, tokenizer, _ = load_for_generation(None)
    return model, tokenizer


def _alone(nano, prompt, max_tokens: int, **kw) -> str:
    from elm_mlx.generation.generate import generate

    return generate(*nano, prompt, max_tokens=max_tokens, temp=0.0, **kw)


def _post(server, path: str, body, *, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(server[0] + path, json=body, headers=headers, timeout=60, **kw)
    return httpx.post(server[0] + path, content=body, headers=headers, timeout=60, **kw)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ---- endpoints and bodies ---------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["nano"]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"  # no key needed


def test_completion_equals_generate_alone(client, nano):
    r = client.completions.create(model="nano", prompt="ROMEO:", max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == _alone(nano, "ROMEO:", 24)
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(nano[1].encode("ROMEO:"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 24)
    assert r.usage.total_tokens == n_prompt + 24


def test_completion_from_token_ids(client, nano):
    ids = nano[1].encode("KING HENRY:")
    r = client.completions.create(model="nano", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == _alone(nano, ids, 12)


def test_chat_base_model_is_plain_concatenation(client, nano):
    messages = [
        {"role": "system", "content": "A scene."},
        {"role": "user", "content": "HAMLET:"},
    ]
    r = client.chat.completions.create(
        model="nano", messages=messages, max_tokens=16, temperature=0
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _alone(nano, "A scene.\nHAMLET:", 16)


def test_chat_stream(server, client, nano):
    chunks = list(
        client.chat.completions.create(
            model="nano",
            messages=[{"role": "user", "content": "JULIET:"}],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _alone(nano, "JULIET:", 16)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    # the wire format ends with [DONE]
    body = {"model": "nano", "prompt": "A", "max_tokens": 3, "stream": True}
    lines = _post(server, "/v1/completions", body).text.strip().split("\n\n")
    assert lines[-1] == "data: [DONE]"
    objects = {json.loads(x.removeprefix("data: "))["object"] for x in lines[:-1]}
    assert objects == {"text_completion"}


def test_stop_strings(client, nano):
    full = _alone(nano, "ROMEO:", 30)
    stop = full[8:11]
    assert stop.strip(), full
    r = client.completions.create(
        model="nano", prompt="ROMEO:", max_tokens=30, temperature=0, stop=[stop, "zzzz"]
    )
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs_are_the_models_log_softmax(client, nano):
    import mlx.core as mx

    from elm_mlx.generation.generate import generate_step

    model, tokenizer = nano
    prompt = tokenizer.encode("MERCUTIO:")
    ids = [t for t, _ in generate_step(prompt, model, max_tokens=8)]
    r = client.chat.completions.create(
        model="nano",
        messages=[{"role": "user", "content": "MERCUTIO:"}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    raw = getattr(model, "model", model)  # the MLX model, not the numpy decoding path
    logits = raw(mx.array(prompt + ids)[None])[0, len(prompt) - 1 : -1]  # (8, vocab)
    ref = (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()
    for i, (entry, token) in enumerate(zip(content, ids, strict=True)):
        assert entry.logprob == pytest.approx(ref[i][token], abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(max(ref[i]), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the top one
    c = client.completions.create(
        model="nano", prompt=prompt, max_tokens=8, temperature=0, logprobs=2
    )
    assert c.choices[0].logprobs.token_logprobs == pytest.approx(
        [ref[i][t] for i, t in enumerate(ids)], abs=1e-4
    )


def test_logit_bias_and_repetition_penalty(client, nano):
    tokenizer = nano[1]
    forced = tokenizer.encode(" the", bos=False)[-1]
    r = client.completions.create(
        model="nano", prompt="ROMEO:", max_tokens=5, temperature=0, logit_bias={str(forced): 100}
    )
    assert r.choices[0].text == tokenizer.decode([forced] * 5)
    r = client.completions.create(
        model="nano",
        prompt="ROMEO:",
        max_tokens=30,
        temperature=0,
        extra_body={"repetition_penalty": 1.5},  # an extension: not among the client's fields
    )
    assert r.choices[0].text == _alone(nano, "ROMEO:", 30, repetition_penalty=1.5)
    assert r.choices[0].text != _alone(nano, "ROMEO:", 30)


def test_seed_reproducible(client):
    def draw(seed):
        r = client.completions.create(
            model="nano", prompt="ROMEO:", max_tokens=16, temperature=1.0, seed=seed
        )
        return r.choices[0].text

    assert draw(7) == draw(7)
    assert len({draw(s) for s in (1, 2, 3)}) > 1


# ---- errors -----------------------------------------------------------------------


def test_client_sees_typed_errors(client):
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.chat.completions.create(model="gpt-4", messages=user)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="nano", messages=user, n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="nano", messages=user, temperature=5)
    with pytest.raises(openai.BadRequestError, match=r"(?s)1000.*256"):
        client.chat.completions.create(model="nano", messages=user, max_tokens=1000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def test_raw_bad_requests(server):
    chat = "/v1/chat/completions"
    assert "JSON" in _error(_post(server, chat, b"{not json"), 400)["message"]
    assert "object" in _error(_post(server, chat, [1, 2]), 400)["message"]
    e = _error(_post(server, chat, {"model": "nano", "messages": "hi"}), 400)
    assert e["param"] == "messages"
    e = _error(_post(server, chat, {"model": "nano", "messages": [], "max_tokens": 5}), 400)
    assert e["param"] == "messages"
    body = {"model": "nano", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}
    assert _error(_post(server, chat, body), 400)["param"] == "max_tokens"
    body = {"model": "nano", "prompt": "x", "top_p": 0}
    assert _error(_post(server, "/v1/completions", body), 400)["param"] == "top_p"
    body = {"model": "nano", "prompt": [1, 99999]}
    assert "vocabulary" in _error(_post(server, "/v1/completions", body), 400)["message"]
    body = {"model": "nano", "prompt": "x", "logit_bias": {"abc": 1}}
    assert _error(_post(server, "/v1/completions", body), 400)["param"] == "logit_bias"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = {"model": "nano", "messages": [{"role": "user", "content": "x"}], "tools": tools}
    assert _error(_post(server, chat, body), 400)["param"] == "tools"
    body = {"model": "nano", "prompt": "x", "response_format": {"type": "json_object"}}
    assert _error(_post(server, "/v1/completions", body), 400)["param"] == "response_format"
    big = {"model": "nano", "prompt": "x" * 20000}
    assert "limit" in _error(_post(server, "/v1/completions", big), 413)["message"]
    _error(_post(server, "/v1/completions", b"\xff\xfe"), 400)
    assert "nested" in _error(_post(server, chat, b"[" * 5000), 400)["message"]
    body = {"model": "nano", "prompt": "x", "repetition_penalty": 1e-38, "logprobs": 1}
    assert _error(_post(server, "/v1/completions", body), 400)["param"] == "repetition_penalty"
    for key in ("\u00b2", "9" * 5000):  # a digit to str.isdigit, not to int(); beyond any id
        body = {"model": "nano", "prompt": "x", "logit_bias": {key: 1}}
        assert _error(_post(server, "/v1/completions", body), 400)["param"] == "logit_bias"
    _error(_post(server, chat, {"model": "nano"}, key=None), 401)
    _error(_post(server, chat, {"model": "nano"}, key="wrong"), 401)
    _error(httpx.get(server[0] + "/v1/nothing"), 404)
    auth = {"Authorization": f"Bearer {KEY}"}
    _error(httpx.get(server[0] + "/v1/completions", headers=auth), 405)
    assert httpx.get(server[0] + "/health").status_code == 200  # still serving


def _raw(server, request: bytes) -> tuple[int, dict]:
    """(status, JSON body) of a request sent as these bytes on a connection of its own."""
    port = int(server[0].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_what_is_not_http_or_too_big_a_head_gets_an_error_body(server):
    url, _, log = server
    status, body = _raw(server, b"post /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = _raw(server, b"GET /health HTTP/1.1\r\nContent-Length: -5\r\n\r\n")
    assert status == 400 and "HTTP" in body["error"]["message"]
    # a head over a MiB: a 431, or (the server closing on what it has not read) a reset,
    # in a moment either way, and the server goes on
    port = int(url.rsplit(":", 1)[1])
    start, reply = time.monotonic(), b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * (64 << 20) + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    assert time.monotonic() - start < 10
    assert not reply or reply.startswith(b"HTTP/1.1 431 "), reply[:100]
    # a path cannot write a line of its own into the access log
    r = httpx.get(url + "/v1/models/x%0AFORGED%201.2.3.4%20%22POST%20/%22%20200%0Ay%00z")
    assert r.status_code == 404
    assert httpx.get(url + "/health").status_code == 200  # still serving
    lines = log.read_text().splitlines()
    assert not any(x.startswith("FORGED") or "\x00" in x for x in lines)
    assert any("/v1/models/x%0AFORGED%201.2.3.4" in x for x in lines)


def test_null_is_a_field_left_out(server):
    """OpenAI's clients send null for what they leave unset: never a 400."""
    nulls = {"n": None, "presence_penalty": None, "frequency_penalty": None, "stream": None,
             "temperature": None, "stop": None, "seed": None, "user": None}  # fmt: skip
    body = {"model": "nano", "prompt": "ROMEO:", "max_tokens": 3, "echo": None,
            "stream_options": {"include_usage": None}, **nulls}  # fmt: skip
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    body = {"model": "nano", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
            "logprobs": None, "top_logprobs": None, "max_completion_tokens": None,
            **nulls}  # fmt: skip
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    assert (
        _error(_post(server, "/v1/completions", {"model": None, "prompt": "x"}), 400)["param"]
        == "model"
    )


def test_max_completion_tokens(client, nano):
    user = [{"role": "user", "content": "ROMEO:"}]
    no_eos = {str(nano[1].eos_id): -100}
    r = client.chat.completions.create(
        model="nano", messages=user, max_completion_tokens=7, logit_bias=no_eos
    )
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(  # the newer field wins, as in OpenAI's API
        model="nano", messages=user, max_completion_tokens=4, max_tokens=9, logit_bias=no_eos
    )
    assert r.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError, match=r"max_completion_tokens asks for 1000") as e:
        client.chat.completions.create(model="nano", messages=user, max_completion_tokens=1000)
    assert e.value.body["param"] == "max_completion_tokens"


def test_presence_and_frequency_penalties_follow_openais_formula(client, nano):
    """Greedy tokens against an independent loop: the MLX model's full forward pass each
    step, its last logits less presence * [seen] + frequency * count over the generated
    tokens, argmax."""
    import mlx.core as mx
    import numpy as np

    model, tokenizer = nano
    raw = getattr(model, "model", model)  # the MLX model, not the numpy decoding path
    prompt = tokenizer.encode("ROMEO:")
    texts = set()
    for presence, frequency in ((1.5, 0.0), (0.0, 0.7), (0.4, 0.4)):
        out: list[int] = []
        for _ in range(24):
            logits = np.array(raw(mx.array(prompt + out)[None])[0, -1], np.float64)
            counts = np.bincount(out, minlength=logits.size)
            out.append(int(np.argmax(logits - presence * (counts > 0) - frequency * counts)))
            if out[-1] == tokenizer.eos_id:
                break
        r = client.completions.create(
            model="nano", prompt=prompt, max_tokens=24, temperature=0,
            presence_penalty=presence, frequency_penalty=frequency,
        )  # fmt: skip
        assert r.choices[0].text == tokenizer.decode(out), (presence, frequency)
        texts.add(r.choices[0].text)
    assert texts - {_alone(nano, "ROMEO:", 24)}  # the penalties changed what was chosen


# ---- batching, cancellation, the prompt cache -----------------------------------


_PROMPTS = [
    "ROMEO:", "JULIET:", "HAMLET:", "KING HENRY:", "First Citizen:", "MERCUTIO:", "Nurse:",
    "To be, or not", "Now is the winter", "O, pardon me", "Good morrow", "What light",
    "My lord,", "Come, come,", "Alas,", "Farewell,",
]  # fmt: skip


def test_32_requests_8_at_a_time_equal_generate_alone(server, client, nano):
    prompts = [p + (" I" if i >= 16 else "") for i, p in enumerate(_PROMPTS * 2)]
    expected = [_alone(nano, p, 20) for p in prompts]

    def ask(prompt: str) -> str:
        r = client.completions.create(model="nano", prompt=prompt, max_tokens=20, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop")
        return r.choices[0].text

    def quitter() -> None:  # reads the first event of a long stream, then goes away
        body = {"model": "nano", "prompt": "ROMEO:", "max_tokens": 250, "stream": True,
                "logit_bias": no_eos}  # fmt: skip
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream("POST", server[0] + "/v1/completions", json=body, headers=headers) as r:
            assert next(r.iter_lines()).startswith("data: ")

    no_eos = {str(nano[1].eos_id): -100}  # the quitter's row can only end by its client going
    before = httpx.get(server[0] + "/health").json()["cancelled"]
    with ThreadPoolExecutor(8) as pool:
        gone = pool.submit(quitter)
        got = list(pool.map(ask, prompts))
        gone.result()
    assert got == expected  # the others are not disturbed
    health = _idle(server)  # the quitter's row does not linger...
    assert health["cancelled"] == before + 1, health  # ...it was dropped, not decoded to the end


def test_a_client_that_leaves_a_non_streaming_request_has_its_row_cancelled(server, nano):
    before = httpx.get(server[0] + "/health").json()["cancelled"]
    no_eos = {str(nano[1].eos_id): -100}  # the row can only end by its client going
    body = json.dumps({"model": "nano", "prompt": "ROMEO:", "max_tokens": 250,
                       "logit_bias": no_eos}).encode()  # fmt: skip
    port = int(server[0].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 30
        while not httpx.get(server[0] + "/health").json()["running"]:  # its row has begun
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.01)
    health = _idle(server)  # the client has gone: its row does not decode to the end
    assert health["cancelled"] == before + 1, health
    r = _post(server, "/v1/completions", {"model": "nano", "prompt": "A", "max_tokens": 3})
    assert r.json()["usage"]["completion_tokens"] == 3  # still serving


def test_a_stream_whose_client_leaves_is_logged_with_the_tokens_it_was_sent(server, nano):
    url, _, log = server
    start = log.stat().st_size
    body = {"model": "nano", "prompt": [1, *range(100, 112)], "max_tokens": 200, "stream": True,
            "logit_bias": {str(nano[1].eos_id): -100}}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        events = (x for x in r.iter_lines() if x)
        assert all(next(events).startswith("data: ") for _ in range(4))  # role, then tokens
    _idle(server)
    deadline = time.monotonic() + 10
    while not (posts := [x for x in log.read_text()[start:].splitlines() if "POST" in x]):
        assert time.monotonic() < deadline, "no access-log line"
        time.sleep(0.05)
    (line,) = posts
    made = int(line.split("completion=")[1].split()[0])
    assert " 200 prompt=13 " in line and 2 <= made < 200, line


def _idle(server, seconds: float = 30.0) -> dict:
    """/health once no request runs or waits."""
    deadline = time.monotonic() + seconds
    while (health := httpx.get(server[0] + "/health").json())["running"] or health["waiting"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    return health


def test_prompt_cache_second_turn(client, nano):
    first = [{"role": "user", "content": "ROMEO:\nWhat says my love?"}]
    r1 = client.chat.completions.create(model="nano", messages=first, max_tokens=20, temperature=0)
    reply = r1.choices[0].message.content
    second = first + [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "JULIET:"},
    ]
    r2 = client.chat.completions.create(model="nano", messages=second, max_tokens=20, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens > 0
    text = "\n".join(m["content"] for m in second)
    assert r2.choices[0].message.content == _alone(nano, text, 20)


# ---- operations (last: this stops the server) ------------------------------------


def test_access_log_and_sigterm_ends_streams_and_exits_0(server):
    url, proc, log = server
    body = {"model": "nano", "prompt": "ROMEO:", "max_tokens": 230, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        proc.send_signal(signal.SIGTERM)
        rest = [x for x in lines if x]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
    assert proc.wait(20) == 0
    text = log.read_text()
    # sampled (the model's temperature), so its length depends on the draws before it
    made = re.search(r'"POST /v1/completions" 200 prompt=3 completion=(\d+) ', text)
    assert made and 1 <= int(made.group(1)) <= 230, text
    assert '"GET /v1/nothing" 404' in text
    assert "Traceback" not in text


def test_a_second_ctrl_c_ends_every_request_at_once_each_answered(tmp_path):
    """SIGINT, then SIGINT again while requests run and wait: each request still gets an
    answer of the API's (its text so far, or a 503 body), no traceback, exit status 0."""
    log = tmp_path / "stderr.log"
    url, proc = _start("--max-batch", "1", "--shutdown-grace", "30", log=log)
    try:
        _until_up(url, proc, log)

        def ask(i: int) -> httpx.Response:
            body = {"model": "nano", "prompt": f"ROMEO {i}:", "max_tokens": 240,
                    "temperature": 0, "logit_bias": {"2": -100}}  # fmt: skip
            return httpx.post(url + "/v1/completions", json=body, timeout=60)

        with ThreadPoolExecutor(8) as pool:
            replies = [pool.submit(ask, i) for i in range(8)]
            deadline = time.monotonic() + 30
            while (h := httpx.get(url + "/health").json())["running"] < 1 or h["waiting"] < 4:
                assert time.monotonic() < deadline, "the requests never ran"
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            replies = [r.result() for r in replies]
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for r in replies:
        if r.status_code == 200:
            assert r.json()["choices"][0]["finish_reason"] == "length"
        else:
            assert _error(r, 503)["message"] == "the server is shutting down"
    assert any(r.status_code == 503 for r in replies)  # the waiting ones: not started
    text = log.read_text()
    assert "shutting down now" in text and "Traceback" not in text and "ERROR" not in text


def test_a_server_whose_stderr_reader_is_gone_keeps_serving_and_exits_0():
    """stderr is a pipe nobody reads: the banner, each access-log line and the shutdown
    notice cannot be written and are dropped; requests are served and SIGTERM exits 0."""
    port = _free_port()
    read_end, write_end = os.pipe()
    os.close(read_end)
    cmd = [sys.executable, "-m", "elm_mlx.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=write_end)
    os.close(write_end)
    url = f"http://127.0.0.1:{port}"
    try:
        _until_up(url, proc)
        body = {"model": "nano", "prompt": "ROMEO:", "max_tokens": 4}
        for _ in range(2):
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.json()["usage"]["completion_tokens"] == 4, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- the engine's own process -------------------------------------------------------


def _start(*flags: str, log=None, env=None) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    cmd = [sys.executable, "-m", "elm_mlx.cli", "serve", "--port", str(port), *flags]
    env = None if env is None else {**os.environ, **env}
    if log is None:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    else:
        with open(log, "wb") as err:  # the child has its own copy of the descriptor
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    return f"http://127.0.0.1:{port}", proc


def _engine_processes(pid: int) -> list[int]:
    """The server's child processes that run an engine (multiprocessing's spawned ones;
    its resource tracker is another child)."""
    path = f"/proc/{pid}/task/{pid}/children"
    if not os.path.exists(path):
        pytest.skip("needs Linux's /proc to find the engine process")
    with open(path) as f:
        children = [int(x) for x in f.read().split()]
    found = []
    for child in children:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                found.append(child)
    return found


def test_an_engine_process_that_dies_fails_its_streams_and_the_server_exits_1(tmp_path):
    """The model runs in a child process: when it is killed mid-stream the stream gets an
    error event and [DONE], and the server stops with one error line and status 1."""
    log = tmp_path / "stderr.log"
    url, proc = _start("--shutdown-grace", "0.3", log=log)
    try:
        _until_up(url, proc, log)
        (engine,) = _engine_processes(proc.pid)
        body = {
            "model": "nano",
            "prompt": "ROMEO:",
            "max_tokens": 240,
            "stream": True,
            "temperature": 0,
            "logit_bias": {"2": -100},
        }  # no EOS: it runs until killed
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(engine, signal.SIGKILL)
            rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert "engine process ended" in error["message"] and error["type"] == "server_error"
        assert proc.wait(20) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    errors = [x for x in log.read_text().splitlines() if x.startswith("error:")]
    assert errors == [
        "error: the engine process ended unexpectedly (killed by SIGKILL); the requests in "
        "flight were answered with errors"
    ]
    assert "Traceback" not in log.read_text()


def test_what_the_engine_process_cannot_load_is_one_error_line(tmp_path):
    """The weights and adapters load in the engine's process; its failure is the command's
    one error line (as with --single-process), and nothing is left listening."""
    for flags in ([], ["--single-process"]):
        url, proc = _start("--adapter-path", str(tmp_path / "none"), *flags, log=tmp_path / "e")
        assert proc.wait(60) == 1
        assert (tmp_path / "e").read_text().splitlines() == [
            f"error: adapter directory {tmp_path / 'none'} not found"
        ]


def test_single_process_serves_as_the_default_does(nano):
    """--single-process keeps the model in the server's process: same greedy text."""
    url, proc = _start("--single-process")
    try:
        _until_up(url, proc)
        body = {"model": "nano", "prompt": "JULIET:", "max_tokens": 12, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.json()["choices"][0]["text"] == _alone(nano, "JULIET:", 12)
        assert _engine_processes(proc.pid) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_quantized_model_with_an_adapter_serves_as_generate_does(tmp_path):
    """A q4 directory (`elm-mlx convert -q`) with LoRA adapters, the key from the
    environment; a second server on the same port is one error line, before any loading."""
    from elm_mlx.formats.modeldir import DEFAULT_MODEL
    from elm_mlx.generation.generate import generate
    from elm_mlx.generation.loading import load_for_generation
    from elm_mlx.testing import random_adapters
    from elm_mlx.training.lora import LoRAConfig

    q4, adapters = tmp_path / "q4", tmp_path / "adapters"
    convert = [sys.executable, "-m", "elm_mlx.convert", "--hf-path", str(DEFAULT_MODEL),
               "--mlx-path", str(q4), "-q", "--q-bits", "4"]  # fmt: skip
    subprocess.run(convert, check=True, capture_output=True, timeout=300)
    random_adapters(q4, adapters, LoRAConfig(rank=4, scale=2.0, num_layers=6), std=0.5, seed=1)
    model, tokenizer, _ = load_for_generation(q4, adapter_path=adapters)
    expected = generate(model, tokenizer, "JULIET:", max_tokens=16, temp=0.0)
    plain = generate(*load_for_generation(q4)[:2], "JULIET:", max_tokens=16, temp=0.0)
    assert expected != plain  # the adapters change the output

    log = tmp_path / "stderr.log"
    env = {"ELM_MLX_API_KEY": "from-env"}
    url, proc = _start("--model", str(q4), "--adapter-path", str(adapters), log=log, env=env)
    try:
        _until_up(url, proc, log)
        body = {"model": "q4", "prompt": "JULIET:", "max_tokens": 16, "temperature": 0}
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 401
        auth = {"Authorization": "Bearer from-env"}
        r = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60)
        assert r.json()["choices"][0]["text"] == expected, r.text

        port = url.rsplit(":", 1)[1]
        again = [sys.executable, "-m", "elm_mlx.cli", "serve", "--port", port]
        done = subprocess.run(again, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1
        assert done.stderr.splitlines() == [
            f"error: cannot listen on 127.0.0.1:{port}: Address already in use; another "
            "program is listening there: pick another --port"
        ]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt-cache-gb", "-1"], "--prompt-cache-gb must be >= 0, got -1.0"),
        (["--port", "0"], "--port must be in 1-65535, got 0"),
        (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    ],
)
def test_bad_serve_flags_are_one_error_line(flags, message):
    """Out-of-range flags stop the command before it loads anything: one error line that
    names the flag, status 1."""
    cmd = [sys.executable, "-m", "elm_mlx.cli", "serve", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: {message}"]
