"""Bandwidth rules on inputs of known structure, the probe's presets, and the regime every
output states (README, "Comparing with the paper's Table 1")."""

import json
import math

import numpy as np
import pytest
import torch

from unifyreg.config import ConfigError, ProbeConfig, ProbeRunConfig, load_config, to_yaml
from unifyreg.estimators import (
    SLQ_ERROR_BOUND,
    SLQSettings,
    conditional_entropy_proxy,
    matrix_entropy,
    median_bandwidth,
    resolve_bandwidth,
)
from unifyreg.estimators.kernel import (
    BANDWIDTH_RULE_TABLE,
    BANDWIDTH_RULES,
    bandwidth_rule_name,
    gram_from_sq_distances_,
    pairwise_sq_distances,
    parse_bandwidth_rule,
    rms_bandwidth,
    silverman_bandwidth,
)
from unifyreg.probing import ProbeResult, run_probe
from unifyreg.report import probe_table
from unifyreg.roles import Role

#: The narrow rules: the paper's regime (Silverman's) and the width-free one.
NARROW = ("silverman", "rms:0.1")


def _gaussian(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _clusters(k, n, d, spread, seed=0):
    """n tokens in k clusters: centres 10 * N(0, I), each token its centre + spread * N(0, I)."""
    centres = 10.0 * _gaussian(k, d, seed)
    return centres[torch.arange(n) % k] + spread * _gaussian(n, d, seed + 1)


# ---------------------------------------------------------------------- the rule table


def test_the_rule_table_is_the_one_list_of_rules():
    assert BANDWIDTH_RULES == tuple(BANDWIDTH_RULE_TABLE)
    assert BANDWIDTH_RULES == ("median", "median_differentiable", "rms", "silverman")
    assert [r for r in BANDWIDTH_RULES if BANDWIDTH_RULE_TABLE[r].needs_width] == ["silverman"]


@pytest.mark.parametrize(
    "text, name, factor",
    [("median", "median", 1.0), ("rms:0.1", "rms", 0.1), (" silverman : 2 ", "silverman", 2.0)],
)
def test_rule_strings_parse_into_a_rule_and_a_factor(text, name, factor):
    rule, value = parse_bandwidth_rule(text)
    assert (rule.name, value) == (name, factor)


@pytest.mark.parametrize("text", ["mean", "rms:0", "rms:-1", "rms:x", "silverman:inf", "rms:"])
def test_bad_rule_strings_raise_naming_the_valid_rules(text):
    with pytest.raises(ValueError, match="bandwidth rule"):
        parse_bandwidth_rule(text)
    with pytest.raises(ValueError, match="bandwidth rule"):
        matrix_entropy(torch.randn(5, 3), sigma=text)


def test_canonical_names_drop_a_factor_of_one():
    assert bandwidth_rule_name(*parse_bandwidth_rule("median:1")) == "median"
    assert bandwidth_rule_name(*parse_bandwidth_rule("rms:0.10")) == "rms:0.1"


# ---------------------------------------------------------------------- formulas


def test_rms_is_the_root_mean_square_pair_distance():
    Z = _gaussian(40, 7, 0)
    distances = torch.pdist(Z)  # the pairs i < j
    expected = distances.pow(2).mean().sqrt()
    assert rms_bandwidth(Z).item() == pytest.approx(expected.item(), rel=1e-12)
    trace_cov = torch.cov(Z.T).trace()  # sample covariance: rms^2 = 2 tr Cov
    assert rms_bandwidth(Z).item() ** 2 == pytest.approx(2 * trace_cov.item(), rel=1e-12)


def test_silverman_in_one_dimension_is_the_familiar_rule():
    x = _gaussian(200, 1, 1)
    expected = (4 / 3) ** 0.2 * x.std() * 200 ** (-0.2)  # ~ 1.06 s n^(-1/5)
    assert silverman_bandwidth(x).item() == pytest.approx(expected.item(), rel=1e-12)


def test_silverman_is_rms_times_a_factor_of_width_and_count():
    n, d = 50, 12
    Z = _gaussian(n, d, 2)
    spread = torch.sqrt(torch.cov(Z.T).trace() / d)  # pooled per-coordinate std
    expected = (4 / (d + 2)) ** (1 / (d + 4)) * spread * n ** (-1 / (d + 4))
    assert silverman_bandwidth(Z).item() == pytest.approx(expected.item(), rel=1e-12)
    factor = (4 / (d + 2)) ** (1 / (d + 4)) * n ** (-1 / (d + 4)) / math.sqrt(2 * d)
    assert silverman_bandwidth(Z).item() == pytest.approx(factor * rms_bandwidth(Z).item())


def test_a_factor_scales_the_rule():
    Z = _gaussian(30, 5, 3)
    for rule in BANDWIDTH_RULES:
        torch.testing.assert_close(
            resolve_bandwidth(Z, f"{rule}:0.3"), 0.3 * resolve_bandwidth(Z, rule)
        )
    assert resolve_bandwidth(Z, "median:1").item() == median_bandwidth(Z).item()


@pytest.mark.parametrize("rule", ["rms", "silverman", "median:0.5", "rms:0.1"])
def test_every_rule_is_scale_and_shift_invariant(rule):
    Z = _gaussian(60, 9, 4)
    torch.testing.assert_close(
        matrix_entropy(7.5 * Z + 3.0, sigma=rule), matrix_entropy(Z, sigma=rule), atol=1e-9, rtol=0
    )


@pytest.mark.parametrize("rule", ["rms", "silverman", "rms:0.3"])
def test_masked_padding_gives_the_trimmed_values(rule):
    Z = _gaussian(2 * 20 * 6, 1, 5).reshape(2, 20, 6)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 13:] = False
    Z[1, 13:] = float("inf")  # padding may hold anything
    H = matrix_entropy(Z, sigma=rule, mask=mask)
    assert H[0].item() == pytest.approx(matrix_entropy(Z[0], sigma=rule).item(), abs=1e-10)
    assert H[1].item() == pytest.approx(matrix_entropy(Z[1, :13], sigma=rule).item(), abs=1e-10)


