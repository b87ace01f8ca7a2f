"""L_div's prompt entropies computed from their proxy's joint distances (issue 20): the
same values and gradients as one estimator call per quantity, in float64."""

import pytest
import torch

from unifyreg.estimators import TokenBatch, proxy_with_prompt_entropy, shares_prompt_distances
from unifyreg.losses import divergence_loss
from unifyreg.quantities import PAIRS, _plan, _shared_prompts, batch_quantities
from unifyreg.roles import Role

R = Role


def _batch(seed: int = 0, n_layers: int = 3, width: int = 16, stretch: int = 1):
    """Five samples: text -> text, text -> image, image + text -> text (with SPECIAL and
    PAD positions around), text -> image with padding, and a prompt-only text sample (its
    entropy has no proxy: the per-quantity route). Hidden states with a common offset
    (as real hidden states) and one repeated token (a zero distance)."""
    T, I, RT, RI, S, P = (
        R.TEXT_PROMPT, R.IMAGE_PROMPT, R.TEXT_RESPONSE, R.IMAGE_RESPONSE, R.SPECIAL, R.PAD,
    )  # fmt: skip
    rows = [
        [S] + [T] * 20 + [RT] * 5 + [P] * 4,
        [S] + [T] * 14 + [S] + [RI] * 9 + [P] * 5,
        [S] + [I] * 9 + [T] * 7 + [RT] * 4 + [P] * 9,
        [T] * 11 + [RI] * 12 + [P] * 7,
        [S] + [T] * 17 + [P] * 12,
    ]
    roles = torch.tensor([[int(r) for r in row for _ in range(stretch)] for row in rows])
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_layers, *roles.shape, width, generator=g, dtype=torch.float64)
    hidden = hidden + 3.0 * torch.randn(width, generator=g, dtype=torch.float64)
    hidden[:, 0, 5] = hidden[:, 0, 2]  # a repeated prompt token
    return hidden.requires_grad_(True), roles


def _reference(hidden, roles, **kwargs):
    """One ``batch_quantities`` call per quantity: no proxy in the call, so no sharing
    (the route before issue 20's change)."""
    out = {}
    for name in [q for pair in PAIRS.values() for q in pair]:
        out.update(batch_quantities(hidden, roles, quantities=[name], **kwargs))
    return out


def _reference_loss(hidden, roles, alpha, bandwidth):
    values = _reference(hidden, roles, alpha=alpha, sigma=bandwidth, dtype=torch.float64)
    total = 0.0
    for text, image in PAIRS.values():
        gap = values[text].normalized.mean(dim=1) - values[image].normalized.mean(dim=1)
        total = total + (gap.double() ** 2).mean()
    return total


def _grad(value, hidden):
    (grad,) = torch.autograd.grad(value, hidden, retain_graph=True)
    return grad


def _close(a, b, rel=1e-10):
    a, b = a.detach(), b.detach()
    scale = b.abs().max().clamp_min(1e-300)
    assert float((a - b).abs().max() / scale) <= rel, float((a - b).abs().max() / scale)


def test_the_batch_shares_distances_for_every_covered_prompt_entropy():
    hidden, roles = _batch()
    plan = _plan(roles, [q for pair in PAIRS.values() for q in pair], 0)
    shared = _shared_prompts(roles, plan)
    covered = {}
    for proxy, entropies in shared.items():
        for entropy, own in entropies.items():
            rows = plan[proxy][2][0].rows[own.any(dim=1)].tolist()
            covered[entropy] = sorted(covered.get(entropy, []) + rows)
    # Samples 0, 1, 3 share with their proxy, 2's image prompt lies within its prompt;
    # sample 4 (no response) keeps its own call.
    assert covered == {"encoding/text": [0, 1, 3], "encoding/image": [2]}
    tokens = TokenBatch(list(hidden), roles != 0)
    assert shares_prompt_distances(tokens, 2.0, "median_differentiable")
    assert not shares_prompt_distances(tokens, 1.01, "median_differentiable")
    assert not shares_prompt_distances(tokens, 2.0, "silverman")
    with torch.no_grad():
        assert not shares_prompt_distances(tokens, 2.0, "median")


@pytest.mark.parametrize("bandwidth", ["median_differentiable", "median"])
@pytest.mark.parametrize(("seed", "stretch"), [(0, 1), (1, 1), (2, 1), (0, 5)])
def test_l_div_value_and_gradient_equal_the_per_quantity_route(bandwidth, seed, stretch):
    hidden, roles = _batch(seed, stretch=stretch)
    value, used = divergence_loss(hidden, roles, alpha=2.0, bandwidth=bandwidth)
    reference = _reference_loss(hidden, roles, 2.0, bandwidth)
    assert used == 2 and value.item() > 0
    assert value.item() == pytest.approx(reference.item(), rel=1e-10)
    grad, grad_ref = _grad(value, hidden), _grad(reference, hidden)
    assert grad.abs().sum() > 0
    _close(grad, grad_ref)


@pytest.mark.parametrize("max_tokens", [0, 8])
def test_every_quantity_and_its_gradient_equal_the_per_quantity_route(max_tokens):
    hidden, roles = _batch(3)
    kwargs = dict(alpha=2.0, sigma="median_differentiable", max_tokens=max_tokens)
    got = batch_quantities(hidden, roles, layers_per_chunk=2, **kwargs)
    want = _reference(hidden, roles, **kwargs)
    assert set(got) == set(want)
    g = torch.Generator().manual_seed(4)
    for name in want:
        _close(got[name].values, want[name].values)
        assert torch.equal(got[name].counts, want[name].counts)
        weights = torch.randn(want[name].values.shape, generator=g, dtype=torch.float64)
        _close(
            _grad((got[name].values * weights).sum(), hidden),
            _grad((want[name].values * weights).sum(), hidden),
        )


def test_a_non_finite_response_token_spares_the_prompt_entropy():
    hidden, roles = _batch(5)
    hidden = hidden.detach().clone()
    hidden[1, 0, 23, 0] = float("nan")  # a text-response token of sample 0, layer 1
    hidden.requires_grad_(True)
    got = batch_quantities(hidden, roles, alpha=2.0, sigma="median_differentiable")
    want = _reference(hidden, roles, alpha=2.0, sigma="median_differentiable")
    for name in want:
        assert torch.equal(torch.isnan(got[name].values), torch.isnan(want[name].values))
        finite = ~torch.isnan(want[name].values)
        _close(got[name].values[finite], want[name].values[finite])
    assert torch.isnan(got["response/text"].values[1, 0])
    assert torch.isfinite(got["encoding/text"].values).all()


def test_proxy_with_prompt_entropy_refuses_routes_it_does_not_cover():
    hidden, roles = _batch()
    tokens = TokenBatch(list(hidden), roles != 0)
    rows = torch.tensor([0])
    index = torch.arange(1, 21)[None]
    mask = torch.ones_like(index, dtype=torch.bool)
    prompt = tokens.segments(rows, index, mask)
    response = tokens.segments(rows, torch.arange(21, 26)[None], torch.ones(1, 5, dtype=bool))
    with pytest.raises(ValueError, match="order 2"):
        proxy_with_prompt_entropy(prompt, response, mask, alpha=1.01)
    with pytest.raises(ValueError, match="within the prompt"):
        proxy_with_prompt_entropy(prompt, response, torch.ones(1, 3, dtype=bool))
