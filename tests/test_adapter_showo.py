"""Tests of the Show-o adapter on tiny random checkpoints (both layouts) with random codes.

The transformers-layout checkpoint is written once per module with ``save_pretrained`` and
read back through ``ShowoAdapter.load(path)``, the path a user takes with real weights.
"""

import json
import math
import warnings

import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unifyreg.adapters import get_adapter_class
from unifyreg.adapters.showo import (
    SHOWO_TOKENS,
    ShowoAdapter,
    block_attention_mask,
    mask_schedule,
    maskgit_mask_counts,
    save_tiny_showo,
    save_tiny_showo_release,
)
from unifyreg.config import LossConfig, ProbeConfig
from unifyreg.images import ImageCodes
from unifyreg.losses import ContextualPredictionLoss
from unifyreg.manifest import ManifestExample
from unifyreg.probing import run_probe
from unifyreg.roles import Role, role_segments

R = Role
N, K = 16, 32  # codes per image and codebook size of the tiny checkpoint
T2I, QUESTION, ANSWER, TEXT, REPLY = "draw a cat", "what is it?", "a cat", "hello", "there"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_showo(tmp_path_factory.mktemp("showo") / "ckpt")


@pytest.fixture
def adapter(checkpoint):
    return ShowoAdapter.load(checkpoint)


def _codes(seed, shape=(4, 4)):
    return ImageCodes(np.random.default_rng(seed).integers(0, K, shape))


def _examples():
    return [
        ManifestExample("composition", T2I, response_image=_codes(1)),
        ManifestExample("attribute", QUESTION, prompt_image=_codes(2, (N,)), response_text=ANSWER),
        ManifestExample("deductive", TEXT, response_text=REPLY),
    ]


def _layout(*segments):
    return [int(role) for role, count in segments for _ in range(count)]


# ---------------------------------------------------------------------- loading


def test_registry_and_save_pretrained_round_trip(adapter, tmp_path):
    assert get_adapter_class("showo") is ShowoAdapter
    assert (adapter.num_layers, adapter.hidden_size) == (2, 32)
    assert (adapter.codebook_size, adapter.num_image_tokens) == (K, N)
    assert adapter.mask_token_id == adapter.lm_head.out_features - 1
    assert adapter.image_offset == len(adapter.tokenizer)
    batch = adapter.training_batch(adapter.encode(_examples()))
    with torch.no_grad():
        before = adapter.forward(batch, keep_logits=True)
    adapter.save(tmp_path / "again")
    reloaded = ShowoAdapter.load(tmp_path / "again")
    assert reloaded.adapter_settings() == adapter.adapter_settings()
    with torch.no_grad():
        after = reloaded.forward(batch, keep_logits=True)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.hidden_states, after.hidden_states)


def test_missing_or_wrong_directory_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        ShowoAdapter.load(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="holds a 'llama' model.*'phi'"):
        ShowoAdapter.load(tmp_path / "other")


def test_settings_are_checked(checkpoint):
    with pytest.raises(ValueError, match="mask_schedule must be one of cosine, linear, pow"):
        ShowoAdapter.load(checkpoint, mask_schedule="square")
    with pytest.raises(ValueError, match="min_masking_rate"):
        ShowoAdapter.load(checkpoint, min_masking_rate=1.5)
    with pytest.raises(ValueError, match="do not fit"):
        ShowoAdapter.load(checkpoint, codebook_size=K + 1)


# ---------------------------------------------------------------------- formats and roles


