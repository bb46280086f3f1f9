"""GGUF export cost, and llama.cpp's speed on the exported file next to elm_mlx's.

    python benchmarks/bench_export.py                # OpenELM-270M shapes, random weights
    python benchmarks/bench_export.py --quick        # the shipped nano model, short runs

Export: `export_gguf` to f16, q8_0, q4_0 and f32, each in a fresh interpreter that prints
its export time and peak resident memory (ru_maxrss); the "baseline" row is the same
interpreter after the imports only. Speed (when llama-cpp-python is installed): llama.cpp
on each exported file and elm_mlx on the same weights (`load_for_generation`, as a user
gets it: float32 on the CPU with the numpy decode fast path), greedy, one process per
contender. Prompt tokens/s = prompt length / time to evaluate it (first logits); decode
tokens/s counts the tokens after the first. Threads: all cores for both runtimes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXPORT_CHILD = """
import json, resource, sys, time
from elm_mlx.runtime.blas import preload_blas
preload_blas()
from elm_mlx.formats.gguf import export_gguf
from elm_mlx.training.finetune import load_fused
src, out, type_name = sys.argv[1:4]
seconds = 0.0
if src != "-":
    t = time.perf_counter()
    model, tokenizer = load_fused(src, de_quantize=True)
    name = src.rstrip("/").split("/")[-1]
    export_gguf(model, tokenizer, out, name=name, type_name=type_name, force=True)
    seconds = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "maxrss": rss * (1 if sys.platform == "darwin" else 1024)}))
