"""The elm-mlx parser and command table. Imported only after the BLAS choice (MLX loads here)."""

from __future__ import annotations

import argparse
import sys

from . import convert, export, generate, info, train
from .common import USER_ERRORS

COMMANDS = {
    **info.COMMANDS,
    **generate.COMMANDS,
    **convert.COMMANDS,
    **train.COMMANDS,
    **export.COMMANDS,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elm-mlx",
        description="Run, quantize and fine-tune Apple's OpenELM models with MLX.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def run(run_fn, args) -> int:
    """Run one command: a user mistake is one `error: ...` line and status 1, Ctrl-C 130."""
    try:
        run_fn(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(COMMANDS[args.command][1], args)
