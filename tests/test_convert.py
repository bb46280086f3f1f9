"""The converter: HF checkpoints (safetensors, shards, .bin) -> MLX model directories.

Every check compares two independent paths: the converted-and-loaded model against
the model built directly from the same random weights, our output under mlx-lm's
loader, mlx-lm's converter output under ours, .bin against .safetensors sources.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from elm_mlx import cli, load
from elm_mlx.formats.convert import convert
from elm_mlx.model.openelm import OpenELM
from elm_mlx.testing import random_weights, tiny_args, write_hf_checkpoint

VOCAB = 384  # the session tokenizer's size (byte fallback needs > 256 pieces)
IDS = mx.array([[1, 17, 3, 299, 42, 8, 61, 0, 383, 33]])
VARIANTS = [
    pytest.param(dict(num_gqa_groups=2, tied=True), id="gqa2-tied"),
    pytest.param(dict(num_gqa_groups=2, tied=False), id="gqa2-untied"),
    pytest.param(dict(num_gqa_groups=4, tied=True), id="gqa4-tied"),
    pytest.param(dict(num_gqa_groups=4, tied=False), id="gqa4-untied"),
]


def checkpoint(tmp_path: Path, sp_model_file=None, name="hf", seed=0, **kwargs):
    """(args, weights, dir) of a tiny HF checkpoint; with the tokenizer if given."""
    args = tiny_args(vocab_size=VOCAB, **kwargs)
    weights = random_weights(args, seed=seed)
    path = write_hf_checkpoint(tmp_path / name, args, weights)
    if sp_model_file is not None:
        (path / "tokenizer.model").write_bytes(Path(sp_model_file).read_bytes())
    return args, weights, path


def direct(args, weights) -> OpenELM:
    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return model


def stored(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory, as float32 numpy arrays."""
    out = {}
    for file in sorted(path.glob("model*.safetensors")):
        out.update({k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(file)).items()})
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = stored(a), stored(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def cli_convert(*argv) -> int:
    return cli.main(["convert", *map(str, argv)])


# ---- conversion gives the same model ---------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_convert_then_load_equals_direct_model(tmp_path, sp_model_file, variant):
    args, weights, src = checkpoint(tmp_path, sp_model_file, **variant)
    assert cli_convert("--hf-path", src, "--mlx-path", tmp_path / "out") == 0
    model, tokenizer = load(tmp_path / "out")
    assert tokenizer is not None and tokenizer.vocab_size == VOCAB
    np.testing.assert_array_equal(np.array(model(IDS)), np.array(direct(args, weights)(IDS)))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "openelm" and "auto_map" not in config
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_untied_output_drops_unused_classifier(tmp_path, sp_model_file):
    _, _, src = checkpoint(tmp_path, sp_model_file, tied=False)
    convert(src, tmp_path / "out")
    keys = set(stored(tmp_path / "out"))
    assert "lm_head.weight" in keys and "transformer.classifier.weight" not in keys


def test_sharded_source_converts_like_single_file(tmp_path, sp_model_file):
    args, weights, single = checkpoint(tmp_path, sp_model_file)
    sharded = write_hf_checkpoint(tmp_path / "sharded", args, weights, shards=3)
    assert len(list(sharded.glob("model-*.safetensors"))) == 3
    convert(single, tmp_path / "a")
    convert(sharded, tmp_path / "b", tokenizer=sp_model_file)
    assert_same_weights(tmp_path / "a", tmp_path / "b")


def test_sharded_output_loads_in_both_loaders(tmp_path, sp_model_file):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    args, weights, src = checkpoint(tmp_path, sp_model_file, tied=False)
    out = convert(src, tmp_path / "out", max_shard_bytes=100_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    ours, _ = load(out)
    theirs, _ = mlx_lm_load_model(out)
    expected = np.array(direct(args, weights)(IDS))
    np.testing.assert_array_equal(np.array(ours(IDS)), expected)
    np.testing.assert_array_equal(np.array(theirs(IDS)), expected)


def test_bin_and_safetensors_sources_convert_identically(tmp_path, sp_model_file):
    pytest.importorskip("torch", reason="the torch extra reads pytorch_model.bin")
    args, weights, st = checkpoint(tmp_path, sp_model_file, tied=False)
    bin_dir = write_hf_checkpoint(tmp_path / "bin", args, weights, fmt="bin")
    assert not list(bin_dir.glob("*.safetensors"))
    convert(st, tmp_path / "a")
    convert(bin_dir, tmp_path / "b", tokenizer=sp_model_file)
    assert_same_weights(tmp_path / "a", tmp_path / "b")


def test_bfloat16_bin_and_safetensors_sources_agree(tmp_path, sp_model_file):
    torch = pytest.importorskip("torch", reason="the torch extra reads pytorch_model.bin")
    args, weights, st = checkpoint(tmp_path, sp_model_file)
    bf16 = {k: mx.array(v).astype(mx.bfloat16) for k, v in weights.items()}
    mx.save_safetensors(str(st / "model.safetensors"), bf16, {"format": "pt"})
    bin_dir = write_hf_checkpoint(tmp_path / "bin", args, weights, fmt="bin")
    state = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in weights.items()}
    torch.save(state, bin_dir / "pytorch_model.bin")
    convert(st, tmp_path / "a")
    convert(bin_dir, tmp_path / "b", tokenizer=sp_model_file)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert mx.load(str(tmp_path / "b" / "model.safetensors"))["transformer.norm.weight"].dtype == (
        mx.bfloat16
    )
    assert_same_weights(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype_flag_casts_every_tensor(tmp_path, sp_model_file, dtype):
    _, weights, src = checkpoint(tmp_path, sp_model_file)
    assert cli_convert("--hf-path", src, "--mlx-path", tmp_path / "out", "--dtype", dtype) == 0
    out = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert {v.dtype for v in out.values()} == {getattr(mx, dtype)}
    key = "transformer.layers.1.ffn.proj_1.weight"
    expected = mx.array(weights[key]).astype(getattr(mx, dtype))
    np.testing.assert_array_equal(
        np.array(out[key].astype(mx.float32)), expected.astype(mx.float32)
    )
    record = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert record["dtype"] == dtype and record["source_dtypes"] == ["float32"]


def test_float16_warning_for_3b_sized_models(tmp_path, sp_model_file, monkeypatch):
    import elm_mlx.formats.convert as conv

    _, _, src = checkpoint(tmp_path, sp_model_file)
    monkeypatch.setattr(conv, "FLOAT16_MAX_PARAMS", 1000)
    lines = []
    convert(src, tmp_path / "out", dtype="float16", log=lines.append)
    assert any(line.startswith("warning: float16 overflows") for line in lines)
    with pytest.warns(UserWarning, match="float16 overflows"):
        convert(src, tmp_path / "quiet", dtype="float16")
    convert(src, tmp_path / "bf16", dtype="bfloat16", log=lines.append)
    assert sum(line.startswith("warning:") for line in lines) == 1


def test_provenance_records_inputs(tmp_path, sp_model_file):
    _, _, src = checkpoint(tmp_path, sp_model_file)
    convert(src, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "provenance.json").read_text())
    digest = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    assert record["inputs"]["model.safetensors"]["sha256"] == digest
    assert record["source"] == str(src.absolute()) and record["elm_mlx_version"]
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == Path(sp_model_file).read_bytes()


def test_tokenizer_flag_overrides_source_tokenizer(tmp_path, sp_model_file):
    _, _, src = checkpoint(tmp_path, sp_model_file)
    (src / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    assert cli_convert("--hf-path", src, "--mlx-path", tmp_path / "bad") == 1
    assert cli_convert(
        "--hf-path", src, "--mlx-path", tmp_path / "out", "--tokenizer", sp_model_file.parent
    ) == 0  # fmt: skip
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == Path(sp_model_file).read_bytes()


# ---- mlx-lm reads ours, we read mlx-lm's ------------------------------------------


def test_mlx_lm_load_opens_our_output(tmp_path, sp_model_file):
    from mlx_lm import load as mlx_lm_load

    args, weights, src = checkpoint(tmp_path, sp_model_file, num_gqa_groups=4, tied=False)
    convert(src, tmp_path / "out")
    theirs, tokenizer = mlx_lm_load(str(tmp_path / "out"))
    assert tokenizer is not None
    ours, _ = load(tmp_path / "out")
    np.testing.assert_array_equal(np.array(theirs(IDS)), np.array(ours(IDS)))


@pytest.fixture(scope="module")
def mlx_lm_dirs(tmp_path_factory, sp_model_file):
    """A tied tiny HF dir and mlx_lm.convert's float and 4-bit outputs of it."""
    from mlx_lm.convert import convert as mlx_lm_convert

    tmp = tmp_path_factory.mktemp("mlx_lm")
    args, weights, src = checkpoint(tmp, sp_model_file, num_gqa_groups=4, tied=True)
    mlx_lm_convert(str(src), str(tmp / "float"))
    mlx_lm_convert(str(src), str(tmp / "q4"), quantize=True, q_group_size=32, q_bits=4)
    return args, weights, tmp


def test_our_loader_opens_mlx_lm_convert_output(mlx_lm_dirs):
    args, weights, tmp = mlx_lm_dirs
    ours, _ = load(tmp / "float")
    np.testing.assert_array_equal(np.array(ours(IDS)), np.array(direct(args, weights)(IDS)))


def test_our_loader_opens_mlx_lm_quantized_output(mlx_lm_dirs):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    _, _, tmp = mlx_lm_dirs
    ours, _ = load(tmp / "q4")
    theirs, _ = mlx_lm_load_model(tmp / "q4")
    assert isinstance(ours.transformer.token_embeddings, nn.QuantizedEmbedding)
    np.testing.assert_array_equal(np.array(ours(IDS)), np.array(theirs(IDS)))


# ---- the quantization hook -------------------------------------------------------


def test_quantize_hook_streams_a_quantized_model(tmp_path, sp_model_file):
    from elm_mlx.model.config import ModelArgs
    from elm_mlx.quant.quantize import QuantizeSpec, quantize_model

    config = tiny_args(vocab_size=VOCAB).to_dict() | {"ffn_dim_divisor": 32}
    args = ModelArgs.from_dict(config)
    weights = random_weights(args, seed=5)
    src = write_hf_checkpoint(tmp_path / "hf", args, weights)
    spec = QuantizeSpec(bits=4, group_size=32, scales_dtype="float32")
    convert(src, tmp_path / "out", tokenizer=sp_model_file, quantize=spec)
    loaded, _ = load(tmp_path / "out")
    reference = direct(args, weights)
    quantize_model(reference, spec)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["bits"] == 4
    np.testing.assert_array_equal(np.array(loaded(IDS)), np.array(reference(IDS)))


# ---- bad input: one line, exit 1, nothing written -----------------------------------


def fails_cleanly(capsys, tmp_path: Path, argv: list, *needles: str) -> str:
    """Run the CLI; check exit 1, a one-line error containing `needles`, no output left."""
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli_convert(*argv, "--mlx-path", out) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    return err


def test_missing_path(tmp_path, capsys):
    fails_cleanly(capsys, tmp_path, ["--hf-path", tmp_path / "nope"], "nope", "not found")


def test_no_tokenizer_says_what_to_pass(tmp_path, capsys):
    _, _, src = checkpoint(tmp_path)
    fails_cleanly(capsys, tmp_path, ["--hf-path", src], "--tokenizer", "meta-llama/Llama-2-7b-hf")


def test_truncated_safetensors(tmp_path, sp_model_file, capsys):
    _, _, src = checkpoint(tmp_path, sp_model_file)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    fails_cleanly(capsys, tmp_path, ["--hf-path", src], "model.safetensors")


def test_missing_and_wrong_shape_keys_reported_together(tmp_path, sp_model_file, capsys):
    args, weights, _ = checkpoint(tmp_path, sp_model_file)
    del weights["transformer.layers.2.attn.k_norm.weight"]
    weights["transformer.layers.0.ffn.proj_2.weight"] = weights[
        "transformer.layers.0.ffn.proj_2.weight"
    ][:, :-1]
    weights["transformer.layers.1.extra.weight"] = weights["transformer.norm.weight"]
    src = write_hf_checkpoint(tmp_path / "bad", args, weights)
    fails_cleanly(
        capsys,
        tmp_path,
        ["--hf-path", src, "--tokenizer", sp_model_file],
        "1 missing: transformer.layers.2.attn.k_norm.weight",
        "1 unexpected: transformer.layers.1.extra.weight",
        "1 wrong shape: transformer.layers.0.ffn.proj_2.weight",
    )


def test_wrong_shape(tmp_path, sp_model_file, capsys):
    args, weights, _ = checkpoint(tmp_path, sp_model_file)
    config = args.to_dict() | {"model_dim": 48}
    src = write_hf_checkpoint(tmp_path / "bad", args, weights)
    (src / "config.json").write_text(json.dumps(config))
    fails_cleanly(capsys, tmp_path, ["--hf-path", src, "--tokenizer", sp_model_file], "wrong shape")


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda c: "{not json", "not valid JSON"),
        (lambda c: c | {"num_query_heads": c["num_query_heads"][:-1]}, "num_query_heads"),
        (lambda c: c | {"num_kv_heads": [3] * len(c["num_kv_heads"])}, "not a multiple"),
        (lambda c: {k: v for k, v in c.items() if k != "model_dim"}, "model_dim"),
        (lambda c: c | {"model_type": "llama"}, "'llama'"),
        (lambda c: c | {"ffn_with_glu": False}, "ffn_with_glu"),
    ],
    ids=["json", "list-length", "heads", "missing-field", "model-type", "unsupported"],
)
def test_bad_config(tmp_path, sp_model_file, capsys, edit, needle):
    _, _, src = checkpoint(tmp_path, sp_model_file)
    config = edit(json.loads((src / "config.json").read_text()))
    (src / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    fails_cleanly(capsys, tmp_path, ["--hf-path", src], needle)


def test_existing_output_needs_force(tmp_path, sp_model_file, capsys):
    args, weights, src = checkpoint(tmp_path, sp_model_file)
    other = tmp_path / "other"
    convert(src, other)
    before = (other / "model.safetensors").read_bytes()
    assert cli_convert("--hf-path", src, "--mlx-path", other, "--dtype", "float16") == 1
    assert "--force" in capsys.readouterr().err
    assert (other / "model.safetensors").read_bytes() == before
    assert cli_convert("--hf-path", src, "--mlx-path", other, "--dtype", "float16", "--force") == 0
    assert mx.load(str(other / "model.safetensors"))["transformer.norm.weight"].dtype == mx.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "other"]


