"""Tests of the contextual-prediction regularizer: formulas, masking, gradients, wiring."""

import pytest
import torch

from unifyreg.config import ConfigError, FinetuneConfig, LossConfig, OptimConfig, load_config
from unifyreg.losses import ContextualPredictionLoss, divergence_loss
from unifyreg.module import UMMModule
from unifyreg.roles import Role

R = Role


def _two_modalities(text_tokens, image_tokens):
    """Sample 0: text prompt + image response; sample 1: image prompt + text response."""
    roles = torch.tensor(
        [
            [R.TEXT_PROMPT] * 4 + [R.IMAGE_RESPONSE] * 4,
            [R.IMAGE_PROMPT] * 4 + [R.TEXT_RESPONSE] * 4,
        ]
    )
    hidden = torch.zeros(3, 2, 8, 6, dtype=torch.float64)
    hidden[:, 0, :4] = text_tokens
    hidden[:, 1, :4] = image_tokens
    g = torch.Generator().manual_seed(0)
    hidden[:, :, 4:] = torch.randn(3, 2, 4, 6, generator=g, dtype=torch.float64)
    return hidden, roles


def test_encoding_divergence_is_zero_for_equal_trajectories_and_positive_otherwise():
    tokens = torch.randn(4, 6, dtype=torch.float64)
    hidden, roles = _two_modalities(tokens, tokens)
    same, used = divergence_loss(hidden, roles, parts=("encoding",))
    assert used == 1 and same.item() == pytest.approx(0.0, abs=1e-12)
    collapsed = tokens[:1].expand(4, 6)  # identical image tokens: entropy 0
    hidden, roles = _two_modalities(tokens, collapsed)
    different, _ = divergence_loss(hidden, roles, parts=("encoding",))
    assert different.item() > 0.1


def test_divergence_without_both_modalities_contributes_zero():
    hidden, roles = _two_modalities(torch.randn(4, 6), torch.randn(4, 6))
    value, used = divergence_loss(hidden[:, :1], roles[:1])  # only the text-prompt sample
    assert used == 0 and value.item() == 0.0


def test_divergence_gradients_are_finite_and_non_zero():
    hidden, roles = _two_modalities(torch.randn(4, 6), 0.1 * torch.randn(4, 6))
    hidden.requires_grad_(True)
    value, used = divergence_loss(hidden, roles)
    value.backward()
    assert used == 2
    assert torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0


def test_non_finite_hidden_states_make_the_divergence_contribute_zero():
    hidden, roles = _two_modalities(torch.randn(4, 6), torch.randn(4, 6))
    hidden[1, 1, 0, 0] = float("nan")
    value, used = divergence_loss(hidden, roles, parts=("encoding",))
    assert used == 0 and value.item() == 0.0


def test_contextual_prediction_masks_only_image_response_inputs(tiny_adapter, tiny_splits):
    batch = tiny_adapter.encode(
        tiny_splits["probe/text/composition"][:2] + tiny_splits["probe/image/logical"][:2]
    )
    seen = {}
    original = tiny_adapter.forward

    def spy(batch, **kwargs):
        hook = kwargs["embedding_hook"]
        plain = tiny_adapter.input_embeddings(batch)
        seen["changed"] = (hook(plain, batch) != plain).any(-1)
        seen["roles"] = batch["roles"]
        return original(batch, **kwargs)

    config = LossConfig(w_ctx=1.0, ctx_mode="causal", mask_ratio=0.9, ctx_row_fraction=1.0)
    loss = ContextualPredictionLoss(config, tiny_adapter.hidden_size)
    tiny_adapter.forward = spy
    try:
        ctx, tokens = loss.contextual_prediction(tiny_adapter, batch)
    finally:
        tiny_adapter.forward = original
    # Only the two drawing rows (the ones with image responses) run the second pass.
    assert seen["roles"].shape[0] == 2
    image_positions = seen["roles"] == R.IMAGE_RESPONSE
    assert seen["changed"].any()
    assert not (seen["changed"] & ~image_positions).any()
    assert int(tokens) == int((batch["roles"] == R.IMAGE_RESPONSE).sum()) and torch.isfinite(ctx)
    ctx.backward()
    assert loss.mask_embedding.grad is not None and loss.mask_embedding.grad.abs().sum() > 0


