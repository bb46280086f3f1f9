"""The engine in a process of its own, behind `Engine`'s interface.

In one process the web stack and the engine take turns holding Python's GIL: every
streamed token's trip through the web stack (tens of microseconds of Python) holds up
the engine's next step, and each hand-over of the lock costs more on top. With the
engine in a child process the two run side by side, on a core each, and never wait for
each other's lock (nano, 2 cores: 1.09-1.20x the tokens/s at concurrency 1 to 8;
`benchmarks/bench_serve.py --single-process` prints both).

`EngineProcess` is what the API layer talks to (`submit`, `close`, `join`, `stats`,
`closing`, `context`). The child (`_child_main`) loads OpenBLAS, then the model, runs an
`Engine`, and sends each step's events back in one message. Commands go down the pipe
(submit, cancel, close), events come up it. A client's cancel reaches the child at
once. If the child dies, every job in flight ends with a 500, new ones get 503s, and
`on_death` is called (the server then stops and the command exits 1).

Nothing here imports MLX at module level: the child is started with `spawn` (a fresh
interpreter; `fork` would copy MLX's threads' state) and must load OpenBLAS before MLX.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass


class EngineLoadError(Exception):
    """The child could not load the model or start its engine; the message says why."""


@dataclass(frozen=True)
class LoadSpec:
    """What the child loads: `generation.loading.load_for_generation`'s arguments, and
    whether to print its report (-v)."""

    path: str | None
    adapter_path: str | None = None
    dtype: str = "auto"
    fast_path: bool = True
    verbose: bool = False


class EngineProcess:
    """`Engine`'s interface over a child process that loads the model and runs the engine.

    `engine_kwargs` are the Engine's keyword arguments; `context` is the model's context
    length. `start()` waits until the model is loaded and raises EngineLoadError with the
    child's message when it cannot be.

    The queue limit is counted here, where `submit` must answer at once: a job waits
    when more than `max_batch` jobs are in flight, and more than `max_queue` waiting
    ones are refused."""

    def __init__(self, spec: LoadSpec, engine_kwargs: dict, context: int):
        self.context = context
        self.max_batch = engine_kwargs.get("max_batch", 8)
        self.max_queue = engine_kwargs.get("max_queue", 64)
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_end = ctx.Pipe()
        kwargs = dict(engine_kwargs, max_queue=self.max_queue + self.max_batch)  # never refuses
        self._process = ctx.Process(
            target=_child_main, args=(child_end, spec, kwargs), name="elm-mlx-engine", daemon=True
        )
        self._child_end = child_end
        self._jobs: dict = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # the jobs and the closing flag
        self._send_lock = threading.Lock()
        self._closing = False
        self._stats: dict = {}  # the engine's, as its last message had them
        self._reader: threading.Thread | None = None
        self.on_death: Callable[[str], None] | None = None
        self.death: str | None = None  # why the child ended, when nobody asked it to

    # ---- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the child and wait for its model (once; later calls do nothing)."""
        if self._reader is not None:
            return
        try:
            self._process.start()
        except OSError as e:  # no process to be had (out of memory, process limit)
            raise EngineLoadError(f"could not start the engine process: {e}") from None
        self._child_end.close()  # the child has its end: EOF here once it exits
        try:
            kind, message = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise EngineLoadError(
                f"the engine process ended while loading the model ({self._exit_status()})"
            ) from None
        except BaseException:  # Ctrl-C while loading: take the child down too
            self.kill()
            raise
        if kind != "ready":
            self._process.join(5)
            raise EngineLoadError(message)
        self._stats = message
        self._reader = threading.Thread(target=self._read, name="elm-mlx-events", daemon=True)
        self._reader.start()

    def close(self, grace: float = 10.0) -> None:
        """Take no new jobs; running ones may finish for `grace` seconds (a second call
        can only shorten that)."""
        with self._lock:
            self._closing = True
        self._send(("close", grace))

    def join(self, timeout: float | None = None) -> None:
        """Wait for the child to end (it does once its rows have); past `timeout` it is
        killed."""
        self._process.join(timeout)
        if self._process.is_alive():
            self.kill()
        if self._reader is not None:
            self._reader.join(5)

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(5)

    @property
    def closing(self) -> bool:
        return self._closing

    def stats(self) -> dict:
        return dict(self._stats)

    # ---- jobs ----------------------------------------------------------------------

    def submit(self, job) -> None:
        """Queue `job` (an engine `Job`); raises QueueFull or Closed."""
        from .engine import Closed, QueueFull

        with self._lock:
            if self._closing:
                raise Closed("the server is shutting down")
            waiting = len(self._jobs) - self.max_batch
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting")
            job_id = next(self._ids)
            self._jobs[job_id] = job
        job.on_cancel = lambda: self._cancel(job_id)
        self._send(("submit", job_id, job.prompt, job.settings))

    def _cancel(self, job_id: int) -> None:
        """The client has gone: the job is forgotten here (a cancelled row ends without an
        event) and its row dropped there."""
        with self._lock:
            self._jobs.pop(job_id, None)
        self._send(("cancel", job_id))

    def _send(self, message) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the child is gone: the reader ends its jobs
                pass

    def _read(self) -> None:
        """Deliver the child's events to their jobs until it exits."""
        from .engine import Failed, Finished

        while True:
            try:
                events, stats = self._conn.recv()
            except Exception:  # EOF (the child exited), or a message that cannot be read
                break
            self._stats = stats
            for job_id, event in events:
                job = self._jobs.get(job_id)
                if job is None:
                    continue
                if isinstance(event, Finished | Failed):
                    with self._lock:
                        self._jobs.pop(job_id, None)
                    job.end(event)
                else:
                    job.emit(event)
        self._ended()

    def _ended(self) -> None:
        """The child has exited: end what it left unfinished; say so if nobody asked."""
        from .engine import Failed

        self._process.join(5)
        if self._process.is_alive():  # the channel broke under a live child: it serves nobody
            self.kill()
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
            asked, self._closing = self._closing, True
        for job in jobs:
            job.end(Failed("the engine process ended; see the server log", 500))
        if not asked:
            self.death = f"the engine process ended unexpectedly ({self._exit_status()})"
            if self.on_death is not None:
                self.on_death(self.death)

    def _exit_status(self) -> str:
        code = self._process.exitcode
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"


