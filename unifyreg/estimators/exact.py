"""Exact Renyi entropies of Gram matrices, and the differentiable (autograd) estimators.

``A = K / tr K``; ``H_alpha(A) = log(sum_i lambda_i^alpha) / (1 - alpha)``; alpha = 1 is the
von Neumann limit ``-sum lambda log lambda``; alpha = 2 is ``-log ||A||_F^2`` (no
eigendecomposition). Eigenvalues below ``EIGENVALUE_FLOOR`` (relative to the trace-1
spectrum) contribute nothing, which keeps gradients finite for any alpha, also with
repeated or zero eigenvalues.

Order 2 with a median bandwidth and a gradient to compute (the divergence loss's
default) runs through one autograd function with a hand-written backward
(:class:`GaussianRenyi2`): the same values and gradients as the generic Gram-then-entropy
composition, in far fewer operations.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from unifyreg.estimators._checks import check_alpha, check_base
from unifyreg.estimators.cpu_linalg import eigvalsh, numpy_applies
from unifyreg.estimators.kernel import (
    MIN_MEDIAN_BANDWIDTH,
    Bandwidth,
    _cancellation_threshold,
    _sq_distances_of_centred,
    centred_no_grad,
    gaussian_gram,
    median_pair,
    median_pairs_of_symmetric,
)

__all__ = ["EIGENVALUE_FLOOR", "renyi_entropy_exact"]

#: The bandwidth rules :class:`GaussianRenyi2` computes itself (the median, without factor).
MEDIAN_RULES = ("median", "median_differentiable")

#: Eigenvalues of the trace-normalised Gram below this value are treated as exact zeros.
#: They are LAPACK round-off (|error| ~ n * 1e-16) and would otherwise give infinite
#: gradients of ``lambda^alpha`` (alpha < 1) or ``lambda log lambda``.
EIGENVALUE_FLOOR = 1e-12


def nonnegative(entropy: Tensor) -> Tensor:
    """``max(entropy, 0)`` with +0.0 for zero: a rank-one spectrum's round-off (-1e-16) and
    IEEE's -0.0 both come back as 0."""
    return entropy.clamp_min(0.0) + 0.0


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


def entropy_of_spectrum(eigenvalues: Tensor, alpha: float) -> Tensor:
    """Renyi entropy in nats (unclamped) of trace-1 spectra ``[..., n]``."""
    if alpha == 1.0:
        return _von_neumann(eigenvalues)
    return torch.log(_power_sum(eigenvalues, alpha)) / (1.0 - alpha)


def renyi_entropy_exact(K: Tensor, alpha: float = 1.01, base: float = 2.0) -> Tensor:
    """Matrix-based Renyi entropy of a PSD Gram ``K`` ``[..., n, n]`` -> ``[...]``.

    ``A = K / tr(K)``; ``H_alpha = log_base(sum_i lambda_i(A)^alpha) / (1 - alpha)``.
    alpha == 1: von Neumann ``-sum lambda log lambda``; alpha == 2: ``-log ||A||_F^2``
    (no eigendecomposition); otherwise ``eigvalsh`` with round-off negatives clamped to 0.
    Computed in K's dtype, differentiable. A Gram with zero trace (no valid token) raises
    ``ValueError``.
    """
    alpha = check_alpha(alpha)
    base = check_base(base)
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
        # Without a gradient to compute, NumPy's LAPACK where it is faster (.cpu_linalg).
        eigenvalues = eigvalsh(0.5 * (A + A.transpose(-1, -2))).clamp_min(0.0)
        entropy = entropy_of_spectrum(eigenvalues, alpha)
    return nonnegative(entropy) / math.log(base)


