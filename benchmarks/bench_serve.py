"""elm-mlx serve against mlx_lm.server: same model, same requests, same client.

For each model (the shipped nano model, and random float32 weights with OpenELM-270M's
shapes), each server is started as its own process on 127.0.0.1 and driven over
HTTP with streamed /v1/completions requests:

- N requests with P-token prompts and T new tokens (greedy) at each concurrency:
  aggregate generated tokens/s, time to first token p50/p95, inter-token latency p50/p95
  (between text chunks as they arrive) and time per output token p50/p95 (a request's).
  Each concurrency has prompts of its own (the same for both servers), so no server's
  prompt cache serves a prompt it saw at an earlier concurrency. The mix runs in rounds
  (nine for nano, whose rounds take seconds; `--rounds`), each concurrency once a round
  with fresh prompts, and the median round's tokens/s is reported beside every round's:
  on a shared machine the CPU's speed can change by half from one second to the next;
- a multi-turn conversation whose history grows to about 1,000 tokens (less where the
  model's context is smaller): time to first token of turns 2-6, for elm-mlx with its
  prompt cache, elm-mlx without it (--prompt-cache-gb 0) and mlx_lm.server.

mlx_lm.server reads the tokenizer through transformers, which needs a
tokenizer_config.json that our model directories do not carry: it gets a copy of the
directory (symlinks) with one, checked to tokenize the prompts exactly as elm_mlx
does. Both servers run with the same OpenBLAS (mlx_lm.server through LD_PRELOAD).

    python benchmarks/bench_serve.py            # the full run (quiet machine: many minutes)
    python benchmarks/bench_serve.py --quick    # a short end-to-end check on the nano model
    python benchmarks/bench_serve.py --compare-flags='--prompt-cache-gb 0' --concurrency 1,8
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# Rounds of each model's request mix: a round of nano's takes seconds, so a spell of a slow
# (shared) CPU can make or break one (concurrency 8's rounds of one run have spanned
# 2062-3060 tokens/s); 270M's take minutes.
ROUNDS = {"nano": 9, "270m": 1}
NANO = ROOT / "elm_mlx" / "assets" / "nano"
SINGLE = "elm-mlx 1-proc"  # elm-mlx serve --single-process, with --single-process


@dataclass
class Timing:
    """One streamed request, as the client saw it."""

    start: float
    arrivals: list[float] = field(default_factory=list)  # chunks that carried text
    tokens: int = 0
    text: str = ""

    @property
    def tpot(self) -> float:
        """Time per output token after the first: the first text's arrival to the last's,
        over the tokens after the first."""
        return (self.arrivals[-1] - self.arrivals[0]) / (self.tokens - 1)

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.start if self.arrivals else float("nan")


# ---- models and prompts ---------------------------------------------------------


def model_dirs(work: Path, names: list[str]) -> dict[str, Path]:
    dirs = {}
    for name in names:
        if name == "nano":
            dirs[name] = NANO
        elif name == "270m":
            path = work / "OpenELM-270M-random"
            if not (path / "tokenizer.model").is_file():
                from elm_mlx.testing import random_preset_checkpoint

                print("writing random 270M-shaped weights...", file=sys.stderr)
                random_preset_checkpoint(path, "OpenELM-270M", seed=0)
                shutil.copyfile(tokenizer_32000(), path / "tokenizer.model")
            dirs[name] = path
        else:
            raise SystemExit(f"error: unknown model {name!r} (nano, 270m)")
    return dirs


def tokenizer_32000() -> Path:
    """A 32000-piece Llama-style SentencePiece model (mistral-common ships one, Apache-2.0),
    so that every id the random 270M model can emit has text in both servers."""
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
        if path.is_file():
            return path
    raise SystemExit(
        "error: the 270m model needs mistral-common's tokenizer: pip install -e '.[test]'"
    )


def mlx_lm_dir(model: Path, work: Path, tokenizer) -> Path:
    """`model` plus the tokenizer_config.json transformers needs (weights linked, not copied)."""
    shim = work / f"{model.name}-mlx-lm"
    shim.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.is_file() and f.name != "config.json" and not (shim / f.name).exists():
            (shim / f.name).symlink_to(f.resolve())
    # without auto_map (HF's pointer to remote code), transformers does not stop to ask
    config = json.loads((model / "config.json").read_text())
    config.pop("auto_map", None)
    (shim / "config.json").write_text(json.dumps(config, indent=2))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_prefix_space": tokenizer.strips_leading_space(),
    }
    (shim / "tokenizer_config.json").write_text(json.dumps(config))
    return shim


def make_prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[str]:
    """`n` texts of `length` tokens (BOS included) from random words of the vocabulary."""
    rng = random.Random(seed)
    words = [
        v.strip()
        for kind, v in tokenizer.piece_table()
        if kind == 2 and v.startswith(" ") and v.strip().isalpha()
    ]
    prompts = []
    while len(prompts) < n:
        text = " ".join(rng.choice(words) for _ in range(length * 2))
        ids = tokenizer.encode(text)[:length]
        text = tokenizer.decode(ids)
        if len(tokenizer.encode(text)) == length:
            prompts.append(text)
    return prompts


def check_tokenizers(shim: Path, tokenizer, prompts: list[str]) -> None:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(shim))
    differ = sum(theirs.encode(p) != tokenizer.encode(p) for p in prompts)
    if differ:
        print(f"warning: mlx_lm.server tokenizes {differ} of {len(prompts)} prompts differently")


# ---- servers --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free port; `with` waits for /health and stops it after."""

    def __init__(self, cmd: list[str], env: dict | None = None, log: Path | None = None):
        self.port = free_port()
        self.cmd = [*cmd, "--port", str(self.port)]
        self.env, self.log = env, log
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.cmd, stdout=out, stderr=out, env={**os.environ, **(self.env or {})}
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: {' '.join(self.cmd)} exited; see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"error: {' '.join(self.cmd)} did not start in 300 s")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def elm_server(
    model: Path, work: Path, cache: bool = True, single: bool = False, flags: list[str] = ()
) -> Server:
    cmd = [sys.executable, "-m", "elm_mlx.cli", "serve", "--model", str(model)]
    cmd += ["--max-batch", "8", "--prompt-cache-gb", "1" if cache else "0"]
    cmd += ["--single-process"] if single else []
    kind = ("cache" if cache else "nocache") + ("-single" if single else "")
    kind += "-flags" if flags else ""
    return Server([*cmd, *flags], log=work / f"elm-{model.name}-{kind}.log")


