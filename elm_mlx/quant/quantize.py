"""Affine group quantization of OpenELM with MLX's own kernels, recorded as mlx-lm records it.

Every matrix can be quantized: the token embeddings (and with them the tied
output head, through `QuantizedEmbedding.as_linear`), `qkv_proj`, `out_proj`,
`proj_1`, `proj_2` and an untied `lm_head`. Norm weights stay in float.

A *plan* maps every matrix's module path (`transformer.layers.3.ffn.proj_2`)
to its `QuantParams`, or to None to keep it in float. Plans come from a
`QuantizeSpec`: uniform bits and group size, a named OpenELM recipe
(`RECIPES`) or a recipe file (`Recipe`). The result goes into config.json in
mlx-lm's form: `"quantization": {"group_size", "bits", "mode": "affine",
<path>: {...} | false}` for the matrices that differ from the default,
duplicated as `"quantization_config"` by the model directory writer. The same
block, read back by `plan_from_config`, rebuilds the quantized layers of a saved
model (`rebuild_quantized`) before its weights load.

Scales and biases dtype: the default is `runtime.device.default_scales_dtype`
(float32 on the CPU, where MLX's quantized matmul is much slower in bfloat16;
`benchmarks/bench_quantized.py` measures it; the model's own dtype on a GPU,
the format of mlx-community checkpoints). `cast_scales` switches an already
quantized model (and `model.set_dtype(mx.float32)` casts scales with the rest).
Prompts and training batches do not depend on it: on the CPU the quantized
layers built here (`qlayers`) multiply many rows through the dequantized matrix
and BLAS.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..model.config import ModelArgs
from ..runtime.device import default_scales_dtype
from .qlayers import use_cpu_layers

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
# What MLX's affine kernels read: accepted when loading other tools' quantized dirs.
LOADABLE_BITS = (2, 3, 4, 5, 6, 8)
SCALES_DTYPES = ("float32", "bfloat16", "float16")


class QuantizeError(ValueError):
    """A quantization request elm_mlx cannot honour (bad bits, group size, recipe)."""


class GroupSizeError(QuantizeError):
    """A group size that does not divide some matrices; `fits` is one that would, or None."""

    def __init__(self, message: str, fits: int | None) -> None:
        super().__init__(message)
        self.fits = fits


@dataclass(frozen=True)
class QuantParams:
    bits: int
    group_size: int

    def to_dict(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}


def check_params(bits: int, group_size: int, *, loading: bool = False) -> None:
    """Raise QuantizeError unless elm_mlx quantizes to (or, `loading`, reads) these params."""
    allowed = LOADABLE_BITS if loading else BITS
    if bits not in allowed:
        raise QuantizeError(
            f"{bits}-bit quantization is not supported; choose bits from {list(allowed)}"
        )
    if group_size not in GROUP_SIZES:
        raise QuantizeError(
            f"group size {group_size} is not supported; choose from {list(GROUP_SIZES)}"
        )


@dataclass
class QuantizeSpec:
    """What to quantize: uniform `bits`/`group_size`, or a `recipe` (a name in RECIPES or a
    recipe JSON file) whose per-matrix choices win over them. `group_size` None means
    `auto_group_size`; `scales_dtype` None means the per-device default (float32 on CPU,
    the model dtype elsewhere)."""

    bits: int = 4
    group_size: int | None = None
    recipe: str | Recipe | None = None
    scales_dtype: str | None = None

    def __post_init__(self) -> None:
        check_params(self.bits, self.group_size or DEFAULT_GROUP_SIZE)
        if self.scales_dtype is not None and self.scales_dtype not in SCALES_DTYPES:
            raise QuantizeError(
                f"scales dtype {self.scales_dtype!r} is not supported; choose from "
                f"{list(SCALES_DTYPES)}"
            )


Plan = dict[str, "QuantParams | None"]


# ---- recipes -------------------------------------------------------------------


@dataclass
class Recipe:
    """Per-matrix quantization choices. `layers` maps a module path, or an fnmatch pattern
    such as `*.proj_2`, to QuantParams or None (keep in float). Exact paths win over
    patterns; among patterns the last listed wins; unmatched matrices get the default.

    The JSON form is the `quantization` block of an mlx-lm config.json, so a quantized
    model's config can serve as a recipe."""

    bits: int
    group_size: int
    layers: dict[str, QuantParams | None]

    def params_for(self, path: str) -> QuantParams | None:
        if path in self.layers:
            return self.layers[path]
        found = QuantParams(self.bits, self.group_size)
        for pattern, params in self.layers.items():
            if fnmatch.fnmatchcase(path, pattern):
                found = params
        return found

    def to_json(self) -> dict:
        out: dict = {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}
        for path, params in self.layers.items():
            out[path] = params.to_dict() if params else False
        return out

    @classmethod
    def from_json(cls, data: dict, source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise QuantizeError(f"{source}: a recipe is a JSON object, got {type(data).__name__}")
        bits, group_size = data.get("bits", 4), data.get("group_size", 64)
        _check_mode(data, source)
        layers: dict[str, QuantParams | None] = {}
        for path, value in data.items():
            if path in ("bits", "group_size", "mode"):
                continue
            if value is False or value is None:
                layers[path] = None
            elif isinstance(value, dict):
                _check_mode(value, f"{source}: {path}")
                layers[path] = QuantParams(
                    value.get("bits", bits), value.get("group_size", group_size)
                )
            else:
                raise QuantizeError(
                    f"{source}: {path} must be an object with bits/group_size or false, "
                    f"got {value!r}"
                )
        return cls(bits, group_size, layers)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"recipe {path} not found; give a recipe file or one of {', '.join(RECIPES)}"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise QuantizeError(f"recipe {path} is not valid JSON: {e}") from None
        return cls.from_json(data, source=str(path))


def _check_mode(data: dict, source: str) -> None:
    if data.get("mode", "affine") != "affine":
        raise QuantizeError(
            f"{source}: mode {data['mode']!r} is not supported; elm_mlx writes 'affine' only"
        )


def _edge_or_every_third(i: int, n: int) -> bool:
    """The layers llama.cpp's Q4_K_M (and mlx-lm's mixed_* recipes) give more bits; the first
    and last layer always, however few layers there are."""
    edge = max(1, n // 8)
    return i < edge or i >= n - edge or (i - edge) % 3 == 2


def _mixed_4_8(args: ModelArgs, group_size: int) -> Recipe:
    """8 bits for the embeddings (the tied head reads them too) and for qkv_proj (which holds
    V) and proj_2 (the down projection) of the first and last eighth of the layers and every
    third layer between; 4 bits elsewhere."""
    high = QuantParams(8, group_size)
    layers: dict[str, QuantParams | None] = {"transformer.token_embeddings": high}
    if not args.share_input_output_layers:
        layers["lm_head"] = high
    n = args.num_transformer_layers
    for i in range(n):
        if _edge_or_every_third(i, n):
            layers[f"transformer.layers.{i}.attn.qkv_proj"] = high
            layers[f"transformer.layers.{i}.ffn.proj_2"] = high
    return Recipe(4, group_size, layers)


def _embed_8(args: ModelArgs, group_size: int) -> Recipe:
    """8-bit embeddings (and head), 4 bits for every projection."""
    layers: dict[str, QuantParams | None] = {
        "transformer.token_embeddings": QuantParams(8, group_size)
    }
    if not args.share_input_output_layers:
        layers["lm_head"] = QuantParams(8, group_size)
    return Recipe(4, group_size, layers)


RECIPES = {"mixed-4-8": _mixed_4_8, "embed-8": _embed_8}


def auto_group_size(args: ModelArgs) -> int:
    """DEFAULT_GROUP_SIZE when it divides the input dimension of every matrix, else the
    largest supported group size below it that does (DEFAULT_GROUP_SIZE when none does)."""
    widths = {cols for _, cols in matrix_shapes(args).values()}
    fits = [g for g in GROUP_SIZES if g <= DEFAULT_GROUP_SIZE and all(w % g == 0 for w in widths)]
    return max(fits, default=DEFAULT_GROUP_SIZE)


def group_size_for(spec: QuantizeSpec, args: ModelArgs) -> int:
    """The spec's group size, or `auto_group_size` when it gives none."""
    return auto_group_size(args) if spec.group_size is None else spec.group_size


def group_size_note(spec: QuantizeSpec, args: ModelArgs) -> str | None:
    """One line saying which group size was chosen, when the spec gives none and the
    default does not fit the model; None otherwise."""
    chosen = group_size_for(spec, args)
    named = spec.recipe is None or (isinstance(spec.recipe, str) and spec.recipe in RECIPES)
    if not named or spec.group_size is not None or chosen == DEFAULT_GROUP_SIZE:
        return None
    return (
        f"group size {chosen}: the default {DEFAULT_GROUP_SIZE} does not divide every matrix "
        f"of this model and {chosen} is the largest that does"
    )


def resolve_recipe(spec: QuantizeSpec, args: ModelArgs) -> Recipe:
    """The Recipe a spec asks for: uniform, a named recipe, or a recipe file."""
    if spec.recipe is None:
        return Recipe(spec.bits, group_size_for(spec, args), {})
    if isinstance(spec.recipe, Recipe):
        return spec.recipe
    if spec.recipe in RECIPES:
        return RECIPES[spec.recipe](args, group_size_for(spec, args))
    if spec.recipe.endswith(".json") or os.path.sep in spec.recipe or Path(spec.recipe).exists():
        return Recipe.load(spec.recipe)
    raise QuantizeError(
        f"unknown recipe {spec.recipe!r}; choose one of {', '.join(RECIPES)} or a JSON file"
    )


# ---- plans ---------------------------------------------------------------------


def matrix_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """Module path -> (out, in) shape of every quantizable matrix, in checkpoint order."""
    shapes = args.weight_shapes()
    return {k.removesuffix(".weight"): s for k, s in shapes.items() if len(s) == 2}


def make_plan(args: ModelArgs, spec: QuantizeSpec | Recipe, *, loading: bool = False) -> Plan:
    """Module path -> QuantParams (or None: float) for every matrix, checked against shapes.

    `loading` accepts every bit width MLX reads (for other tools' dirs), not only BITS."""
    recipe = spec if isinstance(spec, Recipe) else resolve_recipe(spec, args)
    shapes = matrix_shapes(args)
    unknown = [k for k in recipe.layers if not any(fnmatch.fnmatchcase(p, k) for p in shapes)]
    if unknown:
        raise QuantizeError(
            f"recipe names modules this model does not have: {', '.join(unknown)} "
            f"(paths look like transformer.layers.0.attn.qkv_proj)"
        )
    plan = {path: recipe.params_for(path) for path in shapes}
    for p in set(plan.values()) - {None}:
        check_params(p.bits, p.group_size, loading=loading)
    bad = [path for path, p in plan.items() if p is not None and shapes[path][1] % p.group_size]
    if bad:
        widths = {shapes[path][1] for path in bad}
        fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
        fix = (
            f"use group size {max(fits)}"
            if fits
            else "no supported group size fits them: keep them in float with a recipe file "
            f'({{"{bad[0]}": false, ...}})'
        )
        shown = ", ".join(f"{path} (in dim {shapes[path][1]})" for path in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise GroupSizeError(
            f"group size {plan[bad[0]].group_size} does not divide the input dimension of "
            f"{len(bad)} matrices: {shown}{more}; {fix}",
            max(fits) if fits else None,
        )
    return plan


def quantization_config(plan: Plan) -> dict:
    """mlx-lm's `quantization` block: the commonest params as default, the rest per path."""
    used = Counter(p for p in plan.values() if p is not None)
    if not used:
        raise QuantizeError("the recipe keeps every matrix in float: nothing to quantize")
    default = used.most_common(1)[0][0]
    config = default.to_dict()
    for path, params in plan.items():
        if params != default:
            config[path] = params.to_dict() if params else False
    return config


def plan_from_config(
    args: ModelArgs, quantization: dict, weights: Mapping[str, mx.array] | None = None
) -> Plan:
    """The plan a config.json `quantization` block describes (mlx-lm's rule, so a quantized
    model's config also serves as a recipe): a matrix named in the block takes its params,
    or stays float for `false`; any other takes the block's default. With the saved
    `weights`, such a matrix is quantized only when its `.scales` are stored, with the bits
    and group size its stored shapes show. Any bit width MLX reads is accepted."""
    recipe = Recipe.from_json(quantization, source="config.json quantization")
    if weights is not None:
        for path, (_, cols) in matrix_shapes(args).items():
            if path not in recipe.layers:
                recipe.layers[path] = _stored_params(path, cols, weights)
    return make_plan(args, recipe, loading=True)


def _stored_params(path: str, cols: int, weights: Mapping[str, mx.array]) -> QuantParams | None:
    """The params a saved matrix was quantized with, from its packed weight and scales."""
    if f"{path}.scales" not in weights:
        return None
    groups = weights[f"{path}.scales"].shape[-1]
    packed = weights[f"{path}.weight"].shape[-1] if f"{path}.weight" in weights else 0
    if groups == 0 or cols % groups or (packed * 32) % cols:
        raise QuantizeError(f"{path}: stored scales/weight shapes fit no quantization")
    return QuantParams(packed * 32 // cols, cols // groups)


def rebuild_quantized(model: nn.Module, plan: Plan) -> nn.Module:
    """Swap in the quantized layers `plan` names (their weights still to be loaded)."""
    modules = dict(model.named_modules())
    for path, params in plan.items():
        if params is not None:
            layer = modules[path].to_quantized(group_size=params.group_size, bits=params.bits)
            model.update_modules(tree_unflatten([(path, layer)]))
    return use_cpu_layers(model)


# ---- quantizing ----------------------------------------------------------------


def scales_dtype_for(spec: QuantizeSpec | None, model_dtype: mx.Dtype) -> mx.Dtype:
    if spec is not None and spec.scales_dtype is not None:
        return getattr(mx, spec.scales_dtype)
    return default_scales_dtype(model_dtype)


def quantize_weight(
    w: mx.array, params: QuantParams, scales_dtype: mx.Dtype
) -> tuple[mx.array, mx.array, mx.array]:
    """(packed uint32 weight, scales, biases); quantized from float32 whatever w's dtype."""
    wq, scales, biases = mx.quantize(w.astype(mx.float32), params.group_size, params.bits)
    return wq, scales.astype(scales_dtype), biases.astype(scales_dtype)


def quantize_module(module: nn.Module, params: QuantParams, scales_dtype: mx.Dtype) -> nn.Module:
    """A quantized copy of an nn.Linear / nn.Embedding (the qlayers classes: standard
    QuantizedLinear / QuantizedEmbedding whose many-row products use BLAS on the CPU)."""
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        raise QuantizeError(f"cannot quantize a {type(module).__name__}; is it already quantized?")
    # to_quantized builds the right class; its own (lazy) packing is replaced before evaluation.
    q = module.to_quantized(group_size=params.group_size, bits=params.bits)
    q.weight, q.scales, q.biases = quantize_weight(module.weight, params, scales_dtype)
    mx.eval(q.weight, q.scales, q.biases)
    return use_cpu_layers(q)


def quantize_model(
    model: nn.Module, spec: QuantizeSpec | Recipe, *, scales_dtype: mx.Dtype | None = None
) -> dict:
    """Quantize an OpenELM in place, matrix by matrix; record and return the config block."""
    plan = make_plan(model.args, spec)
    if scales_dtype is None:
        model_dtype = model.transformer.token_embeddings.weight.dtype
        spec_ = spec if isinstance(spec, QuantizeSpec) else None
        scales_dtype = scales_dtype_for(spec_, model_dtype)
    modules = dict(model.named_modules())
    for path, params in plan.items():
        if params is not None:
            quantized = quantize_module(modules.pop(path), params, scales_dtype)
            model.update_modules(tree_unflatten([(path, quantized)]))
    model.args.quantization = quantization_config(plan)
    return model.args.quantization


def quantize_tensors(
    key: str, w: mx.array, plan: Plan, scales_dtype: mx.Dtype
) -> dict[str, mx.array]:
    """One checkpoint tensor -> the tensors a quantized dir stores for it (for streaming
    conversion: `key.weight` becomes `.weight`, `.scales`, `.biases` when planned)."""
    path = key.removesuffix(".weight")
    params = plan.get(path) if key.endswith(".weight") else None
    if params is None:
        return {key: w}
    wq, scales, biases = quantize_weight(w, params, scales_dtype)
    return {f"{path}.weight": wq, f"{path}.scales": scales, f"{path}.biases": biases}


def cast_scales(model: nn.Module, dtype: mx.Dtype) -> None:
    """Change the scales/biases dtype of every quantized module (e.g. bfloat16 -> float32 to
    run an mlx-community checkpoint at full speed on the CPU)."""
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            m.scales = m.scales.astype(dtype)
            m.biases = m.biases.astype(dtype)


# ---- sizes ---------------------------------------------------------------------


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits (packed weights, scales, biases, float norms) per model weight."""
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return nbytes * 8 / model.args.num_parameters()


def plan_bits_per_weight(args: ModelArgs, plan: Plan, scales_bytes: int, float_bytes: int) -> float:
    """bits_per_weight a plan will give, without quantizing anything."""
    shapes = matrix_shapes(args)
    total = 0
    for path, (rows, cols) in shapes.items():
        p = plan[path]
        if p is None:
            total += rows * cols * float_bytes * 8
        else:
            total += rows * cols * p.bits + rows * (cols // p.group_size) * 2 * scales_bytes * 8
    others = args.num_parameters() - sum(r * c for r, c in shapes.values())
    total += others * float_bytes * 8
    return total / args.num_parameters()


def dir_size(path: str | Path) -> int:
    """Bytes of the weight files in a model directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
