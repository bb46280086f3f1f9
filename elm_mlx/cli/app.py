"""The elm-mlx parser and command table. Imported only after the BLAS choice (MLX loads here)."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..formats.files import OutputExistsError
from ..formats.modeldir import DefaultModelMissingError
from . import convert, export, generate, info, serve, train
from . import eval as eval_cmd
from .common import (
    USER_ERRORS,
    ClosedStdout,
    Terminated,
    os_error_message,
    quiet_stdout,
    terminate_as_interrupt,
)

COMMANDS = {
    **info.COMMANDS,
    **generate.COMMANDS,
    **convert.COMMANDS,
    **train.COMMANDS,
    **export.COMMANDS,
    **eval_cmd.COMMANDS,
    **serve.COMMANDS,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elm-mlx",
        description="Run, quantize and fine-tune Apple's OpenELM models with MLX.",
    )
    parser.add_argument("--version", action="version", version=f"elm-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.description)
        command.add_flags(p)
    return parser


def run(run_fn, args) -> int:
    """Run one command: a user mistake or an I/O fault is one `error: ...` line and status 1;
    Ctrl-C gives 130 and SIGTERM 143, both after the command's temporary outputs are gone."""
    if sys.stdout is None:  # started with `>&-`: the first write says so and ends it
        sys.stdout = ClosedStdout()
    try:
        with terminate_as_interrupt():
            run_fn(args)
    except BrokenPipeError:  # the reader has gone (`| head`): stop quietly, like Unix tools
        quiet_stdout()
        return 0
    except USER_ERRORS as e:
        message = os_error_message(e) if isinstance(e, OSError) else str(e)
        print(f"error: {message}{_flag_hint(e, args)}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 1
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _flag_hint(e: BaseException, args) -> str:
    """The flag that avoids a library error, where this command has it."""
    if isinstance(e, OutputExistsError) and e.replaceable and hasattr(args, "force"):
        return "; pass --force to replace it"
    if isinstance(e, DefaultModelMissingError) and hasattr(args, "model"):
        return "; or pass --model DIR"
    return ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(COMMANDS[args.command].run, args)
