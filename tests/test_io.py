"""Model directories: save/load round trips, strict weights, quantized dirs, hub resolution."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from elm_mlx import load
from elm_mlx.formats import hub
from elm_mlx.formats import modeldir as mio
from elm_mlx.model.config import ConfigError, ModelArgs
from elm_mlx.model.openelm import OpenELM
from elm_mlx.testing import random_weights, tiny_args, write_hf_checkpoint

IDS = mx.array([[1, 5, 17, 3, 99, 42, 8, 61, 127]])


def model_of(args, seed=0) -> OpenELM:
    model = OpenELM(args)
    weights = random_weights(args, seed=seed)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return model


def same_logits(a: nn.Module, b: nn.Module) -> None:
    np.testing.assert_array_equal(np.array(a(IDS)), np.array(b(IDS)))


def quantizable_args(**kwargs) -> ModelArgs:
    """tiny_args whose every matrix has an input width divisible by 32."""
    return ModelArgs.from_dict(tiny_args(**kwargs).to_dict() | {"ffn_dim_divisor": 32})


# ---- round trips -----------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip(tmp_path, sp_model_file, tied):
    args = tiny_args(tied=tied)
    model = model_of(args)
    mio.save_model(
        tmp_path / "m", model, args, tokenizer=sp_model_file, extra_files={"note.json": {"a": 1}}
    )
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["config.json", "model.safetensors", "note.json", "tokenizer.model"]
    loaded, tokenizer = load(tmp_path / "m")
    assert tokenizer.vocab_size == 384
    same_logits(loaded, model)
    ours = dict(tree_flatten(loaded.parameters()))
    for k, v in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(ours[k]), np.array(v), err_msg=k)


def test_sharded_save_from_weights(tmp_path):
    args = tiny_args(tied=False)
    model = model_of(args)
    weights = dict(tree_flatten(model.parameters()))
    mio.save_model(tmp_path / "m", weights, args, max_shard_bytes=50_000)
    index = json.loads((tmp_path / "m" / mio.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(weights)
    assert len(set(index["weight_map"].values())) > 2
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in weights.values())
    loaded, tokenizer = load(tmp_path / "m")
    assert tokenizer is None
    same_logits(loaded, model)


def test_plan_shards():
    assert mio.plan_shards([4, 4, 4, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert mio.plan_shards([1, 2], 100) == [[0, 1]]


def test_hf_checkpoint_dir_loads_directly(tmp_path):
    args = tiny_args(tied=False)
    weights = random_weights(args, seed=2)
    src = write_hf_checkpoint(tmp_path / "hf", args, weights)  # carries the unused classifier
    loaded, _ = load(src)
    same_logits(loaded, model_of(args, seed=2))


def test_load_dtype_and_lazy(tmp_path):
    args = tiny_args()
    mio.save_model(tmp_path / "m", model_of(args), args)
    model, _ = mio.load_model(tmp_path / "m", dtype="bfloat16", lazy=True)
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.bfloat16}
    assert model(IDS).shape == (1, IDS.shape[1], args.vocab_size)
    with pytest.raises(ValueError, match="unsupported dtype 'float8'"):
        mio.load_model(tmp_path / "m", dtype="float8")


def test_missing_tokenizer_is_explained_when_needed(tmp_path):
    args = tiny_args()
    mio.save_model(tmp_path / "m", model_of(args), args)
    _, tokenizer = load(tmp_path / "m")
    assert tokenizer is None
    with pytest.raises(mio.TokenizerMissingError, match="--tokenizer PATH\\|HUB_ID"):
        mio.require_tokenizer(tokenizer, tmp_path / "m")


# ---- strict weights ----------------------------------------------------------------


def test_every_mismatch_reported_at_once(tmp_path):
    args = tiny_args()
    weights = {k: mx.array(v) for k, v in random_weights(args).items()}
    weights.pop("transformer.layers.1.attn.q_norm.weight")
    weights.pop("transformer.layers.3.ffn_norm.weight")
    weights["transformer.layers.0.attn.out_proj.weight"] = mx.zeros((3, 3))
    weights["lm_head.weight"] = mx.zeros((args.vocab_size, args.model_dim))  # tied: unexpected
    mio.save_model(tmp_path / "m", weights, args)
    with pytest.raises(mio.WeightsError) as e:
        mio.load_model(tmp_path / "m")
    message = str(e.value)
    assert "\n" not in message
    assert "2 missing: transformer.layers.1.attn.q_norm.weight" in message
    assert "1 unexpected: lm_head.weight" in message
    assert "1 wrong shape: transformer.layers.0.attn.out_proj.weight (3, 3)" in message


@pytest.mark.parametrize(
    "setup, error, needle",
    [
        (lambda p: None, FileNotFoundError, "is not a directory"),
        (lambda p: p.mkdir(), FileNotFoundError, "config.json not found"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("[1]")), ConfigError, "JSON object"),
    ],
    ids=["missing-dir", "no-config", "config-not-object"],
)
def test_bad_directories(tmp_path, setup, error, needle):
    setup(tmp_path / "m")
    with pytest.raises(error, match=needle):
        mio.load_model(tmp_path / "m")


def test_bin_only_dir_says_convert_first(tmp_path):
    args = tiny_args()
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(args.to_dict()))
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="python -m elm_mlx.convert"):
        mio.load_model(path)


def test_index_naming_a_missing_shard(tmp_path):
    args = tiny_args()
    mio.save_model(tmp_path / "m", model_of(args), args, max_shard_bytes=50_000)
    next((tmp_path / "m").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="missing shard files: model-00002"):
        mio.load_model(tmp_path / "m")


# ---- quantized directories ------------------------------------------------------------


def quantize(model: OpenELM, predicate=None) -> None:
    nn.quantize(model, group_size=32, bits=4, class_predicate=predicate)


def test_quantized_round_trip_with_quantized_embeddings(tmp_path):
    args = quantizable_args()
    model = model_of(args)
    quantize(model)
    args.quantization = {"group_size": 32, "bits": 4, "mode": "affine"}
    mio.save_model(tmp_path / "q", model, args)
    loaded, _ = load(tmp_path / "q")
    assert isinstance(loaded.transformer.token_embeddings, nn.QuantizedEmbedding)
    assert isinstance(loaded.layers[2].ffn.proj_2, nn.QuantizedLinear)
    same_logits(loaded, model)


def test_per_layer_overrides_and_float_layers(tmp_path):
    args = quantizable_args(tied=False)
    model = model_of(args)
    special = {
        "transformer.layers.0.attn.qkv_proj": {"group_size": 64, "bits": 8},
        "lm_head": False,
    }

    def predicate(path, module):
        return special.get(path, hasattr(module, "to_quantized"))

    quantize(model, predicate)
    args.quantization = {"group_size": 32, "bits": 4, **special}
    mio.save_model(tmp_path / "q", model, args)
    loaded, _ = load(tmp_path / "q")
    assert loaded.layers[0].attn.qkv_proj.bits == 8
    assert isinstance(loaded.lm_head, nn.Linear)
    same_logits(loaded, model)


def test_unrecorded_layer_params_are_read_off_the_shapes(tmp_path):
    args = quantizable_args()
    model = model_of(args)

    def predicate(path, module):
        if path.endswith("qkv_proj") or path.endswith("token_embeddings"):
            return {"group_size": 64, "bits": 8}
        if path.endswith("proj_2"):
            return {"group_size": 32, "bits": 2}
        return hasattr(module, "to_quantized")

    quantize(model, predicate)
    args.quantization = {"group_size": 32, "bits": 4}  # per-layer entries left out
    mio.save_model(tmp_path / "q", model, args)
    loaded, _ = load(tmp_path / "q")
    qkv, proj_2 = loaded.layers[1].attn.qkv_proj, loaded.layers[1].ffn.proj_2
    assert (qkv.bits, qkv.group_size, proj_2.bits) == (8, 64, 2)
    assert loaded.layers[1].ffn.proj_1.bits == 4
    same_logits(loaded, model)


# ---- hub resolution -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("apple/OpenELM-270M", True),
        ("mlx-community/OpenELM-270M-Instruct-4bit", True),
        ("./apple/OpenELM-270M", False),
        ("/models/openelm", False),
        ("out", False),
        ("a/b/c", False),
        ("../x", False),
    ],
)
def test_is_repo_id(name, expected):
    assert hub.is_repo_id(name) is expected


def fake_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A huggingface-hub cache entry for repo_id at a made-up commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_cached_hub_id_loads_offline(tmp_path, offline_cache):
    args = tiny_args()
    model = model_of(args)
    saved = mio.save_model(tmp_path / "m", model, args)
    fake_cache(offline_cache, "someone/tiny-elm", {p.name: p.read_bytes() for p in saved.iterdir()})
    start = time.perf_counter()
    loaded, _ = load("someone/tiny-elm")
    assert time.perf_counter() - start < 2.0
    same_logits(loaded, model)


def test_incomplete_cache_entry_is_not_used(offline_cache):
    fake_cache(offline_cache, "someone/only-config", {"config.json": b"{}"})
    with pytest.raises(hub.HubError, match="someone/only-config.*HF_HUB_OFFLINE"):
        hub.resolve("someone/only-config")


def test_offline_hub_id_fails_fast(offline_cache):
    start = time.perf_counter()
    with pytest.raises(hub.HubError, match="apple/OpenELM-270M"):
        load("apple/OpenELM-270M")
    assert time.perf_counter() - start < 2.0


def test_local_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        hub.resolve(tmp_path / "missing")
