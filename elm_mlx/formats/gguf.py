"""Export a model directory as a GGUF file that llama.cpp runs (architecture `openelm`).

The file holds what llama.cpp's own HF-to-GGUF converter writes for OpenELM: per-layer
arrays of head counts, KV head counts and FFN widths, the context length, RoPE base,
RMSNorm epsilon, key/value lengths; `proj_1` split into `ffn_gate` and `ffn_up`; no
output tensor, since llama.cpp reads the head from `token_embd` (tied). The tokenizer is
the SentencePiece model itself: pieces, scores, token types, special ids and add-BOS.

The model comes in loaded, float, with any adapters fused (the CLI composes `load`,
`load_adapters` and `fuse_lora(de_quantize=True)`: `training.finetune.load_fused`); the
file is written tensor by tensor into a temporary sibling and renamed into place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..model.config import ModelArgs
from . import files
from .convert import FLOAT16_MAX_PARAMS

ARCH = "openelm"
# --type -> (file type written in general.file_type, type of the 2-D weight matrices)
FILE_TYPES = {
    "f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
    "q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0",
}  # fmt: skip
MATRIX_TYPES = {name: name.upper() for name in FILE_TYPES}
# The Zephyr-style template the OpenELM Instruct models were tuned with (as
# Tokenizer.apply_chat_template renders it), in the Jinja form llama.cpp front-ends read.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
GGUF_HINT = "writing GGUF needs the gguf package: pip install 'elm-mlx[gguf]'"

Log = Callable[[str], None]


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(GGUF_HINT) from None
    return gguf


@dataclass
class Planned:
    """One GGUF tensor: its name, shape (rows, cols), stored type and how to produce it."""

    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]


# ---- names and types ----------------------------------------------------------------


def tensor_name(kind: str, layer: int | None = None) -> str:
    """The GGUF name of a MODEL_TENSOR kind (e.g. 'FFN_GATE', 3) -> 'blk.3.ffn_gate.weight'."""
    g = _gguf()
    base = g.TENSOR_NAMES[g.MODEL_TENSOR[kind]]
    return (base.format(bid=layer) if layer is not None else base) + ".weight"


# HF key suffix (inside transformer.layers.{i}.) -> MODEL_TENSOR kind
_LAYER_KINDS = {
    "attn_norm.weight": "ATTN_NORM",
    "attn.qkv_proj.weight": "ATTN_QKV",
    "attn.q_norm.weight": "ATTN_Q_NORM",
    "attn.k_norm.weight": "ATTN_K_NORM",
    "attn.out_proj.weight": "ATTN_OUT",
    "ffn_norm.weight": "FFN_NORM",
    "ffn.proj_2.weight": "FFN_DOWN",
}


def stored_type(shape: tuple[int, ...], type_name: str):
    """The type a tensor is stored in, by llama.cpp's converter's rules: 1-D tensors (norms)
    in F32; matrices in the requested type, F16 when a row does not fill whole blocks."""
    g = _gguf()
    t = g.GGMLQuantizationType
    if len(shape) <= 1:
        return t.F32
    qtype = t[MATRIX_TYPES[type_name]]
    block = g.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else t.F16


def encode(data: np.ndarray, qtype) -> np.ndarray:
    """`data` (float32) in the stored type: a float array, or the raw bytes of quantized blocks."""
    g = _gguf()
    t = g.GGMLQuantizationType
    if qtype == t.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == t.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return g.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def nbytes(shape: tuple[int, ...], qtype) -> int:
    block, size = _gguf().GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * shape[-1] // block * size


# ---- the plan -------------------------------------------------------------------------


def plan_tensors(args: ModelArgs, weights: dict[str, mx.array], type_name: str) -> list[Planned]:
    """Every GGUF tensor in llama.cpp's order, each produced from `weights` when written."""

    def take(key: str, rows: slice = slice(None)) -> Callable[[], np.ndarray]:
        return lambda: np.array(weights[key][rows].astype(mx.float32))

    def add(name: str, shape: tuple[int, ...], produce) -> None:
        plan.append(Planned(name, tuple(shape), stored_type(shape, type_name), produce))

    plan: list[Planned] = []
    embed = "transformer.token_embeddings.weight"
    add(tensor_name("TOKEN_EMBD"), weights[embed].shape, take(embed))
    for i in range(args.num_transformer_layers):
        prefix = f"transformer.layers.{i}."
        ffn = args.ffn_dim(i)
        for suffix, kind in _LAYER_KINDS.items():
            key = prefix + suffix
            if kind == "FFN_DOWN":  # after gate and up, as llama.cpp's converter orders them
                proj_1 = prefix + "ffn.proj_1.weight"
                add(tensor_name("FFN_GATE", i), (ffn, args.model_dim), take(proj_1, slice(0, ffn)))
                add(tensor_name("FFN_UP", i), (ffn, args.model_dim), take(proj_1, slice(ffn, None)))
            if key in weights:
                add(tensor_name(kind, i), weights[key].shape, take(key))
    add(tensor_name("OUTPUT_NORM"), weights["transformer.norm.weight"].shape,
        take("transformer.norm.weight"))  # fmt: skip
    return plan


