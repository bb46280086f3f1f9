"""The loss curve of a training run as a PNG, from its metrics.jsonl.

Uses matplotlib when it is installed; otherwise draws the curves itself with
zlib (train loss blue, validation loss orange, axis extents labelled with a
tiny built-in font), so that a run always leaves a picture behind.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path

TRAIN_RGB = (31, 119, 180)
VALID_RGB = (255, 127, 14)
# 3 x 5 glyphs, one string of 3 pixels per row.
_FONT = {
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"), "3": ("###", "..#", "###", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", "..#", "..#", "..#"),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "###"),
    ".": ("...", "...", "...", "...", ".#."), "-": ("...", "...", "###", "...", "..."),
    "e": ("...", "###", "###", "#..", "###"), " ": ("...",) * 5,
    "t": (".#.", "###", ".#.", ".#.", ".##"), "r": ("...", "###", "#..", "#..", "#.."),
    "a": ("...", "##.", ".##", "#.#", "###"), "i": (".#.", "...", ".#.", ".#.", ".#."),
    "n": ("...", "##.", "#.#", "#.#", "#.#"), "v": ("...", "#.#", "#.#", "#.#", ".#."),
    "l": ("##.", ".#.", ".#.", ".#.", "###"), "d": ("..#", "..#", "###", "#.#", "###"),
    "s": (".##", "#..", ".#.", "..#", "##."), "p": ("...", "###", "#.#", "###", "#.."),
    "o": ("...", "###", "#.#", "#.#", "###"),
}  # fmt: skip


def read_losses(metrics: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, validation) lists of (step, loss) from a metrics.jsonl file."""
    train, valid = [], []
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "train_loss" in r:
            train.append((r["step"], r["train_loss"]))
        if "val_loss" in r:
            valid.append((r["step"], r["val_loss"]))
    return train, valid


def plot_losses(metrics: Path, png: Path) -> str:
    """Write the loss curve; returns a one-line note saying where (or why not)."""
    train, valid = read_losses(metrics)
    points = [p for p in train + valid if math.isfinite(p[1])]
    if len(points) < 2:
        return "loss curve skipped: fewer than two loss values were logged"
    tmp = png.with_name(f".{png.name}.tmp")
    try:
        _plot_matplotlib(train, valid, tmp)
        how = "matplotlib"
    except ImportError:
        tmp.write_bytes(_plot_png(train, valid))
        how = "built-in plotter; pip install matplotlib for labelled axes"
    os.replace(tmp, png)
    return f"loss curve written to {png} ({how})"


def _plot_matplotlib(train, valid, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for series, label, rgb in ((train, "train", TRAIN_RGB), (valid, "validation", VALID_RGB)):
        if series:
            color = tuple(c / 255 for c in rgb)
            steps, losses = zip(*series, strict=True)
            marker = "." if len(series) < 30 else ""
            ax.plot(steps, losses, label=label, color=color, marker=marker)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def _plot_png(train, valid, width: int = 640, height: int = 400) -> bytes:
    canvas = _Canvas(width, height)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    points = [p for p in train + valid if math.isfinite(p[1])]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)

    def to_px(step, loss):
        px = left + (step - x0) * (right - left) / (x1 - x0)
        py = bottom - (loss - y0) * (bottom - top) / (y1 - y0)
        return round(px), round(py)

    canvas.line(left, bottom, right, bottom, (0, 0, 0))
    canvas.line(left, bottom, left, top, (0, 0, 0))
    for series, rgb in ((train, TRAIN_RGB), (valid, VALID_RGB)):
        pts = [to_px(*p) for p in series if math.isfinite(p[1])]
        for a, b in zip(pts, pts[1:], strict=False):
            canvas.line(*a, *b, rgb)
        for x, y in pts if len(pts) < 30 else []:
            canvas.box(x - 1, y - 1, 3, 3, rgb)
    canvas.text(4, top, f"{y1:.3g}")
    canvas.text(4, bottom - 10, f"{y0:.3g}")
    canvas.text(left, bottom + 8, str(x0))
    canvas.text(right - 8 * len(str(x1)), bottom + 8, str(x1))
    canvas.text((left + right) // 2 - 16, bottom + 22, "step")
    canvas.text(4, (top + bottom) // 2, "loss")
    for k, (name, rgb) in enumerate((("train", TRAIN_RGB), ("valid", VALID_RGB))):
        canvas.box(right - 70, top + 14 * k + 2, 12, 6, rgb)
        canvas.text(right - 52, top + 14 * k, name)
    return canvas.png()


class _Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def set(self, x: int, y: int, rgb) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i : i + 3] = bytes(rgb)

    def box(self, x: int, y: int, w: int, h: int, rgb) -> None:
        for yy in range(y, y + h):
            for xx in range(x, x + w):
                self.set(xx, yy, rgb)

    def line(self, x0: int, y0: int, x1: int, y1: int, rgb) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(n + 1):
            x, y = x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n
            self.box(round(x), round(y), 2, 2, rgb)

    def text(self, x: int, y: int, s: str, scale: int = 2) -> None:
        for k, ch in enumerate(s):
            for r, row in enumerate(_FONT.get(ch, _FONT[" "])):
                for c, bit in enumerate(row):
                    if bit == "#":
                        self.box(x + (4 * k + c) * scale, y + r * scale, scale, scale, (0, 0, 0))

    def png(self) -> bytes:
        rows = b"".join(
            b"\x00" + bytes(self.px[3 * self.w * y : 3 * self.w * (y + 1)]) for y in range(self.h)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows, 6))
            + chunk(b"IEND", b"")
        )
