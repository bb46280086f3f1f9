"""The `elm-mlx` command line. The only module that uses argparse.

Each subcommand is a pair: `_add_<name>(subparsers)` declares its flags and
`_run_<name>(args)` runs it with plain values taken from `args`. Library
errors become one `error: ...` line and exit status 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import sys


class CliError(Exception):
    """A user mistake caught in the CLI layer itself."""


# Errors that are the user's input, reported as one line without a traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    return (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, CliError)


# ---- info -------------------------------------------------------------------


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="describe a model: per-layer widths and parameter count",
        description="Print the per-layer table (query heads, KV heads, FFN width) and parameter "
        "count of a published OpenELM (e.g. OpenELM-270M) or of a converted model directory.",
    )
    p.add_argument("model", help="a preset name such as OpenELM-270M, or a model directory")


def _run_info(args) -> None:
    from pathlib import Path

    from .config import PRESETS, ModelArgs, describe, preset

    if Path(args.model).is_dir():
        import json

        config_file = Path(args.model) / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{config_file} not found; is {args.model} a model directory?")
        model_args = ModelArgs.from_dict(json.loads(config_file.read_text()))
        print(f"{args.model}")
    elif args.model.split("/")[-1] in PRESETS:
        model_args = preset(args.model)
        print(args.model.split("/")[-1])
    else:
        raise CliError(
            f"{args.model!r} is neither a model directory nor a preset; "
            f"presets: {', '.join(PRESETS)}"
        )
    print(describe(model_args))


# ---- convert ----------------------------------------------------------------


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an OpenELM checkpoint (HF layout) into an MLX model directory",
        description="Convert apple/OpenELM-* (a hub id or a local directory with config.json and "
        "model.safetensors, sharded safetensors or pytorch_model.bin) into an MLX model "
        "directory that elm_mlx and mlx-lm load. Apple's repos ship no tokenizer: pass the "
        "Llama-2 SentencePiece tokenizer.model with --tokenizer.",
    )
    p.add_argument("--hf-path", required=True, help="hub id (apple/OpenELM-270M) or local dir")
    p.add_argument("--mlx-path", required=True, help="output directory (written atomically)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="output dtype (default: the source's; float16 overflows for 3B)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH|HUB_ID",
        help="Llama-2 tokenizer.model file, a directory holding it, or a hub id "
        "(default: tokenizer.model in the source)",
    )
    p.add_argument("--revision", help="hub branch, tag or commit of --hf-path")
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path")


def _run_convert(args) -> None:
    from .convert import convert

    convert(
        args.hf_path,
        args.mlx_path,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        force=args.force,
        revision=args.revision,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )


# ---- entry point --------------------------------------------------------------

COMMANDS = {
    "info": (_add_info, _run_info),
    "convert": (_add_convert, _run_convert),
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


def main(argv: list[str] | None = None) -> int:
    from .blas import BlasError, preload_blas

    try:
        preload_blas()  # must precede any MLX import: a fast BLAS for MLX's CPU matmuls
    except BlasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command][1](args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
