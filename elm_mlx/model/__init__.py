"""The OpenELM model: its configuration (layer-wise scaling), the MLX module and the KV cache."""

from .cache import KVCache, make_cache
from .config import ModelArgs
from .openelm import OpenELM

__all__ = ["KVCache", "ModelArgs", "OpenELM", "make_cache"]
