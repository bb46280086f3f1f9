"""Evaluation: our lm-eval backend against mlx-lm's and direct sums, the local task, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("lm_eval")

import launch  # noqa: E402

from elm_mlx.evaluation import scoring  # noqa: E402
from elm_mlx.evaluation.harness import ElmLM  # noqa: E402
from elm_mlx.evaluation.run import format_table, table_rows  # noqa: E402
from elm_mlx.generation.loading import load_for_generation  # noqa: E402
from elm_mlx.runtime.fastpath import CpuDecoder  # noqa: E402
from elm_mlx.testing import random_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "elm_mlx" / "evaluation" / "tasks" / "next_line.jsonl"
SCENE = ROOT / "examples" / "data" / "julius_caesar_3_2.txt"


class Req:
    """What lm-eval hands a backend: an object with `args`."""

    def __init__(self, *args):
        self.args = args


def _plain(model):
    return model.model if isinstance(model, CpuDecoder) else model


@pytest.fixture(scope="module")
def nano():
    model, tokenizer, _ = load_for_generation(None)
    return _plain(model), tokenizer


@pytest.fixture(scope="module")
def random_nano(nano):
    """The nano model's shapes and tokenizer with random weights."""
    model, tokenizer, _ = load_for_generation(None)
    model = _plain(model)
    model.load_weights([(k, mx.array(v)) for k, v in random_weights(model.args, 1).items()])
    return model, tokenizer


def _docs(n: int) -> list[dict]:
    return [json.loads(line) for line in TASK.read_text().splitlines()[:n]]


def _choice_requests(n: int) -> list[Req]:
    return [Req(d["context"], c) for d in _docs(n) for c in d["choices"]]


def _greedy_requests(model, tokenizer, n: int = 4) -> list[Req]:
    """Continuations the model itself generates greedily (is_greedy must be True)."""
    out = []
    for d in _docs(n):
        ids = tokenizer.encode(d["context"])
        for _ in range(4):
            ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
        out.append(Req(d["context"], tokenizer.decode(ids[len(tokenizer.encode(d["context"])) :])))
    return out


def _direct(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One forward pass over the whole request; numpy log-softmax."""
    logits = np.array(model(mx.array([context + continuation[:-1]]))[0], dtype=np.float64)
    logits = logits[len(context) - 1 :]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    rows = range(len(continuation))
    return (
        float(sum(logp[i, t] for i, t in zip(rows, continuation, strict=True))),
        all(int(logits[i].argmax()) == t for i, t in zip(rows, continuation, strict=True)),
    )


def _mlx_lm_backend(model_dir: Path, tokenizer):
    """mlx-lm's lm-eval backend on its own OpenELM implementation with the same weights."""
    from mlx_lm.evaluate import MLXLM
    from mlx_lm.models import openelm

    config = json.loads((model_dir / "config.json").read_text())
    theirs = openelm.Model(openelm.ModelArgs.from_dict(config))
    theirs.load_weights(str(model_dir / "model.safetensors"))

    class HFStyle:  # the two tokenizer calls mlx-lm makes, over the same SentencePiece model
        def encode(self, text, add_special_tokens=True):
            return tokenizer.encode(text, bos=add_special_tokens)

    lm = MLXLM.__new__(MLXLM)
    lm._model, lm.tokenizer, lm._max_tokens, lm._batch_size = theirs, HFStyle(), None, 8
    lm.use_chat_template = False
    return lm


def test_loglikelihoods_equal_mlx_lm_backend(nano):
    from elm_mlx.formats.modeldir import default_model_path

    model, tokenizer = nano
    requests = _choice_requests(8) + _greedy_requests(model, tokenizer)
    ours = ElmLM(model=model, tokenizer=tokenizer, batch_size=8, progress=False)
    theirs = _mlx_lm_backend(Path(default_model_path()), tokenizer)
    a, b = ours.loglikelihood(requests, disable_tqdm=True), theirs.loglikelihood(requests)
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], rtol=1e-5, atol=2e-4)
    assert [g for _, g in a] == [bool(g) for _, g in b]
    assert sum(g for _, g in a) >= 4  # the greedy continuations are flagged


