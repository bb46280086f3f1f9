"""DoRA layers: the paper's formula in float64, mlx-lm's DoRALinear, fuse, save/load, QLoRA base."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_lora import IDS, build, expected_trainable, quantize_tiny

from elm_mlx.model.openelm import OpenELM
from elm_mlx.testing import random_weights, tiny_args
from elm_mlx.training.lora import (
    CONFIG_FILE,
    TARGETS,
    DoRALinear,
    LoRAConfig,
    LoRALinear,
    apply_adapters,
    apply_lora,
    dense_weight,
    fuse_lora,
    linear_dims,
    load_adapters,
    num_trainable,
    save_adapters,
)

DORA = LoRAConfig(rank=4, scale=2.0, fine_tune_type="dora")


def randomize(model, seed=1):
    """Non-zero lora_b and magnitudes away from the base norms: every part matters."""
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if isinstance(m, DoRALinear):
            m.lora_b = mx.array(0.05 * rng.standard_normal(m.lora_b.shape).astype(np.float32))
            m.m = m.m * mx.array(rng.uniform(0.5, 1.5, m.m.shape).astype(np.float32))


def reference(layer: DoRALinear, x: np.ndarray) -> np.ndarray:
    """y = x @ (m * V / |V|_rows).T with V = W + scale * B.T @ A.T, in float64."""
    w = np.array(dense_weight(layer.linear).astype(mx.float32), dtype=np.float64)
    a, b = np.array(layer.lora_a, np.float64), np.array(layer.lora_b, np.float64)
    v = w + layer.scale * b.T @ a.T
    v = np.array(layer.m, np.float64)[:, None] * v / np.linalg.norm(v, axis=1, keepdims=True)
    return x.astype(np.float64) @ v.T


def one_layer(quantized: bool, seed=0) -> DoRALinear:
    base = nn.Linear(64, 48, bias=False)
    base.weight = mx.random.normal((48, 64), key=mx.random.key(seed)) * 0.1
    if quantized:
        base = nn.QuantizedLinear.from_linear(base, group_size=32, bits=4)
    layer = DoRALinear(base, rank=4, scale=2.0, key=mx.random.key(seed + 1))
    layer.lora_b = 0.05 * mx.random.normal((4, 48), key=mx.random.key(seed + 2))
    layer.m = layer.m * mx.random.uniform(0.5, 1.5, (48,), key=mx.random.key(seed + 3))
    return layer


@pytest.mark.parametrize("quantized", [False, True])
def test_forward_and_row_norms_follow_the_formula(quantized):
    layer = one_layer(quantized)
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    np.testing.assert_allclose(
        np.array(layer(mx.array(x))), reference(layer, x), rtol=1e-4, atol=1e-5
    )
    v = np.array(layer.fused_weight(), np.float64) / np.array(layer.m, np.float64)[:, None]
    w = np.array(dense_weight(layer.linear).astype(mx.float32), np.float64)
    a, b = np.array(layer.lora_a, np.float64), np.array(layer.lora_b, np.float64)
    direct = np.linalg.norm(w + layer.scale * b.T @ a.T, axis=1)
    np.testing.assert_allclose(np.array(layer.row_norms()), direct, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("quantized", [False, True])
def test_values_and_gradients_equal_mlx_lm_dora(quantized):
    from mlx_lm.tuner.dora import DoRALinear as TheirDoRA

    ours = one_layer(quantized)
    theirs = TheirDoRA.from_base(ours.linear, r=4, scale=2.0)
    theirs.update({"lora_a": ours.lora_a, "lora_b": ours.lora_b, "m": ours.m})
    x = mx.random.normal((3, 7, 64), key=mx.random.key(9))
    target = mx.random.normal((3, 7, 48), key=mx.random.key(10))

    def loss(layer, x):
        return mx.square(layer(x) - target).sum()

    ours_loss, ours_grads = nn.value_and_grad(ours, loss)(ours, x)
    their_loss, their_grads = nn.value_and_grad(theirs, loss)(theirs, x)
    assert ours_loss.item() == pytest.approx(their_loss.item(), rel=1e-5)
    ours_grads, their_grads = dict(tree_flatten(ours_grads)), dict(tree_flatten(their_grads))
    assert set(ours_grads) == {"lora_a", "lora_b", "m"}
    for k, g in ours_grads.items():
        scale = mx.abs(their_grads[k]).max().item()
        assert mx.abs(g - their_grads[k]).max().item() < 1e-4 * scale, k


def test_trainable_count_adds_one_magnitude_per_output_row():
    args = tiny_args(layers=5, num_gqa_groups=2)
    model = OpenELM(args)
    apply_lora(model, LoRAConfig(rank=4, num_layers=3, fine_tune_type="dora"))
    rows = sum(
        linear_dims(m.linear)[1] for _, m in model.named_modules() if isinstance(m, DoRALinear)
    )
    assert rows > 0
    assert num_trainable(model) == expected_trainable(args, 4, TARGETS, range(2, 5)) + rows
    names = {k.rsplit(".", 1)[-1] for k, _ in tree_flatten(model.trainable_parameters())}
    assert names == {"lora_a", "lora_b", "m"}


def test_fresh_dora_is_the_base_and_fused_equals_unfused():
    model = build()
    before = model(IDS)
    apply_lora(model, DORA)
    assert mx.allclose(model(IDS), before, atol=1e-5, rtol=1e-5)
    randomize(model)
    unfused = model(IDS)
    assert not mx.allclose(unfused, before, atol=1e-3)
    fuse_lora(model)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    assert mx.allclose(model(IDS), unfused, atol=1e-5, rtol=1e-5)


def test_save_load_and_mlx_lm_reads_our_dora_adapters(tmp_path):
    from mlx_lm.models import openelm
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    args = tiny_args()
    config = LoRAConfig(rank=4, scale=2.0, num_layers=3, fine_tune_type="dora")
    model = build(args)
    apply_lora(model, config)
    randomize(model)
    model.eval()
    save_adapters(model, tmp_path, config)
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert saved["fine_tune_type"] == "dora"
    assert mx.array_equal(load_adapters(build(args), tmp_path)(IDS), model(IDS))
    fused = apply_adapters(build(args), tmp_path)
    assert mx.allclose(fused(IDS), model(IDS), atol=1e-5, rtol=1e-5)
    theirs = openelm.Model(openelm.ModelArgs.from_dict(args.to_dict()))
    theirs.load_weights([(k, mx.array(v)) for k, v in random_weights(args, 0).items()])
    mlx_lm_load_adapters(theirs, str(tmp_path))
    assert mx.allclose(theirs(IDS), model(IDS), atol=1e-4, rtol=1e-4)


def test_dora_on_a_4bit_base(tmp_path):
    model = quantize_tiny(build())
    apply_lora(model, DORA)
    layers = [m for _, m in model.named_modules() if isinstance(m, DoRALinear)]
    assert any(isinstance(m.linear, nn.QuantizedLinear) for m in layers)
    randomize(model)
    model.eval()
    unfused = model(IDS)
    save_adapters(model, tmp_path, DORA)
    loaded = apply_adapters(quantize_tiny(build()), tmp_path)
    assert mx.array_equal(loaded(IDS), unfused)
    dequantized = fuse_lora(load_adapters(quantize_tiny(build()), tmp_path), de_quantize=True)
    assert mx.allclose(dequantized(IDS), unfused, atol=1e-4, rtol=1e-4)


def test_cli_dora_trains_resumes_and_fuses(tmp_path, model_dir, capsys):
    from test_lora import write_data

    from elm_mlx.cli import main
    from elm_mlx.formats.modeldir import load

    data = write_data(tmp_path / "data")
    adapters = tmp_path / "adapters"
    common = ["lora", "--model", str(model_dir), "--data", str(data), "--adapter-path",
              str(adapters), "--dora", "--rank", "4", "--batch-size", "4", "--learning-rate",
              "1e-3", "--val-every", "2", "--save-every", "2"]  # fmt: skip
    assert main([*common, "--iters", "2"]) == 0
    assert main([*common, "--iters", "3", "--resume"]) == 0
    assert "resuming at step 2" in capsys.readouterr().out
    assert json.loads((adapters / CONFIG_FILE).read_text())["fine_tune_type"] == "dora"
    fused_dir = tmp_path / "fused"
    assert main(["fuse", "--model", str(model_dir), "--adapter-path", str(adapters),
                 "--save-path", str(fused_dir)]) == 0  # fmt: skip
    ids = mx.array([[1, 20, 30, 40, 50, 60]])
    unfused = load_adapters(load(model_dir)[0], adapters)(ids)
    assert mx.allclose(load(fused_dir)[0](ids), unfused, atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit) as e:
        main([*common, "--full"])
    assert e.value.code == 2
