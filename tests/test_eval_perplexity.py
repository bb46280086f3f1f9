"""`elm-mlx perplexity` mistakes: one `error:` line that names the file or flag, before the work."""

from __future__ import annotations

import pytest

from elm_mlx import cli
from elm_mlx.cli import eval as eval_cmd
from elm_mlx.evaluation.perplexity import read_documents


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl"])
def test_a_file_that_is_not_utf8_is_named_with_the_fix(tmp_path, capsys, name):
    data = tmp_path / name
    data.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError) as e:
        read_documents(data)
    assert str(e.value).startswith(f"{data} is not UTF-8 text (byte 0xe9 at position 13); ")
    assert "convert it to UTF-8" in str(e.value)
    code, out, err = run_cli(capsys, "perplexity", "--data", data)
    assert code == 1 and out == ""
    assert err.splitlines() == [f"error: {e.value}"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stride", "0"], "--stride must be >= 1, got 0"),
        (["--stride", "-3"], "--stride must be >= 1, got -3"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ],
)
def test_bad_numbers_are_refused_before_anything_loads(
    tmp_path, capsys, monkeypatch, flags, message
):
    def must_not_load(*args, **kwargs):
        raise AssertionError("read or loaded before the flags were checked")

    monkeypatch.setattr(eval_cmd, "load_for_generation", must_not_load)
    monkeypatch.setattr(eval_cmd, "read_documents", must_not_load)
    code, out, err = run_cli(capsys, "perplexity", "--data", tmp_path / "absent.txt", *flags)
    assert (code, out, err) == (1, "", f"error: {message}\n")


def test_a_stride_longer_than_the_context_names_the_flag(tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("To be, or not to be, that is the question.\n")
    code, out, err = run_cli(capsys, "perplexity", "--data", data, "--stride", "100000")
    assert code == 1 and out == ""
    assert err.splitlines()[-1].startswith("error: --stride must be between 1 and ")
