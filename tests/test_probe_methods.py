"""The probe's estimator switch (probe.method, max_gram_bytes, slq, max_tokens) and its
memory layout (per-layer hidden states, segments gathered one layer chunk at a time)."""

import math

import numpy as np
import pytest
import torch

from unifyreg.config import ConfigError, ProbeConfig, ProbeRunConfig, load_config
from unifyreg.estimators import (
    MIN_MEDIAN_BANDWIDTH,
    SLQ_ERROR_BOUND,
    SLQSettings,
    matrix_entropy,
    median_bandwidth,
    subsample_tokens,
)
from unifyreg.losses import divergence_loss
from unifyreg.probing import probe_batch, run_probe
from unifyreg.quantities import QUANTITIES, batch_quantities
from unifyreg.roles import Role, role_segments


@pytest.fixture
def probe_examples(tiny_splits):
    return [e for name, split in tiny_splits.items() if name.startswith("probe/") for e in split]


@pytest.fixture
def tiny_batch(tiny_adapter, probe_examples):
    """One forward pass of the tiny model over the whole probe set (no gradient)."""
    tiny_adapter.model.eval()
    with torch.no_grad():
        out = tiny_adapter.forward(tiny_adapter.encode(probe_examples))
    tiny_adapter.model.train()
    return out


def _synthetic_batch(seed=0, layers=3, d=24):
    """Hidden states ``[layers, 4, 340, d]`` with prompts longer than SLQ's exact cut-off
    (256): two text-prompt -> image-response samples and two image+text -> text ones."""
    gen = torch.Generator().manual_seed(seed)
    S = 340
    roles = torch.full((4, S), int(Role.PAD))
    roles[0, :300], roles[0, 300:340] = Role.TEXT_PROMPT, Role.IMAGE_RESPONSE
    roles[1, :280], roles[1, 280:320] = Role.TEXT_PROMPT, Role.IMAGE_RESPONSE
    roles[2, :270], roles[2, 270:330], roles[2, 330:335] = (
        Role.IMAGE_PROMPT,
        Role.TEXT_PROMPT,
        Role.TEXT_RESPONSE,
    )
    roles[3, :300], roles[3, 300:310], roles[3, 310:312] = (
        Role.IMAGE_PROMPT,
        Role.TEXT_PROMPT,
        Role.TEXT_RESPONSE,
    )
    # Layer l: a low-rank signal whose share grows with l, plus isotropic noise.
    basis = torch.randn(6, d, generator=gen, dtype=torch.float64)
    hidden = []
    for layer in range(layers):
        coeff = torch.randn(4, S, 6, generator=gen, dtype=torch.float64)
        noise = torch.randn(4, S, d, generator=gen, dtype=torch.float64)
        hidden.append(((1 + layer) * coeff @ basis + noise).float())
    return torch.stack(hidden), roles


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("probe.method=fast", "probe.method must be one of exact, slq"),
        ("probe.max_gram_bytes=0", "probe.max_gram_bytes must be an integer >= 1"),
        ("probe.max_tokens=-1", "probe.max_tokens must be an integer >= 0"),
        ("probe.slq.num_probs=4", "unknown config key 'probe.slq.num_probs'"),
        ("probe.slq.num_probes=0", "probe.slq.num_probes must be an integer >= 1"),
        ("probe.slq.lanczos_steps=2.5", "probe.slq.lanczos_steps': must be an integer"),
        ("probe.slq.seed=abc", "probe.slq.seed': must be an integer"),
    ],
)
def test_bad_probe_estimator_settings_are_config_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ProbeRunConfig, None, [override])


def test_unknown_slq_key_error_lists_the_valid_keys():
    with pytest.raises(ConfigError) as caught:
        ProbeConfig(method="slq", slq={"probes": 4})
    assert "probe.slq.probes" in str(caught.value)
    assert "num_probes, deflation_rank, lanczos_steps" in str(caught.value)


