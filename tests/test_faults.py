"""Faults, not typos: atomic outputs, umask permissions, full and read-only disks, truncated
weights, outputs in the way, SIGTERM and SIGKILL. Real faults where the machine allows them:
small tmpfs mounts (root only; skipped with the reason otherwise) and killed processes."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from elm_mlx import cli
from elm_mlx.formats import files
from elm_mlx.formats import modeldir as mio
from elm_mlx.formats.modeldir import DEFAULT_MODEL
from elm_mlx.testing import preset, random_weights, tiny_args, write_hf_checkpoint

# ---- helpers ----------------------------------------------------------------------------


def hf_checkpoint(tmp_path: Path, sp_model_file: Path) -> Path:
    args = tiny_args(vocab_size=384)
    src = write_hf_checkpoint(tmp_path / "hf", args, random_weights(args, 0))
    shutil.copyfile(sp_model_file, src / "tokenizer.model")
    return src


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err, err
    return lines[-1]


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs mounted with `options` (skips where not allowed)."""
    mounted: list[Path] = []

    def make(options: str) -> Path:
        if shutil.which("mount") is None or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not allowed here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


# ---- atomic directories and files -----------------------------------------------------


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with files.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_with_force_only_when_complete(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("old")
    with pytest.raises(files.OutputExistsError, match="already exists$") as e:
        with files.atomic_dir(tmp_path / "out"):
            pass
    assert e.value.replaceable
    with pytest.raises(RuntimeError):
        with files.atomic_dir(tmp_path / "out", force=True) as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError("interrupted")
    assert (tmp_path / "out" / "config.json").read_text() == "old"
    with files.atomic_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert (tmp_path / "out" / "config.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_files_replace_whole_or_not_at_all(tmp_path):
    files.write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(RuntimeError):
        with files.atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, mask):
    """mkdtemp's 0700 once came through the rename: another user could not read a model."""
    old = os.umask(mask)
    try:
        with files.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "w").write_bytes(b"x")
        files.write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_converted_quantized_and_saved_dirs_get_umask_permissions(tmp_path, sp_model_file, capsys):
    src = hf_checkpoint(tmp_path, sp_model_file)
    old = os.umask(0o002)
    try:
        assert run_cli(capsys, "convert", "--hf-path", src, "--mlx-path", tmp_path / "c")[0] == 0
        assert (
            run_cli(capsys, "quantize", "--model", DEFAULT_MODEL, "--out", tmp_path / "q")[0] == 0
        )
        model, _ = mio.load_model(tmp_path / "c")
        mio.save_model(tmp_path / "s", model, model.args)  # what fuse writes through
    finally:
        os.umask(old)
    for out in ("c", "q", "s"):
        assert (tmp_path / out).stat().st_mode & 0o777 == 0o775, out
        for f in (tmp_path / out).iterdir():
            assert f.stat().st_mode & 0o777 == 0o664, f


# ---- leftovers of killed runs ----------------------------------------------------------


def test_stale_partials_of_ended_processes_are_removed_live_ones_kept(tmp_path):
    gone = tmp_path / f".out.partial-{dead_pid()}-abcd1234"
    gone.mkdir()
    (gone / "model.safetensors").write_bytes(b"half")
    gone_file = tmp_path / f".out.partial-{dead_pid()}-efgh5678"
    gone_file.write_bytes(b"half")
    live = tmp_path / f".out.partial-{os.getpid()}-ijkl9012"
    live.mkdir()
    # the id of a live process, but one that started at another time: the id was reused
    reused = tmp_path / f".out.partial-{os.getpid()}-mnop3456"
    reused.mkdir()
    (reused / files.OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "start": "1"}))
    other = tmp_path / f".other.partial-{dead_pid()}-qrst7890"
    other.mkdir()
    removed = files.clean_stale_partials(tmp_path, "out")
    assert sorted(removed) == sorted([gone, gone_file, reused])
    assert live.exists() and other.exists()


def test_a_kill_between_the_two_renames_of_a_replacement_gives_the_old_output_back(tmp_path):
    old = tmp_path / f".out.partial-{dead_pid()}-old-abcd1234"
    (old / "out").mkdir(parents=True)
    (old / "out" / "config.json").write_text("previous")
    assert files.clean_stale_partials(tmp_path, "out") == [old]
    assert (tmp_path / "out" / "config.json").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.fixture(scope="module")
def checkpoint_270m(tmp_path_factory, sp_model_file) -> tuple[Path, Path]:
    """OpenELM-270M's exact shapes (zeros in float16: 0.54 GB) and a tokenizer."""
    args = preset("OpenELM-270M")
    path = tmp_path_factory.mktemp("openelm-270m") / "hf"
    weights = {k: np.zeros(shape, np.float16) for k, shape in args.weight_shapes().items()}
    return write_hf_checkpoint(path, args, weights), sp_model_file


