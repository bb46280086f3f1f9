"""The training loop: a given optimizer and loss, compiled steps, exact resume.

`train(model, optimizer, train_set, val_set, args, loss=...)` trains whatever
`model.trainable_parameters()` returns: LoRA adapters (the caller swapped them
in), every weight of a pretrained model, or a freshly initialised one. It knows
nothing about LoRA or OpenELM: the model maps token ids to logits, and `loss`
(default `loss_sums`) is `loss(model, tokens, spans) -> (loss sum, target count)`
over a `data.Batch`'s rows.

Files under `args.out_dir`: `args.weights_file` (the best-validation weights,
or the latest when there is no validation set), `checkpoint/` (everything a
resume needs: trainable weights, optimizer state, RNG key, step; the data
position follows from the step) and `metrics.jsonl`.

Data parallel: run one process per device under `mlx.launch`; each takes its
slice of every global batch and gradients are summed over processes. Only
rank 0 writes files or prints.

Errors quote argument names in backticks (`iters`); the CLI words them as its flags.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from .checkpoint import (
    CHECKPOINT_DIR,
    MetricsLog,
    checkpoint_dir,
    read_meta,
    restore_checkpoint,
    save_arrays,
    save_checkpoint,
    writing,
)
from .data import (
    Batch,
    Dataset,
    check_batch_size,
    iterate_batches,
    iterate_eval_batches,
    target_mask,
)

METRICS_FILE = "metrics.jsonl"
# Settings a resumed run must share with the run it continues.
_RESUME_FIXED = ("batch_size", "grad_accum", "seed", "learning_rate", "warmup", "min_lr_ratio")
Loss = Callable[[nn.Module, mx.array, mx.array], tuple[mx.array, mx.array]]


class TrainError(ValueError):
    """Bad training settings, or a checkpoint that cannot be resumed."""


class ResumeMismatch(TrainError):
    """A resume whose settings differ from the checkpoint's: `diffs` is (name, then, now)."""

    def __init__(self, where: Path, diffs: list[tuple[str, object, object]]):
        self.where, self.diffs = where, diffs
        parts = [
            "`{}`{} was {}, now {}".format(*_split(name), _shown(then), _shown(now))
            for name, then, now in diffs
        ]
        super().__init__(f"cannot resume {where} exactly: " + "; ".join(parts))


def _split(name: str) -> tuple[str, str]:
    head, _, rest = name.partition(" ")
    return head, f" {rest}" if rest else ""


def _shown(value) -> str:
    return "absent" if value is None else str(value)


class TrainingDiverged(TrainError):
    """The loss became NaN or infinite; `saved_step` is the last checkpoint's step (0: none)."""

    def __init__(self, what: str, step: int, saved_step: int, where: Path, remedy: str = ""):
        self.what, self.step, self.saved_step, self.where = what, step, saved_step, where
        remedy = remedy or (
            f"the last good checkpoint (step {saved_step}) is in {where}: resume with gradient "
            "clipping (`max_grad_norm`), or start over with a lower `learning_rate`"
            if saved_step
            else "no checkpoint was saved yet: start over with a lower `learning_rate` "
            "(or `warmup` / `max_grad_norm`)"
        )
        super().__init__(f"{what} at step {step}, stopped without saving; {remedy}")


