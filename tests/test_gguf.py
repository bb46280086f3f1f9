"""GGUF export, read back with the gguf package's own reader (not our writer's code).

Tensor names and the tensor list come from `gguf.constants` for the openelm
architecture; expected values come from the checkpoint files read directly
(safetensors, config.json, the SentencePiece model), never from the exporter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from elm_mlx.formats import gguf as export  # noqa: E402
from elm_mlx.formats.modeldir import DEFAULT_MODEL, load  # noqa: E402
from elm_mlx.model.config import make_divisible  # noqa: E402
from elm_mlx.testing import random_weights, tiny_args, write_hf_checkpoint  # noqa: E402
from elm_mlx.training.finetune import load_fused  # noqa: E402

ARCH = gguf.MODEL_ARCH.OPENELM


def export_dir(src, out, *, adapter_path=None, log=None, **kw) -> Path:
    """A model directory exported as `elm-mlx export-gguf` does: adapters fused, de-quantized."""
    model, tokenizer = load_fused(src, adapter_path, de_quantize=True, log=log)
    return export.export_gguf(model, tokenizer, out, name=Path(src).name, log=log, **kw)


def read(file: Path):
    reader = gguf.GGUFReader(file)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return reader, fields


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """GGUF name -> ggml shape (fastest dimension first), from config.json alone."""
    n, d, hd = config["num_transformer_layers"], config["model_dim"], config["head_dim"]
    names = gguf.TENSOR_NAMES
    shapes = {}
    for kind in gguf.MODEL_TENSORS[ARCH]:
        if "{bid}" not in names[kind]:
            rows = {gguf.MODEL_TENSOR.TOKEN_EMBD: (d, config["vocab_size"])}.get(kind, (d,))
            shapes[names[kind] + ".weight"] = rows
            continue
        for i in range(n):
            q, kv = config["num_query_heads"][i], config["num_kv_heads"][i]
            ffn = make_divisible(config["ffn_multipliers"][i] * d, config["ffn_dim_divisor"])
            shape = {
                gguf.MODEL_TENSOR.ATTN_NORM: (d,),
                gguf.MODEL_TENSOR.ATTN_QKV: (d, (q + 2 * kv) * hd),
                gguf.MODEL_TENSOR.ATTN_Q_NORM: (hd,),
                gguf.MODEL_TENSOR.ATTN_K_NORM: (hd,),
                gguf.MODEL_TENSOR.ATTN_OUT: (q * hd, d),
                gguf.MODEL_TENSOR.FFN_NORM: (d,),
                gguf.MODEL_TENSOR.FFN_GATE: (d, ffn),
                gguf.MODEL_TENSOR.FFN_UP: (d, ffn),
                gguf.MODEL_TENSOR.FFN_DOWN: (ffn, d),
            }[kind]
            shapes[names[kind].format(bid=i) + ".weight"] = shape
    return shapes


def source_tensors(path: Path, config: dict) -> dict[str, np.ndarray]:
    """GGUF name -> the float32 values it must hold, read straight from model.safetensors."""
    w = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(path)).items()}
    out = {"token_embd.weight": w["transformer.token_embeddings.weight"],
           "output_norm.weight": w["transformer.norm.weight"]}  # fmt: skip
    d = config["model_dim"]
    for i in range(config["num_transformer_layers"]):
        p = f"transformer.layers.{i}."
        ffn = make_divisible(config["ffn_multipliers"][i] * d, config["ffn_dim_divisor"])
        b = f"blk.{i}."
        out[b + "attn_norm.weight"] = w[p + "attn_norm.weight"]
        out[b + "attn_qkv.weight"] = w[p + "attn.qkv_proj.weight"]
        out[b + "attn_q_norm.weight"] = w[p + "attn.q_norm.weight"]
        out[b + "attn_k_norm.weight"] = w[p + "attn.k_norm.weight"]
        out[b + "attn_output.weight"] = w[p + "attn.out_proj.weight"]
        out[b + "ffn_norm.weight"] = w[p + "ffn_norm.weight"]
        out[b + "ffn_gate.weight"] = w[p + "ffn.proj_1.weight"][:ffn]
        out[b + "ffn_up.weight"] = w[p + "ffn.proj_1.weight"][ffn:]
        out[b + "ffn_down.weight"] = w[p + "ffn.proj_2.weight"]
    return out


def values(tensor) -> np.ndarray:
    """A reader tensor as float32 in numpy's (rows, cols) order."""
    data = np.asarray(tensor.data)
    t = gguf.GGMLQuantizationType
    if tensor.tensor_type in (t.F32, t.F16):
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, tensor.tensor_type).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, sp_model_file) -> Path:
    """A tiny tied checkpoint in HF layout with the session's SentencePiece tokenizer."""
    args = tiny_args(vocab_size=400)  # more rows than the 384 pieces: padded like llama.cpp
    path = write_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "model", args,
                               random_weights(args, 3))  # fmt: skip
    shutil.copyfile(sp_model_file, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def nano_f32(tmp_path_factory) -> Path:
    return export_dir(DEFAULT_MODEL, tmp_path_factory.mktemp("g") / "nano.gguf",
                      type_name="f32")  # fmt: skip


@pytest.mark.parametrize("which", ["nano", "tiny"])
def test_every_openelm_tensor_with_its_shape_and_values(which, nano_f32, tiny_dir, tmp_path):
    src = DEFAULT_MODEL if which == "nano" else tiny_dir
    file = nano_f32 if which == "nano" else export_dir(src, tmp_path / "t.gguf",
                                                       type_name="f32")  # fmt: skip
    config = json.loads((src / "config.json").read_text())
    reader, _ = read(file)
    found = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    assert found == expected_tensors(config)  # every listed tensor, nothing else (tied head)
    want = source_tensors(src / "model.safetensors", config)
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(values(t), want[t.name], err_msg=t.name)


def test_metadata_keys_and_values(nano_f32):
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    _, f = read(nano_f32)
    d = config["model_dim"]
    ffn = [make_divisible(m * d, config["ffn_dim_divisor"]) for m in config["ffn_multipliers"]]
    k = gguf.Keys.LLM
    a = gguf.Keys.Attention
    arch = "openelm"
    assert f[gguf.Keys.General.ARCHITECTURE] == arch
    assert f[k.BLOCK_COUNT.format(arch=arch)] == config["num_transformer_layers"]
    assert f[k.CONTEXT_LENGTH.format(arch=arch)] == config["max_context_length"]
    assert f[k.EMBEDDING_LENGTH.format(arch=arch)] == d
    assert f[k.FEED_FORWARD_LENGTH.format(arch=arch)] == ffn
    assert f[a.HEAD_COUNT.format(arch=arch)] == config["num_query_heads"]
    assert f[a.HEAD_COUNT_KV.format(arch=arch)] == config["num_kv_heads"]
    assert f[a.KEY_LENGTH.format(arch=arch)] == config["head_dim"]
    assert f[a.VALUE_LENGTH.format(arch=arch)] == config["head_dim"]
    assert f[gguf.Keys.Rope.DIMENSION_COUNT.format(arch=arch)] == config["head_dim"]
    assert f[gguf.Keys.Rope.FREQ_BASE.format(arch=arch)] == config["rope_freq_constant"]
    assert f[a.LAYERNORM_RMS_EPS.format(arch=arch)] == pytest.approx(config["rms_norm_eps"])
    assert f[gguf.Keys.General.FILE_TYPE] == gguf.LlamaFileType.ALL_F32
    assert gguf.Keys.Tokenizer.CHAT_TEMPLATE not in f  # a base model


def test_vocabulary_matches_sentencepiece(nano_f32, tiny_dir, tmp_path):
    import sentencepiece as spm

    for src, file in ((DEFAULT_MODEL, nano_f32),
                      (tiny_dir, export_dir(tiny_dir, tmp_path / "t.gguf"))):  # fmt: skip
        sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
        rows = json.loads((src / "config.json").read_text())["vocab_size"]
        _, f = read(file)
        tk = gguf.Keys.Tokenizer
        n = sp.get_piece_size()
        tokens, scores, types = f[tk.LIST], f[tk.SCORES], f[tk.TOKEN_TYPE]
        assert len(tokens) == len(scores) == len(types) == rows
        assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
        np.testing.assert_allclose(scores[:n], [sp.get_score(i) for i in range(n)], rtol=1e-6)
        kinds = gguf.TokenType
        for i in range(n):
            want = (kinds.UNKNOWN if sp.is_unknown(i) else kinds.CONTROL if sp.is_control(i)
                    else kinds.BYTE if sp.is_byte(i) else kinds.NORMAL)  # fmt: skip
            assert types[i] == want, i
        assert tokens[n:] == [f"[PAD{i}]" for i in range(n, rows)]
        assert all(t == kinds.UNUSED for t in types[n:])
        assert f[tk.BOS_ID] == sp.bos_id() == 1 and f[tk.EOS_ID] == sp.eos_id() == 2
        assert f[tk.UNK_ID] == sp.unk_id()
        assert f[tk.ADD_BOS] is True and f[tk.ADD_EOS] is False
        assert f[tk.MODEL] == "llama"
        assert tokens[sp.bos_id()] == "<s>" and sum(t == kinds.BYTE for t in types) == 256


# --type -> largest error of one value against its row's largest magnitude. q4_1/q5_1 spread
# (max - min) over 15/31 steps: half a step. q4_0/q5_0 map the largest magnitude to -8/-16
# steps and clamp the other end at +7/+15: up to one step (1/8, 1/16) there.
TOLERANCES = {"f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2, "q5_1": 0.035, "q5_0": 0.065,
              "q4_1": 0.07, "q4_0": 0.13}  # fmt: skip


@pytest.mark.parametrize("type_name", list(TOLERANCES))
def test_types_and_values(tiny_dir, tmp_path, type_name):
    config = json.loads((tiny_dir / "config.json").read_text())
    want = source_tensors(tiny_dir / "model.safetensors", config)
    t = gguf.GGMLQuantizationType
    qtype = t[type_name.upper()]
    reader, f = read(export_dir(tiny_dir, tmp_path / f"{type_name}.gguf",
                                type_name=type_name))  # fmt: skip
    assert f[gguf.Keys.General.FILE_TYPE] == gguf.LlamaFileType[export.FILE_TYPES[type_name]]
    seen = set()
    for tensor in reader.tensors:
        ref = want[tensor.name]
        if ref.ndim == 1:
            assert tensor.tensor_type == t.F32  # norms stay float32, as llama.cpp wants
        elif ref.shape[-1] % 32 and type_name.startswith("q"):
            assert tensor.tensor_type == t.F16  # rows that fill no whole 32-value block
        else:
            assert tensor.tensor_type == qtype
        seen.add(tensor.tensor_type)
        got = values(tensor)
        scale = np.abs(ref).max(axis=-1, keepdims=True)
        err = np.abs(got - ref)
        assert np.all(err <= TOLERANCES[type_name] * scale), (tensor.name, (err / scale).max())
    assert qtype in seen


def test_quantized_model_is_dequantized_first(tmp_path):
    import mlx.nn as nn

    from elm_mlx.formats.modeldir import load_model, save_model

    model, args = load_model(DEFAULT_MODEL)
    nn.quantize(model, group_size=32, bits=8)
    args.quantization = {"group_size": 32, "bits": 8}
    src = save_model(tmp_path / "q8", model, args, tokenizer=DEFAULT_MODEL / "tokenizer.model")
    lines = []
    reader, _ = read(export_dir(src, tmp_path / "q.gguf", type_name="f32",
                                log=lines.append))  # fmt: skip
    assert any("de-quantizing" in line for line in lines)
    with pytest.raises(ValueError, match="quantized or adapter layers"):
        export.export_gguf(*load(src), tmp_path / "raw.gguf", name="q8")  # not de-quantized
    stored = mx.load(str(src / "model.safetensors"))
    p = "transformer.layers.2.attn.qkv_proj."
    want = mx.dequantize(stored[p + "weight"], stored[p + "scales"], stored[p + "biases"], 32, 8)
    got = next(t for t in reader.tensors if t.name == "blk.2.attn_qkv.weight")
    np.testing.assert_allclose(values(got), np.array(want.astype(mx.float32)), rtol=1e-6)


def test_adapters_are_fused(tmp_path):
    from elm_mlx.testing import random_adapters
    from elm_mlx.training.lora import LoRAConfig

    config = LoRAConfig(rank=4, scale=2.0, num_layers=2)
    random_adapters(DEFAULT_MODEL, tmp_path / "adapters", config, std=0.01, seed=5)
    file = export_dir(DEFAULT_MODEL, tmp_path / "a.gguf", type_name="f32",
                      adapter_path=tmp_path / "adapters")  # fmt: skip
    reader, _ = read(file)
    ad = mx.load(str(tmp_path / "adapters" / "adapters.safetensors"))
    base = mx.load(str(DEFAULT_MODEL / "model.safetensors"))
    p = "transformer.layers.5.attn.qkv_proj."
    delta = 2.0 * (ad[p + "lora_b"].T @ ad[p + "lora_a"].T)
    want = np.array(base[p + "weight"] + delta)
    got = next(t for t in reader.tensors if t.name == "blk.5.attn_qkv.weight")
    np.testing.assert_allclose(values(got), want, rtol=1e-5, atol=1e-6)
    assert np.abs(delta).max() > 1e-4
    untouched = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    first = base["transformer.layers.0.attn.qkv_proj.weight"]
    np.testing.assert_array_equal(values(untouched), np.array(first))


def test_chat_template_renders_like_our_tokenizer(tmp_path):
    jinja2 = pytest.importorskip("jinja2")
    from elm_mlx.formats.tokenizer import Tokenizer

    _, f = read(export_dir(DEFAULT_MODEL, tmp_path / "i.gguf", chat_template=True))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = jinja2.Template(f[gguf.Keys.Tokenizer.CHAT_TEMPLATE]).render(
        messages=messages, add_generation_prompt=True, eos_token="</s>"
    )
    assert rendered == Tokenizer(DEFAULT_MODEL / "tokenizer.model").apply_chat_template(messages)


def test_untied_head_and_bad_type_are_refused(tmp_path, model_dir):
    with pytest.raises(ValueError, match="untied output head"):
        export_dir(model_dir, tmp_path / "u.gguf")
    with pytest.raises(ValueError, match="q4_k"):
        export_dir(DEFAULT_MODEL, tmp_path / "u.gguf", type_name="q4_k")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial*"))


def test_written_atomically(tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        export_dir(DEFAULT_MODEL, out)
    real = export.encode
    calls = []

    def failing(data, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("No space left on device")
        return real(data, qtype)

    monkeypatch.setattr(export, "encode", failing)
    with pytest.raises(OSError, match="No space"):
        export_dir(DEFAULT_MODEL, out, force=True)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no partial file left
    monkeypatch.setattr(export, "encode", real)
    export_dir(DEFAULT_MODEL, out, force=True)
    assert gguf.GGUFReader(out).tensors


def test_cli(tmp_path, model_dir, capsys):
    from elm_mlx import cli

    out = tmp_path / "nano-q8_0.gguf"
    assert cli.main(["export-gguf", "--out", str(out), "--type", "q8_0"]) == 0
    assert read(out)[1][gguf.Keys.General.FILE_TYPE] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert "wrote" in capsys.readouterr().err
    assert cli.main(["export-gguf", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip().endswith("already exists; pass --force to replace it")
    assert cli.main(["export-gguf", "--model", str(model_dir), "--out", str(tmp_path / "u")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "untied" in err[0]
    instruct = tmp_path / "OpenELM-nano-Instruct"
    shutil.copytree(DEFAULT_MODEL, instruct)
    assert cli.main(["export-gguf", "--model", str(instruct), "--out", str(out), "--force"]) == 0
    assert read(out)[1][gguf.Keys.Tokenizer.CHAT_TEMPLATE] == export.CHAT_TEMPLATE


def test_a_killed_exports_leftover_is_removed_and_said(tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its id names no process now
    leftover = tmp_path / f".m.gguf.partial-{dead.pid}-abcd1234.gguf"
    leftover.write_bytes(b"half a file")
    lines = []
    export_dir(DEFAULT_MODEL, tmp_path / "m.gguf", type_name="f32", log=lines.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert any(line.startswith("removed 1 unfinished output(s)") for line in lines), lines