def test_roles_and_ids_position_by_position(adapter):
    batch = adapter.encode(_examples())
    t2i, mmu, lm = batch["roles"].tolist()
    ids = batch["input_ids"].tolist()
    prefix, suffix = len(adapter.template.prefix), len(adapter.template.suffix)
    # t2i: <|t2i|> <|sot|> prompt <|eot|> <|soi|> 16 codes <|eoi|>
    t2i_len = 2 + len(T2I) + 2 + N + 1
    assert t2i[:t2i_len] == _layout(
        (R.SPECIAL, 2), (R.TEXT_PROMPT, len(T2I)), (R.SPECIAL, 2), (R.IMAGE_RESPONSE, N),
        (R.SPECIAL, 1),
    )  # fmt: skip
    assert set(t2i[t2i_len:]) == {int(R.PAD)}
    token = adapter.tokenizer.convert_tokens_to_ids
    eot = adapter.tokenizer.eos_token_id
    assert ids[0][:2] == [token("<|t2i|>"), eot] and ids[0][2 + len(T2I)] == eot
    assert ids[0][3 + len(T2I) : 4 + len(T2I)] == [token("<|soi|>")]
    codes = np.asarray(ids[0][4 + len(T2I) : 4 + len(T2I) + N]) - adapter.image_offset
    assert np.array_equal(codes, _examples()[0].response_image.flat)
    assert ids[0][t2i_len - 1] == token("<|eoi|>")
    # mmu: <|mmu|> <|soi|> codes <|eoi|> <|sot|> USER: \n question ASSISTANT: answer <|eot|>
    mmu_len = 2 + N + 2 + prefix + len(QUESTION) + suffix + 1 + len(ANSWER) + 1
    assert mmu[:mmu_len] == _layout(
        (R.SPECIAL, 2), (R.IMAGE_PROMPT, N), (R.SPECIAL, 2 + prefix),
        (R.TEXT_PROMPT, len(QUESTION)), (R.SPECIAL, suffix), (R.TEXT_RESPONSE, 1 + len(ANSWER)),
        (R.SPECIAL, 1),
    )  # fmt: skip
    assert set(mmu[mmu_len:]) <= {int(R.PAD)}
    assert ids[1][:2] == [token("<|mmu|>"), token("<|soi|>")]
    # lm: <|sot|> USER: \n text ASSISTANT: reply <|eot|>
    lm_len = 1 + prefix + len(TEXT) + suffix + 1 + len(REPLY) + 1
    assert lm[:lm_len] == _layout(
        (R.SPECIAL, 1 + prefix), (R.TEXT_PROMPT, len(TEXT)), (R.SPECIAL, suffix),
        (R.TEXT_RESPONSE, 1 + len(REPLY)), (R.SPECIAL, 1),
    )  # fmt: skip
    decode = adapter.tokenizer.decode
    assert decode([i for i, r in zip(ids[2], lm, strict=True) if r == R.TEXT_PROMPT]) == TEXT
    assert decode([i for i, r in zip(ids[1], mmu, strict=True) if r == R.TEXT_RESPONSE]) == (
        " " + ANSWER
    )
    # Targets: answer tokens and their <|eot|> are text targets; image codes image targets.
    kinds = batch["target_kind"]
    assert torch.equal(kinds == 2, batch["roles"] == R.IMAGE_RESPONSE)
    assert (kinds == 1).sum(dim=1).tolist() == [0, 1 + len(ANSWER) + 1, 1 + len(REPLY) + 1]


def _showo_reference_mask(ids, pad, soi, eoi, mmu):
    """Show-o's own rules, restated from its code: t2i (`create_attention_mask_predict_next`
    with rm_pad_in_image): causal, and rows of the soi..eoi segment see every non-pad
    position of it; mmu (`create_attention_mask_for_mmu`): every row also sees columns
    0..eoi; pads are never attended."""
    length = len(ids)
    allowed = np.tril(np.ones((length, length), dtype=bool))
    if soi in ids:
        start, end = ids.index(soi), ids.index(eoi)
        if ids[0] == mmu:
            allowed[: end + 1, : end + 1] = True
        else:
            allowed[start : end + 1, start : end + 1] = True
    allowed[:, [j for j, i in enumerate(ids) if i == pad]] = False
    return allowed