# ---- the child ------------------------------------------------------------------


def _child_main(conn, spec: LoadSpec, engine_kwargs: dict) -> None:
    """Load the model, run an Engine, and serve the parent's commands until its engine
    has ended after a close (or at once when the parent goes away)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group:
    # the parent decides how the engine ends (its rows get their grace period)
    from ..runtime.blas import BlasError, preload_blas
    from ..runtime.memory import keep_freed_memory

    try:
        preload_blas()  # before MLX is imported, as the command line does
    except BlasError as e:
        conn.send(("error", str(e)))
        return
    keep_freed_memory()
    from .server import forgiving_stderr

    with forgiving_stderr():  # the parent's stderr: a reader that has gone stops nothing
        _child(conn, spec, engine_kwargs)
    os._exit(0)  # the engine's daemon threads need no goodbye


def _child(conn, spec: LoadSpec, engine_kwargs: dict) -> None:
    try:
        from ..generation.loading import load_for_generation
        from .engine import Engine

        model, tokenizer, report = load_for_generation(
            spec.path, adapter_path=spec.adapter_path, dtype=spec.dtype, fast_path=spec.fast_path
        )
        if spec.verbose:
            for line in report.lines():
                print(line, file=sys.stderr, flush=True)
        engine = Engine(model, tokenizer, **engine_kwargs)
    except Exception as e:  # the parent prints it as its one error line
        from ..cli.common import os_error_message

        message = os_error_message(e) if isinstance(e, OSError) else str(e)
        conn.send(("error", message or type(e).__name__))
        return
    _Child(conn, engine).run()
    sys.stderr.flush()


class _Child:
    """The child's side: the parent's commands in, each step's events out."""

    def __init__(self, conn, engine):
        self.conn, self.engine = conn, engine
        self.jobs: dict = {}
        self.events: list = []
        self.sent_stats: dict | None = None
        self.lock = threading.Lock()  # the events
        self.send_lock = threading.Lock()  # the engine thread and this one both send
        engine.after_step = self.flush

    def run(self) -> None:
        self.conn.send(("ready", self.engine.stats()))
        self.engine.start()
        closing = False
        while not (closing and not self.engine.alive):
            try:
                if not self.conn.poll(0.1):
                    continue
                message = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: nobody reads the rows any more
                self.engine.close(0)
                break
            kind = message[0]
            if kind == "submit":
                self._submit(*message[1:])
            elif kind == "cancel":
                job = self.jobs.pop(message[1], None)
                if job is not None:
                    job.cancel()  # its row ends without an event: forget it here
            elif kind == "close":
                closing = True
                self.engine.close(message[1])
        self.engine.join()
        self.flush()

    def _submit(self, job_id: int, prompt: list[int], settings) -> None:
        from .engine import Closed, Failed, Job, QueueFull

        job = Job(prompt, settings, lambda event: self._emit(job_id, event))
        self.jobs[job_id] = job
        try:
            self.engine.submit(job)
        except (QueueFull, Closed) as e:
            job.end(Failed(str(e), 503))
            self.flush()

    def _emit(self, job_id: int, event) -> None:
        from .engine import Failed, Finished

        with self.lock:
            self.events.append((job_id, event))
        if isinstance(event, Finished | Failed):
            self.jobs.pop(job_id, None)

    def flush(self) -> None:
        """Send the events gathered since the last flush, with the engine's stats (also
        when only those changed: a cancelled row leaves no event)."""
        with self.send_lock:
            with self.lock:
                events, self.events = self.events, []
            stats = self.engine.stats()
            if events or stats != self.sent_stats:
                self.sent_stats = stats
                try:
                    self.conn.send((events, stats))
                except (OSError, ValueError):  # the parent is gone
                    pass
