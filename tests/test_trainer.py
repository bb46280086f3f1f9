"""The training loop: learning, frozen bases, exact resume, NaN stops, files, full training."""

from __future__ import annotations

import json
import os
import signal

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from elm_mlx.model.openelm import OpenELM
from elm_mlx.testing import random_weights, tiny_args
from elm_mlx.training.checkpoint import CheckpointError
from elm_mlx.training.data import Dataset, Example
from elm_mlx.training.lora import LoRAConfig, LoRALinear, apply_lora
from elm_mlx.training.train_ops import TrainingOps, chunked_loss, training_layers
from elm_mlx.training.trainer import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    TrainArgs,
    TrainError,
    TrainingDiverged,
    evaluate,
    make_optimizer,
    train,
)

SEQ = 12  # every record has this many tokens: one compiled shape per test


def records(n, seed=0, vocab=128):
    rng = np.random.default_rng(seed)
    return [Example([1] + rng.integers(3, vocab, SEQ - 1).tolist(), 0) for _ in range(n)]


def dataset(n=8, seed=0):
    return Dataset("train.jsonl", records(n, seed), max_seq_length=64)


def base_model():
    """A tiny model that LoRA can teach: its frozen output head is wide enough to be confident.

    (With N(0, 0.02) weights and a tied head the largest reachable logit is about 1.)
    """
    args = tiny_args(tied=False)
    weights = random_weights(args, 0)
    weights["lm_head.weight"] *= 5
    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return model


def lora_model(dropout=0.0, num_layers=-1):
    model = base_model()
    apply_lora(model, LoRAConfig(rank=8, scale=4.0, dropout=dropout, num_layers=num_layers))
    mx.eval(model.parameters())
    return model


def settings(tmp_path, **kw):
    base = dict(
        iters=6, batch_size=4, learning_rate=1e-3, val_every=0, save_every=0,
        report_every=0, out_dir=str(tmp_path), weights_file="adapters.safetensors",
    )  # fmt: skip
    return TrainArgs(**{**base, **kw})


def fit(model, args, data, valid=None, ops=None, **kw):
    """`train` as fine-tuning runs it: the chunked loss and the training layers."""
    with training_layers(model, ops):
        return train(model, make_optimizer(args), data, valid, args, chunked_loss, **kw)


def trainable(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def quiet(_):
    pass


def test_loss_falls_when_overfitting_a_handful_of_records(tmp_path):
    data = Dataset("train.jsonl", records(4) * 2, max_seq_length=64)
    model = lora_model()
    before = evaluate(model, data, 4)
    fit(model, settings(tmp_path, iters=30, warmup=4), data, log=quiet)
    after = evaluate(model, data, 4)
    assert after < 0.4 * before, (before, after)


def test_lora_training_leaves_the_base_weights_unchanged(tmp_path):
    model = lora_model()
    frozen = {
        k: np.array(v)
        for k, v in tree_flatten(model.parameters())
        if not k.endswith(("lora_a", "lora_b"))
    }
    start = trainable(model)
    fit(model, settings(tmp_path, iters=3), dataset(), log=quiet)
    after = dict(tree_flatten(model.parameters()))
    assert all(np.array_equal(after[k], v) for k, v in frozen.items())
    assert any(not np.array_equal(trainable(model)[k], v) for k, v in start.items())


def interrupt_at(step):
    def callback(s, _loss):
        if s == step:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    return callback


def test_interrupted_and_resumed_run_ends_at_the_same_weights(tmp_path):
    """Ctrl-C at step 3, resume: bitwise the weights and optimizer state of a straight run.

    Dropout (RNG state), gradient accumulation (data position), warmup and
    cosine decay (optimizer step) and validation (best weights) all take part.
    """
    data, valid = dataset(12), Dataset("valid.jsonl", records(4, seed=9), max_seq_length=64)
    kw = dict(iters=7, grad_accum=2, warmup=2, val_every=2, save_every=5, seed=0)
    straight = lora_model(dropout=0.2)
    fit(straight, settings(tmp_path / "a", **kw), data, valid, log=quiet)

    first = lora_model(dropout=0.2)
    with pytest.raises(KeyboardInterrupt):
        fit(first, settings(tmp_path / "b", **kw), data, valid, callback=interrupt_at(3))
    resumed = lora_model(dropout=0.2)  # a fresh process: same base, fresh adapters
    state = fit(resumed, settings(tmp_path / "b", **kw), data, valid, resume=True, log=quiet)

    assert state.step == 7
    expected = trainable(straight)
    assert all(np.array_equal(v, expected[k]) for k, v in trainable(resumed).items())
    opt_a = mx.load(str(tmp_path / "a" / CHECKPOINT_DIR / "optimizer.safetensors"))
    opt_b = mx.load(str(tmp_path / "b" / CHECKPOINT_DIR / "optimizer.safetensors"))
    assert opt_a.keys() == opt_b.keys()
    assert all(mx.array_equal(opt_a[k], opt_b[k]).item() for k in opt_a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / METRICS_FILE).open()]
    assert steps == [0, 2, 4, 6, 7]  # validations only; none repeated across the resume
    best_a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    best_b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert all(mx.array_equal(best_a[k], best_b[k]).item() for k in best_a)


