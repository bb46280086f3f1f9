"""`elm-mlx generate` and `elm-mlx chat`."""

from __future__ import annotations

import os
import sys
from contextlib import closing

from ..generation.generate import ChatSession, chat_prompt, stream_generate
from ..generation.loading import generation_settings, is_instruct
from ..model.cache import ContextLengthError
from .common import (
    CliError,
    Command,
    StdoutClosed,
    Terminated,
    add_decoding_flags,
    add_model_flags,
    flag_names,
    load_model,
    quiet_stdout,
)

_INSTRUCT_RULE = (
    "The chat template is applied when the --model name (directory or hub id) contains "
    "'instruct' (any case) or --system is given; --raw sends the prompt as is."
)
# GenerationSettings fields that have a flag of the same name.
_FLAGS = {
    name: "--" + name.replace("_", "-")
    for name in (
        "max_tokens", "temp", "top_p", "top_k", "min_p", "repetition_penalty",
        "repetition_context_size", "seed", "stop", "max_kv_size",
    )
}  # fmt: skip


def _add_generation_flags(p) -> None:
    add_model_flags(
        p,
        "model directory or hub id, with tokenizer.model (default: the shipped nano model, a "
        "small base model trained on Shakespeare's plays, no chat template)",
    )
    # No defaults here: what a flag leaves out comes from the model or GenerationSettings.
    p.add_argument("--max-tokens", type=int, help="most tokens to generate (256)")
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
    p.add_argument(
        "--top-k",
        type=int,
        help="sample among the k most likely; 0 = off (default: generation_config.json, else 0)",
    )
    p.add_argument("--min-p", type=float, help="drop tokens below min-p x the top one; 0 = off")
    p.add_argument(
        "--repetition-penalty", type=float, help="> 0; 1 = off (Apple's examples use 1.2)"
    )
    p.add_argument("--repetition-context-size", type=int, help="tokens the penalty sees (20)")
    p.add_argument("--seed", type=int, help="sampling seed (default: a fresh one per run)")
    p.add_argument("--max-kv-size", type=int, help="rotating KV window, to go past the context")
    p.add_argument("--system", help="system message (applies the chat template)")
    add_decoding_flags(p, "model, BLAS, fast path and prompt details")


def _add_generate(p) -> None:
    _add_generation_flags(p)
    p.add_argument("--prompt", required=True, help="prompt text, or - to read it from stdin")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="never apply the chat template")


def _generation_settings(args):
    """The settings of the flags given, over the model's suggestions and the defaults."""
    given = {name: getattr(args, name, None) for name in _FLAGS}  # chat has no --stop
    with flag_names(_FLAGS, leading=True):
        return generation_settings(args.model, **given)


def _context_message(e: ContextLengthError) -> str:
    return str(e).replace("max_kv_size", "--max-kv-size")


def _utf8(raw: bytes, what: str = "input") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(
            f"{what} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start})"
        ) from None


def _read_prompt(value: str) -> str:
    if value != "-":
        return _utf8(os.fsencode(value), "--prompt")  # the bytes the shell passed
    text = _utf8(sys.stdin.buffer.read()).removesuffix("\n")
    if not text:
        raise CliError("--prompt - read an empty prompt from stdin")
    return text


def _prompt_text(tokenizer, prompt: str, args) -> str:
    if args.raw or (args.system is None and not is_instruct(args.model)):
        return prompt
    return chat_prompt(tokenizer, prompt, args.system)


def _write_reply(responses):
    """Stream each response's text to stdout, then a newline; the last response."""
    last = None
    for last in responses:
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return last


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
    settings = _generation_settings(args)
    prompt = _read_prompt(args.prompt)
    if args.system is not None:
        args.system = _utf8(os.fsencode(args.system), "--system")
    model, tokenizer = load_model(args)
    text = _prompt_text(tokenizer, prompt, args)
    if args.verbose:
        print(f"chat template: {'applied' if text != prompt else 'not applied'}", file=sys.stderr)
    try:
        last = _write_reply(stream_generate(model, tokenizer, text, settings=settings))
    except ContextLengthError as e:
        raise CliError(_context_message(e)) from None
    except BrokenPipeError:  # the reader has gone (`| head`): stop quietly, like Unix tools
        quiet_stdout()
        return
    _print_summary(last)


def _add_chat(p) -> None:
    _add_generation_flags(p)


def _run_chat(args) -> None:
    settings = _generation_settings(args)
    if args.system is not None:
        args.system = _utf8(os.fsencode(args.system), "--system")
    model, tokenizer = load_model(args)
    session = ChatSession(model, tokenizer, system=args.system, settings=settings)
    try:
        _chat_loop(session, sys.stdin.buffer, interactive=sys.stdin.isatty(), verbose=args.verbose)
    except BrokenPipeError:
        quiet_stdout()


def _chat_loop(session, lines, *, interactive: bool, verbose: bool = False) -> None:
    """Answer each line of the binary stream `lines` until /exit, end of input or Ctrl-C at
    the prompt. A line that is not UTF-8, a failed turn or Ctrl-C during a reply prints a
    line and the conversation goes on."""
    if interactive:
        print("/reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            if interactive:
                print(">>> ", end="", file=sys.stderr, flush=True)
            line = lines.readline()
        except Terminated:
            raise
        except KeyboardInterrupt:
            line = b""
        if not line:  # end of input (Ctrl-D) or Ctrl-C at the prompt
            if interactive:
                print(file=sys.stderr)  # the shell's prompt starts on a line of its own
            return
        try:
            message = _utf8(line).strip()
        except CliError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        if message in ("/exit", "/quit"):
            return
        if message == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
        elif message:
            _chat_turn(session, message, verbose)


def _chat_turn(session, message: str, verbose: bool) -> None:
    try:
        with closing(session.send(message)) as replies:
            last = _write_reply(replies)
        if verbose:
            _print_summary(last)
    except Terminated:  # SIGTERM ends the chat, as it ends every command
        raise
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print("(reply stopped)", file=sys.stderr)
    except ContextLengthError as e:
        print(f"error: {_context_message(e)}; or /reset to start over", file=sys.stderr)
    except (BrokenPipeError, StdoutClosed):  # nowhere to write: the conversation is over
        raise
    except Exception as e:  # noqa: BLE001 - one failed turn does not end the conversation
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)


COMMANDS = {
    "generate": Command(
        help="generate text from a prompt, streamed to stdout",
        description="Generate text from a prompt. Text streams to stdout; prompt and generation "
        "speed and peak memory go to stderr. " + _INSTRUCT_RULE,
        add_flags=_add_generate,
        run=_run_generate,
    ),
    "chat": Command(
        help="chat with an Instruct model (keeps the KV cache between turns)",
        description="Interactive chat: one message per line on stdin; the reply streams to "
        "stdout. The KV cache is kept between turns, so only the new turn is processed. "
        "/reset starts over, /exit or Ctrl-D quits; Ctrl-C stops a reply, and at the prompt "
        "quits. Without --model it runs the shipped nano model, a base model never tuned for "
        "chat: for real answers pass a converted OpenELM-*-Instruct directory.",
        add_flags=_add_chat,
        run=_run_chat,
    ),
}
