"""Run the app under uvicorn: bind, serve, and stop cleanly on SIGINT or SIGTERM.

On the first signal the engine takes no new requests, running rows get `grace`
seconds to finish and are then ended (finish_reason "length"), every stream
ends with `data: [DONE]`, and `serve` returns normally (exit status 0). A
second Ctrl-C forces the exit.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

import uvicorn

from .engine import Engine


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, grace: float, banner: str):
        super().__init__(config)
        self.engine, self.grace, self.banner = engine, grace, banner

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.banner, file=sys.stderr, flush=True)

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            print("shutting down: finishing the requests in flight", file=sys.stderr, flush=True)
        self.engine.close(self.grace)
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


def serve(
    app, engine: Engine, *, host: str, port: int, grace: float = 10.0, name: str = ""
) -> None:
    """Serve `app` on host:port until a signal; the engine is started and joined here."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,  # the app writes its own line per request
        lifespan="off",
        timeout_graceful_shutdown=grace + 5,  # streams end before this: the engine ends them
    )
    banner = f"serving {name} on http://{host}:{port}/v1 (Ctrl-C to stop)"
    server = _Server(config, engine, grace, banner)
    engine.start()
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind; it has said why
        pass
    finally:
        engine.close(0)
        engine.join(grace + 5)
    if not server.started:
        raise OSError(f"could not listen on {host}:{port} (see the message above)")
