"""`elm-mlx perplexity` mistakes: one `error:` line that names the file or flag, before the work."""

from __future__ import annotations

import pytest

from elm_mlx import cli
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
