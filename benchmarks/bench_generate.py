"""Generation speed: elm_mlx against mlx-lm and PyTorch on the same OpenELM-shaped weights.

    python benchmarks/bench_generate.py                 # OpenELM-270M shapes, 512 + 128 tokens
    python benchmarks/bench_generate.py --rounds 3      # contenders interleaved, best of 3
    python benchmarks/bench_generate.py --size 450M
    python benchmarks/bench_generate.py --quick         # a short run that checks the script

Random float32 weights with the published per-layer shapes are written once as a
Hugging Face checkpoint; every contender loads that same file. Each
configuration runs in its own interpreter because the BLAS choice is made once per
process, before MLX loads:

  elm_mlx                 as a user gets it (load_for_generation): system OpenBLAS
                          preloaded, CPU decode fast path
  elm_mlx (MLX path)      the same process setup with the fast path off
  elm_mlx (bundled BLAS)  ELM_MLX_BLAS=0: MLX's own BLAS, fast path on
  mlx-lm (OpenBLAS)       mlx-lm with the same OpenBLAS preloaded (kernel for kernel)
  mlx-lm (as installed)   mlx-lm with the BLAS its Linux wheel bundles (a reference BLAS)
  PyTorch CPU             the `openelm-pytorch` package (an unofficial implementation that
                          rebuilds its KV cache with torch.cat each step), use_kv_cache=True

Prompt tokens/s is prompt length / time to the first generated token; decode
tokens/s counts the tokens after the first (mlx-lm's convention). Greedy sampling;
the script exits with status 1 when the float32 contenders' greedy tokens differ.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONTENDERS = {
    # name: (worker, extra environment, worker flags)
    "elm_mlx": ("elm_mlx", {}, []),
    "elm_mlx (MLX path)": ("elm_mlx", {}, ["--no-fast"]),
    "elm_mlx (bundled BLAS)": ("elm_mlx", {"ELM_MLX_BLAS": "0"}, []),
    "mlx-lm (OpenBLAS)": ("mlx_lm", {"BENCH_PRELOAD": "1"}, []),
    "mlx-lm (as installed)": ("mlx_lm", {}, []),
    "PyTorch CPU": ("torch", {}, []),
}
# With --dtypes: MLX's CPU kernels in half precision (the fast path is float32 only).
DTYPE_CONTENDERS = {
    "elm_mlx bfloat16": ("elm_mlx", {}, ["--dtype", "bfloat16"]),
    "elm_mlx float16": ("elm_mlx", {}, ["--dtype", "float16"]),
}


# ---- workers: one configuration each, in a fresh interpreter ------------------------


def prompt_ids(n: int, vocab: int, seed: int = 1) -> list[int]:
    import numpy as np

    return [1] + np.random.default_rng(seed).integers(3, vocab, n - 1).tolist()


def timed_generation(steps, n_prompt: int) -> tuple[float, float, list[int]]:
    """(prompt tok/s, decode tok/s, tokens) from an iterator of generated tokens."""
    start = time.perf_counter()
    tokens, first = [], None
    for token in steps:
        tokens.append(int(token))
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    decode = (len(tokens) - 1) / (end - first) if len(tokens) > 1 else 0.0
    return n_prompt / (first - start), decode, tokens


def best_of(run, repeats: int) -> dict:
    """Warm up once on a short prompt, then keep the best prompt and decode rates."""
    run(16, 4)
    results = [run(None, None) for _ in range(repeats)]
    return {
        "prompt_tps": max(r[0] for r in results),
        "decode_tps": max(r[1] for r in results),
        "tokens": results[-1][2][:16],
    }


def worker_elm_mlx(opts) -> dict:
    from elm_mlx.runtime.blas import blas_description, preload_blas

    preload_blas()
    import mlx.core as mx

    from elm_mlx.generation.generate import generate_step
    from elm_mlx.generation.loading import load_for_generation

    model, _, _ = load_for_generation(
        opts.model, dtype=opts.dtype or "auto", fast_path=not opts.no_fast
    )
    args = model.args

    def run(n_prompt, n_new):
        ids = prompt_ids(n_prompt or opts.prompt_tokens, args.vocab_size)
        steps = (t for t, _ in generate_step(ids, model, max_tokens=n_new or opts.new_tokens))
        return timed_generation(steps, len(ids))

    out = best_of(run, opts.repeats)
    out.update(blas=blas_description(), peak_mlx_gb=mx.get_peak_memory() / 1e9)
    return out


def worker_mlx_lm(opts) -> dict:
    if os.environ.get("BENCH_PRELOAD"):
        from elm_mlx.runtime.blas import preload_blas

        if preload_blas() is None:
            raise SystemExit("no system OpenBLAS to preload")
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, config = load_model(Path(opts.model))

    def run(n_prompt, n_new):
        ids = mx.array(prompt_ids(n_prompt or opts.prompt_tokens, config["vocab_size"]))
        gen = generate_step(ids, model, max_tokens=n_new or opts.new_tokens)
        return timed_generation((t for t, _ in gen), ids.size)

    out = best_of(run, opts.repeats)
    out.update(peak_mlx_gb=mx.get_peak_memory() / 1e9)
    return out


def torch_model(path: str):
    import torch
    from openelm_pytorch.openelm import ModelConfig, OpenELM
    from safetensors.torch import load_file

    config = json.loads((Path(path) / "config.json").read_text())
    size = {1280: "OpenELM-270M", 1536: "OpenELM-450M"}[config["model_dim"]]
    model = OpenELM.from_config(ModelConfig.from_name(size, vocab_size=config["vocab_size"]))
    state = load_file(str(Path(path) / "model.safetensors"))
    model.load_state_dict({k.removeprefix("transformer."): v for k, v in state.items()})
    return model.eval().to(torch.float32)


def torch_steps(model, ids: list[int], n_new: int):
    import torch

    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_kv_cache=True)  # use_kv_cache also applies RoPE
        for i in range(n_new):
            token = out["logits"][0, -1].argmax()
            yield int(token)
            if i + 1 < n_new:
                out = model(token.view(1, 1), kv_cache=out["kv_cache"], use_kv_cache=True)


def worker_torch(opts) -> dict:
    import torch

    model = torch_model(opts.model)
    vocab = model.token_embeddings.num_embeddings

    def run(n_prompt, n_new):
        ids = prompt_ids(n_prompt or opts.prompt_tokens, vocab)
        return timed_generation(torch_steps(model, ids, n_new or opts.new_tokens), len(ids))

    out = best_of(run, opts.repeats)
    out.update(blas=f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    return out


WORKERS = {"elm_mlx": worker_elm_mlx, "mlx_lm": worker_mlx_lm, "torch": worker_torch}


def run_worker(opts) -> None:
    out = WORKERS[opts.worker](opts)
    out["maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print("RESULT " + json.dumps(out))


# ---- the parent: weights, bandwidth, contenders, table ------------------------------


def checkpoint(size: str, seed: int, workdir: Path) -> Path:
    """A random checkpoint with the published shapes, written once and reused; with the
    shipped nano model's tokenizer.model, so that it loads as a user's model directory."""
    from elm_mlx.formats.modeldir import TOKENIZER_FILE, default_model_path
    from elm_mlx.testing import random_preset_checkpoint

    path = workdir / f"OpenELM-{size}-seed{seed}"
    if not (path / "model.safetensors").exists():
        print(f"writing random OpenELM-{size} weights to {path} ...", file=sys.stderr)
        tmp = path.with_name(path.name + ".tmp")
        random_preset_checkpoint(tmp, f"OpenELM-{size}", seed)
        tmp.rename(path)
    if not (path / TOKENIZER_FILE).exists():
        shutil.copyfile(default_model_path() / TOKENIZER_FILE, path / TOKENIZER_FILE)
    return path


def copy_bandwidth(gb: float = 0.5, threads: int = os.cpu_count() or 1) -> float:
    """Memory bandwidth in GB/s: bytes read plus written by a large copy on every core."""
    import numpy as np

    src = np.ones(int(gb * 1e9) // 4, np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(p[0], p[-1] + 1) for p in parts]

    def copy(lo, hi):
        np.copyto(dst[lo:hi], src[lo:hi])

    best = float("inf")
    for _ in range(5):
        workers = [threading.Thread(target=copy, args=b) for b in bounds]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def bytes_per_token(args, context: int) -> int:
    """Weights (the tied head once) plus the K/V cache read for one decoded token."""
    weights = 4 * args.num_parameters()
    kv = sum(2 * kv_heads * context * args.head_dim * 4 for kv_heads in args.num_kv_heads)
    return weights + kv


def run_rounds(names: list[str], opts, model_dir: Path) -> dict:
    """Every contender once per round (interleaved in time); keep each one's best rates."""
    best: dict = {name: None for name in names}
    for _ in range(opts.rounds):
        for name in names:
            r = run_contender(name, opts, model_dir)
            if r is None:
                continue
            b = best[name] or {**r, "decode_all": [], "prompt_all": []}
            b["decode_all"].append(r["decode_tps"])
            b["prompt_all"].append(r["prompt_tps"])
            b["decode_tps"], b["prompt_tps"] = max(b["decode_all"]), max(b["prompt_all"])
            best[name] = b
    return best


