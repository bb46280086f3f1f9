"""Converter peak memory and wall time on a 270M-shaped random checkpoint.

    python benchmarks/bench_convert.py [--workdir DIR] [--no-mlx-lm]

Writes random float32 weights with OpenELM-270M's exact shapes (and a bfloat16
copy), converts each to bfloat16 and float32 in a fresh subprocess, and prints
the child's peak resident memory (ru_maxrss) next to the output size. The
"baseline" rows are the same interpreter after importing the converter only,
so peak - baseline is the memory the conversion itself used. mlx_lm.convert on
the same checkpoint is measured the same way for comparison. Other processes on
the machine skew wall times; memory is per process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Each child prints its own conversion time and peak RSS (ru_maxrss: KiB on Linux, bytes on
# macOS). With SRC "-" it only imports the converter: the baseline.
CHILD = """
import json, resource, sys, time
{imports}
src, out, dtype, shard = sys.argv[1:5]
seconds = 0.0
if src != "-":
    t = time.perf_counter()
    {call}
    seconds = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": seconds, "maxrss": rss * (1 if sys.platform == "darwin" else 1024)}}))
"""
OURS = CHILD.format(
    imports="from elm_mlx.formats.convert import convert",
    call="convert(src, out, dtype=dtype, max_shard_bytes=int(shard))",
)
# mlx-lm builds the whole model, then saves it; its tokenizer load imports transformers.
MLX_LM = CHILD.format(
    imports="from mlx_lm.convert import convert\nimport transformers",
    call="convert(src, out, dtype=dtype)",
)


def make_sources(work: Path) -> tuple[Path, Path]:
    """A float32 270M-shaped checkpoint and a bfloat16 copy, each with tokenizer.model."""
    import mlx.core as mx

    from elm_mlx.testing import random_preset_checkpoint, tiny_tokenizer

    f32 = work / "src-float32"
    if not (f32 / "model.safetensors").exists():
        random_preset_checkpoint(f32, "OpenELM-270M", seed=0)
    bf16 = work / "src-bfloat16"
    if not (bf16 / "model.safetensors").exists():
        bf16.mkdir(exist_ok=True)
        shutil.copy(f32 / "config.json", bf16 / "config.json")
        weights = mx.load(str(f32 / "model.safetensors"))
        mx.save_safetensors(
            str(bf16 / "model.safetensors"),
            {k: v.astype(mx.bfloat16) for k, v in weights.items()},
            {"format": "pt"},
        )
    for src in (f32, bf16):
        tiny_tokenizer(src / "tokenizer.model")
    return f32, bf16


def run(script: str, *argv: str) -> tuple[float, dict]:
    """(wall seconds, the child's JSON: seconds converting, peak RSS bytes)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.name.endswith(".safetensors"))


HEADER = (
    f"{'tool':<8} {'source':<9} {'output':<9} {'out GB':>7} {'wall s':>7} {'convert s':>9} "
    f"{'peak GB':>8} {'-base GB':>9} {'/out':>6}"
)


def report(work: Path, sources: list[Path], tools: dict[str, str], shard: int) -> None:
    """One row per (tool, source, output dtype); peak memory against the import baseline."""
    print(HEADER)
    for tool, script in tools.items():
        _, base = run(script, "-", "-", "-", "0")
        base_gb = base["maxrss"] / 1e9
        print(f"{tool:<8} {'baseline (imports only)':<45} {'':>9} {base_gb:>8.2f}")
        cases = [(src, dtype, 5 << 30) for src in sources for dtype in ("bfloat16", "float32")]
        if tool == "elm_mlx":
            cases.append((sources[0], "float32", shard))
        for src, dtype, max_shard in cases:
            out = work / f"out-{tool}"
            wall, r = run(script, str(src), str(out), dtype, str(max_shard))
            out_gb, peak = size(out) / 1e9, r["maxrss"] / 1e9
            used = peak - base_gb
            shards = len(list(out.glob("*.safetensors")))
            print(
                f"{tool:<8} {src.name[4:]:<9} {dtype:<9} {out_gb:>7.2f} {wall:>7.1f} "
                f"{r['seconds']:>9.1f} {peak:>8.2f} {used:>9.2f} {used / out_gb:>6.2f}"
                + (f"  ({shards} shards of <= {max_shard / 1e6:.0f} MB)" if shards > 1 else "")
            )
            shutil.rmtree(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None, help="keep sources here between runs")
    p.add_argument("--no-mlx-lm", action="store_true", help="skip the mlx_lm.convert rows")
    p.add_argument(
        "--shard-mb", type=int, default=256, help="shard size of the extra sharded row (MB)"
    )
    p.add_argument("--make-sources", type=Path, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.make_sources:
        make_sources(opts.make_sources)
        return
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    # In a child: a parent that held the weights would pass its RSS on to every child
    # (Linux keeps ru_maxrss across fork and exec).
    subprocess.run([sys.executable, __file__, "--make-sources", str(work)], check=True)
    sources = [work / "src-float32", work / "src-bfloat16"]
    tools = {"elm_mlx": OURS} if opts.no_mlx_lm else {"elm_mlx": OURS, "mlx_lm": MLX_LM}
    print(f"OpenELM-270M-shaped random checkpoint in {work}; {os.cpu_count()} CPUs (shared)")
    report(work, sources, tools, opts.shard_mb * 10**6)
    if opts.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
