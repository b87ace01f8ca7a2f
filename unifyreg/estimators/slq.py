"""Approximate entropies by stochastic Lanczos quadrature (SLQ), without gradient.

With ``A = K / tr K`` (``tr A = 1``) and ``g(x) = x^alpha - x`` (``x ln x`` for alpha = 1),
``sum lambda^alpha = 1 + tr g(A)``, so ``H_alpha = log_base(1 + tr g(A)) / (1 - alpha)``
(alpha = 1: ``-tr g(A) / ln base``). ``tr g(A)`` is estimated by Hutch++-style deflation
of the top ``deflation_rank`` eigen-directions plus Hutchinson's estimator with a
quadratic control variate on the rest, each quadratic form by the average of the Gauss
and Gauss-Radau Lanczos rules (:func:`_slq_trace`).

Contract and documented error (:data:`SLQ_ERROR_BOUND`): with the default
:class:`SLQSettings`, float32 or float64 Grams and ``alpha >= 1``,
``|H_slq - H| <= 0.01 * H + 1e-4 bits`` at every ``n`` (tested at n = 300 to 768 on
seeded isotropic, low-rank, clustered, near-identity, anisotropic and low-entropy Grams,
and in BENCHMARKS.md up to n = 4096 and on a model's hidden states; measured errors are
typically 0.01-0.3 %). For ``alpha < 1`` the singularity of ``x^alpha`` at 0 makes the
quadrature harder (measured up to 1.7 % at alpha = 0.5): use the exact path there.
alpha = 2 is exact (Frobenius) and Grams of at most ``exact_max_tokens`` tokens are
computed exactly (eigvalsh, float64). Values are clamped to ``[0, log_base n_valid]``.
Deterministic for a given seed; the same random vectors serve every sequence of a call
(common random numbers), drawn so that trailing padding is neutral.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from unifyreg.estimators._checks import as_generator
from unifyreg.estimators.blocked import chunks, flat_bandwidth, gram_chunk_size, part
from unifyreg.estimators.exact import renyi_entropy_exact
from unifyreg.estimators.kernel import (
    Bandwidth,
    gram_from_sq_distances_,
    sq_distances_no_grad,
)

__all__ = [
    "RITZ_LANCZOS_STEPS",
    "SAMPLED_MEDIAN_MIN_TOKENS",
    "SAMPLED_MEDIAN_MIN_TOKENS_CPU",
    "SLQSettings",
    "SLQ_ERROR_BOUND",
]


#: Documented error of the SLQ entropy with the default settings (alpha >= 1):
#: ``|H_slq - H| <= SLQ_ERROR_BOUND[0] * H + SLQ_ERROR_BOUND[1]`` (the absolute term in bits).
SLQ_ERROR_BOUND = (0.01, 1e-4)

#: From this many tokens (the padded length) the ``"median"`` bandwidth of the SLQ path is
#: estimated from ``SLQSettings.median_pairs`` random pairs of its distance matrix (off
#: the CPU; on CPU from :data:`SAMPLED_MEDIAN_MIN_TOKENS_CPU`). Measured with torch's
#: selection (BENCHMARKS.md, issue 20; 2^20 pairs, 1 thread): 48 ms per sequence against
#: 122 ms for the exact median at n = 4096; at n = 2048 the selection (28 ms) is as cheap
#: as the sample, so below this size the median stays exact.
SAMPLED_MEDIAN_MIN_TOKENS = 3072

#: :data:`SAMPLED_MEDIAN_MIN_TOKENS` on CPU, where the exact median is NumPy's selection
#: (:func:`~unifyreg.estimators.kernel.lower_median_of_pairs`): per float32 sequence it
#: took 53-72 ms at n = 4096 and 153 ms at 6144 against 98-129 ms for 2^20 sampled pairs
#: (1 thread, BENCHMARKS.md), so the sample pays from about 5000 tokens.
SAMPLED_MEDIAN_MIN_TOKENS_CPU = 5120

#: Lanczos steps run from each Ritz vector of the deflation subspace (near-eigenvectors,
#: whose quadratic forms converge in a few steps).
RITZ_LANCZOS_STEPS = 4

#: Directions of the deflation subspace whose squared singular value is below this
#: fraction of the largest are dropped (they carry no spectrum; keeps the basis exact).
_DEFLATION_RANK_TOL = 1e-10


@dataclass(frozen=True)
class SLQSettings:
    """Settings of the stochastic Lanczos quadrature estimator (:func:`renyi_entropy_slq`).

    - ``num_probes``: Rademacher probe vectors of the stochastic part;
    - ``deflation_rank``: top eigen-directions found by subspace iteration and removed
      from the stochastic part (their contribution is computed from their Ritz vectors);
    - ``lanczos_steps``: Lanczos steps per probe (quadrature nodes);
    - ``power_iterations``: subspace iterations for the deflation subspace (>= 1);
    - ``exact_max_tokens``: Grams of at most this many tokens (the padded length) are
      computed exactly with ``eigvalsh`` in float64, where it costs about as little;
    - ``seed``: seed of the random vectors when no generator is passed;
    - ``median_pairs``: with the ``"median"`` bandwidth and at least
      :data:`SAMPLED_MEDIAN_MIN_TOKENS` tokens (:data:`SAMPLED_MEDIAN_MIN_TOKENS_CPU` on
      CPU), the median is estimated from this many
      random pairs of the distance matrix
      (:func:`~unifyreg.estimators.kernel.sampled_median_bandwidth`, drawn with ``seed``)
      instead of ranking all ``n (n - 1) / 2``; 0 = the exact median.

    The defaults meet the documented error bound (see :func:`renyi_entropy_slq`). Cost
    per sequence: about ``n^2 * (deflation_rank * (power_iterations + 1 + 4) +
    num_probes * lanczos_steps)`` multiply-adds after the Gram, versus ``~ 4/3 n^3`` for
    ``eigvalsh``.
    """

    num_probes: int = 8
    deflation_rank: int = 16
    lanczos_steps: int = 12
    power_iterations: int = 2
    exact_max_tokens: int = 256
    seed: int = 0
    median_pairs: int = 1 << 20

    def __post_init__(self) -> None:
        minimum = {
            "num_probes": 1,
            "deflation_rank": 0,
            "lanczos_steps": 2,
            "power_iterations": 1,
            "exact_max_tokens": 0,
            "median_pairs": 0,
        }
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SLQSettings.{name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"SLQSettings.seed must be an integer, got {self.seed!r}")


def check_settings(settings: SLQSettings | None) -> SLQSettings:
    """``settings``, or ``SLQSettings()`` for None; TypeError for anything else."""
    if settings is None:
        return SLQSettings()
    if not isinstance(settings, SLQSettings):
        raise TypeError(f"settings must be an SLQSettings, got {type(settings).__name__}")
    return settings


def _slq_function(alpha: float):
    """``g`` with ``tr g(A)`` the small quantity: ``x^alpha - x`` (alpha != 1), ``x ln x``."""
    if alpha == 1.0:

        def g(x: Tensor) -> Tensor:
            positive = x > 0
            return torch.where(positive, x * torch.log(torch.where(positive, x, 1.0)), 0.0)

        return g
    return lambda x: x**alpha - x


def _orthonormal_rows(Y: Tensor) -> Tensor:
    """Orthonormal rows (float64) spanning the rows of ``Y`` ``[B, k, n]``, by the
    eigendecomposition of ``Y Y^T``, twice for accuracy. Directions with no weight are
    zero rows, so the result has no support where every row of ``Y`` is zero."""
    Q = Y.to(torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    for _ in range(2):
        S, U = torch.linalg.eigh(Q @ Q.transpose(-1, -2))
        keep = S > _DEFLATION_RANK_TOL * S.amax(-1, keepdim=True).clamp_min(tiny)
        scale = torch.where(keep, S.clamp_min(tiny).rsqrt(), torch.zeros((), dtype=S.dtype))
        Q = (U * scale.unsqueeze(-2)).transpose(-1, -2) @ Q
    return Q


def _lanczos_quadrature(A: Tensor, V: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Quadrature of ``v^T f(A) v`` for every start row ``v`` of ``V`` ``[B, c, n]``.

    Runs ``steps`` Lanczos steps per row at once (one ``[c, n] x [n, n]`` matmul per step,
    full reorthogonalisation) and returns nodes and weights ``[B, c, 2 * steps + 1]``
    (float64) of the average of the Gauss rule (``steps`` nodes) and the Gauss-Radau rule
    with a node fixed at 0 (``steps + 1`` nodes; A is PSD): ``sum_k w_k f(t_k)``. For the
    functions used here the two rules err in opposite directions, so the average is much
    more accurate than either. Both are exact for polynomials of degree <= 2 * steps - 1,
    so ``sum w t = v^T A v`` and ``sum w t^2 = |A v|^2``.
    """
    batch, c, n = V.shape
    f64 = torch.float64
    norms = torch.linalg.vector_norm(V, dim=-1)
    zero = torch.zeros((), dtype=V.dtype, device=V.device)
    tiny = torch.finfo(V.dtype).tiny
    q = torch.where(norms[..., None] > 0, V / norms.clamp_min(tiny)[..., None], zero)
    basis = V.new_zeros(batch, c, steps, n)
    alphas = torch.zeros(batch, c, steps, dtype=f64, device=V.device)
    betas = torch.zeros(batch, c, steps, dtype=f64, device=V.device)
    q_prev = torch.zeros_like(q)
    beta_prev = V.new_zeros(batch, c)
    # A is PSD with trace 1, so ||A||_2 <= 1; a residual below this is round-off.
    breakdown = 16 * torch.finfo(V.dtype).eps * math.sqrt(n)
    for i in range(steps):
        basis[:, :, i] = q
        w = q @ A
        a = (w * q).sum(-1)
        alphas[..., i] = a.to(f64)
        w = w - a[..., None] * q - beta_prev[..., None] * q_prev
        done = basis[:, :, : i + 1]
        w = w - ((done @ w[..., None]).transpose(-1, -2) @ done).squeeze(-2)
        b = torch.linalg.vector_norm(w, dim=-1)
        b = torch.where(b > breakdown * (a.abs() + beta_prev.abs()).clamp_min(1e-30), b, zero)
        betas[..., i] = b.to(f64)
        q_prev = q
        q = torch.where(b[..., None] > 0, w / b.clamp_min(tiny)[..., None], zero)
        beta_prev = b
    off = betas[..., :-1]
    T = torch.diag_embed(alphas) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    theta, U = torch.linalg.eigh(T)
    theta = theta.clamp_min(0.0)
    weight = norms.to(f64)[..., None] ** 2
    gauss_w = weight * U[..., 0, :] ** 2
    # Gauss-Radau (Golub & Meurant): extend T by beta_s and alpha' = a + delta_s, where
    # (T - a I) delta = beta_s^2 e_s; a = -eps (just below 0) keeps T - a I invertible.
    scale = alphas.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    eps = 1e-10 * scale
    beta_s = betas[..., -1:]
    inverse_ss = (U[..., -1, :] ** 2 / (theta + eps)).sum(-1, keepdim=True)
    radau_alpha = -eps + beta_s**2 * inverse_ss
    T_radau = torch.zeros(batch, c, steps + 1, steps + 1, dtype=f64, device=V.device)
    T_radau[..., :steps, :steps] = T
    T_radau[..., steps, steps] = radau_alpha[..., 0]
    T_radau[..., steps, steps - 1] = beta_s[..., 0]
    T_radau[..., steps - 1, steps] = beta_s[..., 0]
    finite = torch.isfinite(T_radau).all(-1).all(-1)
    T_radau = torch.where(finite[..., None, None], T_radau, 0.0)
    theta_r, U_r = torch.linalg.eigh(T_radau)
    radau_w = weight * U_r[..., 0, :] ** 2
    # Where the Radau extension is not finite (degenerate T), use Gauss twice.
    nodes = torch.cat([theta, torch.where(finite[..., None], theta_r.clamp_min(0.0), 0.0)], -1)
    gauss_half = torch.where(finite[..., None], 0.5 * gauss_w, gauss_w)
    radau_half = torch.where(finite[..., None], 0.5 * radau_w, 0.0)
    return nodes, torch.cat([gauss_half, radau_half], -1)


