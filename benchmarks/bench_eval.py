"""lm-eval scoring speed: our backend (`elm_mlx`) against mlx-lm's (`mlxlm`), same requests.

    python benchmarks/bench_eval.py [--docs 100] [--batch-size 16] [--quick]

Two workloads, on the shipped nano model and on random weights with the published
OpenELM-270M shapes (elm_mlx.testing), both with the nano tokenizer (its ids are valid
for the 270M vocabulary):

- loglikelihood: the local multiple-choice task `nano_next_line` (four continuations per
  context), `--docs` questions;
- loglikelihood_rolling: the held-out scene examples/data/julius_caesar_3_2.txt, cut into
  `--texts` documents (windows of the model's context).

mlx-lm's backend runs its own OpenELM implementation loaded with the same weights. For
each: requests/s; tokens/s, the tokens of the requests (context and continuation of every
request, or every token of a text) over the time; MLX's peak memory; and the largest
per-request difference between the two backends, with how many greedy flags differ.
OpenBLAS is preloaded for MLX's float matmuls, as the CLI does. Other processes skew the
numbers: compare rows of one run. `--quick` runs a few requests only (a smoke test).
"""

from __future__ import annotations

import argparse
import atexit
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elm_mlx.runtime.blas import preload_blas  # noqa: E402  (imports no MLX)

TASK = ROOT / "elm_mlx" / "evaluation" / "tasks" / "next_line.jsonl"
SCENE = ROOT / "examples" / "data" / "julius_caesar_3_2.txt"


class Req:
    def __init__(self, *args):
        self.args = args


def requests(docs: int, texts: int, chars: int) -> tuple[list[Req], list[Req]]:
    rows = [json.loads(line) for line in TASK.read_text().splitlines()[:docs]]
    choice = [Req(d["context"], c) for d in rows for c in d["choices"]]
    scene = SCENE.read_text()[:chars]
    step = len(scene) // texts
    rolling = [Req(scene[i * step : (i + 1) * step]) for i in range(texts)]
    return choice, rolling


def models():
    """(name, model directory): the nano model and a 270M-shaped random checkpoint (written
    to a temporary directory, removed at exit)."""
    import shutil

    from elm_mlx.formats.modeldir import default_model_path
    from elm_mlx.testing import random_preset_checkpoint

    nano = Path(default_model_path())
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    big = random_preset_checkpoint(tmp / "openelm-270m-random", "OpenELM-270M")
    shutil.copyfile(nano / "tokenizer.model", big / "tokenizer.model")
    return [("nano", nano), ("270M random", big)]


def ours(path: Path, batch_size: int):
    from elm_mlx.evaluation.harness import ElmLM

    return ElmLM(str(path), batch_size=batch_size, progress=False, dtype="float32")


def theirs(path: Path, tokenizer):
    """mlx-lm's lm-eval backend over mlx-lm's OpenELM with the same weights."""
    from mlx_lm.evaluate import MLXLM
    from mlx_lm.models import openelm

    config = json.loads((path / "config.json").read_text())
    model = openelm.Model(openelm.ModelArgs.from_dict(config))
    model.load_weights(str(path / "model.safetensors"))

    class HFStyle:  # the call mlx-lm makes, over the same SentencePiece model
        def encode(self, text, add_special_tokens=True):
            return tokenizer.encode(text, bos=add_special_tokens)

    lm = MLXLM.__new__(MLXLM)
    lm._model, lm.tokenizer, lm._max_tokens, lm._batch_size = model, HFStyle(), None, 8
    lm.use_chat_template = False
    return lm


def timed(fn, reqs, warm):
    import mlx.core as mx

    fn(warm)  # warm-up: MLX builds its CPU kernels on first use
    mx.reset_peak_memory()
    start = time.perf_counter()
    out = fn(reqs)
    return out, time.perf_counter() - start, mx.get_peak_memory() / 2**20


def token_counts(tokenizer, choice: list[Req], rolling: list[Req]) -> tuple[int, int]:
    mc = sum(len(tokenizer.encode(r.args[0] + r.args[1])) for r in choice)
    return mc, sum(len(tokenizer.encode(r.args[0], bos=False)) for r in rolling)


def row(label, n, tokens, seconds, memory, extra=""):
    print(
        f"{label:<34} {n:>5} req {n / seconds:>8.1f} req/s {tokens / seconds:>9.0f} tok/s "
        f"{memory:>8.0f} MiB  {extra}",
        flush=True,
    )


def bench(name: str, path: Path, choice, rolling, batch_size: int) -> None:
    import io
    from contextlib import redirect_stderr

    lm = ours(path, batch_size)
    mc_tokens, text_tokens = token_counts(lm.tokenizer, choice, rolling)
    ref = theirs(path, lm.tokenizer)
    print(f"\n{name}: {lm.model.args.num_parameters() / 1e6:.1f}M parameters, "
          f"context {lm.max_length}, ours batch {batch_size}", flush=True)  # fmt: skip
    warm = choice[:2]
    a, ta, ma = timed(lambda r: lm.loglikelihood(r, disable_tqdm=True), choice, warm)
    with redirect_stderr(io.StringIO()):  # mlx-lm's progress bar
        b, tb, mb = timed(ref.loglikelihood, choice, warm)
    diff = max(abs(x - y) for (x, _), (y, _) in zip(a, b, strict=True))
    flags = sum(bool(g) != bool(h) for (_, g), (_, h) in zip(a, b, strict=True))
    row("  loglikelihood, elm_mlx", len(choice), mc_tokens, ta, ma, f"x{tb / ta:.2f} mlx-lm")
    row("  loglikelihood, mlx-lm", len(choice), mc_tokens, tb, mb)
    print(f"  largest difference {diff:.2e} nats, greedy flags differing: {flags}")
    warm = [Req(rolling[0].args[0][:200])]
    a, ta, ma = timed(lambda r: lm.loglikelihood_rolling(r, disable_tqdm=True), rolling, warm)
    with redirect_stderr(io.StringIO()):
        b, tb, mb = timed(ref.loglikelihood_rolling, rolling, warm)
    row("  loglikelihood_rolling, elm_mlx", len(rolling), text_tokens, ta, ma,
        f"x{tb / ta:.2f} mlx-lm")  # fmt: skip
    row("  loglikelihood_rolling, mlx-lm", len(rolling), text_tokens, tb, mb)
    longest = max(len(lm.tokenizer.encode(r.args[0], bos=False)) for r in rolling)
    if longest < lm.max_length:  # mlx-lm scores a text in one pass, without windows
        diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
        print(f"  largest difference {diff:.2e} nats")
    else:
        print(f"  texts of up to {longest} tokens: mlx-lm does not window, so no comparison")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=100, help="multiple-choice questions (100)")
    p.add_argument("--texts", type=int, default=8, help="documents the scene is cut into (8)")
    p.add_argument(
        "--chars", type=int, default=None, help="characters of the scene used (all of it)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="our batch size (16)")
    p.add_argument(
        "--quick", action="store_true", help="8 questions, 2 texts of 600 characters: a smoke test"
    )
    args = p.parse_args()
    if args.quick:
        args.docs, args.texts, args.chars = 8, 2, 1200
    preload_blas()
    choice, rolling = requests(args.docs, args.texts, args.chars)
    for name, path in models():
        bench(name, path, choice, rolling, args.batch_size)


if __name__ == "__main__":
    main()