def test_omni_attention_is_show_os(adapter):
    batch = adapter.encode(_examples())
    mask = batch["attention_mask_4d"]
    length = batch["input_ids"].shape[1]
    assert mask.shape == (3, 1, length, length) and mask.dtype == torch.float32
    token = adapter.tokenizer.convert_tokens_to_ids
    for row in range(3):
        ids = batch["input_ids"][row].tolist()
        expected = _showo_reference_mask(
            ids, adapter.pad_id, token("<|soi|>"), token("<|eoi|>"), token("<|mmu|>")
        )
        allowed = mask[row, 0] == 0
        real = batch["attention_mask"][row].bool()
        assert torch.equal(allowed[real], torch.from_numpy(expected)[real.numpy()])
    assert (mask[mask != 0] == torch.finfo(torch.float32).min).all()
    # In effect: a later image code changes an earlier one's state, never a text state.
    example = _examples()[0]
    codes = example.response_image.flat.copy()
    codes[-1] = (codes[-1] + 1) % K
    changed = ManifestExample("c", T2I, response_image=ImageCodes(codes))
    with torch.no_grad():
        a = adapter.forward(adapter.encode([example])).hidden_states
        b = adapter.forward(adapter.encode([changed])).hidden_states
    soi = 3 + len(T2I)  # <|soi|> belongs to the image's block; the text before it does not
    assert not torch.allclose(a[-1, 0, soi + 1], b[-1, 0, soi + 1])
    assert not torch.allclose(a[-1, 0, soi], b[-1, 0, soi])
    torch.testing.assert_close(a[:, 0, :soi], b[:, 0, :soi], rtol=0, atol=0)


def test_block_attention_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        block_attention_mask(torch.zeros(2, 3), torch.ones(2, 4))


# ---------------------------------------------------------------------- masked objective


@pytest.mark.parametrize("schedule", ["cosine", "linear", "pow"])
def test_training_batch_masks_image_codes_by_the_schedule(adapter, schedule):
    adapter.mask_schedule = schedule
    examples = [
        _examples()[0],
        _examples()[1],
        ManifestExample("c", "a dog", response_image=_codes(7)),
    ]
    batch = adapter.encode(examples)
    torch.manual_seed(3)
    masked = adapter.training_batch(batch)["masked_positions"]
    torch.manual_seed(3)
    t = torch.rand(3)
    expected = (N * mask_schedule(schedule, t, 2.0)).round().clamp(min=1)
    image = batch["roles"] == R.IMAGE_RESPONSE
    assert masked.sum(dim=1).tolist() == [int(expected[0]), 0, int(expected[2])]
    assert not (masked & ~image).any()
    torch.manual_seed(3)
    assert torch.equal(adapter.training_batch(batch)["masked_positions"], masked)  # global RNG
    assert "masked_positions" not in batch  # the encoded batch is left as it was
    adapter.min_masking_rate = 1.0
    assert torch.equal(adapter.training_batch(batch)["masked_positions"], image)


def test_mask_schedules_and_maskgit_counts():
    r = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(mask_schedule("cosine", r), torch.cos(r * math.pi / 2))
    torch.testing.assert_close(mask_schedule("linear", r), 1 - r)
    torch.testing.assert_close(mask_schedule("pow", r, 3.0), 1 - r**3)
    # 16 tokens, 4 steps: floor(16 cos(k pi / 8)) for k = 1, 2, 3.
    assert maskgit_mask_counts(16, 4) == [14, 11, 6]
    assert maskgit_mask_counts(4, 3, "linear") == [2, 1]
    assert maskgit_mask_counts(16, 1) == []
    with pytest.raises(ValueError, match="mask_schedule must be one of"):
        mask_schedule("nope", r)


