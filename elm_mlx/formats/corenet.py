"""CoreNet checkpoints: a `.pt` state dict and its training YAML, as an MLX model directory.

    python -m elm_mlx.convert --corenet-checkpoint model.pt --corenet-config openelm_270M.yaml \\
        --tokenizer tokenizer.model --mlx-path openelm-270m-corenet

Apple trains OpenELM with CoreNet (`apple/corenet`). The model is the
`model.language_modeling.general_gpt` section of the training YAML: a `model_name` naming
one of CoreNet's `gpt_configs` entries, plus `vocab_size`, `max_context_length` and
`padding_index`; fields of CoreNet's `GPTConfig` given in the section override the entry
(a custom model needs them all). Weights carry the HF names without `transformer.`
(`classifier` is the untied head), and the vocabulary is padded beyond `padding_index`
(32128 rows for 32000 pieces); those rows are dropped. The state dict is read with
`torch.load(weights_only=True)`, never unpickled, and goes through the same checks and
writer as a Hugging Face conversion.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx

from ..model.config import ConfigError, ModelArgs, scaling_config
from . import convert as cv
from . import modeldir as mio
from .tokenizer import Tokenizer

SECTION = ("model", "language_modeling", "general_gpt")
# CoreNet's GPTConfig defaults (general_gpt.py), where they differ from ModelArgs'.
_GPT_DEFAULTS = {"num_gqa_groups": 1, "normalize_qk_projections": False,
                 "share_input_output_layers": False, "ffn_multipliers": 4.0,
                 "qkv_multipliers": 1.0}  # fmt: skip
# CoreNet's gpt_configs entries for OpenELM: name -> (layers, model_dim, head_dim).
_OPENELM = {"OpenELM-270M": (16, 1280, 64), "OpenELM-450M": (20, 1536, 64),
            "OpenELM-1_1B": (28, 2048, 64), "OpenELM-3B": (36, 3072, 128)}  # fmt: skip
# GPTConfig fields a section may set, and the section's own bookkeeping fields.
_FIELDS = {
    "num_transformer_layers", "model_dim", "head_dim", "qkv_multipliers", "num_gqa_groups",
    "ffn_multipliers", "ffn_with_glu", "ffn_dim_divisor", "activation_fn_name",
    "normalization_layer_name", "normalize_qk_projections", "share_input_output_layers",
    "rope_freq_constant", "rope_max_length", "vocab_size", "max_context_length",
}  # fmt: skip
_BOOKKEEPING = {"model_name", "padding_index", "num_query_heads"}


def _preset(name: str) -> dict:
    if name in _OPENELM:
        layers, dim, head = _OPENELM[name]
        config = scaling_config(layers, dim, head)
        config.update(normalize_qk_projections=True, share_input_output_layers=True)
        return config
    return {"model_type": "openelm", **_GPT_DEFAULTS, "ffn_dim_divisor": 256}


def read_section(file: str | Path) -> dict:
    """The `model.language_modeling.general_gpt` mapping of a CoreNet YAML file."""
    try:
        import yaml
    except ImportError:
        raise cv.MissingTorchError(
            "reading a CoreNet config needs PyYAML: pip install 'elm-mlx[corenet]'"
        ) from None
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"CoreNet config {file} not found")
    try:
        config = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid YAML: {' '.join(str(e).split())}") from None
    node = config
    for depth, key in enumerate(SECTION):
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            where = ".".join(SECTION[: depth + 1])
            raise ConfigError(
                f"{file} has no {where} section; a CoreNet OpenELM training config holds the "
                f"model in {'.'.join(SECTION)}"
            )
        node = node[key]
    return node


def model_args(section: dict, file: str | Path) -> tuple[ModelArgs, int | None]:
    """(ModelArgs with the checkpoint's vocabulary rows, padding_index) of a section."""
    unknown = sorted(set(section) - _FIELDS - _BOOKKEEPING)
    missing = [k for k in ("vocab_size", "max_context_length") if k not in section]
    name = section.get("model_name")
    if name not in _OPENELM:
        missing += [k for k in ("num_transformer_layers", "model_dim", "head_dim")
                    if k not in section]  # fmt: skip
    problems = [f"unknown fields {', '.join(unknown)}"] if unknown else []
    if missing:
        known = ", ".join(_OPENELM)
        problems.append(
            f"missing {', '.join(missing)}"
            + ("" if name in _OPENELM else f" (model_name {name!r} is none of {known})")
        )
    if problems:
        raise ConfigError(f"{file}: {'.'.join(SECTION)}: " + "; ".join(problems))
    config = _preset(name)
    config.update({k: v for k, v in section.items() if k in _FIELDS})
    for key in ("num_query_heads", "num_kv_heads"):
        config.pop(key, None)  # always derived from qkv_multipliers, as CoreNet does
    try:
        args = ModelArgs.from_dict(config)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    return args, section.get("padding_index")


def corenet_key(hf_key: str) -> str:
    """The CoreNet name of an HF checkpoint key."""
    if hf_key == "lm_head.weight":
        return "classifier.weight"
    return hf_key.removeprefix("transformer.")


def open_checkpoint(file: Path, args: ModelArgs, rows: int) -> cv.Source:
    """The checkpoint as a Source in HF names, after every key and shape is checked
    (in CoreNet names); embedding and head rows cut to `rows`."""
    try:
        import torch
    except ImportError:
        raise cv.MissingTorchError(
            "reading a CoreNet checkpoint needs torch: pip install 'elm-mlx[corenet]'"
        ) from None
    # checkpoint_best.pt / checkpoint_last.pt are state dicts; training_checkpoint_*.pt hold
    # one under model_state_dict, beside the optimizer's state
    state = cv._torch_load(torch, file, inside="model_state_dict")
    expected = {corenet_key(k): s for k, s in args.weight_shapes().items()}
    mio.check_weights(expected, {k: tuple(t.shape) for k, t in state.items()}, str(file))
    vocab_keys = {"transformer.token_embeddings.weight", "lm_head.weight"}

    def take(key: str) -> mx.array:
        tensor = state.pop(corenet_key(key))
        return cv._torch_to_mx(torch, tensor[:rows] if key in vocab_keys else tensor)

    shapes = {
        k: ((rows, *s[1:]) if k in vocab_keys else s) for k, s in args.weight_shapes().items()
    }
    dtypes = {k: str(state[corenet_key(k)].dtype).removeprefix("torch.") for k in shapes}
    return cv.Source([file], shapes, dtypes, take)


def output_rows(args: ModelArgs, padding_index: int | None, pieces: int) -> int:
    """Vocabulary rows to keep: up to `padding_index` when the rows from it on are padding."""
    if padding_index is not None and pieces <= padding_index < args.vocab_size:
        return padding_index
    return args.vocab_size


def convert_corenet(
    checkpoint: str | Path,
    config: str | Path,
    mlx_path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dtype: str | None = None,
    force: bool = False,
    quantize=None,
    max_shard_bytes: int = mio.MAX_SHARD_BYTES,
    log: mio.Log | None = None,
) -> Path:
    """Convert a CoreNet `.pt` state dict and its YAML config into the MLX model directory
    `mlx_path` (the same directory a Hugging Face conversion of the same weights gives)."""
    start = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(mlx_path).expanduser().absolute()
    mio.check_target(out, force=force)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"CoreNet checkpoint {checkpoint} not found")
    args, padding_index = model_args(read_section(config), config)
    tok_file = cv.find_tokenizer(tokenizer, checkpoint.parent)
    rows = output_rows(args, padding_index, Tokenizer(tok_file).vocab_size)
    source = open_checkpoint(checkpoint, args, rows)
    if rows != args.vocab_size and log:
        log(f"dropping {args.vocab_size - rows} padding rows of the vocabulary ({rows} kept)")
    args.vocab_size = rows
    out_dtype = cv.output_dtype(dtype, source, args)
    cv.check_tokenizer(tok_file, args)
    transform = cv._quantizer(quantize, args, out_dtype, log)
    fields = dict(dtype=mio.dtype_name(out_dtype), quantization=args.quantization,
                  corenet_config=str(Path(config).absolute()),
                  corenet_model_name=read_section(config).get("model_name"))  # fmt: skip
    inputs = [Path(config), checkpoint, tok_file]
    mio.write_model_dir(
        out,
        cv.pending_weights(args, source, out_dtype, transform),
        args,
        dtype=out_dtype,
        tokenizer=tok_file,
        extra_files={
            "provenance.json": lambda: cv.provenance(
                str(checkpoint),
                checkpoint,
                cv.checksums(inputs),
                (str(tok_file), tok_file),
                **fields,
            )
        },  # fmt: skip
        force=force,
        max_shard_bytes=max_shard_bytes,
        log=log,
    )
    if log:
        log(f"wrote {out} ({mio.dtype_name(out_dtype)}) in {time.perf_counter() - start:.1f} s")
    return out