"""


def source(work: Path, quick: bool) -> Path:
    """The model to export: nano (quick) or 270M-shaped random float32 weights."""
    if quick:
        from elm_mlx.formats.modeldir import DEFAULT_MODEL

        return DEFAULT_MODEL
    from elm_mlx.testing import random_preset_checkpoint, tiny_tokenizer

    path = work / "OpenELM-270M-random"
    if not (path / "model.safetensors").exists():
        print(f"writing random OpenELM-270M weights to {path} ...", file=sys.stderr)
        random_preset_checkpoint(path, "OpenELM-270M", seed=0)
    if not (path / "tokenizer.model").exists():
        tiny_tokenizer(path / "tokenizer.model")
    return path


def child(script: str, *argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                          text=True, check=False, cwd=ROOT)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export_rows(src: Path, work: Path, types: list[str]) -> dict[str, Path]:
    base = child(EXPORT_CHILD, "-", "-", "-")["maxrss"] / 1e9
    print(f"{'export':<8} {'file MB':>8} {'seconds':>8} {'peak GB':>8} {'-base GB':>9}")
    print(f"{'baseline':<8} {'':>8} {'':>8} {base:>8.2f}")
    files = {}
    for type_name in types:
        out = work / f"{src.name}-{type_name}.gguf"
        r = child(EXPORT_CHILD, str(src), str(out), type_name)
        peak = r["maxrss"] / 1e9
        print(f"{type_name:<8} {out.stat().st_size / 1e6:>8.1f} {r['seconds']:>8.1f} "
              f"{peak:>8.2f} {peak - base:>9.2f}")  # fmt: skip
        files[type_name] = out
    return files


# ---- speed workers: one contender per interpreter ---------------------------------


def prompt_ids(n: int, vocab: int, seed: int = 1) -> list[int]:
    import numpy as np

    return [1] + np.random.default_rng(seed).integers(3, vocab, n - 1).tolist()


def best(run, repeats: int) -> dict:
    run(8, 4)  # warm-up
    results = [run(None, None) for _ in range(repeats)]
    return {"prompt_tps": max(r[0] for r in results), "decode_tps": max(r[1] for r in results),
            "tokens": results[-1][2][:12]}  # fmt: skip


def worker_llama(opts) -> dict:
    import llama_cpp
    import numpy as np

    n_ctx = opts.prompt_tokens + opts.new_tokens + 8
    llm = llama_cpp.Llama(model_path=opts.file, n_ctx=n_ctx, n_batch=512, verbose=False,
                          n_threads=os.cpu_count(), n_threads_batch=os.cpu_count())  # fmt: skip

    def last_argmax() -> int:  # the last position's logits (computed without logits_all)
        row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
        return int(np.argmax(row))

    def run(n_prompt, n_new):
        ids = prompt_ids(n_prompt or opts.prompt_tokens, llm.n_vocab())
        n_new = n_new or opts.new_tokens
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        token = last_argmax()
        first = time.perf_counter()
        tokens = [token]
        for _ in range(n_new - 1):
            llm.eval([token])
            token = last_argmax()
            tokens.append(token)
        end = time.perf_counter()
        return len(ids) / (first - start), (n_new - 1) / (end - first), tokens

    return best(run, opts.repeats)


def worker_elm_mlx(opts) -> dict:
    from elm_mlx.runtime.blas import preload_blas

    preload_blas()
    from elm_mlx.generation.generate import generate_step
    from elm_mlx.generation.loading import load_for_generation

    model, _, report = load_for_generation(opts.model, dtype=opts.dtype)

    def run(n_prompt, n_new):
        ids = prompt_ids(n_prompt or opts.prompt_tokens, model.args.vocab_size)
        start = time.perf_counter()
        tokens, first = [], None
        for token, _ in generate_step(ids, model, max_tokens=n_new or opts.new_tokens):
            tokens.append(int(token))
            first = first or time.perf_counter()
        end = time.perf_counter()
        return len(ids) / (first - start), (len(tokens) - 1) / (end - first), tokens

    out = best(run, opts.repeats)
    out["compute"] = str(report.compute).split(".")[-1]
    return out


def speed_rows(src: Path, files: dict[str, Path], opts) -> None:
    common = ["--prompt-tokens", str(opts.prompt_tokens), "--new-tokens", str(opts.new_tokens),
              "--repeats", str(opts.repeats)]  # fmt: skip
    contenders = [(f"llama.cpp {t}", ["--worker", "llama", "--file", str(f)])
                  for t, f in files.items()]  # fmt: skip
    contenders += [(f"elm_mlx {d}", ["--worker", "elm_mlx", "--model", str(src), "--dtype", d])
                   for d in ("auto", "float16")]  # fmt: skip
    print(f"\nprompt {opts.prompt_tokens} tokens, {opts.new_tokens} new, greedy, "
          f"{os.cpu_count()} threads")  # fmt: skip
    print(f"{'runtime':<20} {'prompt tok/s':>12} {'decode tok/s':>12}  first tokens")
    for name, argv in contenders:
        proc = subprocess.run([sys.executable, __file__, *argv, *common], capture_output=True,
                              text=True, check=False, cwd=ROOT)  # fmt: skip
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name:<20} failed: {proc.stderr.strip()[-300:]}")
            continue
        r = json.loads(lines[-1][len("RESULT ") :])
        label = name + (f" ({r['compute']})" if "compute" in r else "")
        print(f"{label:<20} {r['prompt_tps']:>12.1f} {r['decode_tps']:>12.1f}  {r['tokens'][:8]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="nano model, short prompt, 1 repeat")
    p.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint here")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 512 (quick: 64)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (quick: 32)")
    p.add_argument("--repeats", type=int, default=None, help="best of N (default 3, quick 1)")
    p.add_argument("--worker", choices=["llama", "elm_mlx"], help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    opts = p.parse_args()
    opts.prompt_tokens = opts.prompt_tokens or (64 if opts.quick else 512)
    opts.new_tokens = opts.new_tokens or (32 if opts.quick else 128)
    opts.repeats = opts.repeats or (1 if opts.quick else 3)
    if opts.worker:
        out = {"llama": worker_llama, "elm_mlx": worker_elm_mlx}[opts.worker](opts)
        out["maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print("RESULT " + json.dumps(out))
        return
    if opts.workdir is None:
        opts.workdir = Path(tempfile.mkdtemp(prefix="bench_export-"))
    opts.workdir.mkdir(parents=True, exist_ok=True)
    src = source(opts.workdir, opts.quick)
    print(f"model: {src}")
    files = export_rows(src, opts.workdir, ["f32", "f16", "q8_0", "q4_0"])
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("\nllama-cpp-python is not installed: pip install 'elm-mlx[llamacpp]' for speeds")
        return
    speed_rows(src, files, opts)


if __name__ == "__main__":
    main()
