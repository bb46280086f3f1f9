"""Model formats: MLX model directories, the tokenizer file, the hub, HF and CoreNet
conversion, GGUF export."""
