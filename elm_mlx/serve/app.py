"""The HTTP side: an ASGI app (Starlette, pydantic) speaking OpenAI's API over an `Engine`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
GET /v1/models/{id}, GET /health. Every failure is an OpenAI-style error body
with its status (400 bad request or a job the model cannot take, 401 key, 404
model or path, 413 body too large, 500 a bug, 503 queue full or shutting down,
with Retry-After); a client that goes away has its row cancelled. One
access-log line per request goes to stderr.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..formats.tokenizer import Tokenizer
from .engine import Closed, Failed, Finished, Job, QueueFull, RowSettings, Token
from .protocol import ApiError, ChatRequest, CompletionRequest, check_supported, validation_error


@dataclass(frozen=True)
class ServerConfig:
    """What the server was started with (the CLI builds it)."""

    model_id: str  # reported in responses and /v1/models
    aliases: frozenset[str] = frozenset()  # other names a request may use (the --model value)
    chat_template: bool = False  # Instruct models: the Zephyr template; else plain concatenation
    defaults: dict = field(default_factory=dict)  # generation_config.json: temp, top_p, top_k
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    created: int = field(default_factory=lambda: int(time.time()))

    def knows(self, name: str) -> bool:
        return name == self.model_id or name in self.aliases


def create_app(engine, tokenizer: Tokenizer, config: ServerConfig) -> Starlette:
    """The ASGI app; starting and closing the engine is the caller's."""
    api = _Api(engine, tokenizer, config)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    return _AccessLog(app)


# ---- errors ---------------------------------------------------------------------


async def _api_error(request: Request, e: ApiError) -> Response:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _http_error(request: Request, e: HTTPException) -> Response:
    if e.status_code == 404:
        message = f"no route {request.url.path}; this server has /v1/chat/completions, "
        message += "/v1/completions, /v1/models and /health"
    elif e.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(e.detail)
    return await _api_error(request, ApiError(e.status_code, message, headers=e.headers))


async def _internal_error(request: Request, e: Exception) -> Response:
    traceback.print_exception(e, file=sys.stderr)
    error = ApiError(500, "internal error; see the server log", type="server_error")
    return await _api_error(request, error)


def _busy(message: str) -> ApiError:
    return ApiError(
        503, message, type="server_error", code="overloaded", headers={"Retry-After": "1"}
    )


def _failed(event: Failed) -> ApiError:
    """The error a job that ended without a result answers with, at the engine's status."""
    if event.status == 503:
        return _busy(event.message)
    kind = "invalid_request_error" if event.status < 500 else "server_error"
    return ApiError(event.status, event.message, type=kind)


# ---- the access log -------------------------------------------------------------


class _AccessLog:
    """ASGI middleware: one stderr line per request, after its last byte is sent."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]
        scope.setdefault("state", {})

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            usage = scope["state"].get("usage", (0, 0))
            client = scope.get("client") or ("-", 0)
            print(
                f'{client[0]} "{scope["method"]} {_log_path(scope)}" {status[0] or "-"} '
                f"prompt={usage[0]} completion={usage[1]} {time.perf_counter() - start:.3f}s",
                file=sys.stderr,
                flush=True,
            )


def _log_path(scope) -> str:
    """The path as the client sent it (percent-escapes kept), with anything unprintable
    escaped: a path can never write a line of its own into the log."""
    raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    text = raw.decode("ascii", "backslashreplace")
    return "".join(c if " " <= c < "\x7f" else f"\\x{ord(c):02x}" for c in text)


# ---- the endpoints --------------------------------------------------------------


class _Channel:
    """Engine events into an asyncio queue (emit is called on the engine thread)."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.outbox = _Outbox.of(asyncio.get_running_loop())

    def emit(self, event) -> None:
        self.outbox.put(self.queue, event)


class _Outbox:
    """Events from the engine thread into one event loop's queues, handed over in batches:
    the loop is woken once for whatever arrives before it runs (a step's tokens for every
    stream), not once an event."""

    _of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, object]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Outbox:
        box = cls._of.get(loop)
        if box is None:
            box = cls._of[loop] = cls(loop)
        return box

    def put(self, queue: asyncio.Queue, event) -> None:
        with self.lock:
            self.items.append((queue, event))
            if len(self.items) > 1:  # a hand-over is already on its way
                return
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            with self.lock:
                self.items.clear()

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, event in items:
            queue.put_nowait(event)


@dataclass
class _Result:
    text: list[str] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    finished: Finished | None = None


