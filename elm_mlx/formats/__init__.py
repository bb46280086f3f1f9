"""Model formats: MLX model directories, the hub, HF conversion."""
