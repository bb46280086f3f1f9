"""`elm-mlx convert` and `elm-mlx quantize`."""

from __future__ import annotations

from pathlib import Path

from ..formats.convert import convert, quantize_dir
from ..formats.corenet import convert_corenet
from ..formats.modeldir import load, progress_bar, require_tokenizer
from ..quant import quality as qq
from ..quant.quantize import (
    RECIPES,
    QuantizeSpec,
    bits_per_weight,
    dir_size,
    matrix_shapes,
)
from .common import CliError, Command, flag_names, log, warn_without_tokenizer

# The flag of a group size that does not fit, per command (convert's carry a `--q-` prefix).
_Q_FLAGS = {"group_size": "--q-group-size"}
_FLAGS = {"group_size": "--group-size"}


def _add_convert(p) -> None:
    p.add_argument("--hf-path", help="hub id (apple/OpenELM-270M) or local dir")
    p.add_argument("--corenet-checkpoint", metavar="PT", help="CoreNet .pt state dict (instead "
                   "of --hf-path; read with torch.load(weights_only=True))")  # fmt: skip
    p.add_argument("--corenet-config", metavar="YAML", help="its CoreNet training config "
                   "(model.language_modeling.general_gpt)")  # fmt: skip
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
    p.add_argument(
        "-q", "--quantize", action="store_true", help="quantize tensor by tensor while converting"
    )
    _add_quant_flags(p, "--q-")


