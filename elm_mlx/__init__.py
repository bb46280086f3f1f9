"""elm_mlx: run, quantize and fine-tune Apple's OpenELM models with MLX."""

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import elm_mlx` does not import MLX before the CLI has had
    # a chance to choose a BLAS library.
    if name == "load":
        from .formats.modeldir import load

        return load
    raise AttributeError(f"module 'elm_mlx' has no attribute {name!r}")
