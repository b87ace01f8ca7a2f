"""Tests of the transformers UMM adapters (Emu3, Janus, Chameleon) on tiny random checkpoints.

Each checkpoint is built once per session, written with ``save_pretrained`` and read back
through ``<Adapter>.load(path)``, the code path a user takes with real weights.
"""

import numpy as np
import peft
import pytest
import torch
from PIL import Image

from unifyreg.adapters import available_adapters, get_adapter_class
from unifyreg.adapters.chameleon import ChameleonAdapter, save_tiny_chameleon
from unifyreg.adapters.emu3 import Emu3Adapter, save_tiny_emu3
from unifyreg.adapters.janus import JanusAdapter, save_tiny_janus
from unifyreg.manifest import ManifestExample
from unifyreg.roles import Role

R = Role
FAMILIES = {
    "emu3": (Emu3Adapter, save_tiny_emu3),
    "janus": (JanusAdapter, save_tiny_janus),
    "chameleon": (ChameleonAdapter, save_tiny_chameleon),
}
#: Number of image-content tokens of one image in each tiny checkpoint.
IMAGE_TOKENS = {"emu3": 16, "janus": 16, "chameleon": 16}
PROMPT, ANSWER = "what colour is it?", "red"
T2I_PROMPT, TEXT_PROMPT, TEXT_ANSWER = "draw a cat", "hello there", "general kenobi"


def _image(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB")


def _examples():
    """Understanding, text-to-image and text-only examples, as a user manifest gives them."""
    return [
        ManifestExample("attribute", PROMPT, prompt_image=_image(0), response_text=ANSWER),
        ManifestExample("composition", T2I_PROMPT, response_image=_image(1)),
        ManifestExample("deductive", TEXT_PROMPT, response_text=TEXT_ANSWER),
    ]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These models are tiny: on a shared two-core machine a second OpenMP thread only
    # spins against other processes (minutes instead of seconds).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_checkpoints")
    return {family: save(root / family) for family, (_, save) in FAMILIES.items()}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def adapter(family, checkpoints):
    return FAMILIES[family][0].load(checkpoints[family], dtype="float32")


def _layout(*segments):
    """Expected roles from (role, count) segments."""
    return [int(role) for role, count in segments for _ in range(count)]


def _decode(adapter, ids, roles, role):
    return adapter.tokenizer.decode([i for i, r in zip(ids, roles, strict=True) if r == role])


# ---------------------------------------------------------------------- registry and I/O


def test_registry_knows_the_transformers_adapters():
    assert {"emu3", "janus", "chameleon"} <= set(available_adapters())
    for name, (cls, _) in FAMILIES.items():
        assert get_adapter_class(name) is cls and cls.name == name


def test_load_round_trip_gives_identical_logits(adapter, tmp_path):
    batch = adapter.encode(_examples())
    with torch.no_grad():
        before = adapter.forward(batch, keep_logits=True)
    adapter.save(tmp_path / "again")
    reloaded = type(adapter).load(tmp_path / "again", dtype="float32")
    assert reloaded.template == adapter.template
    with torch.no_grad():
        after = reloaded.forward(reloaded.encode(_examples()), keep_logits=True)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.hidden_states, after.hidden_states)
    assert torch.equal(before.image_loss, after.image_loss)