def test_squared_distances_alone_do_not_tell_silverman_the_width():
    D = pairwise_sq_distances(_gaussian(10, 4, 6)).unsqueeze(0)
    with pytest.raises(ValueError, match="needs the token width"):
        gram_from_sq_distances_(D.clone(), "silverman", None)
    K = gram_from_sq_distances_(D.clone(), "silverman", None, width=4)
    sigma = silverman_bandwidth(_gaussian(10, 4, 6)).item()
    torch.testing.assert_close(K[0], torch.exp(-D[0] / (2 * sigma**2)))


@pytest.mark.parametrize("rule", ["rms", "silverman"])
def test_the_data_driven_rules_keep_their_gradient(rule):
    Z = _gaussian(8, 3, 7).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: matrix_entropy(z, alpha=2.0, sigma=rule), (Z,))
    # scale invariance with the gradient: nothing along the rescaling of the tokens
    H = matrix_entropy(Z, alpha=1.01, sigma=rule)
    (grad,) = torch.autograd.grad(H, Z)
    centred = Z.detach() - Z.detach().mean(0)
    assert abs(float((grad * centred).sum())) < 1e-10 * float(grad.norm() * centred.norm())


def test_slq_takes_the_narrow_rules_too():
    Z = _gaussian(300, 64, 8)  # more tokens than exact_max_tokens: the SLQ estimate
    exact = matrix_entropy(Z, sigma="silverman").item()
    approx = matrix_entropy(
        Z, sigma="silverman", method="slq", settings=SLQSettings(exact_max_tokens=256)
    ).item()
    assert abs(approx - exact) <= SLQ_ERROR_BOUND[0] * exact + SLQ_ERROR_BOUND[1]


# ---------------------------------------------------------------------- known inputs


