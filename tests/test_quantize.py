"""Quantization: layers, bounds against float, recipes, mlx-lm interchange, errors."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_lm_utils

from elm_mlx import cli
from elm_mlx.formats import modeldir as mio
from elm_mlx.formats.convert import quantize_dir
from elm_mlx.model.config import ModelArgs
from elm_mlx.model.openelm import OpenELM
from elm_mlx.quant import qlayers
from elm_mlx.quant import quality as qq
from elm_mlx.quant import quantize as q
from elm_mlx.testing import random_weights, tiny_args, write_hf_checkpoint


def quant_args(tied: bool = True) -> ModelArgs:
    """A tiny model whose every matrix dimension is a multiple of 128 (all group sizes fit)."""
    config = tiny_args(
        model_dim=128, head_dim=32, num_gqa_groups=4, vocab_size=256, tied=tied
    ).to_dict()
    config["ffn_dim_divisor"] = 128
    return ModelArgs.from_dict(config)


def build(args: ModelArgs, weights: dict) -> OpenELM:
    model = OpenELM(ModelArgs.from_dict(args.to_dict()))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return model


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    """Same keys, dtypes and values (packed weights, scales, biases, norms)."""
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert sorted(pa) == sorted(pb)
    for k, v in pa.items():
        assert v.dtype == pb[k].dtype and mx.array_equal(v, pb[k]), k


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def tiny(request):
    args = quant_args(tied=request.param)
    return args, random_weights(args, seed=7)


IDS = mx.array(np.random.default_rng(0).integers(0, 256, (2, 24)))


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, 128)])
def test_layers_carry_requested_bits_and_group_size(tiny, bits, group_size):
    args, weights = tiny
    model = build(args, weights)
    config = q.quantize_model(model, q.QuantizeSpec(bits, group_size))
    quantized = [
        (p, m)
        for p, m in model.named_modules()
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)
    ]
    assert {p for p, _ in quantized} == set(q.matrix_shapes(args))
    assert all((m.bits, m.group_size, m.mode) == (bits, group_size, "affine") for _, m in quantized)
    assert config == {"group_size": group_size, "bits": bits, "mode": "affine"}
    assert model.args.quantization == config
    assert model.transformer.norm.weight.dtype == mx.float32  # norms stay float


def test_8bit_much_closer_to_float_than_4bit(tiny):
    """On this tiny random model (N(0, 0.02) weights, group size 64) the largest logit error
    relative to the largest logit measures ~0.35 at 4 bits and ~0.017 at 8 bits. Bounds:
    8-bit < 0.1x 4-bit, and 0 < 8-bit, 4-bit < 0.5 (neither a no-op nor broken)."""
    args, weights = tiny
    ref = build(args, weights)(IDS)
    errs = {}
    for bits in (4, 8):
        model = build(args, weights)
        q.quantize_model(model, q.QuantizeSpec(bits, 64))
        errs[bits] = rel_err(model(IDS), ref)
    assert 0 < errs[8] < 0.1 * errs[4]
    assert errs[4] < 0.5


@pytest.fixture
def float_dir(tiny, tmp_path):
    args, weights = tiny
    return mio.save_model(tmp_path / "float", build(args, weights), args)


def test_save_then_load_gives_identical_logits(float_dir, tmp_path):
    spec = q.QuantizeSpec(recipe="mixed-4-8", group_size=32)
    ours = quantize_dir(float_dir, tmp_path / "q", spec)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == ours.args.quantization
    loaded, _ = mio.load_model(tmp_path / "q")
    assert mx.array_equal(loaded(IDS), ours(IDS))
    assert q.bits_per_weight(loaded) == q.bits_per_weight(ours)
    with pytest.raises(q.QuantizeError, match="already quantized"):
        quantize_dir(tmp_path / "q", tmp_path / "qq", spec)


@pytest.mark.parametrize("recipe", [None, "mixed-4-8"])
def test_mlx_lm_loads_our_quantized_dir(float_dir, tmp_path, recipe):
    ours = quantize_dir(float_dir, tmp_path / "q", q.QuantizeSpec(4, 64, recipe=recipe))
    theirs, _ = mlx_lm_utils.load_model(tmp_path / "q")
    emb = theirs.transformer.token_embeddings
    assert isinstance(emb, nn.QuantizedEmbedding)
    assert emb.bits == ours.transformer.token_embeddings.bits
    assert_same_parameters(theirs, ours)
    assert rel_err(theirs(IDS), ours(IDS)) < 1e-5  # 0.0 today: the same ops on the same arrays


def _mlx_lm_predicate(path, module):
    """Mixed choices mlx-lm records per path, plus one float matrix it leaves unrecorded."""
    if path.endswith("layers.1.ffn.proj_1"):
        return False
    if "token_embeddings" in path or path.endswith("qkv_proj"):
        return {"group_size": 32, "bits": 8, "mode": "affine"}
    return True


@pytest.mark.parametrize("predicate", [None, _mlx_lm_predicate], ids=["uniform", "mixed"])
def test_we_load_mlx_lm_quantized_dir(float_dir, tmp_path, predicate):
    theirs, config = mlx_lm_utils.load_model(float_dir)
    theirs, config = mlx_lm_utils.quantize_model(
        theirs, config, group_size=64, bits=4, quant_predicate=predicate
    )
    mlx_lm_utils.save_model(tmp_path / "theirs", theirs)
    mlx_lm_utils.save_config(config, tmp_path / "theirs" / "config.json")
    ours, _ = mio.load_model(tmp_path / "theirs")
    assert isinstance(ours.transformer.token_embeddings, nn.QuantizedEmbedding)
    if predicate is not None:
        assert isinstance(ours.layers[1].ffn.proj_1, nn.Linear)
        assert ours.layers[0].attn.qkv_proj.bits == 8
    assert_same_parameters(ours, theirs)
    assert rel_err(ours(IDS), theirs(IDS)) < 1e-5


def test_scales_dtype_default_and_override(tiny):
    args, weights = tiny
    model = build(args, weights)
    q.quantize_model(model, q.QuantizeSpec(4, 64, scales_dtype="bfloat16"))
    assert model.transformer.layers[0].attn.qkv_proj.scales.dtype == mx.bfloat16
    q.cast_scales(model, mx.float32)
    assert model.transformer.token_embeddings.biases.dtype == mx.float32
    cpu = mx.default_device().type == mx.DeviceType.cpu
    assert q.default_scales_dtype(mx.bfloat16) == (mx.float32 if cpu else mx.bfloat16)


def test_mixed_recipe_is_openelm_aware():
    args = quant_args()
    plan = q.make_plan(args, q.QuantizeSpec(recipe="mixed-4-8", group_size=64))
    n = args.num_transformer_layers
    assert plan["transformer.token_embeddings"].bits == 8
    for i in (0, n - 1):
        assert plan[f"transformer.layers.{i}.attn.qkv_proj"].bits == 8
        assert plan[f"transformer.layers.{i}.ffn.proj_2"].bits == 8
        assert plan[f"transformer.layers.{i}.ffn.proj_1"].bits == 4
    assert {p.group_size for p in plan.values()} == {64}


def test_recipe_file_round_trips(tmp_path):
    recipe = q.Recipe(
        4,
        64,
        {
            "transformer.layers.0.attn.qkv_proj": q.QuantParams(8, 32),
            "*.proj_2": q.QuantParams(8, 64),
            "transformer.layers.3.ffn.proj_1": None,
        },
    )
    (tmp_path / "r.json").write_text(json.dumps(recipe.to_json()))  # as quantize --scan saves it
    again = q.Recipe.load(tmp_path / "r.json")
    assert again == recipe
    assert again.to_json() == json.loads((tmp_path / "r.json").read_text())
    args = quant_args()
    plan = q.make_plan(args, q.QuantizeSpec(recipe=str(tmp_path / "r.json")))
    assert plan == q.make_plan(args, recipe)
    assert plan["transformer.layers.2.ffn.proj_2"] == q.QuantParams(8, 64)
    assert plan["transformer.layers.3.ffn.proj_1"] is None
    # The config block written for a plan is itself a recipe giving the same plan.
    assert q.plan_from_config(args, q.quantization_config(plan)) == plan


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(bits=3), "3-bit quantization is not supported"),
        (dict(bits=16), "16-bit quantization is not supported"),
        (dict(group_size=48), "group size 48 is not supported"),
        (dict(recipe="mixed-9"), "unknown recipe 'mixed-9'"),
        (dict(scales_dtype="int8"), "scales dtype 'int8' is not supported"),
    ],
)
def test_bad_requests_are_one_line_errors(kwargs, message):
    with pytest.raises(q.QuantizeError, match=message) as e:
        q.make_plan(quant_args(), q.QuantizeSpec(**kwargs))
    assert "\n" not in str(e.value)


def test_group_size_that_does_not_divide_is_an_error_naming_the_layers():
    args = tiny_args()  # FFN widths are multiples of 16 only
    with pytest.raises(q.QuantizeError, match=r"does not divide .* 5 matrices: .*ffn\.proj_2") as e:
        q.make_plan(args, q.QuantizeSpec(4, 64))
    assert "\n" not in str(e.value) and "keep them in float with a recipe file" in str(e.value)
    # When a smaller supported group size fits every such matrix, the error names it.
    from elm_mlx.formats.modeldir import default_model_path

    nano = mio.read_config(default_model_path())  # model_dim 160
    with pytest.raises(q.GroupSizeError, match=r"use group size 32$") as e:
        q.make_plan(nano, q.QuantizeSpec(4, 64))
    assert e.value.fits == 32 and "--" not in str(e.value)  # the CLI adds its flag name
    # A recipe can keep exactly those matrices in float instead.
    recipe = q.Recipe(4, 32, {"*.out_proj": None, "*.proj_2": None})
    plan = q.make_plan(args, recipe)
    assert plan["transformer.layers.1.ffn.proj_2"] is None
    assert q.quantization_config(plan)["transformer.layers.1.ffn.proj_2"] is False


def test_recipe_naming_unknown_modules_is_an_error():
    with pytest.raises(q.QuantizeError, match="down_proj"):
        q.make_plan(quant_args(), q.Recipe(4, 64, {"model.layers.0.mlp.down_proj": None}))


def test_plan_bits_per_weight_matches_the_quantized_model(tiny):
    args, weights = tiny
    model = build(args, weights)
    spec = q.QuantizeSpec(recipe="mixed-4-8", group_size=32, scales_dtype="float32")
    q.quantize_model(model, spec)
    predicted = q.plan_bits_per_weight(args, q.make_plan(args, spec), 4, 4)
    assert q.bits_per_weight(model) == pytest.approx(predicted)
    assert 4 < predicted < 9


# ---- quality and scan ----------------------------------------------------------


def test_compare_identical_models_is_exact():
    args = quant_args()
    weights = random_weights(args, seed=1)
    windows = qq.token_windows(list(range(200)), seq_len=64)
    assert windows.shape == (3, 65)
    result = qq.compare(build(args, weights), build(args, weights), windows)
    assert result.tokens == 3 * 64
    assert result.ppl_float == pytest.approx(result.ppl_quant)
    assert abs(result.mean_kl) < 1e-6 and result.top1_agreement == 1.0


def test_scan_and_target_recipe():
    args = quant_args()
    weights = random_weights(args, seed=2)
    model = build(args, weights)
    windows = qq.token_windows(np.random.default_rng(3).integers(0, 256, 97).tolist(), 32)
    damage = qq.sensitivity_scan(model, windows, group_size=64)
    assert set(damage) == set(q.matrix_shapes(args)) and all(d[4] > 0 for d in damage.values())
    assert rel_err(model(IDS), build(args, weights)(IDS)) == 0  # restored to float
    all4 = q.plan_bits_per_weight(args, q.make_plan(args, q.Recipe(4, 64, {})), 4, 4)
    all8 = q.plan_bits_per_weight(args, q.make_plan(args, q.Recipe(8, 64, {})), 4, 4)
    target = (all4 + all8) / 2
    recipe = qq.recipe_for_target(args, damage, target, group_size=64)
    plan = q.make_plan(args, recipe)
    assert all4 < q.plan_bits_per_weight(args, plan, 4, 4) <= target
    high = [p for p, v in plan.items() if v.bits == 8]
    assert high and len(high) < len(plan)
    # No 4-bit matrix could go back to 8 bits within the target.
    for path in set(plan) - set(high):
        raised = plan | {path: q.QuantParams(8, 64)}
        assert q.plan_bits_per_weight(args, raised, 4, 4) > target
    # The matrix with the most damage per bit saved stays at 8 bits.
    shapes = q.matrix_shapes(args)
    worst = max(shapes, key=lambda p: damage[p][4] / (shapes[p][0] * shapes[p][1]))
    assert worst in high
    with pytest.raises(q.QuantizeError, match="below what 4-bit"):
        qq.recipe_for_target(args, damage, all4 - 0.5, group_size=64)


def test_a_target_below_every_matrix_at_4_bits_is_refused_before_the_scan(monkeypatch):
    """The scan costs a forward pass per matrix and width: a target no recipe can meet is
    said first."""
    args = tiny_args()
    model = OpenELM(args)
    monkeypatch.setattr(qq, "sensitivity_scan", lambda *a, **k: pytest.fail("scanned"))
    windows = mx.zeros((1, 8), mx.int32)
    with pytest.raises(q.QuantizeError, match="below what 4-bit"):
        qq.scan_recipe(model, windows, q.QuantizeSpec(4, 32), 1.0)


# ---- command line ----------------------------------------------------------------

EVAL_TEXT = "The quick brown fox jumps over the lazy dog. Once upon a time there was a model. " * 8


@pytest.fixture
def cli_dirs(tmp_path, sp_model_file):
    """A float model dir with the tiny tokenizer (vocab 384 covers it) and held-out text."""
    args = quant_args()
    config = args.to_dict() | {"vocab_size": 384}
    args = ModelArgs.from_dict(config)
    weights = random_weights(args, seed=4)
    mio.save_model(tmp_path / "float", build(args, weights), args, tokenizer=sp_model_file)
    (tmp_path / "heldout.txt").write_text(EVAL_TEXT)
    return tmp_path, weights


def test_cli_quantize_and_report(cli_dirs, capsys):
    tmp, _ = cli_dirs
    argv = ["quantize", "--model", str(tmp / "float"), "--out", str(tmp / "q")]
    argv += ["--recipe", "mixed-4-8", "--group-size", "32", "--report"]
    assert cli.main([*argv, "--eval-text", str(tmp / "heldout.txt")]) == 0
    out = capsys.readouterr().out
    assert "bits per weight" in out and "perplexity" in out and "top-1 agree" in out
    loaded, _ = mio.load_model(tmp / "q")
    assert loaded.transformer.token_embeddings.bits == 8
    assert loaded.layers[1].ffn.proj_1.bits == 4 and loaded.layers[1].ffn.proj_1.group_size == 32
    assert (tmp / "q" / "tokenizer.model").is_file()


def test_cli_scan_writes_a_recipe_meeting_the_target(cli_dirs, capsys):
    tmp, _ = cli_dirs
    argv = ["quantize", "--model", str(tmp / "float"), "--out", str(tmp / "q"), "--scan"]
    argv += ["--target-bpw", "7", "--eval-text", str(tmp / "heldout.txt"), "--eval-tokens", "96"]
    assert cli.main(argv) == 0
    recipe = q.Recipe.load(tmp / "q" / "quantize_recipe.json")
    loaded, args = mio.load_model(tmp / "q")
    assert q.plan_from_config(args, args.quantization) == q.make_plan(args, recipe)
    assert 5 < q.bits_per_weight(loaded) <= 7
    assert "scan transformer.layers.0.attn.qkv_proj at 4 bits" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--bits", "3"], "error: 3-bit quantization is not supported; choose bits from [4, 8]"),
        (["--group-size", "48"], "error: group size 48 is not supported"),
        (["--recipe", "mixed_4_6"], "error: unknown recipe 'mixed_4_6'"),
        (["--recipe", "mixed-4-8", "--bits", "8"], "error: --bits conflicts with --recipe"),
        (["--report"], "error: --scan and --report need --eval-text"),
        (["--scan"], "error: --scan and --target-bpw go together"),
    ],
)
def test_cli_bad_flags_exit_1_with_one_line(cli_dirs, capsys, flags, message):
    tmp, _ = cli_dirs
    argv = ["quantize", "--model", str(tmp / "float"), "--out", str(tmp / "q"), *flags]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp / "q").exists()


def test_convert_quantizes_while_streaming_like_quantize_dir(cli_dirs, sp_model_file):
    """Tensor-by-tensor quantization in the converter gives exactly the arrays of quantizing
    the converted float model."""
    tmp, weights = cli_dirs
    args = mio.read_config(tmp / "float")
    write_hf_checkpoint(tmp / "hf", args, weights)
    argv = ["convert", "--hf-path", str(tmp / "hf"), "--mlx-path", str(tmp / "cq")]
    argv += ["--tokenizer", str(sp_model_file), "-q", "--q-recipe", "mixed-4-8"]
    assert cli.main(argv) == 0
    streamed, streamed_args = mio.load_model(tmp / "cq")
    in_memory = quantize_dir(tmp / "float", tmp / "q", q.QuantizeSpec(recipe="mixed-4-8"))
    assert streamed_args.quantization == in_memory.args.quantization
    assert_same_parameters(streamed, in_memory)
    assert cli.main(["convert", "--hf-path", str(tmp / "hf"), "--mlx-path", str(tmp / "x"),
                     "--q-bits", "8"]) == 1  # fmt: skip


def test_convert_scales_dtype_flag(cli_dirs, sp_model_file):
    tmp, weights = cli_dirs
    write_hf_checkpoint(tmp / "hf", mio.read_config(tmp / "float"), weights)
    argv = ["convert", "--hf-path", str(tmp / "hf"), "--tokenizer", str(sp_model_file)]
    assert (
        cli.main([*argv, "--mlx-path", str(tmp / "bf"), "-q", "--q-scales-dtype", "bfloat16"]) == 0
    )
    streamed, _ = mio.load_model(tmp / "bf")
    scales = [v for k, v in tree_flatten(streamed.parameters()) if k.endswith(".scales")]
    assert scales and all(v.dtype == mx.bfloat16 for v in scales)
    in_memory = quantize_dir(tmp / "float", tmp / "q", q.QuantizeSpec(scales_dtype="bfloat16"))
    assert_same_parameters(streamed, in_memory)
    assert cli.main([*argv, "--mlx-path", str(tmp / "x"), "--q-scales-dtype", "float16"]) == 1
    assert not (tmp / "x").exists()


# ---- CPU layers ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_cpu_layers_match_mlx_quantized_kernels(dtype):
    """Many-row products through dequantize + BLAS match MLX's quantized matmul (float32:
    to rounding; bfloat16: at least as close to the float32 product, since BLAS accumulates
    in float32), one-row products are MLX's own; gradients agree."""
    plain = nn.Linear(256, 96).to_quantized(group_size=64, bits=4)
    plain.set_dtype(dtype)
    cpu = qlayers.use_cpu_layers(nn.Linear(256, 96).to_quantized(group_size=64, bits=4))
    cpu.update(plain.parameters())
    assert isinstance(cpu, nn.QuantizedLinear) and type(cpu) is not type(plain)
    x = mx.random.normal((3, 11, 256), key=mx.random.key(0)).astype(dtype)
    assert cpu(x).dtype == plain(x).dtype == dtype
    assert mx.array_equal(cpu(x[:1, :1]), plain(x[:1, :1]))
    w = mx.dequantize(plain.weight, plain.scales, plain.biases, 64, 4).astype(mx.float32)
    exact = x.astype(mx.float32) @ w.T + plain.bias.astype(mx.float32)
    ours, mlx = (rel_err(m(x).astype(mx.float32), exact) for m in (cpu, plain))
    assert ours < 1e-5 if dtype == mx.float32 else ours <= mlx

    def loss(layer):
        return lambda x: (layer(x).astype(mx.float32) ** 2).sum()

    g_cpu, g_plain = mx.grad(loss(cpu))(x), mx.grad(loss(plain))(x)
    assert rel_err(g_cpu.astype(mx.float32), g_plain.astype(mx.float32)) < (
        1e-5 if dtype == mx.float32 else 0.1
    )


