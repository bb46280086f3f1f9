"""Training versions of costly pieces of the step (same math, less memory), and the losses.

- `head_cross_entropy`: a 32000-word vocabulary makes the logits of a 4 x 256
  batch 131 MB in float32, and autograd keeps that tensor, its softmax and its
  gradient alive together. Here the positions are walked in chunks: each
  chunk's logits give its loss *and* its gradient with respect to the hidden
  states (and the head weight when that is trained) right away, and are freed
  before the next chunk; the backward pass only scales the stored gradients.
- `causal_attention`: causal softmax attention in query blocks that skip the
  keys they cannot see.
- `swiglu`: silu(gate) * up with a hand-written gradient that keeps the
  sigmoid instead of recomputing it.

`training_layers(model, TrainingOps(...))` sets the last two into an OpenELM
for the length of a training run through the model's training hooks (see
model/openelm.py), with optional recomputation of the attention core or of
whole blocks. `chunked_loss` is the trainer's `loss` for an OpenELM with a
float output head: `loss_sums` (the trainer's default) with the head chunked.

On the CPU, exponentials here are computed as powers of two (`pow`) at the same
precision; benchmarks/bench_lora.py --breakdown is where the choice is measured.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cache

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .data import target_mask
from .trainer import loss_sums

CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MB in float32
LOG2E = 1.4426950408889634


def chunk_rows(vocab_size: int) -> int:
    return max(16, CHUNK_ELEMENTS // vocab_size)


def head_cross_entropy(
    h: mx.array, weight: mx.array, targets: mx.array, mask: mx.array, weight_grad: bool = False
) -> mx.array:
    """Sum over rows of `mask * cross_entropy(h @ weight.T, targets)`.

    h (N, D) hidden states, weight (V, D) output head, targets (N,) ids, mask (N,)
    0/1 weights. Differentiable in `h`, and in `weight` when `weight_grad`.
    """
    return _custom(chunk_rows(weight.shape[0]), weight_grad)(h, weight, targets, mask)[0]


@cache
def _custom(rows: int, weight_grad: bool):
    @mx.custom_function
    def loss_and_grads(h, weight, targets, mask):
        return _forward(h, weight, targets, mask, rows, weight_grad)

    @loss_and_grads.vjp
    def vjp(primals, cotangents, outputs):
        h, weight, targets, mask = primals
        g = cotangents[0]
        dh = (outputs[1] * g).astype(h.dtype)
        dw = (outputs[2] * g).astype(weight.dtype) if weight_grad else mx.zeros_like(weight)
        return dh, dw, mx.zeros_like(targets), mx.zeros_like(mask)

    return loss_and_grads


def _exp(x: mx.array) -> mx.array:
    if mx.default_device() == mx.cpu:
        return mx.power(2.0, x * LOG2E)
    return mx.exp(x)


def _sigmoid(x: mx.array) -> mx.array:
    if mx.default_device() == mx.cpu:
        return 1.0 / (1.0 + mx.power(2.0, x * -LOG2E))
    return mx.sigmoid(x)


def _forward(h, weight, targets, mask, rows: int, weight_grad: bool):
    """(loss sum, d loss / d h, d loss / d weight or a placeholder), one chunk at a time."""
    mask = mask.astype(mx.float32)
    total, dhs = mx.array(0.0, mx.float32), []
    dw = mx.zeros(weight.shape, mx.float32) if weight_grad else mx.array(0.0)
    for start in range(0, h.shape[0], rows):
        hc, t, m = (
            h[start : start + rows],
            targets[start : start + rows],
            mask[start : start + rows],
        )
        logits = (hc @ weight.T).astype(mx.float32)  # (rows, V)
        top = logits.max(axis=-1, keepdims=True)  # (rows, 1)
        e = _exp(logits - top)  # (rows, V): the only transcendental pass
        norm = e.sum(axis=-1)  # (rows,)
        lse = top[:, 0] + mx.log(norm)  # (rows,)
        picked = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]  # (rows,)
        total = total + ((lse - picked) * m).sum()
        # d/dlogits = m * (softmax - onehot): the onehot part is a row gather of the weight.
        p = e * (m / norm)[:, None]  # (rows, V)
        dhs.append(p.astype(weight.dtype) @ weight - m[:, None] * weight[t])  # (rows, D)
        if weight_grad:
            hm = hc.astype(mx.float32)
            dw = (dw + p.T @ hm).at[t].add(-m[:, None] * hm)  # (V, D)
    return total, mx.concatenate(dhs, axis=0), dw


# ---- attention -------------------------------------------------------------------------


def attention_blocks(length: int) -> list[int]:
    """Query block boundaries: 64-row blocks at 256 tokens, at most 8 blocks."""
    rows = max(64, -(-length // 8))
    return list(range(0, length, rows)) + [length]


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal softmax attention, (B, n_q, L, D) x (B, n_kv, L, D) -> (B, n_q, L, D).

    Query head h reads KV head h // (n_q / n_kv). Each block of queries
    multiplies only the keys up to its last position, and has a hand-written
    gradient that keeps only its probabilities (`_causal_block`).
    """
    B, n_q, L, D = q.shape
    n_kv = k.shape[1]
    q = (q * scale).reshape(B, n_kv, n_q // n_kv, L, D)
    k, v = k[:, :, None], v[:, :, None]  # (B, n_kv, 1, L, D)
    bounds = attention_blocks(L)
    outs = [
        _causal_block(q[:, :, :, a:b], k[:, :, :, :b], v[:, :, :, :b])[0]
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]  # (B, n_kv, rep, b - a, D) each
    return mx.concatenate(outs, axis=3).reshape(B, n_q, L, D)


@mx.custom_function
def _causal_block(q, k, v):
    """softmax(q k^T) v for the last m = q.shape[-2] query positions of keys (.., b, D).

    q (B, n_kv, rep, m, D), already scaled; k, v (B, n_kv, 1, b, D). Query row i
    is position b - m + i and sees keys 0 .. b - m + i. Returns (out, probabilities).
    """
    m, b = q.shape[-2], k.shape[-2]
    s = (q @ k.swapaxes(-1, -2)).astype(mx.float32)  # (B, n_kv, rep, m, b)
    visible = mx.arange(b - m, b)[:, None] >= mx.arange(b)[None]
    s = mx.where(visible, s, -mx.inf)
    e = _exp(s - s.max(axis=-1, keepdims=True))
    p = (e * (1.0 / e.sum(axis=-1, keepdims=True))).astype(v.dtype)
    return p @ v, p


@_causal_block.vjp
def _causal_block_vjp(primals, cotangents, outputs):
    """The softmax-attention gradient from the kept probabilities P and the output O:
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q,
    with the `rep` query heads that share a KV head folded into the rows."""
    q, k, v = primals
    d_out, (out, p) = cotangents[0], outputs
    B, n_kv, rep, m, D = q.shape
    b = k.shape[-2]
    row = (d_out * out).astype(mx.float32).sum(axis=-1, keepdims=True)  # (.., m, 1)
    ds = (p * ((d_out @ v.swapaxes(-1, -2)).astype(mx.float32) - row)).astype(q.dtype)
    dq = ds @ k  # (B, n_kv, rep, m, D)
    ds = ds.reshape(B, n_kv, rep * m, b).swapaxes(-1, -2)  # (B, n_kv, b, rep * m)
    dk = ds @ q.reshape(B, n_kv, rep * m, D)
    dv = p.reshape(B, n_kv, rep * m, b).swapaxes(-1, -2) @ d_out.reshape(B, n_kv, rep * m, D)
    return dq, dk[:, :, None], dv[:, :, None]


# ---- SwiGLU ----------------------------------------------------------------------------


@mx.custom_function
def _swiglu(gate: mx.array, up: mx.array):
    s = _sigmoid(gate)
    return gate * s * up, s  # the sigmoid is an output so that the backward pass reuses it


@_swiglu.vjp
def _swiglu_vjp(primals, cotangents, outputs):
    gate, up = primals
    g, s = cotangents[0], outputs[1]
    d_gate = g * up * s * (1 + gate * (1 - s))
    return d_gate.astype(gate.dtype), (g * gate * s).astype(up.dtype)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up."""
    return _swiglu(gate, up)[0]


# ---- the chunked loss ------------------------------------------------------------------


def float_head(model: nn.Module) -> tuple[str, mx.array] | None:
    """(parameter name, weight) of the model's float output head; None if it has none."""
    output_head = getattr(model, "output_head", None)
    if output_head is None:
        return None
    path, layer = output_head()
    if "scales" in layer or not isinstance(layer, (nn.Embedding, nn.Linear)):
        return None
    return f"{path}.weight", layer.weight


def chunked_loss(model: nn.Module, tokens: mx.array, spans: mx.array) -> tuple[mx.array, mx.array]:
    """`loss_sums` with the output head chunked (`head_cross_entropy`) where the model allows."""
    head = float_head(model)
    if head is None:
        return loss_sums(model, tokens, spans)
    name, weight = head
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L) each
    h = model.transformer(inputs)  # (B, L, D)
    B, L, D = h.shape
    trained = name in dict(tree_flatten(model.trainable_parameters()))
    mask = target_mask(spans, L).reshape(B * L)
    total = head_cross_entropy(h.reshape(B * L, D), weight, targets.reshape(B * L), mask, trained)
    return total, mask.sum()


