"""Model directories: load and save config.json, (sharded) safetensors and tokenizer.model.

A model directory is what mlx-lm reads and writes for `model_type: openelm`:
`config.json` (HF field names, plus mlx-lm's `quantization` block when
quantized), `model.safetensors` or shards `model-0000i-of-0000n.safetensors`
with `model.safetensors.index.json`, and `tokenizer.model`. Weight names are
the HF checkpoint keys, which are also the model's attribute paths.

Every model directory (converted, quantized, fused, saved) is written by
`write_model_dir`: atomically (`files.atomic_dir`: a temporary sibling renamed into
place when complete), its weights shard by shard from callables that produce them, so
a converter can stream tensors from disk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..model.config import ConfigError, ModelArgs
from ..model.openelm import OpenELM
from ..quant import quantize as q
from . import files
from .tokenizer import Tokenizer

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
# Shard size above which weights are split over several files (mlx-lm's limit).
MAX_SHARD_BYTES = 5 << 30
# Keys in published checkpoints that no module reads: HF's untied OpenELM stores
# an unused copy of the output head.
UNUSED_KEYS = frozenset({"transformer.classifier.weight"})
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# The nano OpenELM shipped in the package (examples/nano/train_nano.py makes it): what
# `elm-mlx generate` runs when no --model is given. A base model, trained on Shakespeare.
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "nano"
DEFAULT_MODEL_FILES = ("config.json", "model.safetensors", TOKENIZER_FILE)

# (bytes, produce): the tensors of one or more keys, produced only when their shard is written.
Pending = tuple[int, Callable[[], dict[str, mx.array]]]
Log = Callable[[str], None]
Progress = Callable[[int], object]
GENERATION_CONFIG = "generation_config.json"
# What shows that an existing directory is a model directory `force` may replace.
MODEL_DIR = {"marker": "config.json", "kind": "a model directory"}


class WeightsError(ValueError):
    """Weights that do not match the config: missing, unexpected, wrong shape, unreadable."""


class DefaultModelMissingError(FileNotFoundError):
    """The shipped nano model is incomplete (an argument naming another model avoids it)."""


class TokenizerMissingError(FileNotFoundError):
    """A model directory without tokenizer.model, where a tokenizer is needed."""


# ---- reading ----------------------------------------------------------------------


def read_config(path: Path) -> ModelArgs:
    """ModelArgs from `path/config.json`."""
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; is {path} a model directory?")
    return ModelArgs.from_dict(read_json(file, ConfigError))


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: from the index, or model*.safetensors."""
    index = path / INDEX_FILE
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing or not names:
            raise FileNotFoundError(
                f"{index} lists missing shard files: {', '.join(missing) or 'none listed'}"
            )
        return [path / n for n in names]
    found = sorted(path.glob("model*.safetensors"))
    if not found:
        hint = ""
        if any(path.glob("pytorch_model*.bin")):
            hint = f"; convert it first: python -m elm_mlx.convert --hf-path {path} --mlx-path OUT"
        raise FileNotFoundError(f"no model*.safetensors in {path}{hint}")
    return found


