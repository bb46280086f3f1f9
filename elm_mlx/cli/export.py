"""`elm-mlx export-gguf`: a model directory as a GGUF file for llama.cpp."""

from __future__ import annotations

import sys

from ..formats.gguf import FILE_TYPES, export_gguf
from ..generation.loading import is_instruct
from .common import model_path


def _add_export_gguf(sub) -> None:
    p = sub.add_parser(
        "export-gguf",
        help="write a model as a GGUF file for llama.cpp (LM Studio, Ollama, ...)",
        description="Write a model directory as a GGUF file (architecture openelm) with the "
        "tokenizer from its tokenizer.model. Quantized models are de-quantized first; "
        "--adapter-path fuses LoRA/DoRA adapters on the way. Instruct models (a directory "
        "name containing 'instruct') get the chat template unless --no-chat-template.",
    )
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
    model = model_path(args.model)
    template = is_instruct(model) if args.chat_template is None else args.chat_template
    export_gguf(
        model,
        args.out,
        type_name=args.type,
        adapter_path=args.adapter_path,
        chat_template=template,
        force=args.force,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )


COMMANDS = {"export-gguf": (_add_export_gguf, _run_export_gguf)}
