"""Running lm-eval tasks on an elm_mlx model: task lookup, offline errors, the results table.

lm-eval is an optional extra, imported only here and in `harness`, with an install hint.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .published import METRICS, PAPER_TASKS, published_row

EVAL_HINT = "evaluation needs lm-eval: pip install 'elm-mlx[eval]'"
# Tasks shipped with the package (no download): nano_next_line.
LOCAL_TASKS = Path(__file__).with_name("tasks")


def require_lm_eval():
    """The lm_eval module, or ImportError with the install hint."""
    try:
        import lm_eval
    except ImportError:
        raise ImportError(EVAL_HINT) from None
    return lm_eval


def task_names(spec: str) -> list[str]:
    """A comma list of task names; `paper` stands for the model cards' seven zero-shot tasks."""
    names: list[str] = []
    for name in (n.strip() for n in spec.split(",")):
        for n in PAPER_TASKS if name == "paper" else [name]:
            if n and n not in names:
                names.append(n)
    if not names:
        raise ValueError(f"no task names in {spec!r}")
    return names


@functools.lru_cache(maxsize=4)
def task_manager(include_paths: tuple[str, ...] = (), lm_eval_tasks: bool = True):
    """lm-eval's task index: the package's local tasks, `include_paths`, and (unless
    `lm_eval_tasks` is False, which is much faster to index) lm-eval's own tasks."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    for p in include_paths:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"task directory {p} not found")
    return TaskManager(
        include_path=[str(LOCAL_TASKS), *include_paths], include_defaults=lm_eval_tasks
    )


def load_tasks(names: list[str], manager) -> list:
    """The lm-eval Task or Group of each name, data loaded; one clear error per failure."""
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        raise ValueError(
            f"unknown task {', '.join(map(repr, unknown))}; lm-eval lists its tasks with "
            "`lm-eval ls tasks`, and a directory of your own YAML tasks is given by include path"
        )
    return [_load_one(name, manager) for name in names]


def _load_one(name: str, manager):
    try:
        loaded = manager.load([name])
    except Exception as e:
        if not _network_error(e):  # a broken task definition (often the user's own YAML)
            raise ValueError(f"task {name} could not be loaded: {type(e).__name__}: {e}") from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"task {name} needs the network to download its data ({reason}); connect once to "
            "fill the Hugging Face cache (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE stop downloads)"
        ) from None
    if name in loaded["groups"]:
        return loaded["groups"][name]
    if name in loaded["tasks"]:
        return loaded["tasks"][name]
    return list(loaded["tasks"].values())


def _network_error(e: BaseException) -> bool:
    """Whether loading failed for want of the network (datasets, huggingface_hub, requests)."""
    words = ("Connect", "Offline", "Timeout", "HTTP", "Hub")
    return isinstance(e, ConnectionError) or any(w in type(e).__name__ for w in words)


@dataclass
class EvalSettings:
    """What `evaluate` runs: task names (`task_names`) and lm-eval's options."""

    tasks: list[str]
    num_fewshot: int | None = None
    limit: int | float | None = None
    seed: int = 0
    include_paths: tuple[str, ...] = ()
    lm_eval_tasks: bool = True  # False: only local tasks (a much faster start)


def prepare_tasks(settings: EvalSettings, *, quiet: bool = True) -> list:
    """The tasks of `settings`, data loaded (before any model is: errors come early)."""
    require_lm_eval()
    if quiet:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tasks = load_tasks(settings.tasks, _manager(settings))
    return [t for item in tasks for t in (item if isinstance(item, list) else [item])]


def _manager(settings: EvalSettings):
    """The local index when it holds every task asked for (indexing lm-eval's own thousands
    of tasks takes seconds), else the full one."""
    local = task_manager(tuple(settings.include_paths), False)
    if not settings.lm_eval_tasks or all(n in local.all_tasks for n in settings.tasks):
        return local
    return task_manager(tuple(settings.include_paths), True)


def evaluate(lm, settings: EvalSettings, tasks: list | None = None) -> dict:
    """lm-eval's results dictionary for `lm` (an `ElmLM`) on `settings.tasks`.

    What lm-eval's `simple_evaluate` does for a model object, without importing torch
    for its seed and environment report: seeds, few-shot settings, then its `evaluate`.
    """
    require_lm_eval()
    from lm_eval.evaluator import evaluate as run_tasks

    tasks = prepare_tasks(settings) if tasks is None else tasks
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    loaded = _manager(settings).load(tasks)
    for task in loaded["tasks"].values():
        if settings.num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=settings.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=settings.seed)
    return run_tasks(lm=lm, task_dict=loaded, limit=settings.limit, log_samples=False)


# ---- the results table --------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    task: str
    metric: str
    value: float  # percent
    stderr: float | None
    published: float | None = None

    @property
    def diff(self) -> float | None:
        return None if self.published is None else self.value - self.published


def table_rows(results: dict, args=None, model_name: str = "") -> tuple[list[Row], str | None]:
    """Rows of the results table and the model card compared with (None when none fits).

    Paper tasks show the metric of the published number; other tasks every metric.
    """
    card = published_row(args, model_name) if args is not None else None
    published = card[1] if card else {}
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")  # "acc,none": metric and filter
            if not filt or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            if task in METRICS and metric != METRICS[task]:
                continue
            err = metrics.get(f"{metric}_stderr,{filt}")
            err = 100 * err if isinstance(err, (int, float)) and math.isfinite(err) else None
            scale = 100 if metric.startswith("acc") or metric in ("exact_match", "f1") else 1
            rows.append(Row(task, metric, scale * value, err, published.get(task)))
    done = [r for r in rows if r.task in PAPER_TASKS]
    if card and len({r.task for r in done}) == len(PAPER_TASKS):
        mean = sum(r.value for r in done) / len(done)
        rows.append(Row("average", "", mean, None, published["average"]))
    return rows, card[0] if card else None


def format_table(rows: list[Row], card: str | None) -> str:
    """The results as an aligned text table; a published column when a card matched."""
    head = ["task", "metric", "value", "stderr"]
    if card:
        head += [card, "diff"]
    lines = [head]
    for r in rows:
        line = [r.task, r.metric, f"{r.value:.2f}", "" if r.stderr is None else f"{r.stderr:.2f}"]
        if card:
            line += ["" if r.published is None else f"{r.published:.2f}"]
            line += ["" if r.diff is None else f"{r.diff:+.2f}"]
        lines.append(line)
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        pairs = enumerate(zip(line, widths, strict=True))
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in pairs]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