def test_resume_refuses_a_different_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fit(lora_model(), settings(tmp_path), dataset(), resume=True, log=quiet)
    fit(lora_model(), settings(tmp_path, iters=2), dataset(), log=quiet)
    with pytest.raises(TrainError, match="`batch_size` was 4, now 8"):
        fit(lora_model(), settings(tmp_path, batch_size=8), dataset(), resume=True, log=quiet)
    with pytest.raises(CheckpointError, match="other trainable parameters"):
        model = lora_model(num_layers=1)
        fit(model, settings(tmp_path), dataset(), resume=True, log=quiet)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def poison(step, _loss):
        if step == 2:
            layer = next(m for _, m in model.named_modules() if isinstance(m, LoRALinear))
            layer.lora_b = mx.full(layer.lora_b.shape, float("nan"))

    model = lora_model()
    with pytest.raises(TrainingDiverged) as e:
        fit(model, settings(tmp_path, save_every=2), dataset(), callback=poison, log=quiet)
    assert "the loss is nan at step 3" in str(e.value)
    assert "last good checkpoint (step 2)" in str(e.value)
    saved = mx.load(str(tmp_path / CHECKPOINT_DIR / "weights.safetensors"))
    assert all(mx.isfinite(w).all().item() for w in saved.values())
    state = json.loads((tmp_path / CHECKPOINT_DIR / "state.json").read_text())
    assert state["state"]["step"] == 2


def test_files_best_weights_and_metrics(tmp_path):
    data, valid = dataset(8), Dataset("valid.jsonl", records(4, seed=1), max_seq_length=64)
    lines = []
    model = lora_model()
    args = settings(tmp_path, iters=4, val_every=2, report_every=2)
    state = fit(model, args, data, valid, log=lines.append)
    metrics = [json.loads(line) for line in (tmp_path / METRICS_FILE).open()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 2, 4]
    reports = [m for m in metrics if "train_loss" in m]
    assert [m["step"] for m in reports] == [2, 4]
    assert all(m["tokens_per_second"] > 0 and m["peak_memory_gb"] > 0 for m in reports)
    assert any("tok/s" in line and "eta" in line and "peak" in line for line in lines)
    best = min(m["val_loss"] for m in metrics if "val_loss" in m)
    assert state.best_val == pytest.approx(best)
    fresh = lora_model()
    fresh.load_weights(list(mx.load(str(tmp_path / "adapters.safetensors")).items()), strict=False)
    assert evaluate(fresh, valid, 4) == pytest.approx(best, rel=1e-5)


