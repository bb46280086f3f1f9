"""LoRA layers: parameter counts, fuse = unfused, save/load, QLoRA, mlx-lm interchange."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from elm_mlx.model.config import make_divisible, preset
from elm_mlx.model.openelm import OpenELM
from elm_mlx.testing import hf_config, random_weights, tiny_args
from elm_mlx.training.lora import (
    ADAPTER_FILE,
    CONFIG_FILE,
    TARGETS,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    apply_adapters,
    apply_lora,
    fuse_lora,
    load_adapters,
    num_trainable,
    save_adapters,
)

IDS = mx.array(
    [[1, 5, 17, 3, 99, 42, 8, 61, 0, 127, 33, 12], [7, 7, 2, 90, 14, 3, 3, 5, 6, 1, 0, 9]]
)


def build(args=None, seed=0):
    args = args or tiny_args()
    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in random_weights(args, seed).items()])
    return model


def randomize_adapters(model, seed=1):
    """Give every lora_b a non-zero value (fresh adapters are a no-op by design)."""
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.array(0.05 * rng.standard_normal(m.lora_b.shape).astype(np.float32))


def quantize_tiny(model, bits=4, group_size=32):
    """4-bit base: every matrix whose input width splits into groups, embeddings included."""
    nn.quantize(
        model,
        group_size=group_size,
        bits=bits,
        class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0,
    )
    return model


def rel_mean_err(a, b) -> float:
    return (mx.abs(a - b).mean() / mx.abs(b).mean()).item()


def expected_trainable(args, rank, targets, layers):
    """rank * (in + out) per adapted projection, from the config's per-layer widths."""
    d, hd = args.model_dim, args.head_dim
    total = 0
    for i in layers:
        q, kv = args.num_query_heads[i], args.num_kv_heads[i]
        ffn = make_divisible(args.ffn_multipliers[i] * d, args.ffn_dim_divisor)
        dims = {
            "qkv_proj": (d, (q + 2 * kv) * hd),
            "out_proj": (q * hd, d),
            "proj_1": (d, 2 * ffn),
            "proj_2": (ffn, d),
        }
        total += sum(rank * sum(dims[t]) for t in targets)
    return total


@pytest.mark.parametrize(
    "rank,targets,num_layers",
    [(8, TARGETS, -1), (4, ("qkv_proj", "out_proj"), 2), (2, ("proj_2",), 1)],
)
def test_trainable_count_follows_the_per_layer_widths(rank, targets, num_layers):
    args = tiny_args(layers=5, num_gqa_groups=2)
    model = OpenELM(args)
    adapted = apply_lora(model, LoRAConfig(rank=rank, targets=targets, num_layers=num_layers))
    layers = range(5) if num_layers == -1 else range(5 - num_layers, 5)
    assert num_trainable(model) == expected_trainable(args, rank, targets, layers)
    assert len(adapted) == len(layers) * len(targets)
    names = {k.rsplit(".", 1)[-1] for k, _ in tree_flatten(model.trainable_parameters())}
    assert names == {"lora_a", "lora_b"}


