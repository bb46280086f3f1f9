"""`elm-mlx generate` and `elm-mlx chat` on tiny model directories."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import pytest

from elm_mlx.cli import main
from elm_mlx.generation.generate import ChatSession, GenerationSettings, generate
from elm_mlx.testing import random_weights, tiny_args, write_hf_checkpoint


def make_model_dir(path, tokenizer_file):
    args = tiny_args(vocab_size=384)
    write_hf_checkpoint(path, args, random_weights(args, seed=4))
    shutil.copy(tokenizer_file, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, sp_model_file):
    root = tmp_path_factory.mktemp("models")
    base = make_model_dir(root / "tiny-elm", sp_model_file)
    instruct = make_model_dir(root / "tiny-elm-Instruct", sp_model_file)
    return base, instruct


@pytest.fixture(scope="module")
def loaded(model_dirs):
    from elm_mlx.formats.modeldir import load

    return load(model_dirs[0])


def run_cli(capsys, *argv, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ["--model", "--temp", "--top-p", "--top-k", "--min-p", "--seed", "--system"]:
        assert flag in out
    if command == "generate":
        assert all(f in out for f in ["--prompt", "--stop", "--raw", "instruct"])


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--model", "m", "--prompt", "x", "--bogus"],
        ["generate", "--model", "m", "--prompt", "x", "--temp", "hot"],
        ["generate", "--model", "m", "--prompt", "x", "--max-tokens", "1.5"],
        ["generate", "--model", "m"],  # no prompt
        ["chat", "--model", "m", "--top-k", "many"],
    ],
)
def test_bad_flags_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temp", "-1"], "temp"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--top-k", "-3"], "top_k"),
        (["--min-p", "1"], "min_p"),
        (["--repetition-penalty", "0"], "repetition_penalty"),
        (["--repetition-context-size", "0"], "repetition_context_size"),
        (["--max-tokens", "-1"], "max_tokens"),
        (["--max-kv-size", "2"], "max_kv_size"),
        (["--stop", ""], "stop"),
        (["--seed", "-1"], "seed must be an integer in [0, 2**64)"),
        (["--seed", str(2**64)], "seed"),
        (["--raw", "--system", "Be brief."], "--system"),
    ],
)
def test_bad_values_exit_1_with_one_line(capsys, model_dirs, flags, message):
    code, out, err = run_cli(capsys, "generate", "--model", model_dirs[0], "--prompt", "x", *flags)
    assert code == 1
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert out == ""


def test_missing_model_and_tokenizer_exit_1(capsys, tmp_path, model_dirs):
    code, _, err = run_cli(capsys, "generate", "--model", tmp_path / "nope", "--prompt", "x")
    assert code == 1 and len(err.strip().splitlines()) == 1
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(model_dirs[0], no_tok)
    (no_tok / "tokenizer.model").unlink()
    code, _, err = run_cli(capsys, "generate", "--model", no_tok, "--prompt", "x")
    assert code == 1 and "tokenizer.model" in err and len(err.strip().splitlines()) == 1


def test_generate_streams_what_the_library_generates(capsys, model_dirs, loaded):
    model, tokenizer = loaded
    argv = ["generate", "--model", model_dirs[0], "--prompt", "Once upon a time"]
    code, out, err = run_cli(capsys, *argv, "--max-tokens", "12")
    assert code == 0
    assert out == generate(model, tokenizer, "Once upon a time", max_tokens=12) + "\n"
    assert f"prompt: {len(tokenizer.encode('Once upon a time'))} tokens" in err
    assert "generation:" in err and "peak memory:" in err


def test_instruct_models_get_the_chat_template(capsys, model_dirs, loaded):
    model, tokenizer = loaded  # same weights as the Instruct directory
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    argv = ["generate", "--model", model_dirs[1], "--prompt", "Hi", "--max-tokens", "8"]
    _, templated, _ = run_cli(capsys, *argv, "--system", "Be brief.")
    assert templated == generate(model, tokenizer, chat, max_tokens=8) + "\n"
    _, raw, _ = run_cli(capsys, *argv, "--raw")
    assert raw == generate(model, tokenizer, "Hi", max_tokens=8) + "\n"
    # A base model with --system also gets the template.
    argv[2] = model_dirs[0]
    assert run_cli(capsys, *argv, "--system", "Be brief.")[1] == templated


def test_seeded_sampling_from_the_cli(capsys, model_dirs):
    argv = ["generate", "--model", model_dirs[0], "--prompt", "Hi", "--max-tokens", "16"]
    argv += ["--temp", "1.0", "--top-p", "0.95", "--raw"]
    a = run_cli(capsys, *argv, "--seed", "0")[1]
    assert run_cli(capsys, *argv, "--seed", "0")[1] == a
    assert run_cli(capsys, *argv, "--seed", "1")[1] != a


def test_prompt_from_stdin_in_a_subprocess(model_dirs, loaded):
    model, tokenizer = loaded
    proc = subprocess.run(
        [sys.executable, "-m", "elm_mlx.cli", "generate", "--model", str(model_dirs[0])]
        + ["--prompt", "-", "--max-tokens", "10"],
        input="Once upon a time\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == generate(model, tokenizer, "Once upon a time", max_tokens=10) + "\n"
    assert "generation: " in proc.stderr


def test_empty_stdin_prompt_exit_1(capsys, monkeypatch, model_dirs):
    argv = ["generate", "--model", model_dirs[0], "--prompt", "-"]
    code, _, err = run_cli(capsys, *argv, stdin="", monkeypatch=monkeypatch)
    assert code == 1 and "empty" in err


def test_chat_reset_and_eof(capsys, monkeypatch, model_dirs, loaded):
    argv = ["chat", "--model", model_dirs[1], "--max-tokens", "6"]
    stdin = "Hello there\n\nHow are you?\n/reset\nHello there\n"
    code, out, err = run_cli(capsys, *argv, stdin=stdin, monkeypatch=monkeypatch)
    assert code == 0
    session = ChatSession(*loaded, settings=GenerationSettings(max_tokens=6))
    first = "".join(r.text for r in session.send("Hello there"))
    second = "".join(r.text for r in session.send("How are you?"))
    assert out == f"{first}\n{second}\n{first}\n"  # /reset forgot the conversation
    assert "cleared" in err


def test_chat_exit_command_and_ctrl_c(capsys, monkeypatch, model_dirs):
    argv = ["chat", "--model", model_dirs[1], "--max-tokens", "4"]
    code, out, _ = run_cli(capsys, *argv, stdin="/exit\nHello\n", monkeypatch=monkeypatch)
    assert (code, out) == (0, "")

    class Interrupt(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Interrupt())
    assert main([str(a) for a in argv]) == 0


def test_sampling_defaults_come_from_generation_config(tmp_path):
    """Flags the user leaves out take the model's generation_config.json; given flags win."""
    import json

    from elm_mlx.cli.app import build_parser
    from elm_mlx.cli.generate import _generation_settings

    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.9})
    )
    parse = build_parser().parse_args
    base = ["generate", "--model", str(tmp_path), "--prompt", "x"]
    settings = _generation_settings(parse(base))
    assert (settings.temp, settings.top_p) == (0.7, 0.9)
    settings = _generation_settings(parse([*base, "--temp", "0"]))
    assert (settings.temp, settings.top_p) == (0.0, 0.9)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    settings = _generation_settings(parse(base))
    assert (settings.temp, settings.top_p) == (0.0, 1.0)


