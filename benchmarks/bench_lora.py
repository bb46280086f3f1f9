"""LoRA training throughput and peak memory: elm_mlx against mlx-lm on the same model and batch.

    python benchmarks/bench_lora.py [--steps 3] [--layers 16] [--batch 4] [--seq 256] [--breakdown]

Both sides get OpenELM-270M's exact shapes with the same random float32
weights, rank-8 adapters (scale 20) on qkv_proj, out_proj, proj_1 and proj_2
of every block, AdamW at 1e-4, and the same token batch (batch x seq inputs,
every position a target). elm_mlx runs its trainer's compiled step
(`elm_mlx.training.trainer.make_step`); mlx-lm runs `mlx_lm.tuner.utils.linear_to_lora_layers`
and the compiled step of `mlx_lm.tuner.trainer.train` with its `default_loss`.
elm_mlx trains with its defaults (chunked output-head loss, block-causal
attention on the CPU, SwiGLU that keeps its sigmoid). Peak memory: each side alone in a
fresh process, MLX's peak over one step after the compiling one, weights
included. Speed: both sides in one process, their steps alternating, so that
other load on the machine hits both alike; tokens/s from wall time, and per
CPU-second of this process. System OpenBLAS preloaded for both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs as is

RANK, SCALE, LR = 8, 20.0, 1e-4
_KEEP: list = []


def _weights(layers: int):
    from elm_mlx.model.config import ModelArgs, preset
    from elm_mlx.testing import hf_config, random_weights

    config = hf_config(preset("OpenELM-270M"))
    if layers != 16:  # a shallower model with the same widths, for quick runs
        n = config["num_transformer_layers"] = layers
        for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            config[key] = config[key][-n:]
    args = ModelArgs.from_dict(config)
    return args, config, random_weights(args, seed=0)


def _batch(args, batch: int, seq: int):
    import mlx.core as mx

    key = mx.random.key(1)
    return mx.random.randint(3, args.vocab_size, (batch, seq + 1), key=key).astype(mx.int32)


def _setup_elm(layers: int, batch: int, seq: int):
    import mlx.core as mx
    import mlx.optimizers as optim

    from elm_mlx.model.openelm import OpenELM
    from elm_mlx.training.data import Batch
    from elm_mlx.training.lora import LoRAConfig, apply_lora
    from elm_mlx.training.train_ops import chunked_loss, training_layers
    from elm_mlx.training.trainer import TrainArgs, make_step

    args, _, weights = _weights(layers)
    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    apply_lora(model, LoRAConfig(rank=RANK, scale=SCALE))
    opt = optim.AdamW(learning_rate=LR, weight_decay=0.0)
    opt.init(model.trainable_parameters())
    targs = TrainArgs(batch_size=batch)  # the defaults, as `finetune` applies them
    layers_ctx = training_layers(model)
    layers_ctx.__enter__()
    _KEEP.append(layers_ctx)  # entered for the life of this process (exiting would undo it)
    step = make_step(model, opt, targs, mx.distributed.init(), chunked_loss)
    tokens = _batch(args, batch, seq)
    data = Batch(tokens, mx.array([[0, seq]] * batch), mx.array(float(batch * seq)))
    state = [model.state, opt.state, mx.random.state]
    return (lambda: step(data, None, True)[0]), state


def _setup_mlx_lm(layers: int, batch: int, seq: int):
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.nn.utils import average_gradients
    from mlx_lm.models import openelm
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    args, config, weights = _weights(layers)
    model = openelm.Model(openelm.ModelArgs.from_dict(config))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    model.freeze()
    linear_to_lora_layers(model, layers, {"rank": RANK, "scale": SCALE, "dropout": 0.0})
    opt = optim.AdamW(learning_rate=LR, weight_decay=0.0)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, opt.state, mx.random.state]

    # The step of mlx_lm.tuner.trainer.train with grad_accumulation_steps=1.
    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (lvalue, toks), grad = loss_value_and_grad(model, batch, lengths)
        grad = average_gradients(grad)
        opt.update(model, grad)
        return lvalue, toks

    tokens = _batch(args, batch, seq)
    lengths = mx.array([[0, seq + 1]] * batch)
    return (lambda: step(tokens, lengths)[0]), state


def _setups(impl: str):
    return {"elm_mlx": _setup_elm, "mlx_lm": _setup_mlx_lm}[impl]


def child_memory(impl: str, a) -> dict:
    """Peak MLX memory of one training step (after the compiling one), in a fresh process."""
    import mlx.core as mx

    run, state = _setups(impl)(a.layers, a.batch, a.seq)
    mx.eval(state)
    weights_gb = mx.get_active_memory() / 1e9
    mx.eval(state, run())  # compiles
    mx.reset_peak_memory()
    mx.eval(state, run())
    return {"peak_gb": mx.get_peak_memory() / 1e9, "weights_gb": weights_gb}


def child_speed(a) -> dict:
    """Both sides in one process, steps alternating, so that machine load hits both alike."""
    import mlx.core as mx

    sides = {impl: _setups(impl)(a.layers, a.batch, a.seq) for impl in ("mlx_lm", "elm_mlx")}
    result = {}
    for impl, (run, state) in sides.items():
        loss = run()  # compiles
        mx.eval(state, loss)
        result[impl] = {"wall": [], "cpu": [], "first_loss": loss.item()}
    for _ in range(a.steps):
        for impl, (run, state) in sides.items():
            wall, cpu = time.perf_counter(), time.process_time()
            loss = run()
            mx.eval(state, loss)
            result[impl]["wall"].append(time.perf_counter() - wall)
            result[impl]["cpu"].append(time.process_time() - cpu)
            result[impl]["last_loss"] = loss.item()
    return result


def _best_seconds(fn, runs: int = 2) -> float:
    import mlx.core as mx

    mx.eval(fn())  # warm-up (compiles MLX's CPU kernels)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best


def child_breakdown(a) -> dict:
    """Where elm_mlx's step goes, against the products it cannot avoid (uncompiled)."""
    import mlx.core as mx
    import mlx.nn as nn

    from elm_mlx.model.config import make_divisible
    from elm_mlx.model.openelm import OpenELM
    from elm_mlx.training.lora import LoRAConfig, apply_lora
    from elm_mlx.training.train_ops import chunked_loss, training_layers

    args, _, weights = _weights(a.layers)
    n, d, hd = a.batch * a.seq, args.model_dim, args.head_dim
    floor = 0.0  # every block matrix: x @ W.T forward and dy @ W for the input gradient
    for i in range(args.num_transformer_layers):
        q, kv = args.num_query_heads[i], args.num_kv_heads[i]
        f = make_divisible(args.ffn_multipliers[i] * d, args.ffn_dim_divisor)
        for fan_in, fan_out in ((d, (q + 2 * kv) * hd), (q * hd, d), (d, 2 * f), (f, d)):
            w = mx.random.normal((fan_out, fan_in))
            x, dy = mx.random.normal((n, fan_in)), mx.random.normal((n, fan_out))
            mx.eval(w, x, dy)
            floor += _best_seconds(lambda: x @ w.T) + _best_seconds(lambda: dy @ w)  # noqa: B023
    head = mx.random.normal((args.vocab_size, d))
    h = mx.random.normal((n, d))
    mx.eval(head, h)
    head_s = _best_seconds(lambda: h @ head.T)
    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    apply_lora(model, LoRAConfig(rank=RANK, scale=SCALE))
    mx.eval(model.parameters())
    tokens = _batch(args, a.batch, a.seq)
    spans = mx.array([[0, a.seq]] * a.batch)
    grad = nn.value_and_grad(model, lambda m, t, s: chunked_loss(m, t, s)[0])
    with training_layers(model):
        hidden = _best_seconds(lambda: model.transformer(tokens[:, :-1]))
        loss = _best_seconds(lambda: chunked_loss(model, tokens, spans)[0])
        step = _best_seconds(lambda: grad(model, tokens, spans))
    return {"floor": floor, "head": head_s, "hidden": hidden, "loss": loss, "step": step}


