"""LoRA adapters swapped in place on OpenELM's linear layers; fuse, save and load.

`apply_lora(model, LoRAConfig(...))` replaces the chosen projections of the
last N blocks by `LoRALinear`s that wrap the original layer: the model keeps
its attribute paths, so adapter weights are named
`transformer.layers.{i}.attn.qkv_proj.lora_a` (the names mlx-lm uses, so
adapter directories are interchangeable). A quantized base layer
(`nn.QuantizedLinear`) is wrapped the same way and stays frozen: that is QLoRA.
`fine_tune_type="dora"` swaps in `DoRALinear`s instead (weight-decomposed LoRA:
a learned magnitude per output row on top of the low-rank direction update).

An adapter directory holds `adapters.safetensors` and `adapter_config.json`
(mlx-lm's format). For a full fine-tune (`fine_tune_type: "full"`) the
safetensors file holds every weight of the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..formats.files import write_json
from .checkpoint import load_arrays, save_arrays, writing

TARGETS = ("qkv_proj", "out_proj", "proj_1", "proj_2")
# Target name -> module path inside a block.
TARGET_PATHS = {
    "qkv_proj": "attn.qkv_proj",
    "out_proj": "attn.out_proj",
    "proj_1": "ffn.proj_1",
    "proj_2": "ffn.proj_2",
}
FINE_TUNE_TYPES = ("lora", "dora", "full")
ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


class LoRAError(ValueError):
    """Adapter settings or files that do not fit the model."""


@dataclass
class LoRAConfig:
    """What to adapt and how: rank, scale (alpha / rank), dropout, targets, last N layers."""

    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: int = -1  # adapt the last N blocks; -1 = every block
    targets: tuple[str, ...] = TARGETS
    fine_tune_type: str = "lora"

    @classmethod
    def with_alpha(cls, alpha: float, rank: int = 8, **kwargs) -> LoRAConfig:
        """The config whose scale is alpha / rank (the convention of most LoRA papers)."""
        return cls(rank=rank, scale=alpha / rank, **kwargs)

    def __post_init__(self) -> None:
        """Raise LoRAError naming every bad setting at once."""
        self.targets = tuple(self.targets)
        problems = []
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            problems.append(
                f"fine_tune_type {self.fine_tune_type!r} is not one of {', '.join(FINE_TUNE_TYPES)}"
            )
        if not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not math.isfinite(self.scale):
            problems.append(f"scale must be a finite number, got {self.scale}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            problems.append(f"targets {list(bad or self.targets)} invalid; choose from {TARGETS}")
        if self.num_layers == 0 or self.num_layers < -1:
            problems.append(f"num_layers must be -1 (all) or positive, got {self.num_layers}")
        if problems:
            raise LoRAError("invalid adapter settings: " + "; ".join(problems))

    def layer_indices(self, model_layers: int) -> range:
        """The blocks to adapt; LoRAError if the model has fewer than `num_layers`."""
        if self.num_layers > model_layers:
            raise LoRAError(f"num_layers {self.num_layers} > the model's {model_layers} layers")
        n = model_layers if self.num_layers == -1 else self.num_layers
        return range(model_layers - n, model_layers)

    def settings(self, model_layers: int) -> dict:
        """Every setting by name, flat (a resume compares them)."""
        d = self.to_dict(model_layers)
        return {**d.pop("lora_parameters", {}), **d}

    def to_dict(self, model_layers: int) -> dict:
        """adapter_config.json content (mlx-lm's layout)."""
        n = len(self.layer_indices(model_layers))
        if self.fine_tune_type == "full":
            return {"fine_tune_type": "full", "num_layers": n}
        params = {"rank": self.rank, "scale": self.scale, "dropout": self.dropout}
        params["keys"] = [TARGET_PATHS[t] for t in self.targets]
        return {"fine_tune_type": self.fine_tune_type, "num_layers": n, "lora_parameters": params}

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        kind = d.get("fine_tune_type", "lora")
        if kind == "full":
            return cls(fine_tune_type="full", num_layers=d.get("num_layers", -1))
        p = d.get("lora_parameters", {})
        by_path = {v: k for k, v in TARGET_PATHS.items()}
        keys = p.get("keys") or list(TARGET_PATHS.values())
        unknown = [k for k in keys if k not in by_path]
        if unknown:
            raise LoRAError(f"adapter keys {unknown} are not OpenELM projections")
        return cls(
            rank=p.get("rank", 8),
            scale=p.get("scale", 20.0),
            dropout=p.get("dropout", 0.0),
            num_layers=d.get("num_layers", -1),
            targets=tuple(by_path[k] for k in keys),
            fine_tune_type=kind,
        )


def linear_dims(linear: nn.Module) -> tuple[int, int]:
    """(input_dims, output_dims) of an nn.Linear or nn.QuantizedLinear."""
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits  # packed uint32 columns
    return in_dims, out_dims


def dense_weight(linear: nn.Module) -> mx.array:
    """The (output_dims, input_dims) weight of a linear layer, de-quantized if needed."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(
            linear.weight,
            linear.scales,
            linear.get("biases"),
            group_size=linear.group_size,
            bits=linear.bits,
            mode=linear.mode,
        )
    return linear.weight


class LoRALinear(nn.Module):
    """`linear(x) + scale * dropout(x) @ lora_a @ lora_b`; the wrapped layer stays frozen."""

    @classmethod
    def from_base(
        cls, linear: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0, key=None
    ) -> LoRALinear:
        return cls(linear, rank, scale, dropout, key)

    def __init__(self, linear, rank=8, scale=20.0, dropout=0.0, key=None):
        super().__init__()
        in_dims, out_dims = linear_dims(linear)
        if rank > min(in_dims, out_dims):
            raise LoRAError(f"rank {rank} exceeds the layer's size {in_dims} x {out_dims}")
        linear.freeze()
        self.linear = linear
        self.scale = scale
        if dropout > 0:
            self.dropout = nn.Dropout(dropout)
        bound = 1 / math.sqrt(in_dims)
        # Adapter weights stay float32 whatever the base dtype (QLoRA bases are packed ints).
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank), key=key)
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)  # (..., out)
        h = self.dropout(x) if "dropout" in self else x
        down = h @ self.lora_a  # (..., rank)
        if y.dtype == self.lora_b.dtype:
            # One GEMM adds the low-rank update into y's buffer.
            return mx.addmm(y, down, self.lora_b, alpha=self.scale)
        return y + (self.scale * (down @ self.lora_b)).astype(y.dtype)

    def delta(self) -> mx.array:
        """The low-rank weight update, (output_dims, input_dims) in float32."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def fused_weight(self) -> mx.array:
        """The adapted (output_dims, input_dims) weight in float32."""
        return dense_weight(self.linear).astype(mx.float32) + self.delta()

    def fuse(self, de_quantize: bool = False) -> nn.Module:
        """A plain layer computing the same function (re-quantized if the base was)."""
        base = self.linear
        in_dims, out_dims = linear_dims(base)
        has_bias = "bias" in base
        fused = nn.Linear(in_dims, out_dims, bias=has_bias)
        fused.weight = self.fused_weight().astype(dense_weight(base).dtype)
        if has_bias:
            fused.bias = base.bias
        if isinstance(base, nn.QuantizedLinear) and not de_quantize:
            return nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, mode=base.mode)
        return fused


