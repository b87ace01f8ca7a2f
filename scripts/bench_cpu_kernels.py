"""Benchmark: the CPU kernel choices of issue 20, each against its alternative, one thread.

- ``eigvalsh``: ``numpy.linalg.eigvalsh`` (OpenBLAS ``dsyevd``) against
  ``torch.linalg.eigvalsh`` (MKL) per float64 matrix, batched as the exact path calls them;
  the ratio decides ``cpu_linalg.NUMPY_EIGVALSH`` on this CPU's vendor.
- ``products``: ``numpy.dot(x, x.T)`` (``?syrk``) against ``torch.mm(x, x.T)`` at d = 1024,
  float32 and float64 (``cpu_linalg.self_products``).
- ``medians``: the exact median of a float32 distance matrix by selection
  (``kernel.median_bandwidth_by_selection``) against 2^20 sampled pairs
  (``kernel.sampled_median_bandwidth``), d = 1024 (``slq.SAMPLED_MEDIAN_MIN_TOKENS_CPU``).

Medians of ``--repeats`` calls after a warm-up. Usage: ``python
scripts/bench_cpu_kernels.py [--only eigvalsh,products,medians] [--repeats 5]``.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from unifyreg.estimators import cpu_linalg  # noqa: E402
from unifyreg.estimators.kernel import (  # noqa: E402
    median_bandwidth_by_selection,
    sampled_median_bandwidth,
    sq_distances_no_grad,
)

PARTS = ("eigvalsh", "products", "medians")


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def eigvalsh_rows(repeats: int) -> None:
    print("| n | batch | numpy (ms/matrix) | torch (ms/matrix) | numpy / torch |")
    print("|---|---|---|---|---|")
    for n, batch in ((128, 25), (256, 13), (600, 13), (1200, 4), (2048, 1)):
        X = torch.randn(batch, n, n, dtype=torch.float64)
        A = X @ X.mT / n
        a = timed(lambda A=A: np.linalg.eigvalsh(A.numpy()), repeats) / batch
        b = timed(lambda A=A: torch.linalg.eigvalsh(A), repeats) / batch
        print(f"| {n} | {batch} | {1e3 * a:.2f} | {1e3 * b:.2f} | {a / b:.2f} |", flush=True)


def product_rows(repeats: int) -> None:
    print("| dtype | n | numpy syrk (ms) | torch mm (ms) | torch / numpy |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float64):
        for n in (600, 1200, 2048, 4096):
            Z = torch.randn(n, 1024, dtype=dtype)
            X = Z.numpy()
            a = timed(lambda X=X: np.dot(X, X.T), repeats)
            b = timed(lambda Z=Z: torch.mm(Z, Z.T), repeats)
            name = str(dtype).removeprefix("torch.")
            print(f"| {name} | {n} | {1e3 * a:.1f} | {1e3 * b:.1f} | {b / a:.2f} |", flush=True)


def median_rows(repeats: int) -> None:
    print("| n | selection (ms/seq) | 2^20 sampled pairs (ms/seq) | sampled / selection |")
    print("|---|---|---|---|")
    for n in (2048, 4096, 6144, 8192):
        Z = torch.randn(2, n, 1024, generator=torch.Generator().manual_seed(0))
        D = sq_distances_no_grad(Z * torch.arange(1, 1025) ** -0.5, None)
        a = timed(lambda D=D: median_bandwidth_by_selection(D, None), repeats) / 2
        b = timed(lambda D=D: sampled_median_bandwidth(D, None, 1 << 20, 0), repeats) / 2
        print(f"| {n} | {1e3 * a:.1f} | {1e3 * b:.1f} | {b / a:.2f} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated of {PARTS}")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if any(p not in PARTS for p in parts) or args.repeats < 1:
        parser.error(f"--only takes {PARTS}; --repeats must be >= 1")
    torch.set_num_threads(1)
    print(
        f"CPU vendor {cpu_linalg.cpu_vendor() or '(unknown)'}; NUMPY_EIGVALSH = "
        f"{cpu_linalg.NUMPY_EIGVALSH}; load average {os.getloadavg()[0]:.2f}; 1 thread\n"
    )
    rows = {"eigvalsh": eigvalsh_rows, "products": product_rows, "medians": median_rows}
    for part in parts:
        print(f"### {part}\n")
        rows[part](args.repeats)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
