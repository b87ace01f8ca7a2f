"""Contextual prediction, the real one: the toy's ``contextual`` objective (omni attention,
masked image tokens, MaskGIT decoding), the bidirectional ``L_ctx`` and the comparison
arms' training-data variants (RecA-style partial views, reason-then-draw)."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_MODEL
from unifyreg.adapters.base import cosine_masked_positions, omni_attention_mask
from unifyreg.adapters.toy import MAX_REASONING_WORDS, ToyAdapter, maskgit_remaining
from unifyreg.config import ConfigError, LossConfig, load_config
from unifyreg.losses import ContextualPredictionLoss
from unifyreg.roles import Role
from unifyreg.toy.tasks import GENERATORS, OBJECTS
from unifyreg.toy.variants import apply_variant, reason_then_draw, reca


@pytest.fixture
def contextual(tokenizer):
    return ToyAdapter.create(
        tokenizer, grid_size=4, model_config=TINY_MODEL, objective="contextual"
    )


def _last_hidden(adapter, batch):
    with torch.no_grad():
        return adapter.forward(batch, layers=[-1]).hidden_layers[0]


# ---------------------------------------------------------------------- attention


def test_omni_mask_is_causal_text_and_whole_images():
    R = Role
    roles = torch.tensor(
        [[R.SPECIAL, R.TEXT_PROMPT, R.SPECIAL, R.IMAGE_PROMPT, R.IMAGE_PROMPT, R.SPECIAL,
          R.TEXT_RESPONSE, R.PAD]]
    )  # fmt: skip
    mask = omni_attention_mask(roles, (roles != R.PAD).long())[0, 0]
    allowed = mask == 0
    assert allowed[3, 4] and allowed[4, 3]  # the two image tokens see each other
    assert not allowed[1, 2] and not allowed[2, 3]  # text and specials stay causal
    assert allowed[6, :7].all() and not allowed[6, 7]  # padding keys are blocked
    assert not allowed[3, 5]  # an image token does not see the <eoi> after it
    assert torch.isfinite(mask).all()


def test_image_positions_see_their_whole_image_and_no_later_text(contextual, tiny_splits):
    example = tiny_splits["probe/image/attribute"][0]  # question, image prompt, answer word
    batch = contextual.encode([example])
    roles = batch["roles"][0]
    image = torch.nonzero(roles == Role.IMAGE_PROMPT).flatten()
    answer = torch.nonzero(roles == Role.TEXT_RESPONSE).flatten()
    first, last = int(image[0]), int(image[-1])
    reference = _last_hidden(contextual, batch)
    later_image = {k: v.clone() for k, v in batch.items()}
    ids = contextual.tokenizer.image_token_ids
    current = int(later_image["input_ids"][0, last])
    later_image["input_ids"][0, last] = ids[0] if current != ids[0] else ids[1]
    changed = _last_hidden(contextual, later_image)
    assert not torch.allclose(changed[0, first], reference[0, first])  # sees a later cell
    later_text = {k: v.clone() for k, v in batch.items()}
    later_text["input_ids"][0, int(answer[0])] = contextual.tokenizer.encode_text("yes")[0]
    assert torch.equal(_last_hidden(contextual, later_text)[0, : int(answer[0])],
                       reference[0, : int(answer[0])])  # fmt: skip
    # An ar model: the first image token sees no later cell.
    ar = ToyAdapter(contextual.model, contextual.tokenizer, 4, objective="ar")
    plain = ar.encode([example])
    assert "attention_mask_4d" not in plain
    plain_changed = {k: v.clone() for k, v in plain.items()}
    plain_changed["input_ids"][0, last] = later_image["input_ids"][0, last]
    assert torch.equal(_last_hidden(ar, plain)[0, :last], _last_hidden(ar, plain_changed)[0, :last])


# ---------------------------------------------------------------------- the objective


def test_training_batches_mask_a_cosine_share_of_each_response_image(contextual, tiny_splits):
    examples = [e for e in tiny_splits["pretrain"] if e.answers_with_image][:64]
    batch = contextual.encode(examples)
    torch.manual_seed(3)
    masked = contextual.training_batch(batch)["masked_positions"]
    torch.manual_seed(3)
    assert torch.equal(masked, contextual.training_batch(batch)["masked_positions"])
    is_image = batch["roles"] == Role.IMAGE_RESPONSE
    assert not (masked & ~is_image).any()  # only response-image cells
    per_row = masked.sum(1)
    assert (per_row >= 1).all() and (per_row <= 16).all()
    # The share is ceil(16 cos(pi/2 u)) / 16 for u ~ U(0, 1): its mean, by quadrature.
    u = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000
    expected = float(torch.ceil(16 * torch.cos(math.pi / 2 * u)).clamp_min(1).mean() / 16)
    shares = torch.cat([cosine_masked_positions(batch["roles"]).sum(1) / 16.0 for _ in range(40)])
    assert abs(float(shares.mean()) - expected) < 0.02  # 2,560 rows: standard error ~0.006
    texts = [e for e in tiny_splits["pretrain"] if not e.answers_with_image][:4]
    assert not contextual.training_batch(contextual.encode(texts))["masked_positions"].any()


def test_only_masked_positions_are_scored_at_their_own_position(contextual, tiny_splits):
    examples = [e for e in tiny_splits["pretrain"] if e.answers_with_image][:6]
    batch = contextual.training_batch(contextual.encode(examples))
    masked = batch["masked_positions"]
    out = contextual.forward(batch, keep_logits=True)
    expected = F.cross_entropy(out.logits[masked].float(), batch["input_ids"][masked])
    assert int(out.image_tokens) == int(masked.sum())
    torch.testing.assert_close(out.image_loss, expected)
    # The masked inputs are <mask>: the same batch with <mask> ids written in gives the same.
    written = {k: v.clone() for k, v in batch.items() if k != "masked_positions"}
    written["input_ids"][masked] = contextual.tokenizer.mask_id
    with torch.no_grad():
        again = contextual.forward(written, keep_logits=True).logits
    torch.testing.assert_close(again, out.logits.detach(), rtol=0, atol=1e-6)
    # Without masked positions a contextual model scores no image token.
    plain = contextual.forward(contextual.encode(examples))
    assert int(plain.image_tokens) == 0 and float(plain.image_loss) == 0.0


def test_maskgit_commits_every_cell_within_k_steps(contextual, tiny_splits):
    assert [maskgit_remaining(16, s, 4) for s in range(4)] == [14, 11, 6, 0]
    examples = [e for e in tiny_splits["eval"] if e.answers_with_image][:5]
    for steps in (1, 3, 8):
        contextual.decode_steps = steps
        prefixes = contextual._reasoning_prefixes(examples, 8)
        rows, passes = contextual._maskgit(prefixes, 8)
        assert passes <= steps
        assert all(len(row) == 16 for row in rows)
        assert all(t in contextual.tokenizer.image_token_ids for row in rows for t in row)
    grids = contextual.generate_images(examples)
    assert all(g.shape == (4, 4) for g in grids)


def test_contextual_settings_round_trip(contextual, tmp_path):
    contextual.decode_steps = 5
    contextual.save(tmp_path / "m")
    loaded = ToyAdapter.load(tmp_path / "m")
    assert (loaded.objective, loaded.decode_steps, loaded.reason_before_drawing) == (
        "contextual",
        5,
        False,
    )
    with pytest.raises(ValueError, match="objective must be one of ar, contextual"):
        ToyAdapter(contextual.model, contextual.tokenizer, 4, objective="diffusion")


# ---------------------------------------------------------------------- L_ctx modes


def test_bidirectional_ctx_scores_masked_cells_through_the_learned_mask(tiny_adapter, tiny_splits):
    examples = [e for e in tiny_splits["pretrain"] if e.answers_with_image][:8]
    batch = tiny_adapter.encode(examples)
    term = ContextualPredictionLoss(
        LossConfig(w_ctx=1.0, ctx_mode="bidirectional", ctx_row_fraction=1.0),
        tiny_adapter.hidden_size,
    )
    loss, tokens = term.contextual_prediction(tiny_adapter, batch)
    assert 8 <= int(tokens) <= 8 * 16 and torch.isfinite(loss)
    loss.backward()
    assert term.mask_embedding.grad is not None and term.mask_embedding.grad.abs().sum() > 0
    causal = ContextualPredictionLoss(
        LossConfig(w_ctx=1.0, ctx_mode="causal", ctx_row_fraction=1.0), tiny_adapter.hidden_size
    )
    _, causal_tokens = causal.contextual_prediction(tiny_adapter, batch)
    assert int(causal_tokens) == 8 * 16  # next-token: every image target

    class NoMasks:
        name = "plain"

    with pytest.raises(ValueError, match="ctx_mode=bidirectional needs an adapter"):
        term.contextual_prediction(NoMasks(), batch)


def test_finetune_refuses_ctx_modes_the_model_cannot_take(tiny_base_overrides, tmp_path, capsys):
    from unifyreg.cli import main
    from unifyreg.config import FinetuneConfig, PretrainToyConfig
    from unifyreg.toy.base import build_toy_base

    args = ["finetune", "--dry-run", *tiny_base_overrides, f"run_dir={tmp_path / 'r'}"]
    assert main([*args, "loss.w_ctx=1", "loss.ctx_mode=bidirectional"]) == 0
    # A contextual base: next-token image targets would be visible to it.
    overrides = [item.removeprefix("pretrain.") for item in tiny_base_overrides]
    build_toy_base(
        load_config(PretrainToyConfig, None, [*overrides, "objective=contextual"]),
        log=lambda *_: None,
    )
    contextual = [*args, "pretrain.objective=contextual", "loss.w_ctx=1"]
    assert main([*contextual, "loss.ctx_mode=causal"]) == 2
    assert "use loss.ctx_mode=bidirectional" in capsys.readouterr().err
    assert main([*contextual, "loss.ctx_mode=bidirectional"]) == 0
    with pytest.raises(ConfigError, match="loss.ctx_mode must be one of causal, bidirectional"):
        load_config(FinetuneConfig, None, ["loss.ctx_mode=sideways"])


# ---------------------------------------------------------------------- variants


def test_reca_adds_one_partial_view_reconstruction_per_drawing(tiny_adapter, tiny_splits):
    examples = tiny_splits["finetune"]
    drawings = [e for e in examples if e.task in ("t2i", "transfer")]
    out = reca(examples)
    added = out[len(examples) :]
    assert len(added) == len(drawings) and out[: len(examples)] == list(examples)
    assert reca(examples) == out  # the same data every time
    one = added[0]
    assert one.task == "reconstruction" and (one.prompt_image == one.response_image).all()
    ids, roles, _ = tiny_adapter.encode_example(one)
    image = [i for i, r in zip(ids, roles, strict=True) if r == Role.IMAGE_PROMPT]
    hidden = {tuple(c) for c in one.meta["hidden_cells"]}
    assert len(hidden) == 8
    for index, token in enumerate(image):
        cell = divmod(index, 4)
        masked = token == tiny_adapter.tokenizer.mask_id
        assert masked == (cell in hidden)  # hidden cells are <mask>, the others shown


def test_reason_then_draw_writes_the_fact_before_the_image(tiny_adapter, tiny_splits):
    examples = tiny_splits["finetune"]
    out = reason_then_draw(examples)
    deductive = [e for e in out if e.task == "t2i" and e.category == "deductive"]
    direct = [e for e in out if e.task == "t2i" and e.category == "direct"]
    for e in deductive:  # the fact used and what is drawn
        place = e.prompt_text.split(" in ", 1)[1]
        colour = e.meta["colour"]
        assert e.response_text == f"{e.meta['object']} is {colour} so {place} is {colour}"
    assert deductive and all(e.response_text == "" for e in direct)
    # Word for word the answer of the drawing's text_reasoning twin ("describe <prompt>").
    rng = random.Random(0)
    twins = {}
    for category in ("text_deductive", "text_abductive"):
        for _ in range(4000):
            e = GENERATORS[("text_reasoning", category)](rng, 4, OBJECTS)
            twins[e.prompt_text] = e.response_text
    reasoned = [
        e for e in out if e.category in ("deductive", "abductive") and e.response_image is not None
    ]
    matched = [e for e in reasoned if f"describe {e.prompt_text}" in twins]
    assert {e.category for e in matched} == {"deductive", "abductive"}
    assert all(e.response_text == twins[f"describe {e.prompt_text}"] for e in matched)
    assert max(len(answer.split()) for answer in twins.values()) <= MAX_REASONING_WORDS
    tok = tiny_adapter.tokenizer
    ids, roles, targets = tiny_adapter.encode_example(deductive[0])
    sep = ids.index(tok.sep_id)
    boi = ids.index(tok.boi_id, sep)
    assert tok.decode_text(ids[sep + 1 : boi]) == deductive[0].response_text
    assert all(r == Role.TEXT_RESPONSE for r in roles[sep + 1 : boi])
    assert targets[boi] == 1  # the model writes <boi> itself (a text target)
    ids, roles, targets = tiny_adapter.encode_example(direct[0])  # nothing to state
    sep = ids.index(tok.sep_id)
    assert ids[sep + 1] == tok.boi_id and targets[sep + 1] == 1
    assert Role.TEXT_RESPONSE not in roles
    batch = tiny_adapter.encode(out)  # every example of the variant encodes
    assert batch["input_ids"].shape[0] == len(out)
    plain = tiny_adapter.encode_example(tiny_splits["finetune"][0])
    assert apply_variant("", examples) == list(examples)
    with pytest.raises(ValueError, match="unknown data variant 'mixup'"):
        apply_variant("mixup", examples)
    assert plain  # encodes
    tiny_adapter.reason_before_drawing = True
    grids = tiny_adapter.generate_images(tiny_splits["heldout"][:3])
    assert all(g.shape == (4, 4) for g in grids)
    assert len(tiny_adapter.generate_reasoning(tiny_splits["heldout"][:3])) == 3
