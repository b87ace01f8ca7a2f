"""Matrix-based Renyi entropy estimators (pure tensor math, batched, differentiable).

Everything here works on one *sequence* of token vectors at a time, batched over any
leading dimensions (layers, samples): ``Z`` has shape ``[..., n, d]``.

- Gaussian Gram: ``K_ij = exp(-||z_i - z_j||^2 / (2 sigma^2))``, so ``K_ii = 1``.
- Normalised Gram: ``A = K / tr(K)``; its eigenvalues ``lambda_i`` are >= 0 and sum to 1.
- Renyi entropy of order alpha: ``H_alpha(A) = log(sum_i lambda_i^alpha) / (1 - alpha)``;
  alpha = 1 is the von Neumann limit ``-sum_i lambda_i log lambda_i``; alpha = 2 is
  ``-log ||A||_F^2`` (no eigendecomposition).
- Bounds: ``0 <= H <= log n``; 0 when all tokens are identical, ``log n`` when they are
  far apart (A = I / n).
- Conditional-entropy proxy (PAPER.md): ``H(R | P) ~= H(K_joint) - H(K_pp)`` where
  ``K_joint`` is the Gram of the concatenation ``[P; R]`` and ``K_pp`` its prompt block.

Numerics: inputs of any float dtype are computed in ``dtype`` (float64 by default) and the
result is returned in that dtype. Logs are in ``base`` (2 = bits by default, matching the
magnitudes of the paper's Table 1). Nothing returns NaN silently: non-finite inputs raise
``ValueError`` unless ``nan_policy="propagate"`` is asked for, in which case exactly the
affected sequences come back as NaN.

Gradients: the bandwidth is treated as a constant (computed without gradient), so the
gradient is that of the entropy at a fixed kernel. Eigenvalues below ``EIGENVALUE_FLOOR``
(relative to the trace-1 spectrum) contribute nothing, which keeps gradients finite for
any alpha, also with repeated or zero eigenvalues.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Bandwidth",
    "EIGENVALUE_FLOOR",
    "calibrate_bandwidth",
    "conditional_entropy_proxy",
    "gaussian_gram",
    "matrix_entropy",
    "median_bandwidth",
    "normalize_by_count",
    "pairwise_sq_distances",
    "renyi_entropy",
    "resolve_bandwidth",
]

#: A bandwidth: a positive float, ``"median"`` (per sequence), or a tensor of shape ``[...]``
#: with one positive value per sequence.
Bandwidth = float | str | Tensor

NanPolicy = Literal["raise", "propagate"]

#: Eigenvalues of the trace-normalised Gram below this value are treated as exact zeros.
#: They are LAPACK round-off (|error| ~ n * 1e-16) and would otherwise give infinite
#: gradients of ``lambda^alpha`` (alpha < 1) or ``lambda log lambda``.
EIGENVALUE_FLOOR = 1e-12

#: Smallest bandwidth the median rule returns; applies when the tokens of a sequence are
#: (numerically) identical, where every such bandwidth gives K = all-ones and entropy 0.
MIN_MEDIAN_BANDWIDTH = 1e-6


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    return alpha


def _check_base(base: float) -> float:
    base = float(base)
    if not math.isfinite(base) or base <= 0 or base == 1:
        raise ValueError(f"base must be a finite number > 0 and != 1, got {base!r}")
    return base


def _check_sequences(Z: Tensor, name: str = "Z") -> None:
    if not isinstance(Z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(Z).__name__}")
    if Z.dim() < 2:
        raise ValueError(f"{name} must have shape [..., n, d], got {tuple(Z.shape)}")
    if not (Z.is_floating_point() or Z.is_complex()):
        raise TypeError(f"{name} must be a floating-point tensor, got {Z.dtype}")


def _as_mask(mask: Tensor | None, Z: Tensor, name: str = "mask") -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != Z.shape[:-1]:
        raise ValueError(
            f"{name} must have shape {tuple(Z.shape[:-1])} (Z without its last dim), "
            f"got {tuple(mask.shape)}"
        )
    return mask.to(device=Z.device, dtype=torch.bool)


def pairwise_sq_distances(Z: Tensor, mask: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ``D_ij = ||z_i - z_j||^2`` of each sequence: ``[..., n, n]``.

    Computed as ``|z_i|^2 + |z_j|^2 - 2 z_i.z_j`` after centring each sequence on the mean
    of its valid tokens (distances are translation invariant; centring removes most of the
    cancellation), clamped at 0, with exact zeros on the diagonal. Rows and columns of
    masked-out tokens hold meaningless values; callers ignore them.
    """
    if mask is None:
        Zc = Z - Z.mean(dim=-2, keepdim=True)
    else:
        valid = mask.unsqueeze(-1)
        # Replace (not multiply) padding: it may hold Inf, and Inf * 0 is NaN.
        Z = torch.where(valid, Z, torch.zeros((), dtype=Z.dtype, device=Z.device))
        count = valid.sum(dim=-2, keepdim=True).clamp_min(1).to(Z.dtype)
        centre = Z.sum(dim=-2, keepdim=True) / count
        Zc = torch.where(valid, Z - centre, torch.zeros((), dtype=Z.dtype, device=Z.device))
    sq_norms = torch.linalg.vector_norm(Zc, dim=-1) ** 2
    if torch.is_grad_enabled() and Z.requires_grad:
        gram = Zc @ Zc.transpose(-1, -2)
        D = (sq_norms.unsqueeze(-1) + sq_norms.unsqueeze(-2) - 2.0 * gram).clamp_min(0.0)
        eye = torch.eye(Z.shape[-2], dtype=torch.bool, device=Z.device)
        return D.masked_fill(eye, 0.0)
    # No graph to keep: one fused baddbmm and in-place updates save passes over n x n.
    n, d = Zc.shape[-2:]
    flat = Zc.reshape(-1, n, d)
    norms = sq_norms.reshape(-1, n)
    D = torch.baddbmm(
        norms.unsqueeze(-1) + norms.unsqueeze(-2), flat, flat.transpose(-1, -2), alpha=-2.0
    )
    D = D.clamp_min_(0.0).reshape(*Zc.shape[:-2], n, n)
    D.diagonal(dim1=-2, dim2=-1).zero_()
    return D


