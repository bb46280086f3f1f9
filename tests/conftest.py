"""Shared test fixtures. Add fixtures here; keep each one small and offline."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

# A small corpus with accents and digits, so the model has merges, normal pieces
# and byte-fallback pieces (emoji, CJK) to exercise.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little language model.",
    "Unified memory lets the CPU and the GPU share one pool of memory.",
    "héllo wörld, naïve café, déjà vu",
    "Numbers like 1234 and 5678 are split into digits.",
    "Explain unified memory in one paragraph.",
]


def train_sentencepiece(path: Path, vocab_size: int = 384) -> Path:
    """Train a tiny Llama-style SentencePiece model (BPE, byte fallback, BOS 1, EOS 2)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="session")
def sp_model_file(tmp_path_factory) -> Path:
    """Path of a tiny SentencePiece tokenizer.model trained for the session."""
    return train_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer.model")


@pytest.fixture(scope="session")
def tokenizer(sp_model_file):
    from elm_mlx.formats.tokenizer import Tokenizer

    return Tokenizer(sp_model_file)


@pytest.fixture
def model_dir(tmp_path, sp_model_file):
    """A tiny untied HF checkpoint with a SentencePiece tokenizer (for the training commands)."""
    import shutil

    from elm_mlx.testing import random_weights, tiny_args, write_hf_checkpoint

    args = tiny_args(vocab_size=384, tied=False)
    weights = random_weights(args, 0)
    weights["lm_head.weight"] *= 5
    path = write_hf_checkpoint(tmp_path / "model", args, weights)
    shutil.copyfile(sp_model_file, path / "tokenizer.model")
    return path