def print_breakdown(b: dict) -> None:
    print("where elm_mlx's step goes (uncompiled, best of 2, seconds):")
    rows = [
        ("block matmuls alone: forward + input gradients", b["floor"]),
        ("output head product alone (x @ W.T, once)", b["head"]),
        ("forward through the blocks (training layers)", b["hidden"]),
        ("forward with the loss (head: loss and its gradient)", b["loss"]),
        ("forward and backward", b["step"]),
        ("  of which not block matmuls or 2 head products", b["step"] - b["floor"] - 2 * b["head"]),
    ]
    for label, sec in rows:
        print(f"  {label:54} {sec:7.2f}")


def child(kind: str, a) -> None:
    from elm_mlx.runtime.blas import preload_blas

    preload_blas()
    runs = {"speed": child_speed, "breakdown": child_breakdown}
    result = runs[kind](a) if kind in runs else child_memory(kind, a)
    print("RESULT " + json.dumps(result), flush=True)


def measure(kind: str, a) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--layers", str(a.layers),
           "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise SystemExit(f"{kind} failed:\n{out.stdout}\n{out.stderr}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--layers", type=int, default=16, help="blocks (16 = the real 270M)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument(
        "--breakdown", action="store_true", help="also split elm_mlx's step into its parts"
    )
    p.add_argument(
        "--child", choices=["elm_mlx", "mlx_lm", "speed", "breakdown"], help=argparse.SUPPRESS
    )
    a = p.parse_args()
    if a.child:
        return child(a.child, a)
    print(f"OpenELM-270M shapes, {a.layers} layers, float32, batch {a.batch} x {a.seq} tokens, "
          f"LoRA rank {RANK} on qkv_proj/out_proj/proj_1/proj_2 of every block, "
          f"{a.steps} timed steps each, alternating")  # fmt: skip
    memory = {impl: measure(impl, a) for impl in ("mlx_lm", "elm_mlx")}
    speed = measure("speed", a)
    tokens = a.batch * a.seq * a.steps
    for impl in ("mlx_lm", "elm_mlx"):
        m, s = memory[impl], speed[impl]
        s["tps"], s["tps_cpu"] = tokens / sum(s["wall"]), tokens / sum(s["cpu"])
        steps = " ".join(f"{t:.1f}" for t in s["wall"])
        print(f"{impl:>8}: {s['tps']:7.1f} tokens/s ({s['tps_cpu']:.1f} per CPU-second)  "
              f"peak {m['peak_gb']:.3f} GB (weights {m['weights_gb']:.3f} GB)  "
              f"steps {steps} s  loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}")  # fmt: skip
    ours, theirs = speed["elm_mlx"], speed["mlx_lm"]
    print(f"elm_mlx / mlx-lm: tokens/s {ours['tps'] / theirs['tps']:.2f}x "
          f"({ours['tps_cpu'] / theirs['tps_cpu']:.2f}x per CPU-second; target >= 1.1x), "
          f"peak memory {memory['elm_mlx']['peak_gb'] / memory['mlx_lm']['peak_gb']:.2f}x "
          f"(target <= 0.9x)")  # fmt: skip
    if a.breakdown:
        print_breakdown(measure("breakdown", a))


if __name__ == "__main__":
    main()