def compare_flags(work: Path, opts) -> None:
    """elm-mlx serve as it starts by default (A) against the same with `opts.compare_flags`
    (B) on nano: both servers up at once, taking turns round by round (A first in even
    rounds), fresh prompts each round, the same for both: a slow spell of the machine hits
    both, and each round's B/A is a pair measured seconds apart."""
    from elm_mlx.formats.tokenizer import Tokenizer

    tokenizer = Tokenizer(NANO / "tokenizer.model")
    rounds = opts.rounds or 8
    flags = opts.compare_flags.split()
    rates = {(kind, c): [] for kind in "AB" for c in opts.concurrency}
    print(
        f"nano, A: elm-mlx serve, B: elm-mlx serve {' '.join(flags)}; {opts.requests} "
        f"requests, {opts.prompt_tokens}-token prompts, {opts.new_tokens} new tokens"
    )
    with elm_server(NANO, work) as a, elm_server(NANO, work, flags=flags) as b:
        for r in range(rounds):
            line = []
            for c in opts.concurrency:
                prompts = make_prompts(tokenizer, opts.requests + 1, opts.prompt_tokens,
                                       seed=5000 + c + 1000 * r)  # fmt: skip
                for kind, server in (("A", a), ("B", b)) if r % 2 == 0 else (("B", b), ("A", a)):
                    mix = run_mix(server.url, str(NANO), prompts, opts.new_tokens, c)
                    rates[kind, c].append(mix["tok_s"])
                line.append(f"concurrency {c}: A {rates['A', c][-1]:.1f} B {rates['B', c][-1]:.1f}")
            print(f"  round {r + 1}: " + ", ".join(line), flush=True)
    for c in opts.concurrency:
        ratios = [y / x for x, y in zip(rates["A", c], rates["B", c], strict=True)]
        print(f"concurrency {c}: B/A each round " + " ".join(f"{x:.3f}" for x in ratios)
              + f" (median {statistics.median(ratios):.3f})")  # fmt: skip


