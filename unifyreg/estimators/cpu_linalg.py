"""The two heavy kernels of the exact path, through NumPy's BLAS/LAPACK on CPU without gradient.

- :func:`self_products`: ``G_b = Z_b Z_b^T`` of ``[B, n, d]``; on CPU from
  :data:`NUMPY_MIN_TOKENS` tokens one ``numpy.dot(z, z.T)`` per sequence, which NumPy
  runs as a symmetric rank-k update (``?syrk``: half the products of a ``gemm``, and the
  result exactly symmetric); otherwise ``torch.bmm``.
- :func:`eigvalsh`: ascending eigenvalues of symmetric ``[..., n, n]`` (lower
  triangle read); on an AMD CPU (:data:`NUMPY_EIGVALSH`) from :data:`NUMPY_MIN_TOKENS` up to
  :data:`NUMPY_EIGVALSH_MAX_TOKENS` tokens ``numpy.linalg.eigvalsh`` on the whole batch
  (one gufunc call: no Python per matrix; LAPACK ``?syevd``), otherwise
  ``torch.linalg.eigvalsh``.

Why (BENCHMARKS.md, issue 20; measured on this project's AMD EPYC host, 1 thread): the
torch CPU wheel's MKL takes 1.7-1.9x NumPy's OpenBLAS time for ``dsyevd`` at
n = 600-1200, and about 2x for the distance product at n = 600, d = 1024 (1.25x at
n = 4096). Of the LAPACK drivers for eigenvalues only (``dsyevd``, ``dsyevr``, ``dsyev``
and the two-stage ``dsyevd_2stage`` / ``dsyev_2stage``, called directly on NumPy's
OpenBLAS), ``dsyevd`` is the fastest or within 1 % of it at every n from 128 to 1200; the
two-stage drivers only catch up at n = 2048. Below 128 tokens torch's batched call is
faster (per-matrix overhead), and from 2048 tokens MKL's ``dsyevd`` is (NumPy's takes
1.6x its time at n = 4096). Both libraries compute the same quantities to round-off
(tested against the torch kernels). Inputs that need a gradient, non-CPU tensors and
other dtypes take torch's kernels. On an Intel Xeon (AVX-512, 2026-12-03) MKL's
``dsyevd`` is the faster one, so NumPy's eigenvalues are taken on AMD CPUs only
(:data:`NUMPY_EIGVALSH`), while NumPy's ``?syrk`` products stayed faster there too
(1.17-1.59x MKL's ``mm`` at n = 600-4096, d = 1024); on other CPUs measure again:
``scripts/bench_compare.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "NUMPY_EIGVALSH",
    "NUMPY_EIGVALSH_MAX_TOKENS",
    "NUMPY_MIN_TOKENS",
    "cpu_vendor",
    "eigvalsh",
    "numpy_applies",
    "self_products",
]

#: From this many tokens, CPU float32/float64 tensors without gradient use NumPy's LAPACK
#: and BLAS (module docstring): at n = 128 both libraries take the same time.
NUMPY_MIN_TOKENS = 128

#: From this many tokens torch's ``eigvalsh`` (MKL) is faster again: at n = 4096 NumPy's
#: OpenBLAS ``dsyevd`` took 1.6x its time (the matrix no longer fits the cache), at
#: n = 2048-2560 1.0-1.26x, at n <= 1920 0.6-0.95x.
NUMPY_EIGVALSH_MAX_TOKENS = 2048

_NUMPY_DTYPES = (torch.float32, torch.float64)


def numpy_applies(X: Tensor, n: int) -> bool:
    """Whether ``X`` (a batch of ``n``-token sequences or ``n x n`` matrices) takes the NumPy
    kernels: CPU, float32/float64, no gradient to compute, ``n >= NUMPY_MIN_TOKENS``."""
    return (
        n >= NUMPY_MIN_TOKENS
        and X.device.type == "cpu"
        and X.dtype in _NUMPY_DTYPES
        and not (torch.is_grad_enabled() and X.requires_grad)
    )


def self_products(Z: Tensor, then: Callable[[int, np.ndarray], None] | None = None) -> Tensor:
    """``Z_b Z_b^T`` ``[B, n, n]`` of ``Z`` ``[B, n, d]`` (module docstring): NumPy's
    ``?syrk`` where :func:`numpy_applies` (exactly symmetric), otherwise ``torch.bmm``.
    ``then(b, product)``, NumPy route only: called on each product right after it is
    computed, to update it in place while it is in cache."""
    batch, n, _ = Z.shape
    if not numpy_applies(Z, n):
        return torch.bmm(Z, Z.transpose(-1, -2))
    X = Z.detach().numpy()
    out = np.empty((batch, n, n), dtype=X.dtype)
    for b in range(batch):
        x = X[b]
        np.dot(x, x.T, out=out[b])  # ?syrk: NumPy sees the operand and its transpose
        if then is not None:
            then(b, out[b])
    return torch.from_numpy(out)


def cpu_vendor() -> str:
    """The CPU's ``vendor_id`` from ``/proc/cpuinfo`` (``"AuthenticAMD"``,
    ``"GenuineIntel"``; ``""`` where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


#: Whether :func:`eigvalsh` may take NumPy's LAPACK: on AMD CPUs only, where the torch
#: wheel's MKL took 1.7-1.9x OpenBLAS's ``dsyevd`` time at n = 600-1200. On an Intel
#: Xeon (AVX-512) MKL was the faster one: OpenBLAS took 1.32x / 1.14x / 0.93x / 1.44x /
#: 1.94x its time at n = 128 / 256 / 600 / 1200 / 2048 (BENCHMARKS.md, 2026-12-03); other
#: CPUs are unmeasured and keep torch's.
NUMPY_EIGVALSH = cpu_vendor() == "AuthenticAMD"


def eigvalsh(A: Tensor) -> Tensor:
    """Ascending eigenvalues ``[..., n]`` of symmetric ``A`` ``[..., n, n]`` (lower triangle
    read): ``torch.linalg.eigvalsh``, or NumPy's where :data:`NUMPY_EIGVALSH`,
    :func:`numpy_applies` and ``n < NUMPY_EIGVALSH_MAX_TOKENS`` (module docstring); with a
    gradient to compute always torch's (differentiable)."""
    n = A.shape[-1]
    if not NUMPY_EIGVALSH or not numpy_applies(A, n) or n >= NUMPY_EIGVALSH_MAX_TOKENS:
        return torch.linalg.eigvalsh(A)
    return torch.from_numpy(np.linalg.eigvalsh(A.detach().numpy(), UPLO="L"))
