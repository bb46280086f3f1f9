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
    p.add_argument(
        "model",
        nargs="?",
        default="nano",
        help="a preset name such as OpenELM-270M, a model directory, or nano (the shipped "
        "nano model, the default)",
    )


def _run_info(args) -> None:
    from pathlib import Path

    from .model.config import PRESETS, describe, preset

    name = args.model
    if name == "nano" and not Path(name).is_dir():
        name = _model_path(None)
    if Path(name).is_dir():
        from .formats.modeldir import read_config

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
    p.add_argument(
        "-q", "--quantize", action="store_true", help="quantize tensor by tensor while converting"
    )
    p.add_argument("--q-bits", type=int, help="bits per weight: 4 (default) or 8")
    p.add_argument("--q-group-size", type=int, help="32, 64 (default) or 128")
    p.add_argument(
        "--q-recipe", metavar="NAME|FILE", help="mixed-precision recipe (see elm-mlx quantize)"
    )
    p.add_argument(
        "--q-scales-dtype",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of scales and biases (default: float32 on CPU, the model's dtype on GPU)",
    )


def _run_convert(args) -> None:
    from .formats.convert import convert

    convert(
        args.hf_path,
        args.mlx_path,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        force=args.force,
        revision=args.revision,
        quantize=_convert_quant_spec(args),
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )


def _convert_quant_spec(args):
    flags = ("q_bits", "q_group_size", "q_recipe", "q_scales_dtype")
    given = [f for f in flags if getattr(args, f) is not None]
    if not args.quantize:
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise CliError(f"{flags} only work with -q/--quantize")
        return None
    return _quant_spec(args.q_bits, args.q_group_size, args.q_recipe, args.q_scales_dtype)


# ---- quantize ---------------------------------------------------------------


def _add_quantize(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a float model directory (4/8-bit, mixed recipes, sensitivity scan)",
        description="Affine group quantization recorded in config.json as mlx-lm records it. "
        "Recipes: mixed-4-8, embed-8, or a JSON file (module path or pattern -> "
        "{bits, group_size} or false). --scan measures each matrix's damage on --eval-text "
        "and writes the least-damage recipe for --target-bpw.",
    )
    p.add_argument("--model", required=True, help="float model directory")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--bits", type=int, help="4 (default) or 8")
    p.add_argument("--group-size", type=int, help="32, 64 (default) or 128")
    p.add_argument("--recipe", metavar="NAME|FILE", help="mixed-precision recipe")
    p.add_argument(
        "--scales-dtype",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of scales and biases (default: float32 on CPU, the model's dtype on GPU)",
    )
    p.add_argument("--scan", action="store_true", help="build a recipe from a sensitivity scan")
    p.add_argument("--target-bpw", type=float, help="bits per weight the scanned recipe meets")
    p.add_argument("--report", action="store_true", help="print quality against the float model")
    p.add_argument("--eval-text", metavar="FILE", help="held-out text for --scan and --report")
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens of it to use")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def _run_quantize(args) -> None:
    from .quant import quality as qq
    from .quant.quantize import bits_per_weight, dir_size, quantize_dir

    _check_quantize_flags(args)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    spec = _quant_spec(args.bits, args.group_size, args.recipe, args.scales_dtype)
    windows = None
    if args.eval_text:
        windows = qq.text_windows(args.model, args.eval_text, max_tokens=args.eval_tokens)
    extra = {}
    if args.scan:
        spec.recipe = qq.scan_recipe(args.model, windows, spec, args.target_bpw, log)
        extra["quantize_recipe.json"] = spec.recipe.to_json()
    model = quantize_dir(args.model, args.out, spec, force=args.force, extra_files=extra, log=log)
    print(f"{args.out}: {bits_per_weight(model):.3f} bits per weight, "
          f"{dir_size(args.out) / 1e6:.1f} MB")  # fmt: skip
    if args.report:
        print(qq.report(args.model, args.out, model, windows))


def _check_quantize_flags(args) -> None:
    if args.scan and args.recipe:
        raise CliError("--scan builds its own recipe; drop --recipe")
    if args.scan != (args.target_bpw is not None):
        raise CliError("--scan and --target-bpw go together")
    if (args.scan or args.report) and not args.eval_text:
        raise CliError("--scan and --report need --eval-text FILE (held-out text)")


def _quant_spec(bits, group_size, recipe, scales_dtype):
    from pathlib import Path

    from .quant.quantize import RECIPES, QuantizeSpec

    if recipe is not None and bits is not None:
        raise CliError("a bits flag conflicts with a recipe: the recipe sets the bits")
    is_file = recipe is not None and recipe not in RECIPES and Path(recipe).is_file()
    if is_file and group_size is not None:  # (a bad recipe name gets its own error)
        raise CliError("a group size flag conflicts with a recipe file: the file sets them")
    return QuantizeSpec(
        bits=4 if bits is None else bits,
        group_size=64 if group_size is None else group_size,
        recipe=recipe,
        scales_dtype=scales_dtype,
    )


# ---- generate / chat -----------------------------------------------------------

_INSTRUCT_RULE = (
    "The chat template is applied when the --model name (directory or hub id) contains "
    "'instruct' (any case) or --system is given; --raw sends the prompt as is."
)


def _add_generation_flags(p) -> None:
    p.add_argument(
        "--model",
        help="model directory or hub id, with tokenizer.model (default: the shipped nano "
        "model, a small base model trained on Shakespeare's plays, no chat template)",
    )
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (256)")
    p.add_argument(
        "--temp",
        type=float,
        help="temperature; 0 = greedy (default: the model's generation_config.json, else 0)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        help="nucleus mass in (0, 1]; 1 = off (default: generation_config.json, else 1)",
    )
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely; 0 = off")
    p.add_argument(
        "--min-p", type=float, default=0.0, help="drop tokens below min-p x the top one; 0 = off"
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 0; 1 = off (Apple's examples use 1.2)",
    )
    p.add_argument(
        "--repetition-context-size", type=int, default=20, help="tokens the penalty sees (20)"
    )
    p.add_argument("--seed", type=int, help="sampling seed (default: a fresh one per run)")
    p.add_argument("--max-kv-size", type=int, help="rotating KV window, to go past the context")
    p.add_argument("--system", help="system message (applies the chat template)")
    p.add_argument("--adapter-path", help="LoRA adapters trained by `elm-mlx lora` to apply")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="compute dtype of a float model (auto: float32 on the CPU, where MLX's "
        "half-precision kernels are slow; bfloat16 on a GPU); quantized models keep theirs",
    )
    p.add_argument(
        "--no-fast-path",
        action="store_true",
        help="on the CPU, run MLX's own kernels instead of the numpy/BLAS decoding path",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="model, BLAS, fast path and prompt details"
    )


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt, streamed to stdout",
        description="Generate text from a prompt. Text streams to stdout; prompt and generation "
        "speed and peak memory go to stderr. " + _INSTRUCT_RULE,
    )
    _add_generation_flags(p)
    p.add_argument("--prompt", required=True, help="prompt text, or - to read it from stdin")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="never apply the chat template")


