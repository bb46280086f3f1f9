"""`elm-mlx serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import os

from ..generation.loading import is_instruct, sampling_defaults
from .common import (
    CliError,
    Command,
    add_decoding_flags,
    add_model_flags,
    display_name,
    load_model,
    model_path,
)

API_KEY_ENV = "ELM_MLX_API_KEY"


def _add_serve(p) -> None:
    add_model_flags(
        p,
        "model directory or hub id, with tokenizer.model (default: the shipped nano model, a "
        "small base model trained on Shakespeare's plays)",
    )
    p.add_argument(
        "--model-name",
        help="the model id requests name and responses report (default: the directory name)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine)")
    p.add_argument("--port", type=int, default=8080, help="port (8080)")
    p.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: "
        f"${API_KEY_ENV} when set)",
    )
    p.add_argument(
        "--max-batch", type=int, default=8,
        help="most requests decoded together (8); on the CPU their KV caches share one buffer "
        "that holds this many rows as long as the longest",
    )  # fmt: skip
    p.add_argument(
        "--max-queue", type=int, default=64, help="most requests waiting; more get 503 (64)"
    )
    p.add_argument(
        "--prompt-cache-gb",
        type=float,
        default=1.0,
        help="memory for finished requests' KV states, reused by prefix; 0 = off (1.0)",
    )
    p.add_argument(
        "--prefill-step",
        type=int,
        default=512,
        help="prompt tokens per prefill chunk: the longest a new prompt stalls the others (512)",
    )
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MiB (4)")
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="seconds running requests may finish after SIGINT/SIGTERM (10)",
    )
    p.add_argument(
        "--single-process", action="store_true",
        help="run the model in the server's own process (by default it runs in a process of "
        "its own, beside the web stack rather than taking turns with it: faster)",
    )  # fmt: skip
    add_decoding_flags(p, "model, BLAS and fast path details")


def _check(args) -> None:
    if not 0 < args.port < 65536:
        raise CliError(f"--port must be in 1-65535, got {args.port}")
    for flag, value in (("--max-batch", args.max_batch), ("--prefill-step", args.prefill_step)):
        if value < 1:
            raise CliError(f"{flag} must be >= 1, got {value}")
    if args.max_queue < 0:
        raise CliError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not args.prompt_cache_gb >= 0:
        raise CliError(f"--prompt-cache-gb must be >= 0, got {args.prompt_cache_gb}")
    if not args.max_body_mb > 0:
        raise CliError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    if not args.shutdown_grace >= 0:
        raise CliError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")


def _server_modules():
    try:
        from ..serve import app, engine, server
    except ImportError as e:
        raise CliError(
            f"elm-mlx serve needs {e.name or 'its web stack'}: pip install 'elm-mlx[serve]'"
        ) from None
    return app, engine, server


def _run_serve(args) -> None:
    _check(args)
    app_mod, engine_mod, server_mod = _server_modules()
    try:  # before the model loads: a port in use is said at once
        sock = server_mod.listen(args.host, args.port)
    except server_mod.ListenError as e:
        raise CliError(str(e)) from None
    with sock:
        _serve_on(sock, args, app_mod, engine_mod, server_mod)


def _serve_on(sock, args, app_mod, engine_mod, server_mod) -> None:
    path = model_path(args.model)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    name = args.model_name or display_name(path)
    config = app_mod.ServerConfig(
        model_id=name,
        aliases=frozenset({path, args.model} - {None}),
        chat_template=is_instruct(path),
        defaults=sampling_defaults(path),
        api_key=api_key,
        max_body_bytes=int(args.max_body_mb * 2**20),
    )
    kwargs = dict(
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefill_step=args.prefill_step,
        prompt_cache_bytes=int(args.prompt_cache_gb * 2**30),
    )
    if args.single_process:
        model, tokenizer = load_model(args)
        engine = engine_mod.Engine(model, tokenizer, **kwargs)
    else:
        tokenizer, engine = _engine_process(path, args, kwargs)
    app = app_mod.create_app(engine, tokenizer, config)
    server_mod.serve(
        app, engine, host=args.host, port=args.port, grace=args.shutdown_grace, name=name,
        sock=sock,
    )  # fmt: skip


def _engine_process(path: str, args, kwargs: dict):
    """(tokenizer, engine) with the model in a process of its own: this one reads only the
    model's config (its weights stay on disk) and the tokenizer."""
    from ..formats.modeldir import load, require_tokenizer
    from ..serve.worker import EngineLoadError, EngineProcess, LoadSpec

    model, tokenizer = load(path, lazy=True)
    tokenizer = require_tokenizer(tokenizer, path)
    context = model.args.max_context_length
    del model
    spec = LoadSpec(path, args.adapter_path, args.dtype, not args.no_fast_path, args.verbose)
    engine = EngineProcess(spec, kwargs, context)
    try:
        engine.start()
    except EngineLoadError as e:
        raise CliError(str(e)) from None
    return tokenizer, engine


COMMANDS = {
    "serve": Command(
        help="serve a model over OpenAI's HTTP API (continuous batching, prompt cache)",
        description="Serve one model over OpenAI's HTTP API: /v1/chat/completions, "
        "/v1/completions, /v1/models and /health. Requests are decoded together (continuous "
        "batching) and finished conversations' KV states are reused by later requests that "
        "extend them. A model whose name contains 'instruct' gets its chat template; a base "
        "model gets the message contents joined by newlines. Sampling settings a request "
        "leaves out come from the model's generation_config.json. Needs the serve extra: "
        "pip install 'elm-mlx[serve]'.",
        add_flags=_add_serve,
        run=_run_serve,
    ),
}