def test_rolling_equals_mlx_lm_and_direct_sum_for_short_text(nano):
    from elm_mlx.formats.modeldir import default_model_path

    model, tokenizer = nano
    text = SCENE.read_text()[:300]
    ids = tokenizer.encode(text, bos=False)
    assert len(ids) < model.args.max_context_length
    ours = ElmLM(model=model, tokenizer=tokenizer, progress=False)
    got = ours.loglikelihood_rolling([Req(text)], disable_tqdm=True)[0]
    want, _ = _direct(model, [tokenizer.bos_id], ids)
    theirs = _mlx_lm_backend(Path(default_model_path()), tokenizer)
    assert got == pytest.approx(want, rel=1e-5)
    assert got == pytest.approx(theirs.loglikelihood_rolling([Req(text)])[0], rel=1e-5)


@pytest.mark.parametrize("stride", [None, 100, 1])
def test_rolling_windows_cover_every_token_once(stride):
    tokens = list(range(3, 603))
    windows = scoring.rolling_windows(tokens, 1, 256, stride)
    assert [t for _, cont in windows for t in cont] == tokens
    seq = [1] + tokens
    for n, (ctx, cont) in enumerate(windows):
        assert len(ctx) + len(cont) - 1 <= 256
        start = seq.index(cont[0])
        assert seq[start - len(ctx) : start] == ctx  # the tokens just before, in order
        if n and stride is not None:  # as much left context as fits
            assert len(ctx) == 256 + 1 - len(cont)


def test_rolling_long_text_is_the_sum_of_its_windows(nano):
    model, tokenizer = nano
    text = SCENE.read_text()[:1800]
    ids = tokenizer.encode(text, bos=False)
    windows = scoring.rolling_windows(ids, tokenizer.bos_id, model.args.max_context_length)
    assert len(windows) >= 3
    ours = ElmLM(model=model, tokenizer=tokenizer, progress=False)
    got = ours.loglikelihood_rolling([Req(text)], disable_tqdm=True)[0]
    want = math.fsum(_direct(model, list(c), list(k))[0] for c, k in windows)
    assert got == pytest.approx(want, rel=1e-5)


def test_batch_sizes_and_shared_contexts_agree_with_scoring_each_request_alone(nano):
    model, tokenizer = nano
    lm = ElmLM(model=model, tokenizer=tokenizer, progress=False)
    pairs = [lm._encode_pair(r.args[0], r.args[1]) for r in _choice_requests(5)]
    pairs += [([tokenizer.bos_id], tokenizer.encode("O Caesar", bos=False))]  # one-token context
    alone = [_direct(model, list(c), list(k)) for c, k in pairs]
    for batch_size in (1, 8):
        got = scoring.score(model, pairs, batch_size=batch_size)
        np.testing.assert_allclose([x for x, _ in got], [x for x, _ in alone], rtol=1e-5)
        assert [g for _, g in got] == [g for _, g in alone]
    # Five questions of four choices, batch 8: two contexts per forward pass, each computed once.
    batches = scoring.plan_batches(pairs, 256, 8, 4096)
    assert [sum(len(g.items) for g in b) for b in batches] == [8, 8, 5]


def test_nano_scores_above_chance_on_held_out_play_and_random_weights_near_chance(tmp_path):
    """`elm-mlx eval --tasks nano_next_line --limit 80`: the nano model scores 51.25%,
    the same shapes and tokenizer with random weights 22.50% (chance: 25%)."""
    import shutil

    from elm_mlx.formats.modeldir import default_model_path
    from elm_mlx.model.config import ModelArgs
    from elm_mlx.testing import write_hf_checkpoint

    nano_dir = Path(default_model_path())
    args = ModelArgs.from_dict(json.loads((nano_dir / "config.json").read_text()))
    random_dir = write_hf_checkpoint(tmp_path / "random", args, random_weights(args, 1))
    shutil.copyfile(nano_dir / "tokenizer.model", random_dir / "tokenizer.model")
    accuracy = {}
    for name, model in {"nano": nano_dir, "random": random_dir}.items():
        out = tmp_path / f"{name}.json"
        r = _cli("eval", "--model", str(model), "--tasks", "nano_next_line", "--limit", "80",
                 "--no-progress", "--output", str(out))  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "nano_next_line  acc " in r.stdout
        accuracy[name] = json.loads(out.read_text())["results"]["nano_next_line"]["acc,none"]
    assert accuracy["nano"] >= 0.45, accuracy  # standard error about 0.056
    assert 0.1 <= accuracy["random"] <= 0.37, accuracy


