"""LoRA training throughput and peak memory: elm_mlx against mlx-lm on the same model and batch.

    python benchmarks/bench_lora.py [--steps 3] [--layers 16] [--batch 4] [--seq 256]

Both sides get OpenELM-270M's exact shapes with the same random float32
weights, rank-8 adapters (scale 20) on qkv_proj, out_proj, proj_1 and proj_2
of every block, AdamW at 1e-4, and the same token batch (batch x seq inputs,
every position a target). elm_mlx runs its trainer's compiled step
(`elm_mlx.trainer.make_step`); mlx-lm runs `mlx_lm.tuner.utils.linear_to_lora_layers`
and the compiled step of `mlx_lm.tuner.trainer.train` with its `default_loss`.
Each side runs in its own fresh process (so each peak is its own) with the
system OpenBLAS preloaded; one untimed step compiles first. Peak memory is
MLX's peak over the timed steps, weights included. Other processes on the
machine skew the times; run it on an idle machine for numbers you quote.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

RANK, SCALE, LR = 8, 20.0, 1e-4


def _weights(layers: int):
    from elm_mlx.config import ModelArgs, preset
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

    from elm_mlx.data import Batch
    from elm_mlx.lora import LoRAConfig, apply_lora
    from elm_mlx.model import OpenELM
    from elm_mlx.trainer import TrainArgs, make_step

    args, _, weights = _weights(layers)
    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    apply_lora(model, LoRAConfig(rank=RANK, scale=SCALE))
    opt = optim.AdamW(learning_rate=LR, weight_decay=0.0)
    opt.init(model.trainable_parameters())
    step = make_step(model, opt, TrainArgs(batch_size=batch), mx.distributed.init())
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


def child(impl: str, layers: int, batch: int, seq: int, steps: int) -> None:
    from elm_mlx.blas import preload_blas

    preload_blas()
    import mlx.core as mx

    setup = _setup_elm if impl == "elm_mlx" else _setup_mlx_lm
    run, state = setup(layers, batch, seq)
    mx.eval(state)
    weights_gb = mx.get_active_memory() / 1e9
    loss = run()  # compiles
    mx.eval(state, loss)
    first_loss = loss.item()
    mx.reset_peak_memory()
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        loss = run()
        mx.eval(state, loss)
        times.append(time.perf_counter() - tic)
    result = {
        "impl": impl,
        "tokens_per_s": batch * seq * steps / sum(times),
        "step_s": times,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "weights_gb": weights_gb,
        "first_loss": first_loss,
        "last_loss": loss.item(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def measure(impl: str, a) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--layers", str(a.layers),
           "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise SystemExit(f"{impl} failed:\n{out.stdout}\n{out.stderr}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--layers", type=int, default=16, help="blocks (16 = the real 270M)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--child", choices=["elm_mlx", "mlx_lm"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.layers, a.batch, a.seq, a.steps)
    print(f"OpenELM-270M shapes, {a.layers} layers, float32, batch {a.batch} x {a.seq} tokens, "
          f"LoRA rank {RANK} on qkv_proj/out_proj/proj_1/proj_2 of every block, "
          f"{a.steps} timed steps")  # fmt: skip
    results = {impl: measure(impl, a) for impl in ("mlx_lm", "elm_mlx")}
    for r in results.values():
        steps = " ".join(f"{t:.2f}" for t in r["step_s"])
        print(f"{r['impl']:>8}: {r['tokens_per_s']:8.1f} tokens/s  peak {r['peak_gb']:.3f} GB "
              f"(weights {r['weights_gb']:.3f} GB)  steps {steps} s  "
              f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")  # fmt: skip
    ours, theirs = results["elm_mlx"], results["mlx_lm"]
    print(f"elm_mlx / mlx-lm: tokens/s {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x "
          f"(target >= 1.1x), peak memory {ours['peak_gb'] / theirs['peak_gb']:.2f}x "
          f"(target <= 0.9x)")  # fmt: skip


if __name__ == "__main__":
    main()
