"""Give MLX's Linux CPU backend a fast BLAS, before MLX is imported.

MLX's Linux CPU wheel links a reference BLAS: its float32 matmuls (every
`nn.Linear`) are slow. Loading a system OpenBLAS with RTLD_GLOBAL before
`import mlx.core` makes the dynamic linker resolve MLX's `cblas_sgemm` to
OpenBLAS instead (benchmarks/README.md has the numbers). It has to
happen before MLX loads, so `elm-mlx` calls `preload_blas()` first thing.

`ELM_MLX_BLAS=0` turns this off; `ELM_MLX_BLAS=/path/libopenblas.so.0` picks a
library. On Debian/Ubuntu the library comes with `apt install libopenblas0-pthread`,
on Fedora with `dnf install openblas-threads`. macOS needs none of this (MLX
uses Accelerate there).

This module imports nothing from MLX.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

ENV = "ELM_MLX_BLAS"

# Where distributions put the OpenBLAS shared library (pthread builds first).
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)


class BlasError(FileNotFoundError):
    """ELM_MLX_BLAS names a library that cannot be loaded."""


# What the last preload_blas() call did: (library path or None, one-line reason).
_state: tuple[str | None, str] = (None, "no BLAS preload was attempted")


def find_openblas() -> str | None:
    """Path of a system OpenBLAS shared library, or None."""
    for candidate in _CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return ctypes.util.find_library("openblas")


def preload_blas(verbose: bool = False) -> str | None:
    """Load a system OpenBLAS for MLX's CPU matmuls; return its path, or None when not loaded.

    Does nothing (returns None) off Linux, when `ELM_MLX_BLAS=0`, when no OpenBLAS
    is installed, or when `mlx.core` is already imported (too late to take effect).
    Raises BlasError if `ELM_MLX_BLAS` names a library that does not load.
    """
    global _state
    if _state[0] is None:
        _state = _load(*_choose())
    if verbose:
        print(f"[elm_mlx] BLAS: {blas_description()}", file=sys.stderr)
    return _state[0]


def _load(path: str | None, why: str) -> tuple[str | None, str]:
    if path is None:
        return None, why
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        if why == f"from {ENV}":
            msg = f"{ENV}={path} could not be loaded ({e}); fix the path or set it to 0"
            raise BlasError(msg) from None
        return None, f"{path} failed to load ({e})"
    return path, why


def _choose() -> tuple[str | None, str]:
    """(library to load or None, why) from the platform and ELM_MLX_BLAS."""
    setting = os.environ.get(ENV, "").strip()
    if setting == "0":
        return None, f"{ENV}=0"
    if not sys.platform.startswith("linux"):
        return None, f"not needed on {sys.platform}"
    if "mlx.core" in sys.modules:
        return None, "mlx.core was imported before preload_blas() ran, too late to choose"
    if setting not in ("", "1"):
        if not Path(setting).exists():
            raise BlasError(f"{ENV}={setting}: no such file; point it at libopenblas.so.0 or 0")
        return setting, f"from {ENV}"
    found = find_openblas()
    if found is None:
        return None, "no system OpenBLAS found (Debian/Ubuntu: apt install libopenblas0-pthread)"
    return found, "system OpenBLAS"


def blas_description() -> str:
    """One line saying which BLAS MLX's CPU matmuls use in this process, and why."""
    path, why = _state
    if path is not None:
        return f"OpenBLAS {path} ({why}, loaded before MLX)"
    if sys.platform == "darwin":
        return "Accelerate (MLX's own on macOS)"
    if _openblas_mapped():
        return f"an OpenBLAS already in the process (LD_PRELOAD?); {why}"
    return f"MLX's bundled reference BLAS (slow float32 matmuls): {why}"


def _openblas_mapped() -> bool:
    try:
        return "libopenblas" in Path("/proc/self/maps").read_text()
    except OSError:
        return False