def test_missing_or_wrong_directory_gives_a_clear_error(adapter, checkpoints, tmp_path):
    cls = type(adapter)
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model.*does not exist"):
        cls.load(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*no config.json"):
        cls.load(empty)
    other = "janus" if cls.name != "janus" else "emu3"
    with pytest.raises(ValueError, match=f"holds a '{other}' model.*needs '{cls.model_type}'"):
        cls.load(checkpoints[other])


def test_a_model_without_its_processor_gives_a_clear_error(adapter, checkpoints, tmp_path):
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (weights_only / name).write_bytes((checkpoints[adapter.name] / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="weights_only.*no (usable )?processor"):
        type(adapter).load(weights_only)
    (weights_only / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights_only.*no weights"):
        type(adapter).load(weights_only)


def test_bad_examples_raise_clear_errors(adapter):
    with pytest.raises(ValueError, match="empty list"):
        adapter.encode([])
    long_prompt = "a" * 300
    with pytest.raises(ValueError, match="example 0.*allows 256"):
        adapter.encode([ManifestExample("x", long_prompt, response_text=ANSWER)])
    with pytest.raises(ValueError, match="example 0.*prompt_image must be a PIL image"):
        adapter.encode([ManifestExample("x", PROMPT, prompt_image="cat.png")])


def test_trust_remote_code_warns(family, checkpoints):
    with pytest.warns(UserWarning, match="trust_remote_code=True is ignored"):
        loaded = FAMILIES[family][0].load(checkpoints[family], trust_remote_code=True)
    assert loaded.num_layers == 2


# ---------------------------------------------------------------------- roles


def test_emu3_roles_position_by_position(checkpoints):
    adapter = Emu3Adapter.load(checkpoints["emu3"])
    batch = adapter.encode(_examples())
    understanding, t2i, text = batch["roles"].tolist()
    prefix, suffix = len(adapter.template.prefix), len(adapter.template.suffix)
    header = 5  # <|image start|> 4 * 4 <|image token|>
    image_rows = [*_layout((R.IMAGE_PROMPT, 4), (R.SPECIAL, 1))] * 4
    assert understanding == _layout(
        (R.SPECIAL, 1 + prefix + header),
        *[(Role(r), 1) for r in image_rows],
        (R.SPECIAL, 2),
        (R.TEXT_PROMPT, len(PROMPT)),
        (R.SPECIAL, suffix),
        (R.TEXT_RESPONSE, 1 + len(ANSWER)),
        (R.SPECIAL, 1),
    )
    response_rows = [*_layout((R.IMAGE_RESPONSE, 4), (R.SPECIAL, 1))] * 4
    t2i_len = 1 + prefix + len(T2I_PROMPT) + suffix + header + 20 + 3
    assert t2i[:t2i_len] == _layout(
        (R.SPECIAL, 1 + prefix),
        (R.TEXT_PROMPT, len(T2I_PROMPT)),
        (R.SPECIAL, suffix + header),
        *[(Role(r), 1) for r in response_rows],
        (R.SPECIAL, 3),
    )
    assert set(t2i[t2i_len:]) <= {int(R.PAD)}
    ids = batch["input_ids"].tolist()
    assert _decode(adapter, ids[0], understanding, R.TEXT_PROMPT) == PROMPT
    assert _decode(adapter, ids[0], understanding, R.TEXT_RESPONSE) == " " + ANSWER
    assert _decode(adapter, ids[2], text, R.TEXT_RESPONSE) == " " + TEXT_ANSWER
    # The image block's body is what the stock image path gives: VQ ids, <eol> per row.
    image = _examples()[1].response_image
    inputs = adapter.processor.image_processor(image, return_tensors="pt")
    stock = adapter.base_model.model.get_image_tokens(inputs["pixel_values"], inputs["image_sizes"])
    start = t2i.index(R.IMAGE_RESPONSE)
    assert ids[1][start : start + 20] == stock.tolist()
    assert [ids[1][start + 5 * k + 4] for k in range(4)] == [adapter.eol_id] * 4
    assert adapter.image_codes(image).shape == (4, 4)


def test_janus_roles_position_by_position(checkpoints):
    adapter = JanusAdapter.load(checkpoints["janus"])
    batch = adapter.encode(_examples())
    understanding, t2i, text = batch["roles"].tolist()
    n = adapter.base_model.config.vision_config.num_image_tokens
    template = adapter.template
    prefix, after, suffix = len(template.prefix), len(template.after_image), len(template.suffix)
    assert understanding == _layout(
        (R.SPECIAL, 1 + prefix + 1),
        (R.IMAGE_PROMPT, n),
        (R.SPECIAL, 1 + after),
        (R.TEXT_PROMPT, len(PROMPT)),
        (R.SPECIAL, suffix),
        (R.TEXT_RESPONSE, 1 + len(ANSWER)),
        (R.SPECIAL, 1),
    )
    t2i_len = 1 + prefix + len(T2I_PROMPT) + suffix + 1 + n + 2
    assert t2i[:t2i_len] == _layout(
        (R.SPECIAL, 1 + prefix),
        (R.TEXT_PROMPT, len(T2I_PROMPT)),
        (R.SPECIAL, suffix + 1),
        (R.IMAGE_RESPONSE, n),
        (R.SPECIAL, 2),
    )
    assert set(t2i[t2i_len:]) <= {int(R.PAD)}
    assert _decode(adapter, batch["input_ids"][2].tolist(), text, R.TEXT_PROMPT) == TEXT_PROMPT
    # The explicit masks are exactly the two kinds of image positions.
    roles = batch["roles"]
    assert torch.equal(batch["understanding_image_mask"].bool(), roles == R.IMAGE_PROMPT)
    assert torch.equal(batch["generation_image_mask"].bool(), roles == R.IMAGE_RESPONSE)
    codes = batch["generation_image_codes"][1][roles[1] == R.IMAGE_RESPONSE]
    assert torch.equal(codes, adapter.image_codes(_examples()[1].response_image))
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["pixel_values"][0].abs().sum() > 0 and not batch["pixel_values"][1:].any()


def test_chameleon_roles_position_by_position(checkpoints):
    adapter = ChameleonAdapter.load(checkpoints["chameleon"])
    batch = adapter.encode(_examples())
    understanding, t2i, text = batch["roles"].tolist()
    n = adapter.processor.image_seq_length
    assert understanding == _layout(
        (R.SPECIAL, 2),
        (R.IMAGE_PROMPT, n),
        (R.SPECIAL, 1),
        (R.TEXT_PROMPT, len(PROMPT)),
        (R.SPECIAL, 1),
        (R.TEXT_RESPONSE, len(ANSWER)),
        (R.SPECIAL, 1),
    )
    t2i_len = 1 + len(T2I_PROMPT) + 2 + n + 2
    assert t2i[:t2i_len] == _layout(
        (R.SPECIAL, 1), (R.TEXT_PROMPT, len(T2I_PROMPT)), (R.SPECIAL, 2),
        (R.IMAGE_RESPONSE, n), (R.SPECIAL, 2),
    )  # fmt: skip
    ids = batch["input_ids"].tolist()
    assert ids[0][:2] == [adapter.bos_id, adapter.boi_id]
    assert (
        adapter.tokenizer.convert_ids_to_tokens(ids[2][1 + len(TEXT_PROMPT)]) == "<reserved08706>"
    )
    # Image positions hold what the stock image path gives (VQ codes as vocabulary ids).
    image_ids = [i for i, r in zip(ids[0], understanding, strict=True) if r == R.IMAGE_PROMPT]
    inputs = adapter.processor.image_processor(_examples()[0].prompt_image, return_tensors="pt")
    assert image_ids == adapter.base_model.get_image_tokens(inputs["pixel_values"])[0].tolist()


def test_image_prompt_count_equals_the_models_image_token_count(adapter, family):
    batch = adapter.encode(_examples())
    counts = (batch["roles"] == R.IMAGE_PROMPT).sum(dim=1).tolist()
    responses = (batch["roles"] == R.IMAGE_RESPONSE).sum(dim=1).tolist()
    assert counts == [IMAGE_TOKENS[family], 0, 0]
    assert responses == [0, IMAGE_TOKENS[family], 0]
    kinds = batch["target_kind"]
    assert torch.equal(kinds == 2, batch["roles"] == R.IMAGE_RESPONSE)
    text_targets = (kinds == 1).sum(dim=1).tolist()
    lead = len(adapter.template.response_lead)
    assert text_targets == [lead + len(ANSWER) + 1, 0, lead + len(TEXT_ANSWER) + 1]
    assert torch.equal(batch["attention_mask"].bool(), batch["roles"] != R.PAD)


# ---------------------------------------------------------------------- forward


def test_forward_gives_all_layers_and_right_token_counts(adapter, family):
    batch = adapter.encode(_examples())
    with torch.no_grad():
        out = adapter.forward(batch)
    L, S = adapter.num_layers, batch["input_ids"].shape[1]
    assert L == 2 and out.hidden_states.shape == (L + 1, 3, S, 32)
    assert out.layers == tuple(range(L + 1))
    with torch.no_grad():
        embeddings = adapter.input_embeddings(batch)
    torch.testing.assert_close(out.hidden_states[0], embeddings)
    lead = len(adapter.template.response_lead)
    assert int(out.text_tokens) == 2 * (lead + 1) + len(ANSWER) + len(TEXT_ANSWER)
    assert int(out.image_tokens) == IMAGE_TOKENS[family]
    for loss in (out.text_loss, out.image_loss, out.task_loss):
        assert torch.isfinite(loss) and loss > 0
    text, image = int(out.text_tokens), int(out.image_tokens)
    expected = (out.text_loss * text + out.image_loss * image) / (text + image)
    torch.testing.assert_close(out.task_loss, expected)
    with torch.no_grad():
        selected = adapter.forward(batch, layers=[0, -1])
    assert selected.layers == (0, L)
    torch.testing.assert_close(selected.hidden_states[1], out.hidden_states[L])
    with pytest.raises(ValueError, match="layer 5 out of range"):
        adapter.forward(batch, layers=[5])


def test_input_embeddings_are_the_models_own_image_paths(adapter, family):
    batch = adapter.encode(_examples())
    roles = batch["roles"]
    with torch.no_grad():
        hidden0 = adapter.forward(batch, layers=[0]).hidden_states[0]
        token_embeddings = adapter.embed_tokens(batch["input_ids"])
        if family == "janus":
            model = adapter.base_model
            features = model.model.get_image_features(batch["pixel_values"][:1]).pooler_output
            torch.testing.assert_close(hidden0[roles == R.IMAGE_PROMPT], features[0])
            codes = batch["generation_image_codes"][roles == R.IMAGE_RESPONSE]
            generation = model.prepare_embeddings_for_image_generation(codes)
            torch.testing.assert_close(hidden0[roles == R.IMAGE_RESPONSE], generation)
            text = (
                ~batch["understanding_image_mask"].bool() & ~batch["generation_image_mask"].bool()
            )
            torch.testing.assert_close(hidden0[text], token_embeddings[text])
        else:  # VQ tokens are ordinary vocabulary: hidden state 0 is the token embedding
            torch.testing.assert_close(hidden0, token_embeddings)


def test_padding_does_not_change_a_sequence(adapter):
    examples = _examples()
    with torch.no_grad():
        alone = adapter.forward(adapter.encode([examples[2]]))
        batched = adapter.forward(adapter.encode(examples))
    n = alone.hidden_states.shape[2]
    torch.testing.assert_close(
        batched.hidden_states[:, 2, :n], alone.hidden_states[:, 0], atol=1e-5, rtol=1e-5
    )


def test_emu3_losses_equal_the_stock_forward_loss(checkpoints):
    adapter = Emu3Adapter.load(checkpoints["emu3"])
    batch = adapter.encode(_examples())
    labels = batch["input_ids"].masked_fill(batch["target_kind"] == 0, -100)
    with torch.no_grad():
        ours = adapter.forward(batch, output_hidden_states=False)
        stock = adapter.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        )
    torch.testing.assert_close(ours.task_loss, stock.loss)


def test_janus_text_loss_equals_the_stock_forward_loss(checkpoints):
    adapter = JanusAdapter.load(checkpoints["janus"])
    understanding, _, text = _examples()
    batch = adapter.encode([understanding, text])
    labels = batch["input_ids"].masked_fill(batch["target_kind"] != 1, -100)
    with torch.no_grad():
        ours = adapter.forward(batch, output_hidden_states=False)
        stock = adapter.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"][:1],
            labels=labels,
        )
    torch.testing.assert_close(ours.text_loss, stock.loss)


def test_janus_image_loss_goes_through_the_generation_head(checkpoints):
    adapter = JanusAdapter.load(checkpoints["janus"])
    batch = adapter.encode([_examples()[1]])
    with torch.no_grad():
        out = adapter.forward(batch, output_hidden_states=False)
        final = adapter.language_model(
            inputs_embeds=adapter.input_embeddings(batch), attention_mask=batch["attention_mask"]
        ).last_hidden_state[0]
        positions = torch.nonzero(batch["generation_image_mask"][0]).flatten()
        logits = adapter.base_model.model.generation_head(final[positions - 1])
        expected = torch.nn.functional.cross_entropy(
            logits, batch["generation_image_codes"][0, positions]
        )
    assert logits.shape[-1] == adapter.base_model.config.vq_config.num_embeddings
    torch.testing.assert_close(out.image_loss, expected)


def test_chameleon_image_loss_is_finite_where_the_stock_loss_is_inf(checkpoints):
    adapter = ChameleonAdapter.load(checkpoints["chameleon"])
    batch = adapter.encode([_examples()[1]])
    labels = batch["input_ids"].masked_fill(batch["target_kind"] != 2, -100)
    with torch.no_grad():
        stock = adapter.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        )
        ours = adapter.forward(batch, output_hidden_states=False, keep_logits=True)
    assert not torch.isfinite(stock.loss)
    assert torch.isfinite(ours.image_loss) and 0 < ours.image_loss < 20
    assert int(ours.image_tokens) == 16
    # Ours are the unmasked lm_head logits; the stock ones floor every image token.
    image_vocab = adapter.base_model.model.vocabulary_mapping.image_tokens
    assert (stock.logits[..., image_vocab] == torch.finfo(torch.float32).min).all()
    assert torch.isfinite(ours.logits).all()


