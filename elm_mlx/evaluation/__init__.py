"""Evaluation: log-likelihood scoring, perplexity, and the lm-evaluation-harness backend.

`scoring` and `perplexity` need only MLX; `harness` (the lm-eval model `elm_mlx`) and
`run` (tasks, the results table) need the optional lm-eval package.
"""
