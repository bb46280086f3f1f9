"""Tokenizer, chat template and streaming detokenizer against SentencePiece itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elm_mlx.formats.tokenizer import StreamingDetokenizer, Tokenizer

_FIXTURE = [HealthCheck.function_scoped_fixture]


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = StreamingDetokenizer(tok)
    segments = [detok.add_token(i) for i in ids]
    return segments + [detok.finalize()]


def mistral_model_file() -> Path | None:
    """The 32000-piece SentencePiece model (byte fallback) shipped inside mistral-common."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    return path if path.is_file() else None


def test_special_ids_and_bos(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenizer.vocab_size == tokenizer.sp.get_piece_size()
    ids = tokenizer.encode("hello world")
    assert ids[0] == tokenizer.bos_id
    assert ids[1:] == tokenizer.sp.encode("hello world")
    assert tokenizer.encode("hello world", bos=False) == ids[1:]


def test_chat_template_text(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages)
    assert rendered == "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    no_prompt = tokenizer.apply_chat_template(messages[1:], add_generation_prompt=False)
    assert no_prompt == "<|user|>\nHi</s>\n"


def test_chat_template_eos_becomes_the_eos_id(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Tell a story"}])
    ids = tokenizer.encode(text)
    assert ids.count(tokenizer.eos_id) == 1
    cut = ids.index(tokenizer.eos_id)
    # Text around the control piece is encoded segment by segment.
    assert ids[1:cut] == tokenizer.sp.encode("<|user|>\nTell a story")
    assert ids[cut + 1 :] == tokenizer.sp.encode("\n<|assistant|>\n")
    assert tokenizer.encode(text, special=False).count(tokenizer.eos_id) == 0


def test_lone_surrogate_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="surrogate"):
        tokenizer.encode("ok \ud800")


def test_bad_chat_message(tokenizer):
    with pytest.raises(ValueError, match="role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}])


def test_missing_and_bad_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(bad)


def test_byte_fallback_held_until_character_completes(tokenizer):
    ids = tokenizer.encode("a😀", bos=False)
    pieces = tokenizer.sp.id_to_piece(ids)
    assert sum(p.startswith("<0x") for p in pieces) == 4  # the emoji is four byte pieces
    segments = stream(tokenizer, ids)
    assert "😀" in segments  # emitted whole, on its last byte
    assert "".join(segments) == "a😀"
    assert all("\ufffd" not in s for s in segments)


def test_leading_spaces_match_decode(tokenizer):
    for text in [" x", "  two", "x", "\n x", "   "]:
        ids = tokenizer.encode(text, bos=True)
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids) == text


def test_control_piece_ends_a_byte_run(tokenizer):
    # As in SentencePiece: bytes split by EOS are two broken characters, not one whole.
    ids = [tokenizer.sp.piece_to_id(p) for p in ["<0xC6>", "</s>", "<0x87>"]]
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids) == "\ufffd\ufffd"


def test_unfinished_character_flushed_as_replacement(tokenizer):
    ids = tokenizer.encode("😀", bos=False)[:2]
    detok = StreamingDetokenizer(tokenizer)
    assert [detok.add_token(i) for i in ids] == ["", ""]
    assert detok.finalize() == tokenizer.decode(ids)


@settings(max_examples=150, deadline=None, suppress_health_check=_FIXTURE)
# U+2581 is SentencePiece's own space symbol: it decodes to " " by design.
@given(
    text=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\u2581"), max_size=40)
)
def test_streaming_round_trips_unicode(tokenizer, text):
    ids = tokenizer.encode(text, bos=True, special=False)
    segments = stream(tokenizer, ids)
    assert "".join(segments) == tokenizer.decode(ids) == text
    for s in segments:
        s.encode("utf-8")  # never a lone surrogate or broken sequence


@settings(max_examples=150, deadline=None, suppress_health_check=_FIXTURE)
@given(data=st.data())
def test_streaming_equals_decode_on_any_ids(tokenizer, data):
    # Arbitrary id sequences: stray byte pieces, controls, unknown, dangling prefixes.
    byte_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.sp.is_byte(i)]
    any_id = st.integers(0, tokenizer.vocab_size - 1)
    ids = data.draw(st.lists(st.one_of(st.sampled_from(byte_ids), any_id), max_size=30))
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


@pytest.mark.skipif(mistral_model_file() is None, reason="mistral-common not installed")
def test_real_32000_piece_model():
    tok = Tokenizer(mistral_model_file())
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    text = " Unified memory: 統一メモリ — naïve 😀🎉 x\n\n  y"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert "".join(stream(tok, ids)) == text
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
    assert chat.count(tok.eos_id) == 1 and chat[0] == tok.bos_id
