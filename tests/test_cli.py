"""The CLI's shared wording: library argument names said as this command's flags, in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from elm_mlx.cli import common
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
