"""Benchmark: unifyreg's exact entropy against the tuned NumPy loop (and repitl), side by side.

The same quantity (alpha = 1.01 by default, lower-median bandwidth, float64, bits) of
every layer of ``[L, n, d]`` seeded Gaussian tokens, on the foundation grid of
``scripts/bench_estimators.py`` (L in {13, 25}, n in {128, 600, 1200}, d in {256, 1024}):

- ``unifyreg``: :func:`unifyreg.estimators.matrix_entropy` on the float64 tensor at once;
- ``before``: the same call with the torch kernels the exact path used before issue 20
  (``torch.linalg.eigvalsh``, ``baddbmm`` distances, one chunk): NumPy's kernels and the
  CPU chunking switched off, so its values are today's reference (the diff column);
- ``tuned``: the tuned per-layer NumPy loop of ``scripts/bench_estimators.py``
  (Gram-trick distances, ``np.linalg.eigvalsh``) on the same float64 array;
- ``repitl``: a per-layer loop over repitl's ``gaussianKernel`` (Gram-trick distances)
  and ``matrixAlphaEntropy`` (``torch.linalg.eigh``), with the same bandwidth, when the
  ``repitl`` package can be imported. The PyPI package ``representation-itl`` (1.0.7)
  ships no code, only metadata: install repitl from its GitHub repository to include it.

All contestants run in this one process with one thread (torch, OpenMP, MKL, OpenBLAS:
set before NumPy loads), in interleaved rounds (the order rotates every round), so a
shared machine's drift hits all of them alike (small sizes get more rounds, until every
contestant has run ``--min-seconds``); times are medians over the rounds, and
``x`` columns are ratios of medians (``tuned / unifyreg`` > 1: unifyreg is faster).

Usage: ``python scripts/bench_compare.py [--quick] [--rounds N] [--min-seconds S]
[--only-n 128,600] [--alpha A] [--json FILE]``.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import bench_estimators  # noqa: E402  (a sibling script: scripts/ is sys.path[0])
import numpy as np  # noqa: E402
import torch  # noqa: E402

from unifyreg.estimators import matrix_entropy  # noqa: E402
from unifyreg.estimators.blocked import torch_kernels_only  # noqa: E402

FULL_GRID = bench_estimators.FULL_GRID
QUICK_GRID = bench_estimators.QUICK_GRID


def tuned_loop(X: np.ndarray, alpha: float) -> np.ndarray:
    """``scripts/bench_estimators.py``'s tuned loop at any alpha."""
    saved = bench_estimators.ALPHA
    bench_estimators.ALPHA = alpha
    try:
        return np.array([bench_estimators.tuned_entropy(x) for x in X])
    finally:
        bench_estimators.ALPHA = saved


def repitl_loop(Z: torch.Tensor, alpha: float):
    """A per-layer loop over repitl's Gram and entropy (bits), or None without repitl."""
    try:
        from repitl import kernel_utils, matrix_itl
    except ImportError:
        return None
    out = []
    for z in Z:
        D = torch.cdist(z, z).pow(2)
        pairs = D[torch.triu_indices(len(z), len(z), 1).unbind()]
        sigma = pairs.median().clamp_min(1e-12).sqrt()
        K = kernel_utils.gaussianKernel(z, z, sigma, calcOption="matmul")
        out.append(float(matrix_itl.matrixAlphaEntropy(K, alpha)) / math.log(2))
    return np.array(out)


def contestants(Z: torch.Tensor, X: np.ndarray, alpha: float) -> dict:
    def before():
        with torch_kernels_only():
            return matrix_entropy(Z, alpha=alpha).numpy()

    found = {
        "unifyreg": lambda: matrix_entropy(Z, alpha=alpha).numpy(),
        "before": before,
        "tuned": lambda: tuned_loop(X, alpha),
    }
    if importlib.util.find_spec("repitl") is not None:
        found["repitl"] = lambda: repitl_loop(Z, alpha)
    return found


def run_size(L: int, n: int, d: int, rounds: int, alpha: float, min_seconds: float) -> dict:
    gen = torch.Generator().manual_seed(0)
    Z = torch.randn(L, n, d, generator=gen, dtype=torch.float64)
    X = Z.numpy()  # the same memory: every contestant reads the same float64 input
    fns = contestants(Z, X, alpha)
    names = list(fns)
    times = {name: [] for name in names}
    values = {name: fns[name]() for name in names}  # warm-up, and the values compared
    r = 0
    while r < rounds or min(sum(t) for t in times.values()) < min_seconds:
        order = names[r % len(names) :] + names[: r % len(names)]
        r += 1
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    row = dict(L=L, n=n, d=d, rounds=r, seconds=medians)
    ours = medians["unifyreg"]
    row["x_vs"] = {name: medians[name] / ours for name in names if name != "unifyreg"}
    row["max_abs_diff_bits"] = {
        name: float(np.abs(values["unifyreg"] - values[name]).max())
        for name in names
        if name != "unifyreg"
    }
    return row


def print_table(rows: list[dict]) -> None:
    others = [name for name in rows[0]["x_vs"]]
    head = ["L", "n", "d", "unifyreg (s)"] + [f"{name} (s)" for name in others]
    head += [f"{name} / unifyreg" for name in others]
    head += [f"max diff vs {name} (bits)" for name in others]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [str(r["L"]), str(r["n"]), str(r["d"]), f"{r['seconds']['unifyreg']:.4f}"]
        cells += [f"{r['seconds'][name]:.4f}" for name in others]
        cells += [f"{r['x_vs'][name]:.2f}" for name in others]
        cells += [f"{r['max_abs_diff_bits'][name]:.1e}" for name in others]
        print("| " + " | ".join(cells) + " |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes only")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=2.0,
        help="more rounds until every contestant has run this long (small sizes)",
    )
    parser.add_argument("--only-n", help="comma-separated n values of the grid to run")
    parser.add_argument("--alpha", type=float, default=bench_estimators.ALPHA)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    torch.set_num_threads(1)
    print(f"Machine: {bench_estimators.machine_description()}")
    repitl = importlib.util.find_spec("repitl") is not None
    print(
        f"alpha = {args.alpha}, median bandwidth, float64, bits; medians of >= {args.rounds} "
        f"interleaved rounds (>= {args.min_seconds} s each); "
        f"repitl {'imported' if repitl else 'not importable (skipped)'}\n"
    )
    rows = []
    grid = QUICK_GRID if args.quick else FULL_GRID
    if args.only_n:
        wanted = {int(x) for x in args.only_n.split(",")}
        grid = [size for size in grid if size[1] in wanted]
    for L, n, d in grid:
        rows.append(run_size(L, n, d, args.rounds, args.alpha, args.min_seconds))
        print(
            f"L={L} n={n} d={d} ({rows[-1]['rounds']} rounds): "
            + ", ".join(f"{k} {v:.2f}x" for k, v in rows[-1]["x_vs"].items()),
            flush=True,
        )
    print()
    print_table(rows)
    worst = max(r["max_abs_diff_bits"]["before"] for r in rows)
    print(f"\nmax |unifyreg - before| over all sizes: {worst:.1e} bits")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": bench_estimators.machine_description(), "rows": rows}, f)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
