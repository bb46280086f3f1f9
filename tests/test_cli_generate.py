"""`elm-mlx generate` and `elm-mlx chat` on tiny model directories."""

from __future__ import annotations

import io
import os
import shlex
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


def fake_stdin(data: str | bytes) -> io.TextIOWrapper:
    """A non-interactive stdin holding `data`, with the binary `buffer` the commands read."""
    return io.TextIOWrapper(io.BytesIO(data.encode() if isinstance(data, str) else data))


def run_cli(capsys, *argv, stdin: str | bytes | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", fake_stdin(stdin))
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
        (["--temp", "-1"], "--temp must be"),
        (["--top-p", "0"], "--top-p must be"),
        (["--top-p", "1.5"], "--top-p must be"),
        (["--top-k", "-3"], "--top-k must be"),
        (["--min-p", "1"], "--min-p must be"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be"),
        (["--repetition-context-size", "0"], "--repetition-context-size must be"),
        (["--max-tokens", "-1"], "--max-tokens must be an integer >= 0, got -1"),
        (["--max-kv-size", "2"], "--max-kv-size must be"),
        (["--stop", ""], "--stop strings must be"),
        (["--seed", "-1"], "--seed must be an integer in [0, 2**64)"),
        (["--seed", str(2**64)], "--seed must be"),
        (["--raw", "--system", "Be brief."], "--system"),
    ],
)
def test_bad_values_exit_1_with_one_line(capsys, model_dirs, flags, message):
    """Messages name the flags the user typed, never the Python names behind them."""
    code, out, err = run_cli(capsys, "generate", "--model", model_dirs[0], "--prompt", "x", *flags)
    assert code == 1
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert out == ""
    python_name = flags[0].lstrip("-").replace("-", "_")
    assert "_" not in python_name or python_name not in err


def test_chat_names_flags_too(capsys, monkeypatch, model_dirs):
    argv = ["chat", "--model", model_dirs[1], "--max-tokens", "-1"]
    code, _, err = run_cli(capsys, *argv, stdin="Hi\n", monkeypatch=monkeypatch)
    assert code == 1 and err == "error: --max-tokens must be an integer >= 0, got -1\n"


def test_a_prompt_past_the_context_names_the_flag(capsys, model_dirs):
    """The library names the argument (max_kv_size); the CLI says --max-kv-size."""
    long_prompt = "Once upon a time " * 200
    code, out, err = run_cli(capsys, "generate", "--model", model_dirs[0], "--prompt", long_prompt)
    assert code == 1 and out == ""
    assert "--max-kv-size" in err and "max_kv_size" not in err
    assert len(err.strip().splitlines()) == 1


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

    class Interrupt(io.BytesIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(Interrupt()))
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
    from elm_mlx.runtime import fastpath

    calls = []
    original = fastpath._blocks

    def counting(views, h, *args, **kwargs):
        calls.append(len(h))  # positions through the numpy blocks
        return original(views, h, *args, **kwargs)

    monkeypatch.setattr(fastpath, "_blocks", counting)
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


def test_integer_sampling_values_in_generation_config_are_used(tmp_path):
    """HF writes `"temperature": 1` as often as 1.0; both are the model's suggestion."""
    import json

    from elm_mlx.cli.app import build_parser
    from elm_mlx.cli.generate import _generation_settings
    from elm_mlx.generation.loading import sampling_defaults

    config = {"do_sample": True, "temperature": 1, "top_p": 1, "top_k": 40}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert sampling_defaults(tmp_path) == {"temp": 1.0, "top_p": 1.0, "top_k": 40}
    args = build_parser().parse_args(["generate", "--model", str(tmp_path), "--prompt", "x"])
    settings = _generation_settings(args)
    assert (settings.temp, settings.top_p, settings.top_k) == (1.0, 1.0, 40)


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"do_sample": true, "temperature": 0.7', "not valid JSON"),
        ('["do_sample"]', "JSON object"),
        ('{"do_sample": true, "temperature": "hot"}', "temperature"),
        ('{"do_sample": true, "top_p": 2}', "top_p"),
    ],
)
def test_a_generation_config_that_cannot_be_used_is_one_line(
    capsys, tmp_path, model_dirs, content, words
):
    model = tmp_path / "model"
    shutil.copytree(model_dirs[0], model)
    (model / "generation_config.json").write_text(content)
    code, out, err = run_cli(capsys, "generate", "--model", model, "--prompt", "x")
    assert code == 1 and out == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "generation_config.json" in err and words in err
    assert "--top-p" not in err  # the file's problem, not a flag's


# ---- faults: bad bytes, closed pipes, interrupted chats --------------------------------


def test_invalid_utf8_input_is_one_line(capsys, monkeypatch, model_dirs):
    argv = ["generate", "--model", model_dirs[0], "--prompt", "-"]
    code, out, err = run_cli(capsys, *argv, stdin=b"Hello, \xff world", monkeypatch=monkeypatch)
    assert (code, out) == (1, "")
    assert err == "error: input is not valid UTF-8 (byte 0xff at position 7)\n"
    # Bytes in an argument reach Python as surrogates (os.fsdecode); the message is the same.
    argv = ["generate", "--model", model_dirs[0], "--prompt", os.fsdecode(b"Hello, \xfe")]
    code, out, err = run_cli(capsys, *argv)
    assert (code, out) == (1, "")
    assert err == "error: --prompt is not valid UTF-8 (byte 0xfe at position 7)\n"


