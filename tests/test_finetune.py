"""finetune() and `elm-mlx lora` under faults: no dead ends, no tracebacks, one `error:` line.

Real faults where the machine allows them: a read-only and a size-limited tmpfs
(`mount`, skipped with the reason where mounting is not permitted), truncated
and corrupt files, a diverging loss.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from elm_mlx.cli import main
from elm_mlx.training.checkpoint import CHECKPOINT_DIR, WriteError, save_checkpoint
from elm_mlx.training.lora import ADAPTER_FILE, CONFIG_FILE, LoRAError, load_adapters
from elm_mlx.training.plot import plot_losses

LIBRARY = Path(__file__).resolve().parents[1] / "elm_mlx"


def write_data(path: Path, n_train: int = 8, long_words: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", 4)):
        lines = [
            json.dumps({"prompt": f"Q: what is {i} plus one? A:", "completion": f" {i + 1}."})
            for i in range(n)
        ]
        if long_words and split == "train":
            lines[0] = json.dumps({"prompt": "Count:", "completion": " one" * long_words})
        (path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return path


def lora(model_dir, data, adapters, *extra) -> list[str]:
    return [
        "lora", "--model", str(model_dir), "--data", str(data), "--adapter-path", str(adapters),
        "--rank", "4", "--batch-size", "4", "--learning-rate", "1e-3", "--val-every", "2",
        "--save-every", "2", "--iters", "2", *map(str, extra),
    ]  # fmt: skip


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    return err.strip()


@pytest.fixture
def mounted(tmp_path):
    """mount(options) -> a fresh tmpfs directory; skipped where mounting is not allowed."""
    points = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        run = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip() or run.returncode}")
        points.append(point)
        return point

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


# ---- item 4: no dead ends ---------------------------------------------------------------


def test_a_loss_that_diverges_before_the_first_checkpoint_leaves_a_restartable_dir(
    tmp_path, model_dir, capsys
):
    data, adapters = write_data(tmp_path / "data"), tmp_path / "adapters"
    # Adam moves every weight by about the learning rate: 1e38 overflows at once.
    args = lora(model_dir, data, adapters, "--learning-rate", "1e38", "--iters", "6",
                "--save-every", "5")  # fmt: skip
    assert main(args) == 1
    err = one_error_line(capsys)
    assert re.search(r"the loss is (nan|inf) at step \d", err), err
    assert "nothing was kept" in err and "the same command starts over" in err
    assert "--learning-rate" in err and "`" not in err
    assert not any(adapters.iterdir()) if adapters.exists() else True
    assert main(lora(model_dir, data, adapters)) == 0  # no --force needed
    assert (adapters / CHECKPOINT_DIR / "state.json").is_file()


def test_a_torn_last_line_of_metrics_is_repaired_on_resume(tmp_path, model_dir, capsys):
    data, adapters = write_data(tmp_path / "data"), tmp_path / "adapters"
    assert main(lora(model_dir, data, adapters)) == 0
    with (adapters / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "train_lo')  # a process killed in the middle of a line
    assert main([*lora(model_dir, data, adapters, "--iters", "4"), "--resume"]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in (adapters / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]


@pytest.mark.parametrize("damage", ["state.json", "weights.safetensors"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, model_dir, capsys, damage):
    data, adapters = write_data(tmp_path / "data"), tmp_path / "adapters"
    assert main(lora(model_dir, data, adapters)) == 0
    file = adapters / CHECKPOINT_DIR / damage
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    capsys.readouterr()
    assert main([*lora(model_dir, data, adapters, "--iters", "4"), "--resume"]) == 1
    err = one_error_line(capsys)
    assert str(file) in err and "start the run over (--force)" in err


def test_resume_with_other_data_says_which_file_differs(tmp_path, model_dir, capsys):
    data, adapters = write_data(tmp_path / "data"), tmp_path / "adapters"
    assert main(lora(model_dir, data, adapters)) == 0
    other = write_data(tmp_path / "other", n_train=9)
    capsys.readouterr()
    assert main([*lora(model_dir, other, adapters, "--iters", "4"), "--resume"]) == 1
    err = one_error_line(capsys)
    assert "exactly: --data train.jsonl was sha256:" in err
    assert "valid.jsonl" not in err  # the same file in both directories


# ---- item 2: I/O faults ---------------------------------------------------------------------


def test_a_read_only_adapter_path_is_one_line(tmp_path, model_dir, capsys, mounted):
    read_only = mounted("ro,size=1m")
    data = write_data(tmp_path / "data")
    assert main(lora(model_dir, data, read_only / "adapters")) == 1
    err = one_error_line(capsys)
    assert f"cannot write {read_only / 'adapters'}" in err and "Read-only file system" in err


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, model_dir, mounted):
    import mlx.optimizers as optim
    from test_trainer import lora_model

    disk = mounted("size=2m")
    model = lora_model()
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(model.trainable_parameters())
    save_checkpoint(disk, model, optimizer, {"state": {"step": 1}})
    before = {p.name: p.read_bytes() for p in (disk / CHECKPOINT_DIR).iterdir()}
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * (free - 8192))  # room for state.json, not weights
    with pytest.raises(WriteError, match=f"cannot write {disk / CHECKPOINT_DIR}"):
        save_checkpoint(disk, model, optimizer, {"state": {"step": 2}})
    after = {p.name: p.read_bytes() for p in (disk / CHECKPOINT_DIR).iterdir()}
    assert after == before
    assert sorted(p.name for p in disk.iterdir()) == [CHECKPOINT_DIR, "filler"]


def test_a_full_disk_during_lora_is_one_line(tmp_path, model_dir, capsys, mounted):
    disk = mounted("size=256k")
    data = write_data(tmp_path / "data")
    (disk / "filler").write_bytes(b"\0" * (os.statvfs(disk).f_bavail * 4096 - 12288))
    assert main(lora(model_dir, data, disk / "adapters")) == 1
    err = one_error_line(capsys)
    assert "cannot write" in err and str(disk / "adapters") in err


@pytest.mark.parametrize("command", ["fuse", "generate"])
def test_a_truncated_adapter_file_is_one_line(tmp_path, model_dir, capsys, command):
    data, adapters = write_data(tmp_path / "data"), tmp_path / "adapters"
    assert main(lora(model_dir, data, adapters)) == 0
    file = adapters / ADAPTER_FILE
    file.write_bytes(file.read_bytes()[:-100])
    capsys.readouterr()
    rest = {"fuse": ["--save-path", tmp_path / "fused"], "generate": ["--prompt", "Q:"]}
    args = [command, "--model", model_dir, "--adapter-path", adapters, *rest[command]]
    assert main(list(map(str, args))) == 1
    err = one_error_line(capsys)
    assert f"{file} cannot be read" in err and "train the adapters" in err
    assert not (tmp_path / "fused").exists()


def test_an_adapter_path_that_is_a_file_is_one_line(tmp_path, model_dir, capsys):
    data, adapters = write_data(tmp_path / "data"), tmp_path / "adapters"
    adapters.write_text("not a directory")
    assert main(lora(model_dir, data, adapters)) == 1
    assert (
        one_error_line(capsys) == f"error: {adapters} is a file; --adapter-path must be a directory"
    )
    assert adapters.read_text() == "not a directory"


# ---- item 5: the rank in one line -------------------------------------------------------------


def test_an_adapter_rank_that_differs_from_its_config_is_one_line(tmp_path, model_dir, capsys):
    from elm_mlx.formats.modeldir import load

    data, adapters = write_data(tmp_path / "data"), tmp_path / "adapters"
    assert main(lora(model_dir, data, adapters)) == 0
    config = json.loads((adapters / CONFIG_FILE).read_text())
    config["lora_parameters"]["rank"] = 8
    (adapters / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(LoRAError) as e:
        load_adapters(load(model_dir)[0], adapters)
    assert str(e.value).endswith("adapters have rank 4 but adapter_config.json says 8")
    assert len(str(e.value)) < 200


# ---- item 7b: the model's context -----------------------------------------------------------


def test_records_longer_than_the_context_are_cut_to_it_and_counted(tmp_path, model_dir, capsys):
    data = write_data(tmp_path / "data", long_words=400)  # the tiny model's context: 256
    assert main(lora(model_dir, data, tmp_path / "adapters")) == 0
    out = capsys.readouterr().out
    assert "train.jsonl: 8 completion records" in out
    assert "1 truncated to 256 tokens" in out


# ---- the library's language, the plot, the progress bar -----------------------------------------


def test_library_messages_name_arguments_not_flags():
    flags = ("--force", "--resume", "--val-every", "--max-kv-size", "--iters")
    files = [f for f in LIBRARY.rglob("*.py") if "cli" not in f.relative_to(LIBRARY).parts]
    assert len(files) > 40
    for file in files:
        text = file.read_text()
        assert not [f for f in flags if f in text], file


def test_the_loss_plot_uses_matplotlib_or_says_how_to_install_it(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "train_loss": 3.0 - s / 10} for s in range(1, 6)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "tr')
    png = tmp_path / "loss.png"
    assert plot_losses(metrics, png) == f"loss curve written to {png}"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    note = plot_losses(metrics, tmp_path / "other.png")
    assert note == "loss curve skipped: matplotlib is not installed (pip install 'elm-mlx[train]')"


def test_finetune_shows_a_progress_bar_with_rate_and_eta(tmp_path, model_dir, capsys):
    from elm_mlx.formats.modeldir import load
    from elm_mlx.training.finetune import finetune
    from elm_mlx.training.lora import LoRAConfig
    from elm_mlx.training.trainer import TrainArgs

    model, tokenizer = load(model_dir)
    data = write_data(tmp_path / "data")
    args = TrainArgs(iters=3, batch_size=4, learning_rate=1e-3, val_every=0, report_every=1)
    lines = []
    umask = os.umask(0o027)
    try:
        result = finetune(
            model, tokenizer, data, tmp_path / "adapters", LoRAConfig(rank=2), args,
            progress=True, log=lines.append,
        )  # fmt: skip
    finally:
        os.umask(umask)
    # Outputs get the umask's permissions, like any file the user makes.
    adapters = tmp_path / "adapters"
    for path in [adapters, adapters / CHECKPOINT_DIR, *adapters.rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o750 if path.is_dir() else 0o640), path
    assert result.state.step == 3
    err = capsys.readouterr().err
    assert "3/3" in err and re.search(r"step/s|s/step", err) and "<" in err  # rate, ETA
    assert any(line.startswith("step      3/3") for line in lines)  # the log, above the bar
    assert (tmp_path / "adapters" / ADAPTER_FILE).is_file()
    assert mx.load(str(tmp_path / "adapters" / ADAPTER_FILE))


def test_sigterm_during_lora_saves_a_checkpoint_and_exits_143(tmp_path, model_dir):
    data, adapters = write_data(tmp_path / "data"), tmp_path / "adapters"
    args = lora(model_dir, data, adapters, "--iters", "100000", "--report-every", "1",
                "--val-every", "0", "--save-every", "0")  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "elm_mlx.cli", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith("step      2/"):
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "continue it with --resume" in out and "Traceback" not in err
    state = json.loads((adapters / CHECKPOINT_DIR / "state.json").read_text())
    assert state["state"]["step"] >= 2
