"""`elm-mlx eval` (lm-evaluation-harness tasks) and `elm-mlx perplexity`."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from ..evaluation.perplexity import perplexity, read_documents
from ..evaluation.published import PAPER_TASKS
from ..evaluation.run import EVAL_HINT, EvalSettings, require_lm_eval, task_names
from ..evaluation.scoring import process_group
from ..formats.files import OutputExistsError, write_json
from ..generation.loading import load_for_generation
from .common import CliError, Command, add_model_flags, flag_names


def _add_scoring_flags(p) -> None:
    add_model_flags(p, "model directory or hub id, float or quantized (default: the nano model)")
    p.add_argument(
        "--batch-size", type=int, default=16, help="most sequences in one forward pass (16)"
    )
    p.add_argument(
        "--no-bos",
        action="store_true",
        help="do not put BOS before each text (the model cards' numbers use BOS)",
    )


def _add_eval(p) -> None:
    _add_scoring_flags(p)
    p.add_argument(
        "--tasks",
        required=True,
        help="comma list of lm-eval task names; paper = the seven zero-shot tasks; "
        "nano_next_line = a local task for the shipped nano model",
    )
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument(
        "--limit", type=float, help="at most this many documents per task (< 1: a fraction)"
    )
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="directory of your own lm-eval YAML tasks (repeatable)",
    )
    p.add_argument("--output", help="write the results as JSON to this file")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    p.add_argument("--seed", type=int, default=0, help="seed of lm-eval's sampling (0)")
    p.add_argument(
        "--max-gen-toks", type=int, default=256, help="generation cap of tasks that set none"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _limit(value: float | None):
    if value is None:
        return None
    if value <= 0:
        raise CliError(f"--limit must be > 0, got {value:g}")
    return int(value) if value >= 1 else value


def _run_eval(args) -> None:
    try:
        require_lm_eval()
    except ImportError as e:
        raise CliError(str(e)) from None
    from ..evaluation.harness import ElmLM
    from ..evaluation.run import evaluate, format_table, prepare_tasks, table_rows

    settings = EvalSettings(
        tasks=task_names(args.tasks),
        num_fewshot=args.num_fewshot,
        limit=_limit(args.limit),
        seed=args.seed,
        include_paths=tuple(args.include_path),
    )
    _check_output(args.output, args.force)
    tasks = prepare_tasks(settings)
    lm = ElmLM(
        args.model,
        adapter_path=args.adapter_path,
        batch_size=_batch_size(args.batch_size),
        add_bos_token=not args.no_bos,
        dtype=args.dtype,
        max_gen_toks=args.max_gen_toks,
        progress=not args.no_progress,
    )
    results = evaluate(lm, settings, tasks)
    if lm.group is not None and lm.group.rank() != 0:
        return
    name = args.model or "nano"
    rows, card = table_rows(results, lm.model.args, name)
    print(format_table(rows, card))
    if card:
        print(f"published: {card} model card (lm-eval, zero-shot, add_bos_token=True)")
    if args.output:
        write_json(args.output, _json_ready(_report(args, settings, results, rows, card)))
        print(f"wrote {args.output}", file=sys.stderr)


def _report(args, settings, results, rows, card) -> dict:
    return {
        "model": args.model or "nano",
        "adapter_path": args.adapter_path,
        "tasks": settings.tasks,
        "num_fewshot": settings.num_fewshot,
        "limit": settings.limit,
        "seed": settings.seed,
        "add_bos_token": not args.no_bos,
        "results": results.get("results", {}),
        "n-samples": results.get("n-samples", {}),
        "versions": results.get("versions", {}),
        "table": [
            {
                "task": r.task,
                "metric": r.metric,
                "value": r.value,
                "stderr": r.stderr,
                "published": r.published,
                "diff": r.diff,
            }
            for r in rows
        ],  # fmt: skip
        "published_card": card,
    }


def _json_ready(content):
    return json.loads(json.dumps(content, default=str))


def _check_output(path: str | None, force: bool) -> None:
    """Before the work: the results file can be written where --output says, and replaces
    a file only with --force."""
    if path is None:
        return
    if Path(path).is_dir():
        raise CliError(
            f"--output {path} is a directory; give a file name such as {path}/results.json"
        )
    if not Path(path).resolve().parent.is_dir():
        raise CliError(f"--output {path}: directory {Path(path).parent} does not exist")
    if Path(path).exists() and not force:
        raise OutputExistsError(f"--output {path} already exists", replaceable=True)
    parent = Path(path).resolve().parent
    try:  # a read-only directory is found now, not after the evaluation
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise CliError(f"--output {path}: cannot write in {parent}: {e.strerror or e}") from None


def _batch_size(n: int) -> int:
    if n < 1:
        raise CliError(f"--batch-size must be >= 1, got {n}")
    return n


def _add_perplexity(p) -> None:
    _add_scoring_flags(p)
    p.add_argument("--data", required=True, help="a .txt or .jsonl file")
    p.add_argument(
        "--stride",
        type=int,
        help="new tokens scored per window after the first (default: half the context; "
        "the context length gives disjoint windows)",
    )


def _run_perplexity(args) -> None:
    if args.stride is not None and args.stride < 1:  # before anything loads
        raise CliError(f"--stride must be >= 1, got {args.stride}")
    batch_size = _batch_size(args.batch_size)
    documents = read_documents(args.data)
    model, tokenizer, _ = load_for_generation(
        args.model, adapter_path=args.adapter_path, dtype=args.dtype
    )
    group = process_group()
    show = group is None or group.rank() == 0
    with (
        tqdm(unit="window", disable=not show, dynamic_ncols=True) as bar,
        flag_names({"stride": "--stride"}, leading=True),
    ):  # a stride longer than the model's context
        result = perplexity(
            model,
            tokenizer,
            documents,
            stride=args.stride,
            batch_size=batch_size,
            add_bos=not args.no_bos,
            group=group,
            progress=bar.update,
        )
    if show:
        print(f"documents:     {result.documents}")
        print(f"tokens scored: {result.tokens}")
        print(f"mean NLL:      {result.nll:.4f} nats/token")
        print(f"perplexity:    {result.perplexity:.3f}")
        print(f"tokens/s:      {result.tokens_per_second:.1f}")


COMMANDS = {
    "eval": Command(
        help="score a model on lm-evaluation-harness tasks",
        description="Run lm-evaluation-harness tasks on a model and print a results table. "
        f"--tasks paper runs {', '.join(PAPER_TASKS)} (zero-shot) and puts the numbers "
        "published on the OpenELM model cards beside ours. Tasks that need a download "
        "fail offline with one line. Under `mlx.launch -n N` the requests are split between "
        f"the processes. Needs lm-eval ({EVAL_HINT.split(': ', 1)[1]}).",
        add_flags=_add_eval,
        run=_run_eval,
    ),
    "perplexity": Command(
        help="perplexity of a model on a text or jsonl file",
        description="Score every token of a .txt file (one document) or a .jsonl file "
        '({"text": ...} per line, each a document) over windows of the model\'s context; '
        "print tokens scored, mean negative log-likelihood, perplexity and tokens/s.",
        add_flags=_add_perplexity,
        run=_run_perplexity,
    ),
}