def _projected_moments(
    A: Tensor, Q: Tensor | None = None, QA: Tensor | None = None, block_rows: int = 1024
) -> tuple[Tensor, Tensor]:
    """``tr(P A)`` and ``||P A||_F^2 = tr(P A^2 P)`` (float64 ``[B]``), ``P = I - Q^T Q``.

    Formed row block by row block from the residual ``P A = A - Q^T (Q A)`` rather than as
    ``tr A - tr(Q A Q^T)``: when the deflated directions hold nearly all of ``||A||_F^2``
    the difference of the two large terms would lose every digit in float32. Row sums are
    taken in ``A``'s dtype and summed in float64. Temporary memory: one ``[B, block, n]``.
    """
    f64 = torch.float64
    n = A.shape[-1]
    trace = torch.zeros(A.shape[0], dtype=f64, device=A.device)
    frobenius_sq = torch.zeros_like(trace)
    for start in range(0, n, block_rows):
        rows = slice(start, min(start + block_rows, n))
        R = A[:, rows, :]
        if Q is not None:
            R = torch.baddbmm(R, Q[:, :, rows].transpose(-1, -2), QA, alpha=-1.0)
        trace += torch.diagonal(R, offset=start, dim1=-2, dim2=-1).to(f64).sum(-1)
        frobenius_sq += (torch.linalg.vector_norm(R, dim=-1).to(f64) ** 2).sum(-1)
    return trace, frobenius_sq


