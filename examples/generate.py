"""Generate text with the Python API, printing each piece of text as soon as it is final.

    python examples/generate.py                                   # the shipped nano model
    python examples/generate.py --prompt "JULIET:" --temp 0.8 --seed 1
    python examples/generate.py --model ./openelm-270m-instruct --chat \\
        --prompt "Explain unified memory in one paragraph."

Without --model it runs the nano OpenELM shipped inside the package
(elm_mlx/assets/nano, a base model trained on Shakespeare's plays), so it works
offline right after `pip install -e .`. The API in four lines:

    model, tokenizer, _ = load_for_generation(path)  # dtype, CPU fast path
    for response in stream_generate(model, tokenizer, prompt, max_tokens=100):
        print(response.text, end="", flush=True)

`response` also carries the token id, its log-probabilities and running speeds;
the last one says why generation stopped (`finish_reason`: "stop" or "length").
"""

from __future__ import annotations

import argparse
import sys


def run(a: argparse.Namespace) -> None:
    from elm_mlx.generation.generate import GenerationSettings, stream_generate
    from elm_mlx.generation.loading import load_for_generation

    model, tokenizer, report = load_for_generation(a.model)
    print(report.lines()[0], file=sys.stderr)
    prompt = a.prompt
    if a.chat:  # Instruct models expect their chat template around the message
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": a.prompt}])
    settings = GenerationSettings(
        max_tokens=a.max_tokens,
        temp=a.temp,
        top_p=a.top_p,
        seed=a.seed,
        repetition_penalty=a.repetition_penalty,
    )
    print(a.prompt if not a.chat else "", end="", flush=True)
    last = None
    for last in stream_generate(model, tokenizer, prompt, settings=settings):
        print(last.text, end="", flush=True)
    print()
    if last is not None:
        print(
            f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s, "
            f"stopped by {last.finish_reason}]",
            file=sys.stderr,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model directory or hub id (default: the shipped nano model)")
    p.add_argument("--prompt", default="ROMEO:", help="prompt text (ROMEO:)")
    p.add_argument("--max-tokens", type=int, default=120, help="most tokens to generate (120)")
    p.add_argument("--temp", type=float, default=0.7, help="temperature; 0 = greedy (0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (0.95)")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="1 = off (1.1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from elm_mlx.cli import run_command  # OpenBLAS before MLX, one-line errors, exit status

    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
