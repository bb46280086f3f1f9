"""Build devil.jsonl from the dictd files of Debian's `dict-devil` package (run once).

    apt-get install dict-devil
    python examples/data/make_devil.py            # writes examples/data/devil.jsonl

Each dictionary entry becomes {"prompt": "HEADWORD:\\n", "completion": definition}:
the entry's first paragraph, italics and cross-reference marks removed, cut after
the sentence that passes 300 characters. Entries with no prose definition (verse
only, a cross-reference, a letter of the alphabet) are left out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

DICT_DIR = Path("/usr/share/dictd")
INSTALL_HINT = "install it with `apt-get install dict-devil`"
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dict-dir", default=str(DICT_DIR), help="where devil.index lies")
    p.add_argument("--out", default=str(Path(__file__).with_name("devil.jsonl")))
    a = p.parse_args(argv)
    try:
        records = read_devil(Path(a.dict_dir))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    Path(a.out).write_text(text, encoding="utf-8")
    print(f"{len(records)} definitions written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
