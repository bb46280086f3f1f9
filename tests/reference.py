"""A plain float64 numpy OpenELM forward, written from the paper's formulas.

Independent of elm_mlx.model.openelm and of MLX: weights come in as the HF checkpoint
dict, shapes are derived from the per-layer lists in the config dict.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Rotate-half RoPE over the full head dim; x: (heads, L, head_dim)."""
    d = x.shape[-1]
    inv_freq = base ** (-np.arange(0, d, 2) / d)  # (d/2,)
    angles = positions[:, None] * inv_freq[None]  # (L, d/2)
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(x, w, prefix, n_q, n_kv, hd, cfg):
    L = x.shape[0]
    qkv = x @ w[prefix + "qkv_proj.weight"].T  # (L, (n_q + 2 n_kv) * hd)
    qkv = qkv.reshape(L, n_q + 2 * n_kv, hd).transpose(1, 0, 2)  # (heads, L, hd)
    q, k, v = qkv[:n_q], qkv[n_q : n_q + n_kv], qkv[n_q + n_kv :]
    eps = cfg.get("rms_norm_eps", 1e-6)
    q = rms_norm(q, w[prefix + "q_norm.weight"], eps)
    k = rms_norm(k, w[prefix + "k_norm.weight"], eps)
    pos = np.arange(L, dtype=np.float64)
    base = cfg.get("rope_freq_constant", 10000)
    q, k = rope(q, pos, base), rope(k, pos, base)
    out = np.empty_like(q)
    causal = np.tril(np.ones((L, L), dtype=bool))
    for h in range(n_q):
        kv = h // (n_q // n_kv)  # query head h reads KV head h // group
        scores = q[h] @ k[kv].T / np.sqrt(hd)
        scores = np.where(causal, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[h] = (p / p.sum(-1, keepdims=True)) @ v[kv]
    return out.transpose(1, 0, 2).reshape(L, n_q * hd) @ w[prefix + "out_proj.weight"].T


def feed_forward(x, w, prefix):
    h = x @ w[prefix + "proj_1.weight"].T
    gate, up = np.split(h, 2, axis=-1)
    return (gate / (1 + np.exp(-gate)) * up) @ w[prefix + "proj_2.weight"].T


def forward(cfg: dict, weights: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits (L, vocab) for one sequence, in float64."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    eps = cfg.get("rms_norm_eps", 1e-6)
    x = w["transformer.token_embeddings.weight"][ids]
    for i in range(cfg["num_transformer_layers"]):
        p = f"transformer.layers.{i}."
        n_q, n_kv = cfg["num_query_heads"][i], cfg["num_kv_heads"][i]
        x = x + attention(
            rms_norm(x, w[p + "attn_norm.weight"], eps),
            w,
            p + "attn.",
            n_q,
            n_kv,
            cfg["head_dim"],
            cfg,
        )
        x = x + feed_forward(rms_norm(x, w[p + "ffn_norm.weight"], eps), w, p + "ffn.")
    x = rms_norm(x, w["transformer.norm.weight"], eps)
    head = w.get("lm_head.weight", w["transformer.token_embeddings.weight"])
    return x @ head.T
