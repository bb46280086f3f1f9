"""Resumable training checkpoints, the metrics log, and reading the run's files back.

A checkpoint is a directory, `checkpoint/`, written whole into a temporary
sibling and renamed into place (formats/files.py): `weights.safetensors` (the
trainable parameters), `optimizer.safetensors` (the optimizer's state, step
included, and the RNG key) and `state.json` (whatever the trainer wants back).
A fault while writing (a full disk, a read-only directory) leaves the previous
checkpoint as it was and removes the temporary one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from ..formats.files import atomic_dir, atomic_path, clean_stale_partials

CHECKPOINT_DIR = "checkpoint"
RNG_KEY = "rng.key"
_REMEDY = "start the run over (`force=True`)"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model or optimizer."""


class WriteError(ValueError):
    """A file of the run could not be written: a full disk, a read-only directory."""


@contextlib.contextmanager
def writing(what: Path):
    """Turn an OSError inside the block into a WriteError naming the file."""
    try:
        yield
    except OSError as e:
        raise WriteError(f"cannot write {e.filename or what}: {e.strerror or e}") from None
    except RuntimeError as e:
        # MLX's writers: "[write] Unable to write N bytes to file.", "[save...] Failed to open"
        if not str(e).startswith(("[write]", "[save")):
            raise
        reason = str(e).split("] ", 1)[-1].rstrip(".")
        with contextlib.suppress(OSError):  # measured once the partial file is gone
            free = shutil.disk_usage(_existing_parent(what)).free
            reason += f" (its file system has {free:,} bytes free without the partial file)"
        raise WriteError(f"cannot write {what}: {reason}") from None


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def save_arrays(path: Path, arrays: dict[str, mx.array]) -> None:
    """mx.save_safetensors through a temporary sibling renamed to `path`."""
    with writing(path), atomic_path(path) as tmp:
        mx.save_safetensors(str(tmp), arrays)


def load_arrays(path: Path, remedy: str, error: type[Exception] | None = None) -> dict:
    """mx.load of a safetensors file; a truncated or corrupt one raises `error` (default
    CheckpointError) in one line that names the file, what is wrong and `remedy`."""
    try:
        return mx.load(str(path))
    except (OSError, RuntimeError, ValueError) as e:
        reason = str(e).split("] ", 1)[-1].split(". Perhaps")[0].rstrip(".")
        raise (error or CheckpointError)(f"{path} cannot be read ({reason}); {remedy}") from None


def save_checkpoint(
    out_dir: Path, model: nn.Module, optimizer: optim.Optimizer, meta: dict
) -> Path:
    """Write everything a resume needs into `out_dir/checkpoint`, replacing it whole."""
    final = out_dir / CHECKPOINT_DIR
    opt = dict(tree_flatten(optimizer.state))
    opt[RNG_KEY] = mx.random.state[0]
    with writing(final), atomic_dir(final, force=True) as tmp:
        mx.save_safetensors(
            str(tmp / "weights.safetensors"), dict(tree_flatten(model.trainable_parameters()))
        )
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt)
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
    return final


def checkpoint_dir(out_dir: Path) -> Path:
    """The checkpoint directory under `out_dir`; FileNotFoundError if there is none."""
    clean_stale_partials(out_dir, CHECKPOINT_DIR)  # a crash between two renames puts it back
    if (out_dir / CHECKPOINT_DIR / "state.json").is_file():
        return out_dir / CHECKPOINT_DIR
    raise FileNotFoundError(f"no checkpoint in {out_dir} to resume; start without `resume=True`")


def read_meta(where: Path) -> dict:
    """The checkpoint's state.json; a corrupt one is a CheckpointError naming it."""
    file = where / "state.json"
    try:
        meta = json.loads(file.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
            raise ValueError("no 'state' object")
        return meta
    except (OSError, UnicodeDecodeError, ValueError) as e:
        reason = (
            f"not valid JSON: {e.msg}, line {e.lineno} column {e.colno}"
            if isinstance(e, json.JSONDecodeError)
            else str(e)
        )
        raise CheckpointError(f"{file} is damaged ({reason}); {_REMEDY}") from None


def set_rng_key(key: mx.array) -> None:
    """Make `key` MLX's global RNG key."""
    # A seed s gives the key (s >> 32, s & 0xffffffff): seeding with the key's words restores it.
    hi, lo = key.tolist()
    mx.random.seed((hi << 32) | lo)


def restore_checkpoint(where: Path, model: nn.Module, optimizer: optim.Optimizer) -> None:
    """Load trainable weights, optimizer state and the RNG key saved in `where`."""
    weights = load_arrays(where / "weights.safetensors", _REMEDY)
    opt = load_arrays(where / "optimizer.safetensors", _REMEDY)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(trainable):
        raise CheckpointError(
            f"{where} holds weights for other trainable parameters than this model's "
            f"({len(weights)} vs {len(trainable)}); resume with the same adapter settings"
        )
    model.load_weights(list(weights.items()), strict=False)
    if RNG_KEY not in opt:
        raise CheckpointError(f"{where / 'optimizer.safetensors'} has no RNG key; {_REMEDY}")
    set_rng_key(opt.pop(RNG_KEY))
    optimizer.init(model.trainable_parameters())
    if set(opt) != {k for k, _ in tree_flatten(optimizer.state)}:
        raise CheckpointError(f"{where} holds the state of another optimizer; {_REMEDY}")
    optimizer.state = tree_map_with_path(lambda path, _: opt[path], optimizer.state)
    mx.eval(model.parameters(), optimizer.state)


# ---- the metrics log ---------------------------------------------------------------


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file; lines that do not parse (a torn last line) are left out."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsLog:
    """A JSONL log, one object per line.

    Resuming keeps the records up to the resumed step and drops the rest, a line
    torn by a killed process included; a fresh run starts an empty log.
    """

    def __init__(self, path: Path, keep_until: int | None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if keep_until is not None and path.is_file():
            kept = [r for r in read_records(path) if r.get("step", 0) <= keep_until]
        with writing(path), atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, **record) -> None:
        if self.enabled:
            with writing(self.path), self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