def _slq_trace(A: Tensor, g, settings: SLQSettings, omega: Tensor, probes: Tensor) -> Tensor:
    """``tr g(A)`` ``[B]`` (float64) of trace-normalised PSD Grams ``A`` ``[B, n, n]``.

    Hutch++-style: ``tr g(A) = tr(Q g(A) Q^T) + tr(P g(A) P)`` with ``Q`` the (near)
    top-``deflation_rank`` eigen-directions from subspace iteration started at ``omega``
    ``[k, n]``, and ``P = I - Q^T Q``. The first term is a sum over Ritz vectors (Lanczos
    quadrature); the second is Hutchinson's estimator over the projected ``probes``
    ``[m, n]`` with a quadratic control variate: ``g(x) = h(x) + c1 x + c2 x^2`` where
    ``E[p^T A p] = tr A - tr(Q A Q^T)`` and ``E[p^T A^2 p] = ||A||_F^2 - ||Q A||_F^2`` are
    known exactly, so only ``h`` (small on the deflated spectrum) is estimated
    stochastically. ``c`` is the weighted least-squares fit of ``g`` on the probes'
    quadrature nodes. Unbiased up to quadrature error and the O(1/m) bias of fitting ``c``.
    """
    f64 = torch.float64
    batch, n, _ = A.shape
    valid = torch.diagonal(A, dim1=-2, dim2=-1) > 0
    total = torch.zeros(batch, dtype=f64, device=A.device)
    E1, E2 = _projected_moments(A)
    P_rows = None
    k = omega.shape[0]
    if k > 0:
        Q = _orthonormal_rows(omega.to(A.dtype).expand(batch, k, n) @ A)
        for _ in range(settings.power_iterations - 1):
            Q = _orthonormal_rows(Q.to(A.dtype) @ A)
        Qc = Q.to(A.dtype)
        QA = Qc @ A
        H = QA.to(f64) @ Q.transpose(-1, -2)
        H = 0.5 * (H + H.transpose(-1, -2))
        E1, E2 = _projected_moments(A, Qc, QA)
        # Dropped (zero) rows get a distinct Ritz value so eigh cannot mix them with others.
        dropped = Q.abs().sum(-1) == 0
        H = H - torch.diag_embed(dropped.to(f64))
        _, U = torch.linalg.eigh(H)
        ritz = (U.transpose(-1, -2) @ Q).to(A.dtype)
        ritz_steps = min(RITZ_LANCZOS_STEPS, settings.lanczos_steps)
        nodes, weights = _lanczos_quadrature(A, ritz, ritz_steps)
        total = total + (weights * g(nodes)).sum((-2, -1))
        P_rows = Qc
    m = probes.shape[0]
    V = probes.to(A.dtype).expand(batch, m, n) * valid.unsqueeze(-2).to(A.dtype)
    if P_rows is not None:
        for _ in range(2):  # twice: orthogonal to Q to working precision
            V = V - (V @ P_rows.transpose(-1, -2)) @ P_rows
    nodes, weights = _lanczos_quadrature(A, V, settings.lanczos_steps)
    values = g(nodes)
    # Weighted least squares of g on (u, u^2), u = nodes / scale, over all probes' nodes.
    scale = nodes.flatten(1).amax(-1).clamp_min(1e-300)[:, None, None]
    u = nodes / scale
    w = weights
    M11, M12, M22 = (w * u * u).sum((1, 2)), (w * u**3).sum((1, 2)), (w * u**4).sum((1, 2))
    r1, r2 = (w * u * values).sum((1, 2)), (w * u * u * values).sum((1, 2))
    ridge = 1e-12 * (M11 + M22) + 1e-300
    M11, M22 = M11 + ridge, M22 + ridge
    det = M11 * M22 - M12 * M12
    c1 = (M22 * r1 - M12 * r2) / det
    c2 = (M11 * r2 - M12 * r1) / det
    s = scale[:, 0, 0]
    c1, c2 = c1 / s, c2 / s**2
    residual = values - c1[:, None, None] * nodes - c2[:, None, None] * nodes**2
    stochastic = (weights * residual).sum((1, 2)) / m
    return total + stochastic + c1 * E1 + c2 * E2