def read_json(file: Path, error: type[ValueError] = WeightsError) -> dict:
    """The JSON object in `file`, or one `error` naming the file."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{file} must hold a JSON object")
    return data


def load_safetensors(files: list[Path]) -> dict[str, mx.array]:
    """Every tensor of `files`, lazily: nothing is read until a tensor is evaluated."""
    weights: dict[str, mx.array] = {}
    for file in files:
        try:
            tensors = mx.load(str(file))
        except (RuntimeError, ValueError, OSError) as e:
            raise WeightsError(f"cannot read {file}: {' '.join(str(e).split())}") from None
        duplicated = sorted(set(tensors) & set(weights))
        if duplicated:
            raise WeightsError(f"{file} repeats keys of another shard: {_some(duplicated)}")
        weights.update(tensors)
    return weights


def check_weights(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], where: str
) -> None:
    """Raise one WeightsError naming every missing, unexpected and wrong-shaped key."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and k not in UNUSED_KEYS]
    wrong = [
        f"{k} {tuple(found[k])} (expected {tuple(expected[k])})"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    problems = [
        f"{len(keys)} {label}: {_some(keys)}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        )
        if keys
    ]
    if problems:
        raise WeightsError(f"weights in {where} do not match config.json: " + "; ".join(problems))


def _some(items: list[str], n: int = 8) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def as_dtype(dtype: str | mx.Dtype) -> mx.Dtype:
    """mx.float16 or 'float16' -> mx.float16; anything else is a one-line ValueError."""
    if isinstance(dtype, mx.Dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def dtype_name(dtype: mx.Dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).split(".")[-1])


# ---- loading ----------------------------------------------------------------------


def build_model(args: ModelArgs, weights: Mapping[str, mx.array] | None = None) -> OpenELM:
    """An OpenELM for `args`, with quantized layers where config.json (and weights) say so."""
    model = OpenELM(args)
    if args.quantization:
        q.rebuild_quantized(model, q.plan_from_config(args, args.quantization, weights))
    return model


def load_model(
    path: str | Path, *, dtype: str | mx.Dtype | None = None, lazy: bool = False
) -> tuple[OpenELM, ModelArgs]:
    """The model of a local model directory, its weights checked key by key and shape by shape."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    args = read_config(path)
    weights = load_safetensors(weight_files(path))
    model = build_model(args, weights)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    check_weights(expected, {k: w.shape for k, w in weights.items()}, str(path))
    model.load_weights([(k, w) for k, w in weights.items() if k in expected], strict=True)
    if dtype is not None:
        model.set_dtype(as_dtype(dtype))
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model, args


def load(path_or_hub_id: str | Path, *, dtype: str | mx.Dtype | None = None, lazy: bool = False):
    """(model, tokenizer) from a model directory or hub id; tokenizer is None without
    tokenizer.model (see `require_tokenizer`)."""
    from .hub import resolve

    path = resolve(
        path_or_hub_id, allow_patterns=["config.json", "*.safetensors", INDEX_FILE, TOKENIZER_FILE]
    )
    model, _ = load_model(path, dtype=dtype, lazy=lazy)
    return model, load_tokenizer(path)


def load_tokenizer(path: Path):
    """The Tokenizer of a model directory, or None when it has no tokenizer.model."""
    if not (Path(path) / TOKENIZER_FILE).is_file():
        return None
    return Tokenizer(Path(path) / TOKENIZER_FILE)


def default_model_path() -> Path:
    """The shipped nano model directory, or a FileNotFoundError saying how to get it back."""
    missing = [n for n in DEFAULT_MODEL_FILES if not (DEFAULT_MODEL / n).is_file()]
    if missing:
        raise DefaultModelMissingError(
            f"the shipped nano model is incomplete ({', '.join(missing)} missing in "
            f"{DEFAULT_MODEL}); reinstall elm-mlx or rebuild it with "
            "`python examples/nano/train_nano.py`"
        )
    return DEFAULT_MODEL


def require_tokenizer(tokenizer, path: str | Path):
    """`tokenizer`, or a TokenizerMissingError saying how to supply one."""
    if tokenizer is None:
        raise TokenizerMissingError(
            f"{path} has no tokenizer.model; copy the Llama-2 SentencePiece tokenizer.model "
            "into it, or convert again with `elm-mlx convert ... --tokenizer PATH|HUB_ID`"
        )
    return tokenizer


# ---- writing ----------------------------------------------------------------------


def check_target(path: str | Path, *, force: bool) -> None:
    """Refuse an existing output unless `force`; never replace what is not a model directory."""
    files.check_target(path, force=force, **MODEL_DIR)


def check_not_source(out: str | Path, src: str | Path, name: str = "the output") -> None:
    """Refuse an output directory (called `name` in the message) that is the input model or
    holds it."""
    o, i = Path(out).expanduser().resolve(), Path(src).expanduser().resolve()
    if o == i or o in i.parents:
        raise FileExistsError(
            f"{name} {out} would replace the input model {src}; choose another path"
        )


def read_generation_config(path: str | Path) -> dict | None:
    """A model directory's generation_config.json (HF's sampling defaults), or None when it
    has none; an unreadable one is a one-line ValueError naming the file."""
    file = Path(path) / GENERATION_CONFIG
    if not file.is_file():
        return None
    return read_json(file, ValueError)


def carried_files(src: str | Path) -> dict[str, dict]:
    """Side files a model directory passes on to the directories made from it (its sampling
    defaults, generation_config.json), as `save_model`'s `extra_files`."""
    content = read_generation_config(src)
    return {} if content is None else {GENERATION_CONFIG: content}


def plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Indices of consecutive items per shard, each shard at most `max_bytes` unless one item
    alone is larger."""
    shards: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if not shards or total + size > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += size
    return shards


def write_weights(
    path: Path,
    pending: list[Pending],
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Progress | None = None,
    log: Log | None = None,
) -> list[str]:
    """Write `pending` tensors into `path` shard by shard; return the file names written.

    Each shard's tensors are produced and evaluated one by one, saved, then dropped, so the
    peak memory is about one shard. `progress(nbytes)` is called after each tensor, `log`
    once per shard."""
    shards = plan_shards([n for n, _ in pending], max_shard_bytes)
    names = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard in zip(names, shards, strict=True):
        tensors: dict[str, mx.array] = {}
        for i in shard:
            produced = pending[i][1]()
            mx.eval(*produced.values())  # one tensor at a time: no source copies pile up
            tensors.update(produced)
            if progress:
                progress(pending[i][0])
        nbytes = sum(t.nbytes for t in tensors.values())
        total += nbytes
        if log:
            log(f"writing {name} ({len(tensors)} tensors, {_gb(nbytes)})")
        _save_safetensors(path / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        files.write_json(path / INDEX_FILE, index)
    return names


def _save_safetensors(file: Path, tensors: dict[str, mx.array]) -> None:
    try:
        mx.save_safetensors(str(file), tensors, {"format": "mlx"})
        files.user_mode(file)  # MLX creates it 0644 whatever the umask
    except RuntimeError as e:  # MLX reports a failed write without an errno
        nbytes = sum(t.nbytes for t in tensors.values())
        full = shutil.disk_usage(file.parent).free < nbytes
        reason = os.strerror(errno.ENOSPC) if full else " ".join(str(e).split())
        raise OSError(errno.ENOSPC if full else errno.EIO, reason, str(file)) from None


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_config(path: Path, args: ModelArgs, **extra) -> None:
    """config.json with mlx-lm's field names (which are HF's) plus `extra` fields; the
    quantization block goes in as `quantization` and, as mlx-lm writes it,
    `quantization_config`."""
    config = args.to_dict()
    config.pop("auto_map", None)  # it points at modeling code this directory does not carry
    config.pop("quantization_config", None)
    if args.quantization:
        config["quantization_config"] = args.quantization
    config.update(extra)
    files.write_json(path / "config.json", dict(sorted(config.items())))


def write_model_dir(
    path: str | Path,
    pending: list[Pending],
    args: ModelArgs,
    *,
    dtype: mx.Dtype | None,
    tokenizer: str | Path | None = None,
    extra_files: Mapping[str, dict | Callable[[], dict]] | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    log: Log | None = None,
) -> Path:
    """Write a model directory atomically: weights produced shard by shard from `pending`,
    config.json (`dtype` recorded as torch_dtype), tokenizer.model copied from the file
    `tokenizer`, and `extra_files` (name -> JSON content, or a callable that makes it once
    the weights are written). Returns the directory."""
    path = Path(path).absolute()
    with files.atomic_dir(path, force=force, log=log, **MODEL_DIR) as tmp:
        total = sum(n for n, _ in pending)
        with progress_bar(total, f"writing {path.name}", log) as progress:
            lines = None if progress else log  # a line per shard where no bar is shown
            write_weights(
                tmp, pending, max_shard_bytes=max_shard_bytes, progress=progress, log=lines
            )
        write_config(tmp, args, **({"torch_dtype": dtype_name(dtype)} if dtype else {}))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        for name, content in (extra_files or {}).items():
            files.write_json(tmp / name, content() if callable(content) else content)
    return path


def save_model(
    path: str | Path,
    model_or_weights: nn.Module | Mapping[str, mx.array],
    args: ModelArgs,
    *,
    tokenizer: str | Path | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    extra_files: Mapping[str, dict] | None = None,
    log: Log | None = None,
) -> Path:
    """Write a model (or its weights) as a model directory; see `write_model_dir`."""
    if isinstance(model_or_weights, nn.Module):
        weights = dict(tree_flatten(model_or_weights.parameters()))
    else:
        weights = dict(model_or_weights)
    pending = [(w.nbytes, lambda k=k, w=w: {k: w}) for k, w in weights.items()]
    dtypes = {w.dtype for w in weights.values() if mx.issubdtype(w.dtype, mx.floating)}
    return write_model_dir(
        path,
        pending,
        args,
        dtype=dtypes.pop() if len(dtypes) == 1 else None,
        tokenizer=tokenizer,
        extra_files=extra_files,
        force=force,
        max_shard_bytes=max_shard_bytes,
        log=log,
    )


@contextmanager
def progress_bar(
    total: int, what: str, log: Log | None, *, unit: str = "B"
) -> Iterator[Progress | None]:
    """`update(n)` of a progress bar (rate, time left) on a terminal's stderr when `log` is
    given; None when there is no bar to show."""
    if log is None:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=what, unit=unit, unit_scale=unit == "B", leave=False, disable=None)
    with bar:
        yield None if bar.disable else bar.update