def test_force_keeps_old_output_when_conversion_fails(tmp_path, sp_model_file, capsys):
    _, _, src = checkpoint(tmp_path, sp_model_file)
    convert(src, tmp_path / "out")
    (src / "model.safetensors").write_bytes(b"garbage")
    assert cli_convert("--hf-path", src, "--mlx-path", tmp_path / "out", "--force") == 1
    assert load(tmp_path / "out")[0] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]


def test_force_refuses_a_directory_that_is_not_a_model(tmp_path, sp_model_file, capsys):
    _, _, src = checkpoint(tmp_path, sp_model_file)
    keep = tmp_path / "home"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    assert cli_convert("--hf-path", src, "--mlx-path", keep, "--force") == 1
    assert "not a model directory" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "precious"


def test_bin_without_torch(tmp_path, sp_model_file, capsys, monkeypatch):
    args, weights, _ = checkpoint(tmp_path, sp_model_file)
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(args.to_dict()))
    (src / "pytorch_model.bin").write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    argv = ["--hf-path", src, "--tokenizer", sp_model_file]
    fails_cleanly(capsys, tmp_path, argv, "pip install 'elm-mlx[torch]'")


def test_corrupt_bin(tmp_path, sp_model_file, capsys):
    pytest.importorskip("torch", reason="the torch extra reads pytorch_model.bin")
    args, weights, _ = checkpoint(tmp_path, sp_model_file)
    src = write_hf_checkpoint(tmp_path / "bin", args, weights, fmt="bin")
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    fails_cleanly(capsys, tmp_path, ["--hf-path", src, "--tokenizer", sp_model_file], "cannot read")