def test_contextual_prediction_with_no_masking_equals_the_image_loss(tiny_adapter, tiny_splits):
    batch = tiny_adapter.encode(tiny_splits["probe/text/deductive"][:3])
    config = LossConfig(w_ctx=1.0, ctx_mode="causal", mask_ratio=0.0, ctx_row_fraction=1.0)
    loss = ContextualPredictionLoss(config, tiny_adapter.hidden_size)
    ctx, _ = loss.contextual_prediction(tiny_adapter, batch)
    plain = tiny_adapter.forward(batch, output_hidden_states=False)
    torch.testing.assert_close(ctx, plain.image_loss)


def test_ctx_runs_on_a_trimmed_random_subset_of_the_image_rows(tiny_adapter, tiny_splits):
    drawing = tiny_splits["probe/text/deductive"][:3] + tiny_splits["probe/text/inductive"][:3]
    reading = tiny_splits["probe/image/logical"][:3] + tiny_splits["probe/image/coarse"][:3]
    examples = [e for pair in zip(drawing, reading, strict=True) for e in pair]  # interleaved
    batch = tiny_adapter.encode(examples)
    image_rows = (batch["roles"] == R.IMAGE_RESPONSE).any(dim=1)
    config = LossConfig(
        w_ctx=1.0, ctx_mode="causal", mask_ratio=0.0, ctx_row_fraction=0.25
    )  # ceil(3) rows of 12
    loss = ContextualPredictionLoss(config, tiny_adapter.hidden_size)
    chosen = set()
    for _ in range(6):
        rows = loss.context_rows(batch)
        assert rows["roles"].shape[0] == 3
        assert (rows["roles"] == R.IMAGE_RESPONSE).any(dim=1).all()
        # trimmed: the longest kept row fills the width exactly
        assert (rows["roles"] != R.PAD).sum(dim=1).max() == rows["roles"].shape[1]
        for name in ("input_ids", "attention_mask", "target_kind"):
            assert rows[name].shape == rows["roles"].shape
        chosen.add(tuple(rows["input_ids"][:, 1].tolist()))
    assert len(chosen) > 1  # a fresh draw each step
    assert int(image_rows.sum()) == 6
    # With nothing masked, L_ctx is the image loss of exactly the kept rows.
    generator_state = loss.get_rng_state()
    rows = loss.context_rows(batch)
    loss.set_rng_state(generator_state)
    ctx, tokens = loss.contextual_prediction(tiny_adapter, batch)
    plain = tiny_adapter.forward(rows, output_hidden_states=False)
    torch.testing.assert_close(ctx, plain.image_loss)
    assert int(tokens) == 3 * 16


def test_text_only_batch_gives_zero_ctx_term(tiny_adapter, tiny_splits):
    batch = tiny_adapter.encode(tiny_splits["probe/image/coarse"][:3])  # text answers only
    loss = ContextualPredictionLoss(LossConfig(w_ctx=1.0), tiny_adapter.hidden_size)
    out = tiny_adapter.forward(batch, output_hidden_states=False)
    total, logs = loss(tiny_adapter, batch, out, step=0)
    assert total.item() == 0.0 and logs["loss/ctx_tokens"].item() == 0


def test_weights_warm_up_linearly():
    loss = ContextualPredictionLoss(LossConfig(w_ctx=2.0, warmup_steps=10), hidden_size=4)
    assert [loss.weight(2.0, s) for s in (0, 5, 10, 50)] == [0.0, 1.0, 2.0, 2.0]


