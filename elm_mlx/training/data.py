"""JSONL datasets for fine-tuning, and batches grouped by length.

A data directory holds `train.jsonl`, `valid.jsonl` and optionally
`test.jsonl`, one JSON object per line, all in one of three formats:

    {"text": "..."}                                   loss on every token
    {"prompt": "...", "completion": "..."}            loss on the completion with mask_prompt
    {"messages": [{"role": ..., "content": ...}, ...]} chat, rendered with the tokenizer's
                                                      template; loss on the last (assistant)
                                                      message with mask_prompt

The batch order is a pure function of (seed, epoch): `iterate_batches(...,
start=k)` yields exactly what the k-th batch onwards of a fresh iteration
would, which is what makes resuming a run exact.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import mlx.core as mx

SPLITS = ("train", "valid", "test")
FORMATS = {"text": ("text",), "completion": ("prompt", "completion"), "chat": ("messages",)}
MAX_REPORTED_ERRORS = 10


class DataError(ValueError):
    """A dataset that cannot be used: bad lines, too few records, missing files."""


class TokenizerLike(Protocol):
    eos_id: int

    def encode(self, text: str, *, bos: bool = True) -> list[int]: ...

    def apply_chat_template(
        self, messages: Sequence[dict], *, add_generation_prompt: bool = True
    ) -> str: ...


@dataclass
class Example:
    """One record as token ids; loss on `tokens[t]` for `offset <= t` (and t >= 1)."""

    tokens: list[int]
    offset: int = 0

    @property
    def num_targets(self) -> int:
        return len(self.tokens) - max(1, self.offset)


@dataclass
class Dataset:
    """Tokenized records of one split, with what loading had to change."""

    name: str
    examples: list[Example]
    format: str = "text"
    truncated: int = 0
    dropped: int = 0
    max_seq_length: int = 0
    lengths: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.lengths = [len(e.tokens) for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def summary(self) -> str:
        """One line: records, tokens, and how many were truncated or dropped."""
        n_tok = sum(self.lengths)
        line = f"{self.name}: {len(self)} {self.format} records, {n_tok:,} tokens"
        if self.truncated:
            line += f"; {self.truncated} truncated to {self.max_seq_length} tokens"
        if self.dropped:
            line += f"; {self.dropped} dropped (no completion tokens left after truncation)"
        return line


class Batch(NamedTuple):
    """One rank's rows of a global batch.

    tokens (b, L + 1) int32: inputs are tokens[:, :-1], targets tokens[:, 1:].
    spans (b, 2) int32: input positions [start, end) whose next token is a target.
    ntokens () float32: target count over the whole *global* batch (every rank).
    """

    tokens: mx.array
    spans: mx.array
    ntokens: mx.array


def target_mask(spans: mx.array, length: int) -> mx.array:
    """(B, length) bool: the input positions of `spans` (B, 2) whose next token is a target."""
    pos = mx.arange(length)[None]  # (1, L)
    return (pos >= spans[:, :1]) & (pos < spans[:, 1:])  # (B, L)


# ---- loading ----------------------------------------------------------------


def load_datasets(
    data_dir: str | Path,
    tokenizer: TokenizerLike,
    *,
    max_seq_length: int = 2048,
    mask_prompt: bool = False,
    require_valid: bool = True,
) -> dict[str, Dataset]:
    """Load `train.jsonl`, `valid.jsonl` and `test.jsonl` (when present) from a directory."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise NotADirectoryError(
            f"{data_dir} is a file; give the directory that holds train.jsonl and valid.jsonl"
        )
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} not found; it must hold train.jsonl")
    required = ["train", "valid"] if require_valid else ["train"]
    missing = [f"{s}.jsonl" for s in required if not (data_dir / f"{s}.jsonl").is_file()]
    if missing:
        hint = " (or turn validation off: `val_every=0`)" if "valid.jsonl" in missing else ""
        what = " and ".join(missing)
        raise FileNotFoundError(
            f"{data_dir} has no {what}; add {'them' if len(missing) > 1 else 'it'}{hint}"
        )
    return {
        split: load_jsonl(
            data_dir / f"{split}.jsonl",
            tokenizer,
            max_seq_length=max_seq_length,
            mask_prompt=mask_prompt,
        )
        for split in SPLITS
        if (data_dir / f"{split}.jsonl").is_file()
    }


