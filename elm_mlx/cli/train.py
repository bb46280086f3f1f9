"""`elm-mlx lora` and `elm-mlx fuse`: argparse and printing; the library decides."""

from __future__ import annotations

import mlx.core as mx

from ..formats.modeldir import load, require_tokenizer
from ..training.finetune import finetune, fuse
from ..training.lora import LoRAConfig
from ..training.train_ops import TrainingOps
from ..training.trainer import TrainArgs
from .common import Command, as_flags, flag_names, log, warn_without_tokenizer


def _add_lora(p) -> None:
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
        "--max-seq-length", type=int, help="truncate longer records (the model's context)"
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


def _lora_config(args) -> LoRAConfig:
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    common = dict(dropout=args.dropout, num_layers=args.num_layers, targets=targets)
    if args.full:
        return LoRAConfig(fine_tune_type="full", **common)
    common["fine_tune_type"] = "dora" if args.dora else "lora"
    if args.alpha is not None:
        return LoRAConfig.with_alpha(args.alpha, rank=args.rank, **common)
    return LoRAConfig(rank=args.rank, scale=20.0 if args.scale is None else args.scale, **common)


def _train_args(args) -> TrainArgs:
    names = (
        "iters", "batch_size", "learning_rate", "warmup", "weight_decay", "grad_accum",
        "max_grad_norm", "val_every", "val_batches", "save_every", "report_every", "seed",
    )  # fmt: skip
    return TrainArgs(**{n: getattr(args, n) for n in names})


# Library names that are not `--name-with-dashes` here.
_FLAGS = {
    "fine_tune_type": "--dora / --full",
    "scale": "--scale / --alpha",
    "keys": "--targets",
    "processes": "the process count",
}


def _run_lora(args) -> None:
    group = mx.distributed.init()
    say = print if group.rank() == 0 else (lambda *_: None)
    with flag_names(_FLAGS):
        config, targs = _lora_config(args), _train_args(args)
        ops = TrainingOps(args.grad_checkpoint, args.recompute_attention)
        model, tokenizer = load(args.model)
        result = finetune(
            model, require_tokenizer(tokenizer, args.model), args.data, args.adapter_path,
            config, targs, ops=ops, resume=args.resume, force=args.force,
            max_seq_length=args.max_seq_length, mask_prompt=args.mask_prompt, group=group,
            log=lambda line: say(as_flags(line, _FLAGS)),
        )  # fmt: skip
    state = result.state
    if state.best_val is not None:
        say(f"best validation loss {state.best_val:.4f} at step {state.best_step}")
    if result.test_loss is not None:
        say(f"test loss {result.test_loss:.4f} (final weights)")


def _add_fuse(p) -> None:
    p.add_argument("--model", required=True, help="the base model directory")
    p.add_argument("--adapter-path", default="adapters", help="adapter directory (adapters)")
    p.add_argument("--save-path", required=True, help="output model directory")
    p.add_argument("--de-quantize", action="store_true", help="write float weights")
    p.add_argument("--force", action="store_true", help="replace an existing --save-path")


def _run_fuse(args) -> None:
    with flag_names(_FLAGS):
        fuse(
            args.model, args.adapter_path, args.save_path, de_quantize=args.de_quantize,
            force=args.force, log=log,
        )  # fmt: skip
    print(f"fused {args.adapter_path} into {args.model}: wrote {args.save_path}")
    warn_without_tokenizer(args.save_path)


COMMANDS = {
    "lora": Command(
        help="fine-tune with LoRA (QLoRA on a quantized model), DoRA (--dora) or fully (--full)",
        description="Train adapters on DIR/train.jsonl, validating on DIR/valid.jsonl. Records: "
        '{"text"}, {"prompt","completion"} or {"messages":[...]} (Instruct template). Writes '
        "ADAPTER_PATH/adapters.safetensors (best validation), adapter_config.json, checkpoint/ "
        "(for --resume; Ctrl-C or SIGTERM saves one), metrics.jsonl and loss.png (with "
        "matplotlib: pip install 'elm-mlx[train]'). Data parallel: start it under "
        "`mlx.launch -n N --backend ring`.",
        add_flags=_add_lora,
        run=_run_lora,
    ),
    "fuse": Command(
        help="merge trained adapters into the model and save a plain model directory",
        description="Adds each LoRA update into its base weight. A quantized base is "
        "re-quantized with its own settings unless --de-quantize writes a float model.",
        add_flags=_add_fuse,
        run=_run_fuse,
    ),
}
