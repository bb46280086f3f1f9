"""Zero-shot accuracy Apple published for OpenELM, to put beside a run of the same tasks.

Source: the "Main Results / Zero-Shot" table of the Hugging Face model card
https://huggingface.co/apple/OpenELM (README.md; the per-size cards such as
apple/OpenELM-1_1B repeat it), read from a stored copy of that README; the 270M and
450M rows also appear as Table 4(a) of arXiv 2404.14619. Measured with
lm-evaluation-harness (commit dc90fec), zero-shot, `add_bos_token=True` and the
Llama-2 tokenizer, per the card's "Evaluate OpenELM" commands.

The card does not name the metric per task, and the paper's task/metric table could
not be checked here. We compare with lm-eval's `acc_norm` where a task defines it,
except SciQ (`acc`): the numbers fit those metrics (`acc` on HellaSwag is about ten
points lower for these models, while the card's 10-shot HellaSwag column, which the
Open LLM Leaderboard scores with `acc_norm`, is within a point of the zero-shot one).
"""

from __future__ import annotations

from ..model.config import preset

PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande")

# The lm-eval metric each published number is compared with.
METRICS = {
    "arc_challenge": "acc_norm",
    "arc_easy": "acc_norm",
    "boolq": "acc",
    "hellaswag": "acc_norm",
    "piqa": "acc_norm",
    "sciq": "acc",
    "winogrande": "acc",
}

# Percent; the order of PAPER_TASKS, then the average the cards print.
_ROWS = {
    "OpenELM-270M": (26.45, 45.08, 53.98, 46.71, 69.75, 84.70, 53.91, 54.37),
    "OpenELM-270M-Instruct": (30.55, 46.68, 48.56, 52.07, 70.78, 84.40, 52.72, 55.11),
    "OpenELM-450M": (27.56, 48.06, 55.78, 53.97, 72.31, 87.20, 58.01, 57.56),
    "OpenELM-450M-Instruct": (30.38, 50.00, 60.37, 59.34, 72.63, 88.00, 58.96, 59.95),
    "OpenELM-1_1B": (32.34, 55.43, 63.58, 64.81, 75.57, 90.60, 61.72, 63.44),
    "OpenELM-1_1B-Instruct": (37.97, 52.23, 70.00, 71.20, 75.03, 89.30, 62.75, 65.50),
    "OpenELM-3B": (35.58, 59.89, 67.40, 72.44, 78.24, 92.70, 65.51, 67.39),
    "OpenELM-3B-Instruct": (39.42, 61.74, 68.17, 76.36, 79.00, 92.50, 66.85, 69.15),
}

PUBLISHED: dict[str, dict[str, float]] = {
    name: {**dict(zip(PAPER_TASKS, row[:-1], strict=True)), "average": row[-1]}
    for name, row in _ROWS.items()
}


def _shape(args) -> tuple[int, int]:
    return args.num_transformer_layers, args.model_dim


# (layers, model_dim) of each published size, from the model presets.
_SHAPES = {_shape(preset(name)): name for name in _ROWS if not name.endswith("-Instruct")}


def published_row(args, name: str = "") -> tuple[str, dict[str, float]] | None:
    """(card name, scores) for a model of the shape `args`; Instruct when `name` says so."""
    base = _SHAPES.get(_shape(args))
    if base is None:
        return None
    card = base + "-Instruct" if "instruct" in name.lower() else base
    return card, PUBLISHED[card]
