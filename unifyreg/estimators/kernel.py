"""The Gaussian kernel of one sequence: pair distances, bandwidth rules and the Gram.

- ``D_ij = ||z_i - z_j||^2`` by the Gram trick ``|c_i|^2 + |c_j|^2 - 2 c_i.c_j`` on the
  tokens ``c`` centred on the mean of the sequence's valid tokens (distances are
  translation invariant; centring removes most of the cancellation). Values at or below
  the round-off of that formula, ``CANCELLATION_FACTOR * sqrt(d) * eps * max_i |c_i|^2``,
  are set to exactly 0: the formula cannot tell them from 0, and a repeated token must
  give exactly 0 on every path (otherwise, under a floored median bandwidth, the Gram of
  repeated tokens depends on which BLAS kernel computed the round-off).
- ``K_ij = exp(-D_ij / (2 sigma^2))`` with one bandwidth ``sigma`` per sequence, from a
  rule (:func:`resolve_bandwidth`).

Bandwidth rules by name (:data:`BANDWIDTH_RULE_TABLE`, the one list of them), each
optionally scaled by a factor: ``"<rule>"`` or ``"<rule>:<factor>"`` (``"rms:0.1"``:
0.1 times the rule's value). Every rule is a statistic of one sequence's own distances,
so every rule is scale invariant (scaling Z by c scales sigma by c); what separates them
is how small sigma is against the distances between the tokens, and so how close the
entropy comes to ``log n`` (README, "Comparing with the paper's Table 1"):

- ``median``: the median pair distance (no gradient); ``median_differentiable``: the
  same value with its gradient;
- ``rms``: the root mean square pair distance ``sqrt(mean_{i<j} D_ij)`` (with gradient);
- ``silverman``: Silverman's normal-reference rule of thumb for a d-dimensional Gaussian
  kernel, ``(4 / (d + 2))^(1 / (d + 4)) * s * n^(-1 / (d + 4))`` with ``s`` the pooled
  per-coordinate standard deviation, ``s^2 = tr Cov / d = mean_{i<j} D_ij / (2 d)``
  (with gradient; needs the token width d).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from unifyreg.estimators._checks import as_mask, check_sequences
from unifyreg.estimators.cpu_linalg import numpy_applies, self_products

__all__ = [
    "BANDWIDTH_RULES",
    "BANDWIDTH_RULE_TABLE",
    "CANCELLATION_FACTOR",
    "MIN_MEDIAN_BANDWIDTH",
    "SYMMETRIC_GRAM_MIN_TOKENS",
    "Bandwidth",
    "BandwidthRule",
    "bandwidth_rule_name",
    "calibrate_bandwidth",
    "gaussian_gram",
    "median_bandwidth",
    "pairwise_sq_distances",
    "parse_bandwidth_rule",
    "resolve_bandwidth",
    "rms_bandwidth",
    "sampled_median_bandwidth",
    "silverman_bandwidth",
]

#: A bandwidth: a positive float, the name of a rule (:data:`BANDWIDTH_RULES`), or a
#: tensor of shape ``[...]`` with one positive value per sequence.
Bandwidth = float | str | Tensor


@dataclass(frozen=True)
class BandwidthRule:
    """A bandwidth rule given by name: its ``formula`` (per sequence, before the optional
    factor), whether the bandwidth keeps its ``gradient``, and whether it ``needs_width``
    (the token width d, which squared distances alone do not tell)."""

    name: str
    formula: str
    gradient: bool
    needs_width: bool = False


#: Every bandwidth rule given by name (module docstring), in one table: the estimators,
#: the config's ``probe.bandwidth`` check and the README read it.
BANDWIDTH_RULE_TABLE: dict[str, BandwidthRule] = {
    rule.name: rule
    for rule in (
        BandwidthRule("median", "median_{i<j} ||z_i - z_j||", gradient=False),
        BandwidthRule("median_differentiable", "median_{i<j} ||z_i - z_j||", gradient=True),
        BandwidthRule("rms", "sqrt(mean_{i<j} ||z_i - z_j||^2)", gradient=True),
        BandwidthRule(
            "silverman",
            "(4/(d+2))^(1/(d+4)) s n^(-1/(d+4)), s^2 = mean_{i<j} ||z_i - z_j||^2 / (2d)",
            gradient=True,
            needs_width=True,
        ),
    )
}

#: The names of the bandwidth rules (keys of :data:`BANDWIDTH_RULE_TABLE`); a rule may be
#: written ``"<name>:<factor>"`` (the rule's value times a factor > 0).
BANDWIDTH_RULES = tuple(BANDWIDTH_RULE_TABLE)

#: Smallest bandwidth the data-driven rules return (before their factor); applies when the
#: tokens of a sequence are (numerically) identical, where every such bandwidth gives
#: K = all-ones and entropy 0.
MIN_MEDIAN_BANDWIDTH = 1e-6

#: Distances at or below ``CANCELLATION_FACTOR * sqrt(d) * eps * max |c_i|^2`` are zero.
CANCELLATION_FACTOR = 16.0

#: Sequences with at least this many tokens get the blocked symmetric distance product.
SYMMETRIC_GRAM_MIN_TOKENS = 1024


def _cancellation_threshold(sq_norms: Tensor, width: int) -> Tensor:
    """``[..., 1, 1]``: the round-off level of the Gram trick per sequence (detached)."""
    eps = torch.finfo(sq_norms.dtype).eps
    largest = sq_norms.detach().amax(dim=-1, keepdim=True).unsqueeze(-1)
    return largest * (CANCELLATION_FACTOR * math.sqrt(max(width, 1)) * eps)


def centred_no_grad(Z: Tensor, mask: Tensor | None) -> Tensor:
    """A new tensor: each sequence minus the mean of its valid tokens, padding set to 0
    (replaced, not multiplied: it may hold Inf). One buffer, updated in place: without
    gradient the cost at small n is these passes over ``[..., n, d]``, not the products."""
    if mask is None:
        return Z - Z.mean(dim=-2, keepdim=True)
    padding = ~mask.unsqueeze(-1)
    Zc = Z.masked_fill(padding, 0.0)
    count = mask.sum(dim=-1, keepdim=True).unsqueeze(-1).clamp_min(1).to(Z.dtype)
    return Zc.sub_(Zc.sum(dim=-2, keepdim=True) / count).masked_fill_(padding, 0.0)


def pairwise_sq_distances(Z: Tensor, mask: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ``D_ij = ||z_i - z_j||^2`` of each sequence: ``[..., n, n]``.

    Computed as ``|c_i|^2 + |c_j|^2 - 2 c_i.c_j`` after centring each sequence on the mean
    of its valid tokens, with exact zeros on the diagonal and wherever the value is at
    the formula's round-off (module docstring), so repeated tokens are exactly 0 apart.
    Rows and columns of masked-out tokens hold meaningless values; callers ignore them.
    Differentiable when ``Z`` requires gradient.
    """
    with_grad = torch.is_grad_enabled() and Z.requires_grad
    if mask is None:
        Zc = Z - Z.mean(dim=-2, keepdim=True)
    elif with_grad:
        valid = mask.unsqueeze(-1)
        # Replace (not multiply) padding: it may hold Inf, and Inf * 0 is NaN.
        Z = torch.where(valid, Z, torch.zeros((), dtype=Z.dtype, device=Z.device))
        count = valid.sum(dim=-2, keepdim=True).clamp_min(1).to(Z.dtype)
        centre = Z.sum(dim=-2, keepdim=True) / count
        Zc = torch.where(valid, Z - centre, torch.zeros((), dtype=Z.dtype, device=Z.device))
    else:
        Zc = centred_no_grad(Z, mask)  # the same values, fewer passes
    n, d = Zc.shape[-2:]
    sq_norms = torch.linalg.vector_norm(Zc, dim=-1) ** 2
    threshold = _cancellation_threshold(sq_norms, d)
    if with_grad:
        gram = Zc @ Zc.transpose(-1, -2)
        raw = sq_norms.unsqueeze(-1) + sq_norms.unsqueeze(-2) - 2.0 * gram
        D = torch.where(raw > threshold, raw, torch.zeros((), dtype=raw.dtype, device=raw.device))
        eye = torch.eye(n, dtype=torch.bool, device=Z.device)
        return D.masked_fill(eye, 0.0)
    D = _sq_distances_of_centred(Zc.reshape(-1, n, d), sq_norms.reshape(-1, n), threshold)
    return D.reshape(*Zc.shape[:-2], n, n)


