"""The `elm-mlx` command line: the only place argparse lives.

This entry point loads the system OpenBLAS before anything imports MLX (MLX's CPU
matmuls then use it), then hands over to `app`, where the parser and the command
modules (`info`, `generate`, `convert`, `train`, ...) live. Each command module
lists its commands in `COMMANDS`, a `Command` each: help lines, `_add_<name>(parser)`
for its flags and `_run_<name>(args)`.
Library errors become one `error: ...` line and exit status 1; usage errors exit 2.
"""

from __future__ import annotations

import sys


def _blas_first() -> bool:
    from ..runtime.blas import BlasError, preload_blas
    from ..runtime.memory import keep_freed_memory

    try:
        preload_blas()  # must precede any MLX import
    except BlasError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    keep_freed_memory()
    return True


def main(argv: list[str] | None = None) -> int:
    if not _blas_first():
        return 1
    from .app import main as app_main

    return app_main(argv)


def run_command(run, args) -> int:
    """Run `run(args)` as every elm-mlx command runs (the examples use it): OpenBLAS before
    MLX, a user mistake as one `error: ...` line and status 1, Ctrl-C as status 130."""
    if not _blas_first():
        return 1
    from .app import run as app_run

    return app_run(run, args)