# `python -m elm_mlx.convert`, except that each weight file, once written, is held in the
# temporary directory for a minute: the signal always lands before the output is renamed
# into place, however fast this machine writes.
_CONVERT_THAT_WAITS = """
import sys, time
import mlx.core as mx
from elm_mlx import cli
save = mx.save_safetensors
def save_then_wait(*args, **kwargs):
    save(*args, **kwargs)
    time.sleep(60)
mx.save_safetensors = save_then_wait
sys.exit(cli.main(["convert", *sys.argv[1:]]))
"""


def _start_and_kill(src: Path, tok: Path, out: Path, sig: int, seed: int):
    """Start a conversion, wait until it writes, then send `sig` at a random moment while it
    is still running: in the 0.54 GB write or after it, before the rename."""
    flags = ["--hf-path", src, "--mlx-path", out, "--tokenizer", tok]
    command = [sys.executable, "-c", _CONVERT_THAT_WAITS, *map(str, flags)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f".{out.name}.partial-*")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.005)
    time.sleep(random.Random(seed).uniform(0.0, 0.8))
    assert proc.poll() is None, (
        f"the conversion ended before the kill: {proc.stderr.read().decode()}"
    )
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_conversion_leaves_nothing_to_clean_by_hand(
    checkpoint_270m, tmp_path, capsys, sig
):
    src, tok = checkpoint_270m
    out = tmp_path / "out"
    seed = random.randrange(1 << 30)
    code, err = _start_and_kill(src, tok, out, sig, seed)
    partials = list(tmp_path.glob(".out.partial-*"))
    assert not out.exists(), f"seed {seed}: a killed run left {out}"
    if sig == signal.SIGTERM:  # the run cleans up after itself
        assert code == 143 and err.strip().endswith("terminated"), f"seed {seed}: {err}"
        assert "Traceback" not in err and partials == [], f"seed {seed}: {err}"
        return
    assert code == -signal.SIGKILL and len(partials) == 1, f"seed {seed}: {err}"
    # The next command that writes there removes the leftover and says so in one line.
    float_dir = tmp_path / "float"
    assert run_cli(capsys, "convert", "--hf-path", DEFAULT_MODEL, "--mlx-path", float_dir)[0] == 0
    code, err = run_cli(capsys, "quantize", "--model", float_dir, "--out", out)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("removed ")]
    assert notes == [
        f"removed 1 unfinished output(s) left by a stopped process: {partials[0].name}"
    ]
    assert list(tmp_path.glob(".out.partial-*")) == []


# ---- I/O faults: one line, nothing left behind -----------------------------------------


def test_read_only_destination_is_one_error_line(mount, tmp_path, sp_model_file, capsys):
    src = hf_checkpoint(tmp_path, sp_model_file)
    ro = mount("ro,size=1m")
    code, err = run_cli(capsys, "convert", "--hf-path", src, "--mlx-path", ro / "out")
    assert code == 1
    assert one_error_line(err) == f"error: {ro / 'out'}: Read-only file system"
    code, err = run_cli(capsys, "quantize", "--model", DEFAULT_MODEL, "--out", ro / "q")
    assert code == 1 and one_error_line(err) == f"error: {ro / 'q'}: Read-only file system"
    model, _ = mio.load_model(DEFAULT_MODEL)
    with pytest.raises(OSError, match="Read-only") as e:  # fuse writes through save_model
        mio.save_model(ro / "fused", model, model.args)
    assert e.value.filename == str(ro / "fused")


def test_full_disk_keeps_the_previous_output_and_removes_the_temporary(
    mount, tmp_path, sp_model_file, capsys
):
    src = hf_checkpoint(tmp_path, sp_model_file)
    run_cli(capsys, "convert", "--hf-path", src, "--mlx-path", tmp_path / "c")
    size = sum(f.stat().st_size for f in (tmp_path / "c").iterdir())
    disk = mount(f"size={size * 3 // 2}")  # room for one output, not for two
    shutil.copytree(tmp_path / "c", disk / "out")
    before = {f.name: f.read_bytes() for f in (disk / "out").iterdir()}
    argv = ["convert", "--hf-path", src, "--mlx-path", disk / "out", "--force", "--dtype"]
    code, err = run_cli(capsys, *argv, "float32")
    assert code == 1
    line = one_error_line(err)
    assert line.startswith(f"error: {disk / 'out'}/") and "No space left on device" in line
    assert {f.name: f.read_bytes() for f in (disk / "out").iterdir()} == before
    assert [p.name for p in disk.iterdir()] == ["out"]