def test_losses_equal_a_hand_computation(adapter):
    batch = adapter.encode(_examples())
    torch.manual_seed(0)
    batch = adapter.training_batch(batch)
    masked = batch["masked_positions"]
    with torch.no_grad():
        out = adapter.forward(batch, output_hidden_states=False)
        ids = batch["input_ids"].masked_fill(masked, adapter.mask_token_id)
        logits = adapter.model(input_ids=ids, attention_mask=batch["attention_mask_4d"]).logits
    b, t = torch.nonzero(masked, as_tuple=True)
    image = F.cross_entropy(logits[b, t], batch["input_ids"][b, t])  # no shift: own position
    kinds = batch["target_kind"][:, 1:]
    b, t = torch.nonzero(kinds == 1, as_tuple=True)
    text = F.cross_entropy(logits[:, :-1][b, t], batch["input_ids"][:, 1:][b, t])
    torch.testing.assert_close(out.image_loss, image)
    torch.testing.assert_close(out.text_loss, text)
    assert int(out.image_tokens) == int(masked.sum()) > 0
    assert int(out.text_tokens) == 1 + len(ANSWER) + 1 + 1 + len(REPLY) + 1
    # Without masked positions (the probe's batches) no image target is scored.
    with torch.no_grad():
        plain = adapter.forward(adapter.encode(_examples()), output_hidden_states=False)
    assert int(plain.image_tokens) == 0 and float(plain.image_loss) == 0.0
    torch.testing.assert_close(plain.text_loss, out.text_loss, rtol=0, atol=0)  # text unchanged


def test_hidden_state_zero_takes_the_mask_token(adapter):
    batch = adapter.encode(_examples()[:1])
    torch.manual_seed(1)
    batch = adapter.training_batch(batch)
    with torch.no_grad():
        out = adapter.forward(batch, layers=[0, 2])
        hs = adapter.model(
            input_ids=batch["input_ids"].masked_fill(
                batch["masked_positions"], adapter.mask_token_id
            ),
            attention_mask=batch["attention_mask_4d"],
            output_hidden_states=True,
        ).hidden_states
    torch.testing.assert_close(out.hidden_states[0], hs[0])
    torch.testing.assert_close(out.hidden_states[0], adapter.input_embeddings(batch))
    with torch.no_grad():
        normed = adapter.forward(batch, layers=[2], final_norm=True).hidden_states[0]
    torch.testing.assert_close(normed, hs[2])  # transformers' last entry is after the norm
    assert not torch.allclose(out.hidden_states[1], hs[2])


# ---------------------------------------------------------------------- image codes