def test_cpu_embedding_head_matches(tiny):
    args, weights = tiny
    model = build(args, weights)
    q.quantize_model(model, q.QuantizeSpec(4, 64))
    assert type(model.transformer.token_embeddings) is qlayers.CpuQuantizedEmbedding
    fast = model(IDS)
    for _, m in model.named_modules():  # back to MLX's own classes
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding):
            m.__class__ = m.__class__.__mro__[1]
    assert rel_err(fast, model(IDS)) < 1e-5


def test_outputs_never_replace_their_input_and_keep_sampling_defaults(cli_dirs, capsys):
    """quantize, fuse and convert refuse to write over the model they read (even with
    --force), and pass its generation_config.json on."""
    import json

    from elm_mlx.training.lora import LoRAConfig, apply_lora, save_adapters

    tmp, weights = cli_dirs
    src = tmp / "float"
    sampling = {"temperature": 0.7, "top_p": 0.9}
    (src / "generation_config.json").write_text(json.dumps(sampling))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert cli.main(["quantize", "--model", str(src), "--out", str(src), "--force"]) == 1
    assert "would replace the input model" in capsys.readouterr().err
    model, _ = mio.load_model(src)
    apply_lora(model, LoRAConfig(rank=2))
    save_adapters(model, tmp / "adapters", LoRAConfig(rank=2))
    fuse = ["fuse", "--model", str(src), "--adapter-path", str(tmp / "adapters")]
    assert cli.main([*fuse, "--save-path", str(src), "--force"]) == 1
    assert "would replace the input model" in capsys.readouterr().err
    write_hf_checkpoint(tmp / "hf", mio.read_config(src), weights)
    convert = ["convert", "--hf-path", str(tmp / "hf"), "--tokenizer", str(src / "tokenizer.model")]
    assert cli.main([*convert, "--mlx-path", str(tmp / "hf"), "--force"]) == 1
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert cli.main(["quantize", "--model", str(src), "--out", str(tmp / "q")]) == 0
    assert cli.main([*fuse, "--save-path", str(tmp / "fused")]) == 0
    for out in ("q", "fused"):
        assert json.loads((tmp / out / "generation_config.json").read_text()) == sampling
    (tmp / "hf" / "generation_config.json").write_text(json.dumps(sampling))
    assert cli.main([*convert, "--mlx-path", str(tmp / "converted")]) == 0
    assert json.loads((tmp / "converted" / "generation_config.json").read_text()) == sampling