def _generation_settings(args, **extra):
    from .generation.generate import GenerationSettings

    suggested = _suggested_sampling(_model_path(args.model))
    return GenerationSettings(
        max_tokens=args.max_tokens,
        temp=args.temp if args.temp is not None else suggested.get("temperature", 0.0),
        top_p=args.top_p if args.top_p is not None else suggested.get("top_p", 1.0),
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size,
        seed=args.seed,
        max_kv_size=args.max_kv_size,
        **extra,
    )


def _load_for_generation(args):
    from .generation.loading import load_for_generation

    model, tokenizer, report = load_for_generation(
        args.model,
        adapter_path=args.adapter_path,
        dtype=args.dtype,
        fast_path=False if args.no_fast_path else None,
    )
    if args.verbose:
        for line in report.lines():
            print(line, file=sys.stderr)
    return model, tokenizer


def _suggested_sampling(path: str) -> dict:
    """temperature / top_p from a local model directory's generation_config.json (HF's file),
    used for the flags the user leaves out; {} when there is none or it does not sample."""
    import json
    from pathlib import Path

    file = Path(path) / "generation_config.json"
    try:
        config = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict) or not config.get("do_sample"):
        return {}
    return {k: config[k] for k in ("temperature", "top_p") if isinstance(config.get(k), float)}


def _model_path(model: str | None) -> str:
    """The --model value, or the shipped nano model when none is given."""
    if model is not None:
        return model
    from .formats.modeldir import default_model_path

    return str(default_model_path())


def _is_instruct(model: str) -> bool:
    return "instruct" in str(model).rstrip("/\\").replace("\\", "/").split("/")[-1].lower()


