"""Exact estimators without gradient, in bounded memory (the probe's path).

Sequences (all leading dims flattened) are processed a chunk at a time, each chunk's
``[chunk, n, n]`` Gram taking at most ``max_gram_bytes`` bytes (at least one sequence per
chunk; None = all at once, except on CPU, where chunks stay within
:data:`CPU_CHUNK_BYTES` because that is faster). One in-place buffer per chunk: the pair
distances (on CPU by NumPy's symmetric rank-k update from
:data:`~unifyreg.estimators.cpu_linalg.NUMPY_MIN_TOKENS` tokens; elsewhere by a blocked
symmetric product from :data:`~unifyreg.estimators.kernel.SYMMETRIC_GRAM_MIN_TOKENS`),
the median bandwidth (by selection from there: the same median), the Gram, then
``eigvalsh`` on the normalised Gram in place (NumPy's LAPACK on CPU, :mod:`.cpu_linalg`).
Values agree with the autograd path to round-off (tested to 1e-9 bits); peak memory is
about twice the chunk's Gram instead of four times.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

import unifyreg.estimators.cpu_linalg as cpu_linalg
from unifyreg.estimators.exact import renyi_entropy_in_place
from unifyreg.estimators.kernel import Bandwidth, gram_from_sq_distances_, sq_distances_no_grad

__all__ = ["CPU_CHUNK_BYTES", "cpu_chunk_bytes", "gram_chunk_size", "torch_kernels_only"]

#: On CPU the no-gradient exact path works on chunks of at most this many Gram bytes
#: even without a memory bound (``max_gram_bytes=None``): a chunk's passes over its
#: ``n x n`` buffers then stay in the last-level cache and the allocator reuses its
#: blocks instead of faulting in fresh pages for a whole batch (one sequence per chunk
#: from n = 724 in float64; all of a small batch at once). Measured (BENCHMARKS.md,
#: issue 20, 1 thread): 25 x 600 x 1024 1.2-1.4x and 13 x 1200 x 1024 1.2x faster than
#: one chunk, 8 and 1 MiB alike within noise at n >= 600, 0.1 MiB 20 % slower at
#: n = 128; chunking never changes a sequence's result.
CPU_CHUNK_BYTES = 4 * 2**20


def cpu_chunk_bytes(max_gram_bytes: int | None, device: torch.device) -> int | None:
    """The Gram bytes per chunk of the no-gradient exact path: ``max_gram_bytes``, capped
    at :data:`CPU_CHUNK_BYTES` on CPU."""
    if device.type != "cpu":
        return max_gram_bytes
    return CPU_CHUNK_BYTES if max_gram_bytes is None else min(max_gram_bytes, CPU_CHUNK_BYTES)


@contextlib.contextmanager
def torch_kernels_only():
    """Within this context the exact path runs as before issue 20: torch's own kernels
    (no NumPy BLAS/LAPACK, :mod:`.cpu_linalg`) and one chunk when ``max_gram_bytes`` is
    None. For comparisons (``scripts/bench_compare.py``, the tests), or a host whose
    torch LAPACK measures faster than NumPy's. Not thread-safe (module settings)."""
    saved = cpu_linalg.NUMPY_MIN_TOKENS, CPU_CHUNK_BYTES
    cpu_linalg.NUMPY_MIN_TOKENS = math.inf  # also turns off the NumPy eigvalsh
    _set_cpu_chunk_bytes(2**62)
    try:
        yield
    finally:
        cpu_linalg.NUMPY_MIN_TOKENS = saved[0]
        _set_cpu_chunk_bytes(saved[1])


def _set_cpu_chunk_bytes(value: int) -> None:
    global CPU_CHUNK_BYTES
    CPU_CHUNK_BYTES = value