def median_bandwidth(
    Z: Tensor, mask: Tensor | None = None, *, sq_distances: Tensor | None = None
) -> Tensor:
    """Median heuristic: ``sigma = median_{i < j} ||z_i - z_j||`` over pairs of valid tokens.

    The median is the lower median (``torch.median``'s convention: the ``ceil(N/2)``-th
    smallest of the N pair distances). Returns ``[...]`` (one bandwidth per sequence),
    without gradient, floored at ``MIN_MEDIAN_BANDWIDTH`` so identical tokens do not divide
    by zero. A sequence with fewer than two valid tokens has no pair; it gets 1.0 (its
    entropy is 0 for any sigma). Scale invariant: scaling Z by c scales sigma by c, so the
    Gram is unchanged.
    """
    with torch.no_grad():
        D = pairwise_sq_distances(Z, mask) if sq_distances is None else sq_distances
        n = D.shape[-1]
        if n < 2:
            return torch.ones(D.shape[:-2], dtype=D.dtype, device=D.device)
        rows, cols = torch.triu_indices(n, n, offset=1, device=D.device)
        pairs = D[..., rows, cols]
        if mask is None:
            median_sq = pairs.median(dim=-1).values
        else:
            pair_valid = mask[..., rows] & mask[..., cols]
            pairs = pairs.masked_fill(~pair_valid, math.nan)
            median_sq = torch.nanmedian(pairs, dim=-1).values
            median_sq = torch.where(torch.isnan(median_sq), torch.ones_like(median_sq), median_sq)
        # sqrt is monotone, so the median of distances is the sqrt of the median of squares.
        return median_sq.clamp_min(0).sqrt().clamp_min(MIN_MEDIAN_BANDWIDTH)


def resolve_bandwidth(
    Z: Tensor,
    sigma: Bandwidth,
    mask: Tensor | None = None,
    *,
    sq_distances: Tensor | None = None,
) -> Tensor:
    """Turn a bandwidth rule into one positive bandwidth per sequence, shape ``Z.shape[:-2]``.

    ``sigma`` is a positive float (the same for every sequence), ``"median"``
    (:func:`median_bandwidth` of each sequence), or a tensor broadcastable to
    ``Z.shape[:-2]`` (e.g. frozen by :func:`calibrate_bandwidth`).
    """
    batch_shape = Z.shape[:-2]
    if isinstance(sigma, str):
        if sigma != "median":
            raise ValueError(f"unknown bandwidth rule {sigma!r}; valid: a float > 0 or 'median'")
        return median_bandwidth(Z, mask, sq_distances=sq_distances)
    if isinstance(sigma, Tensor):
        value = sigma.detach().to(device=Z.device, dtype=Z.dtype)
        if not torch.all(torch.isfinite(value) & (value > 0)):
            raise ValueError("bandwidth tensor must hold finite values > 0")
        return value.expand(batch_shape) if value.dim() <= len(batch_shape) else value
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"bandwidth must be a float, 'median' or a tensor, got {sigma!r}")
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"bandwidth must be a finite number > 0, got {sigma!r}")
    return torch.full(batch_shape, float(sigma), dtype=Z.dtype, device=Z.device)


