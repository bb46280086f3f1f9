"""Run the app under uvicorn: bind, serve, and stop cleanly on SIGINT or SIGTERM.

On the first signal the engine takes no new requests, those it has (running or
waiting for a row) get `grace` seconds, then running rows are ended (finish_reason
"length") and waiting ones answered 503; every stream ends with `data: [DONE]`, and
`serve` returns normally (exit status 0). A second signal ends every request at
once, the same way; a third Ctrl-C forces the exit.

While serving, stderr (the banner, the access log, tracebacks of the engine's
failures, uvicorn's own messages) drops a line it cannot write: a server whose
log reader has gone keeps serving.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from .engine import Engine
from .protocol import ApiError

# The most bytes a request's head (request line and headers) may take: beyond, 431. (The
# parser gathers a header in pieces at a cost that grows with its square: a 128 MiB one held
# the event loop for seconds.) Generous, since what is counted may include the start of a
# body that arrived with the head.
MAX_HEAD_BYTES = 1 << 20


def http_protocol():
    """uvicorn's httptools protocol, with `MAX_HEAD_BYTES` and OpenAI-style error bodies for
    requests it cannot read; h11 (which bounds a head itself) when httptools is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "h11"

    class Protocol(HttpToolsProtocol):
        _in_head, _head = True, 0  # in a request's head; its bytes so far

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():
                self._head += len(data)
                if self._head > MAX_HEAD_BYTES:
                    self._refuse(431, f"the request's headers are over {MAX_HEAD_BYTES} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head = True, 0

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:  # what the parser cannot read
            self._refuse(400, "the request is not valid HTTP/1.1")

        def _refuse(self, status: int, message: str) -> None:
            body = json.dumps(ApiError(status, message).body()).encode()
            reason = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}[status]
            head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n" % (status, reason)
            head += b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            self.transport.write(head + body)
            self.transport.close()

    return Protocol


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, grace: float, banner: str):
        super().__init__(config)
        self.engine, self.grace, self.banner = engine, grace, banner
        self.ending_now = False  # a second signal came

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.banner, file=sys.stderr, flush=True)

    def handle_exit(self, sig, frame) -> None:
        """The first signal: the grace period. The second: every request ends now, each
        answered as at the grace period's end (uvicorn's own second Ctrl-C cancels the
        responses where they are: plain-text 500s and a traceback each). A third Ctrl-C
        forces the exit."""
        if not self.should_exit:
            print("shutting down: finishing the requests in flight", file=sys.stderr, flush=True)
            self.engine.close(self.grace)
            super().handle_exit(sig, frame)
        elif not self.ending_now:
            self.ending_now = True
            print("shutting down now: ending every request", file=sys.stderr, flush=True)
            self.engine.close(0)
        else:
            super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self):
        """uvicorn's, except that the signal is not raised again afterwards (exit 0)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {s: signal.signal(s, self.handle_exit) for s in handled}
        try:
            yield
        finally:
            for s, handler in original.items():
                signal.signal(s, handler)


class _Stderr:
    """A stream that drops what it cannot write (a closed stream, a pipe whose reader has
    gone) and from then on writes nothing; its descriptor then points at /dev/null, so
    that neither the lines written to it directly nor the flush at exit fail again."""

    def __init__(self, stream):
        self.stream, self.broken = stream, stream is None

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self.stream.write(text)
            except (OSError, ValueError):  # ValueError: the stream is closed
                self._give_up()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self._give_up()

    def isatty(self) -> bool:
        return not self.broken and self.stream.isatty()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)

    def _give_up(self) -> None:
        self.broken = True
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self.stream.fileno())
            finally:
                os.close(null)
        except (AttributeError, OSError, ValueError):  # no descriptor: dropping is enough
            pass


@contextmanager
def forgiving_stderr() -> Iterator[None]:
    """Within the block, sys.stderr drops the lines it cannot write instead of raising."""
    original = sys.stderr
    sys.stderr = _Stderr(original)
    try:
        yield
    finally:
        sys.stderr = original


class ListenError(OSError):
    """The server cannot listen where it was asked to; the message says why and what to do."""


_LISTEN_HINTS = {
    errno.EADDRINUSE: "another program is listening there: pick another --port",
    errno.EACCES: "ports below 1024 need privileges: pick another --port",
    errno.EADDRNOTAVAIL: "this machine has no such address: check --host",
}


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, made before the model loads: an address
    that cannot be had is said at once, in one line (ListenError)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        message = f"cannot listen on {host}:{port}: unknown host ({e}); check --host"
        raise ListenError(message) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # uvicorn's backlog
    except OSError as e:
        sock.close()
        hint = _LISTEN_HINTS.get(e.errno, "")
        reason = e.strerror or str(e)
        raise ListenError(
            f"cannot listen on {host}:{port}: {reason}" + (f"; {hint}" if hint else "")
        ) from None
    return sock


def serve(
    app, engine: Engine, *, host: str, port: int, grace: float = 10.0, name: str = "",
    sock: socket.socket | None = None,
) -> None:  # fmt: skip
    """Serve `app` on host:port (on `sock` when given: `listen`'s) until a signal; the
    engine is started and joined here."""
    with forgiving_stderr():  # before uvicorn.Config: its log handlers take sys.stderr
        _serve(app, engine, host=host, port=port, grace=grace, name=name, sock=sock)


def _serve(
    app, engine: Engine, *, host: str, port: int, grace: float, name: str, sock
) -> None:  # fmt: skip
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http_protocol(),
        log_level="warning",
        access_log=False,  # the app writes its own line per request
        lifespan="off",
        timeout_graceful_shutdown=grace + 5,  # streams end before this: the engine ends them
    )
    banner = f"serving {name} on http://{host}:{port}/v1 (Ctrl-C to stop)"
    server = _Server(config, engine, grace, banner)
    if hasattr(engine, "on_death"):  # a process of its own: the server stops without it
        engine.on_death = lambda why: setattr(server, "should_exit", True)
    engine.start()
    try:
        server.run(sockets=None if sock is None else [sock])
    except SystemExit:  # uvicorn exits when it cannot bind; it has said why
        pass
    finally:
        engine.close(0)
        engine.join(grace + 5)
    if getattr(engine, "death", None):
        raise OSError(f"{engine.death}; the requests in flight were answered with errors")
    if not server.started:
        raise OSError(f"could not listen on {host}:{port} (see the message above)")