def _entropy_from_trace(trace_g: Tensor, alpha: float, base: float, counts: Tensor) -> Tensor:
    if alpha == 1.0:
        nats = -trace_g
    else:
        power_sum = (1.0 + trace_g).clamp_min(torch.finfo(trace_g.dtype).tiny)
        nats = torch.log(power_sum) / (1.0 - alpha)
    max_nats = torch.log(counts.to(nats.dtype).clamp_min(1.0))
    return torch.minimum(nats.clamp_min(0.0), max_nats) / math.log(base)


def _slq_draws(n: int, settings: SLQSettings, generator, dtype, device) -> tuple[Tensor, Tensor]:
    """Deflation start block ``[k, n]`` and probes ``[m, n]`` of Rademacher signs, drawn
    together as one ``[n, k + m]`` block so that the first ``n'`` tokens get the same signs
    for any length ``n >= n'``: trailing padding is then neutral (a padded sequence gets
    the estimate of the trimmed one, to round-off)."""
    gen = as_generator(settings.seed if generator is None else generator)
    k, m = settings.deflation_rank, settings.num_probes
    draw = torch.randint(0, 2, (n, k + m), generator=gen, dtype=torch.int8)
    signs = (draw.to(dtype) * 2 - 1).T.contiguous().to(device)
    return signs[:k], signs[k:]