class _Api:
    def __init__(self, engine, tokenizer: Tokenizer, config: ServerConfig):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.context = engine.context  # the model's context length, as it defines it
        # More characters than any prompt that fits the context has (each token is at most
        # the longest piece; four times that for what normalization merges): longer ones are
        # refused untokenized. Tokenizing megabytes would hold up the event loop, and every
        # stream with it, for a request bound to fail.
        table = tokenizer.piece_table()
        longest = max((len(v) for kind, v in table if kind in (2, 3)), default=1)
        self.max_prompt_chars = self.context * max(1, longest) * 4

    async def health(self, request: Request) -> Response:
        if self.engine.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.config.model_id, **self.engine.stats()})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        self._check_model(request.path_params["model_id"], param=None)
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        c = self.config
        return {"id": c.model_id, "object": "model", "created": c.created, "owned_by": "elm-mlx"}

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        req = self._parse(ChatRequest, await self._body(request))
        self._check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        prompt = self._chat_prompt(req)
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.max_completion_tokens is not None:  # the newer name wins, as in OpenAI's API
            asked, max_tokens = "max_completion_tokens", req.max_completion_tokens
        else:
            asked, max_tokens = "max_tokens", req.max_tokens
        settings = self._settings(req, prompt, max_tokens, top, asked)
        return await self._respond(request, req, prompt, settings, _ChatFormat(self.config))

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        req = self._parse(CompletionRequest, await self._body(request))
        self._check_common(req)
        if req.echo:
            raise ApiError(400, "echo is not supported; the prompt is yours already", param="echo")
        prompt = self._completion_prompt(req)
        settings = self._settings(req, prompt, req.max_tokens, req.logprobs)
        return await self._respond(request, req, prompt, settings, _TextFormat(self.config))

    # ---- checks ------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            what = "wrong API key" if given else "no API key"
            raise ApiError(
                401,
                f"{what}; send the header Authorization: Bearer <key>",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise _too_large(len(body), limit)
        except ClientDisconnect:
            raise ApiError(400, "the client went away while sending the body") from None
        return bytes(body)

    def _parse(self, model, body: bytes):
        try:
            data = json.loads(body)
        except ValueError as e:  # UnicodeDecodeError is one too
            raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
        except RecursionError:
            message = "the body's JSON is nested too deeply"
            raise ApiError(400, message, code="invalid_json") from None
        check_supported(data)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    def _check_common(self, req) -> None:
        self._check_model(req.model, param="model")
        if req.n != 1:
            raise ApiError(400, f"n must be 1 (one choice per request), got {req.n}", param="n")
        vocab = self.tokenizer.vocab_size
        bad = [k for k in req.logit_bias or {} if int(k) >= vocab]
        if bad:
            raise ApiError(
                400,
                f"logit_bias: token id {bad[0]} is outside the vocabulary (0-{vocab - 1})",
                param="logit_bias",
            )

    def _check_model(self, name: str, param: str | None) -> None:
        if not self.config.knows(name):
            raise ApiError(
                404,
                f"model {name!r} is not served here; this server serves {self.config.model_id!r}",
                param=param,
                code="model_not_found",
            )

    def _chat_prompt(self, req: ChatRequest) -> list[int]:
        if self.config.chat_template:
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in req.messages
            ]
            text = self.tokenizer.apply_chat_template(messages)
        else:  # a base model: the contents one after another, no roles
            text = "\n".join(m.text() for m in req.messages)
        return self._encode(text, "messages")

    def _completion_prompt(self, req: CompletionRequest) -> list[int]:
        if isinstance(req.prompt, str):
            return self._encode(req.prompt, "prompt")
        vocab = self.tokenizer.vocab_size
        bad = [i for i in req.prompt if i >= vocab]
        if bad:
            raise ApiError(
                400, f"prompt: token id {bad[0]} is outside the vocabulary (0-{vocab - 1})",
                param="prompt",
            )  # fmt: skip
        return list(req.prompt)

    def _encode(self, text: str, param: str) -> list[int]:
        if len(text) > self.max_prompt_chars:
            raise ApiError(
                400,
                f"the prompt is {len(text):,} characters: more than the model's "
                f"{self.context}-token context can hold; shorten the prompt",
                param=param,
                code="context_length_exceeded",
            )
        try:
            return self.tokenizer.encode(text)
        except ValueError as e:
            raise ApiError(400, f"{param}: {e}", param=param) from None

    def _settings(
        self, req, prompt: list[int], max_tokens: int | None, top, asked: str = "max_tokens"
    ) -> RowSettings:
        """The row's settings; `asked` names the field `max_tokens` came from (for errors)."""
        context, n = self.context, len(prompt)
        if max_tokens is None:
            max_tokens = context - n
            if max_tokens < 1:
                raise ApiError(
                    400,
                    f"the prompt has {n} tokens but the model's context is {context} tokens; "
                    "shorten the prompt",
                    param="messages" if isinstance(req, ChatRequest) else "prompt",
                    code="context_length_exceeded",
                )
        elif n + max_tokens > context:
            raise ApiError(
                400,
                f"the prompt has {n} tokens and {asked} asks for {max_tokens} more "
                f"({n + max_tokens} in all), beyond the model's {context}-token context; "
                f"shorten the prompt or lower {asked}",
                param=asked,
                code="context_length_exceeded",
            )
        d = self.config.defaults
        return RowSettings(
            max_tokens=max_tokens,
            temp=_first(req.temperature, d.get("temp"), 0.0),
            top_p=_first(req.top_p, d.get("top_p"), 1.0),
            top_k=_first(req.top_k, d.get("top_k"), 0),
            min_p=req.min_p or 0.0,
            seed=req.seed,
            stop=req.stops(),
            repetition_penalty=_first(req.repetition_penalty, 1.0),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
            top_logprobs=top,
        )

    # ---- running a request -------------------------------------------------

    async def _respond(self, request: Request, req, prompt, settings, fmt) -> Response:
        channel = _Channel()
        job = Job(prompt, settings, channel.emit)
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise _busy(f"the server is busy ({e}); retry shortly") from None
        except Closed as e:
            raise _busy(str(e)) from None
        state = request.scope["state"]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = self._stream(job, channel, fmt, include_usage, state)
            return StreamingResponse(stream, media_type="text/event-stream")
        result = await self._collect(request, job, channel)
        f = result.finished
        state["usage"] = (f.prompt_tokens, f.completion_tokens)
        return JSONResponse(fmt.response(result, settings.top_logprobs is not None))

    async def _collect(self, request: Request, job: Job, channel: _Channel) -> _Result:
        result = _Result()
        watch = asyncio.create_task(_on_disconnect(request, channel))
        try:
            while True:
                event = await channel.queue.get()
                if event is _GONE:
                    raise ApiError(499, "client closed the request")
                if isinstance(event, Failed):
                    raise _failed(event)
                if isinstance(event, Token):
                    result.text.append(event.text)
                    result.tokens.append(event)
                else:
                    result.finished = event
                    return result
        finally:
            watch.cancel()
            job.cancel()  # no-op once finished; frees the row when the client left
            if result.finished is None:  # the access log counts what was made before it left
                request.scope["state"]["usage"] = (len(job.prompt), len(result.tokens))

    async def _stream(self, job: Job, channel: _Channel, fmt, include_usage: bool, state):
        """Server-sent events; what the engine sent while the last write was going out
        leaves in one write."""
        stream_id, created = fmt.new_id(), int(time.time())
        token_sse = fmt.token_sse(stream_id, created)
        made = 0  # tokens, for the access log of a stream whose client leaves
        try:
            yield _sse(fmt.chunk(stream_id, first=True, created=created))
            ended = False
            while not ended:
                out = []
                for event in await _available(channel.queue):
                    if isinstance(event, Failed):
                        out.append(_sse(_failed(event).body()))
                    elif isinstance(event, Token):
                        made += 1
                        if event.logprob is not None:
                            out.append(_sse(fmt.chunk(stream_id, token=event, created=created)))
                        elif event.text:
                            out.append(token_sse(event.text))
                        continue
                    else:
                        state["usage"] = (event.prompt_tokens, event.completion_tokens)
                        out.append(_sse(fmt.chunk(stream_id, reason=event.reason, created=created)))
                        if include_usage:
                            out.append(_sse(fmt.usage_chunk(stream_id, event, created=created)))
                    ended = True  # nothing follows a Failed or Finished event
                    break
                if out:
                    yield "".join(out)
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()
            state.setdefault("usage", (len(job.prompt), made))


