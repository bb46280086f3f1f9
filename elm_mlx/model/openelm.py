"""OpenELM in MLX. Attribute paths equal the Hugging Face checkpoint keys.

`transformer.layers.3.attn.qkv_proj.weight` in a checkpoint is
`model.transformer.layers[3].attn.qkv_proj.weight` here, so loading is
`model.load_weights(list(weights.items()))` with no rename table.

Training hooks: a training run may set these attributes on the instances (they
are None otherwise; elm_mlx/training/train_ops.py sets and clears them). Each
applies to uncached calls only, so generation never goes through them.

- `Attention.kernel(q, k, v, scale) -> out`: causal attention in place of the
  fused kernel, (B, n_q, L, D) x (B, n_kv, L, D) -> (B, n_q, L, D).
- `Attention.attend_wrapper(attn, attend, qkv, mask) -> out`: runs `attend`
  (everything between the projections), e.g. to recompute it in the backward pass.
- `FeedForward.kernel(gate, up) -> silu(gate) * up`, e.g. with its own gradient.
- `Block.wrapper(block, forward, x, mask) -> out`: runs the whole block.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, make_cache
from .config import ModelArgs


class Attention(nn.Module):
    kernel = None  # training hook (module docstring)
    attend_wrapper = None  # training hook

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads = args.num_query_heads[layer]
        self.n_kv_heads = args.num_kv_heads[layer]
        self.head_dim = hd = args.head_dim
        self.scale = hd**-0.5
        self.rope_base = args.rope_freq_constant
        self.qkv_proj = nn.Linear(args.model_dim, args.qkv_out_dim(layer), bias=False)
        self.out_proj = nn.Linear(self.n_heads * hd, args.model_dim, bias=False)
        if args.normalize_qk_projections:
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache: KVCache | None = None) -> mx.array:
        qkv = self.qkv_proj(x)
        if self.attend_wrapper is not None and cache is None:
            return self.out_proj(self.attend_wrapper(self, self.attend, qkv, mask))
        return self.out_proj(self.attend(qkv, mask, cache))

    def attend(self, qkv: mx.array, mask=None, cache: KVCache | None = None) -> mx.array:
        """Everything between the two projections: (B, L, qkv_out_dim) -> (B, L, q * head_dim)."""
        B, L, _ = qkv.shape
        n_q, n_kv = self.n_heads, self.n_kv_heads
        qkv = qkv.reshape(B, L, n_q + 2 * n_kv, self.head_dim)
        qkv = qkv.transpose(0, 2, 1, 3)  # (B, n_q + 2 n_kv, L, head_dim)
        q, k, v = mx.split(qkv, [n_q, n_q + n_kv], axis=1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = 0 if cache is None else cache.offset
        q = mx.fast.rope(
            q, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset
        )
        k = mx.fast.rope(
            k, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset
        )
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, n_kv, offset + L, head_dim)
        out = self.sdpa(q, k, v, mask)  # (B, n_q, L, head_dim)
        return out.transpose(0, 2, 1, 3).reshape(B, L, n_q * self.head_dim)

    def sdpa(self, q: mx.array, k: mx.array, v: mx.array, mask=None) -> mx.array:
        """Softmax attention (the `kernel` hook, when set, computes the causal case)."""
        if self.kernel is not None and isinstance(mask, str) and mask == "causal":
            return self.kernel(q, k, v, self.scale)
        # Native GQA: query head h reads KV head h // (n_q / n_kv); K/V are not repeated.
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)


class FeedForward(nn.Module):
    kernel = None  # training hook (module docstring)

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        ffn_dim = args.ffn_dim(layer)
        self.proj_1 = nn.Linear(args.model_dim, 2 * ffn_dim, bias=False)
        self.proj_2 = nn.Linear(ffn_dim, args.model_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.proj_1(x), 2, axis=-1)  # (B, L, ffn_dim) each
        return self.proj_2(self.activation(gate, up))

    def activation(self, gate: mx.array, up: mx.array) -> mx.array:
        """SwiGLU (the `kernel` hook, when set, computes it)."""
        if self.kernel is not None:
            return self.kernel(gate, up)
        return nn.silu(gate) * up


class Block(nn.Module):
    wrapper = None  # training hook (module docstring)

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.attn = Attention(args, layer)
        self.ffn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.ffn = FeedForward(args, layer)

    def __call__(self, x: mx.array, mask=None, cache: KVCache | None = None) -> mx.array:
        if self.wrapper is not None and cache is None:
            return self.wrapper(self, self.forward, x, mask)
        return self.forward(x, mask, cache)

    def forward(self, x: mx.array, mask=None, cache: KVCache | None = None) -> mx.array:
        h = x + self.attn(self.attn_norm(x), mask, cache)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embeddings = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [Block(args, i) for i in range(args.num_transformer_layers)]
        self.norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)

    def __call__(self, ids: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        h = self.token_embeddings(ids)  # (B, L, model_dim)
        cache = cache or [None] * len(self.layers)
        mask = _mask(h.shape[1], cache[0])
        for layer, c in zip(self.layers, cache, strict=True):
            h = layer(h, mask, c)
        return self.norm(h)


def _mask(n: int, cache):
    if cache is not None and hasattr(cache, "make_mask"):
        return cache.make_mask(n)
    return None if n == 1 else "causal"


class OpenELM(nn.Module):
    """The full causal LM: `model(ids)` -> logits (B, L, vocab_size)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.transformer = Transformer(args)
        if not args.share_input_output_layers:
            self.lm_head = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def __call__(self, ids: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        return self.head(self.transformer(ids, cache))

    def output_head(self) -> tuple[str, nn.Module]:
        """(module path, layer) of the output matrix: the token embeddings when tied.

        The one place that decides it; the CPU decoding path and the trainer ask here."""
        if self.args.share_input_output_layers:
            return "transformer.token_embeddings", self.transformer.token_embeddings
        return "lm_head", self.lm_head

    def head(self, h: mx.array) -> mx.array:
        """Logits (B, L, vocab_size) of the final norm's output (B, L, model_dim)."""
        _, layer = self.output_head()
        return layer.as_linear(h) if hasattr(layer, "as_linear") else layer(h)

    @property
    def layers(self) -> list[Block]:
        return self.transformer.layers

    def make_cache(self, max_kv_size: int | None = None) -> list[KVCache]:
        """Per-layer caches bounded by the context length, or a rotating window."""
        return make_cache(len(self.layers), self.args.max_context_length, max_kv_size)