def test_probe_estimator_settings_load_from_overrides():
    cfg = load_config(
        ProbeRunConfig,
        None,
        ["probe.method=slq", "probe.slq.num_probes=16", "probe.max_tokens=64"],
    ).probe
    assert cfg.method == "slq" and cfg.max_tokens == 64
    assert cfg.max_gram_bytes == 256 * 2**20
    assert cfg.slq_settings == SLQSettings(num_probes=16)
    assert ProbeConfig().slq_settings == SLQSettings()


# ---------------------------------------------------------------------- exact


def _floored_median(out, quantity: str) -> np.ndarray:
    """``[samples, layers]``: True where the median bandwidth of the quantity's sequence
    (the joint prompt + response one for a proxy) is floored at ``MIN_MEDIAN_BANDWIDTH``."""
    roles = out.roles
    prompt = (Role.TEXT_PROMPT, Role.IMAGE_PROMPT)
    has_image = (roles == Role.IMAGE_PROMPT).any(1)
    parts, select = {
        "encoding/text": ([Role.TEXT_PROMPT], ~has_image & (roles == Role.TEXT_PROMPT).any(1)),
        "encoding/image": ([Role.IMAGE_PROMPT], has_image),
        "response/text": ([prompt, Role.TEXT_RESPONSE], (roles == Role.TEXT_RESPONSE).any(1)),
        "response/image": ([prompt, Role.IMAGE_RESPONSE], (roles == Role.IMAGE_RESPONSE).any(1)),
    }[quantity]
    segments = [role_segments(out.hidden_states[:, select], roles[select], r) for r in parts]
    Z = torch.cat([z for z, _ in segments], dim=-2)
    mask = torch.cat([m for _, m in segments], dim=-1).expand(*Z.shape[:-1])
    return (median_bandwidth(Z.double(), mask) <= MIN_MEDIAN_BANDWIDTH).T.numpy()


@pytest.mark.parametrize("bandwidth", ["0.5", "median"])
def test_exact_method_equals_the_unchunked_estimators(tiny_batch, bandwidth):
    cfg = ProbeConfig(bandwidth=bandwidth)
    layers = list(tiny_batch.layers)
    # The unchunked, differentiable estimators (the loss path: a gradient is requested).
    hidden = tiny_batch.hidden_states.detach().requires_grad_(True)
    reference = batch_quantities(hidden, tiny_batch.roles, sigma=cfg.sigma)
    assert reference["encoding/image"].values.requires_grad
    categories = ["c"] * len(tiny_batch.roles)
    for max_gram_bytes, chunk in ((1, 1), (2**28, 2), (2**40, 8)):
        cfg = ProbeConfig(
            bandwidth=bandwidth, max_gram_bytes=max_gram_bytes, layers_per_chunk=chunk
        )
        records = probe_batch(tiny_batch.hidden_layers, tiny_batch.roles, categories, layers, cfg)
        for q in QUANTITIES:
            diff = np.abs(records[q].values - reference[q].values.detach().T.numpy())
            np.testing.assert_array_equal(records[q].tokens, reference[q].counts.numpy())
            # Round-off everywhere, also where more than half of a sequence's token pairs
            # are identical (image prompts of the untrained toy at layer 0) and the median
            # bandwidth is floored at 1e-6: repeated tokens are exactly 0 apart on every
            # route (before, the Gram there depended on the round-off of zero distances
            # and differed by up to 1.3e-5 bits between routes).
            floored = _floored_median(tiny_batch, q) if bandwidth == "median" else diff < 0
            assert diff.max() < 1e-10, q
            if bandwidth == "median" and q == "encoding/image":
                assert floored.any()  # the case that used to differ is in the batch