def run_contender(name: str, opts, model_dir: Path) -> dict | None:
    worker, env, flags = {**CONTENDERS, **DTYPE_CONTENDERS}[name]
    cmd = [sys.executable, __file__, "--worker", worker, "--model", str(model_dir)]
    cmd += ["--prompt-tokens", str(opts.prompt_tokens), "--new-tokens", str(opts.new_tokens)]
    cmd += ["--repeats", str(opts.repeats), *flags]
    print(f"running {name} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    print(f"  {name} failed: {tail}", file=sys.stderr)
    return None


# ---- where decode time goes ---------------------------------------------------------


class ExclusiveTimer:
    """Wraps functions; each call's time goes to its label, minus time spent in wrapped callees."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.stack: list[float] = []

    def wrap(self, module, name: str, label: str) -> None:
        fn = getattr(module, name)

        def timed(*a, **k):
            self.stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                elapsed = time.perf_counter() - start
                inner = self.stack.pop()
                self.totals[label] = self.totals.get(label, 0.0) + elapsed - inner
                if self.stack:
                    self.stack[-1] += elapsed

        setattr(module, name, timed)


FAST_PARTS = {
    "_matvec": "matrix-vector products (gemv)",
    "_sdpa": "attention: softmax(QK)V",
    "_rope": "attention: RoPE",
    "_attention": "attention: split, cache append",
    "_rms_norm": "RMSNorm (block, final, QK)",
    "_glu": "GLU (silu * up)",
    "_prepare": "MLX sync: cache updates, RoPE table",
}


def fast_path_breakdown(model, ids: list[int], n_new: int) -> tuple[dict, float]:
    """Per-part seconds per token of the CPU fast path, and the whole step time."""
    from elm_mlx.generation.generate import generate_step
    from elm_mlx.runtime import fastpath

    timer = ExclusiveTimer()
    for name, label in FAST_PARTS.items():
        timer.wrap(fastpath, name, label)
    decoder = fastpath.CpuDecoder(model)
    steps = generate_step(ids, decoder, max_tokens=n_new + 1)
    next(steps)  # prompt, then reset the clocks
    timer.totals.clear()
    start = time.perf_counter()
    for _ in steps:
        pass
    per_token = (time.perf_counter() - start) / n_new
    return {k: v / n_new for k, v in timer.totals.items()}, per_token


MM, NORM = "matmuls (sgemm, one row)", "RMSNorm"


def mlx_path_breakdown(model, ids: list[int], n_new: int) -> tuple[dict, float]:
    """Per-part seconds per token of the plain MLX step, timed with a sync after every op."""
    import mlx.core as mx

    cache = model.make_cache()
    model(mx.array([ids[:-1]]), cache=cache)
    mx.eval([c.state for c in cache])
    y = mx.array([[ids[-1]]])
    start = time.perf_counter()
    for _ in range(n_new):
        y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1, keepdims=True)
        mx.eval(y)
    per_token = (time.perf_counter() - start) / n_new
    totals: dict[str, float] = {}

    def op(label, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        mx.eval(out)
        totals[label] = totals.get(label, 0.0) + time.perf_counter() - start
        return out

    t = model.transformer
    for _ in range(n_new):
        h = op("embedding", t.token_embeddings, y)
        for block, c in zip(t.layers, cache, strict=True):
            h = _block_ops(block, h, c, op)
        logits = op(MM, model.head, op(NORM, t.norm, h))
        y = op("sampling (argmax)", lambda x: mx.argmax(x[:, -1], axis=-1, keepdims=True), logits)
    return {k: v / n_new for k, v in totals.items()}, per_token


def _block_ops(block, h, cache, op):
    import mlx.core as mx

    a, f = block.attn, block.ffn
    qkv = op(MM, a.qkv_proj, op(NORM, block.attn_norm, h))
    o = op("attention: QK-norm, RoPE, cache, sdpa", a.attend, qkv, None, cache)
    h = op("residual adds", mx.add, h, op(MM, a.out_proj, o))
    g = op(MM, f.proj_1, op(NORM, block.ffn_norm, h))
    g = op("GLU (silu * up)", _glu, g)
    return op("residual adds", mx.add, h, op(MM, f.proj_2, g))


def _glu(u):
    import mlx.core as mx
    import mlx.nn as nn

    gate, up = mx.split(u, 2, axis=-1)  # as FeedForward does
    return nn.silu(gate) * up


def worker_breakdown(opts) -> dict:
    from elm_mlx.runtime.blas import preload_blas

    preload_blas()
    from elm_mlx.formats.modeldir import load_model

    model, args = load_model(opts.model)
    ids = prompt_ids(opts.prompt_tokens, args.vocab_size)
    n = min(opts.new_tokens, 32)
    fast, fast_total = fast_path_breakdown(model, ids, n)
    plain, plain_total = mlx_path_breakdown(model, ids, min(n, 8))
    return {"fast": fast, "fast_total": fast_total, "mlx": plain, "mlx_total": plain_total}


WORKERS["breakdown"] = worker_breakdown


# ---- the report ---------------------------------------------------------------------


def _x(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def print_table(results: dict, ceiling: float) -> None:
    head = f"{'contender':24} {'prompt tok/s':>12} {'decode tok/s':>12} {'of ceiling':>10}"
    print(head + f" {'peak MLX GB':>11} {'max RSS GB':>10}  decode, all rounds")
    for name, r in results.items():
        if r is None:
            print(f"{name:24} {'failed':>12}")
            continue
        mlx_gb = f"{r['peak_mlx_gb']:.2f}" if "peak_mlx_gb" in r else "-"
        spread = " ".join(f"{d:.2f}" for d in r["decode_all"])
        print(
            f"{name:24} {r['prompt_tps']:12.1f} {r['decode_tps']:12.2f} "
            f"{r['decode_tps'] / ceiling:10.0%} {mlx_gb:>11} {r['maxrss_gb']:10.2f}  {spread}"
        )


def greedy_tokens_differ(results: dict) -> list[str]:
    """Print whether the float32 contenders' first 16 greedy tokens agree; those that do not."""
    firsts = {n: r["tokens"] for n, r in results.items() if r and n not in DTYPE_CONTENDERS}
    ref = next(iter(firsts.values()), None)
    differ = [n for n, t in firsts.items() if t != ref]
    print(f"greedy tokens (first 16) differ from {next(iter(firsts), '-')}'s: {differ or 'none'}")
    return differ


def print_ratios(results: dict) -> None:
    anchors = ["mlx-lm (OpenBLAS)", "mlx-lm (as installed)", "PyTorch CPU"]
    print(f"\nratios, prompt / decode   {'  '.join(f'{a:>23}' for a in anchors)}")
    for name in results:
        if not name.startswith("elm_mlx") or results[name] is None:
            continue
        cells = []
        for anchor in anchors:
            a, r = results.get(anchor), results[name]
            p = _x(r["prompt_tps"], a and a["prompt_tps"])
            d = _x(r["decode_tps"], a and a["decode_tps"])
            cells.append(f"{p + ' / ' + d:>23}")
        print(f"{name:24}  {'  '.join(cells)}")


def print_breakdown(b: dict, context: int) -> None:
    print(f"\nwhere decode time goes (context ~{context} tokens, OpenBLAS preloaded, ms per token)")
    for title, parts, total in (
        ("elm_mlx CPU fast path", b["fast"], b["fast_total"]),
        ("MLX path (elm_mlx --no-fast; mlx-lm runs the same kernels)", b["mlx"], b["mlx_total"]),
    ):
        timed = sum(parts.values())
        print(f"  {title}: {total * 1e3:.1f} ms/token measured")
        rows = dict(sorted(parts.items(), key=lambda kv: -kv[1]))
        if timed < total:
            rows["sampling, Python and the rest"] = total - timed
        else:
            rows["(a sync after every op adds)"] = timed - total
        for label, sec in rows.items():
            print(f"    {label:42} {sec * 1e3:8.2f} ms {sec / max(total, timed):6.1%}")


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for pkg in ("mlx", "mlx-lm", "torch", "numpy"):
        try:
            found.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            found.append(f"{pkg} missing")
    return ", ".join(found)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="270M", choices=["270M", "450M"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="measured runs per process (best)")
    p.add_argument(
        "--rounds", type=int, default=1, help="rounds over all contenders, interleaved (best)"
    )
    p.add_argument("--only", help="comma-separated contender names (default: all)")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--dtypes", action="store_true", help="also time bfloat16 and float16 (slow)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a 32-token prompt and 8 new tokens: checks that every contender runs",
    )
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "elm_mlx_bench"))
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--no-fast", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse(argv)
    if opts.worker:
        run_worker(opts)
        return 0
    if opts.quick:
        opts.prompt_tokens, opts.new_tokens = 32, 8
    from elm_mlx.model.config import preset

    args = preset(f"OpenELM-{opts.size}")
    model_dir = checkpoint(opts.size, opts.seed, Path(opts.workdir))
    load = os.getloadavg()
    bandwidth = copy_bandwidth()
    context = opts.prompt_tokens + opts.new_tokens // 2
    per_token = bytes_per_token(args, context)
    ceiling = bandwidth * 1e9 / per_token
    names = opts.only.split(",") if opts.only else list(CONTENDERS)
    names += list(DTYPE_CONTENDERS) if opts.dtypes else []
    results = run_rounds(names, opts, model_dir)
    breakdown = None if opts.no_breakdown else run_breakdown(opts, model_dir)
    print(
        f"OpenELM-{opts.size} shapes, random float32 weights; prompt {opts.prompt_tokens} tokens, "
        f"{opts.new_tokens} new (greedy); best of {opts.rounds} rounds x {opts.repeats} runs"
    )
    print(versions())
    after = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores; load average {load[0]:.2f} before, {after:.2f} after")
    for name, r in results.items():
        if r and "blas" in r:
            print(f"{name} BLAS: {r['blas']}")
    print(
        f"memory bandwidth (copy, all cores): {bandwidth:.1f} GB/s; {per_token / 1e9:.3f} GB read "
        f"per decoded token -> ceiling {ceiling:.1f} tok/s\n"
    )
    print_table(results, ceiling)
    print_ratios(results)
    differ = greedy_tokens_differ(results)
    if breakdown:
        print_breakdown(breakdown, context)
    return 1 if differ else 0


def run_breakdown(opts, model_dir: Path) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", "breakdown", "--model", str(model_dir)]
    cmd += ["--prompt-tokens", str(opts.prompt_tokens), "--new-tokens", str(opts.new_tokens)]
    print("measuring where decode time goes ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    print(f"  breakdown failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
    return None


if __name__ == "__main__":
    sys.exit(main())
