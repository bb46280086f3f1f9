"""`elm-mlx generate` and `elm-mlx chat`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..generation.generate import ChatSession, GenerationSettings, stream_generate
from ..generation.loading import load_for_generation
from ..model.cache import ContextLengthError
from .common import CliError, model_path

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
    suggested = _suggested_sampling(model_path(args.model))
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

    file = Path(path) / "generation_config.json"
    try:
        config = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict) or not config.get("do_sample"):
        return {}
    return {k: config[k] for k in ("temperature", "top_p") if isinstance(config.get(k), float)}


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


COMMANDS = {
    "generate": (_add_generate, _run_generate),
    "chat": (_add_chat, _run_chat),
}