class DoRALinear(LoRALinear):
    """DoRA: `m * (W + dW) / |W + dW|`, a learned length for each output row's weights.

    dW = scale * lora_b.T @ lora_a.T is LoRA's update of the direction; `m` starts
    at the base rows' norms, so a fresh layer equals its base. As the DoRA paper
    suggests, the row norms are treated as constants in the backward pass. They
    are computed without forming W + dW: with c = scale * lora_b and
    P = lora_a.T @ W.T (the base layer applied to lora_a's columns),

        |W_i + dW_i|^2 = |W_i|^2 + 2 sum_k c[k, i] P[k, i] + c[:, i] . (A.T A) c[:, i]

    which costs `rank` rows through the (possibly quantized) base layer per step,
    never a de-quantized copy of it.
    """

    def __init__(self, linear, rank=8, scale=20.0, dropout=0.0, key=None):
        super().__init__(linear, rank, scale, dropout, key)
        row_norms_sq = mx.square(dense_weight(linear).astype(mx.float32)).sum(axis=1)
        self._base_norms_sq = row_norms_sq  # a constant: underscored names are not parameters
        self.m = mx.sqrt(row_norms_sq)

    def _base(self, x: mx.array) -> mx.array:
        """x @ W.T without the base layer's bias."""
        y = self.linear(x)
        return y - self.linear.bias if "bias" in self.linear else y

    def row_norms(self) -> mx.array:
        """|W_i + dW_i| for every output row i (no gradient)."""
        a, c = self.lora_a, self.scale * self.lora_b  # (in, r), (r, out)
        p = self._base(a.T.astype(self._linear_dtype())).astype(mx.float32)  # (r, out)
        cross = (c * p).sum(axis=0)
        update = (c * ((a.T @ a) @ c)).sum(axis=0)
        norms_sq = self._base_norms_sq + 2 * cross + update
        return mx.stop_gradient(mx.sqrt(mx.maximum(norms_sq, 0.0)))

    def _linear_dtype(self) -> mx.Dtype:
        base = self.linear
        return base.scales.dtype if isinstance(base, nn.QuantizedLinear) else base.weight.dtype

    def __call__(self, x: mx.array) -> mx.array:
        y = self._base(x)
        h = self.dropout(x) if "dropout" in self else x
        y = y + (self.scale * ((h @ self.lora_a) @ self.lora_b)).astype(y.dtype)
        y = (self.m / self.row_norms()).astype(y.dtype) * y
        return y + self.linear.bias if "bias" in self.linear else y

    def fused_weight(self) -> mx.array:
        weight = super().fused_weight()
        return (self.m / mx.linalg.norm(weight, axis=1))[:, None] * weight