def renyi_entropy_in_place(K: Tensor, alpha: float, base: float) -> Tensor:
    """:func:`renyi_entropy_exact` of Grams ``[B, n, n]`` symmetric to round-off, without
    gradient, normalising ``K`` in place and skipping the symmetrised copy (``eigvalsh``
    reads one triangle; the same values to round-off; ``K`` is consumed)."""
    trace = torch.diagonal(K, dim1=-2, dim2=-1).sum(-1)
    if torch.any(trace <= 0):
        raise ValueError("K has a sequence with zero trace (no valid token): entropy undefined")
    A = K.div_(trace[:, None, None])
    if alpha == 2.0:
        entropy = -torch.log((torch.linalg.vector_norm(A, dim=-1) ** 2).sum(-1))
    else:
        entropy = entropy_of_spectrum(eigvalsh(A).clamp_min(0.0), alpha)
    return nonnegative(entropy) / math.log(base)


# ---------------------------------------------------------------------- order 2, fast


class GaussianRenyi2(torch.autograd.Function):
    """Order-2 entropies (nats, unclamped) of the Gaussian Gram of each sequence, of a
    block of it, and of a subset with its own bandwidth, with a hand-written backward:
    ``(Z [B, n, d], mask [B, n], block [B, n], differentiable_bandwidth, own [B, n]) ->
    (H [B], H_block [B], H_own [B])``.

    With the median bandwidth ``s2 = sigma^2`` (lower median of the valid pairs' squared
    distances, floored; 1 without a pair) and ``E_ij = K_ij^2 = exp(-D_ij / s2)`` over
    valid pairs: ``H = 2 log c - log sum_ij E_ij`` (``K_ii = 1``, so ``tr K = c``), and the
    same over the pairs of ``block`` (a proxy's prompt, with the joint bandwidth). ``own``
    (optional, within ``mask``): the entropy of those tokens alone, with the median of
    *their* pairs, from the same distances: a prompt entropy computed with its proxy
    (the distances of the joint sequence built once); 0 where ``own`` has no token.

    The same function as :func:`~unifyreg.estimators.kernel.gaussian_gram` +
    :func:`renyi_entropy_exact` (alpha = 2) with ``"median"`` /
    ``"median_differentiable"``, in a fraction of the operations: the divergence loss's
    default, where a step pays per pass over ``n x n``. The gradient is the same as
    autograd's through that composition, including the median pair's (the first valid
    pair among ties, :func:`~unifyreg.estimators.kernel.median_pair`) and the round-off
    threshold of the distances (tested). On CPU from
    :data:`~unifyreg.estimators.cpu_linalg.NUMPY_MIN_TOKENS` tokens the distances come
    from NumPy's symmetric products and the medians by selection
    (:func:`~unifyreg.estimators.kernel.median_pairs_of_symmetric`); masks are products
    of 0/1 token vectors and ``E`` holds only the off-diagonal pairs (no boolean
    ``n x n`` pass: on CPU one costs several float passes).
    """

    @staticmethod
    def forward(ctx, Z, mask, block, differentiable_bandwidth, own=None):
        batch, n, d = Z.shape
        weights = mask.to(Z.dtype)
        count = weights.sum(dim=-1)
        centred = centred_no_grad(Z, mask)
        sq = centred.pow(2).sum(dim=-1)
        threshold = _cancellation_threshold(sq, d)
        D = _sq_distances_of_centred(centred, sq, threshold)
        medians = _Medians(D, n, differentiable_bandwidth)
        s2, median_at = medians.rate(mask)
        # E holds the valid off-diagonal pairs (the diagonal's exp(0) = 1 per valid token
        # is added as counts): masks as broadcast products of 0/1 vectors, since boolean
        # n x n masks cost several times a float pass on CPU.
        E = _masked_square_kernel(D, s2, weights)
        total = E.sum(dim=(-2, -1)) + count
        H = 2.0 * torch.log(count.clamp_min(1)) - torch.log(total)
        # Distances cut to 0 (round-off) are constants: the backward masks them only where
        # a valid pair has one (there E = exp(0) = 1 exactly; max E < 1 means none).
        cut = bool((E.amax(dim=(-2, -1)) >= 1.0).any()) if n >= 2 else False
        if block is None:
            block_weights = block_total = None
            H_block = torch.zeros_like(H)
        else:
            block_weights = block.to(Z.dtype)
            block_count = block_weights.sum(dim=-1)
            inside = torch.bmm(E, block_weights[:, :, None]).squeeze(-1)
            block_total = torch.where(
                block_count > 0, torch.linalg.vecdot(inside, block_weights) + block_count, 1.0
            )
            H_block = 2.0 * torch.log(block_count.clamp_min(1)) - torch.log(block_total)
        if own is None:
            E_own = own_total = s2_own = median_own = None
            H_own = torch.zeros_like(H)
        else:
            own_weights = own.to(Z.dtype)
            s2_own, median_own = medians.rate(own)
            E_own = _masked_square_kernel(D, s2_own, own_weights)
            own_count = own_weights.sum(dim=-1)
            own_total = torch.where(own_count > 0, E_own.sum(dim=(-2, -1)) + own_count, 1.0)
            H_own = 2.0 * torch.log(own_count.clamp_min(1)) - torch.log(own_total)
        ctx.cut = cut
        ctx.save_for_backward(
            centred, D, E, total, s2, median_at, block_weights, block_total,
            E_own, own_total, s2_own, median_own,
        )  # fmt: skip
        return H, H_block, H_own

    @staticmethod
    def backward(ctx, grad_H, grad_block, grad_own):
        (
            centred, D, E, total, s2, median_at, block_weights, block_total,
            E_own, own_total, s2_own, median_own,
        ) = ctx.saved_tensors  # fmt: skip
        batch, n, _ = centred.shape
        # dH/dE_ij = -1/S, dH_block/dE_ij = -[ij in block]/S_block, dE/dD = -E/s2: so
        # dL/dD = E (grad_H/S + grad_block [block]/S_block)/s2. E, D and the masks are
        # symmetric, and the backward product needs dL/dD + its transpose: G holds twice
        # the symmetric part (zero diagonal, as E's), and each median's update goes to
        # (i, j) and (j, i).
        scale = (2.0 * grad_H / total / s2)[:, None, None]
        if block_weights is None:
            G = E * scale
        else:
            coef = (2.0 * grad_block / block_total / s2)[:, None, None]
            G = torch.addcmul(scale, block_weights[:, :, None], block_weights[:, None, :] * coef)
            G.mul_(E)
        updates = [_median_update(G, D, s2, median_at)]
        if E_own is not None:
            coef_own = (2.0 * grad_own / own_total / s2_own)[:, None, None]
            updates.append(_median_update(E_own, D, s2_own, median_own, coef_own))
            G.addcmul_(E_own, coef_own)
        if ctx.cut:
            G.masked_fill_(D == 0, 0.0)
        flat = G.view(batch, n * n)
        for at, update in updates:
            if at is not None:
                mirror = (at % n) * n + at // n
                flat.scatter_add_(1, at[:, None], update[:, None])
                flat.scatter_add_(1, mirror[:, None], update[:, None])
        # D_ij = sq_i + sq_j - 2 <c_i, c_j>: dL/dc = 2 (diag(rowsum(G)) - G) c with G the
        # symmetrised gradient. Padding rows of G and c are zero, and distances do not move
        # with the centre, so this is dL/dZ (the centring's own term sums to zero).
        grad_Z = torch.bmm(G, centred).mul_(-2.0)
        return (
            grad_Z.addcmul_(G.sum(dim=-1, keepdim=True), centred, value=2.0),
            None,
            None,
            None,
            None,
        )


