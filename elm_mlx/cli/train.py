"""`elm-mlx lora` and `elm-mlx fuse`."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..formats.modeldir import (
    carried_files,
    check_not_source,
    check_target,
    load,
    require_tokenizer,
    save_model,
)
from ..training.checkpoint import CHECKPOINT_DIR, remove_checkpoint
from ..training.data import check_batch_size, load_datasets
from ..training.lora import (
    ADAPTER_FILE,
    CONFIG_FILE,
    LoRAConfig,
    apply_lora,
    fuse_lora,
    load_adapters,
    num_trainable,
    read_adapter_config,
    write_adapter_config,
)
from ..training.trainer import TrainArgs, evaluate, train
from .common import CliError


def _add_lora(sub) -> None:
    p = sub.add_parser(
        "lora",
        help="fine-tune with LoRA (QLoRA on a quantized model), DoRA (--dora) or fully (--full)",
        description="Train adapters on DIR/train.jsonl, validating on DIR/valid.jsonl. Records: "
        '{"text"}, {"prompt","completion"} or {"messages":[...]} (Instruct template). Writes '
        "ADAPTER_PATH/adapters.safetensors (best validation), adapter_config.json, checkpoint/ "
        "(for --resume; Ctrl-C saves one), metrics.jsonl and loss.png. Data parallel: start "
        "it under `mlx.launch -n N --backend ring`.",
    )
    p.add_argument("--model", required=True, help="model directory (float or quantized)")
    p.add_argument("--data", required=True, help="directory with train.jsonl and valid.jsonl")
    p.add_argument("--adapter-path", default="adapters", help="output directory (adapters)")
    p.add_argument("--resume", action="store_true", help="continue from ADAPTER_PATH/checkpoint")
    p.add_argument("--force", action="store_true", help="replace adapters already in ADAPTER_PATH")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--full", action="store_true", help="train every weight instead of LoRA")
    kind.add_argument(
        "--dora", action="store_true", help="DoRA: LoRA plus a learned magnitude per output row"
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (8)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--scale", type=float, help="LoRA scale (20); alpha = scale * rank")
    scale.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / rank")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (0)")
    p.add_argument(
        "--num-layers", type=int, default=-1, help="adapt the last N blocks (-1 = all, the default)"
    )
    p.add_argument(
        "--targets",
        default="qkv_proj,out_proj,proj_1,proj_2",
        help="comma-separated projections (all four)",
    )
    p.add_argument("--mask-prompt", action="store_true", help="loss on completions only")
    p.add_argument(
        "--max-seq-length", type=int, default=2048, help="truncate longer records (2048)"
    )
    p.add_argument("--iters", type=int, default=1000, help="optimizer steps (1000)")
    p.add_argument("--batch-size", type=int, default=4, help="records per step, all processes (4)")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate (1e-4)")
    p.add_argument(
        "--warmup", type=int, default=0, help="linear warmup steps, then cosine decay (0)"
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (1)")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute whole blocks")
    p.add_argument(
        "--recompute-attention", action="store_true", help="recompute attention only (less memory)"
    )
    p.add_argument(
        "--max-grad-norm", type=float, default=0.0, help="clip gradients (0 = off, the default)"
    )
    p.add_argument(
        "--val-every", type=int, default=100, help="validate every N steps (100; 0 = off)"
    )
    p.add_argument("--val-batches", type=int, default=25, help="validation batches (25; 0 = all)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (100)")
    p.add_argument("--report-every", type=int, default=10, help="progress line every N steps (10)")
    p.add_argument("--seed", type=int, default=0, help="adapter init, data order, dropout (0)")


def _lora_config(args):
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    common = dict(dropout=args.dropout, num_layers=args.num_layers, targets=targets)
    if args.full:
        return LoRAConfig(fine_tune_type="full", **common)
    common["fine_tune_type"] = "dora" if args.dora else "lora"
    if args.alpha is not None:
        return LoRAConfig.with_alpha(args.alpha, rank=args.rank, **common)
    return LoRAConfig(rank=args.rank, scale=20.0 if args.scale is None else args.scale, **common)


def _train_args(args):
    names = (
        "iters", "batch_size", "learning_rate", "warmup", "weight_decay", "grad_accum",
        "grad_checkpoint", "recompute_attention", "max_grad_norm", "val_every", "val_batches",
        "save_every", "report_every", "seed",
    )  # fmt: skip
    return TrainArgs(out_dir=args.adapter_path, **{n: getattr(args, n) for n in names})


_ADAPTER_FLAGS = {
    "fine_tune_type": "--dora / --full",
    "num_layers": "--num-layers",
    "rank": "--rank",
    "scale": "--scale / --alpha",
    "dropout": "--dropout",
    "keys": "--targets",
}


def _check_resume_config(adapter_path: str, config, n_layers: int) -> None:
    saved = read_adapter_config(adapter_path)
    before, now = saved.to_dict(n_layers), config.to_dict(n_layers)
    before.update(before.pop("lora_parameters", {}))
    now.update(now.pop("lora_parameters", {}))
    diffs = [
        f"{_ADAPTER_FLAGS.get(k, k)} was {before.get(k)}, now {now.get(k)}"
        for k in sorted(set(before) | set(now))
        if before.get(k) != now.get(k)
    ]
    if diffs:
        raise CliError(
            f"--resume: {adapter_path} was trained with other adapter settings "
            f"({'; '.join(diffs)}); repeat the original flags"
        )


def _check_fresh_adapter_path(adapter_path: str) -> None:
    path = Path(adapter_path)
    held = [n for n in (ADAPTER_FILE, CONFIG_FILE, CHECKPOINT_DIR) if (path / n).exists()]
    if held:
        raise CliError(
            f"{adapter_path} already holds {', '.join(held)}; --resume continues that run, "
            "--force replaces it, or choose another --adapter-path"
        )


def _run_lora(args) -> None:
    group = mx.distributed.init()
    say = print if group.rank() == 0 else (lambda *_: None)
    config, targs = _lora_config(args), _train_args(args)
    config.validate()
    targs.validate()
    model, tokenizer = load(args.model)
    tokenizer = require_tokenizer(tokenizer, args.model)
    sets = load_datasets(
        args.data, tokenizer, max_seq_length=args.max_seq_length,
        mask_prompt=args.mask_prompt, require_valid=args.val_every > 0,
    )  # fmt: skip
    for dataset in sets.values():
        say(dataset.summary())
    check_batch_size(sets["train"], targs.batch_size, group.size())  # before anything is written
    n_layers = len(model.layers)
    if args.resume:
        _check_resume_config(args.adapter_path, config, n_layers)
    elif not args.force:
        _check_fresh_adapter_path(args.adapter_path)
    apply_lora(model, config, seed=args.seed)
    total = model.args.num_parameters()
    say(f"trainable parameters: {num_trainable(model):,} of {total:,} "
        f"({100 * num_trainable(model) / total:.3f}%), {group.size()} process(es)")  # fmt: skip
    if group.rank() == 0:
        if args.force and not args.resume:
            remove_checkpoint(Path(args.adapter_path))  # a later --resume must not pick it up
        write_adapter_config(args.adapter_path, config, n_layers)
    state = train(model, targs, sets["train"], sets.get("valid"), resume=args.resume, group=group)
    if state.best_val is not None:
        say(f"best validation loss {state.best_val:.4f} at step {state.best_step}")
    if "test" in sets:
        loss = evaluate(model, sets["test"], targs.batch_size, 0, group)
        say(f"test loss {loss:.4f} (final weights)")


def _add_fuse(sub) -> None:
    p = sub.add_parser(
        "fuse",
        help="merge trained adapters into the model and save a plain model directory",
        description="Adds each LoRA update into its base weight. A quantized base is "
        "re-quantized with its own settings unless --de-quantize writes a float model.",
    )
    p.add_argument("--model", required=True, help="the base model directory")
    p.add_argument("--adapter-path", default="adapters", help="adapter directory (adapters)")
    p.add_argument("--save-path", required=True, help="output model directory")
    p.add_argument("--de-quantize", action="store_true", help="write float weights")
    p.add_argument("--force", action="store_true", help="replace an existing --save-path")


def _run_fuse(args) -> None:
    check_not_source(args.save_path, args.model, "--save-path")
    check_target(Path(args.save_path).absolute(), force=args.force)  # before the work
    model, tokenizer = load(args.model)
    load_adapters(model, args.adapter_path)
    fuse_lora(model, de_quantize=args.de_quantize)
    tokenizer_file = tokenizer.model_file if tokenizer is not None else None
    save_model(
        args.save_path, model, model.args, tokenizer=tokenizer_file, force=args.force,
        extra_files=carried_files(args.model),
    )  # fmt: skip
    print(f"fused {args.adapter_path} into {args.model}: wrote {args.save_path}")


COMMANDS = {
    "lora": (_add_lora, _run_lora),
    "fuse": (_add_fuse, _run_fuse),
}