def test_evaluate_is_the_mean_token_cross_entropy():
    model = lora_model()
    data = Dataset("v", records(3, seed=4) + [Example([1, 5, 9, 11, 3], 2)], max_seq_length=64)
    total, count = 0.0, 0
    for ex in data.examples:
        logits = np.array(model(mx.array([ex.tokens[:-1]]))[0], dtype=np.float64)
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))[:, None]
            - logits.max(-1)[:, None]
        )
        for t in range(max(1, ex.offset), len(ex.tokens)):
            total -= logp[t - 1, ex.tokens[t]]
            count += 1
    assert evaluate(model, data, 2) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_training_layers_give_the_same_gradients(kind):
    from elm_mlx.training.trainer import loss_sums

    model = base_model()
    apply_lora(model, LoRAConfig(rank=4, fine_tune_type=kind))
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = 0.1 * mx.random.normal(m.lora_b.shape, key=mx.random.key(3))
    tokens = mx.array(np.array([e.tokens for e in records(4)]))
    spans = mx.array([[0, SEQ - 1]] * 4)

    def grads(**modes):
        with training_layers(model, TrainingOps(**modes)):
            fn = nn.value_and_grad(model, lambda m, t, s: loss_sums(m, t, s)[0])
            loss, g = fn(model, tokens, spans)
            return loss.item(), dict(tree_flatten(g))

    plain_loss, plain = grads(fast_ops=False)
    if kind == "full":
        assert any("q_norm" in k for k in plain)
    for modes in (
        dict(recompute_attention=True, fast_ops=False),
        dict(recompute_attention=False, fast_ops=True),
        dict(recompute_attention=True, fast_ops=True),
        dict(grad_checkpoint=True, fast_ops=True),
    ):
        loss, other = grads(**modes)
        assert loss == pytest.approx(plain_loss, rel=1e-5)
        assert other.keys() == plain.keys()
        for k in plain:
            scale = np.abs(plain[k]).max() + 1e-12
            assert np.abs(other[k] - plain[k]).max() < 2e-5 * scale, (modes, k)
    for layer in model.layers:  # the hooks are cleared
        assert layer.wrapper is None and layer.ffn.kernel is None
        assert layer.attn.kernel is None and layer.attn.attend_wrapper is None


@pytest.mark.parametrize("shape", [(2, 8, 2, 300, 16), (1, 4, 4, 37, 8), (2, 6, 3, 64, 16)])
def test_causal_attention_by_blocks_matches_the_fused_kernel(shape):
    from elm_mlx.training.train_ops import causal_attention

    B, n_q, n_kv, L, D = shape
    keys = mx.random.split(mx.random.key(0), 4)
    q = mx.random.normal((B, n_q, L, D), key=keys[0])
    k = mx.random.normal((B, n_kv, L, D), key=keys[1])
    v = mx.random.normal((B, n_kv, L, D), key=keys[2])
    cot = mx.random.normal((B, n_q, L, D), key=keys[3])

    def fused(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask="causal")

    def ours(q, k, v):
        return causal_attention(q, k, v, D**-0.5)

    out_a, grads_a = mx.vjp(fused, [q, k, v], [cot])
    out_b, grads_b = mx.vjp(ours, [q, k, v], [cot])
    assert mx.allclose(out_a[0], out_b[0], atol=1e-5).item()
    for a, b in zip(grads_a, grads_b, strict=True):
        assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()


def test_swiglu_matches_silu_times_up():
    from elm_mlx.training.train_ops import swiglu

    keys = mx.random.split(mx.random.key(1), 3)
    gate = 4 * mx.random.normal((3, 5, 40), key=keys[0])
    up = mx.random.normal((3, 5, 40), key=keys[1])
    cot = mx.random.normal((3, 5, 40), key=keys[2])
    out_a, grads_a = mx.vjp(lambda g, u: nn.silu(g) * u, [gate, up], [cot])
    out_b, grads_b = mx.vjp(swiglu, [gate, up], [cot])
    assert mx.allclose(out_a[0], out_b[0], atol=1e-6, rtol=1e-5).item()
    for a, b in zip(grads_a, grads_b, strict=True):
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-5).item()


