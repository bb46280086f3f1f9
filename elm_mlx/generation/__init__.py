"""Generation: sampling, generate_step / stream_generate, chat, loading a model for it."""
