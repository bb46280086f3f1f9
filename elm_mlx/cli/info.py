"""`elm-mlx info`: per-layer widths and parameter count."""

from __future__ import annotations

from pathlib import Path

from ..formats.modeldir import read_config
from ..model.config import PRESETS, describe, preset
from .common import CliError, Command, model_path


def _add_info(p) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default="nano",
        help="a preset name such as OpenELM-270M, a model directory, or nano (the shipped "
        "nano model, the default)",
    )


def _run_info(args) -> None:
    name = args.model
    if name == "nano" and not Path(name).is_dir():
        name = model_path(None)
    if Path(name).is_dir():
        model_args = read_config(Path(name))  # errors name the file
        print(f"{name}")
    elif name.split("/")[-1] in PRESETS:
        model_args = preset(name)
        print(name.split("/")[-1])
    else:
        raise CliError(
            f"{name!r} is neither a model directory nor a preset; presets: {', '.join(PRESETS)}"
        )
    print(describe(model_args))


COMMANDS = {
    "info": Command(
        help="describe a model: per-layer widths and parameter count",
        description="Print the per-layer table (query heads, KV heads, FFN width) and parameter "
        "count of a published OpenELM (e.g. OpenELM-270M) or of a converted model directory.",
        add_flags=_add_info,
        run=_run_info,
    ),
}
