"""Convert an OpenELM checkpoint in Hugging Face layout into an MLX model directory, and
quantize an MLX model directory.

    python -m elm_mlx.convert --hf-path apple/OpenELM-270M-Instruct \\
        --mlx-path ./openelm-270m-instruct --tokenizer /path/to/llama2/tokenizer.model

Sources: `model.safetensors`, sharded safetensors with their index, or
`pytorch_model.bin` (read with `torch.load(weights_only=True)`, only when torch
is installed). Every key and shape is checked against config.json before
anything is written. Tensors are read lazily and written shard by shard, so the
peak memory stays near the size of one output shard. Both write through
`modeldir.write_model_dir`, so the output directory appears only when complete.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .. import __version__
from ..model.config import ModelArgs
from ..quant import quantize as q
from . import hub
from . import modeldir as mio
from .tokenizer import Tokenizer

# Above this many parameters float16 overflows (OpenELM-3B needs bfloat16 or float32).
FLOAT16_MAX_PARAMS = 2_000_000_000
TOKENIZER_HINT = (
    "give the Llama-2 SentencePiece tokenizer.model as `tokenizer`: a local path, or a hub id "
    "such as meta-llama/Llama-2-7b-hf (gated: accept its license and run `hf auth login`)"
)

Transform = Callable[[str, mx.array], dict[str, mx.array]]


class MissingTorchError(ImportError, ValueError):
    """A .bin source without torch installed (a ValueError too: the CLI reports it in one line)."""


@dataclass
class Source:
    """A checkpoint's tensors: shapes and dtypes up front, each tensor read once, on demand."""

    files: list[Path]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    take: Callable[[str], mx.array]


# ---- sources ----------------------------------------------------------------------


def open_source(path: Path) -> Source:
    """The weights of an HF model directory: safetensors (preferred) or pytorch_model.bin."""
    if (path / mio.INDEX_FILE).is_file() or any(path.glob("model*.safetensors")):
        return _safetensors_source(mio.weight_files(path))
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        names = sorted(set(mio.read_json(index).get("weight_map", {}).values()))
        return _torch_source([path / n for n in names])
    if (path / "pytorch_model.bin").is_file():
        return _torch_source([path / "pytorch_model.bin"])
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")


def _safetensors_source(files: list[Path]) -> Source:
    arrays = mio.load_safetensors(files)  # lazy: only headers are read here
    return Source(
        files,
        {k: tuple(a.shape) for k, a in arrays.items()},
        {k: mio.dtype_name(a.dtype) for k, a in arrays.items()},
        arrays.pop,  # hand each tensor out once, so nothing keeps it alive after its shard
    )


def _torch_source(files: list[Path]) -> Source:
    torch = _import_torch()
    tensors = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found (listed in the checkpoint index)")
        tensors.update(_torch_load(torch, file))
    return Source(
        files,
        {k: tuple(t.shape) for k, t in tensors.items()},
        {k: str(t.dtype).removeprefix("torch.") for k, t in tensors.items()},
        lambda k: _torch_to_mx(torch, tensors.pop(k)),
    )


def _import_torch():
    try:
        import torch
    except ImportError:
        raise MissingTorchError(
            "reading pytorch_model.bin needs torch: pip install 'elm-mlx[torch]' "
            "(or convert from a model.safetensors source)"
        ) from None
    return torch


def _torch_load(torch, file: Path, *, inside: str | None = None) -> dict:
    """A .bin state dict, never unpickling anything but tensors (weights_only=True); with
    `inside`, a checkpoint that holds the state dict under that key is read too."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # legacy format
    except Exception as e:
        raise mio.WeightsError(f"cannot read {file}: {' '.join(str(e).split())[:300]}") from None
    if inside is not None and isinstance(state, dict) and isinstance(state.get(inside), dict):
        state = state[inside]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise mio.WeightsError(f"{file} is not a flat state dict of tensors")
    return state


def _torch_to_mx(torch, tensor) -> mx.array:
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: move the raw 16-bit words
        return mx.array(tensor.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(tensor.numpy())


# ---- checks -------------------------------------------------------------------------


def output_dtype(dtype: str | None, source: Source, args: ModelArgs) -> mx.Dtype:
    """The requested dtype, else the source's; only float32/float16/bfloat16 sources."""
    found = set(source.dtypes.values())
    bad = sorted(found - set(mio.DTYPES))
    if bad:
        raise mio.WeightsError(
            f"unsupported tensor dtypes in the checkpoint: {', '.join(bad)} "
            f"(expected {', '.join(mio.DTYPES)})"
        )
    if dtype is not None:
        return mio.as_dtype(dtype)
    if len(found) == 1:
        return mio.DTYPES[found.pop()]
    declared = args.extra.get("torch_dtype")
    if declared in found:
        return mio.DTYPES[declared]
    raise ValueError(f"the checkpoint mixes dtypes {sorted(found)}; choose one with `dtype`")


