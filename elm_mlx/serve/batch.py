"""One decoding step for many sequences at once, each with its own KV cache.

Rows hold different numbers of tokens, so each keeps its own per-layer `KVCache`
(the very caches `generate` uses: a prompt is prefilled into one as `generate`
does it, and a finished row's cache goes to the prompt cache as it is; no padding,
no batched cache to merge or split when a row joins or leaves). What reads every
weight, the projections and the feed-forward, runs once for all rows as a
(B, d) product; only attention, which reads each row's own cache, runs row by row.

Two paths with the same result: on the CPU, float32 plain layers go through the
numpy kernels of `runtime.fastpath` (gemm over the rows, split over the cores);
everything else (a GPU, quantized or LoRA layers, half precision) through the
model's own MLX modules. A batch of one computes exactly what `generate` computes.
"""

from __future__ import annotations

import mlx.core as mx

from ..runtime.fastpath import CpuDecoder


def numpy_batches(model) -> bool:
    """Whether `decode_step` takes the numpy path for this model (as `generate` would)."""
    return isinstance(model, CpuDecoder)


def decode_step(model, tokens: list[int], caches: list[list]) -> mx.array:
    """Logits (B, vocab) of the next token of each row.

    `tokens[b]` is row b's newest token, not yet in its cache; `caches[b]` is that
    row's per-layer cache list, which gains one position.
    """
    if not tokens:
        raise ValueError("decode_step needs at least one row")
    if isinstance(model, CpuDecoder):
        logits = model.decode_rows(tokens, caches)
        if logits is not None:
            return logits
        model = model.model
    return _mlx_step(model, tokens, caches)


def _mlx_step(model, tokens: list[int], caches: list[list]) -> mx.array:
    t = model.transformer
    h = t.token_embeddings(mx.array(tokens, mx.int32)[:, None])  # (B, 1, d)
    for i, block in enumerate(t.layers):
        attn = block.attn
        qkv = attn.qkv_proj(block.attn_norm(h))  # (B, 1, qkv_out_dim)
        rows = [attn.attend(qkv[b : b + 1], None, row[i]) for b, row in enumerate(caches)]
        h = h + attn.out_proj(mx.concatenate(rows))  # (B, 1, d)
        h = h + block.ffn(block.ffn_norm(h))
    return model.head(t.norm(h))[:, 0]  # (B, vocab)
