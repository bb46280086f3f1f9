"""Random OpenELM checkpoints in the exact Hugging Face layout.

Used by the test suite (tiny models whose layers differ on purpose) and by the
benchmarks (random weights with the published 270M shapes). Nothing here
downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .model.config import ModelArgs, preset


def tiny_args(
    *,
    num_gqa_groups: int = 2,
    tied: bool = True,
    layers: int = 4,
    model_dim: int = 64,
    head_dim: int = 16,
    vocab_size: int = 128,
) -> ModelArgs:
    """A tiny OpenELM whose query heads, KV heads and FFN widths grow with depth."""
    q_heads = [max(num_gqa_groups, num_gqa_groups * (1 + i // 2)) for i in range(layers)]
    return ModelArgs.from_dict(
        {
            "num_transformer_layers": layers,
            "model_dim": model_dim,
            "head_dim": head_dim,
            "num_gqa_groups": num_gqa_groups,
            "num_query_heads": q_heads,
            "num_kv_heads": [q // num_gqa_groups for q in q_heads],
            "ffn_multipliers": [
                round(0.5 + 3.5 * i / max(1, layers - 1), 2) for i in range(layers)
            ],
            "ffn_dim_divisor": 16,
            "vocab_size": vocab_size,
            "share_input_output_layers": tied,
            "max_context_length": 256,
        }
    )


def random_weights(args: ModelArgs, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights for every checkpoint key: N(0, 0.02) matrices, norms near 1."""
    rng = np.random.default_rng(seed)
    weights = {}
    for key, shape in args.weight_shapes().items():
        if key.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            w = 0.02 * rng.standard_normal(shape)
        weights[key] = w.astype(dtype)
    return weights


def random_model(args: ModelArgs, seed: int = 0):
    """An OpenELM module holding `random_weights(args, seed)` (MLX imported here, on use)."""
    import mlx.core as mx

    from .model.openelm import OpenELM

    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in random_weights(args, seed).items()])
    return model


def hf_config(args: ModelArgs, torch_dtype: str = "float32") -> dict:
    """config.json as Apple's OpenELM repos write it."""
    config = args.to_dict()
    config.pop("quantization", None)
    config.update(
        {
            "architectures": ["OpenELMForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_openelm.OpenELMConfig",
                "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM",
            },
            "activation_fn_name": "swish",
            "normalization_layer_name": "rms_norm",
            "initializer_range": 0.02,
            "torch_dtype": torch_dtype,
            "transformers_version": "4.39.3",
            "use_cache": True,
        }
    )
    return config


def write_hf_checkpoint(
    path: str | Path,
    args: ModelArgs,
    weights: dict[str, np.ndarray],
    *,
    fmt: str = "safetensors",
    shards: int = 1,
) -> Path:
    """Write config.json and weights: `model.safetensors`, index + shards, or `pytorch_model.bin`.

    Untied checkpoints also carry the unused `transformer.classifier.weight`, as HF's do.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(weights)
    if not args.share_input_output_layers:
        weights["transformer.classifier.weight"] = weights["lm_head.weight"].copy()
    (path / "config.json").write_text(json.dumps(hf_config(args), indent=2))
    if fmt == "bin":
        _write_bin(path / "pytorch_model.bin", weights)
    elif shards == 1:
        _write_safetensors(path / "model.safetensors", weights)
    else:
        _write_shards(path, weights, shards)
    return path


def _write_safetensors(file: Path, weights: dict[str, np.ndarray]) -> None:
    import mlx.core as mx

    mx.save_safetensors(str(file), {k: mx.array(v) for k, v in weights.items()}, {"format": "pt"})


def _write_shards(path: Path, weights: dict[str, np.ndarray], shards: int) -> None:
    keys = sorted(weights)
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}, "weight_map": {}}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        _write_safetensors(path / name, {k: weights[k] for k in part})
        index["weight_map"].update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_bin(file: Path, weights: dict[str, np.ndarray]) -> None:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "writing pytorch_model.bin needs torch: pip install 'elm-mlx[torch]'"
        ) from e
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, file)


def random_preset_checkpoint(path: str | Path, name: str = "OpenELM-270M", seed: int = 0) -> Path:
    """A published model's exact shapes with random float32 weights (for benchmarks)."""
    args = preset(name)
    return write_hf_checkpoint(path, args, random_weights(args, seed))


def tiny_tokenizer(file: str | Path, vocab_size: int = 300) -> Path:
    """Write a small SentencePiece model (BPE, byte fallback) to `file`: enough for code that
    copies, checks or pads a tokenizer, with no download."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    text = ["The quick brown fox jumps over the lazy dog.", "OpenELM runs on MLX."] * 50
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=buf, vocab_size=vocab_size,
        byte_fallback=True, model_type="bpe", minloglevel=2,
    )  # fmt: skip
    Path(file).write_bytes(buf.getvalue())
    return Path(file)


def perturb_lora(model, std: float, seed: int = 0) -> None:
    """Give every LoRA layer's `lora_b` (zero after `apply_lora`) random values of scale
    `std`, so that the adapters change the model's output."""
    import mlx.core as mx

    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = std * mx.random.normal(m.lora_b.shape, key=mx.random.key(seed))


def random_adapters(model_dir: str | Path, out: str | Path, config, std: float, seed: int = 0):
    """Write adapters of `config` (a `training.lora.LoRAConfig`) with random `lora_b` for the
    model in `model_dir` to the adapter directory `out`; returns `out`."""
    from .formats.modeldir import load_model
    from .training.lora import apply_lora, save_adapters

    model, _ = load_model(Path(model_dir))
    apply_lora(model, config)
    perturb_lora(model, std, seed)
    save_adapters(model, Path(out), config)
    return Path(out)
