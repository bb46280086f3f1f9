"""What every elm-mlx command shares: the CLI's own error, faults as one line, stderr
logging and the --model default."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ..formats.modeldir import default_model_path


class CliError(Exception):
    """A user mistake caught in the CLI layer itself."""


# Errors that are the user's input, reported as one line without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    FileExistsError,
    CliError,
)


def model_path(model: str | None) -> str:
    """The --model value, or the shipped nano model when none is given."""
    return str(default_model_path()) if model is None else model


@contextmanager
def flag_names(**flags: str) -> Iterator[None]:
    """Library messages name arguments as `name`; say this command's flags instead."""
    try:
        yield
    except USER_ERRORS as e:
        text = str(e)
        for name, flag in flags.items():
            text = text.replace(f"`{name}`", flag)
        if text == str(e):
            raise
        raise CliError(text) from None


def log(line: str) -> None:
    """A progress or notice line on stderr (stdout stays for results)."""
    print(line, file=sys.stderr, flush=True)


def os_error_message(e: OSError) -> str:
    """`path: reason` for an OSError (a full disk, a read-only file system, a denied path)."""
    reason = e.strerror or str(e)
    if e.filename is None:
        return reason
    other = f" -> {e.filename2}" if e.filename2 is not None else ""
    return f"{os.fsdecode(e.filename)}{other}: {reason}"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so the same cleanup runs."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (in the main thread only)."""

    def handler(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