def _renyi_from_gram_slq(
    K: Tensor, alpha: float, base: float, settings: SLQSettings, omega: Tensor, probes: Tensor
) -> Tensor:
    """Entropy ``[B]`` of Grams ``K`` ``[B, n, n]`` (consumed: normalised in place)."""
    n = K.shape[-1]
    if alpha == 2.0 or n <= settings.exact_max_tokens:
        return renyi_entropy_exact(K.to(torch.float64), alpha, base)
    trace = torch.diagonal(K, dim1=-2, dim2=-1).sum(-1)
    if torch.any(trace <= 0):
        raise ValueError("K has a sequence with zero trace (no valid token): entropy undefined")
    counts = (torch.diagonal(K, dim1=-2, dim2=-1) > 0).sum(-1)
    A = K.div_(trace[:, None, None])
    trace_g = _slq_trace(A, _slq_function(alpha), settings, omega[:, :n], probes[:, :n])
    return _entropy_from_trace(trace_g, alpha, base, counts)


def _gram_no_grad(
    Z: Tensor, sigma: Bandwidth, mask: Tensor | None, settings: SLQSettings
) -> Tensor:
    """The Gaussian Gram of ``[B, n, d]`` without gradient, built in place; the median
    bandwidth from ``settings.median_pairs`` random pairs from
    :data:`SAMPLED_MEDIAN_MIN_TOKENS` tokens (:data:`SAMPLED_MEDIAN_MIN_TOKENS_CPU` on
    CPU)."""
    cpu = Z.device.type == "cpu"
    threshold = SAMPLED_MEDIAN_MIN_TOKENS_CPU if cpu else SAMPLED_MEDIAN_MIN_TOKENS
    pairs = settings.median_pairs if Z.shape[-2] >= threshold else 0
    with torch.no_grad():
        D = sq_distances_no_grad(Z, mask)
        return gram_from_sq_distances_(
            D, sigma, mask, Z.shape[-1], median_pairs=pairs, seed=settings.seed
        )