def mlx_lm_server(shim: Path, work: Path) -> Server:
    from elm_mlx.runtime.blas import find_openblas

    blas = find_openblas()
    env = {"LD_PRELOAD": blas} if blas else {}
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(shim), "--host", "127.0.0.1"]
    return Server(cmd, env=env, log=work / f"mlx-lm-{shim.name}.log")


# ---- the client -----------------------------------------------------------------


@functools.cache
def client() -> httpx.Client:
    """One client for every request, as an application would keep one: making an httpx
    client costs about 20 ms of CPU (an SSL context), which per request would be timed
    as the server's first-token latency and, on a small machine, taken from the servers.

    Idle connections are dropped after a second, before a server closes them (uvicorn
    after 5 s): a connection idle through a round at concurrency 1, then taken up by
    one of several threads while the server was closing it, once failed a run here
    with httpcore's "Bad file descriptor"."""
    limits = httpx.Limits(max_connections=64, keepalive_expiry=1.0)
    return httpx.Client(timeout=600, limits=limits)


def stream(url: str, model: str, prompt: str, max_tokens: int) -> Timing:
    """One streamed completion. A connection that fails before the response begins (a
    kept-alive connection the server closed as it was taken up: httpcore's "Bad file
    descriptor", once in a few thousand requests here) is retried once, timed from the
    retry, and counted in `RETRIES`."""
    try:
        return _stream(url, model, prompt, max_tokens)
    except _NotStarted:
        RETRIES.append(url)
        return _stream(url, model, prompt, max_tokens)


RETRIES: list[str] = []


class _NotStarted(Exception):
    """The request failed before any of its response arrived."""


def _stream(url: str, model: str, prompt: str, max_tokens: int) -> Timing:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t = Timing(time.perf_counter())
    chunks = 0
    with contextlib.ExitStack() as stack:
        try:
            r = stack.enter_context(client().stream("POST", url + "/v1/completions", json=body))
        except httpx.TimeoutException:
            raise  # the server may be working on it: no second request beside it
        except httpx.TransportError as e:
            raise _NotStarted(str(e)) from e
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                t.tokens = data["usage"]["completion_tokens"]
            for choice in data.get("choices") or []:
                if choice.get("text"):
                    t.arrivals.append(time.perf_counter())
                    t.text += choice["text"]
                    chunks += 1
    t.tokens = t.tokens or chunks
    return t


def run_mix(url: str, model: str, prompts: list[str], new: int, concurrency: int) -> dict:
    """`prompts[0]` warms the server up; the rest are timed."""
    stream(url, model, prompts[0], 4)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        timings = list(pool.map(lambda p: stream(url, model, p, new), prompts[1:]))
    wall = time.perf_counter() - start
    return {
        "tok_s": sum(t.tokens for t in timings) / wall,
        "ttft": [t.ttft for t in timings],
        "itl": [b - a for t in timings for a, b in zip(t.arrivals, t.arrivals[1:], strict=False)],
        "tpot": [t.tpot for t in timings if t.tokens > 1 and t.arrivals],
    }


def summary(rounds: list[dict]) -> dict:
    """Several rounds of one mix: the median tokens/s (and each round's), percentiles of the
    latencies of every round."""
    ttft = [x for r in rounds for x in r["ttft"]]
    itl = [x for r in rounds for x in r["itl"]]
    tpot = [x for r in rounds for x in r["tpot"]]
    return {
        "tok_s": statistics.median(r["tok_s"] for r in rounds),
        "rounds": [r["tok_s"] for r in rounds],
        "ttft": (pct(ttft, 50), pct(ttft, 95)),
        "itl": (pct(itl, 50), pct(itl, 95)),
        "tpot": (pct(tpot, 50), pct(tpot, 95)),
    }