def test_a_training_step_adds_weighted_terms_and_updates_the_mask_embedding(
    tiny_adapter, tiny_splits
):
    config = LossConfig(w_ctx=0.5, w_div=2.0)
    term = ContextualPredictionLoss(config, tiny_adapter.hidden_size)
    module = UMMModule(
        tiny_adapter,
        OptimConfig(lr=1e-2, warmup_steps=0),
        total_steps=10,
        loss_terms=[term],
        hidden_states_for_terms=True,
    )
    logged = {}
    module.log_dict = lambda d, **k: logged.update(d)
    module.log = lambda *a, **k: None
    examples = tiny_splits["probe/text/composition"][:3] + tiny_splits["probe/image/attribute"][:3]
    batch = tiny_adapter.encode(examples)
    term._generator.manual_seed(7)
    total = module.training_step(batch, 0)
    expected = logged["loss/task"] + 0.5 * logged["loss/ctx"] + 2.0 * logged["loss/div"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logged["loss/div_parts"] == 2.0
    optimizer = module.configure_optimizers()["optimizer"]
    assert any(p is term.mask_embedding for g in optimizer.param_groups for p in g["params"])
    before = term.mask_embedding.detach().clone()
    total.backward()
    optimizer.step()
    assert not torch.equal(before, term.mask_embedding.detach())


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.w_ctx=-1", "loss.w_ctx must be a finite number >= 0"),
        ("loss.w_div=inf", "loss.w_div must be a finite number >= 0"),
        ("loss.mask_ratio=1.0", r"loss.mask_ratio must be in \[0, 1\)"),
        ("loss.ctx_row_fraction=0", r"loss.ctx_row_fraction must be in \(0, 1\]"),
        ("loss.div_dtype=float16", "loss.div_dtype must be one of float32, float64"),
        ("probe_figures=often", "probe_figures must be one of end, every, never"),
        ("loss.div_alpha=0", "loss.div_alpha must be a finite number > 0"),
        ("loss.div_parts=[style]", r"loss.div_parts\[0\] must be one of encoding, response"),
        ("loss.warmup_steps=-3", "loss.warmup_steps must be an integer >= 0"),
    ],
)
def test_bad_loss_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(FinetuneConfig, None, [override])


def _mixed_batch(adapter, splits, n=4):
    examples = splits["probe/text/composition"][:n] + splits["probe/image/attribute"][:n]
    return adapter.encode(examples)


def test_all_weights_zero_equals_the_baseline_exactly(tiny_adapter, tiny_splits):
    batch = _mixed_batch(tiny_adapter, tiny_splits)
    baseline = UMMModule(tiny_adapter, OptimConfig(), total_steps=10)
    term = ContextualPredictionLoss(LossConfig(w_ctx=0.0, w_div=0.0), tiny_adapter.hidden_size)
    regularized = UMMModule(tiny_adapter, OptimConfig(), total_steps=10, loss_terms=[term])
    for module in (baseline, regularized):
        module.log_dict = lambda *a, **k: None
        module.log = lambda *a, **k: None
    assert torch.equal(baseline.training_step(batch, 0), regularized.training_step(batch, 0))


def test_ctx_masks_image_positions_at_the_configured_ratio(tiny_adapter, tiny_splits):
    examples = [e for k, v in tiny_splits.items() if k.startswith("probe/text/") for e in v]
    batch = tiny_adapter.encode(examples)
    config = LossConfig(w_ctx=1.0, ctx_mode="causal", mask_ratio=0.3, ctx_row_fraction=1.0)
    loss = ContextualPredictionLoss(config, tiny_adapter.hidden_size)
    fractions = []
    original = tiny_adapter.forward

    def spy(batch, **kwargs):
        plain = tiny_adapter.input_embeddings(batch)
        changed = (kwargs["embedding_hook"](plain, batch) != plain).any(-1)
        image = batch["roles"] == R.IMAGE_RESPONSE
        fractions.append(changed[image].float().mean().item())
        return original(batch, **kwargs)

    tiny_adapter.forward = spy
    try:
        for _ in range(5):
            loss.contextual_prediction(tiny_adapter, batch)
    finally:
        tiny_adapter.forward = original
    # 5 draws over len(examples) * 16 image positions each: the mean is within 0.05.
    assert sum(fractions) / len(fractions) == pytest.approx(0.3, abs=0.05)


def test_a_few_steps_on_l_div_alone_reduce_the_divergence(tiny_adapter, tiny_splits):
    # Plain SGD: the median bandwidth is re-estimated (detached) each step, so L_div is a
    # moving target; small unnormalised steps follow it down (see README, caveats).
    batch = _mixed_batch(tiny_adapter, tiny_splits)
    optimizer = torch.optim.SGD(tiny_adapter.model.parameters(), lr=1e-2)

    def divergence():
        out = tiny_adapter.forward(batch)
        return divergence_loss(out.hidden_states, out.roles)[0]

    values = []
    for _ in range(15):
        value = divergence()
        values.append(value.item())
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    after = divergence().item()
    assert values[1] < values[0] and after < 0.8 * values[0]