def test_quantize_the_shipped_model_with_no_group_size_picks_one_that_fits(tmp_path, capsys):
    """The nano model (model_dim 160) does not take the default group size 64: with no group
    size given, the largest that fits (32) is used and named in one line."""
    from elm_mlx.formats.modeldir import DEFAULT_MODEL

    assert cli.main(["quantize", "--model", str(DEFAULT_MODEL), "--out", str(tmp_path / "q")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "group size" in line]
    assert notes == [
        "group size 32: the default 64 does not divide every matrix of this model and 32 is "
        "the largest that does"
    ]
    assert mio.read_config(tmp_path / "q").quantization["group_size"] == 32
    argv = ["convert", "--hf-path", str(DEFAULT_MODEL), "--mlx-path", str(tmp_path / "c"), "-q"]
    assert cli.main(argv) == 0
    assert mio.read_config(tmp_path / "c").quantization["group_size"] == 32


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["quantize", "--model", "{nano}", "--out", "{out}", "--group-size", "64"], "--group-size"),
        (["convert", "--hf-path", "{nano}", "--mlx-path", "{out}", "-q", "--q-group-size", "64"],
         "--q-group-size"),
    ],
)  # fmt: skip
def test_a_group_size_the_user_asked_for_that_does_not_fit_names_the_commands_flag(
    tmp_path, capsys, argv, flag
):
    from elm_mlx.formats.modeldir import DEFAULT_MODEL

    argv = [a.format(nano=DEFAULT_MODEL, out=tmp_path / "out") for a in argv]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: group size 64 does not divide")
    assert err.endswith(f"; use group size 32 ({flag} 32)\n")
    assert not (tmp_path / "out").exists()


def test_convert_quantization_conflicts_name_converts_own_flags(tmp_path, capsys):
    from elm_mlx.formats.modeldir import DEFAULT_MODEL

    argv = ["convert", "--hf-path", str(DEFAULT_MODEL), "--mlx-path", str(tmp_path / "out"), "-q"]
    assert cli.main([*argv, "--q-bits", "8", "--q-recipe", "mixed-4-8"]) == 1
    err = capsys.readouterr().err
    assert err == "error: --q-bits conflicts with --q-recipe: the recipe sets the bits\n"