def _masked_square_kernel(D: Tensor, s2: Tensor, weights: Tensor) -> Tensor:
    """``E_ij = exp(-D_ij / s2) w_i w_j`` ``[B, n, n]`` with a zero diagonal, for 0/1 token
    weights ``w`` ``[B, n]``."""
    E = D.mul(-1.0 / s2[:, None, None]).exp_()
    E.mul_(weights[:, :, None]).mul_(weights[:, None, :])
    E.diagonal(dim1=-2, dim2=-1).zero_()
    return E


class _Medians:
    """The median bandwidths of :class:`GaussianRenyi2` from its squared distances ``D``
    ``[B, n, n]``: by selection per sequence where ``D`` is exactly symmetric (NumPy's
    products on CPU from :data:`~unifyreg.estimators.cpu_linalg.NUMPY_MIN_TOKENS` tokens:
    no gather of the pairs), otherwise from the gathered pairs ``i < j`` (gathered once
    for every token set). Both name the same pair (:func:`median_pair`)."""

    def __init__(self, D: Tensor, n: int, differentiable: bool):
        self.D, self.n, self.differentiable = D, n, differentiable
        self.by_selection = numpy_applies(D, n)
        self.upper = None if self.by_selection or n < 2 else _upper_values(D)

    def rate(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(s2 [B], median_at)``: the lower median of the squared distances of the
        pairs of ``tokens`` ``[B, n]`` (floored; 1 without a pair) and, with a
        differentiable bandwidth, the flat index of the median pair where it carries the
        gradient (-1 elsewhere)."""
        D, n = self.D, self.n
        if n < 2:
            return torch.ones(D.shape[0], dtype=D.dtype, device=D.device), None
        if self.by_selection:
            median, at = median_pairs_of_symmetric(D, tokens)
        else:
            rows, cols = _upper_pairs(n, D.device)
            median, at = median_pair(self.upper, tokens[:, rows] & tokens[:, cols])
            at = torch.where(at >= 0, rows[at.clamp_min(0)] * n + cols[at.clamp_min(0)], -1)
        has_pair = ~torch.isnan(median)
        s2 = torch.where(has_pair, median, 1.0).clamp_min(MIN_MEDIAN_BANDWIDTH**2)
        if not self.differentiable:
            return s2, None
        # Where the median carries the gradient: a real pair above the floor.
        carries = has_pair & (median >= MIN_MEDIAN_BANDWIDTH**2)
        return s2, torch.where(carries, at, -1)


def _upper_values(D: Tensor) -> Tensor:
    """``[B, n (n - 1) / 2]``: the pairs ``i < j`` of ``D`` ``[B, n, n]``."""
    rows, cols = _upper_pairs(D.shape[-1], D.device)
    return D[:, rows, cols]


def _median_update(
    G: Tensor, D: Tensor, s2: Tensor, median_at: Tensor | None, factor: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """``(index [B], update [B])``: the share of dL/dD that reaches the median pair's
    distance through ``s2`` (``median_at``; ``(None, None)`` for a detached bandwidth),
    given ``G factor = 2 dL/dD`` of ``E = exp(-D / s2)`` at a fixed bandwidth (``factor``
    ``[B, 1, 1]``, 1 if omitted). With ``rate = 1 / s2``:
    ``dL/drate = -sum_ij dL/dD_ij D_ij / rate`` and ``drate/ds2 = -rate^2``."""
    if median_at is None:
        return None, None
    batch = G.shape[0]
    # One BLAS dot per sequence: a fused pass, summed more accurately than bmm's.
    G_flat, D_flat = G.reshape(batch, -1), D.reshape(batch, -1)
    weighted = torch.stack([torch.dot(G_flat[b], D_flat[b]) for b in range(batch)])
    if factor is not None:
        weighted = weighted * factor.view(batch)
    update = torch.where(median_at >= 0, -0.5 * weighted / s2, 0.0)
    return median_at.clamp_min(0), update


@functools.lru_cache(maxsize=64)
def _upper_pairs(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Row and column indices of the pairs ``i < j`` of an ``n x n`` matrix."""
    rows, cols = torch.triu_indices(n, n, offset=1, device=device)
    return rows, cols


def _renyi2_applies(Z: Tensor, alpha: float, sigma: Bandwidth) -> bool:
    """Whether order 2 with a median bandwidth and a gradient to compute takes
    :class:`GaussianRenyi2` (the same values and gradients, fewer operations)."""
    return (
        alpha == 2.0
        and isinstance(sigma, str)
        and sigma in MEDIAN_RULES
        and Z.dim() >= 3
        and torch.is_grad_enabled()
        and Z.requires_grad
    )


def _renyi2(
    Z: Tensor, mask: Tensor | None, block: Tensor | None, sigma: str
) -> tuple[Tensor, Tensor]:
    """``(H, H_block)`` in nats of :class:`GaussianRenyi2` for ``Z`` ``[..., n, d]``."""
    batch_shape, (n, d) = Z.shape[:-2], Z.shape[-2:]
    flat_mask = (
        torch.ones(batch_shape + (n,), dtype=torch.bool, device=Z.device) if mask is None else mask
    ).reshape(-1, n)
    flat_block = None if block is None else block.reshape(-1, n)
    H, H_block, _ = GaussianRenyi2.apply(
        Z.reshape(-1, n, d), flat_mask, flat_block, sigma == "median_differentiable"
    )
    return H.reshape(batch_shape), H_block.reshape(batch_shape)


def entropy_autograd(
    Z: Tensor, mask: Tensor | None, alpha: float, sigma: Bandwidth, base: float
) -> Tensor:
    """``H_alpha`` ``[...]`` of the Gaussian Gram of prepared sequences ``Z`` ``[..., n, d]``
    (cast, finite), differentiable in ``Z``."""
    if _renyi2_applies(Z, alpha, sigma):
        return nonnegative(_renyi2(Z, mask, None, sigma)[0]) / math.log(base)
    return renyi_entropy_exact(gaussian_gram(Z, sigma, mask), alpha, base)


def proxy_autograd(
    Z_joint: Tensor,
    mask_joint: Tensor | None,
    prompt: Tensor,
    n: int,
    alpha: float,
    sigma: Bandwidth,
    base: float,
) -> Tensor:
    """``H(K_joint) - H(K_pp)`` ``[...]`` of prepared joint sequences ``[..., n + m, d]``
    (the prompt's ``n`` positions first; ``prompt`` ``[..., n + m]`` marks its valid
    tokens), differentiable; one bandwidth per joint sequence."""
    if _renyi2_applies(Z_joint, alpha, sigma):
        joint, prompt_part = _renyi2(Z_joint, mask_joint, prompt, sigma)
        return (nonnegative(joint) - nonnegative(prompt_part)) / math.log(base)
    K_joint = gaussian_gram(Z_joint, sigma, mask_joint)
    K_pp = K_joint[..., :n, :n]
    return renyi_entropy_exact(K_joint, alpha, base) - renyi_entropy_exact(K_pp, alpha, base)


def proxy_and_entropy_renyi2(
    Z_joint: Tensor,
    mask_joint: Tensor | None,
    prompt: Tensor,
    own: Tensor,
    sigma: str,
    base: float,
) -> tuple[Tensor, Tensor]:
    """``(H(K_joint) - H(K_pp), H(K_own))`` ``[...]`` at order 2 with a median bandwidth,
    differentiable, from one distance matrix per joint sequence ``[..., n + m, d]``:
    :func:`proxy_autograd` and the entropy of the tokens ``own`` ``[..., n + m]`` with the
    median of their own pairs (as :func:`entropy_autograd` of those tokens alone, equal to
    round-off: the distances are centred on the joint mean instead of theirs)."""
    batch_shape, (n, d) = Z_joint.shape[:-2], Z_joint.shape[-2:]
    flat_mask = (
        torch.ones(batch_shape + (n,), dtype=torch.bool, device=Z_joint.device)
        if mask_joint is None
        else mask_joint
    ).reshape(-1, n)
    joint, prompt_part, own_part = GaussianRenyi2.apply(
        Z_joint.reshape(-1, n, d),
        flat_mask,
        prompt.reshape(-1, n),
        sigma == "median_differentiable",
        own.reshape(-1, n),
    )
    proxy = (nonnegative(joint) - nonnegative(prompt_part)) / math.log(base)
    entropy = nonnegative(own_part) / math.log(base)
    return proxy.reshape(batch_shape), entropy.reshape(batch_shape)
