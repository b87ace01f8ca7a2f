"""Tests of the adapter seam on the toy model: roles, losses, hidden states, generation, I/O."""

import numpy as np
import pytest
import torch

from unifyreg.adapters import available_adapters, get_adapter_class
from unifyreg.adapters.toy import ToyAdapter
from unifyreg.roles import Role
from unifyreg.toy import Example

R = Role


def _examples():
    grid = np.zeros((4, 4), dtype=np.int64)
    grid[0, :] = 2  # top row green
    scene = np.eye(4, dtype=np.int64) * 3
    return [
        Example("t2i", "direct", "top row green", response_image=grid),
        Example("understanding", "attribute", "what colour is cell one one", scene, "blue"),
        Example("text", "knowledge", "what colour is grass", response_text="green"),
    ]


def test_registry_knows_toy_and_names_valid_choices():
    assert "toy" in available_adapters()
    assert get_adapter_class("toy") is ToyAdapter
    with pytest.raises(ValueError, match="unknown adapter 'gpt5'.*toy"):
        get_adapter_class("gpt5")


def test_roles_and_targets_position_by_position(tiny_adapter):
    batch = tiny_adapter.encode(_examples())
    t2i, understanding, text = batch["roles"].tolist()
    prompt = ["top", "row", "green"]
    assert t2i == [
        R.SPECIAL,
        *[R.TEXT_PROMPT] * 3,
        R.SPECIAL,
        R.SPECIAL,
        *[R.IMAGE_RESPONSE] * 16,
        R.SPECIAL,
        R.SPECIAL,
    ] + [R.PAD] * (len(t2i) - 24)
    # Layout 2: the question comes before the image it is about.
    assert understanding[:7] == [R.SPECIAL, *[R.TEXT_PROMPT] * 6]
    assert understanding[7:25] == [R.SPECIAL, *[R.IMAGE_PROMPT] * 16, R.SPECIAL]
    assert understanding[25:] == [R.SPECIAL, R.TEXT_RESPONSE, R.SPECIAL]
    assert text[:8] == [R.SPECIAL, *[R.TEXT_PROMPT] * 4, R.SPECIAL, R.TEXT_RESPONSE, R.SPECIAL]
    assert all(r == R.PAD for r in text[8:])
    tok = tiny_adapter.tokenizer
    ids = batch["input_ids"][0].tolist()
    assert ids[:5] == [tok.bos_id, *tok.encode_text(" ".join(prompt)), tok.sep_id]
    assert ids[6:22] == tok.encode_grid(_examples()[0].response_image)
    # Targets: the 16 grid tokens (image); the answer word and its <eos> (text).
    kinds = batch["target_kind"]
    assert kinds[0].tolist().count(2) == 16 and kinds[0].tolist().count(1) == 0
    assert kinds[2].tolist()[6:8] == [1, 1] and kinds[2].sum() == 2
    assert torch.equal(batch["attention_mask"].bool(), batch["roles"] != R.PAD)


def test_forward_gives_all_layers_and_finite_losses(tiny_adapter):
    batch = tiny_adapter.encode(_examples())
    out = tiny_adapter.forward(batch)
    L = tiny_adapter.num_layers
    assert out.hidden_states.shape == (L + 1, 3, batch["input_ids"].shape[1], 32)
    assert out.layers == tuple(range(L + 1))
    embeddings = tiny_adapter.model.get_input_embeddings()(batch["input_ids"])
    torch.testing.assert_close(out.hidden_states[0], embeddings)
    assert int(out.image_tokens) == 16 and int(out.text_tokens) == 4
    for loss in (out.text_loss, out.image_loss, out.task_loss):
        assert torch.isfinite(loss) and loss > 0
    expected = (out.text_loss * 4 + out.image_loss * 16) / 20
    torch.testing.assert_close(out.task_loss, expected)
    selected = tiny_adapter.forward(batch, layers=[0, -1])
    assert selected.layers == (0, L)
    torch.testing.assert_close(selected.hidden_states[1], out.hidden_states[L])
    with pytest.raises(ValueError, match="layer 7 out of range"):
        tiny_adapter.forward(batch, layers=[7])


def test_padding_does_not_change_a_sequence(tiny_adapter):
    examples = _examples()
    alone = tiny_adapter.forward(tiny_adapter.encode([examples[2]]))
    batched = tiny_adapter.forward(tiny_adapter.encode(examples))
    n = alone.hidden_states.shape[2]
    torch.testing.assert_close(
        batched.hidden_states[:, 2, :n], alone.hidden_states[:, 0], atol=1e-5, rtol=1e-5
    )