def test_gradient_checkpointing_trains_to_the_same_weights(tmp_path):
    plain, checkpointed = lora_model(), lora_model()
    fit(plain, settings(tmp_path / "a", iters=2), dataset(), log=quiet)
    fit(checkpointed, settings(tmp_path / "b", iters=2, ), dataset(),
          ops=TrainingOps(grad_checkpoint=True), log=quiet)  # fmt: skip
    a, b = trainable(plain), trainable(checkpointed)
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_full_training_from_scratch_uses_the_same_loop(tmp_path):
    args = tiny_args()
    mx.random.seed(0)
    model = OpenELM(args)  # freshly initialised, every weight trainable
    data = dataset(8)
    before = evaluate(model, data, 4)
    state = fit(model, settings(tmp_path, iters=30, learning_rate=3e-3, warmup=3,
                                  max_grad_norm=1.0, save_every=30), data, log=quiet)  # fmt: skip
    assert state.step == 30
    assert evaluate(model, data, 4) < 0.8 * before
    saved = mx.load(str(tmp_path / CHECKPOINT_DIR / "weights.safetensors"))
    assert set(saved) == {k for k, _ in tree_flatten(model.parameters())}


def test_bad_settings_are_named():
    with pytest.raises(TrainError) as e:
        TrainArgs(iters=0, batch_size=0, learning_rate=-1, val_every=-1)
    for part in ("`iters` must be", "`batch_size` must be", "`learning_rate` must be", "val_every"):
        assert part in str(e.value)


def test_quantized_base_trains_with_lora(tmp_path):
    model = base_model()
    nn.quantize(
        model, 32, 4, class_predicate=lambda _, m: hasattr(m, "to_quantized")
        and m.weight.shape[-1] % 32 == 0,
    )  # fmt: skip
    apply_lora(model, LoRAConfig(rank=8, scale=4.0))
    data = dataset(8)
    before = evaluate(model, data, 4)
    fit(model, settings(tmp_path, iters=20), data, log=quiet)
    assert evaluate(model, data, 4) < 0.8 * before


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_chunked_head_loss_has_autograd_gradients(tied, kind, monkeypatch):
    """The chunked output-head loss (train_ops.py) against plain autograd through full logits."""
    import elm_mlx.training.train_ops as losses
    from elm_mlx.training.train_ops import float_head
    from elm_mlx.training.trainer import loss_sums

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 7 * 128)  # 7 rows a chunk: several chunks
    args = tiny_args(tied=tied)
    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in random_weights(args, 0).items()])
    apply_lora(model, LoRAConfig(rank=4, fine_tune_type=kind))
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = 0.1 * mx.random.normal(m.lora_b.shape, key=mx.random.key(1))
    assert float_head(model) is not None
    tokens = mx.random.randint(0, args.vocab_size, (3, 30), key=mx.random.key(2))
    spans = mx.array([[0, 29], [5, 20], [2, 11]])
    ref_loss, ref = nn.value_and_grad(model, lambda m, t, s: loss_sums(m, t, s)[0])(
        model, tokens, spans
    )
    loss, grads = nn.value_and_grad(model, lambda m, t, s: chunked_loss(m, t, s)[0])(
        model, tokens, spans
    )
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    ref, grads = dict(tree_flatten(ref)), dict(tree_flatten(grads))
    assert ref.keys() == grads.keys()
    for k in ref:
        scale = mx.abs(ref[k]).max().item() + 1e-12
        assert mx.abs(grads[k] - ref[k]).max().item() < 1e-4 * scale, k