def test_generate_into_a_closed_pipe_ends_quietly(model_dirs, tmp_path):
    """`elm-mlx generate ... | head -c 20` exits 0 without a traceback, like Unix tools."""
    command = [sys.executable, "-m", "elm_mlx.cli", "generate", "--model", str(model_dirs[0])]
    command += ["--prompt", "Once upon a time", "--max-tokens", "20000", "--max-kv-size", "64"]
    err = tmp_path / "stderr"
    script = f"{shlex.join(command)} 2>{shlex.quote(str(err))} | head -c 20; "
    script += 'echo " exit=${PIPESTATUS[0]}"'
    done = subprocess.run(["bash", "-c", script], capture_output=True, timeout=300)
    assert done.stdout.endswith(b" exit=0\n"), (done.stdout, err.read_text())
    assert len(done.stdout) == 20 + len(b" exit=0\n")
    assert err.read_text() == ""  # no traceback, no "Exception ignored", no summary


def test_chat_survives_a_bad_line_and_a_failed_turn(capsys, monkeypatch, model_dirs, loaded):
    """A line that is not UTF-8 and a turn that fails each print one line; the conversation
    goes on as if they had not happened."""
    from elm_mlx.generation import generate as generation

    original = generation.stream_generate

    def flaky(model, tokenizer, prompt, **kw):
        if "Break now" in tokenizer.decode(list(prompt)):
            raise RuntimeError("the model fell over\n(second line)")
        return original(model, tokenizer, prompt, **kw)

    monkeypatch.setattr(generation, "stream_generate", flaky)
    argv = ["chat", "--model", model_dirs[1], "--max-tokens", "6", "--temp", "1", "--seed", "3"]
    stdin = b"Hello there\n\xc3(bad\nBreak now\nHow are you?\n"
    code, out, err = run_cli(capsys, *argv, stdin=stdin, monkeypatch=monkeypatch)
    assert code == 0
    settings = GenerationSettings(max_tokens=6, temp=1.0, seed=3)
    session = ChatSession(*loaded, settings=settings)
    first = "".join(r.text for r in session.send("Hello there"))
    second = "".join(r.text for r in session.send("How are you?"))
    assert out == f"{first}\n{second}\n" and out.strip()
    assert err.splitlines() == [
        "error: input is not valid UTF-8 (byte 0xc3 at position 0)",
        "error: the model fell over (second line)",
    ]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a pseudo-terminal")
def test_chat_in_a_terminal_ctrl_c_stops_the_reply_and_ctrl_d_leaves(model_dirs):
    """In a real terminal: Ctrl-C during a (practically endless) reply returns to the prompt,
    Ctrl-D there ends the chat with a newline and exit status 0."""
    import pty

    command = [sys.executable, "-m", "elm_mlx.cli", "chat", "--model", str(model_dirs[1])]
    command += ["--max-tokens", "100000", "--max-kv-size", "64"]
    pid, fd = pty.fork()
    if pid == 0:  # the child, on the terminal
        os.execv(sys.executable, command)
    try:
        seen = read_until(fd, b">>> ")
        os.write(fd, b"Hello there\n")
        seen = read_until(fd, b"Hello there", seen)
        read_more(fd, 200)  # the reply is streaming
        os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT
        seen = read_until(fd, b"(reply stopped)")
        seen = read_until(fd, b">>> ", seen)
        os.write(fd, b"\x04")  # Ctrl-D at the prompt
        rest = read_to_end(fd)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert b"Traceback" not in seen + rest
    assert rest.replace(b"\r", b"") == b"\n"  # a newline, so the shell prompt starts clean
    assert os.waitstatus_to_exitcode(status) == 0


def test_sigterm_ends_a_chat_even_mid_reply(model_dirs):
    """SIGTERM is not a Ctrl-C to shrug off: the chat ends with status 143."""
    import signal

    command = [sys.executable, "-m", "elm_mlx.cli", "chat", "--model", str(model_dirs[1])]
    command += ["--max-tokens", "100000", "--max-kv-size", "64"]
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        proc.stdin.write(b"Hello there\n")
        proc.stdin.flush()  # stdin stays open: the chat would wait for another line
        proc.stdout.read(200)  # the reply is streaming
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and b"Traceback" not in err


def read_until(fd, marker: bytes, seen: bytes = b"", timeout: float = 120) -> bytes:
    """Terminal output until `marker` appears; the output after it (marker included)."""
    import select
    import time

    end = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < end, f"no {marker!r} in {seen[-300:]!r}"
        if select.select([fd], [], [], 1)[0]:
            seen += os.read(fd, 4096)
    return seen[seen.index(marker) + len(marker) :]


def read_more(fd, n: int) -> bytes:
    got = b""
    while len(got) < n:
        got += os.read(fd, 4096)
    return got


def read_to_end(fd) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            return out
        if not chunk:
            return out
        out += chunk


def test_version(capsys):
    from elm_mlx import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"elm-mlx {__version__}\n"