def test_adam_on_l_div_lowers_it_with_the_differentiable_bandwidth(tiny_adapter, tiny_splits):
    # The default bandwidth keeps its gradient; with a detached median, Adam follows the
    # scale direction the re-estimated bandwidth undoes, and L_div does not fall (README).
    import copy

    initial = copy.deepcopy(tiny_adapter.model.state_dict())
    finals = {}
    for bandwidth in ("median_differentiable", "median"):
        adapter = tiny_adapter
        adapter.model.load_state_dict(initial)
        batch = _mixed_batch(adapter, tiny_splits)
        optimizer = torch.optim.Adam(adapter.model.parameters(), lr=1e-3)
        values = []
        for _ in range(30):
            out = adapter.forward(batch)
            value = divergence_loss(out.hidden_layers, out.roles, bandwidth=bandwidth)[0]
            values.append(value.item())
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        finals[bandwidth] = (values[0], min(values[-5:]))
    start, end = finals["median_differentiable"]
    assert end < 0.5 * start
    assert finals["median"][1] > end


def test_l_div_in_float32_matches_float64_and_ignores_autocast(tiny_adapter, tiny_splits):
    batch = _mixed_batch(tiny_adapter, tiny_splits)
    results = {}
    for name, dtype, autocast in (
        ("f64", torch.float64, False),
        ("f32", torch.float32, False),
        ("f32 autocast", torch.float32, True),
    ):
        tiny_adapter.model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = tiny_adapter.forward(batch)
        hidden = [h.float() for h in out.hidden_layers]  # the model's part in float32
        value, used = divergence_loss(hidden, out.roles, dtype=dtype)
        value.backward()
        params = [p for p in tiny_adapter.model.parameters() if p.grad is not None]
        grad = torch.cat([p.grad.flatten() for p in params])
        results[name] = (value.detach(), grad.clone(), used)
    (v64, g64, used64), (v32, g32, used32) = results["f64"], results["f32"]
    assert used64 == used32 == 2 and v32.dtype == torch.float64
    # The documented tolerance of the float32 default: 1e-4 relative on the value.
    assert abs(v32 - v64) <= 1e-4 * abs(v64)
    assert torch.nn.functional.cosine_similarity(g32, g64, dim=0) > 0.999
    # Autocast changes the model's forward, not the estimator: its L_div is computed in
    # float32 from (bf16-rounded) hidden states and stays finite and positive.
    v_auto = results["f32 autocast"][0]
    assert torch.isfinite(v_auto) and v_auto > 0


def test_gradients_are_finite_under_bf16_autocast(tiny_adapter, tiny_splits):
    batch = _mixed_batch(tiny_adapter, tiny_splits)
    term = ContextualPredictionLoss(LossConfig(w_ctx=1.0, w_div=1.0), tiny_adapter.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_adapter.forward(batch)
        total, logs = term(tiny_adapter, batch, out, step=0)
    (out.task_loss + total).backward()
    grads = [p.grad for p in tiny_adapter.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(term.mask_embedding.grad).all() and logs["loss/div_parts"] == 2


@pytest.mark.parametrize("family", ["emu3", "janus", "chameleon"])
def test_every_real_adapter_computes_both_terms(family, tmp_path, tiny_splits):
    import importlib

    from PIL import Image

    from unifyreg.adapters import get_adapter_class
    from unifyreg.manifest import ManifestExample
    from unifyreg.toy import render_grid

    module = importlib.import_module(f"unifyreg.adapters.{family}")
    adapter = get_adapter_class(family).load(getattr(module, f"save_tiny_{family}")(tmp_path))
    t2i, understanding = (
        tiny_splits["probe/text/composition"][0],
        tiny_splits["probe/image/logical"][0],
    )
    examples = [
        ManifestExample(
            "composition",
            t2i.prompt_text,
            response_image=Image.fromarray(render_grid(t2i.response_image)),
        ),
        ManifestExample(
            "logical",
            understanding.prompt_text,
            prompt_image=Image.fromarray(render_grid(understanding.prompt_image)),
            response_text=understanding.response_text,
        ),
    ]
    batch = adapter.encode(examples)
    term = ContextualPredictionLoss(LossConfig(w_ctx=1.0, w_div=1.0), adapter.hidden_size)
    out = adapter.forward(batch)
    total, logs = term(adapter, batch, out, step=0)
    assert torch.isfinite(total) and logs["loss/ctx_tokens"] > 0 and logs["loss/div_parts"] == 2
    total.backward()
    assert (
        torch.isfinite(term.mask_embedding.grad).all() and term.mask_embedding.grad.abs().sum() > 0
    )
