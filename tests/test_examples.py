"""The examples run end to end (tiny settings, one subprocess each), and the default model works.

The examples are scripts, so each is run the way a user runs it. Outputs are
checked against the library called directly (the same completion), against
each other (8-bit damages less than 4-bit) or for their shape (before/after).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from elm_mlx.formats.modeldir import DEFAULT_MODEL, DEFAULT_MODEL_FILES
from elm_mlx.testing import random_weights, tiny_args, write_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
WORDS = Path(__file__).resolve().parent / "data" / "english_words.txt"

nano = pytest.mark.skipif(
    not all((DEFAULT_MODEL / f).is_file() for f in DEFAULT_MODEL_FILES),
    reason="the shipped nano model (elm_mlx/assets/nano) is not trained yet: "
    "python examples/nano/train_nano.py",
)


def run_example(name: str, *args, cwd: Path, env: dict | None = None):
    cmd = [sys.executable, str(EXAMPLES / name), *map(str, args)]
    environ = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=environ, timeout=300)


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, sp_model_file):
    """A tiny checkpoint in the hub's layout, with a tokenizer."""
    path = tmp_path_factory.mktemp("hf") / "tiny-elm"
    args = tiny_args(vocab_size=384)
    write_hf_checkpoint(path, args, random_weights(args, seed=3))
    shutil.copy(sp_model_file, path / "tokenizer.model")
    return path


# ---- generate.py ------------------------------------------------------------------


