"""Attention with very peaked scores: QK-norm gains of 8 make attention logits far past
what exp() can take without subtracting the row maximum first. The CPU numpy path and
the training attention must stay finite and agree with MLX's fused kernel."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from reference import forward as numpy_forward

from elm_mlx.model.openelm import OpenELM
from elm_mlx.runtime.fastpath import CpuDecoder, fast_decoder
from elm_mlx.testing import random_weights, tiny_args
from elm_mlx.training.train_ops import causal_attention

GAIN = 8.0


def peaked_model(**kw) -> tuple[OpenELM, dict]:
    args = tiny_args(**kw)
    weights = random_weights(args, seed=11)
    for key in weights:
        if key.endswith(("q_norm.weight", "k_norm.weight")):
            weights[key] = weights[key] * GAIN
    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    mx.eval(model.parameters())
    return model, weights


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def largest_attention_logit(model: OpenELM, ids: mx.array) -> float:
    """max |q . k| * scale over the first layer, to show the test really is peaked."""
    block = model.transformer.layers[0]
    a = block.attn
    qkv = a.qkv_proj(block.attn_norm(model.transformer.token_embeddings(ids)))
    B, L, _ = qkv.shape
    qkv = qkv.reshape(B, L, -1, a.head_dim).transpose(0, 2, 1, 3)
    q, k = a.q_norm(qkv[:, : a.n_heads]), a.k_norm(qkv[:, a.n_heads : a.n_heads + a.n_kv_heads])
    k = mx.repeat(k, a.n_heads // a.n_kv_heads, axis=1)
    return float(mx.abs(q @ k.transpose(0, 1, 3, 2)).max().item() * a.scale)


@pytest.mark.parametrize("kw", [dict(num_gqa_groups=2, tied=False), dict(num_gqa_groups=4)])
def test_fast_path_with_large_qk_gains_is_finite_and_matches_mlx(kw):
    """A 150-token prompt, then 40 single tokens: the numpy path's logits are finite and as
    close to a float64 reference as MLX's own path is (peaked softmaxes magnify float32
    rounding in both)."""
    model, weights = peaked_model(**kw)
    fast = fast_decoder(model)
    assert isinstance(fast, CpuDecoder)
    ids = np.random.default_rng(2).integers(0, model.args.vocab_size, 190)
    assert largest_attention_logit(model, mx.array(ids[None])) > 100  # exp() overflows
    truth = numpy_forward(model.args.to_dict(), weights, ids.tolist())  # (190, vocab)
    plain_cache, fast_cache = model.make_cache(), model.make_cache()
    got = [fast(mx.array(ids[None, :150]), cache=fast_cache)[0]]  # the prompt path
    want = [model(mx.array(ids[None, :150]), cache=plain_cache)[0]]
    for token in ids[150:]:  # the one-token path
        got.append(fast(mx.array([[int(token)]]), cache=fast_cache)[0])
        want.append(model(mx.array([[int(token)]]), cache=plain_cache)[0])
    got, want = np.concatenate(got), np.concatenate(want)  # (190, vocab) each
    assert np.isfinite(got).all()
    mlx_err = rel_err(want, truth)
    assert mlx_err < 1e-2
    assert rel_err(got, truth) < max(2 * mlx_err, 1e-4)
    assert rel_err(got, want) < 1e-2


def numpy_causal_attention(q, k, v, scale) -> np.ndarray:
    """float64 softmax attention with the row maximum subtracted; GQA by repeating K/V."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) * scale  # (B, n_q, L, L)
    L = s.shape[-1]
    s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ v


def peaked_qkv(B=1, n_q=4, n_kv=2, L=200, D=16, seed=0):
    """Queries and keys as QK-norm leaves them (unit RMS per head) times GAIN."""
    rng = np.random.default_rng(seed)

    def normed(n):
        x = rng.standard_normal((B, n, L, D))
        return GAIN * x / np.sqrt((x * x).mean(axis=-1, keepdims=True))

    q, k = normed(n_q), normed(n_kv)
    v = rng.standard_normal((B, n_kv, L, D))
    return (mx.array(x.astype(np.float32)) for x in (q, k, v))


def check_training_attention(attention) -> None:
    """`attention(q, k, v, scale)` on peaked scores: finite, equal to a float64 reference
    and to MLX's fused kernel, and with the gradients of a plain MLX softmax."""
    q, k, v = peaked_qkv()
    scale = q.shape[-1] ** -0.5
    got = attention(q, k, v, scale)
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    assert np.isfinite(np.asarray(got)).all()
    assert rel_err(got, numpy_causal_attention(q, k, v, scale)) < 1e-4
    assert rel_err(got, fused) < 1e-4

    def plain(q, k, v):
        rep = q.shape[1] // k.shape[1]
        k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
        L = q.shape[2]
        s = (q @ k.transpose(0, 1, 3, 2)) * scale
        s = mx.where(mx.tril(mx.ones((L, L), mx.bool_)), s, -mx.inf)
        return mx.softmax(s, axis=-1, precise=True) @ v

    cotangent = mx.array(np.random.default_rng(1).standard_normal(got.shape).astype(np.float32))
    _, ours = mx.vjp(lambda *a: attention(*a, scale), [q, k, v], [cotangent])
    _, theirs = mx.vjp(plain, [q, k, v], [cotangent])
    for a, b in zip(ours, theirs, strict=True):
        assert np.isfinite(np.asarray(a)).all()
        assert rel_err(a, b) < 1e-3


def test_training_attention_with_large_qk_gains_is_finite_and_matches_mlx():
    check_training_attention(causal_attention)