def test_short_sequences_take_the_per_sample_distances_when_they_fit(tiny_batch, monkeypatch):
    from unifyreg.estimators import TokenBatch

    calls = []  # layers of each distance computation (not of each cached use)
    original = TokenBatch.sq_distances

    def counting(self, dtype):
        if dtype not in self._distances:
            calls.append(len(self.layers))
        return original(self, dtype)

    monkeypatch.setattr(TokenBatch, "sq_distances", counting)
    B, S = tiny_batch.roles.shape
    n_layers = len(tiny_batch.hidden_layers)
    one_layer = B * S * S * 8  # float64 distances of every sample, one layer
    for max_gram_bytes, chunk, expected in (
        (2**28, 8, [n_layers]),  # one chunk of layers_per_chunk = 8 >= n_layers
        (2 * one_layer, 2, [2] * (n_layers // 2) + [1] * (n_layers % 2)),
        (2 * one_layer, 8, []),  # a chunk of 8 layers does not fit: per-segment route
        (one_layer - 1, 1, []),  # not even one layer fits
    ):
        calls.clear()
        cfg = ProbeConfig(max_gram_bytes=max_gram_bytes, layers_per_chunk=chunk)
        probe_batch(tiny_batch.hidden_layers, tiny_batch.roles, ["c"] * B, range(n_layers), cfg)
        # Each chunk's distances are computed once, however many quantities use them.
        assert calls == expected, max_gram_bytes
    calls.clear()
    batch_quantities(tiny_batch.hidden_layers, tiny_batch.roles)  # the loss path
    assert calls == []


@pytest.mark.parametrize("max_gram_bytes", [1, 2**28])  # per segment / per-sample distances
def test_a_non_finite_token_gives_nan_only_where_it_is_used(max_gram_bytes):
    roles = torch.tensor([[Role.TEXT_PROMPT] * 4 + [Role.IMAGE_RESPONSE] * 3 + [Role.PAD]] * 2)
    hidden = torch.randn(2, 2, 8, 5, generator=torch.Generator().manual_seed(0)).double()
    cfg = ProbeConfig(max_gram_bytes=max_gram_bytes)
    clean = probe_batch(hidden, roles, ["a", "b"], [0, 1], cfg)
    hidden[1, 0, 5, 3] = float("nan")  # an image-response token: sample 0, layer 1
    hidden[0, 1, 7] = float("inf")  # padding: never used
    with pytest.warns(RuntimeWarning, match=r"response/image at layer\(s\) \[1\]"):
        records = probe_batch(hidden, roles, ["a", "b"], [0, 1], cfg)
    np.testing.assert_allclose(
        records["encoding/text"].values, clean["encoding/text"].values, rtol=0, atol=1e-10
    )
    response = records["response/image"].values
    assert np.isnan(response[0, 1]) and np.isnan(response).sum() == 1
    finite = ~np.isnan(response)
    np.testing.assert_allclose(
        response[finite], clean["response/image"].values[finite], rtol=0, atol=1e-10
    )


def test_stacked_and_per_layer_hidden_states_give_identical_values(tiny_batch):
    cfg = ProbeConfig()
    categories = ["c"] * len(tiny_batch.roles)
    layers = list(tiny_batch.layers)
    stacked = probe_batch(tiny_batch.hidden_states, tiny_batch.roles, categories, layers, cfg)
    per_layer = probe_batch(tiny_batch.hidden_layers, tiny_batch.roles, categories, layers, cfg)
    for q in QUANTITIES:
        np.testing.assert_array_equal(stacked[q].values, per_layer[q].values)


def test_adapters_return_per_layer_hidden_states_without_a_stacked_copy(tiny_batch):
    layers = tiny_batch.hidden_layers
    assert isinstance(layers, tuple) and len(layers) == len(tiny_batch.layers)
    assert len({h.data_ptr() for h in layers}) == len(layers)
    stacked = tiny_batch.hidden_states
    assert stacked.shape == (len(layers), *layers[0].shape)
    for i, h in enumerate(layers):
        assert torch.equal(stacked[i], h)


# ---------------------------------------------------------------------- SLQ


def _slq_bound(exact: np.ndarray, tokens: np.ndarray, quantity: str) -> np.ndarray:
    rel, absolute = SLQ_ERROR_BOUND
    if quantity.startswith("encoding"):
        return rel * np.abs(exact) + absolute
    # The proxy's bound is the sum of its two entropies' bounds; each H <= log2(tokens).
    return 2 * rel * np.log2(tokens)[None, :] + 2 * absolute


def test_slq_method_is_within_the_documented_tolerance_of_exact():
    hidden, roles = _synthetic_batch()
    layers = list(range(hidden.shape[0]))
    categories = ["c"] * roles.shape[0]
    exact = probe_batch(hidden, roles, categories, layers, ProbeConfig())
    slq = probe_batch(hidden, roles, categories, layers, ProbeConfig(method="slq"))
    for q in QUANTITIES:
        want, got = exact[q].values, slq[q].values
        assert want.shape == got.shape and want.size
        bound = _slq_bound(want.T, exact[q].tokens, q).T
        assert np.all(np.abs(got - want) <= bound), q
        np.testing.assert_array_equal(slq[q].tokens, exact[q].tokens)
    # The entropies are long enough (> 256 tokens) that SLQ really ran: not bit-identical.
    assert not np.array_equal(slq["encoding/text"].values, exact["encoding/text"].values)


def test_slq_method_on_the_tiny_model_and_its_settings(tiny_adapter, probe_examples):
    examples = probe_examples[::3]
    exact = run_probe(tiny_adapter, examples, ProbeConfig())
    # exact_max_tokens=0 forces the Lanczos path even on the toy's short segments.
    cfg = ProbeConfig(method="slq", slq={"exact_max_tokens": 0, "num_probes": 4})
    slq = run_probe(tiny_adapter, examples, cfg)
    assert slq.settings["method"] == "slq" and slq.settings["slq"]["num_probes"] == 4
    for q in QUANTITIES:
        bound = _slq_bound(exact.records[q].values.T, exact.records[q].tokens, q).T
        assert np.all(np.abs(slq.records[q].values - exact.records[q].values) <= bound), q
    again = run_probe(tiny_adapter, examples, cfg)  # seeded: deterministic
    for q in QUANTITIES:
        np.testing.assert_array_equal(again.records[q].values, slq.records[q].values)


def test_slq_method_refuses_gradients_and_the_loss_path_keeps_them():
    hidden, roles = _synthetic_batch(layers=2)
    hidden = hidden[:, :, :64].clone().requires_grad_(True)
    roles = roles[:, :64].clone()
    roles[:, 40:64] = Role.IMAGE_RESPONSE
    with pytest.raises(ValueError, match="no gradient.*method='exact'"):
        batch_quantities(hidden, roles, method="slq")
    with torch.no_grad():
        assert batch_quantities(hidden, roles, method="slq")
    values = batch_quantities(hidden, roles, alpha=2.0)  # as the divergence loss calls it
    values["response/image"].values.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    # Chunked exact keeps gradients too, with the same values.
    chunked = batch_quantities(hidden, roles, alpha=2.0, max_gram_bytes=1)
    torch.testing.assert_close(
        chunked["response/image"].values, values["response/image"].values, rtol=0, atol=1e-12
    )
    assert chunked["response/image"].values.requires_grad


# ---------------------------------------------------------------------- max_tokens


def test_max_tokens_caps_every_segment_and_normalises_by_the_kept_count(
    tiny_adapter, probe_examples
):
    full = run_probe(tiny_adapter, probe_examples, ProbeConfig())
    cap = 6
    sub = run_probe(tiny_adapter, probe_examples, ProbeConfig(max_tokens=cap, batch_size=5))
    for q in QUANTITIES:
        assert sub.records[q].categories == full.records[q].categories
    for q in ("encoding/text", "encoding/image"):
        np.testing.assert_array_equal(
            sub.records[q].tokens, np.minimum(full.records[q].tokens, cap)
        )
        assert sub.records[q].tokens.max() == cap
    # Proxies: prompt and response each capped, so at most 2 * cap; responses of one
    # text word keep their single token.
    for q in ("response/text", "response/image"):
        assert sub.records[q].tokens.max() <= 2 * cap
    assert np.all(sub.records["response/image"].tokens > cap)  # 16-cell grids, capped
    for q in QUANTITIES:
        rec = sub.records[q]
        log_count = np.log2(np.maximum(rec.tokens, 2))[:, None]
        expected = np.where((rec.tokens > 1)[:, None], rec.values / log_count, 0.0)
        np.testing.assert_allclose(rec.normalized, expected, atol=1e-12)
    # Deterministic and independent of the batch (seeded by each segment's length).
    again = run_probe(tiny_adapter, probe_examples, ProbeConfig(max_tokens=cap, batch_size=16))
    for q in QUANTITIES:
        np.testing.assert_allclose(again.records[q].values, sub.records[q].values, atol=1e-12)
    # A cap above every segment's length changes nothing.
    loose = run_probe(tiny_adapter, probe_examples, ProbeConfig(max_tokens=10_000))
    for q in QUANTITIES:
        np.testing.assert_array_equal(loose.records[q].values, full.records[q].values)


def test_max_tokens_keeps_a_seeded_uniform_subset_for_every_layer(tiny_batch):
    roles = tiny_batch.roles
    sample = int(torch.nonzero((roles == Role.IMAGE_PROMPT).any(1))[0])
    hidden = [h[sample : sample + 1] for h in tiny_batch.hidden_layers]
    cap = 5
    values = batch_quantities(
        hidden, roles[sample : sample + 1], max_gram_bytes=2**28, max_tokens=cap
    )["encoding/image"]
    Z, _ = role_segments(torch.stack(hidden), roles[sample : sample + 1], Role.IMAGE_PROMPT)
    count = Z.shape[-2]
    Z_sub, _ = subsample_tokens(Z[:, 0], None, cap, generator=count)  # same tokens, all layers
    np.testing.assert_allclose(
        values.values[:, 0].numpy(), matrix_entropy(Z_sub).numpy(), atol=1e-10
    )
    assert int(values.counts[0]) == cap
    assert math.isclose(
        float(values.normalized[0, 0]), float(values.values[0, 0]) / math.log2(cap), abs_tol=1e-12
    )


def test_token_seed_draws_another_subset_and_the_loss_takes_it(tiny_batch):
    roles = tiny_batch.roles
    sample = int(torch.nonzero((roles == Role.IMAGE_PROMPT).any(1))[0])
    hidden = [h[sample : sample + 1] for h in tiny_batch.hidden_layers]
    labels = roles[sample : sample + 1]
    cap = 5
    Z, _ = role_segments(torch.stack(hidden), labels, Role.IMAGE_PROMPT)
    count = Z.shape[-2]
    for seed in (3, 4):
        values = batch_quantities(hidden, labels, max_tokens=cap, token_seed=seed)
        Z_sub, _ = subsample_tokens(Z[:, 0], None, cap, generator=count + seed * 1_000_003)
        np.testing.assert_allclose(
            values["encoding/image"].values[:, 0].numpy(),
            matrix_entropy(Z_sub).numpy(),
            atol=1e-10,
        )
    first, second = (
        batch_quantities(hidden, labels, max_tokens=cap, token_seed=s)["encoding/image"].values
        for s in (3, 4)
    )
    assert not torch.allclose(first, second)
    with pytest.raises(ValueError, match="token_seed must be an integer >= 0"):
        batch_quantities(hidden, labels, max_tokens=cap, token_seed=-1)
    # divergence_loss passes the cap and the seed on: its gradient reaches only kept
    # tokens, and a cap above every segment's length gives the full loss exactly.
    leaves = [h.detach().double().requires_grad_(True) for h in tiny_batch.hidden_layers]
    full, _ = divergence_loss(leaves, roles, dtype=torch.float64)
    loose, _ = divergence_loss(leaves, roles, dtype=torch.float64, max_tokens=10_000)
    assert torch.equal(loose.detach(), full.detach())
    capped, _ = divergence_loss(leaves, roles, dtype=torch.float64, max_tokens=3, token_seed=7)
    capped.backward()
    reached = (leaves[-1].grad.abs().sum(-1) > 0).sum(1)
    non_pad = (roles != Role.PAD).sum(1)
    assert bool((reached < non_pad).any())
    assert not torch.equal(capped.detach(), full.detach())
