"""Tests of unifyreg.estimators: analytic values, the paper's sanity checks, invariances."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unifyreg.estimators import (
    Segments,
    TokenBatch,
    calibrate_bandwidth,
    conditional_entropy_proxy,
    finite_tokens,
    gaussian_gram,
    matrix_entropy,
    median_bandwidth,
    pairwise_sq_distances,
    renyi_entropy,
    resolve_bandwidth,
)


def clusters(n_clusters: int, n_tokens: int = 200, d: int = 32, seed: int = 0) -> torch.Tensor:
    """n_tokens drawn round-robin from n_clusters far-apart, tight clusters."""
    g = torch.Generator().manual_seed(seed)
    centres = 50.0 * torch.randn(n_clusters, d, generator=g, dtype=torch.float64)
    labels = torch.arange(n_tokens) % n_clusters
    return centres[labels] + 1e-4 * torch.randn(n_tokens, d, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- analytic values


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.01, 2.0, 3.0])
def test_identical_tokens_have_zero_entropy(alpha):
    Z = torch.full((3, 10, 4), 0.1)
    assert torch.equal(matrix_entropy(Z, alpha=alpha), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("alpha", [1.0, 1.01, 2.0])
def test_zero_entropy_is_positive_zero_on_every_route(alpha):
    """-0.0 (which prints as "-0") came out of rank-one spectra; every route gives +0.0."""
    Z = torch.full((2, 12, 4), 0.3, dtype=torch.float64)
    tokens, whole = _segments_of(Z, torch.ones(2, 12, dtype=torch.bool), 0, 12)
    values = [
        matrix_entropy(Z, alpha=alpha),  # no gradient: in-place blocked path
        matrix_entropy(Z.clone().requires_grad_(), alpha=alpha).detach(),  # autograd
        matrix_entropy(whole, alpha=alpha, max_gram_bytes=2**20)[0],  # shared distances
        matrix_entropy(Z, alpha=alpha, normalize=True),
        renyi_entropy(torch.ones(2, 5, 5, dtype=torch.float64), alpha),
    ]
    for value in values:
        assert torch.equal(value, torch.zeros_like(value)) and not torch.signbit(value).any()
    # A difference of two entropies (both exactly or nearly 0) is 0 to round-off.
    assert conditional_entropy_proxy(Z[:, :6], Z[:, 6:], alpha=alpha).abs().max() < 1e-12


def test_repeated_tokens_are_exactly_zero_apart():
    """The Gram trick's round-off made repeated tokens ~1e-17 apart; under a floored
    median bandwidth (more than half the pairs repeated) that round-off decided the Gram."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 32, generator=g, dtype=torch.float64) * 3 + 5
    Z = base[torch.tensor([0, 0, 0, 0, 0, 0, 1, 2, 0, 0])]  # 8 of 10 tokens repeat token 0
    D = pairwise_sq_distances(Z)
    repeated = torch.tensor([0, 1, 2, 3, 4, 5, 8, 9])
    assert torch.equal(D[repeated][:, repeated], torch.zeros(8, 8, dtype=torch.float64))
    assert float(median_bandwidth(Z)) == 1e-6  # floored: the case where it mattered
    with_grad = pairwise_sq_distances(Z.clone().requires_grad_())
    assert torch.equal(with_grad[repeated][:, repeated].detach(), D[repeated][:, repeated])


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.01, 2.0])
@pytest.mark.parametrize("n", [2, 7, 64])
def test_far_apart_tokens_have_log_n_entropy(alpha, n):
    Z = 1e3 * torch.eye(n, dtype=torch.float64)
    H = matrix_entropy(Z, alpha=alpha, sigma=1.0)
    assert H.item() == pytest.approx(math.log2(n), abs=1e-9)


def test_single_token_has_zero_entropy_and_zero_normalised():
    Z = torch.randn(2, 1, 5)
    assert torch.equal(matrix_entropy(Z), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(matrix_entropy(Z, normalize=True), torch.zeros(2, dtype=torch.float64))


def test_base_changes_units_only():
    Z = torch.randn(4, 30, 8)
    bits = matrix_entropy(Z, base=2)
    nats = matrix_entropy(Z, base=math.e)
    torch.testing.assert_close(bits * math.log(2), nats)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.01, 3.0])