def test_tokenizer_larger_than_vocab(tmp_path, sp_model_file, capsys):
    args = tiny_args(vocab_size=100)
    src = write_hf_checkpoint(tmp_path / "hf", args, random_weights(args))
    fails_cleanly(capsys, tmp_path, ["--hf-path", src, "--tokenizer", sp_model_file], "384 pieces")


@pytest.mark.parametrize("offline", ["1", None])
def test_hub_id_fails_fast_offline(tmp_path, capsys, monkeypatch, offline):
    """With HF_HUB_OFFLINE, and without it when the hub is unreachable (or the repo unknown)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    fails_cleanly(capsys, tmp_path, ["--hf-path", "elm-mlx-test/no-such-model"], "no-such-model")
    assert time.perf_counter() - start < 2.0


def test_python_m_elm_mlx_convert(tmp_path, sp_model_file):
    _, _, src = checkpoint(tmp_path, sp_model_file)
    argv = ["--hf-path", src, "--mlx-path", tmp_path / "out", "--dtype", "bfloat16"]
    result = subprocess.run(
        [sys.executable, "-m", "elm_mlx.convert", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "writing model.safetensors" in result.stderr
    assert (tmp_path / "out" / "provenance.json").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "elm_mlx.convert", *map(str, argv)], capture_output=True, text=True
    )
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1


def test_missing_tokenizer_is_reported_before_the_weights_download(tmp_path, monkeypatch, capsys):
    """A hub source with no tokenizer fails on its config alone: nothing large is fetched."""
    import huggingface_hub.constants

    cache = tmp_path / "cache"
    snapshot = cache / "models--apple--OpenELM-270M" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_text(json.dumps(tiny_args().to_dict()))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails_cleanly(capsys, tmp_path, ["--hf-path", "apple/OpenELM-270M"], "--tokenizer")