def test_results_table_puts_published_numbers_beside_ours():
    from elm_mlx.model.config import preset

    results = {"results": {t: {"acc,none": 0.5, "acc_norm,none": 0.6, "acc_stderr,none": 0.01}
                           for t in ("arc_easy", "boolq", "nano_next_line")}}  # fmt: skip
    rows, card = table_rows(results, preset("OpenELM-270M"), "openelm-270m-q4")
    assert card == "OpenELM-270M"
    by = {(r.task, r.metric): r for r in rows}
    assert by[("arc_easy", "acc_norm")].diff == pytest.approx(60 - 45.08)
    assert ("arc_easy", "acc") not in by  # the card's metric only
    assert by[("boolq", "acc")].published == 53.98
    assert by[("nano_next_line", "acc")].published is None
    assert "OpenELM-270M" in format_table(rows, card)
    assert table_rows(results, preset("OpenELM-450M"), "x/OpenELM-450M-Instruct")[1] == (
        "OpenELM-450M-Instruct"
    )


def test_published_rows_cover_every_size_and_their_averages_add_up():
    from elm_mlx.evaluation.published import PAPER_TASKS, PUBLISHED, published_row
    from elm_mlx.model.config import PRESETS, preset

    assert sorted(PUBLISHED) == sorted(PRESETS)
    for name, row in PUBLISHED.items():  # a check on the transcription from the card
        mean = sum(row[t] for t in PAPER_TASKS) / len(PAPER_TASKS)
        assert abs(mean - row["average"]) <= 0.005 + 1e-9, name
        assert published_row(preset(name), name.lower())[0] == name
    assert published_row(preset("OpenELM-3B"), "my-3b-q4")[1]["hellaswag"] == 72.44
    card, row = published_row(preset("OpenELM-1_1B-Instruct"), "x/OpenELM-1_1B-Instruct")
    assert card == "OpenELM-1_1B-Instruct" and row["arc_challenge"] == 37.97