def _sq_distances_of_centred(Zc: Tensor, sq_norms: Tensor, threshold: Tensor) -> Tensor:
    """``|c_i|^2 + |c_j|^2 - 2 c_i.c_j`` ``[B, n, n]`` of centred ``[B, n, d]`` without
    gradient, round-off values and the diagonal set to 0. On CPU from
    :data:`~unifyreg.estimators.cpu_linalg.NUMPY_MIN_TOKENS` tokens the products are
    NumPy's symmetric rank-k update, so ``D`` is exactly symmetric, and each sequence's
    distances and round-off cut (``threshold_``) are made while its product is in cache;
    otherwise one fused ``baddbmm``.
    In-place updates save passes over ``n x n``."""
    n = Zc.shape[-2]
    if numpy_applies(Zc, n):
        norms, cuts = sq_norms.detach().numpy(), threshold.reshape(-1).tolist()

        def to_distances(b: int, product: np.ndarray) -> None:
            # (sq_i + sq_j) + (-2 G_ij): symmetric in i, j, so D is exactly symmetric.
            product *= -2.0
            product += np.add.outer(norms[b], norms[b])
            torch.nn.functional.threshold_(torch.from_numpy(product), cuts[b], 0.0)

        D = self_products(Zc.contiguous(), then=to_distances)
    else:
        outer = sq_norms.unsqueeze(-1) + sq_norms.unsqueeze(-2)
        D = torch.baddbmm(outer, Zc, Zc.transpose(-1, -2), alpha=-2.0)
        del outer
        D.masked_fill_(D <= threshold.reshape(-1, 1, 1), 0.0)
    D.diagonal(dim1=-2, dim2=-1).zero_()
    return D


