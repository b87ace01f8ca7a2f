"""L_ctx's second pass after the main pass's shared prefix (unifyreg.adapters.prefix).

The reuse must be invisible in the numbers: the suffix's logits equal the full pass's
(float64, 1e-10), and L_ctx with its gradients equals the full second pass's (float32
cross-entropy, 1e-5 relative), for both ``ctx_mode``s and both toy objectives. Each test
also checks that the shorter pass really ran, so none can pass on the fallback.
"""

import pytest
import torch
from conftest import TINY_MODEL, TINY_WORLD, reuse_matches_full_pass

from unifyreg.adapters.base import (
    PrefixRequest,
    allowed_attention,
    omni_attention_mask,
    select_rows,
    shared_prefix_length,
)
from unifyreg.adapters.prefix import recorded_states
from unifyreg.adapters.toy import ToyAdapter
from unifyreg.config import LossConfig
from unifyreg.losses import ContextualPredictionLoss
from unifyreg.roles import Role as R
from unifyreg.toy.base import cache_key


def _adapter(tokenizer, objective="ar"):
    adapter = ToyAdapter.create(
        tokenizer, grid_size=TINY_WORLD.grid_size, model_config=TINY_MODEL, objective=objective
    )
    adapter.model.double()
    return adapter


def _mixed_batch(adapter, splits):
    drawing = splits["probe/text/deductive"][:3] + splits["probe/text/inductive"][:2]
    reading = splits["probe/image/logical"][:3]
    examples = [e for pair in zip(drawing, reading + drawing[:2], strict=True) for e in pair]
    return adapter.training_batch(adapter.encode(examples))


@pytest.mark.parametrize("objective", ["ar", "contextual"])
def test_the_suffix_pass_gives_the_full_pass_logits(tokenizer, tiny_splits, objective):
    adapter = _adapter(tokenizer, objective)
    batch = _mixed_batch(adapter, tiny_splits)
    rows = torch.tensor([0, 2, 4])
    sub = dict(select_rows(batch, rows))
    sub["masked_positions"] = sub["roles"] == R.IMAGE_RESPONSE  # every image input masked
    first = int((sub["roles"] == R.IMAGE_RESPONSE).int().argmax(dim=1).min())
    main = adapter.forward(
        batch, output_hidden_states=False, record_prefix=PrefixRequest(rows, first - 1)
    )
    states = main.prefix_states
    assert states is not None and len(states.layers) == adapter.num_layers
    assert states.layers[0][0].shape[0] == 3 and states.layers[0][0].shape[2] == first - 1
    full = adapter.forward(sub, output_hidden_states=False, keep_logits=True)
    short = adapter.forward(sub, output_hidden_states=False, keep_logits=True, prefix=states)
    assert short.logits.shape[1] == sub["roles"].shape[1] - (first - 1)
    torch.testing.assert_close(short.logits, full.logits[:, first - 1 :], rtol=0, atol=1e-10)
    torch.testing.assert_close(short.image_loss, full.image_loss, rtol=1e-6, atol=0)
    assert int(short.image_tokens) == int(full.image_tokens) > 0


CASES = [("ar", "bidirectional"), ("ar", "causal"), ("contextual", "bidirectional")]


@pytest.mark.parametrize(("objective", "mode"), CASES)
def test_ctx_loss_and_gradients_equal_the_full_second_pass(tokenizer, tiny_splits, objective, mode):
    drawing = tiny_splits["probe/text/deductive"][:3] + tiny_splits["probe/text/inductive"][:2]
    reading = tiny_splits["probe/image/logical"][:3]
    examples = [e for pair in zip(drawing, reading + drawing[:2], strict=True) for e in pair]
    lengths = reuse_matches_full_pass(lambda: _adapter(tokenizer, objective), examples, mode)
    assert lengths[0] == _adapter(tokenizer).encode(examples)["roles"].shape[1]


def test_the_prefix_stops_before_the_first_image_response_and_where_masks_part():
    # Row of 12: text prompt 0-3, an image prompt 4-6, text 7, the image response 8-11.
    roles = torch.tensor(
        [[R.TEXT_PROMPT] * 4 + [R.IMAGE_PROMPT] * 3 + [R.SPECIAL] + [R.IMAGE_RESPONSE] * 4]
    )
    batch = {"roles": roles, "attention_mask": torch.ones_like(roles)}
    causal = allowed_attention(batch, masked_prediction=False)
    omni = allowed_attention(batch, masked_prediction=True)
    # Same masks: the prefix ends one before the image response (its target's scorer).
    assert shared_prefix_length(omni, omni, roles) == 7
    assert shared_prefix_length(causal, causal, roles) == 7
    # A causal main pass and an omni second pass part at the image prompt's first query.
    assert shared_prefix_length(causal, omni, roles) == 4
    # An image response at position 1 leaves no prefix; a row without one, none either.
    early = torch.tensor([[R.TEXT_PROMPT, R.IMAGE_RESPONSE, R.IMAGE_RESPONSE]])
    mask = allowed_attention(
        {"roles": early, "attention_mask": torch.ones_like(early)}, masked_prediction=True
    )
    assert shared_prefix_length(mask, mask, early) == 0
    text = torch.tensor([[R.TEXT_PROMPT] * 3])
    assert shared_prefix_length(mask, mask, text) == 0


