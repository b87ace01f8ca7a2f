"""Exact estimators without gradient, in bounded memory (the probe's path).

Sequences (all leading dims flattened) are processed a chunk at a time, each chunk's
``[chunk, n, n]`` Gram taking at most ``max_gram_bytes`` bytes (at least one sequence per
chunk; None = all at once). One in-place buffer per chunk: the pair distances (by a
blocked symmetric product from :data:`~unifyreg.estimators.kernel.SYMMETRIC_GRAM_MIN_TOKENS`
tokens), the median bandwidth (by selection there: the same median), the Gram, then
``eigvalsh`` on the normalised Gram in place. Values agree with the autograd path to
round-off (tested to 1e-9 bits); peak memory is about twice the chunk's Gram instead of
four times.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from unifyreg.estimators.exact import renyi_entropy_in_place
from unifyreg.estimators.kernel import Bandwidth, gram_from_sq_distances_, sq_distances_no_grad

__all__ = ["gram_chunk_size"]


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
    size = gram_chunk_size(n, Z.element_size(), max_gram_bytes)
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
    size = gram_chunk_size(length, Z_joint.element_size(), max_gram_bytes)
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
