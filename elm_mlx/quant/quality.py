"""How much quantization hurts, measured against the float model on held-out tokens.

`compare` gives the perplexity of both models, the mean KL divergence
KL(float || quantized) of their next-token distributions and how often their
top-1 tokens agree. `sensitivity_scan` quantizes one matrix at a time (the
rest stay float) and records the KL it causes; `recipe_for_target` then
lowers matrices from 8 to 4 bits in order of least damage per bit saved until
a bits-per-weight target is met, and returns the Recipe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..model.config import ModelArgs
from .quantize import (
    QuantizeError,
    QuantizeSpec,
    QuantParams,
    Recipe,
    bits_per_weight,
    dir_size,
    group_size_for,
    group_size_note,
    make_plan,
    matrix_shapes,
    plan_bits_per_weight,
    quantize_module,
    scales_dtype_for,
)


def token_windows(
    ids: Sequence[int], seq_len: int = 256, max_tokens: int | None = None
) -> mx.array:
    """Non-overlapping windows of `seq_len + 1` tokens, (N, seq_len + 1): every token after
    the first of a window is predicted once. Shorter texts give one window of all tokens."""
    ids = list(ids)[: None if max_tokens is None else max_tokens + 1]
    if len(ids) < 2:
        raise ValueError(f"held-out text has {len(ids)} tokens; give at least 2 to evaluate")
    if len(ids) <= seq_len:
        return mx.array([ids])
    n = (len(ids) - 1) // seq_len
    return mx.array([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


def _batches(windows: mx.array, batch_size: int) -> Iterator[mx.array]:
    for i in range(0, windows.shape[0], batch_size):
        yield windows[i : i + batch_size]


def log_probs(model: nn.Module, batch: mx.array) -> mx.array:
    """Next-token log-probabilities for all but the last position, float32 (B, L - 1, V)."""
    logits = model(batch[:, :-1]).astype(mx.float32)  # (B, L - 1, V)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@dataclass
class Quality:
    tokens: int
    ppl_float: float
    ppl_quant: float
    mean_kl: float
    top1_agreement: float


def compare(
    float_model: nn.Module, quant_model: nn.Module, windows: mx.array, batch_size: int = 4
) -> Quality:
    """Perplexity of each model, mean KL(float || quant) and top-1 agreement on `windows`."""
    totals, count = [0.0] * 4, 0
    for batch in _batches(windows, batch_size):
        ref, q = log_probs(float_model, batch), log_probs(quant_model, batch)
        targets = batch[:, 1:, None]  # (B, L - 1, 1)
        sums = (
            -mx.take_along_axis(ref, targets, axis=-1).sum(),
            -mx.take_along_axis(q, targets, axis=-1).sum(),
            _kl(ref, q).sum(),
            (ref.argmax(-1) == q.argmax(-1)).sum(),
        )
        mx.eval(sums)
        totals = [t + s.item() for t, s in zip(totals, sums, strict=True)]
        count += targets.size
    nll_f, nll_q, kl, agree = (t / count for t in totals)
    return Quality(count, math.exp(nll_f), math.exp(nll_q), kl, agree)


def _kl(ref: mx.array, q: mx.array) -> mx.array:
    return (mx.exp(ref) * (ref - q)).sum(-1)  # (B, L - 1)


# ---- sensitivity scan ------------------------------------------------------------


def sensitivity_scan(
    model: nn.Module,
    windows: mx.array,
    *,
    group_size: int = 64,
    bits: Sequence[int] = (4,),
    scales_dtype: mx.Dtype = mx.float32,
    batch_size: int = 4,
    progress: Callable[[str, int, float], None] | None = None,
) -> dict[str, dict[int, float]]:
    """Mean KL(float || model with only `path` quantized) for every matrix and bit width.

    The float model is changed one matrix at a time and restored after each."""
    make_plan(model.args, Recipe(max(bits), group_size, {}))  # every matrix quantizable?
    batches = list(_batches(windows, batch_size))
    reference = [log_probs(model, b) for b in batches]
    mx.eval(reference)
    modules = dict(model.named_modules())
    damage: dict[str, dict[int, float]] = {}
    for path in matrix_shapes(model.args):
        original = modules[path]
        damage[path] = {}
        for b in bits:
            quantized = quantize_module(original, QuantParams(b, group_size), scales_dtype)
            model.update_modules(tree_unflatten([(path, quantized)]))
            damage[path][b] = _mean_kl(model, batches, reference)
            if progress is not None:
                progress(path, b, damage[path][b])
        model.update_modules(tree_unflatten([(path, original)]))
    return damage


def _mean_kl(model: nn.Module, batches: list[mx.array], reference: list[mx.array]) -> float:
    total, count = 0.0, 0
    for batch, ref in zip(batches, reference, strict=True):
        kl = _kl(ref, log_probs(model, batch))
        total += kl.sum().item()
        count += kl.size
    return total / count


def recipe_for_target(
    args: ModelArgs,
    damage: dict[str, dict[int, float]],
    target_bpw: float,
    *,
    group_size: int = 64,
    scales_bytes: int = 4,
    float_bytes: int = 4,
    low: int = 4,
    high: int = 8,
) -> Recipe:
    """Start with every matrix at `high` bits and lower the ones with the least added KL per
    bit saved to `low` until the plan is at most `target_bpw` bits per weight, then give
    back `high` bits to lowered matrices that still fit. An 8-bit damage the scan did not
    measure counts as zero."""
    shapes = matrix_shapes(args)
    plan = {p: QuantParams(high, group_size) for p in shapes}

    def bpw() -> float:
        return plan_bits_per_weight(args, plan, scales_bytes, float_bytes)

    def cost(path: str) -> float:
        rows, cols = shapes[path]
        added = damage[path][low] - damage[path].get(high, 0.0)
        return added / (rows * cols * (high - low))

    lowered = []
    for path in sorted(shapes, key=cost):
        if bpw() <= target_bpw:
            break
        plan[path] = QuantParams(low, group_size)
        lowered.append(path)
    if bpw() > target_bpw:
        raise _unreachable(target_bpw, low, bpw())
    for path in reversed(lowered):  # the last step may have saved more than needed
        plan[path] = QuantParams(high, group_size)
        if bpw() > target_bpw:
            plan[path] = QuantParams(low, group_size)
    return Recipe(low, group_size, {p: q for p, q in plan.items() if q.bits != low})


def _unreachable(target_bpw: float, low: int, floor: float) -> QuantizeError:
    return QuantizeError(
        f"target {target_bpw} bits per weight is below what {low}-bit quantization gives "
        f"({floor:.3f}); raise `target_bpw`"
    )


# ---- loaded models (the CLI and examples/quantize_nano.py load them) --------------


def text_windows(
    tokenizer, text_file: str | Path, *, max_tokens: int = 4096, seq_len: int = 256
) -> mx.array:
    """Held-out text tokenized with `tokenizer` (a `Tokenizer`), as token_windows."""
    text_file = Path(text_file)
    if not text_file.is_file():
        raise FileNotFoundError(f"held-out text {text_file} not found; give a UTF-8 text file")
    ids = tokenizer.encode(text_file.read_text(encoding="utf-8"))
    return token_windows(ids, seq_len, max_tokens)


def scan_recipe(
    model: nn.Module,
    windows: mx.array,
    spec: QuantizeSpec,
    target_bpw: float,
    *,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int, float], None] | None = None,
) -> Recipe:
    """Scan the float `model` and return the least-damage recipe for `target_bpw`
    (`progress` as in sensitivity_scan; `log` hears the group size note and the result)."""
    args = model.args
    if args.quantization:
        raise QuantizeError("`model` is already quantized; scan its float model instead")
    float_dtype = model.transformer.token_embeddings.weight.dtype
    scales_dtype = scales_dtype_for(spec, float_dtype)
    group_size = group_size_for(spec, args)
    note = group_size_note(spec, args)
    if log and note:
        log(note)
    sizes = {"scales_bytes": scales_dtype.size, "float_bytes": float_dtype.size}
    everything_low = {p: QuantParams(4, group_size) for p in matrix_shapes(args)}
    floor = plan_bits_per_weight(args, everything_low, **sizes)
    if floor > target_bpw:  # said before the scan, not after it
        raise _unreachable(target_bpw, 4, floor)
    damage = sensitivity_scan(
        model, windows, group_size=group_size, scales_dtype=scales_dtype, progress=progress
    )
    recipe = recipe_for_target(args, damage, target_bpw, group_size=group_size, **sizes)
    if log:
        bpw = plan_bits_per_weight(args, make_plan(args, recipe), **sizes)
        log(f"recipe: {len(recipe.layers)} of {len(damage)} matrices at 8 bits, "
            f"{bpw:.3f} bits per weight (target {target_bpw})")  # fmt: skip
    return recipe


def report(
    float_model: nn.Module,
    quant_model: nn.Module,
    windows: mx.array,
    *,
    float_dir: str | Path,
    quant_dir: str | Path,
) -> str:
    """A table of bits per weight, size on disk (of the models' directories), perplexity,
    mean KL and top-1 agreement."""
    quality = compare(float_model, quant_model, windows)
    head = f"{'model':<10} {'bits/weight':>11} {'size MB':>9} {'perplexity':>11} "
    head += f"{'mean KL':>9} {'top-1 agree':>11}"
    rows = [
        (float_model, float_dir, quality.ppl_float, "-", "-"),
        (quant_model, quant_dir, quality.ppl_quant, f"{quality.mean_kl:.4g}",
         f"{100 * quality.top1_agreement:.1f}%"),
    ]  # fmt: skip
    lines = [f"held-out tokens: {quality.tokens}", head]
    for name, (model, path, ppl, kl, top1) in zip(("float", "quantized"), rows, strict=True):
        size = dir_size(path) / 1e6
        lines.append(
            f"{name:<10} {bits_per_weight(model):>11.3f} {size:>9.1f} {ppl:>11.3f} "
            f"{kl:>9} {top1:>11}"
        )
    return "\n".join(lines)
