"""benchmarks/bench_generate.py's verdict: a non-zero exit when the contenders' greedy tokens
differ (the contenders themselves are faked; the full run is a benchmark, not a test)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"


@pytest.fixture
def bench(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "checkpoint", lambda size, seed, workdir: tmp_path)
    monkeypatch.setattr(module, "copy_bandwidth", lambda: 10.0)
    return module


def fake_results(tokens_by_name: dict) -> dict:
    return {
        name: {
            "prompt_tps": 100.0, "decode_tps": 10.0, "peak_mlx_gb": 1.0, "maxrss_gb": 2.0,
            "decode_all": [10.0], "prompt_all": [100.0], "tokens": tokens,
        }
        for name, tokens in tokens_by_name.items()
    }  # fmt: skip


@pytest.mark.parametrize("other, status", [([5, 6, 7], 0), ([5, 6, 8], 1)])
def test_exit_status_says_whether_greedy_tokens_agree(bench, monkeypatch, capsys, other, status):
    names = ["elm_mlx", "mlx-lm (OpenBLAS)", "elm_mlx bfloat16"]
    results = fake_results({names[0]: [5, 6, 7], names[1]: other, names[2]: [9, 9, 9]})
    monkeypatch.setattr(bench, "run_rounds", lambda names, opts, model_dir: results)
    code = bench.main(["--no-breakdown", "--only", ",".join(names)])
    out = capsys.readouterr().out
    assert code == status
    differ = "none" if status == 0 else "['mlx-lm (OpenBLAS)']"  # half precision not counted
    assert f"greedy tokens (first 16) differ from elm_mlx's: {differ}\n" in out
