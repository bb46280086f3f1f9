"""Layer-wise scaling, presets and validation."""

import itertools

import pytest

from elm_mlx.cli import main
from elm_mlx.model.config import ConfigError, ModelArgs, make_divisible, preset, scaling_config
from elm_mlx.testing import hf_config

# The published table (query heads as (count, run length), KV first/last, FFN first/last, params).
PUBLISHED = {
    "OpenELM-270M": ([(12, 5), (16, 7), (20, 4)], 3, 5, 768, 5120, 271.5),
    "OpenELM-450M": ([(12, 3), (16, 7), (20, 6), (24, 4)], 3, 6, 768, 6144, 457.2),
    "OpenELM-1_1B": ([(16, 3), (20, 7), (24, 8), (28, 6), (32, 4)], 4, 8, 1024, 8192, 1079.9),
    "OpenELM-3B": ([(12, 4), (16, 14), (20, 12), (24, 6)], 3, 6, 1536, 12288, 3036.6),
}


@pytest.mark.parametrize("name", PUBLISHED)
@pytest.mark.parametrize("variant", ["", "-Instruct"])
def test_presets_give_published_shapes(name, variant):
    runs, kv_first, kv_last, ffn_first, ffn_last, params = PUBLISHED[name]
    args = preset(name + variant)
    assert [(k, len(list(g))) for k, g in itertools.groupby(args.num_query_heads)] == runs
    assert (args.num_kv_heads[0], args.num_kv_heads[-1]) == (kv_first, kv_last)
    n = args.num_transformer_layers
    assert (args.ffn_dim(0), args.ffn_dim(n - 1)) == (ffn_first, ffn_last)
    assert round(args.num_parameters() / 1e6, 1) == params


@pytest.mark.parametrize("name", PUBLISHED)
def test_derived_lists_and_ranges_agree(name):
    """An HF config lists the derived per-layer values; CoreNet gives ranges only."""
    from_ranges = preset(name)
    hf = hf_config(from_ranges)
    hf.pop("qkv_multipliers")
    hf.pop("num_gqa_groups")
    from_lists = ModelArgs.from_dict(hf)
    assert from_lists.weight_shapes() == from_ranges.weight_shapes()


def test_make_divisible_never_rounds_down_more_than_10_percent():
    assert make_divisible(640, 256) == 768
    assert make_divisible(857.6, 256) == 1024  # 768 would lose more than 10%
    assert make_divisible(10, 256) == 256


def test_to_dict_round_trips_and_keeps_unknown_fields():
    cfg = hf_config(preset("OpenELM-270M"))
    args = ModelArgs.from_dict(cfg)
    again = ModelArgs.from_dict(args.to_dict())
    assert again == args
    assert args.to_dict()["architectures"] == ["OpenELMForCausalLM"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_query_heads": [12] * 15}, "one value per layer"),
        ({"num_kv_heads": [5] * 16}, "not a multiple"),
        ({"ffn_with_glu": False}, "ffn_with_glu"),
        ({"normalization_layer_name": "layer_norm"}, "normalization_layer_name"),
        ({"model_type": "llama"}, "model_type"),
        ({"model_dim": -4}, "model_dim"),
        ({"num_transformer_layers": 0}, "num_transformer_layers must be a positive integer, got 0"),
        ({"head_dim": "64"}, "head_dim must be a positive integer, got '64'"),
    ],
)
def test_bad_configs_are_rejected_by_name(change, message):
    cfg = hf_config(preset("OpenELM-270M"))
    cfg.update(change)
    with pytest.raises(ConfigError, match=message):
        ModelArgs.from_dict(cfg)


def test_all_problems_reported_at_once():
    cfg = hf_config(preset("OpenELM-270M"))
    cfg.update({"num_query_heads": [12] * 3, "num_kv_heads": [1] * 2})
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_dict(cfg)
    assert "num_query_heads" in str(e.value) and "num_kv_heads" in str(e.value)


def test_missing_scaling_information():
    cfg = scaling_config(4, 256, 64)
    del cfg["num_gqa_groups"]
    with pytest.raises(ConfigError, match="num_gqa_groups"):
        ModelArgs.from_dict(cfg)


def test_info_prints_table(capsys):
    assert main(["info", "OpenELM-270M"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 271,527,168 (271.5M)" in out
    assert len([line for line in out.splitlines() if line.strip()[:2].strip().isdigit()]) == 16


def test_info_unknown_model(capsys):
    assert main(["info", "OpenELM-9B"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