@pytest.mark.parametrize("rule", [*BANDWIDTH_RULES, "rms:0.1", "median:0.3", 0.5])
def test_identical_tokens_have_zero_entropy_under_every_rule(rule):
    H = matrix_entropy(torch.full((50, 16), 3.0, dtype=torch.float64), sigma=rule)
    assert H.item() == 0.0 and math.copysign(1.0, H.item()) == 1.0


def test_near_orthogonal_tokens_reach_log_n_only_under_a_narrow_rule():
    n = 256
    Z = _gaussian(n, 2048, 9)
    for rule in NARROW:
        assert matrix_entropy(Z, sigma=rule).item() == pytest.approx(math.log2(n), abs=1e-3)
    median = matrix_entropy(Z, sigma="median").item()
    assert median < math.log2(n) - 3.0  # measured 4.0 of 8.0 bits
    # the typical distance as the bandwidth is the median rule's regime
    assert matrix_entropy(Z, sigma="rms").item() == pytest.approx(median, abs=0.05)


@pytest.mark.parametrize(
    "Z",
    [_gaussian(256, 2048, 10), _gaussian(400, 16, 11), _clusters(8, 200, 32, 0.01)],
    ids=["near-orthogonal", "gaussian", "clusters"],
)
def test_the_median_rule_at_order_two_stays_below_log2_of_2e(Z):
    # at least half of the pairs have K >= exp(-1/2): ||A||_F^2 >= e^-1 / 2
    assert matrix_entropy(Z, alpha=2.0, sigma="median").item() <= math.log2(2 * math.e)


def test_tight_clusters_count_as_log_k_under_a_narrow_rule_and_less_under_the_median():
    Z = _clusters(8, 400, 64, 0.01)  # within-cluster distances 1e-3 of the centres'
    for rule in NARROW:
        assert matrix_entropy(Z, sigma=rule).item() == pytest.approx(3.0, abs=0.01)
    assert matrix_entropy(Z, sigma="median").item() < 2.5  # measured 1.9 bits


def test_loose_clusters_count_every_token_under_a_narrow_rule():
    n = 400
    Z = _clusters(8, n, 64, 3.0)  # within-cluster distances 0.3 of the centres'
    for rule in NARROW:
        assert matrix_entropy(Z, sigma=rule).item() > math.log2(n) - 0.1
    assert matrix_entropy(Z, sigma="median").item() < 3.0


def test_proxy_of_a_noisy_copy_under_each_regime():
    n = m = 100
    P = _gaussian(n, 64, 12)
    noisy = P + 0.5 * _gaussian(m, 64, 13)
    independent = _gaussian(m, 64, 14)
    count_only = math.log2((n + m) / n)  # 1 bit: a Gram near the identity
    for rule in NARROW:
        assert abs(conditional_entropy_proxy(P, P.clone(), sigma=rule).item()) < 1e-9
        for R in (noisy, independent):
            value = conditional_entropy_proxy(P, R, sigma=rule).item()
            assert value == pytest.approx(count_only, abs=1e-3)
    # the median rule still tells the noisy copy from P and from an independent R
    median = [conditional_entropy_proxy(P, R, sigma="median").item() for R in (noisy, independent)]
    assert 0.1 < median[0] < 0.5 and 0.1 < median[1] < 0.5  # measured 0.33 and 0.24


# ---------------------------------------------------------------------- presets


def test_presets_set_the_regime_and_the_default_stays_scale_invariant():
    default = ProbeConfig()
    assert (default.preset, default.alpha, default.base, default.sigma) == ("", 1.01, 2.0, "median")
    assert default.regime == "default"
    paper = ProbeConfig(preset="paper")
    assert (paper.alpha, paper.base, paper.sigma, paper.regime) == (1.01, 2.0, "silverman", "paper")
    assert ProbeConfig(bandwidth="silverman").regime == "paper"  # the values, not the label
    assert ProbeConfig(bandwidth="rms:0.1").regime == "custom"
    assert ProbeConfig(preset="paper", alpha=1.01).regime == "paper"  # the preset's own value


