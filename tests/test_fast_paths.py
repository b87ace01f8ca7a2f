"""Issue 20's paths against their references: the exact path's CPU kernels (NumPy's
BLAS/LAPACK, cache-sized chunks) against the torch kernels they replaced (the same values
to 1e-10 bits, gradients untouched), and the sampled median bandwidth of SLQ against the
exact median."""

import pytest
import torch

from unifyreg.estimators import (
    SLQ_ERROR_BOUND,
    Segments,
    SLQSettings,
    TokenBatch,
    blocked,
    conditional_entropy_proxy,
    cpu_linalg,
    gaussian_gram,
    matrix_entropy,
    median_bandwidth,
    pairwise_sq_distances,
    renyi_entropy,
    slq,
)
from unifyreg.estimators.blocked import torch_kernels_only as torch_kernels
from unifyreg.estimators.exact import renyi_entropy_exact
from unifyreg.estimators.kernel import sampled_median_bandwidth
from unifyreg.estimators.slq import SAMPLED_MEDIAN_MIN_TOKENS, SAMPLED_MEDIAN_MIN_TOKENS_CPU

TOLERANCE_BITS = 1e-10


def tokens(*shape, seed=0, scale=None):
    """Seeded float32 tokens with anisotropic feature scales and a repeated token."""
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    scales = torch.arange(1, d + 1, dtype=torch.float32) ** -0.7 if scale is None else scale
    Z = torch.randn(*shape, generator=g) * scales
    Z[..., 1, :] = Z[..., 0, :]  # a repeated token: exactly 0 apart on every path
    return Z


@pytest.fixture(params=[True, False], ids=["numpy-eigvalsh", "torch-eigvalsh"])
def eigen_route(request, monkeypatch):
    """Both eigenvalue routes, whatever this CPU's vendor picks (:data:`NUMPY_EIGVALSH`)."""
    monkeypatch.setattr(cpu_linalg, "NUMPY_EIGVALSH", request.param)
    return request.param


def test_numpy_eigenvalues_only_on_amd_cpus():
    assert cpu_linalg.NUMPY_EIGVALSH == (cpu_linalg.cpu_vendor() == "AuthenticAMD")


def test_without_numpy_eigenvalues_eigvalsh_is_torchs(monkeypatch):
    monkeypatch.setattr(cpu_linalg, "NUMPY_EIGVALSH", False)
    A = gaussian_gram(tokens(2, 200, 16).double(), "median") / 200
    assert torch.equal(cpu_linalg.eigvalsh(A), torch.linalg.eigvalsh(A))


@pytest.mark.parametrize("n", [127, 128, 300])
def test_numpy_kernels_match_torch(n, eigen_route):
    Z = tokens(3, n, 40, seed=n).double()
    Zc = Z - Z.mean(-2, keepdim=True)
    G = cpu_linalg.self_products(Zc)
    if n >= cpu_linalg.NUMPY_MIN_TOKENS:
        assert torch.equal(G, G.mT), "the NumPy product is exactly symmetric"
    assert torch.allclose(G, Zc @ Zc.mT, rtol=1e-12, atol=1e-12)
    A = gaussian_gram(Z, "median") / n
    assert torch.allclose(cpu_linalg.eigvalsh(A), torch.linalg.eigvalsh(A), atol=1e-14, rtol=0)
    assert cpu_linalg.numpy_applies(A, n) == (n >= cpu_linalg.NUMPY_MIN_TOKENS)


def test_numpy_kernels_float32_and_fallbacks(eigen_route):
    A = gaussian_gram(tokens(2, 200, 16).double(), "median").float() / 200
    assert cpu_linalg.eigvalsh(A).dtype == torch.float32
    assert torch.allclose(cpu_linalg.eigvalsh(A), torch.linalg.eigvalsh(A), atol=1e-6)
    assert not cpu_linalg.numpy_applies(A.half(), 200)
    leaf = A.clone().requires_grad_()
    assert not cpu_linalg.numpy_applies(leaf, 200)
    with torch.no_grad():
        assert cpu_linalg.numpy_applies(leaf, 200)