def _add_quant_flags(p, prefix: str) -> None:
    """`{prefix}bits`, `{prefix}group-size`, `{prefix}recipe` and `{prefix}scales-dtype`."""
    p.add_argument(f"{prefix}bits", type=int, help="bits per weight: 4 (default) or 8")
    p.add_argument(
        f"{prefix}group-size",
        type=int,
        help="32, 64 or 128 (default: 64, or the largest below it that fits the model)",
    )
    p.add_argument(
        f"{prefix}recipe",
        metavar="NAME|FILE",
        help="mixed-precision recipe: mixed-4-8, embed-8 or a JSON file",
    )
    p.add_argument(
        f"{prefix}scales-dtype",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of scales and biases (default: float32 on CPU, the model's dtype on GPU)",
    )


def _run_convert(args) -> None:
    corenet = args.corenet_checkpoint is not None or args.corenet_config is not None
    if corenet == (args.hf_path is not None):
        raise CliError("give either --hf-path or --corenet-checkpoint with --corenet-config")
    if corenet:
        _run_convert_corenet(args)
        return
    with flag_names(_Q_FLAGS):
        convert(
            args.hf_path,
            args.mlx_path,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            force=args.force,
            revision=args.revision,
            quantize=_convert_quant_spec(args),
            log=log,
        )


def _run_convert_corenet(args) -> None:
    if args.corenet_checkpoint is None or args.corenet_config is None:
        raise CliError("--corenet-checkpoint and --corenet-config go together")
    if args.revision is not None:
        raise CliError("--revision is for --hf-path hub ids")
    with flag_names(_Q_FLAGS):
        convert_corenet(
            args.corenet_checkpoint,
            args.corenet_config,
            args.mlx_path,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            force=args.force,
            quantize=_convert_quant_spec(args),
            log=log,
        )


def _convert_quant_spec(args):
    flags = ("q_bits", "q_group_size", "q_recipe", "q_scales_dtype")
    given = [f for f in flags if getattr(args, f) is not None]
    if not args.quantize:
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise CliError(f"{flags} only work with -q/--quantize")
        return None
    return _quant_spec(args, "--q-")


def _add_quantize(p) -> None:
    p.add_argument("--model", required=True, help="float model directory")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    _add_quant_flags(p, "--")
    p.add_argument("--scan", action="store_true", help="build a recipe from a sensitivity scan")
    p.add_argument("--target-bpw", type=float, help="bits per weight the scanned recipe meets")
    p.add_argument("--report", action="store_true", help="print quality against the float model")
    p.add_argument("--eval-text", metavar="FILE", help="held-out text for --scan and --report")
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens of it to use")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def _run_quantize(args) -> None:
    _check_quantize_flags(args)
    spec = _quant_spec(args, "--")
    float_model = windows = None
    if args.eval_text:
        float_model, tokenizer = load(args.model)
        tokenizer = require_tokenizer(tokenizer, args.model)
        windows = qq.text_windows(tokenizer, args.eval_text, max_tokens=args.eval_tokens)
    extra = {}
    if args.scan:
        spec.recipe = _scan(float_model, windows, spec, args.target_bpw)
        extra["quantize_recipe.json"] = spec.recipe.to_json()
    with flag_names(_FLAGS):
        model = quantize_dir(
            args.model, args.out, spec, force=args.force, extra_files=extra, log=log
        )
    print(f"{args.out}: {bits_per_weight(model):.3f} bits per weight, "
          f"{dir_size(args.out) / 1e6:.1f} MB")  # fmt: skip
    warn_without_tokenizer(args.out)
    if args.report:
        print(qq.report(float_model, model, windows, float_dir=args.model, quant_dir=args.out))


def _scan(model, windows, spec, target_bpw):
    """The least-damage recipe; a progress bar on a terminal, else a line per matrix."""
    with progress_bar(len(matrix_shapes(model.args)), "scan", log, unit="matrix") as bar:

        def progress(path: str, bits: int, kl: float) -> None:
            if bar:
                bar(1)
            else:
                log(f"scan {path} at {bits} bits: mean KL {kl:.3g}")

        with flag_names():
            return qq.scan_recipe(model, windows, spec, target_bpw, log=log, progress=progress)


def _check_quantize_flags(args) -> None:
    if args.scan and args.recipe:
        raise CliError("--scan builds its own recipe; drop --recipe")
    if args.scan != (args.target_bpw is not None):
        raise CliError("--scan and --target-bpw go together")
    if (args.scan or args.report) and not args.eval_text:
        raise CliError("--scan and --report need --eval-text FILE (held-out text)")


def _quant_spec(args, prefix: str):
    """The QuantizeSpec of the flags `_add_quant_flags(p, prefix)` added."""
    bits, group_size, recipe, scales_dtype = (
        getattr(args, prefix.lstrip("-").replace("-", "_") + name)
        for name in ("bits", "group_size", "recipe", "scales_dtype")
    )
    if recipe is not None and bits is not None:
        raise CliError(f"{prefix}bits conflicts with {prefix}recipe: the recipe sets the bits")
    is_file = recipe is not None and recipe not in RECIPES and Path(recipe).is_file()
    if is_file and group_size is not None:  # (a bad recipe name gets its own error)
        raise CliError(
            f"{prefix}group-size conflicts with a {prefix}recipe file: the file sets group sizes"
        )
    return QuantizeSpec(
        bits=4 if bits is None else bits,
        group_size=group_size,
        recipe=recipe,
        scales_dtype=scales_dtype,
    )


COMMANDS = {
    "convert": Command(
        help="convert an OpenELM checkpoint (HF layout) into an MLX model directory",
        description="Convert apple/OpenELM-* (a hub id or a local directory with config.json and "
        "model.safetensors, sharded safetensors or pytorch_model.bin) into an MLX model "
        "directory that elm_mlx and mlx-lm load. Apple's repos ship no tokenizer: pass the "
        "Llama-2 SentencePiece tokenizer.model with --tokenizer. A CoreNet checkpoint comes "
        "in with --corenet-checkpoint model.pt --corenet-config its_training.yaml.",
        add_flags=_add_convert,
        run=_run_convert,
    ),
    "quantize": Command(
        help="quantize a float model directory (4/8-bit, mixed recipes, sensitivity scan)",
        description="Affine group quantization recorded in config.json as mlx-lm records it. "
        "Recipes: mixed-4-8, embed-8, or a JSON file (module path or pattern -> "
        "{bits, group_size} or false). --scan measures each matrix's damage on --eval-text "
        "and writes the least-damage recipe for --target-bpw.",
        add_flags=_add_quantize,
        run=_run_quantize,
    ),
}
