"""LoRA fine-tune of the shipped nano model on The Devil's Dictionary; outputs before and after.

    python examples/finetune_nano.py    # about 35 s on a quiet 2-core CPU


    python examples/finetune_nano.py --data examples/data/devil_sample.jsonl \\
        --iters 4 --batch-size 2 --max-tokens 8            # seconds: a smoke run on 30 records

The nano model was trained on Shakespeare's plays, where "ROMEO:" starts a
speech. Here every dictionary entry becomes a record in the same layout, prompt
"ABSURDITY:\\n", completion Bierce's definition, so that after fine-tuning a
headword starts a cynical definition instead of a speech. The steps:

1. Read the 970 definitions shipped in examples/data/devil.jsonl (Ambrose Bierce, 1911,
   public domain; see examples/data/README.md), or --data FILE.jsonl.
2. Split the records into train/valid/test jsonl files under --work.
3. Print greedy completions of a few held-out headwords from the base model.
4. Fine-tune LoRA adapters on every projection with elm_mlx.training.finetune.finetune,
   loss on the completions only (what `elm-mlx lora` runs); the best-validation adapters
   are kept in WORK/adapters (adapters.safetensors, adapter_config.json, loss.png).
5. Load the base model again with those adapters (elm_mlx.training.lora.apply_adapters) and print
   the same completions and the test loss before and after.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import textwrap
from pathlib import Path

DEVIL = Path(__file__).resolve().parent / "data" / "devil.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_splits(records: list[dict], out: Path, seed: int) -> dict[str, list[dict]]:
    """Shuffle and write train/valid/test.jsonl (5% each for valid and test) into `out`."""
    records = records[:]
    random.Random(seed).shuffle(records)
    n_held = max(3, len(records) // 20)
    splits = {
        "test": records[:n_held],
        "valid": records[n_held : 2 * n_held],
        "train": records[2 * n_held :],
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / f"{name}.jsonl").write_text(text, encoding="utf-8")
    return splits


def complete(model, tokenizer, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy completions (repetition penalty 1.2), the same for the model before and after."""
    from elm_mlx.generation.generate import generate

    return [
        generate(model, tokenizer, p, max_tokens=max_tokens, repetition_penalty=1.2)
        for p in prompts
    ]


def lora_train(a: argparse.Namespace, model, tokenizer, work: Path):
    """Fine-tune LoRA (or DoRA) adapters into WORK/adapters, replacing an earlier run there."""
    from elm_mlx.training.finetune import finetune
    from elm_mlx.training.lora import LoRAConfig
    from elm_mlx.training.trainer import TrainArgs

    config = LoRAConfig(rank=a.rank, scale=a.scale, fine_tune_type="dora" if a.dora else "lora")
    targs = TrainArgs(
        iters=a.iters,
        batch_size=a.batch_size,
        learning_rate=a.learning_rate,
        warmup=min(20, a.iters // 10),
        val_every=a.val_every,
        val_batches=0,
        save_every=a.val_every,
        report_every=max(1, a.val_every // 2),
        seed=a.seed,
    )
    return finetune(
        model, tokenizer, work / "data", work / "adapters", config, targs,
        force=True, max_seq_length=160, mask_prompt=True,
    )  # fmt: skip


def run(a: argparse.Namespace) -> None:
    from elm_mlx.formats.modeldir import default_model_path, load
    from elm_mlx.training.lora import apply_adapters
    from elm_mlx.training.trainer import evaluate

    records = read_jsonl(Path(a.data))
    work = Path(a.work)
    splits = write_splits(records, work / "data", a.seed)
    print(f"{len(records)} definitions: " + ", ".join(f"{len(v)} {k}" for k, v in splits.items()))
    path = a.model or default_model_path()
    model, tokenizer = load(path)
    shown = splits["test"][: a.show]  # headwords never trained on
    prompts = [r["prompt"] for r in shown]
    before = complete(model, tokenizer, prompts, a.max_tokens)
    result = lora_train(a, model, tokenizer, work)
    test = result.datasets["test"]
    model, tokenizer = load(path)  # a fresh base model, as a user would start
    loss_before = evaluate(model, test, a.batch_size)
    apply_adapters(model, work / "adapters")
    after = complete(model, tokenizer, prompts, a.max_tokens)
    loss_after = evaluate(model, test, a.batch_size)
    for record, old, new in zip(shown, before, after, strict=True):
        print(f"\n=== {record['prompt'].strip()} (held out)")
        print(f"--- before: {old.strip()}\n--- after:  {new.strip()}")
        print(f"--- Bierce: {textwrap.shorten(record['completion'], 120)}")
    print(f"\ntest loss on held-out definitions: {loss_before:.3f} before, {loss_after:.3f} after")
    print(f"adapters: {work / 'adapters'} (fuse them: elm-mlx fuse --model {path} "
          f"--adapter-path {work / 'adapters'} --save-path nano-devil)")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="base model directory (default: the shipped nano model)")
    p.add_argument(
        "--data", default=str(DEVIL), help="prompt/completion jsonl (The Devil's Dictionary)"
    )
    p.add_argument("--work", default="runs/finetune_nano", help="data splits and adapters")
    p.add_argument("--iters", type=int, default=200, help="optimizer steps (200)")
    p.add_argument("--batch-size", type=int, default=8, help="records per step (8)")
    p.add_argument("--learning-rate", type=float, default=2e-3, help="peak (2e-3)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (8)")
    p.add_argument("--scale", type=float, default=2.0, help="LoRA scale, alpha / rank (2)")
    p.add_argument("--dora", action="store_true", help="DoRA adapters instead of LoRA")
    p.add_argument("--val-every", type=int, default=50, help="validate every N steps (50)")
    p.add_argument("--show", type=int, default=4, help="held-out headwords to complete (4)")
    p.add_argument("--max-tokens", type=int, default=60, help="tokens per completion (60)")
    p.add_argument("--seed", type=int, default=0, help="data split, adapter init, order (0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from elm_mlx.cli import run_command  # OpenBLAS before MLX, one-line errors, exit status

    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
