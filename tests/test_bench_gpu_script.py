"""``scripts/bench_gpu.py``'s epoch share runs (on the CPU at tiny sizes), so the one GPU
command of issue 20 does not rot between the sessions that get a GPU."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture()
def bench_gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_gpu

    yield bench_gpu
    sys.modules.pop("bench_gpu", None)


def test_epoch_share_times_a_step_and_the_probe(bench_gpu, capsys):
    tiny = dict(grid=4, hidden=32, layers=2, heads=2, intermediate=64)
    row = bench_gpu.epoch_share_table("cpu", 6, 2, 24, tiny)
    assert row["step_seconds"] > 0 and row["probe_seconds"] > 0
    assert row["probe_steps"] == pytest.approx(row["probe_seconds"] / row["step_seconds"])
    assert row["break_even_steps"] == math.ceil(20 * row["probe_seconds"] / row["step_seconds"])
    assert row["tokens_per_batch"] >= 2 * (24 + 16)  # two examples of >= 24 words + 16 cells
    assert "| 2 x 32, 16 image tokens | 2 (" in capsys.readouterr().out
    with pytest.raises(ValueError, match="prompt_words must exceed"):
        bench_gpu.epoch_share_table("cpu", 6, 2, 16, tiny)


def test_the_gpu_benchmark_says_why_it_stops_without_cuda(bench_gpu, capsys):
    if bench_gpu.torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the script would run the whole grid")
    assert bench_gpu.main(["--all"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
