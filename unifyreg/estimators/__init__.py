"""Matrix-based Renyi entropy estimators (pure tensor math, batched, differentiable).

Everything here works on one *sequence* of token vectors at a time, batched over any
leading dimensions (layers, samples): ``Z`` has shape ``[..., n, d]``.

- Gaussian Gram: ``K_ij = exp(-||z_i - z_j||^2 / (2 sigma^2))``, so ``K_ii = 1``.
- Normalised Gram: ``A = K / tr(K)``; its eigenvalues ``lambda_i`` are >= 0 and sum to 1.
- Renyi entropy of order alpha: ``H_alpha(A) = log(sum_i lambda_i^alpha) / (1 - alpha)``;
  alpha = 1 is the von Neumann limit ``-sum_i lambda_i log lambda_i``; alpha = 2 is
  ``-log ||A||_F^2`` (no eigendecomposition).
- Bounds: ``0 <= H <= log n``; 0 when all tokens are identical. ``log n`` needs a Gram
  near the identity, i.e. a bandwidth small against the distances between tokens: a
  narrow rule gives it for distinct tokens (``"silverman"`` at the widths of real models,
  ``"rms:0.1"``, a small fixed ``sigma``); the median rule never does (at least half of
  the off-diagonal entries are ``>= exp(-1/2)``, so at order 2 ``H <= log2(2e) = 2.44``
  bits for any n).
- Conditional-entropy proxy (PAPER.md): ``H(R | P) ~= H(K_joint) - H(K_pp)`` where
  ``K_joint`` is the Gram of the concatenation ``[P; R]`` and ``K_pp`` its prompt block.

One public entry per quantity: :func:`matrix_entropy`, :func:`conditional_entropy_proxy`
and, for a Gram given directly, :func:`renyi_entropy`. Each chooses its implementation
behind one signature:

- ``method="exact"`` with a gradient to compute: order 2 with a median bandwidth runs
  through one autograd function with a hand-written backward (the divergence loss's
  default; :func:`proxy_with_prompt_entropy` takes a prompt entropy from its proxy's
  joint distances); anything else builds the Gram and takes ``eigvalsh`` through autograd,
  a chunk of ``max_gram_bytes`` at a time;
- ``method="exact"`` without gradient: one in-place Gram per chunk of ``max_gram_bytes``,
  blocked symmetric distances and the median by selection from 1024 tokens
  (:mod:`.blocked`); :class:`Segments` of short sequences share one distance matrix per
  sequence and layer (:mod:`.segments`);
- ``method="slq"`` (no gradient): stochastic Lanczos quadrature on float32 Grams, exact
  where that is as cheap (:mod:`.slq`).

All exact routes agree to round-off (tested). Inputs of any float dtype are computed in
``dtype`` (float64 by default; ``slq`` builds its Grams in float32) and the result is
returned in that dtype (float64 for ``slq``). Logs are in ``base`` (2 = bits by default,
matching the magnitudes of the paper's Table 1). Nothing returns NaN silently:
non-finite inputs raise ``ValueError`` unless ``nan_policy="propagate"`` is asked for,
in which case exactly the affected sequences come back as NaN.

Gradients: the ``"median"`` bandwidth is treated as a constant (computed without
gradient), so the gradient is that of the entropy at a fixed kernel;
``"median_differentiable"``, ``"rms"`` and ``"silverman"`` keep their gradient
(:data:`~unifyreg.estimators.kernel.BANDWIDTH_RULE_TABLE`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from unifyreg.estimators._checks import (
    NanPolicy,
    check_alpha,
    check_base,
    finish,
    finite_tokens,
    normalize_by_count,
    prepare,
    prepare_joint,
    valid_counts,
)
from unifyreg.estimators.blocked import (
    check_max_gram_bytes,
    chunks,
    entropy_blocked,
    entropy_of_sq_distances,
    flat_bandwidth,
    gram_chunk_size,
    part,
    proxy_blocked,
    proxy_of_sq_distances,
)
from unifyreg.estimators.exact import (
    EIGENVALUE_FLOOR,
    MEDIAN_RULES,
    entropy_autograd,
    proxy_and_entropy_renyi2,
    proxy_autograd,
    renyi_entropy_exact,
)
from unifyreg.estimators.kernel import (
    BANDWIDTH_RULE_TABLE,
    BANDWIDTH_RULES,
    MIN_MEDIAN_BANDWIDTH,
    SYMMETRIC_GRAM_MIN_TOKENS,
    Bandwidth,
    BandwidthRule,
    calibrate_bandwidth,
    check_bandwidth,
    gaussian_gram,
    median_bandwidth,
    pairwise_sq_distances,
    parse_bandwidth_rule,
    resolve_bandwidth,
    rms_bandwidth,
    silverman_bandwidth,
)
from unifyreg.estimators.segments import Segments, TokenBatch, joint_sq_distances
from unifyreg.estimators.slq import (
    RITZ_LANCZOS_STEPS,
    SLQ_ERROR_BOUND,
    SLQSettings,
    check_settings,
    entropy_slq,
    proxy_slq,
    renyi_entropy_slq,
)
from unifyreg.estimators.subsample import subsample_tokens

__all__ = [
    "BANDWIDTH_RULES",
    "BANDWIDTH_RULE_TABLE",
    "Bandwidth",
    "BandwidthRule",
    "EIGENVALUE_FLOOR",
    "METHODS",
    "MIN_MEDIAN_BANDWIDTH",
    "RITZ_LANCZOS_STEPS",
    "SLQSettings",
    "SLQ_ERROR_BOUND",
    "SYMMETRIC_GRAM_MIN_TOKENS",
    "Segments",
    "TokenBatch",
    "calibrate_bandwidth",
    "conditional_entropy_proxy",
    "finite_tokens",
    "gaussian_gram",
    "gram_chunk_size",
    "matrix_entropy",
    "median_bandwidth",
    "normalize_by_count",
    "pairwise_sq_distances",
    "parse_bandwidth_rule",
    "proxy_with_prompt_entropy",
    "renyi_entropy",
    "resolve_bandwidth",
    "rms_bandwidth",
    "shares_prompt_distances",
    "silverman_bandwidth",
    "subsample_tokens",
]

#: Values of ``method``.
METHODS = ("exact", "slq")
Method = Literal["exact", "slq"]


def _check_common(
    alpha: float,
    base: float,
    sigma: Bandwidth,
    method: str,
    max_gram_bytes: int | None,
    settings: SLQSettings | None,
) -> tuple[float, float, SLQSettings | None]:
    alpha, base = check_alpha(alpha), check_base(base)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    check_bandwidth(sigma)
    check_max_gram_bytes(max_gram_bytes)
    return alpha, base, check_settings(settings) if method == "slq" else None


def _refuse_gradient(method: str, needs_grad: bool) -> None:
    if method == "slq" and needs_grad:
        raise ValueError(
            "method='slq' (probe.method=slq) is approximate and has no gradient: use "
            "method='exact' where gradients are needed (e.g. the divergence loss), or run "
            "it under torch.no_grad()"
        )


def _exact_where_as_cheap(
    method: str, compute: torch.dtype, settings: SLQSettings | None, alpha: float, n: int
) -> tuple[str, torch.dtype]:
    """SLQ is exact for order 2 (Frobenius) and no cheaper than ``eigvalsh`` for Grams of
    at most ``settings.exact_max_tokens`` tokens: those take the exact path in float64."""
    if method == "slq" and (alpha == 2.0 or n <= settings.exact_max_tokens):
        return "exact", torch.float64
    return method, compute


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _compute_dtype(dtype: torch.dtype | None, method: str) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float32 if method == "slq" else torch.float64


def _chunked(fn, total: int, size: int | None, *per_sequence):
    """``fn`` on chunks of the flattened batch (per-sequence arguments sliced), concatenated."""
    return torch.cat([fn(*(part(a, piece) for a in per_sequence)) for piece in chunks(total, size)])


def matrix_entropy(
    Z: Tensor | Segments,
    alpha: float = 1.01,
    sigma: Bandwidth = "median",
    base: float = 2.0,
    mask: Tensor | None = None,
    normalize: bool = False,
    *,
    method: Method = "exact",
    dtype: torch.dtype | None = None,
    nan_policy: NanPolicy = "raise",
    max_gram_bytes: int | None = None,
    settings: SLQSettings | None = None,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    """Entropy ``H_alpha`` of the Gaussian Gram of each sequence: ``[..., n, d]`` -> ``[...]``.

    ``H = renyi_entropy(gaussian_gram(Z, sigma), alpha, base)`` computed in ``dtype``
    (default float64; float32 Grams for ``slq``). ``Z`` is a tensor, or :class:`Segments`
    of a :class:`TokenBatch` (result ``[L, b]``; their mask is their own).
    ``mask`` ``[..., n]`` (True = valid token) excludes padding: a padded batch gives the
    same values as each trimmed sequence alone (also for the median bandwidth).
    ``normalize=True`` divides by ``log_base(number of valid tokens)`` (range [0, 1]; a
    single token gives 0). A sequence with no valid token raises ``ValueError``.

    ``method``: ``"exact"`` or ``"slq"`` (approximate within ``SLQ_ERROR_BOUND``, with
    ``settings``/``generator``; ValueError where a gradient is to be computed);
    ``max_gram_bytes`` bounds the Gram memory built at once (None = all at once). The
    implementation is chosen behind this signature (module docstring).
    """
    alpha, base, settings = _check_common(alpha, base, sigma, method, max_gram_bytes, settings)
    compute = _compute_dtype(dtype, method)
    if isinstance(Z, Segments):
        if mask is not None:
            raise ValueError("Segments carry their own mask: do not pass mask=")
        _refuse_gradient(method, Z.batch.requires_grad)
        method, compute = _exact_where_as_cheap(method, compute, settings, alpha, Z.index.shape[1])
        if method == "exact" and Z.batch.shares_distances(compute, max_gram_bytes):
            D, ok = joint_sq_distances([Z], compute)
            width = Z.batch.layers[0].shape[-1]
            values = entropy_of_sq_distances(
                D, alpha, sigma, base, Z.layer_mask.reshape(D.shape[:-1]), width
            ).view(ok.shape)
            return _finish_shared(values, ok, Z.counts, normalize, base, nan_policy)
        mask = Z.layer_mask
        Z = Z.gather(None if Z.batch.requires_grad else compute)
    needs_grad = _needs_grad(Z)
    _refuse_gradient(method, needs_grad)
    if isinstance(Z, Tensor) and Z.dim() >= 2:
        method, compute = _exact_where_as_cheap(method, compute, settings, alpha, Z.shape[-2])
    Zc, mask, bad = prepare(Z, mask, compute, nan_policy, "Z")
    counts = valid_counts(Zc, mask)
    if torch.any(counts < 1):
        raise ValueError("a sequence has no valid token (mask all False): entropy undefined")
    if method == "slq":
        entropy = entropy_slq(Zc, mask, alpha, sigma, base, settings, generator, max_gram_bytes)
    elif needs_grad:
        batch_shape, (n, d) = Zc.shape[:-2], Zc.shape[-2:]
        total = math.prod(batch_shape)
        size = gram_chunk_size(n, Zc.element_size(), max_gram_bytes)
        flat_mask = None if mask is None else mask.reshape(total, n)
        entropy = _chunked(
            lambda z, m, s: entropy_autograd(z, m, alpha, s, base),
            total,
            size,
            Zc.reshape(total, n, d),
            flat_mask,
            flat_bandwidth(sigma, batch_shape, Zc.dtype, Zc.device),
        ).reshape(batch_shape)
    else:
        entropy = entropy_blocked(Zc, mask, alpha, sigma, base, max_gram_bytes)
    return finish(entropy, counts if normalize else None, base, bad)


def conditional_entropy_proxy(
    Zp: Tensor | Segments,
    Zr: Tensor | Segments,
    alpha: float = 1.01,
    sigma: Bandwidth = "median",
    base: float = 2.0,
    mask_p: Tensor | None = None,
    mask_r: Tensor | None = None,
    normalize: bool = False,
    *,
    method: Method = "exact",
    dtype: torch.dtype | None = None,
    nan_policy: NanPolicy = "raise",
    max_gram_bytes: int | None = None,
    settings: SLQSettings | None = None,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    """Conditional-entropy proxy ``H(R | P) ~= H_alpha(K_joint) - H_alpha(K_pp)``: ``[...]``.

    ``Zp`` ``[..., n, d]`` prompt tokens, ``Zr`` ``[..., m, d]`` response tokens (same layer),
    or two :class:`Segments` of the same :class:`TokenBatch` and rows (result ``[L, b]``).
    ``K_joint`` is the Gaussian Gram of the concatenation ``[P; R]`` (blocks
    ``[[K_pp, K_pr], [K_rp, K_rr]]``, one kernel); ``K_pp`` is its prompt block. Both terms
    share one bandwidth per sequence: the rule is applied to the *joint* sequence (the
    median over all joint pairs for ``"median"``), so ``K_pp`` is literally the top-left
    block of ``K_joint`` and R = P gives exactly 0.

    It is a proxy, not a formal conditional entropy: about 0 when R repeats P; for
    ``R = P + s * noise`` it grows with ``s`` while ``s`` is small against P's spread, and an
    independent R scores above a noisy copy only in that regime (with ``s`` of 0.5-1 of
    P's spread the noisy copy often scores higher: the proxy mixes R's own spread with its
    dependence on P; tested). It can be slightly negative (tokens that repeat one prompt
    token lower the joint entropy) and it grows with m. ``normalize=True`` divides by
    ``log_base(n + m)``, the maximum of ``H(K_joint)`` (unifyreg's length-normalised
    variant; counts are of valid tokens). Other arguments as :func:`matrix_entropy`.
    """
    alpha, base, settings = _check_common(alpha, base, sigma, method, max_gram_bytes, settings)
    compute = _compute_dtype(dtype, method)
    if isinstance(Zp, Segments) or isinstance(Zr, Segments):
        if not (isinstance(Zp, Segments) and isinstance(Zr, Segments)):
            raise TypeError("Zp and Zr must both be tensors or both be Segments")
        if Zp.batch is not Zr.batch or not torch.equal(Zp.rows, Zr.rows):
            raise ValueError("prompt and response Segments must share their TokenBatch and rows")
        if mask_p is not None or mask_r is not None:
            raise ValueError("Segments carry their own masks: do not pass mask_p=/mask_r=")
        _refuse_gradient(method, Zp.batch.requires_grad)
        joint_length = Zp.index.shape[1] + Zr.index.shape[1]
        method, compute = _exact_where_as_cheap(method, compute, settings, alpha, joint_length)
        if method == "exact" and Zp.batch.shares_distances(compute, max_gram_bytes):
            D, ok = joint_sq_distances([Zp, Zr], compute)
            joint_mask = torch.cat([Zp.layer_mask, Zr.layer_mask], dim=-1)
            width = Zp.batch.layers[0].shape[-1]
            values = proxy_of_sq_distances(
                D, Zp.index.shape[1], alpha, sigma, base, joint_mask.reshape(D.shape[:-1]), width
            ).view(ok.shape)
            return _finish_shared(values, ok, Zp.counts + Zr.counts, normalize, base, nan_policy)
        mask_p, mask_r = Zp.layer_mask, Zr.layer_mask
        gather_dtype = None if Zp.batch.requires_grad else compute
        Zp, Zr = Zp.gather(gather_dtype), Zr.gather(gather_dtype)
    needs_grad = _needs_grad(Zp, Zr)
    _refuse_gradient(method, needs_grad)
    if isinstance(Zp, Tensor) and isinstance(Zr, Tensor) and min(Zp.dim(), Zr.dim()) >= 2:
        joint_length = Zp.shape[-2] + Zr.shape[-2]
        method, compute = _exact_where_as_cheap(method, compute, settings, alpha, joint_length)
    Z_joint, mask_joint, prompt, counts, bad = prepare_joint(
        Zp, Zr, mask_p, mask_r, compute, nan_policy
    )
    n = Zp.shape[-2]
    if method == "slq":
        proxy = proxy_slq(
            Z_joint, mask_joint, n, alpha, sigma, base, settings, generator, max_gram_bytes
        )
    elif needs_grad:
        batch_shape, (length, d) = Z_joint.shape[:-2], Z_joint.shape[-2:]
        total = math.prod(batch_shape)
        size = gram_chunk_size(length, Z_joint.element_size(), max_gram_bytes)
        proxy = _chunked(
            lambda z, m, p, s: proxy_autograd(z, m, p, n, alpha, s, base),
            total,
            size,
            Z_joint.reshape(total, length, d),
            None if mask_joint is None else mask_joint.reshape(total, length),
            prompt.reshape(total, length),
            flat_bandwidth(sigma, batch_shape, Z_joint.dtype, Z_joint.device),
        ).reshape(batch_shape)
    else:
        proxy = proxy_blocked(Z_joint, mask_joint, n, alpha, sigma, base, max_gram_bytes)
    return finish(proxy, counts if normalize else None, base, bad)


def shares_prompt_distances(
    batch: TokenBatch, alpha: float, sigma: Bandwidth, method: str = "exact"
) -> bool:
    """Whether :func:`proxy_with_prompt_entropy` applies to segments of ``batch``: the
    exact method at order 2 with a median bandwidth (``"median"``,
    ``"median_differentiable"``) and a gradient to compute (the divergence loss's
    default route)."""
    return (
        method == "exact"
        and float(alpha) == 2.0
        and isinstance(sigma, str)
        and sigma in MEDIAN_RULES
        and batch.requires_grad
    )


def proxy_with_prompt_entropy(
    Zp: Segments,
    Zr: Segments,
    own: Tensor,
    alpha: float = 2.0,
    sigma: Bandwidth = "median_differentiable",
    base: float = 2.0,
    *,
    dtype: torch.dtype | None = None,
    nan_policy: NanPolicy = "raise",
    max_gram_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(proxy, entropy)`` ``[L, b]`` from one distance matrix per joint sequence:
    ``conditional_entropy_proxy(Zp, Zr)`` and ``matrix_entropy`` of the prompt tokens
    where ``own`` ``[b, k_p]`` (a subset of ``Zp.mask``: e.g. a sample's text prompt
    within all its prompt tokens), with the median of their own pairs. The same values
    and gradients as the two calls to round-off (the prompt's distances are centred on
    the joint mean), in one distance product instead of two. Only where
    :func:`shares_prompt_distances` holds (ValueError otherwise); ``entropy`` is 0 for a
    row where ``own`` has no token, NaN where one of its tokens is not finite (with
    ``nan_policy="propagate"``). Not normalised."""
    alpha, base, _ = _check_common(alpha, base, sigma, "exact", max_gram_bytes, None)
    if Zp.batch is not Zr.batch or not torch.equal(Zp.rows, Zr.rows):
        raise ValueError("prompt and response Segments must share their TokenBatch and rows")
    if not shares_prompt_distances(Zp.batch, alpha, sigma):
        raise ValueError(
            "proxy_with_prompt_entropy needs order 2, a median bandwidth and a gradient"
        )
    if own.shape != Zp.mask.shape or bool((own & ~Zp.mask).any()):
        raise ValueError("own must be [b, k_p] and within the prompt's mask")
    compute = _compute_dtype(dtype, "exact")
    n_layers = len(Zp.batch.layers)
    own_joint = torch.cat([own, torch.zeros_like(Zr.mask)], dim=-1)
    own_joint = own_joint.expand(n_layers, *own_joint.shape)
    zp, zr = Zp.gather(None), Zr.gather(None)
    Z_joint, mask_joint, prompt, _, bad = prepare_joint(
        zp, zr, Zp.layer_mask, Zr.layer_mask, compute, nan_policy
    )
    finite = finite_tokens(zp.detach())
    bad_own = ~(finite | ~own).all(dim=-1)
    batch_shape, (length, d) = Z_joint.shape[:-2], Z_joint.shape[-2:]
    total = math.prod(batch_shape)
    size = gram_chunk_size(length, Z_joint.element_size(), max_gram_bytes)
    pieces = [
        proxy_and_entropy_renyi2(
            Z_joint.reshape(total, length, d)[piece],
            mask_joint.reshape(total, length)[piece],
            prompt.reshape(total, length)[piece],
            own_joint.reshape(total, length)[piece],
            sigma,
            base,
        )
        for piece in chunks(total, size)
    ]
    proxy = torch.cat([p for p, _ in pieces]).reshape(batch_shape)
    entropy = torch.cat([e for _, e in pieces]).reshape(batch_shape)
    proxy = finish(proxy, None, base, bad)
    entropy = finish(entropy, None, base, bad_own if bool(bad_own.any()) else None)
    return proxy, entropy


