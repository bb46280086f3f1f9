"""`elm-mlx serve`: an OpenAI-compatible HTTP server with continuous batching.

- `batch`: one decoding step for many rows, each with its own KV cache
- `engine`: the thread that owns the model (admission, prefill, batched decode)
- `worker`: the engine in a process of its own, behind the engine's interface
- `prompt_cache`: finished requests' KV states, reused by prefix
- `protocol`: request bodies (pydantic) and the OpenAI error shape
- `app`: the ASGI app (Starlette) and response bodies
- `server`: run it all under uvicorn with a clean shutdown

Needs the `serve` extra (`pip install 'elm-mlx[serve]'`); nothing here is imported
by the rest of the package.
"""
