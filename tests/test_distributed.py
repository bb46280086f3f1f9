"""Data parallel training: two ring-backend processes on 127.0.0.1 against one process."""

from __future__ import annotations

import textwrap
from pathlib import Path

import launch
import mlx.core as mx
import numpy as np
import pytest

from elm_mlx.model.openelm import OpenELM
from elm_mlx.testing import random_weights, tiny_args
from elm_mlx.training.data import Dataset, Example
from elm_mlx.training.lora import LoRAConfig, apply_lora
from elm_mlx.training.trainer import TrainArgs, make_optimizer, train

ROOT = Path(__file__).resolve().parents[1]

# Builds the same model and data in every process; run as a script by the test.
SETUP = textwrap.dedent(
    """
    import numpy as np
    import mlx.core as mx
    from elm_mlx.training.data import Dataset, Example
    from elm_mlx.training.lora import LoRAConfig, apply_lora
    from elm_mlx.model.openelm import OpenELM
    from elm_mlx.testing import random_weights, tiny_args
    from elm_mlx.training.trainer import TrainArgs, make_optimizer, train

    def setup(out_dir):
        args = tiny_args(tied=False)
        weights = random_weights(args, 0)
        weights["lm_head.weight"] *= 5
        model = OpenELM(args)
        model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
        apply_lora(model, LoRAConfig(rank=8, scale=4.0))
        rng = np.random.default_rng(0)
        # Different lengths, so the ranks' halves of a batch hold different token counts.
        examples = [Example([1] + rng.integers(3, 128, 8 + i % 5).tolist()) for i in range(12)]
        data = Dataset("train.jsonl", examples, max_seq_length=64)
        targs = TrainArgs(iters=4, batch_size=4, learning_rate=1e-3, val_every=0,
                          save_every=0, report_every=0, out_dir=out_dir)
        return model, data, targs
    """
)

WORKER = SETUP + textwrap.dedent(
    """
    import sys
    from mlx.utils import tree_flatten

    out = sys.argv[1]
    group = mx.distributed.init(strict=True, backend="ring")
    model, data, targs = setup(out)
    train(model, make_optimizer(targs), data, None, targs, group=group, log=lambda _: None)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(f"{out}/rank{group.rank()}.safetensors", weights)
    """
)


def run_ranks(tmp_path: Path, world: int = 2) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launch.run_ranks(script, [str(tmp_path)], tmp_path, world)
    return [mx.load(str(tmp_path / f"rank{r}.safetensors")) for r in range(world)]


def single_process(tmp_path: Path) -> dict:
    namespace: dict = {}
    exec(SETUP, namespace)
    model, data, targs = namespace["setup"](str(tmp_path))
    train(model, make_optimizer(targs), data, None, targs, log=lambda _: None)
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.trainable_parameters()))


def test_two_processes_match_each_other_and_one_process(tmp_path):
    (tmp_path / "ddp").mkdir()
    rank0, rank1 = run_ranks(tmp_path / "ddp")
    assert rank0.keys() == rank1.keys()
    # Both ranks apply the same summed gradient: identical to the bit.
    assert all(mx.array_equal(rank0[k], rank1[k]).item() for k in rank0)
    (tmp_path / "single").mkdir()
    alone = single_process(tmp_path / "single")
    assert alone.keys() == rank0.keys()
    moved = any(not mx.array_equal(alone[k], mx.zeros_like(alone[k])).item() for k in alone)
    assert moved
    for k in alone:
        np.testing.assert_allclose(np.array(rank0[k]), np.array(alone[k]), atol=2e-5, rtol=1e-4)
    # Only rank 0 wrote the trainer's files.
    assert (tmp_path / "ddp" / "checkpoint" / "state.json").is_file()


def test_batch_must_split_across_processes():
    from elm_mlx.training.data import DataError

    class FakeGroup:
        def rank(self):
            return 0

        def size(self):
            return 3

    args = tiny_args()
    model = OpenELM(args)
    model.load_weights([(k, mx.array(v)) for k, v in random_weights(args, 0).items()])
    apply_lora(model, LoRAConfig(rank=2))
    data = Dataset("t", [Example([1, 2, 3, 4])] * 8, max_seq_length=16)
    with pytest.raises(DataError, match="does not split across 3 processes"):
        targs = TrainArgs(batch_size=4)
        train(model, make_optimizer(targs), data, None, targs, group=FakeGroup(), log=print)