def sq_distances_no_grad(Z: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`pairwise_sq_distances` of ``[B, n, d]`` for use without gradient.

    Below :data:`SYMMETRIC_GRAM_MIN_TOKENS`, and on CPU (where NumPy's symmetric rank-k
    update is faster still, :mod:`.cpu_linalg`), it is :func:`pairwise_sq_distances`
    itself. Otherwise the product ``Zc Zc^T`` is formed in 4 x 4 blocks of which only the
    upper triangle is computed (10 of 16 block products) and mirrored, about 1.4x faster
    than one ``baddbmm``: the same centring and formula, equal to
    :func:`pairwise_sq_distances` to round-off, and exactly symmetric.
    """
    n, d = Z.shape[-2:]
    if n < SYMMETRIC_GRAM_MIN_TOKENS or numpy_applies(Z, n):
        with torch.no_grad():
            return pairwise_sq_distances(Z, mask)
    Zc = centred_no_grad(Z, mask)
    sq_norms = torch.linalg.vector_norm(Zc, dim=-1) ** 2
    threshold = _cancellation_threshold(sq_norms, d)
    D = Zc.new_empty(Zc.shape[0], n, n)
    size = -(-n // 4)
    for i in range(0, n, size):
        rows = slice(i, min(i + size, n))
        for j in range(i, n, size):
            cols = slice(j, min(j + size, n))
            block = torch.baddbmm(
                sq_norms[:, rows, None] + sq_norms[:, None, cols],
                Zc[:, rows],
                Zc[:, cols].transpose(-1, -2),
                alpha=-2.0,
            )
            block.masked_fill_(block <= threshold, 0.0)
            D[:, rows, cols] = block
            if j != i:
                D[:, cols, rows] = block.transpose(-1, -2)
    D.diagonal(dim1=-2, dim2=-1).zero_()
    return D


# ---------------------------------------------------------------------- bandwidth rules


def median_bandwidth(
    Z: Tensor,
    mask: Tensor | None = None,
    *,
    sq_distances: Tensor | None = None,
    differentiable: bool = False,
) -> Tensor:
    """Median heuristic: ``sigma = median_{i < j} ||z_i - z_j||`` over pairs of valid tokens.

    The median is the lower median (``torch.median``'s convention: the ``ceil(N/2)``-th
    smallest of the N pair distances). Returns ``[...]`` (one bandwidth per sequence),
    floored at ``MIN_MEDIAN_BANDWIDTH`` so identical tokens do not divide by zero. A
    sequence with fewer than two valid tokens has no pair; it gets 1.0 (its entropy is 0
    for any sigma). Scale invariant: scaling Z by c scales sigma by c, so the Gram is
    unchanged.

    Without gradient by default. ``differentiable=True`` keeps the gradient (it flows to
    the median pair's distance), so the Gram is scale invariant in its gradient too: a
    loss that pushes entropies cannot do it by rescaling the hidden states against a
    frozen bandwidth (measured: with Adam, ``L_div`` rose 2.4x under a detached median
    and fell 5x under this one; see the README).
    """
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        D = pairwise_sq_distances(Z, mask) if sq_distances is None else sq_distances
        n = D.shape[-1]
        if n < 2:
            return torch.ones(D.shape[:-2], dtype=D.dtype, device=D.device)
        rows, cols = torch.triu_indices(n, n, offset=1, device=D.device)
        pairs = D[..., rows, cols]
        if mask is None:
            pair_valid = torch.ones_like(pairs, dtype=torch.bool)
        else:
            pair_valid = mask[..., rows] & mask[..., cols]
        # The median through the pair median_pair names (gather: its gradient goes there).
        m = pairs.shape[-1]
        _, index = median_pair(pairs.detach().reshape(-1, m), pair_valid.reshape(-1, m))
        index = index.reshape(pairs.shape[:-1])
        median_sq = pairs.gather(-1, index.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        median_sq = torch.where(index >= 0, median_sq, torch.ones_like(median_sq))
        # sqrt is monotone, so the median of distances is the sqrt of the median of squares;
        # flooring before the sqrt keeps its gradient finite at zero distance.
        return median_sq.clamp_min(MIN_MEDIAN_BANDWIDTH**2).sqrt()


def median_pair(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """``(median [B], index [B])`` of ``values`` ``[B, m]`` over ``valid`` ``[B, m]``: the
    lower median of each row's valid values (``torch.nanmedian``'s value; NaN without a
    valid value) and the position of the **first** valid value equal to it (-1 without
    one). The position is the pair a differentiable median bandwidth sends its gradient
    to; fixing it to the first among ties (instead of ``nanmedian``'s choice, which
    depends on its selection algorithm) lets the selection route of
    :func:`median_pairs_of_symmetric` name the same pair."""
    median = torch.nanmedian(values.masked_fill(~valid, math.nan), dim=-1).values
    has_value = ~torch.isnan(median)
    hit = (values == median.unsqueeze(-1)) & valid
    index = torch.where(has_value, hit.to(torch.uint8).argmax(dim=-1), -1)
    return median, index


def median_pairs_of_symmetric(D: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`median_pair` of the pairs ``i < j`` of the ``tokens`` ``[B, n]`` of each
    exactly symmetric CPU ``D`` ``[B, n, n]`` with a zero diagonal, without the gather of
    ``n (n - 1) / 2`` pairs: ``(median [B], index [B])``, ``index`` flat in ``n x n``
    (``i n + j``, ``i < j``) or -1 without a pair.

    Per sequence, the valid tokens' ``v x v`` block (a slice when they are contiguous)
    is ranked by selection (:func:`_block_median`). The first entry equal to the median
    in row-major order lies above the diagonal (its mirror comes later), so it is the
    first such pair, as in :func:`median_pair` (for a zero median, where the diagonal's
    zeros come first, the first zero pair off it). Exact symmetry is required (NumPy's
    ``?syrk`` products give it, :func:`_sq_distances_of_centred`); values and positions
    then equal :func:`median_pair` of the gathered pairs, bit for bit."""
    if D.device.type != "cpu" or D.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"D must be a float32/float64 CPU tensor, got {D.dtype} on {D.device}")
    batch, n = D.shape[0], D.shape[-1]
    median = torch.full((batch,), math.nan, dtype=D.dtype)
    index = torch.full((batch,), -1, dtype=torch.long)
    for b, (block, where, first) in enumerate(_valid_blocks(D, tokens)):
        v = block.shape[-1]
        if v < 2:
            continue
        value, at = _block_median(block.detach().numpy(), with_position=True)
        row, col = divmod(at, v)
        if where is not None:
            row, col = int(where[row]), int(where[col])
        else:
            row, col = row + first, col + first
        median[b] = float(value)
        index[b] = row * n + col
    return median, index