def load_jsonl(
    path: str | Path,
    tokenizer: TokenizerLike,
    *,
    max_seq_length: int = 2048,
    mask_prompt: bool = False,
) -> Dataset:
    """Read and tokenize one JSONL file; every bad line is reported as `file:line: reason`."""
    if max_seq_length < 2:
        raise DataError(f"max_seq_length must be at least 2, got {max_seq_length}")
    path = Path(path)
    records, errors, fmt = [], [], None
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record, this_fmt = _parse_line(raw)
                if fmt is not None and this_fmt != fmt:
                    raise DataError(f"a {this_fmt} record in a file of {fmt} records")
                fmt = fmt or this_fmt
                records.append(_tokenize(record, fmt, tokenizer, mask_prompt))
            except (DataError, ValueError) as e:
                errors.append(f"{path}:{lineno}: {e}")
    if errors and not records and all(": not UTF-8 text" in e for e in errors):
        raise DataError(f"{errors[0]}; {path.name} is not a text file: give JSONL, one JSON "
                        "object per line, in UTF-8")  # fmt: skip
    if errors:
        _raise_errors(errors)
    if not records:
        raise DataError(f"{path} has no records; add one JSON object per line")
    return _truncate(path.name, records, fmt, max_seq_length)


def _raise_errors(errors: list[str]) -> None:
    shown = errors[:MAX_REPORTED_ERRORS]
    more = len(errors) - len(shown)
    tail = f"\n... and {more} more bad lines" if more else ""
    raise DataError("\n".join(shown) + tail)


def _parse_line(raw: bytes) -> tuple[dict, str]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start + 1})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    found = [name for name, keys in FORMATS.items() if any(k in record for k in keys)]
    if len(found) != 1:
        what = "none" if not found else " and ".join(found)
        raise DataError(
            f"a record needs exactly one of {{'text'}}, {{'prompt','completion'}} or "
            f"{{'messages'}} (found {what})"
        )
    fmt = found[0]
    for key in FORMATS[fmt]:
        if key not in record:
            raise DataError(f"missing {key!r}")
    return record, fmt


def _tokenize(record: dict, fmt: str, tokenizer: TokenizerLike, mask_prompt: bool) -> Example:
    if fmt == "text":
        text = _string(record, "text", allow_empty=False)
        return Example(tokenizer.encode(text) + [tokenizer.eos_id], 0)
    if fmt == "completion":
        prompt = _string(record, "prompt", allow_empty=True)
        completion = _string(record, "completion", allow_empty=False)
        full = tokenizer.encode(prompt + completion) + [tokenizer.eos_id]
        offset = _common_prefix(tokenizer.encode(prompt), full) if mask_prompt else 0
        return Example(full, offset)
    return _tokenize_chat(record["messages"], tokenizer, mask_prompt)


def _tokenize_chat(messages, tokenizer: TokenizerLike, mask_prompt: bool) -> Example:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"message {i} must be an object with a string 'content'")
    if messages[-1].get("role") != "assistant":
        raise DataError("the last message must be the assistant's reply (the text to learn)")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    full = tokenizer.encode(text)
    # The template ends each turn with EOS and a newline: the example ends at the EOS.
    if tokenizer.eos_id in full:
        full = full[: len(full) - full[::-1].index(tokenizer.eos_id)]
    if not mask_prompt:
        return Example(full, 0)
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    )
    return Example(full, _common_prefix(prompt, full))