def test_generation_is_batch_invariant_and_well_formed(tiny_adapter, tiny_splits):
    t2i = [e for e in tiny_splits["eval"] if e.answers_with_image][:5]
    grids = tiny_adapter.generate_images(t2i)
    assert all(g.shape == (4, 4) for g in grids)
    one_by_one = [tiny_adapter.generate_images([e])[0] for e in t2i]
    assert all(np.array_equal(a, b) for a, b in zip(grids, one_by_one, strict=True))
    texts = [e for e in tiny_splits["eval"] if not e.answers_with_image][:5]
    answers = tiny_adapter.generate_text(texts, max_new_tokens=3)
    assert answers == [tiny_adapter.generate_text([e], max_new_tokens=3)[0] for e in texts]
    assert all(len(a.split()) <= 3 for a in answers)
    assert tiny_adapter.model.training  # generation restores the mode it found


def test_cached_decoding_matches_recomputing_the_whole_prefix(tiny_adapter, tiny_splits):
    """Greedy decoding reuses keys and values; it must pick the tokens a full forward pass
    over the left-padded prefix picks at every step."""
    t2i = [e for e in tiny_splits["eval"] if e.answers_with_image][:6]
    tok, model = tiny_adapter.tokenizer, tiny_adapter.model
    with torch.no_grad():  # sharp attention, so a wrong position or mask changes the tokens
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(30)
    grids = tiny_adapter.generate_images(t2i)
    banned = torch.ones(tok.vocab_size, dtype=torch.bool)
    banned[tok.image_token_ids] = False
    prompts = [tiny_adapter._prompt_part(e)[0] + [tok.boi_id] for e in t2i]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]
    mask = mask.long()
    model.eval()
    with torch.no_grad():
        for _ in range(tiny_adapter.grid_size**2):
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            next_ids = logits[:, -1].masked_fill(banned, float("-inf")).argmax(-1)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    expected = [tok.decode_grid(row[width:].tolist(), tiny_adapter.grid_size) for row in ids]
    assert all(np.array_equal(a, b) for a, b in zip(grids, expected, strict=True))
    assert len({g.tobytes() for g in grids}) > 1  # a real comparison, not of constant grids


def test_save_and_load_round_trip(tiny_adapter, tmp_path):
    batch = tiny_adapter.encode(_examples())
    tiny_adapter.save(tmp_path / "toy")
    assert (tmp_path / "toy" / "model.safetensors").is_file()
    loaded = ToyAdapter.load(tmp_path / "toy")
    assert (
        loaded.grid_size == 4 and loaded.tokenizer.vocab_size == tiny_adapter.tokenizer.vocab_size
    )
    tiny_adapter.model.eval()
    loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.forward(batch).hidden_states, tiny_adapter.forward(batch).hidden_states
        )
    with pytest.raises(FileNotFoundError, match="not a saved toy model"):
        ToyAdapter.load(tmp_path)


def test_bad_examples_raise_clear_errors(tiny_adapter):
    with pytest.raises(ValueError, match="unknown word 'zebra'"):
        tiny_adapter.encode(
            [Example("text", "knowledge", "what colour is zebra", response_text="red")]
        )
    with pytest.raises(ValueError, match="empty list"):
        tiny_adapter.encode([])
    long_prompt = " ".join(["top"] * 70)
    with pytest.raises(ValueError, match="allows 64"):
        tiny_adapter.encode([Example("text", "knowledge", long_prompt, response_text="red")])


def test_a_few_training_steps_reduce_the_task_loss(tiny_adapter, tiny_splits):
    batch = tiny_adapter.encode(tiny_splits["pretrain"][:32])
    optimizer = torch.optim.AdamW(tiny_adapter.model.parameters(), lr=3e-3)
    first = tiny_adapter.forward(batch, output_hidden_states=False).task_loss.item()
    for _ in range(30):
        loss = tiny_adapter.forward(batch, output_hidden_states=False).task_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.7 * first


def test_generation_uses_the_current_cache_argument_and_warns_nothing(tiny_adapter, tiny_splits):
    """Every toy evaluation printed transformers' FutureWarning that ``past_key_values``
    is removed in 5.40: the decoding loop must pass the cache under its current name."""
    import warnings

    examples = tiny_splits["eval"][:4]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        answers = tiny_adapter.generate_text(examples)
        grids = tiny_adapter.generate_images(examples[:2])
    assert len(answers) == 4 and all(g.shape == (4, 4) for g in grids)
    # ... also through a LoRA wrapper, whose forward takes **kwargs (the ablation's eval)
    from unifyreg.config import LoraSettings
    from unifyreg.module import apply_lora

    apply_lora(tiny_adapter, LoraSettings(enabled=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert len(tiny_adapter.generate_text(examples)) == 4