def test_the_prefix_never_cuts_through_an_image_its_queries_see_whole():
    # An omni image prompt 2-5 and an image response at 5: the largest s <= 4 whose
    # queries attend nowhere past s is 2 (the image's queries see up to position 4).
    roles = torch.tensor([[R.TEXT_PROMPT] * 2 + [R.IMAGE_PROMPT] * 3 + [R.IMAGE_RESPONSE] * 2])
    batch = {"roles": roles, "attention_mask": torch.ones_like(roles)}
    omni = allowed_attention(batch, masked_prediction=True)
    assert omni[0, 2, 4] and not omni[0, 1, 2]
    assert shared_prefix_length(omni, omni, roles) == 2


def test_allowed_attention_reads_the_batch_4d_mask():
    roles = torch.tensor([[R.TEXT_PROMPT, R.IMAGE_PROMPT, R.IMAGE_PROMPT, R.PAD]])
    attention = torch.tensor([[1, 1, 1, 0]])
    batch = {
        "roles": roles,
        "attention_mask": attention,
        "attention_mask_4d": omni_attention_mask(roles, attention),
    }
    allowed = allowed_attention(batch, 3, masked_prediction=False)
    assert allowed.shape == (1, 3, 3) and allowed[0, 1, 2]  # omni, from the 4-D mask
    del batch["attention_mask_4d"]
    assert not allowed_attention(batch, 3, masked_prediction=False)[0, 1, 2]  # causal
    assert allowed_attention(batch, masked_prediction=True)[0, 1, 2]
    assert not allowed_attention(batch, masked_prediction=True)[0, 0, 3]  # padding key


def test_no_prefix_when_switched_off_or_the_adapter_cannot(tokenizer, tiny_splits):
    adapter = _adapter(tokenizer)
    batch = _mixed_batch(adapter, tiny_splits)
    on = ContextualPredictionLoss(LossConfig(w_ctx=1.0), adapter.hidden_size)
    plan = on.plan(adapter, batch)
    assert plan is not None and plan.prefix is not None and plan.prefix.length > 0
    off = ContextualPredictionLoss(
        LossConfig(w_ctx=1.0, ctx_reuse_prefix=False), adapter.hidden_size
    )
    assert off.plan(adapter, batch).prefix is None
    adapter.supports_prefix_reuse = False  # an instance attribute shadows the class's
    assert on.plan(adapter, batch).prefix is None
    assert (
        ContextualPredictionLoss(LossConfig(w_div=1.0), adapter.hidden_size).plan(adapter, batch)
        is None
    )


def test_a_pass_that_recorded_nothing_falls_back_to_the_full_second_pass(tokenizer, tiny_splits):
    request = PrefixRequest(torch.tensor([0]), 3)
    assert recorded_states(request, [], expected_layers=2) is None  # the model dropped it
    assert recorded_states(None, None, expected_layers=2) is None
    adapter = _adapter(tokenizer)
    batch = _mixed_batch(adapter, tiny_splits)
    term = ContextualPredictionLoss(LossConfig(w_ctx=1.0), adapter.hidden_size).double()
    state = term.get_rng_state()
    plan = term.plan(adapter, batch)
    without = adapter.forward(batch, output_hidden_states=False)  # no record_prefix
    assert without.prefix_states is None
    term.set_rng_state(state)
    ctx_plain, tokens_plain = term.contextual_prediction(adapter, batch)
    ctx, tokens = term.contextual_prediction(adapter, batch, without, plan)
    torch.testing.assert_close(ctx, ctx_plain)
    assert int(tokens) == int(tokens_plain) > 0


def test_a_replay_the_model_ignores_is_an_error(tokenizer, tiny_splits):
    adapter = _adapter(tokenizer)
    batch = _mixed_batch(adapter, tiny_splits)
    rows = torch.tensor([0])
    main = adapter.forward(batch, output_hidden_states=False, record_prefix=PrefixRequest(rows, 3))
    adapter.model.gradient_checkpointing_enable()
    adapter.model.train()
    with pytest.raises(RuntimeError, match="ctx_reuse_prefix=false"):
        adapter.forward(
            select_rows(batch, rows), output_hidden_states=False, prefix=main.prefix_states
        )
    with pytest.raises(ValueError, match="output_hidden_states=False"):
        adapter.forward(select_rows(batch, rows), prefix=main.prefix_states)


def test_the_switch_leaves_base_cache_keys_alone():
    from unifyreg.config import PretrainToyConfig

    switched = PretrainToyConfig()
    switched.loss.w_ctx = 1.0
    default = PretrainToyConfig()
    default.loss.w_ctx = 1.0
    switched.loss.ctx_reuse_prefix = False
    # An implementation choice with the same loss: a base trained either way is the same.
    assert cache_key(default) == cache_key(switched)
    switched.loss.mask_ratio = 0.25
    assert cache_key(default) != cache_key(switched)
