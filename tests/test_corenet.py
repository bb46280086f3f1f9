"""CoreNet checkpoints (.pt state dict + training YAML) convert like the HF checkpoint
holding the same weights: same tensors, same config, same logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("yaml")

from elm_mlx import cli  # noqa: E402
from elm_mlx.formats import corenet  # noqa: E402
from elm_mlx.formats.convert import convert  # noqa: E402
from elm_mlx.formats.modeldir import WeightsError, load_model, read_config  # noqa: E402
from elm_mlx.model.config import ConfigError, ModelArgs  # noqa: E402
from elm_mlx.testing import random_weights, write_hf_checkpoint  # noqa: E402

PIECES = 384  # the session tokenizer's size (conftest.train_sentencepiece)

# The layout of Apple's projects/openelm YAML files (anchors included), with a tiny model
# spelled out field by field, as a CoreNet fork registering its own config would.
TINY_YAML = """\
_anchor_context_length: &_anchor_context_length 256
_anchor_vocab_size: &_anchor_vocab_size 400
_anchor_padding_index: &_anchor_padding_index 384
common:
  run_label: "train"
model:
  activation_checkpointing: false
  language_modeling:
    name: "general_gpt"
    general_gpt:
      model_name: "tiny-openelm"
      vocab_size: *_anchor_vocab_size
      max_context_length: *_anchor_context_length
      padding_index: *_anchor_padding_index
      num_transformer_layers: 4
      model_dim: 64
      head_dim: 16
      num_gqa_groups: 2
      qkv_multipliers: [0.5, 1.0]
      ffn_multipliers: [0.5, 4.0]
      ffn_dim_divisor: 16
      normalize_qk_projections: true
      share_input_output_layers: {tied}
