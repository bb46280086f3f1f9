"""What every elm-mlx command shares: the command record, the model flags and their
loading, the CLI's own error, faults as one line, stderr logging and the --model default."""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..formats.modeldir import TOKENIZER_FILE, default_model_path
from ..generation.loading import load_for_generation
from ..quant.quantize import GroupSizeError


@dataclass(frozen=True)
class Command:
    """One subcommand: `help` is its line in `elm-mlx --help`, `description` opens its own
    --help, `add_flags(parser)` adds its flags and `run(args)` does the work."""

    help: str
    description: str
    add_flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


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


def display_name(path: str) -> str:
    """A model's name where a server or a file reports it: its directory's or hub id's last part."""
    return Path(path.rstrip("/\\")).name or path


def add_model_flags(p: argparse.ArgumentParser, model_help: str) -> None:
    """--model, --adapter-path and --dtype: the model a command loads for generation."""
    p.add_argument("--model", help=model_help)
    p.add_argument("--adapter-path", help="LoRA adapters trained by `elm-mlx lora` to apply")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="compute dtype of a float model (auto: float32 on the CPU, where MLX's "
        "half-precision kernels are slow; bfloat16 on a GPU); quantized models keep theirs",
    )


def add_decoding_flags(p: argparse.ArgumentParser, verbose_help: str) -> None:
    """--no-fast-path and -v, for the commands that decode with `load_model`."""
    p.add_argument(
        "--no-fast-path",
        action="store_true",
        help="on the CPU, decode with MLX's own kernels instead of the numpy/BLAS path",
    )
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)


def load_model(args: argparse.Namespace):
    """(model, tokenizer) of the model flags, loaded for generation; -v prints what was chosen."""
    model, tokenizer, report = load_for_generation(
        args.model,
        adapter_path=args.adapter_path,
        dtype=args.dtype,
        fast_path=not args.no_fast_path,
    )
    if args.verbose:
        for line in report.lines():
            print(line, file=sys.stderr)
    return model, tokenizer


def as_flags(
    message: str, renames: Mapping[str, str] | None = None, *, leading: bool = False
) -> str:
    """A library message worded with this command's flags: each argument it names in
    backticks, `name` or `name=value`, becomes `renames[name]` (default `--name-with-dashes`),
    followed by the value unless that is True. With `leading`, a message that starts with a
    bare name in `renames` (a settings check's own wording) starts with its flag instead."""
    renames = renames or {}

    def flag(m: re.Match) -> str:
        name, value = m[1], m[2]
        text = renames.get(name, "--" + name.replace("_", "-"))
        return text if value in (None, "True") else f"{text} {value}"

    text = re.sub(r"`([a-z_]+)(?:=([^`]*))?`", flag, message)
    name, space, rest = text.partition(" ")
    return renames[name] + space + rest if leading and name in renames else text


@contextmanager
def flag_names(
    renames: Mapping[str, str] | None = None, *, leading: bool = False
) -> Iterator[None]:
    """A user error raised in the block, worded with flags (`as_flags`) where its message names
    arguments, and a group size error's fix with the command's flag (`renames["group_size"]`);
    any other error goes on as it was."""
    renames = renames or {}
    try:
        yield
    except USER_ERRORS as e:
        text = as_flags(str(e), renames, leading=leading)
        if isinstance(e, GroupSizeError) and e.fits is not None and "group_size" in renames:
            text += f" ({renames['group_size']} {e.fits})"
        if text == str(e):
            raise
        raise CliError(text) from None


def log(line: str) -> None:
    """A progress or notice line on stderr (stdout stays for results)."""
    print(line, file=sys.stderr, flush=True)


def warn_without_tokenizer(out: str | Path) -> None:
    """One warning line when the model directory just written at `out` has no tokenizer.model
    (its input had none): generate, chat, serve and perplexity cannot use it as it is."""
    if not (Path(out) / TOKENIZER_FILE).is_file():
        log(
            f"warning: {out} has no tokenizer.model (its input model has none), so "
            f"`elm-mlx generate` cannot use it; copy the Llama-2 SentencePiece tokenizer.model "
            f"into {out}"
        )


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


class StdoutClosed(OSError):
    """The command was started with its standard output closed (`>&-`) and has something
    to write there."""


class ClosedStdout:
    """`sys.stdout` for a process started with its standard output closed (Python then
    has None there): what is written ends the command with one error line, status 1."""

    def write(self, text: str) -> int:
        if not text:
            return 0
        raise StdoutClosed(
            errno.EBADF,
            "standard output is closed; give the command somewhere to write its output "
            "(a terminal, a file or a pipe)",
        )

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def quiet_stdout() -> None:
    """After a broken pipe (`| head`): send what stdout still holds to /dev/null, so that
    nothing fails again when Python flushes it at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured)
        pass
