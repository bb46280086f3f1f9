"""SentencePiece tokenizer (Llama-2 style), chat template and a streaming detokenizer.

OpenELM uses the Llama-2 SentencePiece model: BOS prepended, EOS ends a turn,
byte fallback for characters outside the vocabulary. Control pieces written in
text (`</s>`, `<s>`) become their ids when encoded, as the Instruct models saw
them in training: the text between them is encoded segment by segment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

_SPACE = "\u2581"  # SentencePiece's word-boundary symbol
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """A SentencePiece model: `encode`, `decode`, special ids and the Instruct chat template."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(
                f"tokenizer model {model_file} not found; pass the Llama-2 tokenizer.model file"
            )
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_file} is not a SentencePiece model ({e})") from e
        self.model_file = model_file
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.vocab_size: int = self.sp.get_piece_size()
        self._special = {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id) if i >= 0}
        self._split = re.compile("(" + "|".join(map(re.escape, self._special)) + ")")
        self._pieces: list[tuple[int, object]] | None = None
        self._strips: bool | None = None

    @property
    def eos_piece(self) -> str:
        return self.sp.id_to_piece(self.eos_id)

    def encode(self, text: str, *, bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of `text`: BOS first if `bos`; `</s>`/`<s>` in text -> ids if `special`."""
        _check_text(text)
        ids = [self.bos_id] if bos and self.bos_id >= 0 else []
        if not special or not self._special:
            return ids + self.sp.encode(text)
        for part in self._split.split(text):
            if part in self._special:
                ids.append(self._special[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control tokens (BOS, EOS) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """Render messages in the Zephyr style the OpenELM Instruct models were tuned with.

        `[{"role": "system", "content": ...}, {"role": "user", ...}]` ->
        `<|system|>\\n...</s>\\n<|user|>\\n...</s>\\n<|assistant|>\\n`.
        """
        parts = []
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ValueError(
                    f"bad chat message {m!r}: need role system/user/assistant and string content"
                )
            parts.append(f"<|{role}|>\n{content}{self.eos_piece}\n")
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        return "".join(parts)

    def piece_table(self) -> list[tuple[int, object]]:
        """Per id (kind, value): 0 control, 1 byte (int), 2 text (str), 3 text never stripped."""
        if self._pieces is None:
            self._pieces = [self._piece_entry(i) for i in range(self.vocab_size)]
        return self._pieces

    def _piece_entry(self, i: int) -> tuple[int, object]:
        if self.sp.is_control(i):
            return (0, "")
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):
            return (1, int(_BYTE_PIECE.fullmatch(piece).group(1), 16))
        if self.sp.is_unknown(i):
            return (3, self.sp.decode([i]))
        return (2, piece.replace(_SPACE, " "))

    def strips_leading_space(self) -> bool:
        """Whether decoding drops the word-boundary space of the first piece (dummy prefix)."""
        if self._strips is None:
            self._strips = False
            for i in range(self.vocab_size):
                piece = self.sp.id_to_piece(i)
                if piece.startswith(_SPACE) and len(piece) > 1 and not self.sp.is_byte(i):
                    self._strips = self.sp.decode([i]) == piece[1:].replace(_SPACE, " ")
                    break
        return self._strips


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text has a lone surrogate {text[e.start]!r} at position {e.start}; "
            "pass valid Unicode (decode input bytes as UTF-8)"
        ) from None


class StreamingDetokenizer:
    """Turns ids into text one at a time; the concatenated output equals `tokenizer.decode`.

    Byte-fallback pieces are held until they complete a character, so no
    broken UTF-8 is ever returned; invalid bytes become U+FFFD (one per byte,
    as SentencePiece does). The first piece's word-boundary space is dropped
    when the model adds a dummy prefix, as `decode` does.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._table = tokenizer.piece_table()
        self._strip_first = tokenizer.strips_leading_space()
        self.reset()

    def reset(self) -> None:
        self._pending = b""
        self._at_start = True
        self.text = ""

    def add_token(self, token: int) -> str:
        """Feed one id; return the text that became final because of it (maybe '')."""
        kind, value = self._table[int(token)]
        if kind == 0:  # a control piece also ends a run of byte pieces
            return self._emit(final=True) if self._pending else ""
        if kind == 1:
            self._pending += bytes((value,))
        else:
            if kind == 2 and self._at_start and self._strip_first and value.startswith(" "):
                value = value[1:]
            self._pending += value.encode("utf-8")
        self._at_start = False
        return self._emit(final=False)

    def finalize(self) -> str:
        """Flush bytes still held (an unfinished character becomes U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        out, self._pending = _decode_utf8(self._pending, final)
        self.text += out
        return out


def _decode_utf8(buf: bytes, final: bool) -> tuple[str, bytes]:
    """Decode what is complete; return (text, incomplete tail). Invalid bytes -> U+FFFD each."""
    out = []
    while buf:
        try:
            out.append(buf.decode("utf-8"))
            buf = b""
        except UnicodeDecodeError as e:
            out.append(buf[: e.start].decode("utf-8"))
            if e.reason == "unexpected end of data" and not final:
                return "".join(out), buf[e.start :]
            out.append("\ufffd" * (e.end - e.start))
            buf = buf[e.end :]
    return "".join(out), b""