def run_chat(url: str, model: str, users: list[str], reply: int) -> list[float]:
    history, ttfts = "", []
    for user in users:
        history += user
        t = stream(url, model, history, reply)
        ttfts.append(t.ttft)
        history += t.text + "\n"
    return ttfts


def pct(xs: list[float], p: int) -> float:
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[p - 1]


# ---- the run --------------------------------------------------------------------


def bench_model(name: str, path: Path, work: Path, opts) -> None:
    from elm_mlx.formats.modeldir import read_config
    from elm_mlx.formats.tokenizer import Tokenizer

    tokenizer = Tokenizer(path / "tokenizer.model")
    context = read_config(path).max_context_length
    RETRIES.clear()  # counted per model
    rounds = opts.rounds or ROUNDS[name]
    prompts = {(c, r): make_prompts(tokenizer, opts.requests + 1, opts.prompt_tokens,
                                    seed=100 + c + 1000 * r)
               for c in opts.concurrency for r in range(rounds)}  # fmt: skip
    # the conversation: `turns` user messages, each reply `reply` tokens, ~`target` in all
    target = min(opts.chat_tokens, context - opts.reply_tokens - 16)
    user_len = max(8, target // opts.turns - opts.reply_tokens)
    users = [u + "\n" for u in make_prompts(tokenizer, opts.turns, user_len, seed=1)]
    shim = mlx_lm_dir(path, work, tokenizer)
    check_tokenizers(shim, tokenizer, prompts[opts.concurrency[0], 0][:8])
    mix, chat = {}, {}
    servers = {"elm-mlx serve": lambda: elm_server(path, work)}
    if opts.single_process:
        servers[SINGLE] = lambda: elm_server(path, work, single=True)
    servers["mlx_lm.server"] = lambda: mlx_lm_server(shim, work)
    for label, make in servers.items():
        if label == "mlx_lm.server" and opts.no_mlx_lm:
            continue
        with make() as server:
            model = str(shim if label == "mlx_lm.server" else path)
            runs = {c: [] for c in opts.concurrency}
            for r in range(rounds):  # each round every concurrency: a slow spell hits them all
                for c in opts.concurrency:
                    runs[c].append(run_mix(server.url, model, prompts[c, r], opts.new_tokens, c))
                    print(f"  {label} round {r + 1} concurrency {c}: "
                          f"{runs[c][-1]['tok_s']:.1f} tokens/s", flush=True)  # fmt: skip
            for c in opts.concurrency:
                mix[label, c] = summary(runs[c])
            chat[label] = run_chat(server.url, model, users, opts.reply_tokens)
    with elm_server(path, work, cache=False) as server:
        chat["elm-mlx serve, no prompt cache"] = run_chat(
            server.url, str(path), users, opts.reply_tokens
        )
    report(name, opts, mix, chat, target, rounds)


def report(name: str, opts, mix: dict, chat: dict, target: int, rounds: int) -> None:
    print(
        f"\n## {name}: {opts.requests} requests, {opts.prompt_tokens}-token prompts, "
        f"{opts.new_tokens} new tokens, greedy; {rounds} round(s), fresh prompts in each"
    )
    head = ("server", "conc", "tok/s", "TTFT p50", "p95", "ITL p50", "p95", "TPOT p50", "p95",
            "rounds' tok/s")  # fmt: skip
    print("{:<16} {:>4} {:>8} {:>9} {:>7} {:>8} {:>7} {:>9} {:>7}  {}".format(*head))
    for (label, c), m in mix.items():
        print(
            f"{label:<16} {c:>4} {m['tok_s']:>8.1f} {m['ttft'][0]:>8.3f}s {m['ttft'][1]:>6.3f}s "
            f"{m['itl'][0] * 1000:>6.1f}ms {m['itl'][1] * 1000:>5.1f}ms "
            f"{m['tpot'][0] * 1000:>7.1f}ms {m['tpot'][1] * 1000:>5.1f}ms  "
            + " ".join(f"{x:.1f}" for x in m["rounds"])
        )
    if rounds > 1:
        print("tok/s: the median of the rounds; latencies: percentiles over every round")
    print("ITL: between a stream's text chunks as they arrive (tokens sent in one write arrive "
          "together); TPOT: a request's time per token after its first")  # fmt: skip
    ours = {c: m["tok_s"] for (label, c), m in mix.items() if label == "elm-mlx serve"}
    theirs = {c: m["tok_s"] for (label, c), m in mix.items() if label == "mlx_lm.server"}
    top = max(ours)
    low = min(ours)
    line = f"elm-mlx at concurrency {top}: {ours[top] / ours[low]:.2f}x its concurrency {low}"
    if top in theirs:
        line += f", {ours[top] / theirs[top]:.2f}x mlx_lm.server's"
    print(line)
    if rounds > 1:
        ours_rounds = {c: m["rounds"] for (label, c), m in mix.items() if label == "elm-mlx serve"}
        pairs = [a / b for a, b in zip(ours_rounds[top], ours_rounds[low], strict=True)]
        print(
            f"each round's concurrency {top} over its concurrency {low}: "
            + " ".join(f"{x:.2f}" for x in pairs)
            + f" (median {statistics.median(pairs):.2f}x)"
        )
    if RETRIES:
        print(f"requests retried after a connection failed before the response: {len(RETRIES)}")
    single = {c: m["tok_s"] for (label, c), m in mix.items() if label == SINGLE}
    if single:
        print(
            "elm-mlx serve (engine in its own process) / --single-process: "
            + ", ".join(f"{ours[c] / single[c]:.2f}x at concurrency {c}" for c in single)
        )
    print(f"\n{opts.turns}-turn chat, history up to ~{target} tokens: time to first token per turn")
    for label, ttfts in chat.items():
        print(f"{label:<32} " + " ".join(f"{t:.3f}s" for t in ttfts))
    warm, cold = chat["elm-mlx serve"][1:], chat["elm-mlx serve, no prompt cache"][1:]
    ratio = statistics.mean(w / c for w, c in zip(warm, cold, strict=True))
    print(f"turns 2-{opts.turns} with the prompt cache / without: {ratio:.2f}x (mean)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="nano only, few short requests")
    p.add_argument("--models", default="nano,270m", help="comma-separated: nano, 270m")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--rounds", type=int, default=0,
                   help="rounds of every concurrency, each with fresh prompts (default: "
                        + ", ".join(f"{m} {n}" for m, n in ROUNDS.items()) + ")")  # fmt: skip
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--chat-tokens", type=int, default=1000)
    p.add_argument("--no-mlx-lm", action="store_true", help="only elm-mlx serve")
    p.add_argument("--single-process", action="store_true",
                   help="also elm-mlx serve --single-process (the engine in the server's "
                        "own process)")  # fmt: skip
    p.add_argument("--workdir", help="where the 270M weights and logs go (default: a temp dir)")
    p.add_argument("--compare-flags", metavar="FLAGS",
                   help="instead: nano's mix on elm-mlx serve as it starts by default against "
                        "the same with FLAGS (--compare-flags='--prompt-cache-gb 0'), the two "
                        "servers taking turns round by round (default 8 rounds)")  # fmt: skip
    opts = p.parse_args()
    if opts.quick:
        opts.models, opts.requests, opts.new_tokens = "nano", 8, 16
        opts.prompt_tokens, opts.concurrency, opts.turns = 64, "1,4", 3
        opts.rounds = opts.rounds or 1
    opts.concurrency = [int(c) for c in opts.concurrency.split(",")]
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="bench_serve-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"logs and weights in {work}", file=sys.stderr)
    print(f"{os.cpu_count()} cores; load average {_load()} before", flush=True)
    if opts.compare_flags:
        compare_flags(work, opts)
        return print(f"load average {_load()} after")
    for name, path in model_dirs(work, opts.models.split(",")).items():
        print(f"benchmarking {name} ({path})", flush=True)
        bench_model(name, path, work, opts)
    print(f"load average {_load()} after")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