def test_openelm_270m_count_matches_formula_and_mlx_lm():
    from mlx_lm.models import openelm
    from mlx_lm.tuner.utils import linear_to_lora_layers

    args = preset("OpenELM-270M")
    ours = OpenELM(args)  # parameters stay lazy: nothing is materialised
    apply_lora(ours, LoRAConfig(rank=8))
    theirs = openelm.Model(openelm.ModelArgs.from_dict(hf_config(args)))
    theirs.freeze()
    linear_to_lora_layers(theirs, 16, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    mlx_lm_count = sum(v.size for _, v in tree_flatten(theirs.trainable_parameters()))
    assert num_trainable(ours) == expected_trainable(args, 8, TARGETS, range(16)) == mlx_lm_count


def test_fresh_adapters_do_not_change_the_model():
    model = build()
    before = model(IDS)
    apply_lora(model, LoRAConfig(rank=4, dropout=0.1))
    model.eval()
    assert mx.array_equal(model(IDS), before)


def test_fused_equals_unfused():
    model = build()
    apply_lora(model, LoRAConfig(rank=4, scale=2.0))
    randomize_adapters(model)
    unfused = model(IDS)
    assert not mx.allclose(unfused, build()(IDS), atol=1e-3)  # the adapters matter
    fuse_lora(model)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    assert mx.allclose(model(IDS), unfused, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_and_alpha(tmp_path):
    config = LoRAConfig.with_alpha(16.0, rank=4, num_layers=2, targets=("qkv_proj", "proj_1"))
    assert config.scale == 4.0
    model = build()
    apply_lora(model, config, seed=3)
    randomize_adapters(model)
    model.eval()
    save_adapters(model, tmp_path, config)
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert saved["lora_parameters"]["keys"] == ["attn.qkv_proj", "ffn.proj_1"]
    assert saved["num_layers"] == 2
    fresh = load_adapters(build(), tmp_path)
    assert mx.array_equal(fresh(IDS), model(IDS))
    fused = apply_adapters(build(), tmp_path)
    assert not any(isinstance(m, LoRALinear) for _, m in fused.named_modules())
    assert mx.allclose(fused(IDS), model(IDS), atol=1e-5, rtol=1e-5)


def test_mlx_lm_reads_our_adapter_directory(tmp_path):
    from mlx_lm.models import openelm
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    args = tiny_args()
    model = build(args)
    apply_lora(model, LoRAConfig(rank=4, num_layers=3))
    randomize_adapters(model)
    model.eval()
    save_adapters(model, tmp_path, LoRAConfig(rank=4, num_layers=3))
    theirs = openelm.Model(openelm.ModelArgs.from_dict(args.to_dict()))
    theirs.load_weights([(k, mx.array(v)) for k, v in random_weights(args, 0).items()])
    mlx_lm_load_adapters(theirs, str(tmp_path))
    assert mx.allclose(theirs(IDS), model(IDS), atol=1e-4, rtol=1e-4)


def test_load_reports_every_mismatch_at_once_and_leaves_the_model_alone(tmp_path):
    model = build()
    config = LoRAConfig(rank=4, num_layers=2)
    apply_lora(model, config)
    save_adapters(model, tmp_path, config)
    weights = mx.load(str(tmp_path / ADAPTER_FILE))
    weights.pop("transformer.layers.3.attn.out_proj.lora_a")
    weights["transformer.layers.3.ffn.proj_2.lora_b"] = mx.zeros((5, 64))
    weights["transformer.layers.0.attn.qkv_proj.lora_a"] = mx.zeros((64, 4))
    mx.save_safetensors(str(tmp_path / ADAPTER_FILE), weights)
    target = build()
    with pytest.raises(LoRAError) as e:
        load_adapters(target, tmp_path)
    message = str(e.value)
    assert "missing transformer.layers.3.attn.out_proj.lora_a" in message
    assert "unexpected transformer.layers.0.attn.qkv_proj.lora_a" in message
    assert "transformer.layers.3.ffn.proj_2.lora_b has shape (5, 64)" in message
    assert not any(isinstance(m, LoRALinear) for _, m in target.named_modules())


def test_missing_files_and_bad_settings():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_adapters(build(), "/nonexistent/adapters")
    model = build()
    with pytest.raises(LoRAError) as e:
        LoRAConfig(rank=0, dropout=1.5, targets=("q_proj",), num_layers=-2)
    for part in ("rank must be", "dropout must be", "'q_proj'", "num_layers must be"):
        assert part in str(e.value)
    with pytest.raises(LoRAError, match="num_layers 9 > the model's 4"):
        apply_lora(model, LoRAConfig(num_layers=9))
    with pytest.raises(LoRAError, match="rank 99 exceeds"):
        apply_lora(model, LoRAConfig(rank=99, targets=("out_proj",)))
    model = build()
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(LoRAError, match="already has LoRA layers"):
        apply_lora(model, LoRAConfig(rank=2))


def test_qlora_on_a_4bit_base_keeps_the_base_frozen_and_fuses(tmp_path):
    model = quantize_tiny(build())
    apply_lora(model, LoRAConfig(rank=4))
    wrapped = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert any(isinstance(m.linear, nn.QuantizedLinear) for m in wrapped)
    assert all(m.lora_a.dtype == mx.float32 for m in wrapped)
    names = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert all(k.endswith(("lora_a", "lora_b")) for k in names)
    randomize_adapters(model)
    model.eval()
    unfused = model(IDS)
    save_adapters(model, tmp_path, LoRAConfig(rank=4))
    # Loads onto a freshly quantized base, unfused (a quantized base is not re-rounded).
    loaded = apply_adapters(quantize_tiny(build()), tmp_path)
    assert any(isinstance(m, LoRALinear) for _, m in loaded.named_modules())
    assert mx.array_equal(loaded(IDS), unfused)
    dequantized = fuse_lora(load_adapters(quantize_tiny(build()), tmp_path), de_quantize=True)
    assert not any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        for _, m in dequantized.named_modules()
    )
    assert mx.allclose(dequantized(IDS), unfused, atol=1e-4, rtol=1e-4)
    # Fusing without de-quantizing re-rounds the fused weights to 4 bits: an error of the
    # size that quantizing the float model to 4 bits makes in the first place.
    requantized = fuse_lora(load_adapters(quantize_tiny(build()), tmp_path))
    rounding = rel_mean_err(quantize_tiny(build())(IDS), build()(IDS))
    assert 0 < rel_mean_err(requantized(IDS), unfused) < 2 * rounding


def test_full_fine_tune_trains_everything_but_not_a_quantized_model():
    model = build()
    apply_lora(model, LoRAConfig(fine_tune_type="full"))
    assert num_trainable(model) == model.args.num_parameters()
    with pytest.raises(LoRAError, match="quantized model cannot be fully fine-tuned"):
        apply_lora(quantize_tiny(build()), LoRAConfig(fine_tune_type="full"))


# ---- the command line ------------------------------------------------------------------


def write_data(path, n_train=8):
    path.mkdir()
    for split, n in (("train", n_train), ("valid", 4)):
        lines = [
            json.dumps({"prompt": f"Q: what is {i} plus one? A:", "completion": f" {i + 1}."})
            for i in range(n)
        ]
        (path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_cli_lora_resume_fuse(tmp_path, model_dir, capsys):
    from elm_mlx.cli import main
    from elm_mlx.formats.modeldir import load

    data = write_data(tmp_path / "data")
    adapters = tmp_path / "adapters"
    common = ["lora", "--model", str(model_dir), "--data", str(data), "--adapter-path",
              str(adapters), "--rank", "4", "--alpha", "16", "--batch-size", "4", "--learning-rate",
              "1e-3", "--val-every", "2", "--save-every", "2", "--mask-prompt"]  # fmt: skip
    assert main([*common, "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "train.jsonl: 8 completion records" in out and "trainable parameters" in out
    assert main([*common, "--iters", "4", "--resume"]) == 0
    assert "resuming at step 2" in capsys.readouterr().out
    saved = json.loads((adapters / CONFIG_FILE).read_text())
    assert saved["lora_parameters"]["scale"] == 4.0
    for name in (ADAPTER_FILE, "metrics.jsonl", "loss.png", "checkpoint/state.json"):
        assert (adapters / name).is_file(), name

    fused_dir = tmp_path / "fused"
    assert main(["fuse", "--model", str(model_dir), "--adapter-path", str(adapters),
                 "--save-path", str(fused_dir)]) == 0  # fmt: skip
    ids = mx.array([[1, 20, 30, 40, 50, 60]])
    base, _ = load(model_dir)
    unfused = load_adapters(base, adapters)(ids)
    fused, tokenizer = load(fused_dir)
    assert tokenizer is not None
    assert mx.allclose(fused(ids), unfused, atol=1e-5, rtol=1e-5)


def test_a_run_that_saved_nothing_does_not_block_the_next(tmp_path, model_dir, capsys):
    """What a run that failed before its first save leaves (its config and metrics: a full
    disk) is neither a run to --resume nor one to keep: a fresh run starts there, without
    --force, and its metrics are its own."""
    from elm_mlx.cli import main

    data = write_data(tmp_path / "data")
    adapters = tmp_path / "a"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text('{"fine_tune_type": "lora"}\n')
    (adapters / "metrics.jsonl").write_text('{"step": 7, "train_loss": 9.0}\n')
    args = ["lora", "--model", str(model_dir), "--data", str(data), "--iters", "1"]
    assert main([*args, "--adapter-path", str(adapters)]) == 0, capsys.readouterr().err
    assert (adapters / "adapters.safetensors").exists()
    assert '"step": 7' not in (adapters / "metrics.jsonl").read_text()


def test_cli_reports_bad_data_and_resume_mismatch_in_one_line(tmp_path, model_dir, capsys):
    from elm_mlx.cli import main

    data = write_data(tmp_path / "data")
    (data / "train.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    args = ["lora", "--model", str(model_dir), "--data", str(data), "--iters", "1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data / 'train.jsonl'}:2: 'text' must be a string")
    data = write_data(tmp_path / "data2")
    adapters = str(tmp_path / "a")
    assert main([*args[:4], str(data), "--iters", "1", "--adapter-path", adapters]) == 0
    resumed = [*args[:4], str(data), "--iters", "2", "--adapter-path", adapters, "--rank", "4"]
    assert main([*resumed, "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"cannot resume {adapters}/adapter_config.json exactly: --rank was 8, now 4" in err
    # An existing run is neither replaced without --force nor spoiled by a failing run.
    before = {p.name: p.read_bytes() for p in Path(adapters).iterdir() if p.is_file()}
    assert main([*resumed]) == 1
    assert "already holds adapters.safetensors" in capsys.readouterr().err
    assert main([*resumed, "--force", "--batch-size", "100"]) == 1
    assert "fewer than the batch size 100" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in Path(adapters).iterdir() if p.is_file()} == before
    fresh = tmp_path / "never"
    assert main([*resumed[:-4], "--adapter-path", str(fresh), "--batch-size", "100"]) == 1
    assert not fresh.exists()
    assert main([*resumed, "--force"]) == 0
    capsys.readouterr()
    assert main([*resumed, "--iters", "1", "--resume"]) == 1  # already at step 2
    assert "is at step 2 already; raise --iters above 2" in capsys.readouterr().err
