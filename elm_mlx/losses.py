"""Next-token cross-entropy for training without the full logits tensor.

A 32000-word vocabulary makes the logits of a 4 x 256-token batch 131 MB in
float32, and autograd keeps that tensor, its softmax and the gradient alive
together. `head_cross_entropy` instead walks the positions in chunks: each
chunk's logits give its loss *and* its gradient with respect to the hidden
states (and the head weight when that is trained) right away, and are freed
before the next chunk. The backward pass then only scales the stored
gradients. Same arithmetic as autograd's, a fraction of the memory.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MB in float32


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
        lse = mx.logsumexp(logits, axis=-1)  # (rows,)
        picked = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]  # (rows,)
        total = total + ((lse - picked) * m).sum()
        # d/dlogits = m * (softmax - onehot): the onehot part is a row gather of the weight.
        p = mx.exp(logits - lse[:, None]) * m[:, None]  # (rows, V)
        dhs.append(p.astype(weight.dtype) @ weight - m[:, None] * weight[t])  # (rows, D)
        if weight_grad:
            hm = hc.astype(mx.float32)
            dw = (dw + p.T @ hm).at[t].add(-m[:, None] * hm)  # (V, D)
    return total, mx.concatenate(dhs, axis=0), dw