def gram_chunk_size(n: int, itemsize: int, max_gram_bytes: int | None) -> int | None:
    """Sequences per chunk so that one chunk's ``[chunk, n, n]`` Gram takes at most
    ``max_gram_bytes`` bytes (``itemsize`` bytes per entry); at least 1. None = no limit."""
    if max_gram_bytes is None:
        return None
    check_max_gram_bytes(max_gram_bytes)
    return max(1, max_gram_bytes // max(1, n * n * itemsize))


def check_max_gram_bytes(max_gram_bytes: int | None) -> None:
    """TypeError/ValueError unless ``max_gram_bytes`` is None or an int >= 1."""
    if max_gram_bytes is None:
        return
    if isinstance(max_gram_bytes, bool) or not isinstance(max_gram_bytes, int):
        raise TypeError(f"max_gram_bytes must be an int or None, got {max_gram_bytes!r}")
    if max_gram_bytes < 1:
        raise ValueError(f"max_gram_bytes must be >= 1 (None = no limit), got {max_gram_bytes}")


def flat_bandwidth(
    sigma: Bandwidth, batch_shape: torch.Size, dtype: torch.dtype, device: torch.device
) -> Bandwidth:
    """A per-sequence bandwidth tensor broadcast and flattened to ``[prod(batch_shape)]``."""
    if not isinstance(sigma, Tensor):
        return sigma
    value = sigma.detach().to(device=device, dtype=dtype)
    return value.expand(batch_shape).reshape(-1)


def chunks(total: int, size: int | None) -> list[slice]:
    """Slices of ``range(total)`` of at most ``size`` (None: one slice)."""
    if size is None or size >= total:
        return [slice(0, total)]
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def part(value, piece: slice):
    """``value[piece]`` for tensors; other values (rules, None) pass through."""
    return value[piece] if isinstance(value, Tensor) else value


def check_sq_distances(D: Tensor, mask: Tensor | None) -> Tensor | None:
    """Validate squared distances ``[B, n, n]`` and their mask ``[B, n]``."""
    if not isinstance(D, Tensor) or D.dim() != 3 or D.shape[-1] != D.shape[-2]:
        raise ValueError(
            f"D must be a tensor of squared distances [B, n, n], got "
            f"{tuple(D.shape) if isinstance(D, Tensor) else type(D).__name__}"
        )
    if not D.is_floating_point():
        raise TypeError(f"D must be a floating-point tensor, got {D.dtype}")
    if mask is None:
        return None
    if mask.shape != D.shape[:-1]:
        raise ValueError(f"mask must have shape {tuple(D.shape[:-1])}, got {tuple(mask.shape)}")
    if torch.any(mask.sum(-1) < 1):
        raise ValueError("a sequence has no valid token (mask all False): entropy undefined")
    return mask.to(device=D.device, dtype=torch.bool)


@torch.no_grad()
def entropy_of_sq_distances(
    D: Tensor,
    alpha: float,
    sigma: Bandwidth,
    base: float,
    mask: Tensor | None,
    width: int | None = None,
) -> Tensor:
    """Entropy ``[B]`` of sequences given their squared pair distances ``D`` ``[B, n, n]``
    (symmetric, zero diagonal, finite, in the compute dtype; ``width``: the tokens' d, for
    the rules that need it). ``D`` is consumed."""
    return renyi_entropy_in_place(gram_from_sq_distances_(D, sigma, mask, width), alpha, base)


@torch.no_grad()
def proxy_of_sq_distances(
    D: Tensor,
    n: int,
    alpha: float,
    sigma: Bandwidth,
    base: float,
    mask: Tensor | None,
    width: int | None = None,
) -> Tensor:
    """``H(K_joint) - H(K_pp)`` ``[B]`` given the squared distances ``D`` ``[B, n + m,
    n + m]`` of the joint sequences (the prompt's ``n`` positions first); one bandwidth per
    joint sequence. ``D`` is consumed."""
    K = gram_from_sq_distances_(D, sigma, mask, width)
    K_pp = K[:, :n, :n].clone()
    joint = renyi_entropy_in_place(K, alpha, base)
    del K
    return joint - renyi_entropy_in_place(K_pp, alpha, base)


@torch.no_grad()
def entropy_blocked(
    Z: Tensor,
    mask: Tensor | None,
    alpha: float,
    sigma: Bandwidth,
    base: float,
    max_gram_bytes: int | None,
) -> Tensor:
    """Entropy ``[...]`` of prepared sequences ``Z`` ``[..., n, d]`` (cast, finite), a chunk
    of sequences at a time (module docstring)."""
    batch_shape, (n, d) = Z.shape[:-2], Z.shape[-2:]
    total = math.prod(batch_shape)
    size = gram_chunk_size(n, Z.element_size(), cpu_chunk_bytes(max_gram_bytes, Z.device))
    flat_Z = Z.reshape(total, n, d)
    flat_mask = None if mask is None else mask.reshape(total, n)
    flat_sigma = flat_bandwidth(sigma, batch_shape, Z.dtype, Z.device)
    out = []
    for piece in chunks(total, size):
        piece_mask = part(flat_mask, piece)
        D = sq_distances_no_grad(flat_Z[piece], piece_mask)
        sigma_piece = part(flat_sigma, piece)
        out.append(entropy_of_sq_distances(D, alpha, sigma_piece, base, piece_mask, d))
        del D
    return torch.cat(out).reshape(batch_shape)


@torch.no_grad()
def proxy_blocked(
    Z_joint: Tensor,
    mask_joint: Tensor | None,
    n: int,
    alpha: float,
    sigma: Bandwidth,
    base: float,
    max_gram_bytes: int | None,
) -> Tensor:
    """Proxy ``[...]`` of prepared joint sequences ``[..., n + m, d]``, a chunk at a time."""
    batch_shape, (length, d) = Z_joint.shape[:-2], Z_joint.shape[-2:]
    total = math.prod(batch_shape)
    size = gram_chunk_size(
        length, Z_joint.element_size(), cpu_chunk_bytes(max_gram_bytes, Z_joint.device)
    )
    flat_Z = Z_joint.reshape(total, length, d)
    flat_mask = None if mask_joint is None else mask_joint.reshape(total, length)
    flat_sigma = flat_bandwidth(sigma, batch_shape, Z_joint.dtype, Z_joint.device)
    out = []
    for piece in chunks(total, size):
        piece_mask = part(flat_mask, piece)
        D = sq_distances_no_grad(flat_Z[piece], piece_mask)
        sigma_piece = part(flat_sigma, piece)
        out.append(proxy_of_sq_distances(D, n, alpha, sigma_piece, base, piece_mask, d))
        del D
    return torch.cat(out).reshape(batch_shape)