def test_backward_reaches_the_language_model(adapter):
    out = adapter.forward(adapter.encode(_examples()), output_hidden_states=False)
    out.task_loss.backward()
    layer = adapter.language_model.layers[0]
    assert layer.self_attn.q_proj.weight.grad is not None
    assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- LoRA


def test_lora_targets_are_only_the_language_model(adapter):
    prefix = f"{adapter.language_model_path}.layers."
    targets = adapter.default_lora_targets
    assert targets == adapter.lora_target_module_names()
    assert len(targets) == 7 * adapter.num_layers
    assert all(name.startswith(prefix) for name in targets)
    batch = adapter.encode(_examples())
    with torch.no_grad():
        before = adapter.forward(batch, keep_logits=True)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(targets))
    adapter.model = peft.get_peft_model(adapter.model, config)
    adapted = {
        name.removeprefix("base_model.model.")
        for name, module in adapter.model.named_modules()
        if hasattr(module, "lora_A")
    }
    assert adapted == set(targets)
    towers = ("vqmodel", "vision_model", "generation_head", "generation_aligner", "aligner")
    assert not any(part in name.split(".") for name in adapted for part in towers)
    trainable = [name for name, p in adapter.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    out = adapter.forward(batch, keep_logits=True)
    # LoRA's B starts at zero: the wrapped model computes the same function.
    torch.testing.assert_close(out.logits, before.logits)
    out.task_loss.backward()
    assert all(
        p.grad is not None for name, p in adapter.model.named_parameters() if "lora_B" in name
    )
    with pytest.raises(ValueError, match="merge the LoRA weights"):
        adapter.save("unused")


# ---------------------------------------------------------------------- generation


def test_text_generation_is_greedy_and_batch_invariant(adapter):
    examples = _examples()
    answers = adapter.generate_text(examples, max_new_tokens=4, batch_size=3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert answers == [adapter.generate_text([e], max_new_tokens=4)[0] for e in examples]
    assert not adapter.model.training  # generation restores the mode it found


def test_first_generated_token_matches_the_teacher_forced_logits(adapter):
    example = _examples()[2]
    batch = adapter.encode_prompts([example], padding_side="right")
    assert set(batch["roles"][0].tolist()) == {int(R.SPECIAL), int(R.TEXT_PROMPT)}
    with torch.no_grad():
        logits = adapter.forward(batch, keep_logits=True).logits[0, -1]
    logits = logits.masked_fill(adapter._banned_in_text(), float("-inf"))
    expected = adapter.tokenizer.decode([int(logits.argmax())], skip_special_tokens=True)
    assert adapter.generate_text([example], max_new_tokens=1)[0] == expected.strip()


def test_image_generation_returns_images_of_the_model_size(adapter, family):
    examples = _examples()[1:]
    if family == "chameleon":
        with pytest.raises(NotImplementedError, match="no decoder"):
            adapter.generate_images(examples)
        codes = adapter.generate_image_codes(examples, batch_size=2)
        assert [c.shape for c in codes] == [(16,), (16,)]
        assert all(0 <= int(c.min()) and int(c.max()) < 32 for c in codes)
        return
    images = adapter.generate_images(examples, batch_size=2)
    side = {"emu3": 32, "janus": 16}[family]
    assert len(images) == 2
    assert all(isinstance(i, Image.Image) and i.size == (side, side) for i in images)
    codes = adapter.generate_image_codes(examples, batch_size=1)
    assert torch.equal(torch.stack(codes), torch.stack(adapter.generate_image_codes(examples)))


def test_toy_grids_are_accepted_as_images(adapter):
    grid = np.arange(16, dtype=np.int64).reshape(4, 4) % 5
    example = ManifestExample("attribute", PROMPT, prompt_image=grid, response_text=ANSWER)
    batch = adapter.encode([example])
    assert int((batch["roles"] == R.IMAGE_PROMPT).sum()) == IMAGE_TOKENS[adapter.name]


# ---------------------------------------------------------------------- masked prediction


@pytest.mark.parametrize("family", ["emu3", "janus"])
def test_masked_positions_score_each_masked_image_position_itself(family, checkpoints):
    """The seam's masked prediction on a family without a mask token: an embedding hook
    must replace the masked inputs; the image head at each masked position is scored
    against its own token, under the omni-attention mask (image tokens see each other)."""
    from unifyreg.adapters.base import omni_attention_mask

    adapter = FAMILIES[family][0].load(checkpoints[family])
    batch = adapter.encode(_examples()[1:])
    image = batch["roles"] == R.IMAGE_RESPONSE
    masked = image & (torch.arange(image.shape[1]) % 3 == 0)
    batch = {**batch, "masked_positions": masked}
    with pytest.raises(ValueError, match="has no mask token"):
        adapter.forward(batch)
    fill = torch.zeros(adapter.hidden_size)

    def hook(embeds, _batch):
        return torch.where(masked[..., None], fill, embeds)

    with torch.no_grad():
        out = adapter.forward(batch, embedding_hook=hook, output_hidden_states=False)
        embeds = hook(adapter.input_embeddings(batch), batch)
        mask = omni_attention_mask(batch["roles"], batch["attention_mask"])
        final = adapter.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    b, t = torch.nonzero(masked, as_tuple=True)
    if family == "janus":
        logits = adapter.base_model.model.generation_head(final[b, t])
        labels = batch["generation_image_codes"][b, t]
    else:
        logits, labels = adapter.lm_head(final[b, t]), batch["input_ids"][b, t]
    torch.testing.assert_close(out.image_loss, torch.nn.functional.cross_entropy(logits, labels))
    assert int(out.image_tokens) == int(masked.sum()) > 0


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
def test_ctx_through_the_shared_prefix_equals_the_full_second_pass(family, checkpoints, mode):
    """L_ctx's second pass after the main pass's prompt (unifyreg.adapters.prefix): the
    same loss and gradients as the full second pass, in a shorter pass."""
    from conftest import reuse_matches_full_pass

    examples = [
        *_examples(),
        ManifestExample("c", "draw a much larger cat", response_image=_image(2)),
    ]
    main, second = reuse_matches_full_pass(
        lambda: FAMILIES[family][0].load(checkpoints[family], dtype="float32"),
        examples,
        mode,
        rtol=1e-4,
        atol=1e-6,
    )
    assert 0 < second < main  # the second pass skipped the shared prompt