@torch.no_grad()
def renyi_entropy_slq(
    K: Tensor,
    alpha: float,
    base: float,
    settings: SLQSettings,
    generator: torch.Generator | int | None,
) -> Tensor:
    """Entropy ``[...]`` (float64) of PSD Grams ``K`` ``[..., n, n]`` by SLQ (module
    docstring); ``K`` is left unchanged."""
    batch_shape, n = K.shape[:-2], K.shape[-1]
    omega, probes = _slq_draws(n, settings, generator, K.dtype, K.device)
    flat = K.detach().reshape(-1, n, n).clone()
    return _renyi_from_gram_slq(flat, alpha, base, settings, omega, probes).reshape(batch_shape)


@torch.no_grad()
def entropy_slq(
    Z: Tensor,
    mask: Tensor | None,
    alpha: float,
    sigma: Bandwidth,
    base: float,
    settings: SLQSettings,
    generator: torch.Generator | int | None,
    max_gram_bytes: int | None,
) -> Tensor:
    """Entropy ``[...]`` of prepared sequences ``Z`` ``[..., n, d]`` (cast to the Gram's
    dtype, finite): SLQ on each chunk's Gram; exact (float64) for alpha = 2 or short
    sequences. The random vectors are drawn once per call, so the result does not depend
    on the chunking. (The entries send alpha = 2 and short sequences to the exact path.)"""
    batch_shape, (n, d) = Z.shape[:-2], Z.shape[-2:]
    total = math.prod(batch_shape)
    flat_Z = Z.reshape(total, n, d)
    flat_mask = None if mask is None else mask.reshape(total, n)
    flat_sigma = flat_bandwidth(sigma, batch_shape, Z.dtype, Z.device)
    omega, probes = _slq_draws(n, settings, generator, Z.dtype, Z.device)
    out = []
    for piece in chunks(total, gram_chunk_size(n, Z.element_size(), max_gram_bytes)):
        K = _gram_no_grad(flat_Z[piece], part(flat_sigma, piece), part(flat_mask, piece), settings)
        out.append(_renyi_from_gram_slq(K, alpha, base, settings, omega, probes))
        del K
    return torch.cat(out).reshape(batch_shape)


@torch.no_grad()
def proxy_slq(
    Z_joint: Tensor,
    mask_joint: Tensor | None,
    n: int,
    alpha: float,
    sigma: Bandwidth,
    base: float,
    settings: SLQSettings,
    generator: torch.Generator | int | None,
    max_gram_bytes: int | None,
) -> Tensor:
    """Proxy ``[...]`` of prepared joint sequences ``[..., n + m, d]`` by SLQ; the prompt
    block reuses the first ``n`` entries of the joint's random vectors (common random
    numbers) and is exact when it has at most ``exact_max_tokens`` tokens."""
    batch_shape, (length, d) = Z_joint.shape[:-2], Z_joint.shape[-2:]
    total = math.prod(batch_shape)
    flat_Z = Z_joint.reshape(total, length, d)
    flat_mask = None if mask_joint is None else mask_joint.reshape(total, length)
    flat_sigma = flat_bandwidth(sigma, batch_shape, Z_joint.dtype, Z_joint.device)
    omega, probes = _slq_draws(length, settings, generator, Z_joint.dtype, Z_joint.device)
    out = []
    for piece in chunks(total, gram_chunk_size(length, Z_joint.element_size(), max_gram_bytes)):
        K = _gram_no_grad(flat_Z[piece], part(flat_sigma, piece), part(flat_mask, piece), settings)
        K_pp = K[:, :n, :n].clone()
        joint = _renyi_from_gram_slq(K, alpha, base, settings, omega, probes)
        del K
        out.append(joint - _renyi_from_gram_slq(K_pp, alpha, base, settings, omega, probes))
    return torch.cat(out).reshape(batch_shape)
