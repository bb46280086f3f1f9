"""Model configuration: Hugging Face config.json <-> ModelArgs, layer-wise scaling.

OpenELM gives every layer its own query-head count, KV-head count and FFN
width. A config either lists them (`num_query_heads`, `num_kv_heads`,
`ffn_multipliers` with one entry per layer, as the HF configs do) or gives the
scaling ranges they are derived from (`qkv_multipliers`, `ffn_multipliers` as a
2-element range, as CoreNet's YAML does). Both produce the same ModelArgs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config.json that does not describe a model elm_mlx can build."""


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round `v` to the nearest multiple of `divisor`, never down by more than 10%."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def linspace_rounded(start: float, stop: float, n: int) -> list[float]:
    """`round(numpy.linspace(start, stop, n), 2)` without numpy."""
    if n == 1:
        return [round(start, 2)]
    return [round(start + (stop - start) * i / (n - 1), 2) for i in range(n)]


def scaled_heads(
    model_dim: int, head_dim: int, num_gqa_groups: int, qkv_multipliers: list[float]
) -> tuple[list[int], list[int]]:
    """Per-layer (query heads, KV heads) from the per-layer QKV multipliers."""
    q_heads = [
        make_divisible(model_dim * m, head_dim * num_gqa_groups) // head_dim
        for m in qkv_multipliers
    ]
    return q_heads, [q // num_gqa_groups for q in q_heads]


def _as_range(value: Any, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return float(value[0]), float(value[1])
    raise ConfigError(f"{name} must be a number or a [min, max] range, got {value!r}")


# Options that change the architecture and that this implementation does not
# build: name -> the only value supported.
_FIXED_OPTIONS = {
    "ffn_with_glu": True,
    "normalization_layer_name": "rms_norm",
    "activation_fn_name": "swish",
}


@dataclass
class ModelArgs:
    """Everything needed to build an OpenELM; field names follow HF config.json."""

    num_transformer_layers: int
    model_dim: int
    head_dim: int
    num_query_heads: list[int]
    num_kv_heads: list[int]
    ffn_multipliers: list[float]
    vocab_size: int = 32000
    ffn_dim_divisor: int = 256
    num_gqa_groups: int | None = None
    qkv_multipliers: list[float] | None = None
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    rms_norm_eps: float = 1e-6
    rope_freq_constant: float = 10000.0
    rope_max_length: int = 4096
    max_context_length: int = 2048
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "openelm"
    quantization: dict | None = None
    # Fields of config.json that elm_mlx does not interpret, kept for round trips.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------
    def ffn_dim(self, layer: int) -> int:
        return make_divisible(self.ffn_multipliers[layer] * self.model_dim, self.ffn_dim_divisor)

    def qkv_out_dim(self, layer: int) -> int:
        return (self.num_query_heads[layer] + 2 * self.num_kv_heads[layer]) * self.head_dim

    def layer_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Checkpoint key suffix -> shape for one transformer layer."""
        d, hd = self.model_dim, self.head_dim
        q_dim = self.num_query_heads[layer] * hd
        shapes = {
            "attn_norm.weight": (d,),
            "attn.qkv_proj.weight": (self.qkv_out_dim(layer), d),
            "attn.out_proj.weight": (d, q_dim),
            "ffn_norm.weight": (d,),
            "ffn.proj_1.weight": (2 * self.ffn_dim(layer), d),
            "ffn.proj_2.weight": (d, self.ffn_dim(layer)),
        }
        if self.normalize_qk_projections:
            shapes["attn.q_norm.weight"] = (hd,)
            shapes["attn.k_norm.weight"] = (hd,)
        return shapes

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every float checkpoint key (HF names) -> its shape."""
        shapes = {"transformer.token_embeddings.weight": (self.vocab_size, self.model_dim)}
        for i in range(self.num_transformer_layers):
            for key, shape in self.layer_shapes(i).items():
                shapes[f"transformer.layers.{i}.{key}"] = shape
        shapes["transformer.norm.weight"] = (self.model_dim,)
        if not self.share_input_output_layers:
            shapes["lm_head.weight"] = (self.vocab_size, self.model_dim)
        return shapes

    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.weight_shapes().values())

    # ---- validation ----------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming every inconsistency at once."""
        problems = []
        n = self.num_transformer_layers
        if self.model_type != "openelm":
            problems.append(f"model_type is {self.model_type!r}, expected 'openelm'")
        for name in ("num_transformer_layers", "model_dim", "head_dim", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            value = getattr(self, name)
            if not isinstance(value, list) or len(value) != n:
                problems.append(f"{name} must list one value per layer ({n}), got {value!r}")
        if not problems:
            problems += self._head_problems()
        for name, supported in _FIXED_OPTIONS.items():
            if name in self.extra and self.extra[name] != supported:
                problems.append(
                    f"{name}={self.extra[name]!r} is not supported (only {supported!r})"
                )
        if not self.ffn_with_glu:
            problems.append("ffn_with_glu=false is not supported (OpenELM uses a GLU FFN)")
        if problems:
            raise ConfigError("invalid OpenELM config: " + "; ".join(problems))

    def _head_problems(self) -> list[str]:
        problems = []
        for i, (q, kv) in enumerate(zip(self.num_query_heads, self.num_kv_heads, strict=True)):
            if not (isinstance(q, int) and isinstance(kv, int)) or q <= 0 or kv <= 0:
                problems.append(f"layer {i}: head counts must be positive integers ({q}, {kv})")
            elif q % kv:
                problems.append(f"layer {i}: {q} query heads are not a multiple of {kv} KV heads")
            if self.ffn_multipliers[i] <= 0:
                problems.append(f"layer {i}: ffn multiplier must be > 0")
        return problems

    # ---- (de)serialisation ---------------------------------------------
    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        """Build from an HF/mlx-lm config.json dict (derived lists or scaling ranges)."""
        config = dict(config)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [
            k for k in ("num_transformer_layers", "model_dim", "head_dim") if k not in config
        ]
        if missing:
            raise ConfigError(f"config.json is missing {', '.join(missing)}")
        if config.get("model_type", "openelm") != "openelm":
            raise ConfigError(
                f"model_type is {config['model_type']!r}; elm_mlx only converts 'openelm' models"
            )
        for k in ("num_transformer_layers", "model_dim", "head_dim"):  # the lists derive from them
            if type(config[k]) is not int or config[k] <= 0:
                raise ConfigError(f"{k} must be a positive integer, got {config[k]!r}")
        _derive_layer_lists(config)
        kwargs = {k: v for k, v in config.items() if k in known}
        extra = {k: v for k, v in config.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"invalid OpenELM config: {e}") from None

    def to_dict(self) -> dict:
        """config.json content, readable by elm_mlx, mlx-lm and HF's OpenELM code."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out


def _derive_layer_lists(config: dict) -> None:
    """Fill per-layer lists from scaling ranges when the config gives only ranges."""
    n = config["num_transformer_layers"]
    ffn = config.get("ffn_multipliers")
    if ffn is not None and not (isinstance(ffn, list) and len(ffn) == n):
        lo, hi = _as_range(ffn, "ffn_multipliers")
        config["ffn_multipliers"] = linspace_rounded(lo, hi, n)
    if "num_query_heads" in config and "num_kv_heads" in config:
        return
    qkv = config.get("qkv_multipliers")
    groups = config.get("num_gqa_groups")
    if qkv is None or groups is None:
        raise ConfigError(
            "config.json needs either num_query_heads and num_kv_heads lists, "
            "or qkv_multipliers and num_gqa_groups to derive them"
        )
    if isinstance(qkv, list) and len(qkv) == n and n != 2:
        mults = [float(m) for m in qkv]
    else:
        mults = linspace_rounded(*_as_range(qkv, "qkv_multipliers"), n)
    q_heads, kv_heads = scaled_heads(config["model_dim"], config["head_dim"], groups, mults)
    config.setdefault("num_query_heads", q_heads)
    config.setdefault("num_kv_heads", kv_heads)


# ---- published models ---------------------------------------------------

_SIZES = {
    # name: (layers, model_dim, head_dim)
    "270M": (16, 1280, 64),
    "450M": (20, 1536, 64),
    "1_1B": (28, 2048, 64),
    "3B": (36, 3072, 128),
}

PRESETS = [f"OpenELM-{s}{v}" for s in _SIZES for v in ("", "-Instruct")]


def scaling_config(
    num_transformer_layers: int,
    model_dim: int,
    head_dim: int,
    *,
    num_gqa_groups: int = 4,
    qkv_multipliers: tuple[float, float] = (0.5, 1.0),
    ffn_multipliers: tuple[float, float] = (0.5, 4.0),
    ffn_dim_divisor: int = 256,
    vocab_size: int = 32000,
) -> dict:
    """A config.json dict given only the layer-wise scaling parameters."""
    return {
        "model_type": "openelm",
        "num_transformer_layers": num_transformer_layers,
        "model_dim": model_dim,
        "head_dim": head_dim,
        "num_gqa_groups": num_gqa_groups,
        "qkv_multipliers": list(qkv_multipliers),
        "ffn_multipliers": list(ffn_multipliers),
        "ffn_dim_divisor": ffn_dim_divisor,
        "vocab_size": vocab_size,
    }


def preset(name: str) -> ModelArgs:
    """ModelArgs of a published model, e.g. 'OpenELM-270M' or 'apple/OpenELM-3B-Instruct'."""
    short = name.split("/")[-1]
    size = short.removeprefix("OpenELM-").removesuffix("-Instruct")
    if short not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelArgs.from_dict(scaling_config(*_SIZES[size]))


def describe(args: ModelArgs) -> str:
    """A per-layer table of widths and the parameter count."""
    lines = [
        f"layers {args.num_transformer_layers}  model_dim {args.model_dim}  "
        f"head_dim {args.head_dim}  vocab {args.vocab_size}  "
        f"tied head {'yes' if args.share_input_output_layers else 'no'}",
        f"{'layer':>5} {'q heads':>8} {'kv heads':>9} {'ffn dim':>8} {'params':>12}",
    ]
    for i in range(args.num_transformer_layers):
        n = sum(math.prod(s) for s in args.layer_shapes(i).values())
        lines.append(
            f"{i:>5} {args.num_query_heads[i]:>8} {args.num_kv_heads[i]:>9} "
            f"{args.ffn_dim(i):>8} {n:>12,}"
        )
    total = args.num_parameters()
    lines.append(f"parameters: {total:,} ({total / 1e6:.1f}M)")
    if args.quantization:
        q = args.quantization
        lines.append(f"quantized: {q.get('bits')} bits, group size {q.get('group_size')}")
    return "\n".join(lines)