# ---- metadata -----------------------------------------------------------------------


def add_model_metadata(writer, args: ModelArgs, type_name: str, name: str) -> None:
    """The hyperparameters llama.cpp reads for `openelm`."""
    g = _gguf()
    writer.add_name(name)
    writer.add_block_count(args.num_transformer_layers)
    writer.add_context_length(args.max_context_length)
    writer.add_embedding_length(args.model_dim)
    writer.add_feed_forward_length([args.ffn_dim(i) for i in range(args.num_transformer_layers)])
    writer.add_head_count(list(args.num_query_heads))
    writer.add_head_count_kv(list(args.num_kv_heads))
    writer.add_rope_freq_base(float(args.rope_freq_constant))
    writer.add_layer_norm_rms_eps(float(args.rms_norm_eps))
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_file_type(g.LlamaFileType[FILE_TYPES[type_name]])
    writer.add_quantization_version(g.GGML_QUANT_VERSION)


def sentencepiece_vocab(tokenizer_file: Path, vocab_size: int):
    """(processor, pieces, scores, token types, normalizer spec), padded to the model's
    `vocab_size` rows as llama.cpp's converter pads them ([PADi], unused)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    g = _gguf()
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    if sp.vocab_size() > vocab_size:
        raise ValueError(
            f"{tokenizer_file} has {sp.vocab_size()} pieces but the model only {vocab_size} rows"
        )
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [g.TokenType.UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        tokens[i] = sp.id_to_piece(i).encode("utf-8")
        scores[i] = sp.get_score(i)
        types[i] = _token_type(sp, i, g.TokenType)
    proto = pb.ModelProto()
    proto.ParseFromString(Path(tokenizer_file).read_bytes())
    return sp, tokens, scores, types, proto.normalizer_spec


def _token_type(sp, i: int, kinds):
    if sp.is_unknown(i):
        return kinds.UNKNOWN
    if sp.is_control(i):
        return kinds.CONTROL
    if sp.is_unused(i):
        return kinds.UNUSED
    if sp.is_byte(i):
        return kinds.BYTE
    return kinds.NORMAL


def add_tokenizer_metadata(
    writer, tokenizer_file: Path, vocab_size: int, *, chat_template: bool, log: Log | None
) -> None:
    """The SentencePiece vocabulary, special ids, add-BOS/space-prefix, chat template."""
    sp, tokens, scores, types, spec = sentencepiece_vocab(tokenizer_file, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for kind, token_id in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()),
                           ("pad", sp.pad_id())):  # fmt: skip
        if token_id >= 0:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(bool(spec.add_dummy_prefix))
    if log and (spec.remove_extra_whitespaces or spec.name not in ("identity", "")):
        log(
            f"warning: {tokenizer_file} normalizes text ({spec.name or 'custom rules'}"
            f"{', collapses spaces' if spec.remove_extra_whitespaces else ''}); llama.cpp does "
            "not, so its tokenization can differ on such text"
        )
    if chat_template:
        writer.add_chat_template(CHAT_TEMPLATE)


# ---- export ---------------------------------------------------------------------------


def check_exportable(args: ModelArgs, weights: dict[str, mx.array], name: str) -> None:
    if not args.share_input_output_layers:
        raise ValueError(
            f"{name} has an untied output head (lm_head); llama.cpp's openelm reads the head "
            "from the token embeddings, so it cannot run this model"
        )
    if not args.normalize_qk_projections:
        raise ValueError(f"{name} has no q_norm/k_norm; llama.cpp's openelm requires them")
    layered = next((k for k in weights if k.endswith((".scales", ".lora_a"))), None)
    if args.quantization or layered:
        raise ValueError(
            f"`model` ({name}) has quantized or adapter layers ({layered or 'quantization'}); "
            "fuse and de-quantize it first: fuse_lora(model, de_quantize=True)"
        )


def write_gguf(file: Path, plan: list[Planned], add_metadata: Callable) -> None:
    """Header, metadata and tensor infos first; then each tensor produced, encoded, written."""
    g = _gguf()
    writer = g.GGUFWriter(file, ARCH)
    add_metadata(writer)
    for t in plan:
        # the writer takes numpy's row-major shape and reverses it into ggml's order
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.shape, t.qtype),
                               raw_dtype=t.qtype)  # fmt: skip
    writer.write_header_to_file(file)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in plan:
        data = encode(t.produce(), t.qtype)
        writer.write_tensor_data(data)
    writer.close()


def export_gguf(
    model: nn.Module,
    tokenizer,
    out: str | Path,
    *,
    name: str,
    type_name: str = "f16",
    chat_template: bool = False,
    force: bool = False,
    log: Log | None = None,
) -> Path:
    """Write `model` (float, adapters fused) and its `tokenizer` (a `Tokenizer`) as the GGUF
    file `out`, the model called `name` in it; returns `out`."""
    if type_name not in FILE_TYPES:
        choices = ", ".join(FILE_TYPES)
        raise ValueError(f"unsupported GGUF type {type_name!r}; choose one of {choices}")
    _gguf()
    start = time.perf_counter()
    out = Path(out).expanduser().absolute()
    check_out(out, force)
    args = model.args
    weights = dict(tree_flatten(model.parameters()))
    check_exportable(args, weights, name)
    if type_name == "f16" and args.num_parameters() > FLOAT16_MAX_PARAMS and log:
        log("warning: llama.cpp multiplies f16 weights in float16, which overflows in models "
            "of this size (3B); prefer bf16 or q8_0")  # fmt: skip
    plan = plan_tensors(args, weights, type_name)

    def add_metadata(writer) -> None:
        add_model_metadata(writer, args, type_name, name)
        add_tokenizer_metadata(
            writer, tokenizer.model_file, args.vocab_size, chat_template=chat_template, log=log
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out, log=log) as tmp:
        write_gguf(tmp, plan, add_metadata)
    if log:
        mb, seconds = out.stat().st_size / 1e6, time.perf_counter() - start
        log(f"wrote {out} ({type_name}, {mb:.1f} MB) in {seconds:.1f} s")
    return out


def check_out(out: Path, force: bool) -> None:
    """Refuse to write over a directory, or over a file unless `force`."""
    if out.is_dir():
        raise FileExistsError(f"{out} is a directory; give a file name such as model.gguf")
    if out.exists() and not force:
        raise files.OutputExistsError(f"{out} already exists", replaceable=True)
