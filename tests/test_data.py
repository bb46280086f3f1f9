"""Datasets: the three record formats, prompt masking, every bad-data case, batching."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from elm_mlx.training.data import (
    DataError,
    Dataset,
    Example,
    batch_order,
    check_batch_size,
    iterate_batches,
    iterate_eval_batches,
    load_datasets,
    load_jsonl,
)


class CharTokenizer:
    """One id per character (plus BOS 1, EOS 2): token boundaries are obvious."""

    eos_id = 2

    def encode(self, text, *, bos=True):
        return ([1] if bos else []) + [3 + ord(c) % 250 for c in text]

    def apply_chat_template(self, messages, *, add_generation_prompt=True):
        body = "".join(f"<{m['role']}>{m['content']}|" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")


TOK = CharTokenizer()


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def load(tmp_path, lines, **kw):
    return load_jsonl(write(tmp_path / "train.jsonl", lines), TOK, **kw)


# ---- formats ----------------------------------------------------------------------


def test_text_records_end_with_eos_and_learn_every_token(tmp_path):
    ds = load(tmp_path, [{"text": "abc"}, {"text": "hello"}])
    assert ds.format == "text" and len(ds) == 2
    assert ds.examples[0].tokens == TOK.encode("abc") + [2]
    assert ds.examples[0].num_targets == 4  # b, c... every token after BOS, EOS included


def test_completion_mask_covers_exactly_the_prompt(tmp_path):
    rec = {"prompt": "Q: 2+2? A:", "completion": " 4"}
    plain = load(tmp_path, [rec]).examples[0]
    masked = load(tmp_path, [rec], mask_prompt=True).examples[0]
    assert plain.tokens == masked.tokens == TOK.encode("Q: 2+2? A: 4") + [2]
    assert plain.offset == 0
    assert masked.offset == len(TOK.encode("Q: 2+2? A:"))
    assert masked.tokens[masked.offset :] == TOK.encode(" 4", bos=False) + [2]


def test_chat_with_the_instruct_template_masks_all_but_the_last_reply(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    path = write(tmp_path / "train.jsonl", [{"messages": messages}])
    ex = load_jsonl(path, tokenizer, mask_prompt=True).examples[0]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    full = tokenizer.encode(text)
    assert ex.tokens[-1] == tokenizer.eos_id
    assert ex.tokens == full[: len(ex.tokens)]  # the trailing newline after EOS is cut
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages[:-1]))
    assert ex.tokens[: ex.offset] == prompt
    learned = tokenizer.decode(ex.tokens[ex.offset :])
    assert learned.strip() == "Blue."
    unmasked = load_jsonl(path, tokenizer).examples[0]
    assert unmasked.offset == 0 and unmasked.tokens == ex.tokens


def test_load_datasets_reads_the_splits(tmp_path):
    for split in ("train", "valid", "test"):
        write(tmp_path / f"{split}.jsonl", [{"text": f"{split} record {i}"} for i in range(3)])
    sets = load_datasets(tmp_path, TOK)
    assert sorted(sets) == ["test", "train", "valid"]
    assert all(len(d) == 3 for d in sets.values())
    (tmp_path / "test.jsonl").unlink()
    assert sorted(load_datasets(tmp_path, TOK)) == ["train", "valid"]


# ---- bad data --------------------------------------------------------------------------


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"txt": "typo"}, "exactly one of"),
    ({"text": "a", "messages": []}, "found text and chat"),
    ({"prompt": "only a prompt"}, "missing 'completion'"),
    ({"text": 42}, "'text' must be a string, got int"),
    ({"text": "   "}, "'text' is empty"),
    ({"prompt": "p", "completion": ""}, "'completion' is empty"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "message 0 must be an object with a string 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_each_bad_line_names_file_line_and_reason(tmp_path, line, reason):
    path = write(tmp_path / "train.jsonl", ["", line])  # blank lines are skipped
    with pytest.raises(DataError) as e:
        load_jsonl(path, TOK)
    assert str(e.value).startswith(f"{path}:2: ")
    assert reason in str(e.value)


def test_bad_chat_role_is_reported_with_its_line(tmp_path, tokenizer):
    bad = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path = write(tmp_path / "train.jsonl", [bad])
    with pytest.raises(ValueError, match=rf"{path}:1: bad chat message"):
        load_jsonl(path, tokenizer)


def test_mixed_formats_and_non_utf8_lines(tmp_path):
    path = write(tmp_path / "train.jsonl", [{"text": "a"}, {"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r":2: a completion record in a file of text records"):
        load_jsonl(path, TOK)
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r":2: not UTF-8 text"):
        load_jsonl(path, TOK)
    path.write_bytes(bytes(range(128, 256)) * 4 + b"\n" + bytes(range(255, 127, -1)))  # binary
    with pytest.raises(DataError) as e:
        load_jsonl(path, TOK)
    assert str(e.value) == (
        f"{path}:1: not UTF-8 text (byte 1); train.jsonl is not a text file: give JSONL, one "
        "JSON object per line, in UTF-8"
    )


def test_all_bad_lines_are_reported_at_once(tmp_path):
    path = write(tmp_path / "train.jsonl", ["{bad", {"text": "ok"}, {"text": 1}, "nope"])
    with pytest.raises(DataError) as e:
        load_jsonl(path, TOK)
    assert [line.split(": ")[0] for line in str(e.value).splitlines()] == [
        f"{path}:1",
        f"{path}:3",
        f"{path}:4",
    ]


def test_empty_missing_and_too_small_datasets(tmp_path):
    with pytest.raises(DataError, match="has no records"):
        load(tmp_path, ["", "   "])
    with pytest.raises(FileNotFoundError, match="no valid.jsonl"):
        write(tmp_path / "train.jsonl", [{"text": "x"}])
        load_datasets(tmp_path, TOK)
    assert list(load_datasets(tmp_path, TOK, require_valid=False)) == ["train"]
    with pytest.raises(FileNotFoundError, match="not found"):
        load_datasets(tmp_path / "nowhere", TOK)
    small = load(tmp_path, [{"text": "a"}, {"text": "b"}])
    with pytest.raises(DataError, match="2 usable records, fewer than the batch size 4"):
        check_batch_size(small, 4)
    with pytest.raises(DataError, match="does not split across 3 processes"):
        check_batch_size(small, 2, world_size=3)


def test_over_long_records_are_truncated_and_counted(tmp_path):
    lines = [{"text": "x" * 50}, {"text": "short"}, {"text": "y" * 30}]
    ds = load(tmp_path, lines, max_seq_length=16)
    assert ds.truncated == 2 and len(ds) == 3
    assert max(ds.lengths) == 16
    assert "2 truncated to 16 tokens" in ds.summary()


def test_records_with_nothing_left_to_learn_are_dropped_and_counted(tmp_path):
    lines = [
        {"prompt": "p" * 40, "completion": "c"},  # the completion is cut off entirely
        {"prompt": "short", "completion": "answer"},
    ]
    ds = load(tmp_path, lines, max_seq_length=16, mask_prompt=True)
    assert (len(ds), ds.dropped) == (1, 1)
    assert "1 dropped" in ds.summary()
    with pytest.raises(DataError, match="no record has a token to learn"):
        load(tmp_path, lines[:1], max_seq_length=16, mask_prompt=True)


# ---- batching -----------------------------------------------------------------------


def make_dataset(lengths, max_len=512):
    examples = [Example(list(range(3, 3 + n)), 0) for n in lengths]
    return Dataset("synthetic", examples, max_seq_length=max_len)


def test_batch_order_is_a_pure_function_of_seed_and_epoch_including_seed_0():
    lengths = [random.Random(1).randint(5, 300) for _ in range(103)]
    a = batch_order(lengths, 8, seed=0, epoch=0)
    assert a == batch_order(lengths, 8, seed=0, epoch=0)
    assert a != batch_order(lengths, 8, seed=1, epoch=0)
    assert a != batch_order(lengths, 8, seed=0, epoch=1)
    assert all(len(b) == 8 for b in a) and len(a) == 103 // 8
    assert len({i for b in a for i in b}) == 12 * 8  # no record twice in an epoch


def test_batches_grouped_by_length_waste_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(400)]

    def padding(batches):
        return sum(
            max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches
        )

    grouped = batch_order(lengths, 8, seed=0, epoch=0)
    order = list(range(400))
    rng.shuffle(order)
    random_batches = [order[i : i + 8] for i in range(0, 400, 8)]
    assert padding(grouped) < 0.05 * padding(random_batches)


def test_iterate_batches_resumes_at_any_step_across_epochs():
    ds = make_dataset([random.Random(2).randint(4, 90) for _ in range(21)])
    full = list(itertools.islice(iterate_batches(ds, 4, seed=0), 13))  # 5 batches per epoch
    for k in (1, 4, 5, 6, 11):
        resumed = list(itertools.islice(iterate_batches(ds, 4, seed=0, start=k), 13 - k))
        for a, b in zip(full[k:], resumed, strict=True):
            assert a.tokens.tolist() == b.tokens.tolist()
            assert a.spans.tolist() == b.spans.tolist()


class Group:
    """Stands in for process `rank` of an mx.distributed group of `size`."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = (lambda: rank), (lambda: size)


