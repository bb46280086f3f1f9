"""Generation: tokenizer, sampling, generate_step / stream_generate, chat."""
