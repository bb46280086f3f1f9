"""Training: the trainer, training ops, LoRA/DoRA, data, checkpoints and loss plots."""