def find_tokenizer(tokenizer: str | Path | None, source: Path) -> Path:
    """The tokenizer.model to ship: `tokenizer` (file, directory or hub id), else the source's."""
    if tokenizer is None:
        file = source / mio.TOKENIZER_FILE
        if file.is_file():
            return file
        raise mio.TokenizerMissingError(
            f"no tokenizer: {source} has no tokenizer.model (Apple's OpenELM repos ship none); "
            + TOKENIZER_HINT
        )
    path = hub.resolve(tokenizer, allow_patterns=hub.TOKENIZER_FILES, required=("tokenizer.model",))
    file = path / mio.TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise mio.TokenizerMissingError(f"{tokenizer} has no tokenizer.model; " + TOKENIZER_HINT)
    return file


def check_tokenizer(file: Path, args: ModelArgs) -> None:
    """A SentencePiece model whose ids all fit the model's vocabulary."""
    size = Tokenizer(file).vocab_size
    if size > args.vocab_size:
        raise ValueError(
            f"{file} has {size} pieces but the model only {args.vocab_size}: "
            "wrong tokenizer? OpenELM uses the Llama-2 tokenizer (32000 pieces)"
        )


# ---- conversion ---------------------------------------------------------------------


def pending_weights(
    args: ModelArgs, source: Source, dtype: mx.Dtype, transform: Transform | None = None
) -> list[mio.Pending]:
    """One (output bytes, produce) per checkpoint key in model order, cast to `dtype`."""

    def produce(key: str) -> dict[str, mx.array]:
        w = source.take(key).astype(dtype)
        return transform(key, w) if transform else {key: w}

    return [
        (math.prod(shape) * dtype.size, lambda k=key: produce(k))
        for key, shape in args.weight_shapes().items()
    ]


