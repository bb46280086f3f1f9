"""Resumable training checkpoints: trainable weights, optimizer state, RNG key, metadata.

A checkpoint is a directory, `checkpoint/`, written whole into a temporary
sibling and renamed into place: `weights.safetensors` (the trainable
parameters), `optimizer.safetensors` (the optimizer's state, step included,
and the RNG key) and `state.json` (whatever the trainer wants back).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

CHECKPOINT_DIR = "checkpoint"
_OLD, _TMP = ".checkpoint.old", ".checkpoint.tmp"  # the previous one and the one being written
RNG_KEY = "rng.key"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model or optimizer it is loaded into."""


def save_arrays(path: Path, arrays: dict[str, mx.array]) -> None:
    """mx.save_safetensors into a temporary sibling, then renamed to `path`."""
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays)
    os.replace(tmp, path)


def save_checkpoint(
    out_dir: Path, model: nn.Module, optimizer: optim.Optimizer, meta: dict
) -> Path:
    """Write everything a resume needs into `out_dir/checkpoint`, replacing it whole."""
    final, tmp, old = (out_dir / n for n in (CHECKPOINT_DIR, _TMP, _OLD))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_arrays(tmp / "weights.safetensors", dict(tree_flatten(model.trainable_parameters())))
    opt = dict(tree_flatten(optimizer.state))
    opt[RNG_KEY] = mx.random.state[0]
    save_arrays(tmp / "optimizer.safetensors", opt)
    (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dir(out_dir: Path) -> Path:
    """The checkpoint directory under `out_dir`; FileNotFoundError if there is none."""
    for name in (CHECKPOINT_DIR, _OLD):  # _OLD: a crash between two renames
        if (out_dir / name / "state.json").is_file():
            return out_dir / name
    raise FileNotFoundError(f"no checkpoint in {out_dir} to resume; start without --resume")


def remove_checkpoint(out_dir: Path) -> None:
    """Delete every checkpoint under `out_dir`, so that no later resume can pick one up."""
    for name in (CHECKPOINT_DIR, _OLD, _TMP):
        shutil.rmtree(out_dir / name, ignore_errors=True)


def read_meta(where: Path) -> dict:
    return json.loads((where / "state.json").read_text())


def set_rng_key(key: mx.array) -> None:
    """Make `key` MLX's global RNG key."""
    # A seed s gives the key (s >> 32, s & 0xffffffff): seeding with the key's words restores it.
    hi, lo = key.tolist()
    mx.random.seed((hi << 32) | lo)


def restore_checkpoint(where: Path, model: nn.Module, optimizer: optim.Optimizer) -> None:
    """Load trainable weights, optimizer state and the RNG key saved in `where`."""
    weights = mx.load(str(where / "weights.safetensors"))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(trainable):
        raise CheckpointError(
            f"{where} holds weights for other trainable parameters than this model's "
            f"({len(weights)} vs {len(trainable)}); resume with the same adapter settings"
        )
    model.load_weights(list(weights.items()), strict=False)
    opt = mx.load(str(where / "optimizer.safetensors"))
    set_rng_key(opt.pop(RNG_KEY))
    optimizer.init(model.trainable_parameters())
    if set(opt) != {k for k, _ in tree_flatten(optimizer.state)}:
        raise CheckpointError(f"{where} holds the state of another optimizer; start afresh")
    optimizer.state = tree_map_with_path(lambda path, _: opt[path], optimizer.state)
    mx.eval(model.parameters(), optimizer.state)


class MetricsLog:
    """A JSONL log, one object per line; resuming drops the lines past the resumed step."""

    def __init__(self, path: Path, keep_until: int | None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        lines = []
        if keep_until is not None and path.is_file():
            lines = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= keep_until
            ]
        path.write_text("".join(line + "\n" for line in lines))

    def write(self, **record) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