# ---- applying ----------------------------------------------------------------


def _module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = root[int(part)] if isinstance(root, list) else getattr(root, part)
    return root


def apply_lora(model: nn.Module, config: LoRAConfig, seed: int = 0) -> list[str]:
    """Freeze `model` and swap LoRA layers in place; returns the adapted module paths.

    `fine_tune_type="dora"` swaps DoRA layers; `"full"` unfreezes the whole model instead.
    """
    layers = model.layers
    indices = config.layer_indices(len(layers))
    if any(isinstance(m, LoRALinear) for _, m in model.named_modules()):
        raise LoRAError("the model already has LoRA layers; load a fresh model")
    if config.fine_tune_type == "full":
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise LoRAError("a quantized model cannot be fully fine-tuned; use LoRA (QLoRA)")
        model.unfreeze()
        return []
    model.freeze()
    keys = mx.random.split(mx.random.key(seed), len(layers) * len(TARGETS))
    adapted = []
    for i in indices:
        swaps = []
        for t in config.targets:
            j = i * len(TARGETS) + TARGETS.index(t)
            base = _module(layers[i], TARGET_PATHS[t])
            kind = DoRALinear if config.fine_tune_type == "dora" else LoRALinear
            lora = kind(base, config.rank, config.scale, config.dropout, key=keys[j])
            swaps.append((TARGET_PATHS[t], lora))
            adapted.append(f"layers.{i}.{TARGET_PATHS[t]}")
        layers[i].update_modules(tree_unflatten(swaps))
    return adapted