@dataclass
class TrainArgs:
    """Every setting of a training run; checked when built (TrainError names each bad one)."""

    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    warmup: int = 0
    min_lr_ratio: float = 0.0  # cosine decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float = 0.0  # 0 = no clipping
    val_every: int = 100  # 0 = no validation
    val_batches: int = 25  # 0 = the whole validation set
    save_every: int = 100
    report_every: int = 10
    seed: int = 0
    out_dir: str = "run"
    weights_file: str = "weights.safetensors"

    def __post_init__(self) -> None:
        problems = [
            f"`{name}` must be at least {low}, got {getattr(self, name)}"
            for name, low in (("iters", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup", 0))
            if getattr(self, name) < low
        ]
        problems += [
            f"`{name}` must be >= 0, got {getattr(self, name)}"
            for name in ("val_every", "val_batches", "save_every", "report_every", "max_grad_norm")
            if getattr(self, name) < 0
        ]
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            problems.append(f"`learning_rate` must be a positive number, got {self.learning_rate}")
        if self.warmup >= self.iters and self.warmup > 0:
            problems.append(f"`warmup` ({self.warmup}) must be shorter than `iters` ({self.iters})")
        if problems:
            raise TrainError("invalid training settings: " + "; ".join(problems))


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0
    best_val: float | None = None
    best_step: int = 0
    last_val_step: int = -1
    trained_tokens: int = 0
    train_seconds: float = 0.0
    saved_step: int = 0
    interrupted: bool = False


# ---- optimizer and loss -------------------------------------------------------


def lr_schedule(args: TrainArgs) -> Callable:
    """Linear warmup from 0 over `warmup` steps, then cosine decay to lr * min_lr_ratio."""
    cosine = optim.cosine_decay(
        args.learning_rate, max(1, args.iters - args.warmup), args.learning_rate * args.min_lr_ratio
    )
    if args.warmup == 0:
        return cosine
    warm = optim.linear_schedule(0.0, args.learning_rate, args.warmup)
    return optim.join_schedules([warm, cosine], [args.warmup])


def make_optimizer(args: TrainArgs) -> optim.Optimizer:
    """AdamW on `lr_schedule(args)` with `args.weight_decay`."""
    return optim.AdamW(learning_rate=lr_schedule(args), weight_decay=args.weight_decay)


def loss_sums(model: nn.Module, tokens: mx.array, spans: mx.array) -> tuple[mx.array, mx.array]:
    """(sum of next-token cross-entropies over the target positions, their count)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L) each
    logits = model(inputs)  # (B, L, vocab)
    mask = target_mask(spans, inputs.shape[1])  # (B, L)
    ce = nn.losses.cross_entropy(logits, targets).astype(mx.float32)  # (B, L)
    return (ce * mask).sum(), mask.sum()


def _train_loss(model, tokens, spans, ntokens, loss: Loss, world_size: int) -> mx.array:
    # This rank's share of the global mean, times the world size so that the
    # gradients' average over ranks is the gradient of the global mean.
    return loss(model, tokens, spans)[0] * world_size / ntokens


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    max_batches: int = 0,
    group: mx.distributed.Group | None = None,
    loss: Loss = loss_sums,
) -> float:
    """Mean next-token loss over (the first `max_batches` batches of) `dataset`, all ranks."""
    group = group or mx.distributed.init()
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for b in iterate_eval_batches(dataset, batch_size, max_batches=max_batches, group=group):
        s, n = loss(model, b.tokens, b.spans)
        total, count = total + s, count + n
        mx.eval(total, count)
    if group.size() > 1:
        total = mx.distributed.all_sum(total, group=group, stream=mx.cpu)
        count = mx.distributed.all_sum(count, group=group, stream=mx.cpu)
    model.train(was_training)
    return (total / mx.maximum(count, 1)).item()


# ---- the compiled step ----------------------------------------------------------


def make_step(
    model: nn.Module, optimizer: optim.Optimizer, args: TrainArgs, group, loss: Loss = loss_sums
) -> Callable:
    """`step(batch, acc, update)` -> (loss, acc): one micro-batch; `update` applies the sum."""
    world = group.size()
    loss_and_grad = nn.value_and_grad(model, partial(_train_loss, loss=loss, world_size=world))
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch: Batch, acc, update: bool):
        loss, grads = loss_and_grad(model, *batch)
        if world > 1:
            loss = mx.distributed.all_sum(loss, group=group) / world  # the global mean
        if acc is not None:
            grads = tree_map(mx.add, acc, grads)
        if not update:
            return loss, grads
        if world > 1:
            grads = nn.average_gradients(grads, group=group)
        if args.grad_accum > 1:
            grads = tree_map(lambda g: g / args.grad_accum, grads)
        if args.max_grad_norm > 0:
            grads, _ = optim.clip_grad_norm(grads, args.max_grad_norm)
        optimizer.update(model, grads)
        return loss, None

    return step


def _one_update(step: Callable, batches: Iterator[Batch], accum: int) -> tuple[mx.array, float]:
    """Run `accum` micro-batches and one optimizer update; (mean loss, target tokens)."""
    acc, losses, ntokens = None, [], 0.0
    for i in range(accum):
        batch = next(batches)
        loss, acc = step(batch, acc, i == accum - 1)
        losses.append(loss)
        ntokens += batch.ntokens.item()
    return sum(losses) / accum, ntokens


# ---- Ctrl-C ---------------------------------------------------------------------------


class _StopFlag:
    requested = False
    signum: int | None = None
    previous: dict = {}

    def reraise(self) -> None:
        """After the checkpoint: what the signal would have done, or KeyboardInterrupt."""
        previous = self.previous.get(self.signum)
        if callable(previous):
            previous(self.signum, None)  # e.g. a CLI's SIGTERM handler (its own exit status)
        raise KeyboardInterrupt


@contextlib.contextmanager
def _deferred_interrupt():
    """The first Ctrl-C or SIGTERM asks the loop to stop after the current step and save a
    checkpoint; a second one stops at once."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested, flag.signum = True, signum

    flag.previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, previous in flag.previous.items():
            signal.signal(s, previous)


# ---- resuming ------------------------------------------------------------------------------


def _check_resumable(saved: dict, now: dict, where: Path) -> None:
    """Raise ResumeMismatch naming every setting, and every fingerprint entry, that differs."""
    diffs = [(k, saved["args"].get(k), now["args"][k]) for k in _RESUME_FIXED]
    diffs.append(("processes", saved.get("world", 1), now["world"]))
    if saved.get("fingerprint") is not None:  # checkpoints before fingerprints have none
        then, fingerprint = saved["fingerprint"], now["fingerprint"] or {}
        diffs += [
            (k, then.get(k), fingerprint.get(k)) for k in sorted(set(then) | set(fingerprint))
        ]
    diffs = [d for d in diffs if d[1] != d[2]]
    if diffs:
        raise ResumeMismatch(where, diffs)


def _restore(run: _Run) -> TrainState:
    where = checkpoint_dir(run.out)
    meta = read_meta(where)
    _check_resumable(meta, run.meta(), where)
    restore_checkpoint(where, run.model, run.optimizer)
    try:
        return TrainState(**meta["state"])
    except TypeError:
        raise TrainError(f"{where / 'state.json'} is damaged; start the run over") from None


# ---- the loop ----------------------------------------------------------------------------


class _Run:
    """One training run's moving parts, so that each phase is a short method."""

    def __init__(self, model, optimizer, args, train_set, valid_set, group, log):
        self.model, self.optimizer, self.args, self.group = model, optimizer, args, group
        self.train_set, self.valid_set, self.log = train_set, valid_set, log
        self.rank, self.world = group.rank(), group.size()
        self.out = Path(args.out_dir)
        self.state = TrainState()
        self.writer = self.rank == 0
        self.fingerprint: dict | None = None

    def meta(self) -> dict:
        """What a checkpoint records besides the arrays."""
        return {
            "state": asdict(self.state),
            "args": asdict(self.args),
            "world": self.world,
            "fingerprint": self.fingerprint,
        }

    def say(self, message: str) -> None:
        if self.writer:
            self.log(message)

    def start(self, resume: bool, on_start) -> None:
        self.optimizer.init(self.model.trainable_parameters())
        if resume:
            self.state = _restore(self)
            self.state.interrupted = False
            if self.state.step >= self.args.iters:
                raise TrainError(
                    f"{self.out / CHECKPOINT_DIR} is at step {self.state.step} already; "
                    f"raise `iters` above {self.state.step} to train more"
                )
            self.say(f"resuming at step {self.state.step} from {self.out / CHECKPOINT_DIR}")
        else:
            mx.random.seed(self.args.seed)
        if on_start is not None:
            on_start()
        if self.writer:
            with writing(self.out):
                self.out.mkdir(parents=True, exist_ok=True)
        keep = self.state.step if resume else None
        self.metrics = MetricsLog(self.out / METRICS_FILE, keep, self.writer)

    def save(self) -> None:
        finite = [mx.isfinite(p).all() for _, p in tree_flatten(self.model.trainable_parameters())]
        if not mx.stack(finite).all().item():
            _diverged(self, "the weights are no longer finite")
        if self.writer:
            self.state.saved_step = self.state.step
            save_checkpoint(self.out, self.model, self.optimizer, self.meta())
            if not self.validating:
                self.save_weights()
        self.state.saved_step = self.state.step

    def save_weights(self) -> None:
        if self.writer:
            weights = dict(tree_flatten(self.model.trainable_parameters()))
            save_arrays(self.out / self.args.weights_file, weights)

    def validate(self) -> None:
        a, s = self.args, self.state
        tic = time.perf_counter()
        loss = evaluate(self.model, self.valid_set, a.batch_size, a.val_batches, self.group)
        s.last_val_step = s.step
        best = math.isfinite(loss) and (s.best_val is None or loss < s.best_val)
        if best:
            s.best_val, s.best_step = loss, s.step
            self.save_weights()
        self.metrics.write(step=s.step, val_loss=loss, val_seconds=time.perf_counter() - tic)
        mark = f" (best, saved to {a.weights_file})" if best else ""
        self.say(f"step {s.step:>6}  val loss {loss:.4f}  ppl {math.exp(min(loss, 50)):.2f}{mark}")

    @property
    def validating(self) -> bool:
        return bool(self.valid_set) and self.args.val_every > 0

    def should_stop(self, flag: _StopFlag) -> bool:
        if self.world == 1:
            return flag.requested
        # Every rank must stop at the same step, whichever received the Ctrl-C.
        votes = mx.distributed.all_sum(
            mx.array(int(flag.requested)), group=self.group, stream=mx.cpu
        )
        return votes.item() > 0

    def validation_due(self) -> bool:
        a, s = self.args, self.state
        if not self.validating or s.last_val_step == s.step:
            return False
        return s.step % a.val_every == 0 or s.step == a.iters


def _report(run: _Run, loss: float, tokens: float, seconds: float, window: int) -> None:
    a, s = run.args, run.state
    lr = run.optimizer.learning_rate.item()
    tps = tokens / max(seconds, 1e-9)
    eta = (a.iters - s.step) * seconds / max(window, 1)
    peak = mx.get_peak_memory() / 1e9
    run.metrics.write(
        step=s.step,
        train_loss=loss,
        learning_rate=lr,
        tokens_per_second=tps,
        trained_tokens=s.trained_tokens,
        peak_memory_gb=peak,
    )
    run.say(
        f"step {s.step:>6}/{a.iters}  loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s  "
        f"eta {_clock(eta)}  peak {_size(peak)}"
    )


def _size(gb: float) -> str:
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1e3:.0f} MB"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _check_finite(run: _Run, loss: float) -> None:
    if not math.isfinite(loss):
        _diverged(run, f"the loss is {loss}")


def _diverged(run: _Run, what: str) -> None:
    raise TrainingDiverged(what, run.state.step, run.state.saved_step, run.out / CHECKPOINT_DIR)


def _train_loop(run: _Run, stop: _StopFlag, loss: Loss, callback) -> None:
    a, s = run.args, run.state
    step = make_step(run.model, run.optimizer, a, run.group, loss)
    start = s.step * a.grad_accum
    batches = iterate_batches(
        run.train_set, a.batch_size, seed=a.seed, start=start, group=run.group
    )
    window_loss, window_tokens, window_time, window = 0.0, 0.0, 0.0, 0
    run.model.train()
    while s.step < a.iters:
        if run.should_stop(stop):
            run.state.interrupted = True
            return
        if run.validation_due():
            run.validate()
        tic = time.perf_counter()
        loss, ntokens = _one_update(step, batches, a.grad_accum)
        mx.eval(run.model.state, run.optimizer.state, mx.random.state, loss)
        loss = loss.item()
        elapsed = time.perf_counter() - tic
        s.step += 1
        _check_finite(run, loss)
        s.trained_tokens += int(ntokens)
        s.train_seconds += elapsed
        window_loss, window_tokens = window_loss + loss, window_tokens + ntokens
        window_time, window = window_time + elapsed, window + 1
        if a.report_every and (s.step % a.report_every == 0 or s.step == a.iters):
            _report(run, window_loss / window, window_tokens, window_time, window)
            window_loss, window_tokens, window_time, window = 0.0, 0.0, 0.0, 0
        if a.save_every and s.step % a.save_every == 0:
            run.save()
        if callback is not None:
            callback(s.step, loss)
    if run.validation_due():
        run.validate()


def train(
    model: nn.Module,
    optimizer: optim.Optimizer,
    train_set: Dataset,
    val_set: Dataset | None = None,
    args: TrainArgs | None = None,
    loss: Loss = loss_sums,
    *,
    resume: bool = False,
    fingerprint: dict | None = None,
    group: mx.distributed.Group | None = None,
    on_start: Callable[[], None] | None = None,
    callback: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] = print,
) -> TrainState:
    """Train `model`'s trainable parameters with `optimizer`; returns the final TrainState.

    Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and
    raises KeyboardInterrupt (or what the signal's previous handler raises);
    `resume=True` continues from that checkpoint and ends at the same weights as
    an uninterrupted run. `fingerprint` (JSON values, e.g. hashes of the data
    files; a key "name detail" is reported as `name` detail) is saved in every
    checkpoint and must match on resume. `on_start()` runs once everything is
    checked, before the first file is written; `callback(step, loss)` after
    every optimizer step.
    """
    args = args or TrainArgs()
    group = group or mx.distributed.init()
    check_batch_size(train_set, args.batch_size, group.size())
    run = _Run(model, optimizer, args, train_set, val_set, group, log)
    run.fingerprint = fingerprint
    run.start(resume, on_start)
    with _deferred_interrupt() as stop:
        _train_loop(run, stop, loss, callback)
        run.save()
    if run.state.interrupted:
        run.say(
            f"interrupted: checkpoint at step {run.state.step} saved in "
            f"{run.out / CHECKPOINT_DIR}; continue it with `resume=True`"
        )
        stop.reraise()
    return run.state
