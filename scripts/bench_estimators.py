"""Benchmark: batched unifyreg estimators vs per-layer, per-sequence NumPy float64 loops.

For every (L layers, n tokens, d width) the same quantity is computed three ways:

- ``research``: a plain NumPy loop as research code is usually written: pairwise distances
  from explicit differences (row-chunked so memory stays bounded), the median bandwidth,
  the normalised Gram, and ``np.linalg.eigh`` (eigenvectors too), one layer at a time;
- ``tuned``: the same loop written carefully: distances by the Gram trick
  (``|x|^2 + |y|^2 - 2 x.y``) and ``np.linalg.eigvalsh`` (eigenvalues only);
- ``unifyreg``: :func:`unifyreg.estimators.matrix_entropy` on the ``[L, n, d]`` tensor at
  once (float64, alpha = 1.01), and its alpha = 2 Frobenius path for reference.

All three use the lower median of pair distances (unifyreg's convention), so the max
absolute difference column measures numerical agreement, in bits.

Usage: ``python scripts/bench_estimators.py [--quick] [--repeats N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from unifyreg.estimators import matrix_entropy

ALPHA = 1.01
FULL_GRID = [(L, n, d) for L in (13, 25) for n in (128, 600, 1200) for d in (256, 1024)]
QUICK_GRID = [(13, 128, 256), (25, 600, 1024)]


def _lower_median(values: np.ndarray) -> float:
    k = (values.size - 1) // 2
    return float(np.partition(values, k)[k])


def _entropy_from_sq_distances(d2: np.ndarray, use_eigh: bool) -> float:
    iu = np.triu_indices(d2.shape[0], 1)
    sigma = max(np.sqrt(_lower_median(d2[iu])), 1e-6) if d2.shape[0] > 1 else 1.0
    K = np.exp(-d2 / (2 * sigma**2))
    A = K / np.trace(K)
    lam = np.linalg.eigh(A)[0] if use_eigh else np.linalg.eigvalsh(A)
    lam = lam[lam > 1e-12]
    lam = lam / lam.sum()
    return float(np.log2(np.sum(lam**ALPHA)) / (1 - ALPHA))


def research_entropy(x: np.ndarray, chunk: int = 64) -> float:
    """Explicit-difference distances and eigh, as quick research code computes it."""
    n = x.shape[0]
    d2 = np.empty((n, n))
    for start in range(0, n, chunk):
        diff = x[start : start + chunk, None, :] - x[None, :, :]
        d2[start : start + chunk] = np.sum(diff * diff, axis=-1)
    return _entropy_from_sq_distances(d2, use_eigh=True)


def tuned_entropy(x: np.ndarray) -> float:
    """Gram-trick distances and eigvalsh: a careful NumPy loop."""
    xc = x - x.mean(0)
    sq = np.sum(xc * xc, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * xc @ xc.T, 0)
    np.fill_diagonal(d2, 0)
    return _entropy_from_sq_distances(d2, use_eigh=False)


def timed(fn, repeats: int):
    """Best wall time of ``repeats`` calls (after one warm-up when repeats > 1)."""
    if repeats > 1:
        fn()
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"Python {platform.python_version()}"
    )


def run(grid, repeats: int, baseline_repeats: int) -> list[dict]:
    rows = []
    for L, n, d in grid:
        gen = torch.Generator().manual_seed(0)
        Z = torch.randn(L, n, d, generator=gen)
        X = Z.double().numpy()
        t_research, h_research = timed(
            lambda X=X: np.array([research_entropy(x) for x in X]), baseline_repeats
        )
        t_tuned, h_tuned = timed(
            lambda X=X: np.array([tuned_entropy(x) for x in X]), baseline_repeats
        )
        t_ours, h_ours = timed(lambda Z=Z: matrix_entropy(Z, alpha=ALPHA).numpy(), repeats)
        t_frob, _ = timed(lambda Z=Z: matrix_entropy(Z, alpha=2.0), repeats)
        diff = max(np.abs(h_ours - h_research).max(), np.abs(h_ours - h_tuned).max())
        row = dict(
            L=L,
            n=n,
            d=d,
            research_s=t_research,
            tuned_s=t_tuned,
            unifyreg_s=t_ours,
            unifyreg_alpha2_s=t_frob,
            speedup_vs_research=t_research / t_ours,
            speedup_vs_tuned=t_tuned / t_ours,
            max_abs_diff_bits=float(diff),
        )
        rows.append(row)
        print_row(row, flush=True)
    return rows


HEADER = (
    "| L | n | d | research loop (s) | tuned loop (s) | unifyreg (s) | unifyreg a=2 (s) "
    "| x vs research | x vs tuned | max abs diff (bits) |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def print_row(r: dict, flush: bool = False) -> None:
    print(
        f"| {r['L']} | {r['n']} | {r['d']} | {r['research_s']:.3f} | {r['tuned_s']:.3f} "
        f"| {r['unifyreg_s']:.3f} | {r['unifyreg_alpha2_s']:.3f} "
        f"| {r['speedup_vs_research']:.1f} | {r['speedup_vs_tuned']:.2f} "
        f"| {r['max_abs_diff_bits']:.1e} |",
        flush=flush,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes only (for `make demo`)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of unifyreg")
    parser.add_argument(
        "--baseline-repeats", type=int, default=1, help="timed repeats of the NumPy loops"
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.baseline_repeats < 1:
        parser.error("--repeats and --baseline-repeats must be >= 1")

    print(f"Machine: {machine_description()}")
    print(f"alpha = {ALPHA}, median bandwidth, float64, base 2; best of repeats\n")
    print(HEADER, flush=True)
    rows = run(QUICK_GRID if args.quick else FULL_GRID, args.repeats, args.baseline_repeats)
    worst = max(r["max_abs_diff_bits"] for r in rows)
    print(f"\nmax abs difference over all sizes: {worst:.1e} bits")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(), "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