def test_eigenvalue_path_matches_numpy_reference(alpha):
    Z = torch.randn(30, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    K = gaussian_gram(Z, 1.5).numpy()
    lam = np.linalg.eigvalsh(K / np.trace(K))
    lam = lam[lam > 1e-12]
    if alpha == 1.0:
        expected = -(lam * np.log2(lam)).sum()
    else:
        expected = np.log2((lam**alpha).sum()) / (1 - alpha)
    assert renyi_entropy(torch.from_numpy(K), alpha=alpha).item() == pytest.approx(expected, 1e-10)


def test_alpha_two_frobenius_path_equals_eigenvalue_path():
    Z = torch.randn(5, 40, 8, dtype=torch.float64)
    K = gaussian_gram(Z)
    frobenius = renyi_entropy(K, alpha=2.0)
    A = K / 40
    lam = torch.linalg.eigvalsh(A)
    eigen = -torch.log2((lam**2).sum(-1))
    torch.testing.assert_close(frobenius, eigen, rtol=1e-12, atol=1e-12)


def test_alpha_one_is_the_limit_of_alpha_near_one():
    K = gaussian_gram(torch.randn(3, 50, 10, dtype=torch.float64))
    von_neumann = renyi_entropy(K, alpha=1.0)
    below, above = renyi_entropy(K, alpha=1 - 1e-6), renyi_entropy(K, alpha=1 + 1e-6)
    torch.testing.assert_close(below, von_neumann, atol=1e-5, rtol=0)
    torch.testing.assert_close(above, von_neumann, atol=1e-5, rtol=0)
    # Renyi entropy is non-increasing in alpha.
    assert torch.all(below >= von_neumann - 1e-12) and torch.all(von_neumann >= above - 1e-12)


# ---------------------------------------------------------------- the paper's sanity checks


def test_more_clusters_give_strictly_more_entropy_starting_at_zero():
    entropies = [matrix_entropy(clusters(c), sigma=1.0).item() for c in (1, 5, 20, 100)]
    assert entropies[0] == pytest.approx(0.0, abs=1e-4)
    assert entropies == sorted(set(entropies))  # strictly increasing
    # Far-apart tight clusters with equal occupancy: entropy ~ log2(number of clusters).
    assert entropies[1:] == pytest.approx([math.log2(c) for c in (5, 20, 100)], abs=1e-3)


def _proxy_cases():
    """(P, noise, independent R) for d in 16/64/256, n = m in 60/100, 3 seeds; every
    tensor has unit per-coordinate spread."""
    for d in (16, 64, 256):
        for n in (60, 100):
            for seed in range(3):
                g = torch.Generator().manual_seed(seed)
                P, noise, other = torch.randn(3, n, d, generator=g, dtype=torch.float64)
                yield P, noise, other


def test_proxy_orders_copy_noisy_copy_independent_only_for_small_noise():
    """The docstring's statement, exactly: with R = P + s * noise (s relative to P's
    spread), copy < noisy copy < independent R holds for s <= 0.2 (and the proxy grows
    with s there); from s = 0.7 the noisy copy scores above an independent R in every
    case (the proxy mixes R's own spread with its dependence on P)."""
    for P, noise, other in _proxy_cases():
        copy = conditional_entropy_proxy(P, P.clone()).item()
        noisy = [conditional_entropy_proxy(P, P + s * noise).item() for s in (0.05, 0.1, 0.2)]
        independent = conditional_entropy_proxy(P, other).item()
        assert abs(copy) < 1e-9
        assert copy < noisy[0] < noisy[1] < noisy[2] < independent
        for s in (0.7, 1.0):
            assert conditional_entropy_proxy(P, P + s * noise).item() > independent


def test_proxy_is_joint_minus_prompt_entropy_with_shared_bandwidth():
    P, R = torch.randn(2, 20, 8).double(), torch.randn(2, 12, 8).double()
    joint = torch.cat([P, R], dim=-2)
    sigma = median_bandwidth(joint)
    K = gaussian_gram(joint, sigma)
    expected = renyi_entropy(K) - renyi_entropy(K[..., :20, :20])
    torch.testing.assert_close(conditional_entropy_proxy(P, R), expected)
    torch.testing.assert_close(
        conditional_entropy_proxy(P, R, normalize=True), expected / math.log2(32)
    )


# ---------------------------------------------------------------- batching and masking


def test_batch_equals_per_sequence_loop():
    Z = torch.randn(3, 4, 25, 6)
    batched = matrix_entropy(Z)
    looped = torch.stack([torch.stack([matrix_entropy(z) for z in layer]) for layer in Z])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", [1.01, 2.0])
def test_masked_padding_equals_trimmed_sequence(alpha):
    lengths = [5, 17, 30]
    Z = torch.randn(3, 30, 8)
    Z[0, 5:] = 1e6  # padding values must not matter, even huge ones
    mask = torch.arange(30)[None, :] < torch.tensor(lengths)[:, None]
    padded = matrix_entropy(Z, alpha=alpha, mask=mask, normalize=True)
    trimmed = torch.stack(
        [matrix_entropy(Z[i, :n], alpha=alpha, normalize=True) for i, n in enumerate(lengths)]
    )
    torch.testing.assert_close(padded, trimmed, rtol=0, atol=1e-10)


def test_masked_proxy_equals_trimmed_proxy():
    Zp, Zr = torch.randn(2, 10, 4), torch.randn(2, 7, 4)
    mask_p = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    mask_r = torch.tensor([[True] * 3 + [False] * 4, [True] * 7])
    padded = conditional_entropy_proxy(Zp, Zr, mask_p=mask_p, mask_r=mask_r)
    first = conditional_entropy_proxy(Zp[0], Zr[0, :3])
    second = conditional_entropy_proxy(Zp[1, :6], Zr[1])
    torch.testing.assert_close(padded, torch.stack([first, second]), rtol=0, atol=1e-10)


def test_entropy_is_permutation_invariant():
    Z = torch.randn(40, 8)
    perm = torch.randperm(40)
    torch.testing.assert_close(matrix_entropy(Z), matrix_entropy(Z[perm]), rtol=0, atol=1e-10)


def test_median_bandwidth_makes_entropy_scale_and_shift_invariant():
    Z = torch.randn(3, 40, 8, dtype=torch.float64)
    torch.testing.assert_close(matrix_entropy(Z), matrix_entropy(7.5 * Z + 3.0))
    torch.testing.assert_close(median_bandwidth(7.5 * Z), 7.5 * median_bandwidth(Z))


def test_median_bandwidth_is_the_lower_median_of_pair_distances():
    Z = torch.randn(9, 3, dtype=torch.float64)
    dist = torch.cdist(Z, Z)
    pairs = dist[torch.triu_indices(9, 9, 1).unbind()]
    expected = torch.sort(pairs).values[(len(pairs) - 1) // 2]
    assert median_bandwidth(Z).item() == pytest.approx(expected.item(), rel=1e-12)


def test_fixed_bandwidth_is_not_scale_invariant():
    Z = torch.randn(40, 8)
    assert not torch.allclose(matrix_entropy(Z, sigma=1.0), matrix_entropy(10 * Z, sigma=1.0))


def test_calibrated_bandwidth_from_ragged_sequences():
    seqs = [torch.randn(n, 8) for n in (10, 20, 30)]
    medians = torch.stack([median_bandwidth(s.double()) for s in seqs])
    assert calibrate_bandwidth(seqs) == pytest.approx(medians.median().item())
    sigma = calibrate_bandwidth(seqs)
    assert matrix_entropy(seqs[0], sigma=sigma).item() > 0


def test_pairwise_distances_are_exact_on_diagonal_and_nonnegative():
    Z = 1e4 + torch.randn(50, 16, dtype=torch.float64)  # large offset invites cancellation
    D = pairwise_sq_distances(Z)
    assert torch.all(D >= 0) and torch.all(torch.diagonal(D) == 0)
    exact = ((Z[:, None, :] - Z[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(D, exact, rtol=1e-10, atol=1e-9)


def _segments_of(Z, mask, start, stop):
    """Segments of Z ``[B, S, d]`` at positions ``start:stop`` of every row (``mask``'s)."""
    tokens = TokenBatch([Z], valid=torch.ones(Z.shape[:2], dtype=torch.bool))
    rows = torch.arange(Z.shape[0])
    index = torch.arange(start, stop).expand(Z.shape[0], stop - start)
    return tokens, tokens.segments(rows, index, mask[:, start:stop])


@pytest.mark.parametrize("sigma", ["median", 0.7, "silverman", "rms:0.3", "median:0.5"])
@pytest.mark.parametrize("max_gram_bytes", [None, 2**20])  # gathered / shared distances
def test_segments_give_the_entropies_of_their_tokens(sigma, max_gram_bytes):
    Z = torch.randn(3, 12, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 9:] = False  # padded response
    mask[2, 4] = False  # a masked prompt token
    tokens, whole = _segments_of(Z, mask, 0, 12)
    assert tokens.shares_distances(torch.float64, max_gram_bytes) == (max_gram_bytes is not None)
    H = matrix_entropy(whole, sigma=sigma, max_gram_bytes=max_gram_bytes)
    assert H.shape == (1, 3)
    expected = matrix_entropy(Z, sigma=sigma, mask=mask)
    torch.testing.assert_close(H[0], expected, rtol=0, atol=1e-10)
    n = 5
    prompt = tokens.segments(whole.rows, whole.index[:, :n], mask[:, :n])
    response = tokens.segments(whole.rows, whole.index[:, n:], mask[:, n:])
    C = conditional_entropy_proxy(
        prompt, response, sigma=sigma, normalize=True, max_gram_bytes=max_gram_bytes
    )
    expected = conditional_entropy_proxy(
        Z[:, :n], Z[:, n:], sigma=sigma, mask_p=mask[:, :n], mask_r=mask[:, n:], normalize=True
    )
    torch.testing.assert_close(C[0], expected, rtol=0, atol=1e-10)


def test_segments_reject_bad_input():
    Z = torch.randn(2, 6, 3, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    tokens, whole = _segments_of(Z, mask, 0, 6)
    with pytest.raises(ValueError, match=r"index and mask must both be \[b, k\]"):
        tokens.segments(whole.rows, whole.index, mask[:, :5])
    with pytest.raises(ValueError, match=r"rows must be \[b\]"):
        tokens.segments(whole.rows[:1], whole.index, mask)
    with pytest.raises(ValueError, match="valid must have shape"):
        TokenBatch([Z], valid=mask[0])
    with pytest.raises(ValueError, match="matching valid"):
        TokenBatch([Z[:, :5]], valid=mask)
    empty = mask.clone()
    empty[1] = False
    for budget in (None, 2**20):
        with pytest.raises(ValueError, match="no valid token"):
            matrix_entropy(tokens.segments(whole.rows, whole.index, empty), max_gram_bytes=budget)
    with pytest.raises(ValueError, match="own mask"):
        matrix_entropy(whole, mask=mask)
    other, _ = _segments_of(Z, mask, 0, 6)
    foreign = other.segments(whole.rows, whole.index, mask)
    with pytest.raises(ValueError, match="share their TokenBatch"):
        conditional_entropy_proxy(whole, foreign)
    with pytest.raises(TypeError, match="both be Segments"):
        conditional_entropy_proxy(whole, Z)
    with pytest.raises(ValueError, match="alpha"):
        matrix_entropy(whole, alpha=0.0)
    assert isinstance(whole, Segments)


def test_finite_tokens_flags_tokens_with_any_non_finite_entry():
    Z = torch.randn(2, 5, 4)
    Z[0, 1, 2] = float("nan")
    Z[1, 3, 0] = float("-inf")
    Z[1, 4] = torch.tensor([3e38, 3e38, -1.0, 0.0])  # finite entries whose sum overflows
    expected = torch.ones(2, 5, dtype=torch.bool)
    expected[0, 1] = expected[1, 3] = False
    assert torch.equal(finite_tokens(Z), expected)
    assert torch.equal(finite_tokens(Z[:1, :1]), torch.ones(1, 1, dtype=torch.bool))


# ---------------------------------------------------------------- dtypes and gradients


def test_bfloat16_input_is_computed_in_float64():
    Z = torch.randn(2, 30, 8).to(torch.bfloat16)
    H = matrix_entropy(Z)
    assert H.dtype == torch.float64
    torch.testing.assert_close(H, matrix_entropy(Z.double()), rtol=0, atol=1e-12)
    assert matrix_entropy(Z, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("alpha", [1.01, 2.0])
def test_gradients_are_finite_with_repeated_tokens(alpha):
    # Repeated tokens give repeated (and zero) eigenvalues: the hard case for eigvalsh grads.
    base = torch.randn(4, 8, dtype=torch.float64)
    Z = torch.cat([base, base, base[:1].expand(6, 8)]).requires_grad_(True)
    H = matrix_entropy(Z, alpha=alpha)
    (grad,) = torch.autograd.grad(H, Z)
    assert torch.all(torch.isfinite(grad)) and grad.abs().sum() > 0


def test_proxy_gradients_are_finite_and_reach_both_inputs():
    Zp = torch.randn(10, 6, requires_grad=True)
    Zr = torch.randn(5, 6, requires_grad=True)
    conditional_entropy_proxy(Zp, Zr, alpha=2.0).backward()
    for t in (Zp, Zr):
        assert torch.all(torch.isfinite(t.grad)) and t.grad.abs().sum() > 0


def test_gradient_matches_finite_differences():
    Z = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: matrix_entropy(z, alpha=1.01, sigma=2.0), (Z,))


# ---------------------------------------------------------------- degenerate and bad input


def test_nan_input_raises_by_default_and_propagates_only_when_asked():
    Z = torch.randn(3, 10, 4)
    Z[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        matrix_entropy(Z)
    H = matrix_entropy(Z, nan_policy="propagate")
    assert torch.isnan(H[1]) and torch.all(torch.isfinite(H[[0, 2]]))
    torch.testing.assert_close(H[[0, 2]], matrix_entropy(Z[[0, 2]]))


def test_nan_in_padding_is_ignored():
    Z = torch.randn(10, 4)
    Z[8:] = float("inf")
    mask = torch.arange(10) < 8
    torch.testing.assert_close(matrix_entropy(Z, mask=mask), matrix_entropy(Z[:8]))


def test_all_masked_sequence_raises():
    with pytest.raises(ValueError, match="no valid token"):
        matrix_entropy(torch.randn(5, 3), mask=torch.zeros(5, dtype=torch.bool))


@pytest.mark.parametrize("alpha", [0, -1, float("nan"), float("inf")])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        matrix_entropy(torch.randn(5, 3), alpha=alpha)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), "mean"])
def test_bad_bandwidth_raises(sigma):
    with pytest.raises(ValueError, match="bandwidth"):
        matrix_entropy(torch.randn(5, 3), sigma=sigma)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\[\.\.\., n, d\]"):
        matrix_entropy(torch.randn(5))
    with pytest.raises(ValueError, match="mask"):
        matrix_entropy(torch.randn(5, 3), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="share"):
        conditional_entropy_proxy(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(TypeError, match="floating"):
        matrix_entropy(torch.ones(5, 3, dtype=torch.long))


def test_resolve_bandwidth_accepts_per_sequence_tensor():
    Z = torch.randn(2, 10, 3, dtype=torch.float64)
    sigma = torch.tensor([1.0, 2.0], dtype=torch.float64)
    per_sequence = matrix_entropy(Z, sigma=sigma)
    assert per_sequence[0].item() == pytest.approx(matrix_entropy(Z[0], sigma=1.0).item())
    assert per_sequence[1].item() == pytest.approx(matrix_entropy(Z[1], sigma=2.0).item())
    assert resolve_bandwidth(Z, 3.0).shape == (2,)


# ---------------------------------------------------------------- property tests


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 24),
    d=st.integers(1, 6),
    alpha=st.sampled_from([0.5, 1.0, 1.01, 2.0, 4.0]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_entropy_lies_between_zero_and_log_n(n, d, alpha, scale, seed):
    Z = scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    H = matrix_entropy(Z, alpha=alpha).item()
    assert 0.0 <= H <= math.log2(n) + 1e-9
    normalised = matrix_entropy(Z, alpha=alpha, normalize=True).item()
    assert 0.0 <= normalised <= 1.0 + 1e-9


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), m=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_proxy_is_finite_and_bounded_by_joint_log_count(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    proxy = conditional_entropy_proxy(
        torch.randn(n, 4, generator=g), torch.randn(m, 4, generator=g)
    )
    assert math.isfinite(proxy.item())
    assert -math.log2(n + m) - 1e-9 <= proxy.item() <= math.log2(n + m) + 1e-9


def test_differentiable_median_makes_the_gradient_scale_invariant():
    # H(cZ) does not depend on c under the median rule, so its derivative along Z itself
    # is zero: <dH/dZ, Z> = 0. Only the rule that keeps the median's gradient sees that.
    Z = torch.randn(2, 20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    along_scale = {}
    for rule in ("median", "median_differentiable"):
        X = Z.clone().requires_grad_(True)
        value = matrix_entropy(X, alpha=2.0, sigma=rule).sum()
        (grad,) = torch.autograd.grad(value, X)
        along_scale[rule] = float((grad * Z).sum())
    assert abs(along_scale["median_differentiable"]) < 1e-10
    assert abs(along_scale["median"]) > 1e-3
    same = [matrix_entropy(Z, sigma=rule) for rule in ("median", "median_differentiable")]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)


def test_unknown_bandwidth_rule_names_the_valid_ones():
    with pytest.raises(ValueError, match="'median', 'median_differentiable'"):
        matrix_entropy(torch.randn(5, 3), sigma="mean")


# --------------------------------------------------------------- order 2, hand-written backward


def _order2_reference(Z, mask, sigma):
    """Order-2 entropy by the generic composition (autograd all the way through)."""
    return renyi_entropy(gaussian_gram(Z, sigma, mask), alpha=2.0)


def _tricky_batch(dtype):
    """Masks with padding, a one-token sequence, exactly repeated tokens (a zero median,
    floored bandwidth) and ties among distances."""
    gen = torch.Generator().manual_seed(3)
    Z = torch.randn(3, 4, 9, 6, dtype=dtype, generator=gen)
    Z[1, 2, :5] = Z[1, 2, 0]  # five identical tokens: median distance 0
    Z[2, 1, 3] = Z[2, 1, 4]  # one repeated pair
    mask = torch.rand(3, 4, 9, generator=gen) > 0.25
    mask[..., 0] = True
    mask[0, 0, 1:] = False  # one valid token: no pair
    return Z, mask


@pytest.mark.parametrize("sigma", ["median_differentiable", "median"])
def test_order2_fast_path_matches_the_generic_composition_in_value_and_gradient(sigma):
    Z, mask = _tricky_batch(torch.float64)
    weights = torch.linspace(-1.0, 2.0, Z[..., 0, 0].numel(), dtype=torch.float64)
    fast_in = Z.clone().requires_grad_()
    fast = matrix_entropy(fast_in, 2.0, sigma, mask=mask)
    (fast * weights.view_as(fast)).sum().backward()
    ref_in = Z.clone().requires_grad_()
    ref = _order2_reference(ref_in, mask, sigma)
    (ref * weights.view_as(ref)).sum().backward()
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast_in.grad, ref_in.grad, rtol=1e-9, atol=1e-10)
    assert fast_in.grad.abs().max() > 0.1  # a real gradient was compared


@pytest.mark.parametrize("sigma", ["median_differentiable", "median"])
def test_order2_fast_proxy_matches_the_generic_composition_in_value_and_gradient(sigma):
    gen = torch.Generator().manual_seed(5)
    Zp = torch.randn(2, 5, 7, 4, dtype=torch.float64, generator=gen)
    Zr = torch.randn(2, 5, 6, 4, dtype=torch.float64, generator=gen)
    Zr[0, 1, :3] = Zp[0, 1, 0]  # responses repeating a prompt token
    mp = torch.rand(2, 5, 7, generator=gen) > 0.3
    mr = torch.rand(2, 5, 6, generator=gen) > 0.3
    mp[..., 0] = True
    mr[..., 0] = True
    inputs = [t.clone().requires_grad_() for t in (Zp, Zr)]
    fast = conditional_entropy_proxy(*inputs, 2.0, sigma, mask_p=mp, mask_r=mr)
    fast.sum().backward()
    ref_in = [t.clone().requires_grad_() for t in (Zp, Zr)]
    joint = torch.cat(ref_in, dim=-2)
    K = gaussian_gram(joint, sigma, torch.cat([mp, mr], dim=-1))
    ref = renyi_entropy(K, 2.0) - renyi_entropy(K[..., :7, :7], 2.0)
    ref.sum().backward()
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    for a, b in zip(inputs, ref_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)


def test_order2_fast_path_passes_gradcheck():
    gen = torch.Generator().manual_seed(11)
    Z = torch.randn(2, 6, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    assert torch.autograd.gradcheck(
        lambda z: matrix_entropy(z, 2.0, "median_differentiable", mask=mask), (Z,)
    )


def test_finite_check_is_exact_when_finite_values_overflow_a_token_sum():
    from unifyreg.estimators._checks import prepare as _prepare

    # Finite entries whose per-token sum overflows must not be taken for NaN/Inf input.
    Z = torch.full((2, 3, 4), 1e308, dtype=torch.float64)
    _, _, bad = _prepare(Z, None, torch.float64, "raise", "Z")
    assert bad is None
    Z[1, 2, 1] = math.inf
    _, _, bad = _prepare(Z, None, torch.float64, "propagate", "Z")
    assert bad.tolist() == [False, True]
    with pytest.raises(ValueError, match="NaN or Inf in 1 of 2"):
        _prepare(Z, None, torch.float64, "raise", "Z")