@pytest.mark.parametrize("alpha", [1.0, 1.01, 1.5, 2.0])
@pytest.mark.parametrize("n", [100, 128, 400, 1030])
def test_matrix_entropy_equals_the_torch_kernels(alpha, n, eigen_route):
    layers = 3 if n < 1000 else 1
    Z = tokens(layers, n, 24, seed=n)
    mask = torch.ones(layers, n, dtype=torch.bool)
    mask[0, n - 7 :] = False  # trailing padding on one sequence
    for kwargs in ({}, {"mask": mask}, {"normalize": True}, {"sigma": "silverman"}):
        new = matrix_entropy(Z, alpha=alpha, **kwargs)
        with torch_kernels():
            old = matrix_entropy(Z, alpha=alpha, **kwargs)
        assert (new - old).abs().max() <= TOLERANCE_BITS, (kwargs, new, old)
    # ... and the differentiable composition (Gram, then torch's eigvalsh with autograd).
    reference = renyi_entropy_exact(gaussian_gram(Z.double(), "median"), alpha)
    assert (matrix_entropy(Z, alpha=alpha) - reference).abs().max() <= TOLERANCE_BITS


@pytest.mark.parametrize("n, m", [(90, 60), (300, 200)])
def test_proxy_and_segments_equal_the_torch_kernels(n, m):
    Zp, Zr = tokens(2, n, 32, seed=1), tokens(2, m, 32, seed=2)
    new = conditional_entropy_proxy(Zp, Zr, alpha=1.01)
    with torch_kernels():
        old = conditional_entropy_proxy(Zp, Zr, alpha=1.01)
    assert (new - old).abs().max() <= TOLERANCE_BITS
    # The probe's shared-distance route (one distance matrix per sample, cut into segments).
    hidden = torch.cat([Zp, Zr], dim=1)[None]  # [layers=1, b=2, n + m, d]
    batch = TokenBatch(list(hidden.unbind(0)), torch.ones(2, n + m, dtype=torch.bool))
    index = torch.arange(n + m).expand(2, -1)
    whole = batch.segments(torch.arange(2), index, torch.ones(2, n + m, dtype=torch.bool))
    assert isinstance(whole, Segments) and batch.shares_distances(torch.float64, 2**30)
    shared = matrix_entropy(whole, alpha=1.01, max_gram_bytes=2**30)
    with torch_kernels():
        shared_old = matrix_entropy(whole, alpha=1.01, max_gram_bytes=2**30)
    assert (shared - shared_old).abs().max() <= TOLERANCE_BITS
    direct = matrix_entropy(torch.cat([Zp, Zr], dim=1), alpha=1.01)
    assert (shared[0] - direct).abs().max() <= TOLERANCE_BITS


def test_cpu_chunks_do_not_change_values():
    n = 256  # 512 KiB per float64 Gram: a 1 MiB chunk holds 2 of the 9 sequences
    Z = tokens(9, n, 16)
    saved = blocked.CPU_CHUNK_BYTES
    try:
        blocked.CPU_CHUNK_BYTES = 2**20
        assert blocked.cpu_chunk_bytes(None, Z.device) == 2**20
        assert blocked.cpu_chunk_bytes(2**19, Z.device) == 2**19
        chunked = matrix_entropy(Z)
    finally:
        blocked.CPU_CHUNK_BYTES = saved
    assert torch.equal(chunked, matrix_entropy(Z, max_gram_bytes=2**40))


def test_distances_exactly_symmetric_with_zero_repeats():
    Z = tokens(2, 200, 12).double()
    D = pairwise_sq_distances(Z)
    assert torch.equal(D, D.mT)
    assert torch.all(D[:, 0, 1] == 0) and torch.all(torch.diagonal(D, dim1=-2, dim2=-1) == 0)


@pytest.mark.parametrize("alpha", [1.01, 2.0])
def test_gradients_keep_torch_kernels(alpha):
    """With a gradient to compute nothing goes through NumPy, and the gradient is the
    composition's (the loss's path; ``renyi_entropy`` of a Gram that requires grad too)."""
    Z = tokens(2, 150, 8).double().requires_grad_()
    (grad,) = torch.autograd.grad(matrix_entropy(Z, alpha=alpha).sum(), Z)
    Y = Z.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(
        renyi_entropy_exact(gaussian_gram(Y, "median"), alpha).sum(), Y
    )
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    assert torch.allclose(grad, expected, rtol=1e-8, atol=1e-10)
    K = gaussian_gram(Z.detach(), "median").requires_grad_()
    (grad_K,) = torch.autograd.grad(renyi_entropy(K, alpha=alpha).sum(), K)
    assert torch.isfinite(grad_K).all() and grad_K.abs().max() > 0


# ------------------------------------------------------------ sampled median bandwidth


def test_sampled_median_is_close_to_the_exact_median():
    Z = tokens(4, 600, 48, seed=3).double()
    D = pairwise_sq_distances(Z)
    exact = median_bandwidth(Z)
    for pairs, bound in ((1 << 14, 0.01), (1 << 20, 0.002)):
        sampled = sampled_median_bandwidth(D, None, pairs, generator=1)
        assert ((sampled - exact) / exact).abs().max() < bound, (pairs, sampled, exact)
    # More pairs, smaller error (on average over seeds).
    few = torch.stack([sampled_median_bandwidth(D, None, 256, s) for s in range(8)])
    many = torch.stack([sampled_median_bandwidth(D, None, 1 << 16, s) for s in range(8)])
    assert ((many - exact).abs().mean()) < ((few - exact).abs().mean())


