"""Convert a published OpenELM from the Hugging Face hub into an MLX model directory, then generate.

    python examples/convert_hf.py --tokenizer /path/to/llama-2/tokenizer.model
    python examples/convert_hf.py --hf-path apple/OpenELM-1_1B-Instruct \\
        --tokenizer meta-llama/Llama-2-7b-hf -q          # 4-bit while converting

Apple's repos (apple/OpenELM-270M, -450M, -1_1B, -3B and their -Instruct
variants) hold config.json and the weights but no tokenizer: OpenELM uses the
Llama-2 SentencePiece tokenizer.model. --tokenizer takes that file, a directory
holding it, or a hub id such as meta-llama/Llama-2-7b-hf (a gated repo: accept
its licence on huggingface.co and run `hf auth login` first). The first run
downloads the weights (about 0.5 GB for 270M) into the Hugging Face cache; with
no network the converter stops with a one-line error naming the repo. --hf-path
may also be a local directory in the hub's layout.

Afterwards the command line does the same:

    elm-mlx generate --model runs/openelm-270m-instruct --prompt "What is MLX?"
    elm-mlx chat --model runs/openelm-270m-instruct
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def convert_once(a: argparse.Namespace, out: Path) -> None:
    """Convert `a.hf_path` into `out`, unless an earlier run already did (then --force redoes)."""
    from elm_mlx.formats.convert import convert
    from elm_mlx.quant.quantize import QuantizeSpec

    if (out / "config.json").is_file() and not a.force:
        log(f"{out} is already converted; pass --force to convert again")
        return
    spec = QuantizeSpec(bits=a.q_bits) if a.quantize else None
    convert(
        a.hf_path, out, dtype=a.dtype, tokenizer=a.tokenizer, force=a.force, quantize=spec, log=log
    )


def run(a: argparse.Namespace) -> None:
    import elm_mlx
    from elm_mlx.formats.modeldir import require_tokenizer
    from elm_mlx.generation.generate import stream_generate

    out = Path(a.mlx_path or Path("runs") / Path(a.hf_path).name.lower())
    convert_once(a, out)
    model, tokenizer = elm_mlx.load(out)
    tokenizer = require_tokenizer(tokenizer, out)
    prompt = a.prompt
    if "instruct" in Path(a.hf_path).name.lower():  # Instruct models expect their template
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": a.prompt}])
    print(f"{a.prompt}\n---")
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens=a.max_tokens, repetition_penalty=1.2
    ):
        print(response.text, end="", flush=True)
    print()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf-path", default="apple/OpenELM-270M-Instruct", help="hub id or local dir")
    p.add_argument("--mlx-path", help="output directory (default: runs/<repo name, lower case>)")
    p.add_argument("--tokenizer", help="Llama-2 tokenizer.model: a file, directory or hub id")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize while converting")
    p.add_argument("--q-bits", type=int, default=4, help="4 (default) or 8")
    p.add_argument("--force", action="store_true", help="convert again over --mlx-path")
    p.add_argument("--prompt", default="What is the capital of France?", help="prompt text")
    p.add_argument("--max-tokens", type=int, default=100, help="most tokens to generate (100)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from elm_mlx.cli import run_command  # OpenBLAS before MLX, one-line errors, exit status

    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