def _read_prompt(value: str) -> str:
    if value != "-":
        return value
    text = sys.stdin.read().removesuffix("\n")
    if not text:
        raise CliError("--prompt - read an empty prompt from stdin")
    return text


def _prompt_text(tokenizer, prompt: str, args) -> str:
    if args.raw or (args.system is None and not _is_instruct(args.model or "")):
        return prompt
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    return tokenizer.apply_chat_template(system + [{"role": "user", "content": prompt}])


def _print_summary(last) -> None:
    if last is None:
        print("generated no tokens", file=sys.stderr)
        return
    if last.finish_reason == "context":
        print(
            "stopped: the model's context is full; --max-kv-size N keeps generating with a "
            "rotating window of N tokens",
            file=sys.stderr,
        )
    print(
        f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.2f} tokens/s\n"
        f"generation: {last.generation_tokens} tokens, {last.generation_tps:.2f} tokens/s\n"
        f"peak memory: {last.peak_memory:.3f} GB",
        file=sys.stderr,
    )


def _run_generate(args) -> None:
    from .generation.generate import stream_generate

    if args.raw and args.system is not None:
        raise CliError("--system needs the chat template; drop --raw")
    settings = _generation_settings(args, stop=tuple(args.stop or ()))
    prompt = _read_prompt(args.prompt)
    model, tokenizer = _load_for_generation(args)
    text = _prompt_text(tokenizer, prompt, args)
    if args.verbose:
        print(f"chat template: {'applied' if text != prompt else 'not applied'}", file=sys.stderr)
    last = None
    for last in stream_generate(model, tokenizer, text, settings=settings):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _print_summary(last)


def _add_chat(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with an Instruct model (keeps the KV cache between turns)",
        description="Interactive chat: one message per line on stdin; the reply streams to "
        "stdout. The KV cache is kept between turns, so only the new turn is processed. "
        "/reset starts over, /exit or Ctrl-D quits. Without --model it runs the shipped nano "
        "model, a base model never tuned for chat: for real answers pass a converted "
        "OpenELM-*-Instruct directory.",
    )
    _add_generation_flags(p)


def _run_chat(args) -> None:
    from .generation.generate import ChatSession

    settings = _generation_settings(args)
    model, tokenizer = _load_for_generation(args)
    session = ChatSession(model, tokenizer, system=args.system, settings=settings)
    interactive = sys.stdin.isatty()
    if interactive:
        print("/reset starts over, /exit or Ctrl-D quits", file=sys.stderr)
    try:
        while (line := _read_line(interactive)) is not None and _chat_turn(session, line, args):
            pass
    except KeyboardInterrupt:
        print(file=sys.stderr)


