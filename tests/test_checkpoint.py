"""Training checkpoints on disk: the files a resume reads, with the permissions the umask gives."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest

from elm_mlx.formats import files
from elm_mlx.training.checkpoint import CHECKPOINT_DIR, save_arrays, save_checkpoint


@pytest.mark.parametrize("mask", [0o002, 0o027])
def test_checkpoint_files_get_the_permissions_the_umask_gives(tmp_path, mask):
    """MLX writes safetensors 0644 whatever the umask: a group-writable run (umask 002)
    once got checkpoint weights its group could not replace."""
    model = nn.Linear(4, 3)
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(model.trainable_parameters())
    old = os.umask(mask)
    try:
        where = save_checkpoint(tmp_path, model, optimizer, {"state": {"step": 1}})
        save_arrays(tmp_path / "adapters.safetensors", {"w": mx.zeros(2)})
    finally:
        os.umask(old)
    assert where == tmp_path / CHECKPOINT_DIR
    assert where.stat().st_mode & 0o777 == 0o777 & ~mask
    written = sorted(p.name for p in where.iterdir())
    assert written == ["optimizer.safetensors", "state.json", "weights.safetensors"]
    for file in [*where.iterdir(), tmp_path / "adapters.safetensors"]:
        assert file.stat().st_mode & 0o777 == 0o666 & ~mask, file.name


def test_links_in_an_atomic_directory_keep_their_targets_mode(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("x")
    target.chmod(0o600)
    with files.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "link").symlink_to(target)
    assert target.stat().st_mode & 0o777 == 0o600