def calibrate_bandwidth(
    sequences: Tensor | Iterable[Tensor], mask: Tensor | None = None, dtype=torch.float64
) -> float:
    """Freeze one bandwidth from a calibration set: the median of per-sequence medians.

    ``sequences`` is a tensor ``[..., n, d]`` (with optional ``mask`` ``[..., n]``) or an
    iterable of ``[n_i, d]`` tensors of varying length. Use the returned float as ``sigma``
    to compare entropies across checkpoints on one fixed kernel scale.
    """
    if isinstance(sequences, Tensor):
        _check_sequences(sequences, "sequences")
        Z = sequences.to(dtype)
        medians = median_bandwidth(Z, _as_mask(mask, Z)).flatten()
    else:
        values = []
        for i, seq in enumerate(sequences):
            _check_sequences(seq, f"sequences[{i}]")
            values.append(median_bandwidth(seq.detach().to(dtype)).flatten())
        if not values:
            raise ValueError("calibrate_bandwidth needs at least one sequence")
        medians = torch.cat(values)
    if not torch.all(torch.isfinite(medians)):
        raise ValueError("calibration sequences hold NaN or Inf")
    return float(medians.median())


def gaussian_gram(Z: Tensor, sigma: Bandwidth = "median", mask: Tensor | None = None) -> Tensor:
    """Gaussian Gram ``K_ij = exp(-||z_i - z_j||^2 / (2 sigma^2))`` of each sequence.

    ``Z``: ``[..., n, d]`` -> ``[..., n, n]``, in Z's dtype (cast beforehand for float64).
    With ``mask`` ``[..., n]``, rows and columns of padded tokens are zero, so the
    normalised Gram has the valid tokens' spectrum plus exact zeros.
    """
    _check_sequences(Z)
    mask = _as_mask(mask, Z)
    D = pairwise_sq_distances(Z, mask)
    bandwidth = resolve_bandwidth(Z, sigma, mask, sq_distances=D)
    scale = -0.5 / bandwidth[..., None, None] ** 2
    K = torch.exp(D * scale) if D.requires_grad else D.mul_(scale).exp_()
    if mask is not None:
        K = K * (mask.unsqueeze(-1) & mask.unsqueeze(-2)).to(K.dtype)
    return K