async def _available(queue: asyncio.Queue) -> list:
    """The next event, and every one queued behind it."""
    events = [await queue.get()]
    while not queue.empty():
        events.append(queue.get_nowait())
    return events


_GONE = object()  # on a channel's queue: the client has disconnected


async def _on_disconnect(request: Request, channel: _Channel) -> None:
    """Put _GONE on the channel once the client disconnects (its body is read already).

    A connection that fails while being watched counts as gone: the task ends without an
    exception nobody would read (asyncio prints those as tracebacks)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:
        pass
    channel.queue.put_nowait(_GONE)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413, f"the body has {size} bytes, more than the server's limit of {limit}",
        code="request_too_large",
    )  # fmt: skip


def _first(*values):
    return next(v for v in values if v is not None)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


_encode_string = json.encoder.encode_basestring  # json.dumps(a str, ensure_ascii=False)


def _usage(f: Finished) -> dict:
    return {
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens},
    }


# ---- response bodies ------------------------------------------------------------


class _ChatFormat:
    """chat.completion and chat.completion.chunk objects."""

    prefix, kind = "chatcmpl", "chat.completion"

    def __init__(self, config: ServerConfig):
        self.config = config

    def new_id(self) -> str:
        return f"{self.prefix}-{uuid.uuid4().hex[:24]}"

    def _envelope(self, id_: str, kind: str, choices: list, created: int | None = None) -> dict:
        return {
            "id": id_, "object": kind, "created": int(time.time()) if created is None else created,
            "model": self.config.model_id, "system_fingerprint": None, "choices": choices,
        }  # fmt: skip

    def token_sse(self, id_: str, created: int) -> Callable[[str], str]:
        """The server-sent event of a streamed token's text (no logprobs), as `_sse` of its
        `chunk` gives it, from the chunk rendered once with a mark where the text goes."""
        mark = json.dumps("\x00", ensure_ascii=False)
        sse = _sse(self.chunk(id_, token=Token("\x00", 0), created=created))
        if sse.count(mark) != 1:  # the mark occurs elsewhere: render each chunk
            return lambda text: _sse(self.chunk(id_, token=Token(text, 0), created=created))
        head, tail = sse.split(mark)
        return lambda text: head + _encode_string(text) + tail

    def response(self, r: _Result, logprobs: bool) -> dict:
        message = {"role": "assistant", "content": "".join(r.text), "refusal": None}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": {"content": [_chat_logprob(t) for t in r.tokens]} if logprobs else None,
            "finish_reason": r.finished.reason,
        }
        body = self._envelope(self.new_id(), self.kind, [choice])
        body["usage"] = _usage(r.finished)
        return body

    def chunk(
        self, id_: str, *, first=False, token: Token | None = None, reason=None, created=None
    ) -> dict:
        delta = {"role": "assistant", "content": ""} if first else {}
        logprobs = None
        if token is not None:
            delta = {"content": token.text}
            if token.logprob is not None:
                logprobs = {"content": [_chat_logprob(token)]}
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return self._envelope(id_, self.kind + ".chunk", [choice], created)

    def usage_chunk(self, id_: str, f: Finished, created: int | None = None) -> dict:
        body = self._envelope(id_, self.kind + ".chunk", [], created)
        body["usage"] = _usage(f)
        return body


def _chat_logprob(t: Token) -> dict:
    entry = {"token": t.logprob.token, "logprob": t.logprob.logprob, "bytes": t.logprob.bytes}
    top = [{"token": x.token, "logprob": x.logprob, "bytes": x.bytes} for x in t.top or []]
    return {**entry, "top_logprobs": top}


class _TextFormat(_ChatFormat):
    """text_completion objects (streamed chunks have the same shape)."""

    prefix, kind = "cmpl", "text_completion"

    def response(self, r: _Result, logprobs: bool) -> dict:
        choice = {
            "index": 0,
            "text": "".join(r.text),
            "logprobs": _text_logprobs(r.tokens) if logprobs else None,
            "finish_reason": r.finished.reason,
        }
        body = self._envelope(self.new_id(), self.kind, [choice])
        body["usage"] = _usage(r.finished)
        return body

    def chunk(
        self, id_: str, *, first=False, token: Token | None = None, reason=None, created=None
    ) -> dict:
        text = "" if token is None else token.text
        logprobs = _text_logprobs([token]) if token and token.logprob is not None else None
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return self._envelope(id_, self.kind, [choice], created)

    def usage_chunk(self, id_: str, f: Finished, created: int | None = None) -> dict:
        body = self._envelope(id_, self.kind, [], created)
        body["usage"] = _usage(f)
        return body


def _text_logprobs(tokens: list[Token]) -> dict:
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {
        "tokens": [t.logprob.token for t in tokens],
        "token_logprobs": [t.logprob.logprob for t in tokens],
        "top_logprobs": [{x.token: x.logprob for x in t.top or []} for t in tokens],
        "text_offset": offsets,
    }
