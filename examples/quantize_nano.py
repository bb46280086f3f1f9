"""Quantize the shipped nano model to 8 bits, 4 bits and mixed-4-8, with a quality report.

    python examples/quantize_nano.py                       # about 20 s on a 2-core CPU
    python examples/quantize_nano.py --eval-tokens 256     # seconds

Each quantized model directory (written under --work, loadable by elm_mlx and
mlx-lm) is compared with the float model on held-out text the nano model never
saw in training: bits per weight, size on disk, perplexity, mean KL divergence
of the next-token distributions and top-1 agreement (elm_mlx.quant.quality).

The held-out text is, in order: --eval-text; the nano corpus's validation split
(runs/nano/valid.txt: The Comedy of Errors and Julius Caesar, written by
`python examples/nano/prepare_corpus.py`); else the scene of Julius Caesar
shipped in examples/data (part of that validation split). The nano model's
widths (160) are not multiples of 64, so with no --group-size the group size is 32
(the largest supported size that divides every matrix; the command says so).

The same from the command line:

    elm-mlx quantize --model elm_mlx/assets/nano --out nano-4bit --bits 4 \\
        --report --eval-text examples/data/julius_caesar_3_2.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VALID_SPLIT = Path("runs/nano/valid.txt")
SHIPPED_TEXT = HERE / "data" / "julius_caesar_3_2.txt"
# (name, bits, recipe): 8 bits, the mixed recipe (8-bit embeddings and edge layers), 4 bits.
VARIANTS = (("8bit", 8, None), ("mixed-4-8", None, "mixed-4-8"), ("4bit", 4, None))


def held_out_text(given: str | None) -> Path:
    if given:
        return Path(given)
    return VALID_SPLIT if VALID_SPLIT.is_file() else SHIPPED_TEXT


def run(a: argparse.Namespace) -> None:
    from elm_mlx.formats.convert import quantize_dir
    from elm_mlx.formats.modeldir import default_model_path, load
    from elm_mlx.generation.generate import generate
    from elm_mlx.quant.quality import report, text_windows
    from elm_mlx.quant.quantize import QuantizeSpec

    src = Path(a.model) if a.model else default_model_path()
    text = held_out_text(a.eval_text)
    model, tokenizer = load(src)
    windows = text_windows(tokenizer, text, max_tokens=a.eval_tokens, seq_len=a.seq_len)
    print(f"held-out text: {text}")
    settings = {"max_tokens": a.max_tokens}
    samples = {"float": generate(model, tokenizer, a.prompt, **settings)}
    for name, bits, recipe in VARIANTS:
        spec = QuantizeSpec(bits=bits or 4, group_size=a.group_size, recipe=recipe)
        out = Path(a.work) / f"nano-{name}"
        qmodel = quantize_dir(src, out, spec, force=True)
        print(f"\n== {name}: {out}\n{report(model, qmodel, windows, float_dir=src, quant_dir=out)}")
        samples[name] = generate(qmodel, tokenizer, a.prompt, **settings)
    print(f"\ngreedy completions of {a.prompt!r}:")
    for name, completion in samples.items():
        print(f"--- {name}:\n{a.prompt}{completion}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="float model directory (default: the shipped nano model)")
    p.add_argument("--work", default="runs/quantize_nano", help="quantized model directories")
    p.add_argument("--eval-text", help="held-out UTF-8 text (default: see above)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens of it to use (8192)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (256)")
    p.add_argument(
        "--group-size", type=int, help="32, 64 or 128 (default: the largest that fits: 32)"
    )
    p.add_argument("--prompt", default="ROMEO:", help="prompt for the sample completions")
    p.add_argument("--max-tokens", type=int, default=40, help="tokens per sample (40)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from elm_mlx.cli import run_command  # OpenBLAS before MLX, one-line errors, exit status

    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