# ---- the model's training hooks --------------------------------------------------------------


@dataclass
class TrainingOps:
    """Which training versions of the model's layers a run uses; none changes the math."""

    grad_checkpoint: bool = False  # recompute whole blocks in the backward pass
    recompute_attention: bool = False  # recompute the attention core only
    fast_ops: bool = True  # train_ops' SwiGLU and, on the CPU, block-causal attention


def _recompute(module: nn.Module, fn, x: mx.array, mask, params: dict) -> mx.array:
    """`fn(x, mask)` recomputed in the backward pass; `params` are the weights `fn` reads."""

    def inner(params, x):
        module.update(params)
        return fn(x, mask)

    return mx.checkpoint(inner)(params, x)


def _recompute_block(block: nn.Module, forward, x: mx.array, mask) -> mx.array:
    return _recompute(block, forward, x, mask, block.trainable_parameters())


def _recompute_attend(attn: nn.Module, attend, qkv: mx.array, mask) -> mx.array:
    # Only the QK-norm weights are read in here: the projections stay outside.
    params = {k: v for k, v in attn.trainable_parameters().items() if k.endswith("_norm")}
    return _recompute(attn, attend, qkv, mask, params)


def _hooks(model: nn.Module, ops: TrainingOps) -> list[tuple[nn.Module, str, object]]:
    """(module, hook name, value) for every hook of the model's layers that `ops` sets."""
    hooks = []
    blocked = ops.fast_ops and mx.default_device() == mx.cpu
    for layer in model.layers:
        if ops.grad_checkpoint:
            hooks.append((layer, "wrapper", _recompute_block))
        elif ops.recompute_attention:
            hooks.append((layer.attn, "attend_wrapper", _recompute_attend))
        if blocked:
            hooks.append((layer.attn, "kernel", causal_attention))
        if ops.fast_ops:
            hooks.append((layer.ffn, "kernel", swiglu))
    return hooks


@contextlib.contextmanager
def training_layers(model: nn.Module, ops: TrainingOps | None = None):
    """Set the model's training hooks (model/openelm.py) for the block; cleared on exit.

    `grad_checkpoint`: recompute every block in the backward pass (least memory,
    more time). `recompute_attention`: recompute only what lies between qkv_proj
    and out_proj (much of the saved activations for little of the compute).
    `fast_ops`: train_ops' SwiGLU and, on the CPU, causal attention by query blocks.
    """
    hooks = _hooks(model, ops or TrainingOps())
    for module, name, fn in hooks:
        setattr(module, name, fn)
    try:
        yield
    finally:
        for module, name, _ in hooks:
            setattr(module, name, None)
