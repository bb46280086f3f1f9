"""Builds next_line.jsonl, the `nano_next_line` task, from a held-out scene of Julius Caesar.

Source: examples/data/julius_caesar_3_2.txt (Act III, Scene 2; public domain), a piece of
the nano model's validation split (Julius Caesar is held out of its training). Each
question gives a speaker, up to two lines of a speech and the first half of the next
line; the choices are the rest of that line and the ends of three lines of other
speeches of about the same length (seeded, so the file is reproducible).
Run from the repository root: python -m elm_mlx.evaluation.tasks.build_next_line
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SOURCE = ROOT / "examples" / "data" / "julius_caesar_3_2.txt"
OUT = Path(__file__).with_name("next_line.jsonl")


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) per speech: a `SPEAKER:` line, then lines up to a blank line."""
    out = []
    for block in text.strip().split("\n\n"):
        head, *lines = block.strip().split("\n")
        if head.endswith(":") and lines:
            out.append((head[:-1], lines))
    return out


def split_line(line: str) -> tuple[str, str] | None:
    """(first half, rest with its leading space) at the space nearest the middle."""
    spaces = [i for i, ch in enumerate(line) if ch == " "]
    if len(line) < 24 or not spaces:
        return None
    cut = min(spaces, key=lambda i: abs(i - len(line) / 2))
    return line[:cut], line[cut:]


def questions(text: str, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    parts = speeches(text)
    halves = [(s, split_line(line)) for s, (_, lines) in enumerate(parts) for line in lines]
    docs = []
    for s, (speaker, lines) in enumerate(parts):
        for i, line in enumerate(lines):
            split = split_line(line)
            if split is None:
                continue
            head, rest = split
            # Distractors: ends of lines from other speeches with the nearest lengths.
            ends = [h[1] for t, h in halves if t != s and h and h[1] != rest]
            others = sorted((abs(len(e) - len(rest)), e) for e in ends)
            wrong = rng.sample([x for _, x in others[:12]], 3)
            choices = wrong + [rest]
            rng.shuffle(choices)
            context = "\n".join([f"{speaker}:", *lines[max(0, i - 2) : i], head])
            docs.append({"context": context, "choices": choices, "label": choices.index(rest)})
    return docs


def main() -> None:
    docs = questions(SOURCE.read_text(encoding="utf-8"))
    OUT.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    print(f"wrote {len(docs)} questions to {OUT}")


if __name__ == "__main__":
    main()