def test_rank_slices_make_up_the_global_batch():
    ds = make_dataset([random.Random(3).randint(4, 90) for _ in range(24)])
    whole = list(itertools.islice(iterate_batches(ds, 4, seed=5), 6))
    halves = [list(itertools.islice(iterate_batches(ds, 4, seed=5, group=Group(r, 2)), 6))
              for r in (0, 1)]  # fmt: skip
    for g, h0, h1 in zip(whole, *halves, strict=True):
        assert h0.tokens.tolist() + h1.tokens.tolist() == g.tokens.tolist()
        assert g.ntokens.item() == h0.ntokens.item() == h1.ntokens.item()


def test_batch_layout_pads_to_a_multiple_and_spans_cover_the_targets():
    ds = make_dataset([10, 40, 7, 33], max_len=64)
    ds.examples[1].offset = 12  # a masked prompt of 12 tokens
    batch = next(iterate_batches(ds, 4, seed=0, pad_to=32))
    tokens, spans = batch.tokens.tolist(), batch.spans.tolist()
    assert {len(row) for row in tokens} == {64}  # 39 inputs round up to 64, capped at 63
    by_len = {
        len([t for t in row if t]): (row, span) for row, span in zip(tokens, spans, strict=True)
    }
    row, span = by_len[40]
    assert span == [11, 39]  # predicts tokens 12..39
    assert by_len[7][1] == [0, 6]
    assert batch.ntokens.item() == 9 + (40 - 12) + 6 + 32


def test_eval_batches_cover_every_record_once():
    ds = make_dataset([5, 9, 3, 12, 7, 8, 4])
    rows = [r for b in iterate_eval_batches(ds, 3) for r in b.tokens.tolist()]
    assert sorted(len([t for t in r if t]) for r in rows) == sorted(ds.lengths)
    per_rank = [list(iterate_eval_batches(ds, 3, group=Group(r, 2))) for r in (0, 1)]
    assert sum(len(b.tokens) for bs in per_rank for b in bs) == 7