def test_generate_example_matches_the_library(hf_dir, tmp_path):
    from elm_mlx.formats.modeldir import load
    from elm_mlx.generation.generate import generate

    run = run_example(
        "generate.py", "--model", hf_dir, "--prompt", "Once upon", "--temp", "0",
        "--max-tokens", "12", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    model, tokenizer = load(hf_dir)
    expected = generate(model, tokenizer, "Once upon", max_tokens=12, repetition_penalty=1.1)
    assert run.stdout == "Once upon" + expected + "\n"
    assert "tokens/s" in run.stderr


@nano
def test_generate_example_defaults_to_the_nano_model(tmp_path):
    run = run_example("generate.py", "--max-tokens", "16", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ROMEO:") and len(run.stdout.split()) > 3
    assert str(DEFAULT_MODEL) in run.stderr


# ---- finetune_nano.py ------------------------------------------------------------


def _dictd_files(root: Path, entries: list[str]) -> Path:
    """devil.index and devil.dict.dz in dictd's layout (base-64 offsets, gzip data)."""
    digits = _module("data/make_devil").DICTD_DIGITS

    def b64(n: int) -> str:
        out = ""
        while True:
            out, n = digits[n % 64] + out, n // 64
            if n == 0:
                return out

    data, lines = b"", []
    for key, entry in [("00databaseshort", "The Devil's Dictionary\n"), *entries]:
        raw = entry.encode()
        lines.append(f"{key}\t{b64(len(data))}\t{b64(len(raw))}")
        data += raw
    _, offset, length = lines[1].split("\t")
    lines.append(f"{entries[0][0]} again\t{offset}\t{length}")  # a second key, same entry
    root.mkdir(parents=True, exist_ok=True)
    (root / "devil.index").write_text("\n".join(lines) + "\n")
    (root / "devil.dict.dz").write_bytes(gzip.compress(data))
    return root


def test_devil_dictionary_parsing(tmp_path):
    ft = _module("data/make_devil")
    entries = [
        ("abatis", "ABATIS, n.  Rubbish in front of a fort, to prevent the\nrubbish inside.\n\n"),
        ("exhort", "EXHORT, v.t. In religious affairs, to put the _conscience_ of\nanother "
                   "on the spit.  See {ROAST}.\n\n    Verse that is dropped.\n\n"),
        ("dead", "DEAD, adj.\n\n    Done with the work of breathing.\n\n"),
        ("brute", "BRUTE, n.  See {HUSBAND}.\n\n"),
        ("forma pauperis", "FORMA PAUPERIS.  [Latin]  In the character of a poor person.\n\n"),
    ]  # fmt: skip
    records = ft.read_devil(_dictd_files(tmp_path, entries))
    assert records == [
        {"prompt": "ABATIS:\n", "completion": "Rubbish in front of a fort, to prevent the "
                                              "rubbish inside."},
        {"prompt": "EXHORT:\n", "completion": "In religious affairs, to put the conscience of "
                                              "another on the spit. See ROAST."},
        {"prompt": "FORMA PAUPERIS:\n", "completion": "In the character of a poor person."},
    ]  # fmt: skip


@pytest.mark.parametrize("name,count", [("devil_sample.jsonl", 30), ("devil.jsonl", 970)])
def test_shipped_definitions_have_the_example_format(name, count):
    lines = (EXAMPLES / "data" / name).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == count
    assert all(set(r) == {"prompt", "completion"} for r in records)
    assert all(re.fullmatch(r"[A-Z][A-Z' .-]*:\n", r["prompt"]) for r in records)


def test_finetune_example_reads_the_shipped_dictionary_by_default():
    """Offline with nothing else installed: the default --data is the file in examples/data."""
    ft = _module("finetune_nano")
    assert Path(ft.parse_args([]).data) == EXAMPLES / "data" / "devil.jsonl"
    assert len(ft.read_jsonl(Path(ft.parse_args([]).data))) == 970


@nano
def test_finetune_example_smoke(tmp_path):
    run = run_example(
        "finetune_nano.py", "--data", EXAMPLES / "data" / "devil_sample.jsonl",
        "--work", tmp_path / "work", "--iters", "3", "--batch-size", "2", "--val-every", "3",
        "--show", "2", "--max-tokens", "6", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:] + run.stdout[-2000:]
    assert run.stdout.count("--- before:") == 2 and run.stdout.count("--- after:") == 2
    assert re.search(r"test loss .*: \d+\.\d+ before, \d+\.\d+ after", run.stdout)
    adapters = tmp_path / "work" / "adapters"
    assert (adapters / "adapters.safetensors").is_file()
    assert (adapters / "adapter_config.json").is_file()


# ---- quantize_nano.py ------------------------------------------------------------


def _rows(stdout: str) -> dict[str, list[str]]:
    """Variant name -> the fields of its 'quantized' report row."""
    rows = {}
    for block in stdout.split("\n== ")[1:]:
        name = block.split(":", 1)[0]
        row = next(line for line in block.splitlines() if line.startswith("quantized"))
        rows[name] = row.split()
    return rows


@nano
def test_quantize_example_smoke(tmp_path):
    run = run_example(
        "quantize_nano.py", "--work", tmp_path / "q", "--eval-tokens", "256",
        "--max-tokens", "4", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "julius_caesar_3_2.txt" in run.stdout  # no validation split in this directory
    rows = _rows(run.stdout)
    assert list(rows) == ["8bit", "mixed-4-8", "4bit"]
    bpw = {name: float(fields[1]) for name, fields in rows.items()}
    kl = {name: float(fields[4]) for name, fields in rows.items()}
    assert bpw["8bit"] > bpw["mixed-4-8"] > bpw["4bit"]
    assert kl["8bit"] < kl["4bit"]
    for name in rows:
        assert (tmp_path / "q" / f"nano-{name}" / "config.json").is_file()


# ---- convert_hf.py ---------------------------------------------------------------


def test_convert_example_offline_fails_in_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    run = run_example("convert_hf.py", cwd=tmp_path, env=env)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ")
    assert "apple/OpenELM-270M-Instruct" in run.stderr
    assert not (tmp_path / "runs").exists()


def test_convert_example_converts_a_local_checkpoint_and_generates(hf_dir, tmp_path):
    from elm_mlx.formats.modeldir import load
    from elm_mlx.generation.generate import generate

    out = tmp_path / "mlx"
    args = ["--hf-path", hf_dir, "--mlx-path", out, "--prompt", "Hello", "--max-tokens", "6"]
    run = run_example("convert_hf.py", *args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    model, tokenizer = load(out)
    expected = generate(model, tokenizer, "Hello", max_tokens=6, repetition_penalty=1.2)
    assert run.stdout == f"Hello\n---\n{expected}\n"
    again = run_example("convert_hf.py", *args, cwd=tmp_path)  # reuses the directory
    assert again.returncode == 0 and "already converted" in again.stderr


# ---- the default model from the command line -------------------------------------


@nano
def test_cli_generate_without_model_prints_english():
    cmd = [sys.executable, "-m", "elm_mlx.cli", "generate", "--prompt", "ROMEO:"]
    run = subprocess.run(
        [*cmd, "--max-tokens", "40", "--seed", "0"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", run.stdout)]
    lines = WORDS.read_text().splitlines()
    english = {w for w in lines if w and not w.startswith("#")}
    known = sum(w in english for w in words)
    assert len(words) >= 15 and known >= 0.7 * len(words), (known, len(words), run.stdout)


@nano
def test_cli_info_describes_the_nano_model(capsys):
    from elm_mlx.cli import main

    assert main(["info"]) == 0
    default = capsys.readouterr().out
    assert main(["info", "nano"]) == 0
    assert capsys.readouterr().out == default
    assert default.startswith(str(DEFAULT_MODEL)) and "parameters" in default.lower()


def test_cli_uses_the_default_model_dir(monkeypatch, capsys, hf_dir):
    """No --model: the directory io.DEFAULT_MODEL names is loaded (here a tiny stand-in)."""
    from elm_mlx.cli import main
    from elm_mlx.formats import modeldir as io
    from elm_mlx.generation.generate import generate

    monkeypatch.setattr(io, "DEFAULT_MODEL", hf_dir)
    assert main(["generate", "--prompt", "Hi", "--max-tokens", "5"]) == 0
    model, tokenizer = io.load(hf_dir)
    assert capsys.readouterr().out == generate(model, tokenizer, "Hi", max_tokens=5) + "\n"


def test_cli_without_the_default_model_says_so(monkeypatch, capsys, tmp_path):
    from elm_mlx.cli import main
    from elm_mlx.formats import modeldir as io

    monkeypatch.setattr(io, "DEFAULT_MODEL", tmp_path / "nano")
    for argv in (["generate", "--prompt", "Hi"], ["chat"], ["info"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--model" in err and "nano" in err, err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_help_names_the_default_model(capsys, command):
    from elm_mlx.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "default: the shipped nano" in " ".join(capsys.readouterr().out.split())
