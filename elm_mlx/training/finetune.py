"""Fine-tuning into an adapter directory: `finetune(...)` owns the directory and its decisions.

    ADAPTER_PATH/adapter_config.json    how to rebuild the adapters (lora.CONFIG_FILE)
    ADAPTER_PATH/adapters.safetensors   the best-validation weights (lora.ADAPTER_FILE)
    ADAPTER_PATH/checkpoint/            what a resume needs (checkpoint.CHECKPOINT_DIR)
    ADAPTER_PATH/metrics.jsonl          losses and speed per step (trainer.METRICS_FILE)
    ADAPTER_PATH/loss.png               the loss curve (plot.PLOT_FILE)

A fresh run refuses a directory that holds a run; `resume=True` continues it
(with the same adapter settings, training settings and data files: their
hashes are kept in the checkpoint); `force=True` replaces it. A run whose loss
diverges before its first checkpoint removes what it wrote, so that the same
call can start over.

Errors quote argument names in backticks (`force=True`); the CLI words them as its flags.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..formats.convert import sha256
from ..formats.files import clean_stale_partials
from ..formats.modeldir import carried_files, check_not_source, check_target, load, save_model
from .checkpoint import CHECKPOINT_DIR, writing
from .data import Dataset, load_datasets
from .lora import (
    ADAPTER_FILE,
    CONFIG_FILE,
    LoRAConfig,
    apply_lora,
    fuse_lora,
    load_adapters,
    num_trainable,
    read_adapter_config,
    write_adapter_config,
)
from .plot import PLOT_FILE, plot_losses
from .train_ops import TrainingOps, chunked_loss, training_layers
from .trainer import (
    METRICS_FILE,
    ResumeMismatch,
    TrainArgs,
    TrainingDiverged,
    TrainState,
    evaluate,
    make_optimizer,
    train,
)

RUN_FILES = (ADAPTER_FILE, CONFIG_FILE, CHECKPOINT_DIR, METRICS_FILE, PLOT_FILE)
Log = Callable[[str], None]


class AdapterPathInUse(FileExistsError):
    """The adapter directory holds a run and neither `resume` nor `force` was given."""


@dataclass
class FinetuneResult:
    state: TrainState
    datasets: dict[str, Dataset]
    test_loss: float | None = None


def data_fingerprint(data_dir: str | Path, splits=("train", "valid")) -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of each split file that exists, by file name."""
    found = {}
    for split in splits:
        file = Path(data_dir) / f"{split}.jsonl"
        if file.is_file():
            found[file.name] = "sha256:" + sha256(file)[:16]
    return found


def check_adapter_path(
    path: Path, config: LoRAConfig, n_layers: int, *, resume: bool, force: bool
) -> None:
    """The fresh / resume / force decision, before anything is written."""
    if resume and force:
        raise ValueError("`resume=True` and `force=True` exclude each other")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; `adapter_path` must be a directory")
    if resume:
        saved, now = read_adapter_config(path).settings(n_layers), config.settings(n_layers)
        diffs = [(k, saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))]
        diffs = [d for d in diffs if d[1] != d[2]]
        if diffs:
            raise ResumeMismatch(path / CONFIG_FILE, diffs)
    elif not force and not _nothing_kept(path):
        held = [n for n in RUN_FILES if (path / n).exists()]
        if held:
            raise AdapterPathInUse(
                f"{path} already holds {', '.join(held)}; continue that run (`resume=True`), "
                "replace it (`force=True`), or choose another `adapter_path`"
            )


def _nothing_kept(path: Path) -> bool:
    """Whether `path` holds no adapters and no checkpoint: nothing a run there could continue
    or that a fresh one would lose (what a run that failed before its first save leaves:
    its config and metrics), so that a fresh run may start there, clearing those."""
    return not (path / ADAPTER_FILE).exists() and not (path / CHECKPOINT_DIR).exists()


def _remove_run_files(path: Path) -> None:
    for name in RUN_FILES:
        clean_stale_partials(path, name)  # what killed runs left of it goes too
        target = path / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def _prepare(path: Path, config: LoRAConfig, n_layers: int, replace: bool) -> Callable:
    def on_start() -> None:
        with writing(path):
            path.mkdir(parents=True, exist_ok=True)
            if replace:
                _remove_run_files(path)  # a later resume must not pick up the old checkpoint
        write_adapter_config(path, config, n_layers)

    return on_start


def _progress(args: TrainArgs, enabled: bool | None, log: Log):
    """(bar, callback, log): a tqdm bar over the steps (rate, ETA), log lines written above it."""
    from tqdm import tqdm

    bar = tqdm(total=args.iters, unit="step", disable=None if enabled is None else not enabled)

    def callback(step: int, loss: float) -> None:
        if bar.n == 0 and step > 1:  # resumed: the rate counts from here
            bar.reset(args.iters)
            bar.initial = bar.n = step - 1
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def write(line: str) -> None:
        with bar.external_write_mode():
            log(line)

    return bar, callback, write