@pytest.mark.parametrize(
    "kwargs, key",
    [({"bandwidth": "median"}, "bandwidth"), ({"alpha": 2.0}, "alpha"), ({"base": 2.718}, "base")],
)
def test_a_key_set_against_its_preset_is_an_error(kwargs, key):
    with pytest.raises(ConfigError, match=f"probe.{key}=.* conflicts with the preset 'paper'"):
        ProbeConfig(preset="paper", **kwargs)


def test_a_preset_in_a_file_fills_the_keys_it_sets_and_round_trips(tmp_path):
    path = tmp_path / "probe.yaml"
    path.write_text("probe:\n  preset: paper\n  batch_size: 4\n")
    cfg = load_config(ProbeRunConfig, path)
    assert (cfg.probe.sigma, cfg.probe.batch_size, cfg.probe.regime) == ("silverman", 4, "paper")
    with pytest.raises(ConfigError, match="probe.bandwidth='rms:0.1' conflicts"):
        load_config(ProbeRunConfig, path, ["probe.bandwidth=rms:0.1"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(to_yaml(cfg))  # what a run directory keeps: preset and values
    again = load_config(ProbeRunConfig, saved)
    assert again.probe == cfg.probe
    bare = load_config(ProbeRunConfig, None, ["probe.bandwidth=0.5"])
    assert (bare.probe.sigma, bare.probe.regime) == (0.5, "custom")


# ---------------------------------------------------------------------- recorded regime


@pytest.fixture
def probe_examples(tiny_splits):
    return [e for name, split in tiny_splits.items() if name.startswith("probe/") for e in split]


def test_the_paper_preset_probes_with_silverman_and_says_so(tiny_adapter, probe_examples):
    result = run_probe(tiny_adapter, probe_examples, ProbeConfig(preset="paper", batch_size=8))
    expected = {"regime": "paper", "bandwidth": "silverman", "alpha": 1.01, "base": 2.0}
    assert result.regime() == expected
    summary = result.summary()
    assert (summary["regime"], summary["bandwidth"]) == ("paper", "silverman")
    assert "regime: paper, bandwidth: silverman" in probe_table(result).splitlines()[0]
    assert probe_table(result, fmt="csv").splitlines()[1].startswith("0,paper,silverman,")
    # the values are the estimator's under that rule
    example = next(e for e in probe_examples if e.task == "understanding")
    one = run_probe(tiny_adapter, [example], ProbeConfig(preset="paper"))
    tiny_adapter.model.eval()
    with torch.no_grad():
        out = tiny_adapter.forward(tiny_adapter.encode([example]))
    tiny_adapter.model.train()
    image = out.hidden_states[:, 0][:, out.roles[0] == Role.IMAGE_PROMPT]
    np.testing.assert_allclose(
        one.records["encoding/image"].values[0],
        matrix_entropy(image, sigma="silverman").numpy(),
        atol=1e-10,
    )


def test_results_without_settings_say_their_regime_is_unknown(tiny_adapter, probe_examples):
    result = run_probe(tiny_adapter, probe_examples[:4], ProbeConfig(bandwidth="0.5"))
    assert result.regime()["regime"] == "custom" and result.regime()["bandwidth"] == 0.5
    bare = ProbeResult.from_dict({**result.to_dict(), "settings": {}})
    assert bare.regime()["regime"] == "unknown"
    assert json.loads(json.dumps(bare.summary()))["regime"] == "unknown"
    assert "regime: unknown" in probe_table(bare).splitlines()[0]
    # a result written before presets existed (no preset key) still tells its regime
    old = {k: v for k, v in result.to_dict()["settings"].items() if k != "preset"}
    old["bandwidth"] = "median"
    legacy = ProbeResult.from_dict({**result.to_dict(), "settings": old})
    assert legacy.regime()["regime"] == "default"