def _finish_shared(
    values: Tensor, ok: Tensor, counts: Tensor, normalize: bool, base: float, nan_policy: str
) -> Tensor:
    """Results of the shared-distance route: NaN (or ValueError) where a used token is not
    finite, optional normalisation by the segments' counts."""
    if nan_policy not in ("raise", "propagate"):
        raise ValueError(f"nan_policy must be 'raise' or 'propagate', got {nan_policy!r}")
    bad = ~ok
    if nan_policy == "raise" and bool(bad.any()):
        raise ValueError(
            f"Z holds NaN or Inf in {int(bad.sum())} of {bad.numel()} sequence(s); "
            "pass nan_policy='propagate' to get NaN for those sequences instead"
        )
    if not normalize:
        counts = None
    else:
        counts = counts.to(values.dtype).expand_as(values)
    return finish(values, counts, base, bad if bool(bad.any()) else None)


def renyi_entropy(
    K: Tensor,
    alpha: float = 1.01,
    base: float = 2.0,
    *,
    method: Method = "exact",
    settings: SLQSettings | None = None,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    """Matrix-based Renyi entropy of a PSD Gram ``K`` ``[..., n, n]`` -> ``[...]``.

    ``A = K / tr(K)``; ``H_alpha = log_base(sum_i lambda_i(A)^alpha) / (1 - alpha)``.
    alpha == 1: von Neumann ``-sum lambda log lambda``; alpha == 2: ``-log ||A||_F^2``
    (no eigendecomposition); otherwise ``eigvalsh`` with round-off negatives clamped to 0.
    ``method="exact"``: computed in K's dtype, differentiable; ``"slq"``: the SLQ
    estimate in float64, no gradient (module docstring of :mod:`.slq`). A Gram with zero
    trace (no valid token) raises ``ValueError``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "exact":
        return renyi_entropy_exact(K, alpha, base)
    alpha, base = check_alpha(alpha), check_base(base)
    settings = check_settings(settings)
    if K.dim() < 2 or K.shape[-1] != K.shape[-2]:
        raise ValueError(f"K must have shape [..., n, n], got {tuple(K.shape)}")
    if not K.is_floating_point():
        raise TypeError(f"K must be a floating-point tensor, got {K.dtype}")
    _refuse_gradient(method, _needs_grad(K))
    return renyi_entropy_slq(K, alpha, base, settings, generator)