class _FakeImageTokenizer:
    """encode: 4x4 mean-pooled red channel, 32 levels; decode: a 4x4 grey image per code grid."""

    def __init__(self):
        self.decoded = 0

    def encode(self, images):
        out = []
        for image in images:
            small = np.asarray(image.convert("RGB").resize((4, 4)))[..., 0]
            out.append(torch.from_numpy((small.astype(np.int64) * K) // 256))
        return torch.stack(out)

    def decode(self, codes):
        self.decoded += len(codes)
        return [Image.fromarray((c.view(4, 4).numpy() * 8).astype(np.uint8)) for c in codes]


def test_images_through_an_image_tokenizer_object(checkpoint):
    tokenizer = _FakeImageTokenizer()
    adapter = ShowoAdapter.load(checkpoint, image_tokenizer=tokenizer)
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    batch = adapter.encode([ManifestExample("c", T2I, response_image=image)])
    codes = batch["input_ids"][0][batch["roles"][0] == R.IMAGE_RESPONSE] - adapter.image_offset
    assert torch.equal(codes, tokenizer.encode([image])[0].reshape(-1))
    images = adapter.generate_images([_examples()[0]], timesteps=2)
    assert tokenizer.decoded == 1 and isinstance(images[0], Image.Image)


def test_bad_images_give_clear_errors(adapter):
    image = Image.new("RGB", (16, 16))
    with pytest.raises(ValueError, match="example 0.*image_codes / response_image_codes"):
        adapter.encode([ManifestExample("c", T2I, response_image=image)])
    with pytest.raises(ValueError, match="has 15 codes; this Show-o takes 16"):
        adapter.encode([ManifestExample("c", T2I, response_image=_codes(0, (15,)))])
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
        adapter.encode([ManifestExample("c", T2I, response_image=ImageCodes(np.full(16, K)))])
    with pytest.raises(ValueError, match="no format for an image prompt with an image response"):
        adapter.encode(
            [ManifestExample("c", T2I, prompt_image=_codes(0), response_image=_codes(1))]
        )


# ---------------------------------------------------------------------- released layout


def test_released_checkpoint_loads_through_the_key_map(tmp_path):
    showo_dir, phi_dir = save_tiny_showo_release(tmp_path, seed=5)
    with pytest.raises(FileNotFoundError, match="released checkpoint.*phi_path"):
        ShowoAdapter.load(showo_dir)
    adapter = ShowoAdapter.load(showo_dir, phi_path=phi_dir)
    assert [adapter.tokenizer.convert_tokens_to_ids(t) for t in SHOWO_TOKENS] == list(
        range(len(adapter.tokenizer) - 9, len(adapter.tokenizer))
    )  # Show-o's order, after [PAD]
    assert (adapter.num_image_tokens, adapter.codebook_size) == (N, K)
    state = torch.load(showo_dir / "pytorch_model.bin", weights_only=True)
    for key, value in adapter.model.state_dict().items():
        assert torch.equal(value, state[f"showo.{key}"]), key
    # The phi path may also live in the folder's settings file; it converts by saving.
    (showo_dir / "unifyreg_adapter.json").write_text(json.dumps({"phi_path": "../phi"}))
    again = ShowoAdapter.load(showo_dir)
    batch = again.encode(_examples())
    with torch.no_grad():
        logits = again.forward(batch, keep_logits=True).logits
    again.save(tmp_path / "converted")
    converted = ShowoAdapter.load(tmp_path / "converted")
    with torch.no_grad():
        assert torch.equal(converted.forward(batch, keep_logits=True).logits, logits)


@pytest.mark.parametrize(
    "change, message",
    [
        ("drop", r"missing key\(s\) showo\.model\.layers\.1\.mlp\.fc2\.weight"),
        ("extra", r"unexpected key\(s\) showo\.model\.extra\.weight"),
        ("foreign", r"unexpected key\(s\) vq_model\.codebook"),
    ],
)
def test_a_missing_or_unexpected_key_is_named(tmp_path, change, message):
    showo_dir, phi_dir = save_tiny_showo_release(tmp_path)
    path = showo_dir / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    if change == "drop":
        del state["showo.model.layers.1.mlp.fc2.weight"]
    elif change == "extra":
        state["showo.model.extra.weight"] = torch.zeros(1)
    else:
        state["vq_model.codebook"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=message):
        ShowoAdapter.load(showo_dir, phi_path=phi_dir)


def test_the_clip_projector_is_dropped_with_a_warning(tmp_path):
    showo_dir, phi_dir = save_tiny_showo_release(tmp_path)
    path = showo_dir / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    state["mm_projector.0.weight"] = torch.zeros(2, 2)
    torch.save(state, path)
    with pytest.warns(UserWarning, match="mm_projector"):
        ShowoAdapter.load(showo_dir, phi_path=phi_dir)


# ---------------------------------------------------------------------- LoRA, generation


def test_default_lora_targets_are_the_phi_projections(adapter):
    targets = adapter.default_lora_targets
    assert len(targets) == 6 * adapter.num_layers
    assert {t.rsplit(".", 1)[1] for t in targets} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "dense",
        "fc1",
        "fc2",
    }
    batch = adapter.training_batch(adapter.encode(_examples()))
    with torch.no_grad():
        before = adapter.forward(batch, keep_logits=True).logits
    adapter.model = peft.get_peft_model(
        adapter.model, peft.LoraConfig(r=2, target_modules=list(targets))
    )
    out = adapter.forward(batch, keep_logits=True)
    torch.testing.assert_close(out.logits, before)
    trainable = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_maskgit_generation(adapter):
    examples = [_examples()[0], ManifestExample("c", "a red dog", response_image=_codes(3))]
    codes = adapter.generate_image_codes(examples, timesteps=4, batch_size=2)
    assert [c.shape for c in codes] == [(N,), (N,)]
    assert all(0 <= int(c.min()) and int(c.max()) < K for c in codes)
    # temperature 0 is deterministic and batch invariant.
    assert all(
        torch.equal(a, adapter.generate_image_codes([e], timesteps=4)[0])
        for a, e in zip(codes, examples, strict=True)
    )
    # One step: the argmax over the codebook at every position of a fully masked image.
    row = adapter._t2i_prompt_row(T2I)
    adapter._append_codes(row, torch.zeros(N, dtype=torch.long), R.IMAGE_RESPONSE, 0)
    batch = adapter._collate([row], "right")
    image = batch["roles"] == R.IMAGE_RESPONSE
    ids = batch["input_ids"].masked_fill(image, adapter.mask_token_id)
    with torch.no_grad():
        logits = adapter.model(input_ids=ids, attention_mask=batch["attention_mask_4d"]).logits
    expected = logits[image][:, adapter.image_offset : adapter.image_offset + K].argmax(-1)
    assert torch.equal(adapter.generate_image_codes([examples[0]], timesteps=1)[0], expected)
    sampled = adapter.generate_image_codes(examples, timesteps=3, temperature=1.0, seed=4)
    again = adapter.generate_image_codes(examples, timesteps=3, temperature=1.0, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(sampled, again, strict=True))
    guided = adapter.generate_image_codes(examples, timesteps=3, guidance_scale=2.0)
    assert all(0 <= int(c.min()) and int(c.max()) < K for c in guided)
    assert isinstance(adapter.generate_images(examples[:1], timesteps=2)[0], ImageCodes)


def test_text_generation_prefills_with_the_omni_attention(adapter):
    example = _examples()[1]
    batch = adapter.encode_prompts([example], padding_side="right")
    with torch.no_grad():
        logits = adapter.forward(batch, keep_logits=True).logits[0, -1]
    logits = logits.masked_fill(adapter._banned_in_text(), float("-inf"))
    expected = adapter.tokenizer.decode([int(logits.argmax())], skip_special_tokens=True)
    assert adapter.generate_text([example], max_new_tokens=1)[0] == expected.strip()
    answers = adapter.generate_text(_examples()[1:], max_new_tokens=3, batch_size=2)
    assert answers == [adapter.generate_text([e], max_new_tokens=3)[0] for e in _examples()[1:]]


# ---------------------------------------------------------------------- the seam on 4-D masks


def test_probe_and_role_segments_on_omni_attention_batches(adapter):
    batch = adapter.encode(_examples())
    with torch.no_grad():
        out = adapter.forward(batch)
    segments, mask = role_segments(out.hidden_states[1], out.roles, R.IMAGE_RESPONSE)
    assert segments.shape[:2] == (3, N) and mask.sum(dim=1).tolist() == [N, 0, 0]
    result = run_probe(adapter, _examples(), ProbeConfig(batch_size=2))
    assert {q: len(r) for q, r in result.records.items()} == {
        "encoding/text": 2, "encoding/image": 1, "response/text": 2, "response/image": 1,
    }  # fmt: skip
    assert all(np.isfinite(r.values).all() for r in result.records.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. no score left out
        generated = run_probe(adapter, _examples(), ProbeConfig(responses="generated"))
    assert len(generated.records["response/image"]) == 1


def test_both_loss_terms_on_masked_batches_and_context_rows_trim_the_4d_mask(adapter):
    examples = [
        *_examples(),
        ManifestExample("c", "a much longer prompt here", response_image=_codes(9)),
    ]
    torch.manual_seed(0)
    batch = adapter.training_batch(adapter.encode(examples))
    term = ContextualPredictionLoss(
        LossConfig(w_ctx=1.0, w_div=1.0, ctx_row_fraction=0.25, ctx_mode="bidirectional"),
        adapter.hidden_size,
    )
    rows = term.context_rows(batch)  # one image row, padding columns trimmed
    width = rows["input_ids"].shape[1]
    assert (
        rows["attention_mask_4d"].shape == (1, 1, width, width) and width < batch["roles"].shape[1]
    )
    kept = int(torch.nonzero((batch["input_ids"][:, :width] == rows["input_ids"][0]).all(1))[0])
    with torch.no_grad():
        alone = adapter.forward(rows).hidden_states[:, 0]
        full = adapter.forward(batch).hidden_states[:, kept, :width]
    torch.testing.assert_close(alone, full, atol=1e-5, rtol=1e-5)
    out = adapter.forward(batch)
    total, logs = term(adapter, batch, out, step=0)
    assert torch.isfinite(total) and logs["loss/ctx_tokens"] > 0 and logs["loss/div_parts"] == 2
    (out.task_loss + total).backward()
    assert term.mask_embedding.grad.abs().sum() > 0
    assert adapter.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- the CLI


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def _codes_manifest(directory):
    """A JSONL set with every Show-o format, images as .npy code files."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(2):
        np.save(directory / f"r{index}.npy", rng.integers(0, K, (4, 4)))
        np.save(directory / f"p{index}.npy", rng.integers(0, K, N))
        t2i = {"text": f"draw cat {index}", "response_image_codes": f"r{index}.npy"}
        mmu = {"text": "what is it?", "image_codes": f"p{index}.npy", "response": "a cat"}
        rows += [{**t2i, "category": "composition"}, {**mmu, "category": "attribute"}]
    rows.append({"text": "two plus one", "response": "three", "category": "deductive"})
    path = directory / "set.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_probe_command_runs_on_a_tiny_checkpoint(checkpoint, tmp_path):
    from unifyreg.cli import main
    from unifyreg.probing import ProbeResult

    out = tmp_path / "out"
    args = [
        "probe",
        "--config",
        str(ROOT / "configs" / "showo" / "probe.yaml"),
        f"model.path={checkpoint}",
        f"probe_set={_codes_manifest(tmp_path)}",
        "model.dtype=float32",
        f"output_dir={out}",
        "figures=false",
    ]
    assert main(args) == 0
    result = ProbeResult.load(out / "result.json")
    assert {q: len(r) for q, r in result.records.items()} == {
        "encoding/text": 3, "encoding/image": 2, "response/text": 3, "response/image": 2,
    }  # fmt: skip
    assert set(result.scores()) == {"encoding_gap", "response_split", "final_gap"}
    assert all(np.isfinite(r.values).all() for r in result.records.values())


def test_finetune_command_runs_one_lora_epoch_on_the_masked_objective(checkpoint, tmp_path):
    import csv

    from unifyreg.cli import main

    manifest = _codes_manifest(tmp_path)
    run_dir = tmp_path / "run"
    args = [
        "finetune",
        "--config",
        str(ROOT / "configs" / "showo" / "finetune_lora.yaml"),
        f"model.path={checkpoint}",
        f"data={manifest}",
        f"probe_set={manifest}",
        "model.dtype=float32",
        "precision=32-true",
        "accelerator=cpu",
        "max_epochs=1",
        "batch_size=5",
        "probe.batch_size=5",
        "loss.w_ctx=1.0",
        "loss.w_div=1.0",
        "loss.ctx_mode=bidirectional",
        "loggers=[csv]",
        f"run_dir={run_dir}",
    ]
    assert main(args) == 0
    history = (run_dir / "probe" / "probe_history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [0, 1]
    assert (run_dir / "lora" / "adapter_config.json").is_file()
    metrics = next((run_dir / "logs").glob("version_*/metrics.csv"))
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("tokens/image")]
    # The masked objective ran: some, not all, of the 2 x 16 response codes were scored.
    assert rows and all(0 < float(r["tokens/image"]) < 2 * N for r in rows)
    assert all(
        np.isfinite(float(r["loss/ctx"])) and np.isfinite(float(r["loss/div"])) for r in rows
    )


def test_ctx_through_the_shared_prefix_equals_the_full_second_pass(checkpoint):
    """L_ctx after the main pass's prompt under Show-o's omni attention (its 4-D mask)."""
    from conftest import reuse_matches_full_pass

    examples = [
        *_examples(),
        ManifestExample("c", "a much longer prompt here", response_image=_codes(9)),
    ]
    main, second = reuse_matches_full_pass(
        lambda: ShowoAdapter.load(checkpoint), examples, "bidirectional", rtol=1e-4, atol=1e-6
    )
    assert 0 < second < main  # the second pass skipped the shared prompt