def test_generate_with_adapter_path_equals_the_fused_model(tmp_path, capsys):
    """`generate --adapter-path` gives the text of the model `elm-mlx fuse` writes, and differs
    from the base model's."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from elm_mlx.cli import main
    from elm_mlx.formats.modeldir import default_model_path, load
    from elm_mlx.training.lora import LoRAConfig, apply_lora, save_adapters

    base = str(default_model_path())
    model, _ = load(base)
    config = LoRAConfig(rank=4, scale=20.0)
    apply_lora(model, config, seed=0)
    trainable = tree_map(lambda p: p + 0.5 * mx.random.normal(p.shape, key=mx.random.key(1)),
                         model.trainable_parameters())  # fmt: skip
    model.update(trainable)
    assert len(tree_flatten(trainable)) > 0
    save_adapters(model, tmp_path / "adapters", config)
    fused = tmp_path / "fused"
    assert main(["fuse", "--model", base, "--adapter-path", str(tmp_path / "adapters"),
                 "--save-path", str(fused)]) == 0  # fmt: skip
    capsys.readouterr()

    def text(*extra):
        assert main(["generate", "--prompt", "ROMEO:", "--max-tokens", "12", "--temp", "0",
                     *extra]) == 0  # fmt: skip
        return capsys.readouterr().out

    with_adapters = text("--adapter-path", str(tmp_path / "adapters"))
    assert with_adapters == text("--model", str(fused))
    assert with_adapters != text()


def test_cpu_fast_path_is_used_and_can_be_switched_off(capsys, monkeypatch, model_dirs):
    """On the CPU generation runs through the numpy path unless --no-fast-path; same greedy
    text either way (logits agree to float32 rounding), and -v says which path and BLAS."""
    from elm_mlx.runtime.fastpath import CpuDecoder

    calls = []
    original = CpuDecoder.forward

    def counting(self, views, tokens, cache):
        calls.append(len(tokens))
        return original(self, views, tokens, cache)

    monkeypatch.setattr(CpuDecoder, "forward", counting)
    argv = ["generate", "--model", model_dirs[0], "--prompt", "Once upon a time", "--temp", "0"]
    code, fast_out, err = run_cli(capsys, *argv, "--max-tokens", "10", "-v")
    assert code == 0 and len(calls) >= 10 and sum(calls) > 10  # prompt chunk and each token
    assert "CPU fast path: on" in err and "BLAS: " in err
    calls.clear()
    code, plain_out, err = run_cli(capsys, *argv, "--max-tokens", "10", "-v", "--no-fast-path")
    assert code == 0 and calls == []
    assert "CPU fast path: off (switched off)" in err
    assert plain_out == fast_out


def test_half_precision_models_compute_in_float32_on_the_cpu(capsys, tmp_path, model_dirs):
    """--dtype auto: a bfloat16 model directory runs in float32 on the CPU (fast path on), the
    same text as loading it as float32; --dtype bfloat16 keeps MLX's half-precision kernels."""
    import mlx.core as mx

    from elm_mlx.formats.modeldir import load, save_model
    from elm_mlx.generation.generate import generate

    model, tokenizer = load(model_dirs[0])
    model.set_dtype(mx.bfloat16)
    half = save_model(
        tmp_path / "bf16", model, model.args, tokenizer=model_dirs[0] / "tokenizer.model"
    )
    argv = ["generate", "--model", half, "--prompt", "Once upon a time", "--temp", "0", "-v"]
    code, out, err = run_cli(capsys, *argv, "--max-tokens", "8")
    assert code == 0 and "compute dtype: float32 (stored bfloat16" in err
    assert "CPU fast path: on" in err
    as_float32, _ = load(half, dtype="float32")
    assert out == generate(as_float32, tokenizer, "Once upon a time", max_tokens=8) + "\n"
    code, _, err = run_cli(capsys, *argv, "--max-tokens", "8", "--dtype", "bfloat16")
    assert code == 0 and "compute dtype: bfloat16 (as stored)" in err
    assert "CPU fast path: off" in err


def test_a_full_context_is_reported(capsys, model_dirs, loaded):
    """Greedy generation that runs into the context length ends with finish_reason "context"
    and a line on stderr that names the way past it; max_tokens itself ends with "length"."""
    from elm_mlx.generation.generate import stream_generate

    model, tokenizer = loaded
    context = model.args.max_context_length
    n_prompt = len(tokenizer.encode("Once upon a time"))
    last = list(stream_generate(model, tokenizer, "Once upon a time", max_tokens=context))[-1]
    assert last.finish_reason == "context"  # these random weights never pick EOS greedily
    assert last.generation_tokens == context - n_prompt + 1
    last = list(stream_generate(model, tokenizer, "Once upon a time", max_tokens=3))[-1]
    assert last.finish_reason == "length"
    argv = ["generate", "--model", model_dirs[0], "--prompt", "Once upon a time", "--temp", "0"]
    code, _, err = run_cli(capsys, *argv, "--max-tokens", str(context))
    assert code == 0 and "context is full; --max-kv-size" in err
    code, _, err = run_cli(capsys, *argv, "--max-tokens", "3")
    assert code == 0 and "context is full" not in err