# ---- two processes ---------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, sys
    from elm_mlx.runtime.blas import preload_blas
    preload_blas()  # before MLX, as the CLI does
    import mlx.core as mx
    from elm_mlx.evaluation.harness import ElmLM
    from elm_mlx.generation.loading import load_for_generation

    class Req:
        def __init__(self, *args):
            self.args = args

    docs = [json.loads(line) for line in open(sys.argv[2]).read().splitlines()[:10]]
    requests = [Req(d["context"], c) for d in docs for c in d["choices"]]
    model, tokenizer, _ = load_for_generation(None)
    lm = ElmLM(model=model, tokenizer=tokenizer, batch_size=8, progress=False)
    rank = 0 if lm.group is None else lm.group.rank()
    out = {
        "size": 1 if lm.group is None else lm.group.size(),
        "ll": lm.loglikelihood(requests, disable_tqdm=True),
        "rolling": lm.loglikelihood_rolling([Req(d["context"]) for d in docs], disable_tqdm=True),
        "text": lm.generate_until(
            [Req(d["context"], {"until": ["\\n"], "max_gen_toks": 6}) for d in docs[:3]],
            disable_tqdm=True,
        ),
    }
    json.dump(out, open(f"{sys.argv[1]}/rank{rank}.json", "w"))
    """
)


def test_two_processes_give_the_results_of_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (tmp_path / "one").mkdir()
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), str(TASK)], env=env, check=True
    )
    (tmp_path / "two").mkdir()
    launch.run_ranks(script, [str(tmp_path / "two"), str(TASK)], tmp_path)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert one["size"] == 1 and ranks[0]["size"] == 2
    for two in ranks:  # the same batches in either layout: equal to the bit
        assert two["ll"] == one["ll"] and two["rolling"] == one["rolling"]
        assert two["text"] == one["text"]


# ---- the command line -------------------------------------------------------------------


def _cli(*argv, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "elm_mlx.cli", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=timeout,
    )


def test_cli_help():
    for command in ("eval", "perplexity"):
        r = _cli(command, "--help")
        assert r.returncode == 0 and "--batch-size" in r.stdout
    assert "paper" in _cli("eval", "--help").stdout


def test_cli_errors_are_one_line(tmp_path):
    """Unknown task, a download task offline, a bad model path: one `error:` line each."""
    script = textwrap.dedent(
        """
        import sys
        from elm_mlx.cli import main
        for argv in (["eval", "--tasks", "no_such_task"], ["eval", "--tasks", "arc_easy"],
                     ["eval", "--tasks", "nano_next_line", "--model", sys.argv[1]]):
            print("status", main(argv), flush=True)
            print("--- end", file=sys.stderr, flush=True)
        """
    )
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **offline},
        timeout=300,
    )
    assert r.stdout.split() == ["status", "1"] * 3, r.stderr
    unknown, download, missing = [
        [line for line in part.strip().splitlines() if line]
        for part in r.stderr.split("--- end")[:3]
    ]
    assert len(unknown) == 1 and "unknown task 'no_such_task'" in unknown[0]
    assert download[-1].startswith("error: task arc_easy needs the network"), download
    assert not any("Traceback" in line for line in download)
    assert len(missing) == 1 and "missing" in missing[0] and missing[0].startswith("error:")


def test_cli_perplexity(tmp_path):
    data = tmp_path / "d.jsonl"
    text = SCENE.read_text()
    data.write_text(json.dumps({"text": text[:1500]}) + "\n" + json.dumps({"text": text[-900:]}))
    r = _cli("perplexity", "--data", str(data), "--stride", "128")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(":", 1) for line in r.stdout.splitlines())
    assert int(lines["documents"]) == 2
    nll, ppl = float(lines["mean NLL"].split()[0]), float(lines["perplexity"])
    assert ppl == pytest.approx(math.exp(nll), rel=1e-3)
    assert 3.0 < nll < 6.0  # the nano model's held-out loss is 4.48 (REPORT.md)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    r = _cli("perplexity", "--data", str(bad))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f'error: {bad} line 1: need an object with a string "text" field'
    ]


def test_generate_until_stops_at_stop_strings_and_max_gen_toks(nano):
    from elm_mlx.generation.generate import generate

    model, tokenizer = nano
    lm = ElmLM(model=model, tokenizer=tokenizer, progress=False)
    context = "BRUTUS:\nThen follow me, and give me audience, friends."
    free, stopped, short = lm.generate_until(
        [
            Req(context, {"until": ["<never>"], "max_gen_toks": 24}),
            Req(context, {"until": ["\n\n", ","], "max_gen_toks": 24}),
            Req(context, {"until": ["<never>"], "max_gen_toks": 3, "do_sample": False}),
        ],
        disable_tqdm=True,
    )
    assert free == generate(model, tokenizer, context, max_tokens=24)  # greedy
    cut = min(i for i in (free.find("\n\n"), free.find(",")) if i >= 0)
    assert stopped == free[:cut]
    assert len(tokenizer.encode(short, bos=False)) <= 3 and free.startswith(short)


@pytest.mark.parametrize("fast", [False, True])
def test_generate_until_batches_requests_each_as_generated_alone(nano, fast):
    """Requests with their own stop strings, lengths and sampling, three rows per step (on
    the numpy CPU path and on MLX's): each text equals `generate` on that request alone."""
    from elm_mlx.generation.generate import generate

    model, tokenizer = (load_for_generation(None)[:2]) if fast else nano
    if isinstance(model, CpuDecoder) != fast:
        pytest.skip("no numpy CPU path on this device")
    lm = ElmLM(model=model, tokenizer=tokenizer, batch_size=3, progress=False)
    asks = [
        ("ROMEO:\n", {"until": ["\n"], "max_gen_toks": 30}),
        ("JULIET:\nO Romeo, Romeo!", {"until": [",", "."], "max_gen_toks": 30}),
        ("HAMLET:\n", {"until": ["<never>"], "max_gen_toks": 7}),
        ("First Citizen:\n", {"until": ["\n\n"], "max_gen_toks": 40, "do_sample": True,
                               "temperature": 0.8}),
        ("KING HENRY:\nOnce more", {"until": "the", "max_gen_toks": 25}),
    ]  # fmt: skip
    got = lm.generate_until([Req(c, o) for c, o in asks], disable_tqdm=True)
    for (context, o), text in zip(asks, got, strict=True):
        temp = o.get("temperature", 0.0)
        until = [o["until"]] if isinstance(o["until"], str) else o["until"]
        alone = generate(model, tokenizer, context, max_tokens=o["max_gen_toks"], stop=until,
                         temp=temp, seed=0 if temp else None)  # fmt: skip
        assert text == alone, context
    assert all(got) and len(set(got)) == len(got), got


@pytest.mark.parametrize("kind", ["q8", "lora"])
def test_quantized_and_adapter_models_score_like_a_direct_forward_pass(nano, kind):
    from elm_mlx.generation.loading import load_for_generation
    from elm_mlx.quant.quantize import QuantizeSpec, quantize_model
    from elm_mlx.training.lora import LoRAConfig, apply_lora

    model, tokenizer, _ = load_for_generation(None)
    model = _plain(model)
    if kind == "q8":
        quantize_model(model, QuantizeSpec(8, 32))
    else:
        apply_lora(model, LoRAConfig(rank=4))
        for layer in model.layers:  # non-zero adapters, so they change the scores
            layer.attn.qkv_proj.lora_b = mx.full(layer.attn.qkv_proj.lora_b.shape, 0.01)
    lm = ElmLM(model=model, tokenizer=tokenizer, progress=False)
    pairs = [lm._encode_pair(r.args[0], r.args[1]) for r in _choice_requests(3)]
    got = scoring.score(model, pairs, batch_size=8)
    want = [_direct(model, list(c), list(k)) for c, k in pairs]
    np.testing.assert_allclose([x for x, _ in got], [x for x, _ in want], rtol=1e-5)
    floats = scoring.score(nano[0], pairs)
    moved = max(abs(a[0] - b[0]) for a, b in zip(got, floats, strict=True))
    assert 0 < moved < 5


def test_task_names_expand_paper():
    from elm_mlx.evaluation.published import PAPER_TASKS
    from elm_mlx.evaluation.run import task_names

    assert task_names("paper") == list(PAPER_TASKS)
    assert task_names("nano_next_line, paper,boolq")[:2] == ["nano_next_line", "arc_challenge"]
    with pytest.raises(ValueError, match="no task names"):
        task_names(" , ")


def test_a_broken_local_task_is_one_error_naming_it(tmp_path):
    from elm_mlx.evaluation.run import EvalSettings, prepare_tasks

    (tmp_path / "t.yaml").write_text(
        "task: broken_task\noutput_type: multiple_choice\ncustom_dataset: !function nothere.load\n"
    )
    settings = EvalSettings(tasks=["broken_task"], include_paths=(str(tmp_path),))
    with pytest.raises(ValueError, match="task broken_task could not be loaded: ImportError"):
        prepare_tasks(settings)


def test_without_lm_eval_the_command_says_how_to_install_it(monkeypatch, capsys):
    from elm_mlx.cli.app import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    assert main(["eval", "--tasks", "nano_next_line"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: evaluation needs lm-eval: pip install 'elm-mlx[eval]'"
    )


def test_rolling_through_the_cpu_fast_path_equals_the_batched_mlx_path(nano):
    """On the CPU, rolling windows go one at a time through the numpy prompt path."""
    from elm_mlx.evaluation.perplexity import perplexity
    from elm_mlx.runtime.fastpath import fast_decoder

    model, tokenizer = nano
    fast = fast_decoder(model)
    if not isinstance(fast, CpuDecoder):
        pytest.skip("MLX does not run on the CPU here: no numpy path")
    text = SCENE.read_text()[:1800]
    calls = []
    forward = fast.forward
    fast.forward = lambda *a: calls.append(1) or forward(*a)  # count numpy passes
    via_numpy = ElmLM(model=fast, tokenizer=tokenizer, progress=False)
    batched = ElmLM(model=model, tokenizer=tokenizer, progress=False, batch_size=8)
    got = via_numpy.loglikelihood_rolling([Req(text)], disable_tqdm=True)[0]
    want = batched.loglikelihood_rolling([Req(text)], disable_tqdm=True)[0]
    n_windows = len(calls)
    assert n_windows >= 3 and got == pytest.approx(want, rel=1e-5)
    a = perplexity(fast, tokenizer, [text], stride=100)
    b = perplexity(model, tokenizer, [text], stride=100)
    assert len(calls) > n_windows and a.tokens == b.tokens
    assert a.nll == pytest.approx(b.nll, rel=1e-5)


def test_cli_output_that_is_a_directory_fails_before_the_work(tmp_path):
    r = _cli("eval", "--tasks", "nano_next_line", "--limit", "2", "--output", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: --output {tmp_path} is a directory; give a file name such as "
        f"{tmp_path}/results.json"
    ]


def test_cli_output_that_exists_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "results.json"
    out.write_text("earlier results\n")
    argv = ["eval", "--tasks", "nano_next_line", "--limit", "2", "--no-progress", "--output"]
    r = _cli(*argv, str(out))
    assert r.returncode == 1 and r.stdout == ""  # refused before the work
    assert r.stderr.strip().splitlines() == [
        f"error: --output {out} already exists; pass --force to replace it"
    ]
    assert out.read_text() == "earlier results\n"
    r = _cli(*argv, str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["tasks"] == ["nano_next_line"]
