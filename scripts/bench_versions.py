"""Estimator and probe times of two versions of unifyreg, measured in one run.

Runs the same timings in fresh subprocesses for each source tree given (``--trees``,
e.g. a ``git worktree`` of the previous commit and this one), alternating between them
``--rounds`` times, and prints the median of each and the ratio of the second to the
first. Timed (float64, 2 threads, medians inside each worker too):

- ``probe``: :func:`unifyreg.probing.run_probe` of the toy base (``--model``) on the toy
  probe set (batch 64), what ``EntropyProbe`` runs after every epoch;
- ``entropy 25x600x1024``: ``matrix_entropy`` of ``[25, 600, 1024]`` (one sequence per
  layer, the foundation benchmark's size);
- ``entropy 64x40x128``: ``matrix_entropy`` of ``[64, 40, 128]`` (many short
  sequences, the toy's regime);
- ``proxy 16x(300+64)x256``: ``conditional_entropy_proxy`` on ``[16, 300, 256]`` and
  ``[16, 64, 256]``.

Only functions whose signature both versions share are called. Usage:
``python scripts/bench_versions.py --trees OLD NEW --model TOY_BASE_DIR [--rounds 4]``.
Run with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(2)
from unifyreg.estimators import conditional_entropy_proxy, matrix_entropy
from unifyreg.adapters.toy import ToyAdapter
from unifyreg.config import ProbeConfig
from unifyreg.probing import run_probe
from unifyreg.toy.splits import build_splits

def best(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return statistics.median(times)

g = torch.Generator().manual_seed(0)
big = torch.randn(25, 600, 1024, generator=g, dtype=torch.float64)
small = torch.randn(64, 40, 128, generator=g, dtype=torch.float64)
Zp = torch.randn(16, 300, 256, generator=g, dtype=torch.float64)
Zr = torch.randn(16, 64, 256, generator=g, dtype=torch.float64)
adapter = ToyAdapter.load(sys.argv[1])
splits = build_splits()
examples = [e for name, split in splits.items() if name.startswith("probe/") for e in split]
cfg = ProbeConfig(batch_size=64)
with torch.no_grad():
    out = {
        "probe": best(lambda: run_probe(adapter, examples, cfg), 5),
        "entropy 25x600x1024": best(lambda: matrix_entropy(big), 2),
        "entropy 64x40x128": best(lambda: matrix_entropy(small), 20),
        "proxy 16x(300+64)x256": best(lambda: conditional_entropy_proxy(Zp, Zr), 5),
    }
print(json.dumps(out))
"""


def run(tree: str, model: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, model],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", nargs=2, required=True, help="OLD and NEW source trees")
    parser.add_argument("--model", required=True, help="a saved toy model directory")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {tree: [] for tree in args.trees}
    for index in range(args.rounds):
        order = args.trees if index % 2 == 0 else args.trees[::-1]
        for tree in order:
            results[tree].append(run(tree, args.model))
        print(f"round {index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    old, new = args.trees
    print(f"{args.rounds} rounds, alternating; seconds, median over rounds")
    print(
        f"| timing | {os.path.basename(old.rstrip('/'))} | {os.path.basename(new.rstrip('/'))} "
        "| new / old |"
    )
    print("|---|---|---|---|")
    for key in results[old][0]:
        a = statistics.median(r[key] for r in results[old])
        b = statistics.median(r[key] for r in results[new])
        print(f"| {key} | {a:.4f} | {b:.4f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
