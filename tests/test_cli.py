"""The CLI's shared wording: library argument names said as this command's flags, in one place."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from elm_mlx.cli import common, main
from elm_mlx.cli.common import CliError, as_flags, flag_names
from elm_mlx.quant.quantize import GroupSizeError

CLI = Path(common.__file__).parent


@pytest.mark.parametrize(
    "message, renames, leading, expected",
    [
        # backticked names: dashes by default, the command's own flag where it differs
        ("raise `iters` above 3", None, False, "raise --iters above 3"),
        ("choose one with `dtype`", None, False, "choose one with --dtype"),
        ("set `fine_tune_type=dora`", {"fine_tune_type": "--dora / --full"}, False,
         "set --dora / --full dora"),
        ("continue it with `resume=True`", None, False, "continue it with --resume"),
        ("turn it off: `val_every=0`", None, False, "turn it off: --val-every 0"),
        # a bare leading name only where the command asks for it (settings checks)
        ("top_k must be >= 0", {"top_k": "--top-k"}, True, "--top-k must be >= 0"),
        ("top_k must be >= 0", {"top_k": "--top-k"}, False, "top_k must be >= 0"),
        ("tokenizer model x not found", {"tokenizer": "--tokenizer"}, False,
         "tokenizer model x not found"),
        # code spans that are no argument stay as they are
        ("run `hf auth login`", None, False, "run `hf auth login`"),
    ],
)  # fmt: skip
def test_library_names_become_flags(message, renames, leading, expected):
    assert as_flags(message, renames, leading=leading) == expected


def test_errors_in_the_block_are_reworded_or_left_alone():
    with pytest.raises(CliError) as e, flag_names():
        raise ValueError("`resume=True` and `force=True` exclude each other")
    assert str(e.value) == "--resume and --force exclude each other"
    plain = ValueError("nothing to reword")
    with pytest.raises(ValueError) as e, flag_names({"x": "--y"}):
        raise plain
    assert e.value is plain  # the same error, its type kept for the CLI's hints


@pytest.mark.parametrize(
    "renames, fix",
    [
        ({"group_size": "--q-group-size"}, " (--q-group-size 32)"),
        ({"group_size": "--group-size"}, " (--group-size 32)"),
        (None, None),
    ],
)
def test_a_group_size_fix_names_the_commands_own_flag(renames, fix):
    error = GroupSizeError("group size 64 does not divide ...; use group size 32", 32)
    with pytest.raises((CliError, GroupSizeError)) as e, flag_names(renames):
        raise error
    if fix is None:  # a command without a group size flag says nothing about one
        assert e.value is error
    else:
        assert str(e.value) == str(error) + fix


def test_only_the_shared_helper_rewords_library_names():
    """One decision, one owner: no command keeps its own copy of the rewording."""
    for file in CLI.glob("*.py"):
        if file.name == "common.py":
            continue
        text = file.read_text()
        for copy in ("re.sub(", "GroupSizeError", "def _as_flags", "def _flag_names",
                     "def _group_size_flag", "def flags("):  # fmt: skip
            assert copy not in text, f"{file.name}: {copy}"


# ---- outputs without a tokenizer -------------------------------------------------------


def without_tokenizer(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tokenizer.model"))
    return dst


def tokenizer_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "tokenizer.model" in line]


def test_quantizing_a_model_without_a_tokenizer_says_how_to_add_one(tmp_path, capsys):
    from elm_mlx.formats.modeldir import DEFAULT_MODEL

    bare = without_tokenizer(Path(DEFAULT_MODEL), tmp_path / "bare")
    assert main(["quantize", "--model", str(bare), "--out", str(tmp_path / "q")]) == 0
    assert tokenizer_warnings(capsys.readouterr().err) == [
        f"warning: {tmp_path / 'q'} has no tokenizer.model (its input model has none), so "
        "`elm-mlx generate` cannot use it; copy the Llama-2 SentencePiece tokenizer.model "
        f"into {tmp_path / 'q'}"
    ]
    # With the tokenizer copied in, the quantized model generates.
    shutil.copyfile(Path(DEFAULT_MODEL) / "tokenizer.model", tmp_path / "q" / "tokenizer.model")
    argv = ["generate", "--model", str(tmp_path / "q"), "--prompt", "ROMEO:", "--max-tokens", "2"]
    assert main(argv) == 0
    # A model with its tokenizer quantizes without a warning.
    assert main(["quantize", "--model", str(DEFAULT_MODEL), "--out", str(tmp_path / "q2")]) == 0
    assert tokenizer_warnings(capsys.readouterr().err) == []


@pytest.mark.parametrize("tokenizer", [True, False], ids=["with", "without"])
def test_fusing_into_a_model_without_a_tokenizer_says_how_to_add_one(
    tmp_path, model_dir, capsys, tokenizer
):
    from elm_mlx.formats.modeldir import load
    from elm_mlx.training.lora import LoRAConfig, apply_lora, save_adapters

    base = model_dir if tokenizer else without_tokenizer(model_dir, tmp_path / "bare")
    model, _ = load(base)
    config = LoRAConfig(rank=2)
    apply_lora(model, config, seed=0)
    save_adapters(model, tmp_path / "adapters", config)
    fused = tmp_path / "fused"
    argv = ["fuse", "--model", str(base), "--adapter-path", str(tmp_path / "adapters")]
    assert main([*argv, "--save-path", str(fused)]) == 0
    warnings = tokenizer_warnings(capsys.readouterr().err)
    assert len(warnings) == (0 if tokenizer else 1), warnings
    if not tokenizer:
        assert warnings[0].startswith(f"warning: {fused} has no tokenizer.model")
        assert warnings[0].endswith(f"copy the Llama-2 SentencePiece tokenizer.model into {fused}")


@pytest.mark.parametrize(
    "command, stdin",
    [
        (["info"], None),
        (["generate", "--prompt", "To be", "--max-tokens", "4", "--seed", "1"], None),
        (["chat", "--max-tokens", "4"], b"hi\n"),
    ],
)
def test_a_closed_standard_output_is_one_error_line(command, stdin):
    """Started with `>&-` (Python has no sys.stdout then): one error line and status 1, not a
    traceback, an exit 0 with nothing written, or a chat that goes on."""
    import subprocess
    import sys

    shell = ['exec "$0" -m elm_mlx.cli "$@" >&-', sys.executable, *command]
    done = subprocess.run(["sh", "-c", *shell], input=stdin, capture_output=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.decode().splitlines() == [
        "error: standard output is closed; give the command somewhere to write its output "
        "(a terminal, a file or a pipe)"
    ]