def sha256(file: Path, stop: threading.Event | None = None) -> str:
    """The file's sha256; given up (CancelledError) once `stop` is set."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            if stop is not None and stop.is_set():
                raise CancelledError
            digest.update(chunk)
    return digest.hexdigest()


def checksums(files: list[Path], stop: threading.Event | None = None) -> dict[Path, str]:
    return {f: sha256(f, stop) for f in files}


def provenance(
    source: str, path: Path, sums: dict[Path, str], tokenizer: tuple[str, Path], **fields
) -> dict:
    """Where a converted model came from: source, input checksums, tool version, date."""
    revision = path.name if path.parent.name == "snapshots" else None
    inputs = [f for f in sums if f != tokenizer[1]]
    return {
        "source": source if revision else str(path.absolute()),
        "revision": revision,
        "inputs": {f.name: {"sha256": sums[f], "bytes": f.stat().st_size} for f in inputs},
        "tokenizer": {"source": tokenizer[0], "sha256": sums[tokenizer[1]]},
        "elm_mlx_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }


def _origin(name: str | Path | None, file: Path) -> str:
    """A hub id as given, else the absolute local path."""
    if name is not None and not Path(name).expanduser().exists():
        return str(name)
    return str(file.absolute())


def _quantizer(
    spec: q.QuantizeSpec | None, args: ModelArgs, dtype: mx.Dtype, log: mio.Log | None
) -> Transform | None:
    """Per-tensor quantization for streaming conversion; records the block in `args`."""
    if spec is None:
        return None
    _say_group_size(spec, args, log)
    plan = q.make_plan(args, spec)
    scales_dtype = q.scales_dtype_for(spec, dtype)
    args.quantization = q.quantization_config(plan)
    return lambda key, w: q.quantize_tensors(key, w, plan, scales_dtype)


def _say_group_size(spec: q.QuantizeSpec, args: ModelArgs, log: mio.Log | None) -> None:
    note = q.group_size_note(spec, args)
    if log and note:
        log(note)


def _source_dir(hf_path: str | Path, tokenizer: str | Path | None, revision: str | None):
    """(model dir, tokenizer file), failing on a missing tokenizer before a large download."""
    if not Path(hf_path).expanduser().exists():
        small = hub.resolve(
            hf_path, allow_patterns=["config.json", "tokenizer.model"], required=("config.json",),
            revision=revision,
        )  # fmt: skip
        mio.read_config(small)
        find_tokenizer(tokenizer, small)
    path = hub.resolve(hf_path, revision=revision)
    if not path.is_dir():
        raise NotADirectoryError(f"{hf_path} is not a directory")
    return path, find_tokenizer(tokenizer, path)


def _checked(src: Path, tok_file: Path, dtype: str | None, log: mio.Log | None):
    """(args, source, output dtype) once config, keys, shapes, dtypes and tokenizer agree."""
    args = mio.read_config(src)
    source = open_source(src)
    mio.check_weights(args.weight_shapes(), source.shapes, str(src))
    out_dtype = output_dtype(dtype, source, args)
    check_tokenizer(tok_file, args)
    if out_dtype == mx.float16 and args.num_parameters() > FLOAT16_MAX_PARAMS:
        message = "float16 overflows in models of this size (3B); use bfloat16 or float32"
        if log:
            log(f"warning: {message}")
        else:
            warnings.warn(message, stacklevel=3)
    return args, source, out_dtype


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    dtype: str | None = None,
    tokenizer: str | Path | None = None,
    force: bool = False,
    revision: str | None = None,
    quantize: q.QuantizeSpec | None = None,
    max_shard_bytes: int = mio.MAX_SHARD_BYTES,
    log: mio.Log | None = None,
) -> Path:
    """Convert `hf_path` (directory or hub id) into the MLX model directory `mlx_path`."""
    start = time.perf_counter()
    out = Path(mlx_path).expanduser().absolute()
    mio.check_target(out, force=force)  # before any download
    src, tok_file = _source_dir(hf_path, tokenizer, revision)
    mio.check_not_source(out, src)
    args, source, out_dtype = _checked(src, tok_file, dtype, log)
    transform = _quantizer(quantize, args, out_dtype, log)
    fields = dict(
        dtype=mio.dtype_name(out_dtype),
        source_dtypes=sorted(set(source.dtypes.values())),
        quantization=args.quantization,
    )
    # Hash the inputs in a thread while the weights are converted (hashlib releases the GIL).
    pool, stop = ThreadPoolExecutor(1), threading.Event()
    try:
        sums = pool.submit(checksums, [src / "config.json", *source.files, tok_file], stop)
        origin = (_origin(tokenizer, tok_file), tok_file)
        mio.write_model_dir(
            out,
            pending_weights(args, source, out_dtype, transform),
            args,
            dtype=out_dtype,
            tokenizer=tok_file,
            extra_files={
                **mio.carried_files(src),  # sampling defaults
                "provenance.json": lambda: provenance(
                    str(hf_path), src, sums.result(), origin, **fields
                ),
            },
            force=force,
            max_shard_bytes=max_shard_bytes,
            log=log,
        )
    finally:
        stop.set()  # an interrupted conversion does not wait for the hashes
        pool.shutdown(wait=False, cancel_futures=True)
    if log:
        log(f"wrote {out} ({mio.dtype_name(out_dtype)}) in {time.perf_counter() - start:.1f} s")
    return out


def quantize_dir(
    src: str | Path,
    out: str | Path,
    spec: q.QuantizeSpec,
    *,
    force: bool = False,
    extra_files: dict[str, dict] | None = None,
    log: mio.Log | None = None,
) -> nn.Module:
    """Quantize the float model directory `src` into the model directory `out` (written
    atomically, tokenizer.model copied); returns the quantized model."""
    src = Path(src)
    mio.check_not_source(out, src)
    mio.check_target(Path(out).absolute(), force=force)
    model, args = mio.load_model(src, lazy=True)  # each matrix is read when it is quantized
    if args.quantization:
        raise q.QuantizeError(f"{src} is already quantized; quantize its float model instead")
    _say_group_size(spec, args, log)
    q.quantize_model(model, spec)
    tokenizer = src / mio.TOKENIZER_FILE
    mio.save_model(
        out,
        model,
        model.args,
        tokenizer=tokenizer if tokenizer.is_file() else None,
        force=force,
        extra_files={**mio.carried_files(src), **(extra_files or {})},
        log=log,
    )
    return model