def _read_line(interactive: bool) -> str | None:
    if interactive:
        print(">>> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return None if line == "" else line.strip()


def _chat_turn(session, message: str, args) -> bool:
    """Answer one line; False ends the chat."""
    from .model.cache import ContextLengthError

    if message in ("/exit", "/quit"):
        return False
    if message == "/reset":
        session.reset()
        print("(conversation cleared)", file=sys.stderr)
    elif message:
        try:
            last = None
            for last in session.send(message):
                sys.stdout.write(last.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            if args.verbose:
                _print_summary(last)
        except ContextLengthError as e:
            print(f"error: {e}; or /reset to start over", file=sys.stderr)
    return True


# ---- lora / fuse --------------------------------------------------------------


def _add_lora(sub) -> None:
    p = sub.add_parser(
        "lora",
        help="fine-tune with LoRA (QLoRA on a quantized model), DoRA (--dora) or fully (--full)",
        description="Train adapters on DIR/train.jsonl, validating on DIR/valid.jsonl. Records: "
        '{"text"}, {"prompt","completion"} or {"messages":[...]} (Instruct template). Writes '
        "ADAPTER_PATH/adapters.safetensors (best validation), adapter_config.json, checkpoint/ "
        "(for --resume; Ctrl-C saves one), metrics.jsonl and loss.png. Data parallel: start "
        "it under `mlx.launch -n N --backend ring`.",
    )
    p.add_argument("--model", required=True, help="model directory (float or quantized)")
    p.add_argument("--data", required=True, help="directory with train.jsonl and valid.jsonl")
    p.add_argument("--adapter-path", default="adapters", help="output directory (adapters)")
    p.add_argument("--resume", action="store_true", help="continue from ADAPTER_PATH/checkpoint")
    p.add_argument("--force", action="store_true", help="replace adapters already in ADAPTER_PATH")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--full", action="store_true", help="train every weight instead of LoRA")
    kind.add_argument(
        "--dora", action="store_true", help="DoRA: LoRA plus a learned magnitude per output row"
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (8)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--scale", type=float, help="LoRA scale (20); alpha = scale * rank")
    scale.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / rank")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (0)")
    p.add_argument(
        "--num-layers", type=int, default=-1, help="adapt the last N blocks (-1 = all, the default)"
    )
    p.add_argument(
        "--targets",
        default="qkv_proj,out_proj,proj_1,proj_2",
        help="comma-separated projections (all four)",
    )
    p.add_argument("--mask-prompt", action="store_true", help="loss on completions only")
    p.add_argument(
        "--max-seq-length", type=int, default=2048, help="truncate longer records (2048)"
    )
    p.add_argument("--iters", type=int, default=1000, help="optimizer steps (1000)")
    p.add_argument("--batch-size", type=int, default=4, help="records per step, all processes (4)")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate (1e-4)")
    p.add_argument(
        "--warmup", type=int, default=0, help="linear warmup steps, then cosine decay (0)"
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (1)")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute whole blocks")
    p.add_argument(
        "--recompute-attention", action="store_true", help="recompute attention only (less memory)"
    )
    p.add_argument(
        "--max-grad-norm", type=float, default=0.0, help="clip gradients (0 = off, the default)"
    )
    p.add_argument(
        "--val-every", type=int, default=100, help="validate every N steps (100; 0 = off)"
    )
    p.add_argument("--val-batches", type=int, default=25, help="validation batches (25; 0 = all)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (100)")
    p.add_argument("--report-every", type=int, default=10, help="progress line every N steps (10)")
    p.add_argument("--seed", type=int, default=0, help="adapter init, data order, dropout (0)")


def _lora_config(args):
    from .training.lora import LoRAConfig

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    common = dict(dropout=args.dropout, num_layers=args.num_layers, targets=targets)
    if args.full:
        return LoRAConfig(fine_tune_type="full", **common)
    common["fine_tune_type"] = "dora" if args.dora else "lora"
    if args.alpha is not None:
        return LoRAConfig.with_alpha(args.alpha, rank=args.rank, **common)
    return LoRAConfig(rank=args.rank, scale=20.0 if args.scale is None else args.scale, **common)


def _train_args(args):
    from .training.trainer import TrainArgs

    names = (
        "iters", "batch_size", "learning_rate", "warmup", "weight_decay", "grad_accum",
        "grad_checkpoint", "recompute_attention", "max_grad_norm", "val_every", "val_batches",
        "save_every", "report_every", "seed",
    )  # fmt: skip
    return TrainArgs(out_dir=args.adapter_path, **{n: getattr(args, n) for n in names})


_ADAPTER_FLAGS = {
    "fine_tune_type": "--dora / --full",
    "num_layers": "--num-layers",
    "rank": "--rank",
    "scale": "--scale / --alpha",
    "dropout": "--dropout",
    "keys": "--targets",
}


def _check_resume_config(adapter_path: str, config, n_layers: int) -> None:
    from .training.lora import read_adapter_config

    saved = read_adapter_config(adapter_path)
    before, now = saved.to_dict(n_layers), config.to_dict(n_layers)
    before.update(before.pop("lora_parameters", {}))
    now.update(now.pop("lora_parameters", {}))
    diffs = [
        f"{_ADAPTER_FLAGS.get(k, k)} was {before.get(k)}, now {now.get(k)}"
        for k in sorted(set(before) | set(now))
        if before.get(k) != now.get(k)
    ]
    if diffs:
        raise CliError(
            f"--resume: {adapter_path} was trained with other adapter settings "
            f"({'; '.join(diffs)}); repeat the original flags"
        )


def _check_fresh_adapter_path(adapter_path: str) -> None:
    from pathlib import Path

    from .training.checkpoint import CHECKPOINT_DIR
    from .training.lora import ADAPTER_FILE, CONFIG_FILE

    path = Path(adapter_path)
    held = [n for n in (ADAPTER_FILE, CONFIG_FILE, CHECKPOINT_DIR) if (path / n).exists()]
    if held:
        raise CliError(
            f"{adapter_path} already holds {', '.join(held)}; --resume continues that run, "
            "--force replaces it, or choose another --adapter-path"
        )


def _run_lora(args) -> None:
    from pathlib import Path

    import mlx.core as mx

    from .formats.modeldir import load, require_tokenizer
    from .training.checkpoint import remove_checkpoint
    from .training.data import check_batch_size, load_datasets
    from .training.lora import apply_lora, num_trainable, write_adapter_config
    from .training.trainer import evaluate, train

    group = mx.distributed.init()
    say = print if group.rank() == 0 else (lambda *_: None)
    config, targs = _lora_config(args), _train_args(args)
    config.validate()
    targs.validate()
    model, tokenizer = load(args.model)
    tokenizer = require_tokenizer(tokenizer, args.model)
    sets = load_datasets(
        args.data, tokenizer, max_seq_length=args.max_seq_length,
        mask_prompt=args.mask_prompt, require_valid=args.val_every > 0,
    )  # fmt: skip
    for dataset in sets.values():
        say(dataset.summary())
    check_batch_size(sets["train"], targs.batch_size, group.size())  # before anything is written
    n_layers = len(model.layers)
    if args.resume:
        _check_resume_config(args.adapter_path, config, n_layers)
    elif not args.force:
        _check_fresh_adapter_path(args.adapter_path)
    apply_lora(model, config, seed=args.seed)
    total = model.args.num_parameters()
    say(f"trainable parameters: {num_trainable(model):,} of {total:,} "
        f"({100 * num_trainable(model) / total:.3f}%), {group.size()} process(es)")  # fmt: skip
    if group.rank() == 0:
        if args.force and not args.resume:
            remove_checkpoint(Path(args.adapter_path))  # a later --resume must not pick it up
        write_adapter_config(args.adapter_path, config, n_layers)
    state = train(model, targs, sets["train"], sets.get("valid"), resume=args.resume, group=group)
    if state.best_val is not None:
        say(f"best validation loss {state.best_val:.4f} at step {state.best_step}")
    if "test" in sets:
        loss = evaluate(model, sets["test"], targs.batch_size, 0, group)
        say(f"test loss {loss:.4f} (final weights)")


def _add_fuse(sub) -> None:
    p = sub.add_parser(
        "fuse",
        help="merge trained adapters into the model and save a plain model directory",
        description="Adds each LoRA update into its base weight. A quantized base is "
        "re-quantized with its own settings unless --de-quantize writes a float model.",
    )
    p.add_argument("--model", required=True, help="the base model directory")
    p.add_argument("--adapter-path", default="adapters", help="adapter directory (adapters)")
    p.add_argument("--save-path", required=True, help="output model directory")
    p.add_argument("--de-quantize", action="store_true", help="write float weights")
    p.add_argument("--force", action="store_true", help="replace an existing --save-path")


def _run_fuse(args) -> None:
    from pathlib import Path

    from .formats.modeldir import carried_files, check_not_source, check_target, load, save_model
    from .training.lora import fuse_lora, load_adapters

    check_not_source(args.save_path, args.model, "--save-path")
    check_target(Path(args.save_path).absolute(), force=args.force)  # before the work
    model, tokenizer = load(args.model)
    load_adapters(model, args.adapter_path)
    fuse_lora(model, de_quantize=args.de_quantize)
    tokenizer_file = tokenizer.model_file if tokenizer is not None else None
    save_model(
        args.save_path, model, model.args, tokenizer=tokenizer_file, force=args.force,
        extra_files=carried_files(args.model),
    )  # fmt: skip
    print(f"fused {args.adapter_path} into {args.model}: wrote {args.save_path}")


# ---- entry point --------------------------------------------------------------

COMMANDS = {
    "info": (_add_info, _run_info),
    "generate": (_add_generate, _run_generate),
    "chat": (_add_chat, _run_chat),
    "convert": (_add_convert, _run_convert),
    "quantize": (_add_quantize, _run_quantize),
    "lora": (_add_lora, _run_lora),
    "fuse": (_add_fuse, _run_fuse),
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


def run_command(run, args) -> int:
    """Run `run(args)` the way every elm-mlx command runs; returns the exit status.

    The system OpenBLAS is loaded before anything imports MLX, a user mistake
    (bad value, missing file) is one `error: ...` line and status 1, Ctrl-C is
    status 130. The examples use it too.
    """
    from .runtime.blas import BlasError, preload_blas

    try:
        preload_blas()  # must precede any MLX import: a fast BLAS for MLX's CPU matmuls
        run(args)
    except (BlasError, *_user_errors()) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(COMMANDS[args.command][1], args)


if __name__ == "__main__":
    sys.exit(main())