def test_sampled_median_ignores_padding_and_batch_position():
    Z = tokens(3, 300, 16, seed=4).double()
    mask = torch.ones(3, 300, dtype=torch.bool)
    mask[1, 250:] = False  # trailing padding
    mask[2, ::3] = False  # scattered padding
    D = pairwise_sq_distances(Z, mask)

    def alone(tokens_):
        return sampled_median_bandwidth(pairwise_sq_distances(tokens_[None]), None, 5000, 7)[0]

    both = sampled_median_bandwidth(D, mask, 5000, generator=7)
    assert torch.allclose(both[1], alone(Z[1, :250]), rtol=1e-12)
    assert torch.allclose(both[2], alone(Z[2][mask[2]]), rtol=1e-12)
    assert torch.equal(both[0], sampled_median_bandwidth(D[:1], None, 5000, generator=7)[0])
    # Deterministic per seed; other seeds give other (close) values.
    assert torch.equal(both, sampled_median_bandwidth(D, mask, 5000, generator=7))
    assert not torch.equal(both, sampled_median_bandwidth(D, mask, 5000, generator=8))
    one = torch.zeros(2, 300, dtype=torch.bool)
    one[:, 0] = True
    assert torch.equal(sampled_median_bandwidth(D[:2], one, 64), torch.ones(2, dtype=D.dtype))
    with pytest.raises(ValueError, match="pairs"):
        sampled_median_bandwidth(D, None, 0)


def test_slq_with_the_sampled_median_meets_its_bound(monkeypatch):
    """From SAMPLED_MEDIAN_MIN_TOKENS tokens SLQ's median comes from a sample of pairs:
    still within SLQ_ERROR_BOUND of the exact entropy, and close to SLQ with the exact
    median (the sample moves H by far less than the bound). The threshold is lowered to
    1024 tokens here to keep the exact reference fast; on CPU its own threshold applies
    (NumPy's exact selection is cheaper than the sample up to ~5000 tokens)."""
    assert SAMPLED_MEDIAN_MIN_TOKENS_CPU > SAMPLED_MEDIAN_MIN_TOKENS >= 1024
    monkeypatch.setattr(slq, "SAMPLED_MEDIAN_MIN_TOKENS", 1024)
    n = 1100
    Z = tokens(2, n, 32, seed=5)
    exact = matrix_entropy(Z, alpha=1.01)
    full = matrix_entropy(Z, alpha=1.01, method="slq", settings=SLQSettings(median_pairs=0))
    assert torch.equal(matrix_entropy(Z, alpha=1.01, method="slq"), full)  # CPU: exact median
    monkeypatch.setattr(slq, "SAMPLED_MEDIAN_MIN_TOKENS_CPU", 1024)
    sampled = matrix_entropy(Z, alpha=1.01, method="slq")
    relative, absolute = SLQ_ERROR_BOUND
    assert torch.all((sampled - exact).abs() <= relative * exact + absolute)
    assert torch.all((sampled - full).abs() <= 0.1 * relative * exact)  # <= 0.1 % of H
    assert not torch.equal(sampled, full)  # the sample is used
    proxy = conditional_entropy_proxy(Z[:, :300], Z[:, 300:], alpha=1.01, method="slq")
    proxy_exact = conditional_entropy_proxy(Z[:, :300], Z[:, 300:], alpha=1.01)
    assert torch.all((proxy - proxy_exact).abs() <= relative * exact + absolute)
    with pytest.raises(ValueError, match="median_pairs"):
        SLQSettings(median_pairs=-1)


# ------------------------------------------- the loss's order-2 path: medians by selection