def _string(record: dict, key: str, allow_empty: bool) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{key!r} is empty")
    return value


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _truncate(name: str, examples: list[Example], fmt: str, max_len: int) -> Dataset:
    kept, truncated, dropped = [], 0, 0
    for e in examples:
        if len(e.tokens) > max_len:
            truncated += 1
            e = Example(e.tokens[:max_len], e.offset)
        if e.num_targets < 1:
            dropped += 1
            continue
        kept.append(e)
    if not kept:
        raise DataError(
            f"{name}: no record has a token to learn after truncation to {max_len} tokens; "
            "raise the maximum sequence length or shorten the prompts"
        )
    return Dataset(name, kept, fmt, truncated, dropped, max_len)


# ---- batching -----------------------------------------------------------------


def check_batch_size(dataset: Dataset, batch_size: int, world_size: int = 1) -> None:
    """Raise DataError unless `dataset` fills at least one batch that splits across ranks."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if batch_size % world_size:
        raise DataError(
            f"batch size {batch_size} does not split across {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    if len(dataset) < batch_size:
        raise DataError(
            f"{dataset.name} has {len(dataset)} usable records, fewer than the batch size "
            f"{batch_size}; add records or lower the batch size"
        )


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Record indices of every batch of one epoch: records of similar length share a batch.

    Pure: a function of (lengths, batch_size, seed, epoch) only. The epoch's
    leftover records (len % batch_size, chosen at random) wait for a later epoch.
    """
    rng = random.Random(f"elm-mlx/{seed}/{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order = order[: len(order) - len(order) % batch_size]
    order.sort(key=lambda i: lengths[i])  # stable: equal lengths keep the shuffled order
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int = 0,
    start: int = 0,
    group: mx.distributed.Group | None = None,
    pad_to: int = 32,
) -> Iterator[Batch]:
    """Endless training batches from batch number `start` on; this process's rows of each
    (`group`: the processes training together; None: this one alone).

    `dataset` must fill a batch that splits across the ranks (`check_batch_size`).
    """
    rank, world_size = _place(group)
    per_epoch = len(dataset) // batch_size
    epoch, index = divmod(start, per_epoch)
    while True:
        batches = batch_order(dataset.lengths, batch_size, seed, epoch)
        for rows in batches[index:]:
            yield make_batch(dataset, rows, rank, world_size, pad_to)
        epoch, index = epoch + 1, 0


def iterate_eval_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    max_batches: int = 0,
    group: mx.distributed.Group | None = None,
    pad_to: int = 32,
) -> Iterator[Batch]:
    """Validation batches in length order; `max_batches` > 0 caps the number of global batches.

    Each process of `group` reads every `group.size()`-th batch, so they need not see
    equally many; sum the losses over the group afterwards.
    """
    rank, world_size = _place(group)
    order = sorted(range(len(dataset)), key=lambda i: dataset.lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if max_batches > 0:
        batches = batches[:max_batches]
    for rows in batches[rank::world_size]:
        yield make_batch(dataset, rows, 0, 1, pad_to)


def _place(group: mx.distributed.Group | None) -> tuple[int, int]:
    """(rank, number of processes) of this process in `group`."""
    return (0, 1) if group is None else (group.rank(), group.size())


def make_batch(
    dataset: Dataset, rows: Sequence[int], rank: int, world_size: int, pad_to: int
) -> Batch:
    """Pad the global batch `rows` to one length and keep this rank's slice of it."""
    examples = [dataset.examples[i] for i in rows]
    longest = max(len(e.tokens) for e in examples)
    width = -(-(longest - 1) // pad_to) * pad_to  # input positions, a multiple of pad_to
    width = min(width, max(longest - 1, dataset.max_seq_length - 1))
    ntokens = sum(e.num_targets for e in examples)
    local = len(examples) // world_size
    mine = examples[rank * local : (rank + 1) * local]
    tokens = [e.tokens + [0] * (width + 1 - len(e.tokens)) for e in mine]
    spans = [[max(1, e.offset) - 1, len(e.tokens) - 1] for e in mine]
    return Batch(
        mx.array(tokens, dtype=mx.int32),  # (b, width + 1)
        mx.array(spans, dtype=mx.int32),  # (b, 2)
        mx.array(float(ntokens), dtype=mx.float32),
    )
