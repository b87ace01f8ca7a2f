"""Tests of the approximate (SLQ), bounded-memory and subsampling paths of unifyreg.estimators.

The documented error bound under test: with the default ``SLQSettings``, the SLQ entropy
is within 1 % (relative) of the exact one for alpha >= 1 and n >= 512, on seeded inputs
with very different spectra.
"""

import math

import pytest
import torch

from unifyreg.estimators import (
    SLQ_ERROR_BOUND,
    SLQSettings,
    conditional_entropy_proxy,
    gaussian_gram,
    gram_chunk_size,
    matrix_entropy,
    median_bandwidth,
    renyi_entropy,
    subsample_tokens,
)
from unifyreg.estimators.kernel import median_bandwidth_by_selection as median_by_selection
from unifyreg.estimators.kernel import sq_distances_no_grad


def differentiable(estimator, *tensors, **kwargs):
    """The estimator's autograd path (a gradient requested), detached: the reference the
    no-gradient paths must equal to round-off."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    return estimator(*leaves, **kwargs).detach()


DOCUMENTED_RELATIVE_ERROR = 0.01


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for this module: on a shared 2-core machine, 2 OpenMP threads
    stall for seconds whenever another process holds a core (eigvalsh of 512 x 512: 0.02 s
    with one thread, up to 8 s with two under load). Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def sequences(kind: str, n: int, d: int = 64, seed: int = 0) -> tuple[torch.Tensor, object]:
    """One ``[n, d]`` sequence with a characteristic Gram spectrum, and its bandwidth."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    sigma: object = "median"
    if kind == "isotropic":  # one large eigenvalue (the mean), a Marchenko-Pastur bulk
        Z = randn(n, d)
    elif kind == "low_rank":  # tokens on an 8-dim subspace, small noise
        Z = randn(n, 8) @ randn(8, d) + 0.05 * randn(n, d)
    elif kind == "clustered":  # 20 noisy clusters
        Z = 3 * randn(20, d)[torch.arange(n) % 20] + randn(n, d)
    elif kind == "near_identity":  # a small fixed bandwidth: K close to I
        Z = randn(n, d)
        sigma = 0.3 * float(median_bandwidth(Z))
    elif kind == "anisotropic":  # power-law feature scales, shared massive activations
        Z = randn(n, d) * torch.arange(1, d + 1, dtype=torch.float64) ** -0.7
        Z = Z + 20 * randn(1, d) * (torch.arange(d) < 3) + 0.5 * randn(n, 4) @ randn(4, d)
    elif kind == "collapsed":  # nearly identical tokens, rescaled by the median bandwidth
        Z = randn(1, d) + 1e-3 * randn(n, d)
    elif kind == "low_entropy":  # a large fixed bandwidth: K close to rank one, H ~ 0.01 bit
        Z = randn(n, d)
        sigma = 30 * float(median_bandwidth(Z))
    else:
        raise ValueError(kind)
    return Z, sigma


KINDS = [
    "isotropic",
    "low_rank",
    "clustered",
    "near_identity",
    "anisotropic",
    "collapsed",
    "low_entropy",
]


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((approx - exact).abs() / exact.abs()).max())


def within_documented_bound(approx: torch.Tensor, exact: torch.Tensor) -> bool:
    relative, absolute_bits = SLQ_ERROR_BOUND
    return bool(torch.all((approx - exact).abs() <= relative * exact.abs() + absolute_bits))


# ---------------------------------------------------------------- documented error


def test_documented_bound_is_one_percent_plus_a_tenth_of_a_millibit():
    assert SLQ_ERROR_BOUND == (DOCUMENTED_RELATIVE_ERROR, 1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [300, 512, 768])
def test_slq_meets_documented_error_bound(kind, n):
    Z, sigma = sequences(kind, n)
    for alpha in (1.0, 1.01, 1.5):
        exact = matrix_entropy(Z, alpha=alpha, sigma=sigma)
        for seed in range(3):
            approx = matrix_entropy(Z, alpha=alpha, sigma=sigma, generator=seed, method="slq")
            assert within_documented_bound(approx, exact), (alpha, seed, approx, exact)


def test_slq_is_much_more_accurate_than_the_bound_on_typical_inputs():
    # Not the contract, a regression guard: typical errors are ~0.1 %.
    Z = torch.stack([sequences(kind, 640, seed=1)[0] for kind in ("isotropic", "low_rank")])
    assert relative_error(matrix_entropy(Z, method="slq"), matrix_entropy(Z)) <= 0.003


