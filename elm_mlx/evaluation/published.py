"""Zero-shot accuracy Apple published for OpenELM, to put beside a run of the same tasks.

Source: the "Evaluation results" (Zero-Shot) tables of the Hugging Face model cards
apple/OpenELM-270M, apple/OpenELM-270M-Instruct, apple/OpenELM-450M and
apple/OpenELM-450M-Instruct (also Table 4(a) of arXiv 2404.14619), measured with
lm-evaluation-harness, `add_bos_token=True` and the Llama-2 tokenizer. Only the
sizes whose per-task rows we could check are listed; 1.1B and 3B are missing.

The cards do not name the metric per task. We compare with lm-eval's `acc_norm`
where a task defines it, except SciQ (`acc`): the numbers fit those metrics
(`acc` on HellaSwag is about ten points lower for these models).
"""

from __future__ import annotations

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
}

PUBLISHED: dict[str, dict[str, float]] = {
    name: {**dict(zip(PAPER_TASKS, row[:-1], strict=True)), "average": row[-1]}
    for name, row in _ROWS.items()
}

# (layers, model_dim) of each published size.
_SHAPES = {(16, 1280): "OpenELM-270M", (20, 1536): "OpenELM-450M"}


def published_row(args, name: str = "") -> tuple[str, dict[str, float]] | None:
    """(card name, scores) for a model of the shape `args`; Instruct when `name` says so."""
    base = _SHAPES.get((args.num_transformer_layers, args.model_dim))
    if base is None:
        return None
    card = base + "-Instruct" if "instruct" in name.lower() else base
    return card, PUBLISHED[card]
