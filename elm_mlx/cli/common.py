"""What every elm-mlx command shares: the CLI's own error and the --model default."""

from __future__ import annotations

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