"""


def corenet_state(weights: dict[str, np.ndarray]) -> dict:
    """HF-named numpy weights as CoreNet names them (no `transformer.`, `classifier`)."""
    out = {}
    for k, w in weights.items():
        name = "classifier.weight" if k == "lm_head.weight" else k.removeprefix("transformer.")
        out[name] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def make_pair(root: Path, sp_model_file: Path, tied: bool):
    """(CoreNet .pt, YAML, HF dir) with the same random weights; the CoreNet vocabulary is
    padded to 400 rows beyond the 384 pieces, as CoreNet pads 32000 to 32128."""
    yaml_file = root / "tiny.yaml"
    yaml_file.write_text(TINY_YAML.format(tied=str(tied).lower()))
    args, _ = corenet.model_args(corenet.read_section(yaml_file), yaml_file)
    full = random_weights(args, seed=7)
    pt = root / "model.pt"
    torch.save(corenet_state(full), pt)
    hf_args = ModelArgs.from_dict({**args.to_dict(), "vocab_size": PIECES})
    hf = {k: (w[:PIECES] if w.shape[0] == args.vocab_size else w) for k, w in full.items()}
    hf_dir = write_hf_checkpoint(root / "hf", hf_args, hf)
    shutil.copyfile(sp_model_file, hf_dir / "tokenizer.model")
    return pt, yaml_file, hf_dir, hf


def logits(path: Path) -> np.ndarray:
    model, _ = load_model(path)
    tokens = mx.array([[1, 5, 77, 300, 12, 383, 2]])
    return np.array(model(tokens))


@pytest.mark.parametrize("tied", [True, False])
def test_corenet_and_hf_convert_to_the_same_directory(tmp_path, sp_model_file, tied):
    pt, yaml_file, hf_dir, hf = make_pair(tmp_path, sp_model_file, tied)
    lines = []
    a = corenet.convert_corenet(pt, yaml_file, tmp_path / "from_corenet",
                                tokenizer=sp_model_file, log=lines.append)  # fmt: skip
    b = convert(hf_dir, tmp_path / "from_hf")
    assert any("dropping 16 padding rows" in line for line in lines)
    ta, tb = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    assert sorted(ta) == sorted(tb) == sorted(hf)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype == mx.float32
        np.testing.assert_array_equal(np.array(ta[k]), hf[k], err_msg=k)  # the source values
        np.testing.assert_array_equal(np.array(ta[k]), np.array(tb[k]), err_msg=k)
    ca, cb = read_config(a), read_config(b)
    ca.extra, cb.extra = {}, {}
    assert ca == cb
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    np.testing.assert_array_equal(logits(a), logits(b))
    provenance = json.loads((a / "provenance.json").read_text())
    assert set(provenance["inputs"]) == {"tiny.yaml", "model.pt"}


def test_openelm_preset_names_give_the_published_shapes(tmp_path):
    """Apple's openelm_270M.yaml names the model only; the shapes are CoreNet's gpt_configs."""
    yaml_file = tmp_path / "openelm_270M.yaml"
    yaml_file.write_text(
        "model:\n  language_modeling:\n    name: general_gpt\n    general_gpt:\n"
        "      model_name: OpenELM-270M\n      vocab_size: 32128\n"
        "      max_context_length: 2048\n      padding_index: 32000\n"
    )
    args, padding = corenet.model_args(corenet.read_section(yaml_file), yaml_file)
    # The published per-layer widths (OPENELM.md, from the HF config of apple/OpenELM-270M).
    assert args.num_query_heads == [12] * 5 + [16] * 7 + [20] * 4
    assert args.num_kv_heads == [3] * 5 + [4] * 7 + [5] * 4
    assert args.ffn_dim(0) == 768 and args.ffn_dim(15) == 5120
    assert args.share_input_output_layers and args.normalize_qk_projections
    assert (args.vocab_size, args.max_context_length, padding) == (32128, 2048, 32000)
    assert corenet.output_rows(args, padding, 32000) == 32000
    assert abs(args.num_parameters() - 271.5e6 - 128 * 1280) < 0.1e6


def test_every_key_and_shape_mismatch_reported_at_once(tmp_path, sp_model_file):
    pt, yaml_file, _, _ = make_pair(tmp_path, sp_model_file, True)
    state = torch.load(pt, weights_only=True)
    del state["layers.1.ffn_norm.weight"]
    state["layers.2.attn.qkv_proj.weight"] = state["layers.2.attn.qkv_proj.weight"][:-1]
    state["layers.0.attn.rotary.inv_freq"] = torch.zeros(8)
    torch.save(state, pt)
    with pytest.raises(WeightsError) as e:
        corenet.convert_corenet(pt, yaml_file, tmp_path / "out", tokenizer=sp_model_file)
    message = str(e.value)
    assert "\n" not in message
    assert "layers.1.ffn_norm.weight" in message and "missing" in message
    assert "layers.2.attn.qkv_proj.weight (127, 64)" in message
    assert "layers.0.attn.rotary.inv_freq" in message
    assert not (tmp_path / "out").exists()


def test_pickled_objects_are_never_loaded(tmp_path, sp_model_file):
    pt, yaml_file, _, _ = make_pair(tmp_path, sp_model_file, True)
    torch.save({"layers.0.attn_norm.weight": torch.zeros(64), "x": Path("/etc")}, pt)
    with pytest.raises(WeightsError, match="cannot read"):
        corenet.convert_corenet(pt, yaml_file, tmp_path / "out", tokenizer=sp_model_file)


@pytest.mark.parametrize(
    "text, match",
    [
        ("model: [unclosed\n", "is not valid YAML"),
        ("common:\n  run_label: train\n", "has no model section"),
        ("model:\n  language_modeling:\n    name: general_gpt\n",
         "no model.language_modeling.general_gpt section"),
        ("model:\n  language_modeling:\n    general_gpt:\n      model_name: gpt-9\n"
         "      vocab_size: 100\n", "missing max_context_length, num_transformer_layers"),
        ("model:\n  language_modeling:\n    general_gpt:\n      model_name: OpenELM-270M\n"
         "      vocab_size: 100\n      max_context_length: 64\n      use_moe: true\n",
         "unknown fields use_moe"),
        ("model:\n  language_modeling:\n    general_gpt:\n      model_name: OpenELM-270M\n"
         "      vocab_size: 100\n      max_context_length: 64\n      ffn_with_glu: false\n",
         "ffn_with_glu"),
    ],
)  # fmt: skip
def test_bad_configs_are_one_line_errors(tmp_path, text, match):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        corenet.model_args(corenet.read_section(yaml_file), yaml_file)
    assert "\n" not in str(e.value) and str(yaml_file) in str(e.value)


def test_cli(tmp_path, sp_model_file, capsys):
    pt, yaml_file, _, _ = make_pair(tmp_path, sp_model_file, True)
    out = tmp_path / "cli_out"
    base = ["convert", "--mlx-path", str(out), "--tokenizer", str(sp_model_file)]
    assert cli.main([*base, "--corenet-checkpoint", str(pt)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --corenet-checkpoint and --corenet-config go together"
    ]
    assert cli.main([*base, "--corenet-checkpoint", str(pt), "--hf-path", "x"]) == 1
    assert "either --hf-path" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {}\n")
    assert cli.main([*base, "--corenet-checkpoint", str(pt), "--corenet-config", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model.language_modeling section" in err[0]
    args = [*base, "--corenet-checkpoint", str(pt), "--corenet-config", str(yaml_file)]
    assert cli.main([*args, "--dtype", "float16"]) == 0
    assert read_config(out).vocab_size == PIECES
    assert mx.load(str(out / "model.safetensors"))["transformer.norm.weight"].dtype == mx.float16


def test_training_checkpoint_reads_its_model_state_dict(tmp_path, sp_model_file):
    """CoreNet's training_checkpoint_last.pt holds the weights beside the optimizer state."""
    pt, yaml_file, _, hf = make_pair(tmp_path, sp_model_file, True)
    state = torch.load(pt, weights_only=True)
    optim = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}
    training = {"iterations": 10, "epoch": 1, "model_state_dict": state, "optim_state_dict": optim}
    torch.save(training, tmp_path / "training_checkpoint_last.pt")
    out = corenet.convert_corenet(tmp_path / "training_checkpoint_last.pt", yaml_file,
                                  tmp_path / "out", tokenizer=sp_model_file)  # fmt: skip
    got = mx.load(str(out / "model.safetensors"))
    assert sorted(got) == sorted(hf)
    np.testing.assert_array_equal(
        np.array(got["transformer.norm.weight"]), hf["transformer.norm.weight"]
    )