def finetune(
    model: nn.Module,
    tokenizer,
    data: str | Path,
    adapter_path: str | Path,
    config: LoRAConfig,
    args: TrainArgs,
    *,
    ops: TrainingOps | None = None,
    resume: bool = False,
    force: bool = False,
    max_seq_length: int | None = None,
    mask_prompt: bool = False,
    group: mx.distributed.Group | None = None,
    progress: bool | None = None,
    log: Log = print,
) -> FinetuneResult:
    """Fine-tune `model` on the JSONL files in `data` into the adapter directory `adapter_path`.

    `config.fine_tune_type` picks LoRA, DoRA or full training; `args` the
    optimizer and loop (its `out_dir` and `weights_file` are this directory's).
    Records longer than `max_seq_length` tokens (default: the model's context)
    are truncated, and the summary says how many. `progress`: a progress bar
    (None: when writing to a terminal). Returns the final state, the datasets
    and the loss on `test.jsonl` when there is one.
    """
    group = group or mx.distributed.init()
    say = log if group.rank() == 0 else (lambda _: None)
    path, n_layers = Path(adapter_path), len(model.layers)
    sets = load_datasets(
        data, tokenizer, max_seq_length=max_seq_length or model.args.max_context_length,
        mask_prompt=mask_prompt, require_valid=args.val_every > 0,
    )  # fmt: skip
    for dataset in sets.values():
        say(dataset.summary())
    check_adapter_path(path, config, n_layers, resume=resume, force=force)
    apply_lora(model, config, seed=args.seed)
    total, n = model.args.num_parameters(), num_trainable(model)
    say(f"trainable parameters: {n:,} of {total:,} ({100 * n / total:.3f}%), "
        f"{group.size()} process(es)")  # fmt: skip
    args = copy.copy(args)  # already checked; the copy only moves it into this directory
    args.out_dir, args.weights_file = str(path), ADAPTER_FILE
    fingerprint = {
        **{f"data {name}": digest for name, digest in data_fingerprint(data).items()},
        "max_seq_length": max_seq_length or model.args.max_context_length,
        "mask_prompt": mask_prompt,
    }
    bar, callback, write = _progress(args, progress if group.rank() == 0 else False, say)
    clear = force or not resume and _nothing_kept(path)  # what a failed run left goes too
    start = _prepare(path, config, n_layers, clear) if group.rank() == 0 else None
    try:
        with training_layers(model, ops), contextlib.closing(bar):
            state = train(
                model, make_optimizer(args), sets["train"], sets.get("valid"), args,
                chunked_loss, resume=resume, fingerprint=fingerprint, group=group,
                on_start=start,
                callback=callback, log=write,
            )  # fmt: skip
    except TrainingDiverged as e:
        raise _diverged(e, path, clean=not resume and group.rank() == 0) from None
    if group.rank() == 0:
        say(plot_losses(path / METRICS_FILE, path / PLOT_FILE))
    result = FinetuneResult(state, sets)
    if "test" in sets:
        result.test_loss = evaluate(model, sets["test"], args.batch_size, 0, group)
    return result


def _diverged(e: TrainingDiverged, path: Path, clean: bool) -> TrainingDiverged:
    """The divergence error with this directory's way out."""
    if e.saved_step:
        remedy = (
            f"the last good checkpoint (step {e.saved_step}) is in {e.where}: continue it "
            "(`resume=True`) with gradient clipping (`max_grad_norm`), or start over "
            "(`force=True`) with a lower `learning_rate`"
        )
    else:
        if clean:
            _remove_run_files(path)
        remedy = (
            f"nothing was kept in {path}, so the same command starts over: lower "
            "`learning_rate` (or add `warmup` / `max_grad_norm`)"
        )
    return TrainingDiverged(e.what, e.step, e.saved_step, e.where, remedy)


def load_fused(
    model_path: str | Path,
    adapter_path: str | Path | None = None,
    *,
    de_quantize: bool = False,
    log: Callable[[str], None] | None = None,
):
    """(model, tokenizer or None) of `model_path` with the adapters in `adapter_path` merged
    into its weights; `de_quantize` makes every layer float. `log` hears what is done."""
    model, tokenizer = load(model_path)
    q = model.args.quantization
    if q and de_quantize and log:
        log(f"{model_path} is quantized ({q.get('bits')} bits, group size {q.get('group_size')}): "
            "de-quantizing it first")  # fmt: skip
    if adapter_path is not None:
        load_adapters(model, adapter_path)
        if log:
            log(f"fusing the adapters of {adapter_path}")
    fuse_lora(model, de_quantize=de_quantize)
    return model, tokenizer


def fuse(
    model_path: str | Path,
    adapter_path: str | Path,
    save_path: str | Path,
    *,
    de_quantize: bool = False,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Merge the adapters in `adapter_path` into the model at `model_path`; write `save_path`
    (`log`: the writer's progress and notices).

    A quantized base is re-quantized with its own settings unless `de_quantize`.
    """
    check_not_source(save_path, model_path, "`save_path`")
    check_target(Path(save_path).absolute(), force=force)  # before the work
    model, tokenizer = load_fused(model_path, adapter_path, de_quantize=de_quantize, log=log)
    tokenizer_file = tokenizer.model_file if tokenizer is not None else None
    return save_model(
        save_path, model, model.args, tokenizer=tokenizer_file, force=force,
        extra_files=carried_files(model_path), log=log,
    )  # fmt: skip