def _valid_blocks(D: Tensor, tokens: Tensor | None):
    """Per sequence of ``D`` ``[B, n, n]``: ``(block, where, first)``, the ``v x v`` block
    of the ``tokens`` ``[B, n]`` (all without ``tokens``): a slice from ``first`` when they
    are contiguous (``where`` None), otherwise gathered at positions ``where``."""
    n = D.shape[-1]
    if tokens is None:
        for b in range(D.shape[0]):
            yield D[b], None, 0
        return
    counts = tokens.sum(dim=-1).tolist()
    firsts = tokens.to(torch.uint8).argmax(dim=-1).tolist()
    for b, (v, first) in enumerate(zip(counts, firsts, strict=True)):
        if v == n:
            yield D[b], None, 0
        elif v == 0 or bool(tokens[b, first : first + v].all()):
            yield D[b, first : first + v, first : first + v], None, first
        else:
            where = torch.nonzero(tokens[b]).flatten()  # index_select: 6x advanced indexing
            yield D[b].index_select(0, where).index_select(1, where), where, 0


def _block_median(entries: np.ndarray, with_position: bool = False) -> tuple[float, int]:
    """``(value, position)``: the lower median of the pairs ``i < j`` of one symmetric
    ``[v, v]`` array with a zero diagonal (``v >= 2``) and, ``with_position``, the
    row-major position of its first entry off the diagonal (-1 otherwise).

    In the full array the diagonal adds ``v`` zeros and every pair appears twice, so the
    pair of 0-based rank ``p = (v (v - 1) / 2 - 1) // 2`` has rank ``v + 2 p``: one NumPy
    selection (``partition``) of the whole array, no gather of the pairs. On CPU it is
    4-8x ``torch.kthvalue``'s speed, and faster than ranking a sampled bracket (NumPy's
    boolean indexing costs more than the selection it saves; measured at v = 600)."""
    v = entries.shape[-1]
    rank = v + 2 * ((v * (v - 1) // 2 - 1) // 2)
    value = np.partition(entries, rank, axis=None)[rank]
    if not with_position:
        return value, -1
    if value == 0:  # the first zero pair, not the diagonal
        entries = entries + np.eye(v, dtype=entries.dtype)
    return value, int(np.argmax(entries == value))


def lower_median_of_pairs(D: Tensor) -> Tensor:
    """Lower median of the pairs ``i < j`` of one symmetric ``[v, v]`` matrix with a zero
    diagonal (``v >= 2``): exactly ``torch.median`` of its ``v (v - 1) / 2``
    upper-triangle values, found by selection instead of a gather and a full median
    (:func:`_block_median` on CPU, 2-12x faster at v = 600-4096; elsewhere
    :func:`_block_median_torch`)."""
    if D.device.type == "cpu" and D.dtype in (torch.float32, torch.float64):
        value, _ = _block_median(D.detach().numpy())
        return torch.tensor(value, dtype=D.dtype)
    return _block_median_torch(D)


def _block_median_torch(D: Tensor) -> Tensor:
    """:func:`lower_median_of_pairs` by ``torch.kthvalue`` (any device): the whole matrix
    ranked up to ``2^18`` entries; above, a strided sample brackets the rank and only the
    bracket is ranked (the whole matrix if the bracket misses, by heavy ties)."""
    v = D.shape[-1]
    pairs = v * (v - 1) // 2
    rank = v + 2 * ((pairs - 1) // 2) + 1  # 1-based rank in the full v x v matrix
    total = v * v
    flat = D.reshape(-1)
    if total <= 1 << 18:
        return flat.kthvalue(rank).values
    sample = flat[:: (total // 65536) | 1].sort().values  # odd stride: all columns visited
    size = sample.numel()
    fraction, margin = rank / total, 5.0 / math.sqrt(size) + 1.0 / size
    low = sample[max(0, math.floor((fraction - margin) * size))]
    high = sample[min(size - 1, math.ceil((fraction + margin) * size))]
    below = int(torch.count_nonzero(D < low))
    inside = D[(D >= low) & (D <= high)]
    within = rank - below
    if 1 <= within <= inside.numel():
        return inside.kthvalue(within).values
    return flat.kthvalue(rank).values


def median_bandwidth_by_selection(D: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`median_bandwidth` from squared distances ``D`` ``[B, n, n]`` (exactly
    symmetric): the same values bit for bit (the same lower median of the same numbers),
    by selection per sequence instead of a gather of all pairs (no
    ``[B, n (n - 1) / 2]`` copy; on CPU NumPy's selection: 53-72 ms per float32 sequence
    at n = 4096, against 176 ms for torch's bracketed ``kthvalue``)."""
    out = torch.ones(D.shape[0], dtype=D.dtype, device=D.device)
    for b, (block, _, _) in enumerate(_valid_blocks(D, mask)):
        if block.shape[-1] >= 2:
            out[b] = lower_median_of_pairs(block)
    return out.clamp_min(0).sqrt().clamp_min(MIN_MEDIAN_BANDWIDTH)


@torch.no_grad()
def sampled_median_bandwidth(
    D: Tensor, mask: Tensor | None, pairs: int, generator: torch.Generator | int | None = 0
) -> Tensor:
    """The median bandwidth estimated from ``pairs`` random pairs: ``[B]`` from squared
    distances ``D`` ``[B, n, n]``, without gradient and without ranking all ``n^2`` entries.

    ``sigma = sqrt(lower median_k D[i_k, j_k])`` over pairs drawn uniformly (with
    replacement) among the pairs ``i != j`` of each sequence's valid tokens, floored like
    :func:`median_bandwidth`; fewer than two valid tokens give 1.0. Cost ``O(pairs)`` per
    sequence (one gather) against several passes over ``n^2`` for the exact median by
    selection. One draw of ``2 x pairs`` uniforms from ``generator`` (an int seeds one)
    serves every sequence (common random numbers), scaled to each sequence's count of
    valid tokens, so a sequence's value does not depend on its place in the batch or on
    trailing padding. The sample median's rank error is about ``0.5 / sqrt(pairs)`` in
    quantile (0.05 % at 2^20 pairs); its effect on sigma and H is measured in
    BENCHMARKS.md (issue 20) and tested.
    """
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"pairs must be an integer >= 1, got {pairs!r}")
    batch, n = D.shape[0], D.shape[-1]
    gen = generator if isinstance(generator, torch.Generator) else None
    if gen is None:
        gen = torch.Generator().manual_seed(0 if generator is None else int(generator))
    u = torch.rand(2, pairs, generator=gen, dtype=torch.float64).to(D.device)
    if mask is None:
        counts = torch.full((batch,), n, dtype=torch.long, device=D.device)
    else:
        counts = mask.sum(dim=-1)
    trailing = mask is None or bool(
        torch.all(mask == (torch.arange(n, device=D.device) < counts[:, None]))
    )
    shared = trailing and bool(torch.all(counts == counts[0]))
    rows = counts[:1] if shared else counts  # one draw of pairs serves equal sequences
    c = rows.to(torch.float64)[:, None]
    first = torch.minimum((u[0] * c).long(), (rows - 1).clamp_min(0)[:, None])
    second = torch.minimum((u[1] * (c - 1)).long(), (rows - 2).clamp_min(0)[:, None])
    second = (second + (second >= first)).clamp_max(n - 1)  # uniform over the others
    if not trailing:
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)  # valid first
        first, second = order.gather(1, first), order.gather(1, second)
    flat = D.reshape(batch, n * n)
    if shared:  # sorted positions: one sweep through memory instead of random reads
        values = flat.index_select(1, (first[0] * n + second[0]).sort().values)
    else:
        values = flat.gather(1, first * n + second)
    sigma = values.median(dim=-1).values.clamp_min(MIN_MEDIAN_BANDWIDTH**2).sqrt()
    return torch.where(counts >= 2, sigma, torch.ones_like(sigma))


def _rule_error(text: str) -> str:
    rules = ", ".join(repr(rule) for rule in BANDWIDTH_RULES)
    return (
        f"unknown bandwidth rule {text!r}; valid: a float > 0, {rules}, or a rule with a "
        "factor > 0 as '<rule>:<factor>' (e.g. 'rms:0.1')"
    )


def parse_bandwidth_rule(text: str) -> tuple[BandwidthRule, float]:
    """``(rule, factor)`` of a rule string ``"<name>"`` or ``"<name>:<factor>"`` (factor a
    finite number > 0; 1 without one); ValueError naming the valid rules otherwise."""
    name, sep, factor_text = text.strip().partition(":")
    rule = BANDWIDTH_RULE_TABLE.get(name.strip())
    if rule is None:
        raise ValueError(_rule_error(text))
    if not sep:
        return rule, 1.0
    try:
        factor = float(factor_text)
    except ValueError:
        raise ValueError(_rule_error(text)) from None
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"the factor of bandwidth rule {text!r} must be a finite number > 0")
    return rule, factor


def bandwidth_rule_name(rule: BandwidthRule | str, factor: float = 1.0) -> str:
    """The canonical spelling of a rule with a factor: ``"rms:0.1"``, ``"median"`` (factor
    1 is left out, so ``"median:1"`` takes the median's own fast paths)."""
    name = rule.name if isinstance(rule, BandwidthRule) else rule
    return name if factor == 1.0 else f"{name}:{factor:g}"


def _mean_pair_sq_distance(D: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(mean, count)`` ``[...]``: the mean of ``D_ij`` over the ordered pairs ``i != j``
    of valid tokens (``D`` has a zero diagonal), and the number of valid tokens."""
    n = D.shape[-1]
    if mask is None:
        total = D.sum(dim=(-2, -1))
        count = torch.full(D.shape[:-2], n, dtype=D.dtype, device=D.device)
    else:
        pairs = mask[..., :, None] & mask[..., None, :]
        zero = torch.zeros((), dtype=D.dtype, device=D.device)
        total = torch.where(pairs, D, zero).sum(dim=(-2, -1))
        count = mask.sum(dim=-1).to(D.dtype)
    return total / (count * (count - 1)).clamp_min(1), count


def rms_bandwidth(
    Z: Tensor, mask: Tensor | None = None, *, sq_distances: Tensor | None = None
) -> Tensor:
    """Root mean square pair distance: ``sigma = sqrt(mean_{i<j} ||z_i - z_j||^2)`` over the
    pairs of valid tokens, ``[...]`` (one bandwidth per sequence), floored at
    ``MIN_MEDIAN_BANDWIDTH``; fewer than two valid tokens give 1.0. Equal to
    ``sqrt(2 tr Cov)`` (sample covariance): the typical distance between two tokens.
    Scale invariant; keeps its gradient (a smooth function of the tokens). Against the
    median it weighs every pair, so a few far tokens widen the kernel for all."""
    D = pairwise_sq_distances(Z, mask) if sq_distances is None else sq_distances
    mean, count = _mean_pair_sq_distance(D, mask)
    sigma = mean.clamp_min(MIN_MEDIAN_BANDWIDTH**2).sqrt()
    return torch.where(count >= 2, sigma, torch.ones_like(sigma))


def silverman_bandwidth(
    Z: Tensor,
    mask: Tensor | None = None,
    *,
    sq_distances: Tensor | None = None,
    width: int | None = None,
) -> Tensor:
    """Silverman's rule of thumb for a d-dimensional Gaussian kernel (Silverman 1986, the
    normal-reference rule), one bandwidth per sequence ``[...]``:

        ``sigma = (4 / (d + 2))^(1 / (d + 4)) * s * n^(-1 / (d + 4))``

    with ``n`` the sequence's valid tokens and ``s`` their pooled per-coordinate standard
    deviation, ``s^2 = tr Cov / d = mean_{i<j} ||z_i - z_j||^2 / (2 d)`` (sample
    covariance). ``d = 1`` gives the familiar ``1.06 s n^(-1/5)``. This is the form of the
    matrix-based Renyi entropy literature, ``sigma = gamma n^(-1/(4+d))`` (Giraldo, Rao and
    Principe 2015; Yu et al.), with the data's spread as the scale (Tapia and Estevez
    2020 standardise the data first, which is the same thing); a factor
    (``"silverman:<gamma>"``) plays the role of their ``gamma``.

    ``width`` is d (default ``Z.shape[-1]``; required when ``Z`` is not the tokens). Scale
    invariant, floored like the median, fewer than two tokens give 1.0; keeps its
    gradient. Against the pair distances, ``sigma ~ s`` while a typical distance is
    ``s sqrt(2 d)``: at the widths of real models (d in the thousands) the kernel is
    narrow and the Gram of distinct tokens near the identity.
    """
    d = Z.shape[-1] if width is None else int(width)
    if d < 1:
        raise ValueError(f"silverman_bandwidth needs the token width d >= 1, got {d}")
    D = pairwise_sq_distances(Z, mask) if sq_distances is None else sq_distances
    mean, count = _mean_pair_sq_distance(D, mask)
    spread = (mean / (2.0 * d)).clamp_min(MIN_MEDIAN_BANDWIDTH**2).sqrt()
    shrink = (4.0 / (d + 2.0)) ** (1.0 / (d + 4.0)) * count.clamp_min(1) ** (-1.0 / (d + 4.0))
    sigma = shrink * spread
    return torch.where(count >= 2, sigma, torch.ones_like(sigma))


def resolve_bandwidth(
    Z: Tensor,
    sigma: Bandwidth,
    mask: Tensor | None = None,
    *,
    sq_distances: Tensor | None = None,
    width: int | None = None,
) -> Tensor:
    """Turn a bandwidth rule into one positive bandwidth per sequence, shape ``Z.shape[:-2]``.

    ``sigma`` is a positive float (the same for every sequence), ``"median"``
    (:func:`median_bandwidth` of each sequence, without gradient),
    ``"median_differentiable"`` (the same, with gradient), ``"rms"``
    (:func:`rms_bandwidth`), ``"silverman"`` (:func:`silverman_bandwidth`; ``width`` is
    the token width d, default ``Z.shape[-1]``), any of these with a factor
    (``"rms:0.1"``: 0.1 times the rule's value), or a tensor broadcastable to
    ``Z.shape[:-2]`` (e.g. frozen by :func:`calibrate_bandwidth`; used without gradient).
    """
    batch_shape = Z.shape[:-2]
    if isinstance(sigma, str):
        rule, factor = parse_bandwidth_rule(sigma)
        if rule.name == "rms":
            value = rms_bandwidth(Z, mask, sq_distances=sq_distances)
        elif rule.name == "silverman":
            value = silverman_bandwidth(Z, mask, sq_distances=sq_distances, width=width)
        else:
            value = median_bandwidth(
                Z,
                mask,
                sq_distances=sq_distances,
                differentiable=rule.name == "median_differentiable",
            )
        return value if factor == 1.0 else value * factor
    if isinstance(sigma, Tensor):
        value = sigma.detach().to(device=Z.device, dtype=Z.dtype)
        if not torch.all(torch.isfinite(value) & (value > 0)):
            raise ValueError("bandwidth tensor must hold finite values > 0")
        return value.expand(batch_shape) if value.dim() <= len(batch_shape) else value
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"bandwidth must be a float, a rule name or a tensor, got {sigma!r}")
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"bandwidth must be a finite number > 0, got {sigma!r}")
    return torch.full(batch_shape, float(sigma), dtype=Z.dtype, device=Z.device)


def check_bandwidth(sigma: Bandwidth) -> None:
    """ValueError/TypeError for a bandwidth that :func:`resolve_bandwidth` would reject,
    checked before any work (tensors are checked where they are used)."""
    if isinstance(sigma, Tensor):
        return
    if isinstance(sigma, str):
        parse_bandwidth_rule(sigma)
        return
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"bandwidth must be a float, a rule name or a tensor, got {sigma!r}")
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"bandwidth must be a finite number > 0, got {sigma!r}")


def calibrate_bandwidth(
    sequences: Tensor | Iterable[Tensor], mask: Tensor | None = None, dtype=torch.float64
) -> float:
    """Freeze one bandwidth from a calibration set: the median of per-sequence medians.

    ``sequences`` is a tensor ``[..., n, d]`` (with optional ``mask`` ``[..., n]``) or an
    iterable of ``[n_i, d]`` tensors of varying length. Use the returned float as ``sigma``
    to compare entropies across checkpoints on one fixed kernel scale.
    """
    if isinstance(sequences, Tensor):
        check_sequences(sequences, "sequences")
        Z = sequences.to(dtype)
        medians = median_bandwidth(Z, as_mask(mask, Z)).flatten()
    else:
        values = []
        for i, seq in enumerate(sequences):
            check_sequences(seq, f"sequences[{i}]")
            values.append(median_bandwidth(seq.detach().to(dtype)).flatten())
        if not values:
            raise ValueError("calibrate_bandwidth needs at least one sequence")
        medians = torch.cat(values)
    if not torch.all(torch.isfinite(medians)):
        raise ValueError("calibration sequences hold NaN or Inf")
    return float(medians.median())


# ---------------------------------------------------------------------- Gram


def gaussian_gram(Z: Tensor, sigma: Bandwidth = "median", mask: Tensor | None = None) -> Tensor:
    """Gaussian Gram ``K_ij = exp(-||z_i - z_j||^2 / (2 sigma^2))`` of each sequence.

    ``Z``: ``[..., n, d]`` -> ``[..., n, n]``, in Z's dtype (cast beforehand for float64).
    With ``mask`` ``[..., n]``, rows and columns of padded tokens are zero, so the
    normalised Gram has the valid tokens' spectrum plus exact zeros.
    """
    check_sequences(Z)
    mask = as_mask(mask, Z)
    D = pairwise_sq_distances(Z, mask)
    bandwidth = resolve_bandwidth(Z, sigma, mask, sq_distances=D)
    scale = -0.5 / bandwidth[..., None, None] ** 2
    K = torch.exp(D * scale) if D.requires_grad else D.mul_(scale).exp_()
    if mask is not None:
        K = K * (mask.unsqueeze(-1) & mask.unsqueeze(-2)).to(K.dtype)
    return K


def gram_from_sq_distances_(
    D: Tensor,
    sigma: Bandwidth,
    mask: Tensor | None,
    width: int | None = None,
    *,
    median_pairs: int = 0,
    seed: int = 0,
) -> Tensor:
    """The Gaussian Gram ``exp(-D / (2 sigma^2))`` of squared distances ``D`` ``[B, n, n]``,
    built in ``D``'s buffer (``D`` is consumed); padded rows and columns zeroed in place
    (no pair-mask copy). From :data:`SYMMETRIC_GRAM_MIN_TOKENS` tokens the median
    bandwidth is found by selection (the same median; needs ``D`` exactly symmetric, as
    :func:`sq_distances_no_grad` makes it). ``width``: the token width d, needed by the
    rules that use it (``silverman``), which ``D`` does not tell. ``median_pairs`` > 0
    (the SLQ path's setting): from the same size the median comes from that many random
    pairs instead (:func:`sampled_median_bandwidth`, seeded with ``seed``)."""
    large = D.shape[-1] >= SYMMETRIC_GRAM_MIN_TOKENS
    if isinstance(sigma, str) and sigma == "median" and large and median_pairs > 0:
        bandwidth = sampled_median_bandwidth(D, mask, median_pairs, seed)
    elif isinstance(sigma, str) and sigma == "median" and large:
        bandwidth = median_bandwidth_by_selection(D, mask)
    else:
        if isinstance(sigma, str) and width is None and parse_bandwidth_rule(sigma)[0].needs_width:
            raise ValueError(f"bandwidth rule {sigma!r} needs the token width: pass width=")
        # D.shape[:-2] = [B]
        bandwidth = resolve_bandwidth(D, sigma, mask, sq_distances=D, width=width)
    K = D.mul_((-0.5 / bandwidth**2)[:, None, None]).exp_()
    if mask is not None:
        K.masked_fill_(~mask[:, :, None], 0.0).masked_fill_(~mask[:, None, :], 0.0)
    return K
