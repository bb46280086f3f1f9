"""Perplexity of a model on a text or jsonl file, over sliding windows of its context."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import scoring


@dataclass(frozen=True)
class PerplexityResult:
    documents: int
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood per scored token (nats)
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def read_documents(path: str | Path) -> list[str]:
    """A .txt file is one document; a .jsonl file holds one {"text": ...} per line."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a .txt or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at position {e.start}); "
            "convert it to UTF-8 first (for example: iconv -f LATIN1 -t UTF-8)"
        ) from None
    if path.suffix != ".jsonl":
        docs = [text]
    else:
        docs = [_jsonl_text(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"{path} holds no text to score")
    return docs


def _jsonl_text(path: Path, n: int, line: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{path} line {n} is not JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f'{path} line {n}: need an object with a string "text" field')
    return record["text"]


def perplexity(
    model,
    tokenizer,
    documents: list[str],
    *,
    stride: int | None = None,
    batch_size: int = 16,
    add_bos: bool = True,
    group=None,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Every token of every document scored once, after BOS (or EOS when `add_bos` is off).

    Windows hold the model's whole context; after the first, each scores the next
    `stride` tokens (default: half the context) with the rest of the window as left
    context. Documents are scored separately (`scoring.score_windows`).
    """
    max_length = model.args.max_context_length
    stride = max(1, max_length // 2) if stride is None else stride
    prefix = tokenizer.bos_id if add_bos and tokenizer.bos_id >= 0 else tokenizer.eos_id
    windows = []
    for doc in documents:
        ids = tokenizer.encode(doc, bos=False)
        windows.extend(scoring.rolling_windows(ids, prefix, max_length, stride))
    start = time.perf_counter()
    scores = scoring.score_windows(
        model, windows, batch_size=batch_size, group=group, progress=progress
    )
    seconds = time.perf_counter() - start
    tokens = sum(len(cont) for _, cont in windows)
    if tokens == 0:
        raise ValueError("the documents hold no tokens to score")
    nll = -math.fsum(s for s, _ in scores) / tokens
    return PerplexityResult(len(documents), tokens, nll, seconds)
