"""The loss curve of a training run as a PNG, from its metrics.jsonl (matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

from ..formats.files import atomic_path
from .checkpoint import read_records, writing

PLOT_FILE = "loss.png"
INSTALL_HINT = "pip install 'elm-mlx[train]'"


def read_losses(metrics: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, validation) lists of (step, loss) from a metrics.jsonl file."""
    records = read_records(metrics) if metrics.is_file() else []
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    return train, valid


def plot_losses(metrics: Path, png: Path) -> str:
    """Write the loss curve; returns a one-line note saying where (or why not)."""
    train, valid = read_losses(metrics)
    if len([p for p in train + valid if math.isfinite(p[1])]) < 2:
        return "loss curve skipped: fewer than two loss values were logged"
    try:
        import matplotlib
    except ImportError:
        return f"loss curve skipped: matplotlib is not installed ({INSTALL_HINT})"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for series, label in ((train, "train"), (valid, "validation")):
        if series:
            steps, losses = zip(*series, strict=True)
            ax.plot(steps, losses, label=label, marker="." if len(series) < 30 else "")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with writing(png), atomic_path(png) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return f"loss curve written to {png}"