def test_truncated_weights_are_one_line_naming_the_file(tmp_path, sp_model_file, capsys):
    src = hf_checkpoint(tmp_path, sp_model_file)
    run_cli(capsys, "convert", "--hf-path", src, "--mlx-path", tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    data = weights.read_bytes()
    for cut in (len(data) // 2, 40):  # in the tensor data; in the header
        weights.write_bytes(data[:cut])
        code, err = run_cli(capsys, "quantize", "--model", tmp_path / "c", "--out", tmp_path / "q")
        assert code == 1
        line = one_error_line(err)
        assert line.startswith(f"error: cannot read {weights}: ") and "corrupt" in line
    assert not (tmp_path / "q").exists()


def test_an_output_that_is_a_file_is_one_line(tmp_path, sp_model_file, capsys):
    src = hf_checkpoint(tmp_path, sp_model_file)
    (tmp_path / "file").write_text("mine")
    for force in ([], ["--force"]):
        argv = ["convert", "--hf-path", src, "--mlx-path", tmp_path / "file", *force]
        code, err = run_cli(capsys, *argv)
        assert code == 1
        expected = f"error: {tmp_path / 'file'} exists and is not a directory; refusing to"
        assert one_error_line(err) == expected + " replace it"
    code, err = run_cli(capsys, "convert", "--hf-path", src, "--mlx-path", tmp_path / "file" / "x")
    assert (
        code == 1
        and one_error_line(err) == f"error: {tmp_path / 'file'} is a file, not a directory"
    )
    assert (tmp_path / "file").read_text() == "mine"


def test_os_errors_from_anywhere_in_a_command_are_one_line(capsys):
    from elm_mlx.cli.app import run

    def full(args):
        raise OSError(28, "No space left on device", "/data/out/model.safetensors")

    assert run(full, None) == 1
    assert (
        capsys.readouterr().err == "error: /data/out/model.safetensors: No space left on device\n"
    )


def test_failed_weight_writes_name_the_file_and_a_full_disk(mount, tmp_path):
    disk = mount("size=64k")
    with pytest.raises(OSError) as e:
        mio.save_model(disk / "out", {"w": mx.zeros((256, 256))}, tiny_args())
    assert e.value.errno == 28 and e.value.filename == str(disk / "out" / "model.safetensors")
    assert list(disk.iterdir()) == []


def test_a_gguf_export_onto_a_full_disk_says_so_and_leaves_nothing(mount, capsys):
    """numpy's short write ("N requested and M written", no errno) is named for what it is."""
    pytest.importorskip("gguf")
    disk = mount("size=200k")
    code, err = run_cli(capsys, "export-gguf", "--out", disk / "n.gguf")
    assert code == 1
    assert one_error_line(err) == f"error: {disk / 'n.gguf'}: No space left on device"
    assert list(disk.iterdir()) == []


def test_an_evaluation_output_that_cannot_be_written_is_found_before_the_work(mount, capsys):
    pytest.importorskip("lm_eval")
    ro = mount("ro")
    start = time.monotonic()
    code, err = run_cli(capsys, "eval", "--tasks", "nano_next_line", "--output", ro / "e.json")
    assert code == 1 and time.monotonic() - start < 30
    assert one_error_line(err) == (
        f"error: --output {ro / 'e.json'}: cannot write in {ro}: Read-only file system"
    )


def test_perplexity_data_that_is_a_directory_says_so(tmp_path, capsys):
    code, err = run_cli(capsys, "perplexity", "--data", tmp_path)
    assert code == 1
    assert one_error_line(err) == f"error: {tmp_path} is a directory; give a .txt or .jsonl file"


def test_fuse_cleans_leftovers_and_reports_a_read_only_destination(mount, tmp_path, capsys):
    from elm_mlx.training.lora import LoRAConfig, apply_lora, save_adapters

    model, _ = mio.load_model(DEFAULT_MODEL)
    config = LoRAConfig(rank=4)
    apply_lora(model, config)
    save_adapters(model, tmp_path / "adapters", config)
    fuse = ["fuse", "--model", DEFAULT_MODEL, "--adapter-path", tmp_path / "adapters"]
    leftover = tmp_path / f".fused.partial-{dead_pid()}-abcd1234"
    leftover.mkdir()
    code, err = run_cli(capsys, *fuse, "--save-path", tmp_path / "fused")
    assert code == 0, err
    assert f"removed 1 unfinished output(s) left by a stopped process: {leftover.name}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "fused"]
    ro = mount("ro,size=1m")
    code, err = run_cli(capsys, *fuse, "--save-path", ro / "fused")
    assert code == 1 and one_error_line(err) == f"error: {ro / 'fused'}: Read-only file system"


def test_a_failed_swap_puts_the_previous_output_back(tmp_path, monkeypatch):
    """The second rename of a replacement fails: the old output must not stay hidden."""
    from elm_mlx.formats import files

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    real = Path.rename

    def rename(self, target):
        if self.name.startswith(".out.partial-") and "-old-" not in self.name:
            raise OSError(5, "Input/output error")  # the new output cannot take its place
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError), files.atomic_dir(out, force=True) as tmp:
        (tmp / "keep").write_text("new")
    monkeypatch.setattr(Path, "rename", real)
    assert (out / "keep").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