def num_trainable(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def fuse_lora(model: nn.Module, de_quantize: bool = False) -> nn.Module:
    """Replace every LoRALinear by its fused layer; `de_quantize` also un-quantizes the rest."""
    fused = [
        (n, m.fuse(de_quantize)) for n, m in model.named_modules() if isinstance(m, LoRALinear)
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if de_quantize:
        dequantize_model(model)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Turn every quantized linear and embedding back into float layers (in place)."""
    swaps = []
    for name, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            in_dims, out_dims = linear_dims(m)
            layer = nn.Linear(in_dims, out_dims, bias="bias" in m)
            layer.weight = dense_weight(m)
            if "bias" in m:
                layer.bias = m.bias
            swaps.append((name, layer))
        elif isinstance(m, nn.QuantizedEmbedding):
            weight = mx.dequantize(
                m.weight, m.scales, m.get("biases"), m.group_size, m.bits, mode=m.mode
            )
            layer = nn.Embedding(*weight.shape)
            layer.weight = weight
            swaps.append((name, layer))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    if getattr(model, "args", None) is not None:
        model.args.quantization = None
    return model


# ---- saving and loading ---------------------------------------------------------


def write_adapter_config(path: str | Path, config: LoRAConfig, model_layers: int) -> Path:
    """Write `adapter_config.json` into the adapter directory (created if needed)."""
    path = Path(path)
    with writing(path / CONFIG_FILE):
        path.mkdir(parents=True, exist_ok=True)
        return write_json(path / CONFIG_FILE, config.to_dict(model_layers))


def save_adapters(model: nn.Module, path: str | Path, config: LoRAConfig) -> Path:
    """Write the trainable weights and the config into an adapter directory."""
    path = Path(path)
    write_adapter_config(path, config, len(model.layers))
    save_arrays(path / ADAPTER_FILE, dict(tree_flatten(model.trainable_parameters())))
    return path


def read_adapter_config(path: str | Path) -> LoRAConfig:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {path} not found")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; is {path} an adapter directory?")
    try:
        return LoRAConfig.from_dict(json.loads(file.read_text()))
    except json.JSONDecodeError as e:
        raise LoRAError(f"{file} is not valid JSON ({e.msg})") from None


def expected_adapter_shapes(model: nn.Module, config: LoRAConfig) -> dict[str, tuple]:
    """Name -> shape of every weight an adapter file for `config` must hold."""
    if config.fine_tune_type == "full":
        return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    shapes = {}
    prefix = _layers_prefix(model)
    for i in config.layer_indices(len(model.layers)):
        for t in config.targets:
            in_dims, out_dims = linear_dims(_module(model.layers[i], TARGET_PATHS[t]))
            name = f"{prefix}{i}.{TARGET_PATHS[t]}"
            shapes[f"{name}.lora_a"] = (in_dims, config.rank)
            shapes[f"{name}.lora_b"] = (config.rank, out_dims)
            if config.fine_tune_type == "dora":
                shapes[f"{name}.m"] = (out_dims,)
    return shapes


def _layers_prefix(model: nn.Module) -> str:
    first = model.layers[0]
    for name, m in model.named_modules():
        if m is first:
            return name[: -len("0")]
    raise LoRAError("cannot find the model's layers")


def check_adapter_weights(weights: dict, expected: dict[str, tuple], source: str) -> None:
    """Raise LoRAError listing every missing, unexpected and mis-shaped tensor at once."""
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [
        f"{k} has shape {tuple(weights[k].shape)}, the model needs {expected[k]}"
        for k in weights
        if k in expected and tuple(weights[k].shape) != expected[k]
    ]
    if problems:
        shown = problems[:20] + ([f"... {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise LoRAError(f"{source} does not fit this model: " + "; ".join(shown))


def check_rank(weights: dict, config: LoRAConfig, file: Path) -> None:
    """Raise LoRAError in one line when the file's LoRA rank is not the config's."""
    ranks = {v.shape[-1] for k, v in weights.items() if k.endswith(".lora_a") and v.ndim == 2}
    if config.fine_tune_type != "full" and len(ranks) == 1 and ranks != {config.rank}:
        raise LoRAError(
            f"{file}: adapters have rank {ranks.pop()} but {CONFIG_FILE} says {config.rank}"
        )


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Swap in the adapter layers described by `path` and load their weights.

    Every mismatch between the file and the model is reported in one error,
    before the model is changed.
    """
    path = Path(path)
    config = read_adapter_config(path)
    file = path / ADAPTER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; train adapters into {path} first")
    weights = load_arrays(file, f"train the adapters in {path} again", LoRAError)
    check_rank(weights, config, file)
    check_adapter_weights(weights, expected_adapter_shapes(model, config), str(file))
    apply_lora(model, config)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model


def apply_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Load adapters for generation: fused into float bases, kept as LoRA on quantized ones."""
    load_adapters(model, path)
    quantized = any(
        isinstance(m, LoRALinear) and isinstance(m.linear, nn.QuantizedLinear)
        for _, m in model.named_modules()
    )
    if not quantized:
        fuse_lora(model)
    model.freeze()
    return model