def _kept_spectrum(eigenvalues: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues above the floor, renormalised to sum 1 (others replaced by 1, masked).

    Renormalising removes the trace's round-off, so a rank-one spectrum gives exactly 0.
    """
    keep = eigenvalues > EIGENVALUE_FLOOR
    kept = torch.where(keep, eigenvalues, torch.zeros((), dtype=eigenvalues.dtype))
    kept = kept / kept.sum(-1, keepdim=True)
    return keep, torch.where(keep, kept, torch.ones((), dtype=eigenvalues.dtype))


def _power_sum(eigenvalues: Tensor, alpha: float) -> Tensor:
    """``sum_i lambda_i^alpha`` over eigenvalues above the floor (finite gradient)."""
    keep, safe = _kept_spectrum(eigenvalues)
    return torch.where(keep, safe**alpha, torch.zeros((), dtype=eigenvalues.dtype)).sum(-1)


def _von_neumann(eigenvalues: Tensor) -> Tensor:
    """``-sum_i lambda_i log lambda_i`` in nats over eigenvalues above the floor."""
    keep, safe = _kept_spectrum(eigenvalues)
    return -torch.where(keep, safe * torch.log(safe), torch.zeros((), dtype=safe.dtype)).sum(-1)


def renyi_entropy(K: Tensor, alpha: float = 1.01, base: float = 2.0) -> Tensor:
    """Matrix-based Renyi entropy of a PSD Gram ``K`` ``[..., n, n]`` -> ``[...]``.

    ``A = K / tr(K)``; ``H_alpha = log_base(sum_i lambda_i(A)^alpha) / (1 - alpha)``.
    alpha == 1: von Neumann ``-sum lambda log lambda``; alpha == 2: ``-log ||A||_F^2``
    (no eigendecomposition); otherwise ``eigvalsh`` with round-off negatives clamped to 0.
    Computed in K's dtype. A Gram with zero trace (no valid token) raises ``ValueError``.
    """
    alpha = _check_alpha(alpha)
    base = _check_base(base)
    if K.dim() < 2 or K.shape[-1] != K.shape[-2]:
        raise ValueError(f"K must have shape [..., n, n], got {tuple(K.shape)}")
    trace = torch.diagonal(K, dim1=-2, dim2=-1).sum(-1)
    if torch.any(trace <= 0):
        raise ValueError("K has a sequence with zero trace (no valid token): entropy undefined")
    A = K / trace[..., None, None]
    if alpha == 2.0:
        entropy = -torch.log((A * A).sum(dim=(-2, -1)))
    else:
        # Symmetrise so round-off asymmetry cannot leak into eigvalsh's triangle choice.
        eigenvalues = torch.linalg.eigvalsh(0.5 * (A + A.transpose(-1, -2))).clamp_min(0.0)
        if alpha == 1.0:
            entropy = _von_neumann(eigenvalues)
        else:
            entropy = torch.log(_power_sum(eigenvalues, alpha)) / (1.0 - alpha)
    # Exact zeros for rank-one spectra: round-off could otherwise give -1e-16.
    return entropy.clamp_min(0.0) / math.log(base)


def _prepare(
    Z: Tensor, mask: Tensor | None, dtype: torch.dtype, nan_policy: NanPolicy, name: str
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Cast to the compute dtype; find sequences with non-finite values (raise or mark)."""
    _check_sequences(Z, name)
    if nan_policy not in ("raise", "propagate"):
        raise ValueError(f"nan_policy must be 'raise' or 'propagate', got {nan_policy!r}")
    Zc = Z.to(dtype)
    mask = _as_mask(mask, Zc, f"mask of {name}")
    finite = torch.isfinite(Zc).all(dim=-1)
    if mask is not None:
        finite = finite | ~mask
    bad = ~finite.all(dim=-1)
    if not torch.any(bad):
        return Zc, mask, None
    if nan_policy == "raise":
        raise ValueError(
            f"{name} holds NaN or Inf in {int(bad.sum())} of {bad.numel()} sequence(s); "
            "pass nan_policy='propagate' to get NaN for those sequences instead"
        )
    Zc = torch.where(torch.isfinite(Zc), Zc, torch.zeros((), dtype=Zc.dtype))
    return Zc, mask, bad


def _valid_counts(Z: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.full(Z.shape[:-2], Z.shape[-2], dtype=Z.dtype, device=Z.device)
    return mask.sum(-1).to(Z.dtype)


def normalize_by_count(entropy: Tensor, counts: Tensor, base: float = 2.0) -> Tensor:
    """Length-normalised value: ``entropy / log_base(count)``; a count of 1 gives 0.

    ``log_base(count)`` is the largest entropy ``count`` tokens can have, so normalised
    entropies lie in [0, 1]. ``counts`` broadcasts against ``entropy``.
    """
    base = _check_base(base)
    counts = torch.as_tensor(counts, dtype=entropy.dtype, device=entropy.device)
    log_count = torch.log(counts.clamp_min(1.0)) / math.log(base)
    safe = torch.where(log_count > 0, log_count, torch.ones((), dtype=log_count.dtype))
    return torch.where(log_count > 0, entropy / safe, torch.zeros((), dtype=entropy.dtype))


def matrix_entropy(
    Z: Tensor,
    alpha: float = 1.01,
    sigma: Bandwidth = "median",
    base: float = 2.0,
    mask: Tensor | None = None,
    normalize: bool = False,
    *,
    dtype: torch.dtype = torch.float64,
    nan_policy: NanPolicy = "raise",
) -> Tensor:
    """Entropy ``H_alpha`` of the Gaussian Gram of each sequence: ``[..., n, d]`` -> ``[...]``.

    ``H = renyi_entropy(gaussian_gram(Z, sigma), alpha, base)`` computed in ``dtype``.
    ``mask`` ``[..., n]`` (True = valid token) excludes padding: a padded batch gives the
    same values as each trimmed sequence alone (also for the median bandwidth).
    ``normalize=True`` divides by ``log_base(number of valid tokens)`` (range [0, 1]; a
    single token gives 0). A sequence with no valid token raises ``ValueError``.
    """
    Zc, mask, bad = _prepare(Z, mask, dtype, nan_policy, "Z")
    counts = _valid_counts(Zc, mask)
    if torch.any(counts < 1):
        raise ValueError("a sequence has no valid token (mask all False): entropy undefined")
    entropy = renyi_entropy(gaussian_gram(Zc, sigma, mask), alpha, base)
    if normalize:
        entropy = normalize_by_count(entropy, counts, base)
    if bad is not None:
        entropy = torch.where(bad, torch.full((), math.nan, dtype=entropy.dtype), entropy)
    return entropy


def conditional_entropy_proxy(
    Zp: Tensor,
    Zr: Tensor,
    alpha: float = 1.01,
    sigma: Bandwidth = "median",
    base: float = 2.0,
    mask_p: Tensor | None = None,
    mask_r: Tensor | None = None,
    normalize: bool = False,
    *,
    dtype: torch.dtype = torch.float64,
    nan_policy: NanPolicy = "raise",
) -> Tensor:
    """Conditional-entropy proxy ``H(R | P) ~= H_alpha(K_joint) - H_alpha(K_pp)``: ``[...]``.

    ``Zp`` ``[..., n, d]`` prompt tokens, ``Zr`` ``[..., m, d]`` response tokens (same layer).
    ``K_joint`` is the Gaussian Gram of the concatenation ``[P; R]`` (blocks
    ``[[K_pp, K_pr], [K_rp, K_rr]]``, one kernel); ``K_pp`` is its prompt block. Both terms
    share one bandwidth per sequence: the rule is applied to the *joint* sequence (the
    median over all joint pairs for ``"median"``), so ``K_pp`` is literally the top-left
    block of ``K_joint`` and R = P gives exactly 0.

    About 0 when R repeats P, larger for a noisy copy, largest for R independent of P. It
    is a proxy, not a formal conditional entropy: it can be slightly negative (adding
    tokens that repeat one prompt token lowers the joint entropy) and it grows with m.
    ``normalize=True`` divides by ``log_base(n + m)``, the maximum of ``H(K_joint)``
    (unifyreg's length-normalised variant; counts are of valid tokens).
    """
    Zp_c, mask_p, bad_p = _prepare(Zp, mask_p, dtype, nan_policy, "Zp")
    Zr_c, mask_r, bad_r = _prepare(Zr, mask_r, dtype, nan_policy, "Zr")
    if Zp_c.shape[:-2] != Zr_c.shape[:-2] or Zp_c.shape[-1] != Zr_c.shape[-1]:
        raise ValueError(
            f"Zp {tuple(Zp.shape)} and Zr {tuple(Zr.shape)} must share batch dims and width"
        )
    n = Zp_c.shape[-2]
    if mask_p is None and mask_r is None:
        mask_joint = None
    else:
        if mask_p is None:
            mask_p = torch.ones(Zp_c.shape[:-1], dtype=torch.bool, device=Zp_c.device)
        if mask_r is None:
            mask_r = torch.ones(Zr_c.shape[:-1], dtype=torch.bool, device=Zr_c.device)
        mask_joint = torch.cat([mask_p, mask_r], dim=-1)
    count_p = _valid_counts(Zp_c, mask_p)
    count_r = _valid_counts(Zr_c, mask_r)
    if torch.any(count_p < 1) or torch.any(count_r < 1):
        raise ValueError("a prompt or response has no valid token: proxy undefined")
    Z_joint = torch.cat([Zp_c, Zr_c], dim=-2)
    K_joint = gaussian_gram(Z_joint, sigma, mask_joint)
    K_pp = K_joint[..., :n, :n]
    proxy = renyi_entropy(K_joint, alpha, base) - renyi_entropy(K_pp, alpha, base)
    if normalize:
        proxy = normalize_by_count(proxy, count_p + count_r, base)
    bad = None
    for flags in (bad_p, bad_r):
        if flags is not None:
            bad = flags if bad is None else bad | flags
    if bad is not None:
        proxy = torch.where(bad, torch.full((), math.nan, dtype=proxy.dtype), proxy)
    return proxy
