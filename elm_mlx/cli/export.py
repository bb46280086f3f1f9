"""`elm-mlx export-gguf`: a model directory as a GGUF file for llama.cpp."""

from __future__ import annotations

from pathlib import Path

from ..formats.gguf import FILE_TYPES, check_out, export_gguf
from ..formats.modeldir import require_tokenizer
from ..generation.loading import is_instruct
from ..training.finetune import load_fused
from .common import Command, display_name, log, model_path


def _add_export_gguf(p) -> None:
    p.add_argument("--model", help="model directory or hub id (default: the shipped nano model)")
    p.add_argument("--out", required=True, help="output .gguf file (written atomically)")
    p.add_argument(
        "--type",
        choices=list(FILE_TYPES),
        default="f16",
        help="weight type of the matrices (default: %(default)s; norms stay f32)",
    )
    p.add_argument("--adapter-path", help="adapter directory to fuse into the weights")
    p.add_argument(
        "--chat-template",
        action="store_true",
        default=None,
        help="write the Instruct chat template (default: when the model name says instruct)",
    )
    p.add_argument(
        "--no-chat-template", dest="chat_template", action="store_false", help="never write it"
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def _run_export_gguf(args) -> None:
    path = model_path(args.model)
    template = is_instruct(path) if args.chat_template is None else args.chat_template
    check_out(Path(args.out).expanduser().absolute(), args.force)  # before the work
    model, tokenizer = load_fused(path, args.adapter_path, de_quantize=True, log=log)
    export_gguf(
        model,
        require_tokenizer(tokenizer, path),
        args.out,
        name=display_name(path),
        type_name=args.type,
        chat_template=template,
        force=args.force,
        log=log,
    )


COMMANDS = {
    "export-gguf": Command(
        help="write a model as a GGUF file for llama.cpp (LM Studio, Ollama, ...)",
        description="Write a model directory as a GGUF file (architecture openelm) with the "
        "tokenizer from its tokenizer.model. Quantized models are de-quantized first; "
        "--adapter-path fuses LoRA/DoRA adapters on the way. Instruct models (a directory "
        "name containing 'instruct') get the chat template unless --no-chat-template.",
        add_flags=_add_export_gguf,
        run=_run_export_gguf,
    ),
}