def _tie_heavy(batch, n, seed):
    """Exactly symmetric ``[batch, n, n]`` squared distances with a zero diagonal whose
    values are small integers: every median is tied many times over, zeros included."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randint(0, 6, (batch, n, n), generator=g).double()
    D = torch.triu(D, diagonal=1)
    return D + D.mT


def _masks(n):
    """A prefix, a contiguous non-prefix run, scattered tokens, one token, none."""
    masks = torch.zeros(5, n, dtype=torch.bool)
    masks[0, : n - 7] = True
    masks[1, 5 : n - 3] = True
    masks[2] = torch.arange(n) % 3 != 1
    masks[3, 4] = True
    return masks


def test_median_pair_is_nanmedian_and_its_first_tied_position():
    from unifyreg.estimators.kernel import median_pair

    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (6, 41), generator=g).double()
    valid = torch.rand(6, 41, generator=g) > 0.3
    valid[4] = False
    median, index = median_pair(values, valid)
    reference = torch.nanmedian(values.masked_fill(~valid, float("nan")), dim=-1).values
    assert torch.equal(median.isnan(), reference.isnan())
    assert torch.equal(median[:4], reference[:4]) and torch.equal(median[5:], reference[5:])
    assert index[4] == -1 and median[4].isnan()
    for b in (0, 1, 2, 3, 5):
        hits = torch.nonzero(valid[b] & (values[b] == median[b])).flatten()
        assert index[b] == hits[0], "the first valid position holding the median"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_median_pairs_of_symmetric_equal_the_gathered_pairs_bit_for_bit(dtype):
    from unifyreg.estimators.kernel import median_pair, median_pairs_of_symmetric

    n = 140
    masks = _masks(n)
    rows, cols = torch.triu_indices(n, n, offset=1)
    for seed, D in enumerate([_tie_heavy(5, n, 1), _tie_heavy(5, n, 2) * 0]):  # all-zero too
        D = D.to(dtype)
        median, at = median_pairs_of_symmetric(D, masks)
        ref, ref_at = median_pair(D[:, rows, cols], masks[:, rows] & masks[:, cols])
        assert torch.equal(median.isnan(), ref.isnan()), seed
        ok = ~ref.isnan()
        assert torch.equal(median[ok], ref[ok]), seed
        first = ref_at.clamp_min(0)
        assert torch.equal(at, torch.where(ref_at >= 0, rows[first] * n + cols[first], -1)), seed
    assert at[3] == -1 and at[4] == -1  # one token, none: no pair


def _order2_pair(Z, mask, sigma):
    """``(fast, reference)`` entropies and gradients of ``Z`` (float64): the loss's
    hand-written path against autograd through the generic composition."""
    from unifyreg.estimators.exact import renyi_entropy_exact

    weights = torch.linspace(-1.0, 2.0, Z.shape[0], dtype=Z.dtype)
    fast_in = Z.clone().requires_grad_()
    fast = matrix_entropy(fast_in, 2.0, sigma, mask=mask)
    (fast * weights).sum().backward()
    ref_in = Z.clone().requires_grad_()
    ref = renyi_entropy_exact(gaussian_gram(ref_in, sigma, mask), 2.0, 2.0)
    (ref * weights).sum().backward()
    return fast, ref, fast_in.grad, ref_in.grad


@pytest.mark.parametrize("sigma", ["median_differentiable", "median"])
@pytest.mark.parametrize("repeats", [False, True])
def test_order2_path_above_the_numpy_threshold_matches_the_composition(sigma, repeats):
    # From 128 tokens: NumPy's symmetric products, medians by selection, the round-off
    # cut masked in the backward only where a valid pair has one (repeats=True).
    n = cpu_linalg.NUMPY_MIN_TOKENS + 12
    g = torch.Generator().manual_seed(7)
    Z = torch.randn(4, n, 24, dtype=torch.float64, generator=g) + 2.0
    if repeats:
        Z[0, 3:9] = Z[0, 2]  # tied zero distances, cut to 0
        Z[2, 10] = Z[2, 40]
    fast, ref, grad, ref_grad = _order2_pair(Z[:4], _masks(n)[:4], sigma)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert grad[:3].abs().max() > 1e-3  # a real gradient was compared


@pytest.mark.parametrize("n", [30, 300, 700])
def test_block_medians_by_selection_equal_torch_median_of_the_pairs(n):
    # Both selections (NumPy's on CPU, kthvalue's elsewhere), whole and bracketed,
    # on distinct values and on heavy ties (the bracket's fallback).
    from unifyreg.estimators.kernel import (
        _block_median,
        _block_median_torch,
        lower_median_of_pairs,
    )

    rows, cols = torch.triu_indices(n, n, offset=1)
    Z = tokens(n, 8, seed=n).double()
    for D in (pairwise_sq_distances(Z), _tie_heavy(1, n, n)[0]):
        want = D[rows, cols].median()
        assert torch.equal(lower_median_of_pairs(D), want)
        assert torch.equal(_block_median_torch(D), want)
        value, at = _block_median(D.numpy(), with_position=True)
        assert value == want.item()
        assert at == int(rows[torch.nonzero(D[rows, cols] == want)[0, 0]]) * n + int(
            cols[torch.nonzero(D[rows, cols] == want)[0, 0]]
        )
