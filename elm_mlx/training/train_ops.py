"""Training versions of three costly pieces of the step: same math, less memory or time.

- `head_cross_entropy`: a 32000-word vocabulary makes the logits of a 4 x 256
  batch 131 MB in float32, and autograd keeps that tensor, its softmax and its
  gradient alive together. Here the positions are walked in chunks: each
  chunk's logits give its loss *and* its gradient with respect to the hidden
  states (and the head weight when that is trained) right away, and are freed
  before the next chunk; the backward pass only scales the stored gradients.
- `causal_attention`: causal softmax attention in query blocks that skip the
  keys they cannot see (about 40% of the scores at 256 tokens).
- `swiglu`: silu(gate) * up with a hand-written gradient that keeps the
  sigmoid instead of recomputing it.

`training_layers(model)` swaps the last two into an OpenELM for the length of
a training run (through `Attention.sdpa` and `FeedForward.activation`), with
optional recomputation of the attention core or of whole blocks.

On the CPU, MLX's transcendental functions run at a few tens of millions of
values a second, while `pow` runs about twice as fast as `exp` at the same
precision, so exponentials here are computed as powers of two there.
"""

from __future__ import annotations

import contextlib
from functools import cache

import mlx.core as mx
import mlx.nn as nn

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


# ---- training versions of the model's layers ----------------------------------------------


@cache
def _checkpointed_class(cls: type) -> type:
    """A subclass of a block class whose forward pass is recomputed in the backward pass."""

    def __call__(self, x, *args, **kwargs):
        def inner(params, x):
            self.update(params)
            return cls.__call__(self, x, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})


@cache
def _training_attention_class(cls: type, recompute: bool, causal_blocks: bool) -> type:
    """A subclass of OpenELM's Attention for training.

    `recompute`: `attend` (QK-norm, RoPE, softmax) runs again in the backward pass
    instead of keeping its activations. `causal_blocks`: causal attention by query
    blocks (train_ops.causal_attention) instead of the fused kernel's CPU fallback.
    """

    def sdpa(self, q, k, v, mask=None):
        if isinstance(mask, str) and mask == "causal":
            return causal_attention(q, k, v, self.scale)
        return cls.sdpa(self, q, k, v, mask)

    def attend(self, qkv, mask=None, cache=None):
        if cache is not None:
            return base.attend(self, qkv, mask, cache)
        # Only the QK-norm weights are used in here: the projections stay outside.
        params = {k: v for k, v in self.trainable_parameters().items() if k.endswith("_norm")}

        def inner(params, qkv):
            self.update(params)
            return base.attend(self, qkv, mask)

        return mx.checkpoint(inner)(params, qkv)

    base = type(f"Blocked{cls.__name__}", (cls,), {"sdpa": sdpa}) if causal_blocks else cls
    return type(f"Training{cls.__name__}", (base,), {"attend": attend}) if recompute else base


@cache
def _training_ffn_class(cls: type) -> type:
    def activation(self, gate, up):
        return swiglu(gate, up)

    return type(f"Training{cls.__name__}", (cls,), {"activation": activation})


def _training_swaps(model: nn.Module, blocks: bool, recompute_attention: bool, fast_ops: bool):
    swaps = []
    for layer in model.layers:
        attn, ffn = getattr(layer, "attn", None), getattr(layer, "ffn", None)
        recompute = recompute_attention and not blocks
        blocked = fast_ops and mx.default_device() == mx.cpu
        if hasattr(attn, "sdpa") and (recompute or blocked):
            swaps.append((attn, _training_attention_class(type(attn), recompute, blocked)))
        if fast_ops and hasattr(ffn, "activation"):
            swaps.append((ffn, _training_ffn_class(type(ffn))))
        if blocks:
            swaps.append((layer, _checkpointed_class(type(layer))))
    return swaps


@contextlib.contextmanager
def training_layers(
    model: nn.Module, blocks: bool = False, recompute_attention: bool = False, fast_ops: bool = True
):
    """Swap in the training versions of the model's layers; undone on exit.

    `blocks`: recompute every block in the backward pass (gradient checkpointing:
    least memory, about a third more time). `recompute_attention`: recompute only
    what lies between qkv_proj and out_proj, a few percent of the compute for a
    large share of the saved activations. `fast_ops`: train_ops' SwiGLU and, on
    the CPU, causal attention by query blocks. All of them leave the math unchanged.
    """
    swaps = _training_swaps(model, blocks, recompute_attention, fast_ops)
    originals = [(o, type(o)) for o, _ in swaps]
    for o, cls in swaps:
        o.__class__ = cls
    try:
        yield
    finally:
        for o, cls in originals:
            o.__class__ = cls