def test_slq_on_a_gram_matches_exact_renyi_entropy_in_any_base():
    Z, _ = sequences("clustered", 600)
    K = gaussian_gram(Z)
    for base in (2.0, math.e):
        exact = renyi_entropy(K, alpha=1.01, base=base)
        approx = renyi_entropy(K, alpha=1.01, base=base, method="slq")
        assert relative_error(approx, exact) <= DOCUMENTED_RELATIVE_ERROR
    float32 = renyi_entropy(K.float(), alpha=1.01, method="slq")
    assert float32.dtype == torch.float64
    assert relative_error(float32, renyi_entropy(K, alpha=1.01)) <= DOCUMENTED_RELATIVE_ERROR


def test_slq_extremes_identical_and_far_apart_tokens():
    settings = SLQSettings(exact_max_tokens=0)
    identical = torch.ones(2, 600, 600, dtype=torch.float64)
    assert renyi_entropy(identical, settings=settings, method="slq").abs().max() <= 1e-3
    far_apart = torch.eye(600, dtype=torch.float64)
    H = renyi_entropy(far_apart, settings=settings, method="slq")
    assert H.item() == pytest.approx(math.log2(600), rel=1e-6)


def test_conditional_proxy_slq_within_sum_of_entropy_bounds():
    Zp, _ = sequences("anisotropic", 400, seed=2)
    noise = torch.randn(300, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for Zr in (Zp[:300] + 0.1 * noise, noise):
        exact = conditional_entropy_proxy(Zp, Zr)
        approx = conditional_entropy_proxy(Zp, Zr, method="slq")
        bound = (
            DOCUMENTED_RELATIVE_ERROR * (matrix_entropy(torch.cat([Zp, Zr])) + matrix_entropy(Zp))
            + 2 * SLQ_ERROR_BOUND[1]
        )
        assert (approx - exact).abs() <= bound


def test_alpha_two_and_short_sequences_are_exact():
    Z = torch.randn(3, 300, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(
        matrix_entropy(Z, alpha=2.0, method="slq"), matrix_entropy(Z, alpha=2.0)
    )
    torch.testing.assert_close(
        matrix_entropy(Z, settings=SLQSettings(exact_max_tokens=300), method="slq"),
        matrix_entropy(Z),
        rtol=0,
        atol=1e-9,
    )


# ---------------------------------------------------------------- determinism and batching


def test_slq_is_deterministic_under_a_seed():
    Z, _ = sequences("low_rank", 600)
    first = matrix_entropy(Z, generator=5, method="slq")
    assert torch.equal(first, matrix_entropy(Z, generator=5, method="slq"))
    assert torch.equal(
        first, matrix_entropy(Z, generator=torch.Generator().manual_seed(5), method="slq")
    )
    assert torch.equal(first, matrix_entropy(Z, settings=SLQSettings(seed=5), method="slq"))
    assert not torch.equal(first, matrix_entropy(Z, generator=6, method="slq"))


def test_slq_trailing_padding_gives_the_trimmed_estimate():
    Z = torch.randn(2, 3, 700, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lengths = [700, 520, 611]
    mask = torch.arange(700)[None, :] < torch.tensor(lengths)[:, None]
    padded = matrix_entropy(Z, mask=mask.expand(2, 3, 700), normalize=True, method="slq")
    for b, length in enumerate(lengths):
        trimmed = matrix_entropy(Z[:, b, :length], normalize=True, method="slq")
        torch.testing.assert_close(padded[:, b], trimmed, rtol=1e-4, atol=1e-6)


def test_slq_arbitrary_mask_stays_within_the_bound():
    Z, _ = sequences("clustered", 900, seed=4)
    mask = torch.rand(900, generator=torch.Generator().manual_seed(0)) < 0.7
    exact = matrix_entropy(Z, mask=mask)
    assert (
        relative_error(matrix_entropy(Z, mask=mask, method="slq"), exact)
        <= DOCUMENTED_RELATIVE_ERROR
    )


def test_slq_batch_and_chunking_do_not_change_values():
    Z = torch.stack([sequences(kind, 600)[0] for kind in ("isotropic", "clustered", "low_rank")])
    together = matrix_entropy(Z, method="slq")
    one_by_one = torch.stack([matrix_entropy(z, method="slq") for z in Z])
    chunked = matrix_entropy(Z, max_gram_bytes=1, method="slq")  # one sequence per chunk
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=0)
    torch.testing.assert_close(together, chunked, rtol=1e-5, atol=0)


def test_slq_proxy_padding_and_normalisation():
    g = torch.Generator().manual_seed(2)
    Zp = torch.randn(2, 500, 16, generator=g, dtype=torch.float64)
    Zr = torch.randn(2, 200, 16, generator=g, dtype=torch.float64)
    mask_r = torch.ones(2, 200, dtype=torch.bool)
    mask_r[1, 150:] = False
    padded = conditional_entropy_proxy(Zp, Zr, mask_r=mask_r, normalize=True, method="slq")
    exact = conditional_entropy_proxy(Zp, Zr, mask_r=mask_r, normalize=True)
    assert padded.shape == (2,)
    assert (padded - exact).abs().max() <= 0.01


def test_slq_has_no_gradient_and_refuses_to_pretend():
    Z = torch.randn(600, 8, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        H = matrix_entropy(Z, method="slq")
        proxy = conditional_entropy_proxy(Z[:300], Z[300:], method="slq")
    assert not H.requires_grad and not proxy.requires_grad
    for call in (
        lambda: matrix_entropy(Z, method="slq"),
        lambda: conditional_entropy_proxy(Z[:300], Z[300:], method="slq"),
        lambda: renyi_entropy(gaussian_gram(Z), method="slq"),
    ):
        with pytest.raises(ValueError, match="no gradient.*method='exact'"):
            call()


def test_slq_nan_policy():
    Z = torch.randn(3, 600, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Z[1, 7, 2] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        matrix_entropy(Z, method="slq")
    H = matrix_entropy(Z, nan_policy="propagate", method="slq")
    assert torch.isnan(H).tolist() == [False, True, False]


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_probes": 0},
        {"deflation_rank": -1},
        {"lanczos_steps": 1},
        {"power_iterations": 0},
        {"exact_max_tokens": -1},
        {"num_probes": 2.5},
        {"seed": "zero"},
    ],
)
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError, match="SLQSettings"):
        SLQSettings(**kwargs)


def test_bad_arguments_raise_clear_errors():
    Z = torch.randn(600, 8)
    with pytest.raises(ValueError, match="alpha"):
        matrix_entropy(Z, alpha=0.0, method="slq")
    with pytest.raises(ValueError, match="base"):
        matrix_entropy(Z, base=1.0, method="slq")
    with pytest.raises(ValueError, match="max_gram_bytes"):
        matrix_entropy(Z, max_gram_bytes=0, method="slq")
    with pytest.raises(ValueError, match="mask"):
        matrix_entropy(Z, mask=torch.ones(5, dtype=torch.bool), method="slq")
    with pytest.raises(ValueError, match="no valid token"):
        matrix_entropy(Z, mask=torch.zeros(600, dtype=torch.bool), method="slq")
    with pytest.raises(ValueError, match="bandwidth"):
        matrix_entropy(Z, sigma=-1.0, method="slq")
    with pytest.raises(ValueError, match="shape"):
        renyi_entropy(torch.ones(3, 4), method="slq")
    with pytest.raises(ValueError, match="share batch dims"):
        conditional_entropy_proxy(Z, torch.randn(600, 9), method="slq")
    with pytest.raises(TypeError, match="settings"):
        matrix_entropy(Z, settings={"num_probes": 8}, method="slq")
    with pytest.raises(TypeError, match="generator"):
        matrix_entropy(Z, generator="seed", method="slq")
    with pytest.raises(TypeError, match="max_gram_bytes"):
        gram_chunk_size(10, 8, 1.5)


# ---------------------------------------------------------------- exact, bounded memory


@pytest.mark.parametrize("alpha", [1.0, 1.01, 2.0, 3.0])
def test_chunked_exact_equals_matrix_entropy(alpha):
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(2, 3, 90, 12, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 90, generator=g) < 0.8
    mask[0] = True
    mask = mask.expand(2, 3, 90)
    expected = differentiable(matrix_entropy, Z, alpha=alpha, mask=mask, normalize=True)
    for limit in (None, 1, 90 * 90 * 8 * 4):
        got = matrix_entropy(Z, alpha=alpha, mask=mask, normalize=True, max_gram_bytes=limit)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_chunked_exact_long_sequences_and_per_sequence_bandwidth():
    g = torch.Generator().manual_seed(1)
    Z = torch.randn(2, 1100, 16, generator=g, dtype=torch.float64)  # blocked distance path
    sigma = torch.tensor([3.0, 5.0], dtype=torch.float64)
    for s in ("median", sigma):
        torch.testing.assert_close(
            matrix_entropy(Z, sigma=s, max_gram_bytes=1),
            differentiable(matrix_entropy, Z, sigma=s),
            rtol=0,
            atol=1e-9,
        )


def test_chunked_exact_keeps_gradients():
    Z = torch.randn(3, 20, 4, dtype=torch.float64, requires_grad=True)
    H = matrix_entropy(Z, max_gram_bytes=1)
    torch.testing.assert_close(H, matrix_entropy(Z))
    H.sum().backward()
    assert Z.grad is not None and torch.isfinite(Z.grad).all()


def test_chunked_exact_proxy_equals_exact_proxy():
    g = torch.Generator().manual_seed(3)
    Zp = torch.randn(4, 60, 8, generator=g, dtype=torch.float64)
    Zr = torch.randn(4, 30, 8, generator=g, dtype=torch.float64)
    mask_p = torch.rand(4, 60, generator=g) < 0.9
    expected = differentiable(conditional_entropy_proxy, Zp, Zr, mask_p=mask_p, normalize=True)
    got = conditional_entropy_proxy(Zp, Zr, mask_p=mask_p, normalize=True, max_gram_bytes=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_chunk_size_bounds_the_gram_bytes():
    assert gram_chunk_size(100, 8, None) is None
    assert gram_chunk_size(100, 8, 1) == 1
    assert gram_chunk_size(100, 8, 100 * 100 * 8 * 5 + 7) == 5


@pytest.mark.parametrize("n", [7, 600, 1500])
def test_median_by_selection_is_the_exact_lower_median(n):
    g = torch.Generator().manual_seed(n)
    Z = torch.randn(3, n, 16, generator=g) * torch.exp(torch.randn(3, n, 1, generator=g))
    Z[1, : n // 2] = Z[1, 0]  # heavy ties (zero distances)
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[0, n - n // 3 :] = False  # trailing padding
    mask[2] = torch.rand(n, generator=g) < 0.6  # scattered padding
    for m in (None, mask):
        D = sq_distances_no_grad(Z, m)
        if n < 1024:  # the blocked, exactly symmetric product starts at 1024 tokens
            D = torch.triu(D) + torch.triu(D, 1).transpose(-1, -2)
        assert torch.equal(D, D.transpose(-1, -2))
        assert torch.equal(median_by_selection(D, m), median_bandwidth(Z, m, sq_distances=D))
        torch.testing.assert_close(median_by_selection(D, m), median_bandwidth(Z, m))


# ---------------------------------------------------------------- token subsampling


def test_subsample_tokens_keeps_valid_tokens_in_order_shared_across_layers():
    L, B, n, d = 3, 4, 50, 2
    Z = torch.arange(n, dtype=torch.float64).view(1, 1, n, 1).expand(L, B, n, d).clone()
    Z = Z + 1000 * torch.arange(L, dtype=torch.float64).view(L, 1, 1, 1)
    mask = torch.arange(n)[None, :] < torch.tensor([50, 30, 10, 20])[:, None]
    Z_sub, mask_sub = subsample_tokens(Z, mask, max_tokens=20, generator=0)
    assert Z_sub.shape == (L, B, 20, d) and mask_sub.shape == (B, 20)
    assert mask_sub.sum(-1).tolist() == [20, 20, 10, 20]
    positions = Z_sub[0, ..., 0]
    for b in range(B):
        kept = positions[b][mask_sub[b]]
        assert torch.all(kept[1:] > kept[:-1])  # order kept
        assert torch.all(mask[b, kept.long()])  # only valid tokens
        for layer in range(L):  # the same tokens at every layer
            assert torch.equal(Z_sub[layer, b, :, 0] - 1000 * layer, positions[b])
    assert torch.equal(mask_sub[3], torch.ones(20, dtype=torch.bool))
    again = subsample_tokens(Z, mask, max_tokens=20, generator=0)
    assert torch.equal(again[0], Z_sub)
    assert not torch.equal(subsample_tokens(Z, mask, 20, generator=1)[0], Z_sub)


def test_subsample_tokens_without_mask_and_no_op():
    Z = torch.randn(2, 30, 4)
    Z_sub, mask_sub = subsample_tokens(Z, None, max_tokens=10)
    assert Z_sub.shape == (2, 10, 4) and mask_sub.shape == (10,) and mask_sub.all()
    same, mask = subsample_tokens(Z, None, max_tokens=30)
    assert same is Z and mask.shape == (30,)
    with pytest.raises(ValueError, match="max_tokens"):
        subsample_tokens(Z, None, max_tokens=0)
    with pytest.raises(ValueError, match="mask"):
        subsample_tokens(Z, torch.ones(3, 30, dtype=torch.bool), max_tokens=5)
