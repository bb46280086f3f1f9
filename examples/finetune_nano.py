"""LoRA fine-tune of the shipped nano model on The Devil's Dictionary; outputs before and after.

    apt-get install dict-devil          # Ambrose Bierce's The Devil's Dictionary (public domain)
    python examples/finetune_nano.py    # a few minutes on a laptop CPU

    python examples/finetune_nano.py --data examples/data/devil_sample.jsonl \\
        --iters 4 --batch-size 2 --max-tokens 8            # seconds: a smoke run on 30 records

The nano model was trained on Shakespeare's plays, where "ROMEO:" starts a
speech. Here every dictionary entry becomes a record in the same layout, prompt
"ABSURDITY:\\n", completion Bierce's definition, so that after fine-tuning a
headword starts a cynical definition instead of a speech. The steps:

1. Read the dictd files of Debian's `dict-devil` (/usr/share/dictd/devil.index and
   devil.dict.dz) and keep each entry's first paragraph, or read --data FILE.jsonl.
2. Split the records into train/valid/test jsonl files under --work.
3. Print greedy completions of a few held-out headwords from the base model.
4. Swap LoRA layers into every projection (elm_mlx.training.lora.apply_lora) and train them with
   elm_mlx.training.trainer, loss on the completions only; the best-validation adapters are kept
   in WORK/adapters (adapters.safetensors, adapter_config.json, loss.png).
5. Load the base model again with those adapters (elm_mlx.training.lora.apply_adapters) and print
   the same completions and the test loss before and after.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
import textwrap
from pathlib import Path

DICT_DIR = Path("/usr/share/dictd")
INSTALL_HINT = "install it with `apt-get install dict-devil`, or pass --data FILE.jsonl"
# dictd index numbers are base 64 in this alphabet.
DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# "ABATIS, n.  Rubbish in front of a fort..." -> headword, part of speech, definition.
ENTRY = re.compile(
    r"^(?P<word>[A-Z][A-Z'. -]*[A-Z])(?:,?\s*(?:[a-z]{1,5}\.){1,2}|[.?])?\s+"
    r"(?:\[\w+\.?\]\s+)?(?P<text>\S.*)$"
)
MAX_CHARS = 300  # definitions are cut after the sentence that passes this length


def dictd_number(digits: str) -> int:
    value = 0
    for c in digits:
        value = value * 64 + DICTD_DIGITS.index(c)
    return value


def read_devil(dict_dir: Path = DICT_DIR) -> list[dict]:
    """Prompt/completion records from the dictd files of Debian's dict-devil package."""
    index, data = dict_dir / "devil.index", dict_dir / "devil.dict.dz"
    if not (index.is_file() and data.is_file()):
        raise FileNotFoundError(f"The Devil's Dictionary is not in {dict_dir}: {INSTALL_HINT}")
    text = gzip.decompress(data.read_bytes())  # dictzip files are gzip files
    records, seen = [], set()
    for line in index.read_text(encoding="utf-8").splitlines():
        word, offset, length = line.split("\t")
        if word.startswith("00database") or (offset, length) in seen:
            continue  # dictd's own metadata, or another key for an entry already read
        seen.add((offset, length))
        start = dictd_number(offset)
        record = parse_entry(text[start : start + dictd_number(length)].decode("utf-8"))
        if record is not None:
            records.append(record)
    return records


def parse_entry(entry: str) -> dict | None:
    """{"prompt": "WORD:\\n", "completion": definition} from one entry, or None if the entry
    has no prose definition (verse only, a cross-reference, a letter of the alphabet)."""
    paragraph = " ".join(entry.strip().split("\n\n")[0].split())
    match = ENTRY.match(paragraph)
    if match is None or match["text"].startswith("See "):
        return None
    text = re.sub(r"[_{}]", "", match["text"])  # italics and cross-reference braces
    sentences = re.split(r"(?<=[.!?])\s+", text)
    kept = sentences[:1]
    for s in sentences[1:]:
        if len(" ".join(kept)) > MAX_CHARS:
            break
        kept.append(s)
    if kept[-1].endswith(":"):  # it introduces a quotation that is not in the paragraph
        kept = kept[:-1]
    if not kept:
        return None
    return {"prompt": f"{match['word']}:\n", "completion": " ".join(kept)}


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


def lora_train(a: argparse.Namespace, model, sets: dict, adapters: Path) -> None:
    """Swap in LoRA layers and train them; the best adapters end in `adapters`."""
    from elm_mlx.training.lora import LoRAConfig, apply_lora, num_trainable, write_adapter_config
    from elm_mlx.training.trainer import TrainArgs, train

    config = LoRAConfig(rank=a.rank, scale=a.scale, fine_tune_type="dora" if a.dora else "lora")
    apply_lora(model, config, seed=a.seed)
    write_adapter_config(adapters, config, len(model.layers))
    total = model.args.num_parameters()
    n = num_trainable(model)
    print(f"{config.fine_tune_type.upper()} rank {a.rank} on every projection: {n:,} trainable "
          f"parameters ({100 * n / total:.1f}% of {total:,})")  # fmt: skip
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
        out_dir=str(adapters),
    )
    train(model, targs, sets["train"], sets["valid"])


def run(a: argparse.Namespace) -> None:
    from elm_mlx.formats.modeldir import default_model_path, load
    from elm_mlx.training.data import load_datasets
    from elm_mlx.training.lora import apply_adapters
    from elm_mlx.training.trainer import evaluate

    records = read_jsonl(Path(a.data)) if a.data else read_devil(Path(a.dict_dir))
    work = Path(a.work)
    splits = write_splits(records, work / "data", a.seed)
    print(f"{len(records)} definitions: " + ", ".join(f"{len(v)} {k}" for k, v in splits.items()))
    path = a.model or default_model_path()
    model, tokenizer = load(path)
    sets = load_datasets(work / "data", tokenizer, max_seq_length=160, mask_prompt=True)
    shown = splits["test"][: a.show]  # headwords never trained on
    prompts = [r["prompt"] for r in shown]
    before = complete(model, tokenizer, prompts, a.max_tokens)
    loss_before = evaluate(model, sets["test"], a.batch_size)
    lora_train(a, model, sets, work / "adapters")
    model, tokenizer = load(path)  # a fresh base model, as a user would start
    apply_adapters(model, work / "adapters")
    after = complete(model, tokenizer, prompts, a.max_tokens)
    loss_after = evaluate(model, sets["test"], a.batch_size)
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
    p.add_argument("--data", help="prompt/completion jsonl instead of the Debian dictionary")
    p.add_argument("--dict-dir", default=str(DICT_DIR), help="where devil.index lies")
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
