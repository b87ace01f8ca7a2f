"""Tests of the two-stage adapter (a Qwen2.5-VL LLM + a diffusion transformer + VAE +
scheduler) on tiny random pipeline folders written by diffusers' own ``save_pretrained``
(``QwenImagePipeline``, ``QwenImageEditPipeline``) and read back through
``TwoStageAdapter.load(path)``, the path a user takes with real weights; and the OmniGen2
route (the user's transformer class and a Denoiser) with diffusers' Lumina2 transformer."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unifyreg.adapters import get_adapter_class
from unifyreg.adapters.continuous import example_seed
from unifyreg.adapters.two_stage import (
    CHAT_SYSTEM,
    QWEN_IMAGE_EDIT_SYSTEM,
    QWEN_IMAGE_T2I_SYSTEM,
    Lumina2Denoiser,
    TwoStageAdapter,
    TwoStageTemplate,
    _tiny_parts,
    save_tiny_two_stage,
)
from unifyreg.config import LossConfig, ProbeConfig
from unifyreg.losses import ContextualPredictionLoss
from unifyreg.manifest import ManifestExample
from unifyreg.probing import ProbeResult, QuantityAxis, run_probe
from unifyreg.roles import Role

R = Role
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
T2I, EDIT, QUESTION, ANSWER, TEXT, REPLY = (
    "draw a red cube",
    "make it blue",
    "what is it?",
    "a cube",
    "two plus one",
    "three",
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_two_stage(tmp_path_factory.mktemp("qwen_image") / "pipeline")


@pytest.fixture(scope="module")
def edit_folder(tmp_path_factory):
    return save_tiny_two_stage(tmp_path_factory.mktemp("qwen_image_edit") / "pipeline", edit=True)


@pytest.fixture
def adapter(folder):
    return TwoStageAdapter.load(folder)


def _image(seed, shape=(40, 48)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*shape, 3)).astype(np.uint8))


def _examples():
    return [
        ManifestExample("composition", T2I, response_image=_image(1)),
        ManifestExample("attribute", QUESTION, prompt_image=_image(2), response_text=ANSWER),
        ManifestExample("deductive", TEXT, response_text=REPLY),
        ManifestExample("edit", EDIT, prompt_image=_image(3), response_image=_image(4)),
    ]


def _count(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------- loading


def test_the_folder_is_diffusers_own_and_round_trips(adapter, folder, tmp_path):
    from diffusers import QwenImagePipeline

    assert get_adapter_class("two_stage") is TwoStageAdapter
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    pipeline = QwenImagePipeline.from_pretrained(
        folder, local_files_only=True
    )  # diffusers reads it
    assert type(pipeline.transformer).__name__ == "QwenImageTransformer2DModel"
    assert (adapter.num_layers, adapter.denoiser_depth) == (2, 4)
    assert (adapter.hidden_size, adapter.mask_width, adapter.image_size) == (64, 32, (32, 32))
    batch = adapter.encode(_examples())
    with torch.no_grad():
        before = adapter.forward(batch, keep_logits=True)
    adapter.save(tmp_path / "again")
    reloaded = TwoStageAdapter.load(tmp_path / "again")
    assert reloaded.adapter_settings() == adapter.adapter_settings()
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["vae"] == [
        "diffusers",
        "AutoencoderKLQwenImage",
    ]
    with torch.no_grad():
        after = reloaded.forward(batch, keep_logits=True)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.image_loss, after.image_loss)
    stacks = before.extra_stacks[0].hidden_layers, after.extra_stacks[0].hidden_layers
    for a, b in zip(*stacks, strict=True):
        assert torch.equal(a, b)


def test_bad_folders_and_settings_give_clear_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        TwoStageAdapter.load(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        TwoStageAdapter.load(tmp_path / "plain")
    with pytest.raises(ValueError, match="image_size must be \\[height, width\\], multiples of 16"):
        TwoStageAdapter.load(folder, image_size=[24, 32])
    with pytest.raises(ValueError, match="unknown template field"):
        TwoStageAdapter.load(folder, template={"system": "x"})
    with pytest.raises(ValueError, match="holds image codes"):
        from unifyreg.images import ImageCodes

        adapter = TwoStageAdapter.load(folder)
        adapter.encode([ManifestExample("c", T2I, response_image=ImageCodes(np.zeros(4, int)))])


# ---------------------------------------------------------------------- formats and roles


def test_roles_of_both_sequences_position_by_position(adapter):
    tok = adapter.tokenizer
    batch = adapter.encode(_examples())
    roles = batch["roles"].tolist()
    system = {
        k: _count(tok, f"<|im_start|>system\n{s}<|im_end|>\n")
        for k, s in (("t2i", QWEN_IMAGE_T2I_SYSTEM), ("edit", QWEN_IMAGE_EDIT_SYSTEM))
    }
    system["chat"] = _count(tok, f"<|im_start|>system\n{CHAT_SYSTEM}<|im_end|>\n")
    user, close = _count(tok, "<|im_start|>user\n"), _count(tok, "<|im_end|>\n")
    header = _count(tok, "<|im_start|>assistant\n")
    n_image = 2  # 56 x 56 pixels -> 4 x 4 patches -> 2 x 2 merged -> ... (tiny processor)
    grid = batch["image_grid_thw"]
    assert int(grid[1].prod()) // 4 == n_image and int(grid[0].prod()) == 0
    S, TP, IP, TR, PAD = R.SPECIAL, R.TEXT_PROMPT, R.IMAGE_PROMPT, R.TEXT_RESPONSE, R.PAD

    def layout(*segments):
        return [int(role) for role, count in segments for _ in range(count)]

    t2i = layout((S, system["t2i"] + user), (TP, len(T2I)), (S, close + header))
    understanding = layout(
        (S, system["chat"] + user + 1), (IP, n_image), (S, 1), (TP, len(QUESTION)),
        (S, close + header), (TR, len(ANSWER)), (S, 1),
    )  # fmt: skip
    text = layout(
        (S, system["chat"] + user), (TP, len(TEXT)), (S, close + header), (TR, len(REPLY)), (S, 1)
    )
    edit = layout(
        (S, system["edit"] + user + 1), (IP, n_image), (S, 1), (TP, len(EDIT)), (S, close + header)
    )
    for row, expected in zip(roles, (t2i, understanding, text, edit), strict=True):
        assert row[: len(expected)] == expected and set(row[len(expected) :]) <= {int(PAD)}
    # Text targets: the answer and its closing <|im_end|>, nothing else.
    targets = batch["target_kind"].tolist()
    assert [sum(t) for t in targets] == [0, len(ANSWER) + 1, len(REPLY) + 1, 0]
    assert batch["has_image"].tolist() == [True, False, False, True]
    # The denoiser's sequence: the conditioning (the LLM row after the system part, its
    # roles kept, padded), 4 target tokens (4 x 4 latents in 2 x 2 patches), an edit's 4
    # source tokens.
    den = batch["denoiser_roles"].tolist()
    width = batch["condition_positions"].shape[1]
    assert width == len(edit) - system["edit"]
    for b, expected, drop in ((0, t2i, system["t2i"]), (3, edit, system["edit"])):
        kept = expected[drop:]
        assert den[b][: len(kept)] == kept and set(den[b][len(kept) : width]) == (
            {int(PAD)} if len(kept) < width else set()
        )
        assert batch["condition_positions"][b, : len(kept)].tolist() == list(
            range(drop, len(expected))
        )
    assert den[0][width:] == [int(R.IMAGE_RESPONSE)] * 4 + [int(PAD)] * 4
    assert den[3][width:] == [int(R.IMAGE_RESPONSE)] * 4 + [int(R.IMAGE_PROMPT)] * 4
    assert set(den[1]) == set(den[2]) == {int(PAD)}


def test_losses_equal_a_hand_computation(adapter):
    from diffusers import QwenImagePipeline

    tok, mllm, vae = adapter.tokenizer, adapter.mllm, adapter.parts.vae
    t2i, text = (
        ManifestExample("c", T2I, response_image=_image(1)),
        ManifestExample("d", TEXT, response_text=REPLY),
    )
    with torch.no_grad():
        out = adapter.forward(adapter.encode([t2i, text]), output_hidden_states=False)
        # Text: the chat string tokenised in one piece, next-token CE over the answer + <|im_end|>.
        prompt = (
            f"<|im_start|>system\n{CHAT_SYSTEM}<|im_end|>\n<|im_start|>user\n{TEXT}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        ids = tok(prompt + REPLY + "<|im_end|>", add_special_tokens=False, return_tensors="pt")[
            "input_ids"
        ]
        logits = mllm(input_ids=ids).logits[0]
        start = _count(tok, prompt)
        text_loss = F.cross_entropy(logits[start - 1 : -1], ids[0, start:])
        assert out.text_tokens == ids.shape[1] - start
        assert torch.allclose(out.text_loss, text_loss, atol=1e-5)
        # Image: VAE mode of the 32 x 32 image, normalised; noise seeded by the example;
        # x_t at t = 0.5; the transformer on diffusers' own packing; MSE against eps - x0.
        pixels = np.asarray(_image(1).resize((32, 32), Image.Resampling.BICUBIC), np.float32)
        pixels = torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1)[None, :, None]
        z = vae.encode(pixels).latent_dist.mode()
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        x0 = ((z - mean) / std)[:, :, 0]
        eps = torch.randn((4, 4, 4), generator=torch.Generator().manual_seed(example_seed(t2i)))[
            None
        ]
        noisy = 0.5 * x0 + 0.5 * eps
        system = f"<|im_start|>system\n{QWEN_IMAGE_T2I_SYSTEM}<|im_end|>\n"
        chat = system + f"<|im_start|>user\n{T2I}<|im_end|>\n<|im_start|>assistant\n"
        chat_ids = tok(chat, add_special_tokens=False, return_tensors="pt")["input_ids"]
        hidden = mllm(input_ids=chat_ids, output_hidden_states=True).hidden_states[-1]
        condition = hidden[:, _count(tok, system) :]
        pack = QwenImagePipeline._pack_latents
        prediction = adapter.transformer(
            hidden_states=pack(noisy, 1, 4, 4, 4),
            encoder_hidden_states=condition,
            timestep=torch.tensor([0.5]),
            img_shapes=[[(1, 2, 2)]],
            return_dict=False,
        )[0]
        image_loss = ((prediction - pack(eps - x0, 1, 4, 4, 4)) ** 2).mean()
    assert out.image_loss_kind == "mse" and int(out.image_tokens) == 4
    assert torch.allclose(out.image_loss, image_loss, atol=1e-5)
    assert torch.allclose(out.task_loss, text_loss + image_loss, atol=1e-5)  # weights 1, 1
    assert torch.allclose(
        out.weighted_task_loss(0.5, 2.0), 0.5 * text_loss + 2 * image_loss, atol=1e-5
    )


def test_hidden_states_are_two_stacks_of_different_depth(adapter):
    batch = adapter.encode(_examples())
    with torch.no_grad():
        out = adapter.forward(batch)
        picked = adapter.forward(batch, layers=[0, 2])
    assert out.stack_name == "mllm" and out.depth == 2 and out.layers == (0, 1, 2)
    assert [tuple(h.shape) for h in out.hidden_layers] == [(4, batch["roles"].shape[1], 64)] * 3
    (stack,) = out.extra_stacks
    assert stack.name == "denoiser" and stack.depth == 4 and stack.layers == (0, 1, 2, 3, 4)
    assert stack.quantities == ("response/image",) and stack.rows.tolist() == [0, 3]
    assert [tuple(h.shape) for h in stack.hidden_layers] == [
        (2, batch["denoiser_roles"].shape[1], 32)
    ] * 5
    assert torch.equal(stack.roles, batch["denoiser_roles"][[0, 3]])
    # The t2i row has no source tokens: zeros where its roles are PAD.
    assert torch.equal(stack.hidden_layers[2][0, -4:], torch.zeros(4, 32))
    # Asked layers of the LLM; the denoiser at the same depth fractions (0 and 1).
    assert picked.layers == (0, 2) and picked.extra_stacks[0].layers == (0, 4)
    assert torch.equal(picked.extra_stacks[0].hidden_layers[1], stack.hidden_layers[4])
    # Layer 0 of the LLM holds the image features at the image positions; final_norm swaps
    # the last layer for the norm's output.
    normed = adapter.forward(batch, layers=[2], final_norm=True)
    assert torch.allclose(
        normed.hidden_layers[0], adapter.mllm.model.language_model.norm(out.hidden_layers[2]),
        atol=1e-6,
    )  # fmt: skip


def test_the_probe_is_deterministic_at_a_fixed_timestep(adapter):
    examples = _examples()
    first = run_probe(adapter, examples, ProbeConfig(batch_size=4))
    second = run_probe(adapter, examples, ProbeConfig(batch_size=4))
    for q in first.records:
        assert np.array_equal(first.records[q].values, second.records[q].values), q
    assert first.axes == {"response/image": QuantityAxis("denoiser", (0, 1, 2, 3, 4), 4)}
    assert first.depth == 2 and first.stack == "mllm"
    assert {q: len(r) for q, r in first.records.items()} == {
        "encoding/text": 2, "encoding/image": 2, "response/text": 2, "response/image": 2,
    }  # fmt: skip
    # Another batching (one example at a time, reversed): the same values, to round-off.
    alone = run_probe(adapter, examples[::-1], ProbeConfig(batch_size=1))
    for q in first.records:
        order = np.argsort(alone.records[q].categories)
        expected = np.argsort(first.records[q].categories)
        assert np.allclose(
            alone.records[q].values[order], first.records[q].values[expected], atol=1e-9
        ), q
    # Another noise level changes the image responses only.
    later = run_probe(adapter, examples, ProbeConfig(batch_size=4, timestep=0.9))
    assert not np.allclose(
        later.records["response/image"].values, first.records["response/image"].values
    )
    for q in ("encoding/text", "encoding/image", "response/text"):
        assert np.array_equal(later.records[q].values, first.records[q].values)
    scores = first.scores()
    assert set(scores) == {"encoding_gap", "response_split", "final_gap"}
    assert all(np.isfinite(v) for v in scores.values())


def test_training_draws_noise_levels_and_seeds(adapter, folder):
    batch = adapter.encode(_examples())
    assert batch["noise_seeds"].tolist() == [example_seed(e) for e in _examples()]
    assert torch.equal(adapter.encode(_examples())["noise_seeds"], batch["noise_seeds"])
    torch.manual_seed(0)
    drawn = adapter.training_batch(batch)
    again = adapter.training_batch(batch)
    assert drawn["timesteps"].shape == (4,) and 0 < float(drawn["timesteps"].min())
    assert float(drawn["timesteps"].max()) < 1 and "timesteps" not in batch
    assert not torch.equal(drawn["timesteps"], again["timesteps"])
    assert not torch.equal(drawn["noise_seeds"], batch["noise_seeds"])
    with torch.no_grad():
        noisy = adapter.forward(drawn, output_hidden_states=False).image_loss
        fixed = adapter.forward(batch, output_hidden_states=False).image_loss
    assert not torch.equal(noisy, fixed)
    shifted = TwoStageAdapter.load(folder, schedule={"sampling": "logit_normal", "shift": 3.0})
    torch.manual_seed(0)
    levels = shifted.training_batch(batch)["timesteps"]
    assert levels.shape == (4,) and not torch.equal(levels, drawn["timesteps"])


def test_continuous_contextual_prediction_scores_masked_latents_through_the_mask(adapter):
    torch.manual_seed(0)
    batch = adapter.training_batch(adapter.encode(_examples()))
    term = ContextualPredictionLoss(
        LossConfig(w_ctx=1.0, ctx_mode="bidirectional", ctx_row_fraction=1.0), adapter.mask_width
    )
    assert term.mask_embedding.shape == (32,)
    rows = term.context_rows(batch, adapter)
    assert rows["roles"].shape[0] == 2 and rows["has_image"].all()  # the t2i and edit rows
    assert rows["denoiser_roles"].shape == (2, batch["denoiser_roles"].shape[1])
    seen = {}

    def keep(_module, args):
        seen["input"] = args[0]  # the image stream inside the first block

    first = adapter.transformer.transformer_blocks[0].img_norm1
    handle = first.register_forward_pre_hook(keep)
    try:
        loss, tokens = term.contextual_prediction(adapter, batch)
    finally:
        handle.remove()
    # Some, not all, of the 2 x 4 target tokens were masked and scored (cosine share, >= 1).
    assert 1 <= int(tokens) <= 8 and torch.isfinite(loss)
    # Masked inputs of the last group (the edit row) are the mask latent, the others not.
    m = term.mask_embedding.detach()
    equal = [torch.allclose(token, m) for token in seen["input"][0]]
    assert any(equal[:4]) and not any(equal[4:])  # target tokens, then the source's
    loss.backward()
    assert term.mask_embedding.grad.abs().sum() > 0
    # The causal mode has no next-token image targets here.
    causal = ContextualPredictionLoss(LossConfig(w_ctx=1.0, ctx_mode="causal"), adapter.mask_width)
    with pytest.raises(ValueError, match="predicts continuous latents: use loss.ctx_mode=bidir"):
        causal.contextual_prediction(adapter, batch)
    with pytest.raises(ValueError, match="no mask latent of its own"):
        adapter.forward({**batch, "masked_positions": batch["denoiser_roles"] == 5})


def test_masked_latents_alone_are_scored_by_hand(adapter):
    """With masked_positions and a hook, the image loss is the MSE over the masked target
    tokens only (counted in tokens), the inputs there being what the hook writes."""
    batch = adapter.encode(_examples()[:1])
    targets = (batch["denoiser_roles"][0] == int(R.IMAGE_RESPONSE)).nonzero().flatten()
    replaced = torch.zeros_like(batch["denoiser_roles"], dtype=torch.bool)
    replaced[0, targets[1]] = True
    mask = torch.full((32,), 0.25)

    def hook(embeds, _batch):
        return torch.where(replaced[..., None], mask, embeds)

    def scored(*tokens):
        chosen = torch.zeros_like(replaced)
        chosen[0, targets[list(tokens)]] = True
        with torch.no_grad():
            return adapter.forward({**batch, "masked_positions": chosen}, embedding_hook=hook)

    one, rest, every = scored(1), scored(0, 2, 3), scored(0, 1, 2, 3)
    assert (int(one.image_tokens), int(rest.image_tokens), int(every.image_tokens)) == (1, 3, 4)
    assert float(every.image_loss) == pytest.approx(
        (float(one.image_loss) + 3 * float(rest.image_loss)) / 4, rel=1e-6
    )
    layer0 = one.extra_stacks[0].hidden_layers[0][0]
    assert torch.equal(layer0[targets[1]], mask) and not torch.equal(layer0[targets[0]], mask)


def test_both_loss_terms_reach_both_stacks(adapter):
    batch = adapter.encode(_examples())
    term = ContextualPredictionLoss(
        LossConfig(w_ctx=1.0, w_div=1.0, ctx_mode="bidirectional", ctx_row_fraction=1.0),
        adapter.mask_width,
    )
    out = adapter.forward(adapter.training_batch(batch))
    total, logs = term(adapter, batch, out, step=0)
    assert torch.isfinite(total) and logs["loss/div_parts"] == 2 and logs["loss/ctx_tokens"] > 0
    total.backward()
    llm_grad = adapter.mllm.model.language_model.layers[0].self_attn.q_proj.weight.grad
    dit_grad = adapter.transformer.transformer_blocks[0].attn.to_q.weight.grad
    assert llm_grad.abs().sum() > 0 and dit_grad.abs().sum() > 0


def test_default_lora_targets_are_the_llm_and_denoiser_projections(adapter):
    import peft

    from unifyreg.config import LoraSettings
    from unifyreg.module import apply_lora

    targets = adapter.default_lora_targets
    llm = [t for t in targets if t.startswith("mllm.model.language_model.layers.")]
    dit = [t for t in targets if t.startswith("transformer.transformer_blocks.")]
    assert len(llm) == 2 * 7 and len(dit) == 4 * 8 and len(targets) == len(llm) + len(dit)
    assert {t.rsplit(".", 1)[-1] for t in llm} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    assert {t.split(".attn.")[1] for t in dit} == {
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"
    }  # fmt: skip
    assert not [t for t in targets if "visual" in t or t.startswith("vae")]
    apply_lora(adapter, LoraSettings(r=2, alpha=4))
    assert isinstance(adapter.model, peft.PeftModel)
    trainable = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        out = adapter.forward(adapter.encode(_examples()))  # hooks under the peft wrapper
    assert len(out.hidden_layers) == 3 and len(out.extra_stacks[0].hidden_layers) == 5


def test_generation(adapter):
    examples = _examples()
    answers = adapter.generate_text(examples[1:3], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    images = adapter.generate_images(examples[:1])
    again = adapter.generate_images(examples[:1])
    assert images[0].size == (32, 32) and images[0].mode == "RGB"
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))  # seeded per example
    edited = adapter.generate_images(examples[3:])
    assert edited[0].size == (32, 32)
    result = run_probe(adapter, examples, ProbeConfig(responses="generated", batch_size=4))
    assert len(result.records["response/image"]) == 2


def test_the_edit_pipeline_folder(edit_folder):
    index = json.loads((edit_folder / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline" and "processor" in index
    adapter = TwoStageAdapter.load(edit_folder)
    assert adapter.components["processor"] == "processor"
    batch = adapter.encode(_examples()[3:])
    with torch.no_grad():
        out = adapter.forward(batch)
    assert int(out.image_tokens) == 4 and torch.isfinite(out.image_loss)
    assert batch["has_source"].tolist() == [True]


# ---------------------------------------------------------------------- OmniGen2's route


OMNIGEN2_TEMPLATE = TwoStageTemplate(
    t2i_system="You are a helpful assistant that generates high-quality images based on user "
    "instructions.",
    drop_system=False,
    assistant_header=False,
    edit_image_in_prompt=False,
)


@pytest.fixture(scope="module")
def omnigen2_style_folder(tmp_path_factory):
    """An OmniGen2-layout folder (mllm/, processor/, transformer/, vae/, scheduler/) whose
    transformer is diffusers' Lumina2 (OmniGen2's block layout), each part written by its
    own save_pretrained, model_index.json naming OmniGen2's classes."""
    from diffusers import AutoencoderKL, Lumina2Transformer2DModel
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    root = tmp_path_factory.mktemp("omnigen2") / "pipeline"
    tokenizer, mllm, _, _, scheduler = _tiny_parts(0, 2, 1)
    mllm.save_pretrained(root / "mllm")
    tokenizer.save_pretrained(root / "processor")
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(
        root / "processor"
    )
    Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=3,
        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
        axes_dim_rope=(4, 6, 6), axes_lens=(300, 512, 512), cap_feat_dim=64,
    ).save_pretrained(root / "transformer")  # fmt: skip
    AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8], layers_per_block=1, latent_channels=4,
        norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
    ).save_pretrained(root / "vae")  # fmt: skip
    scheduler.save_pretrained(root / "scheduler")
    index = {
        "_class_name": "OmniGen2Pipeline",
        "mllm": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "processor": ["transformers", "Qwen2_5_VLProcessor"],
        "transformer": ["omnigen2", "OmniGen2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["omnigen2", "FlowMatchEulerDiscreteScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_a_transformer_diffusers_lacks_needs_its_class(omnigen2_style_folder):
    with pytest.raises(ValueError, match="omnigen2.OmniGen2Transformer2DModel, which diffusers"):
        TwoStageAdapter.load(omnigen2_style_folder)
    from diffusers import Lumina2Transformer2DModel

    with pytest.raises(ValueError, match="transformer_class needs a denoiser"):
        TwoStageAdapter.load(omnigen2_style_folder, transformer_class=Lumina2Transformer2DModel)


def test_the_users_transformer_class_runs_through_the_same_adapter(omnigen2_style_folder):
    from diffusers import Lumina2Transformer2DModel

    adapter = TwoStageAdapter.load(
        omnigen2_style_folder,
        transformer_class=Lumina2Transformer2DModel,
        denoiser=Lumina2Denoiser(),
        template=OMNIGEN2_TEMPLATE,
        image_size=[32, 32],
        num_inference_steps=2,
    )
    assert adapter.denoiser_depth == 3 and adapter.mask_width == 32
    assert adapter.codec.factor == 8 and adapter.components["tokenizer"] == "processor"
    examples = [
        ManifestExample("composition", T2I, response_image=_image(1)),
        ManifestExample("composition", "cube", response_image=_image(2)),
        ManifestExample("deductive", TEXT, response_text=REPLY),
    ]
    batch = adapter.encode(examples)
    # No system part dropped, no assistant header: the whole prompt row conditions; the
    # joint stream is [caption_i; image] per row, padded at the end.
    assert batch["condition_positions"][0, 0] == 0
    lengths = [len(batch["roles"][b][batch["roles"][b] != 0]) for b in range(2)]
    den = batch["denoiser_roles"]
    for b, n in enumerate(lengths):
        assert den[b, n : n + 4].tolist() == [int(R.IMAGE_RESPONSE)] * 4
        assert set(den[b, n + 4 :].tolist()) <= {0}
        assert torch.equal(den[b, :n], batch["roles"][b, :n])
    with torch.no_grad():
        out = adapter.forward(batch)
    assert int(out.image_tokens) == 8 and torch.isfinite(out.image_loss)
    (stack,) = out.extra_stacks
    assert stack.depth == 3 and stack.hidden_layers[0].shape == (2, den.shape[1], 32)
    result = run_probe(adapter, examples, ProbeConfig())
    assert result.axes["response/image"] == QuantityAxis("denoiser", (0, 1, 2, 3), 3)
    assert np.isfinite(result.records["response/image"].values).all()
    term = ContextualPredictionLoss(
        LossConfig(w_ctx=1.0, w_div=1.0, ctx_mode="bidirectional", ctx_row_fraction=1.0),
        adapter.mask_width,
    )
    out = adapter.forward(adapter.training_batch(batch))
    total, logs = term(adapter, batch, out, step=0)
    assert torch.isfinite(total) and logs["loss/ctx_tokens"] > 0
    assert adapter.generate_images(examples[:1])[0].size == (32, 32)


# ---------------------------------------------------------------------- the CLI


def _manifest(directory):
    """A JSONL set: t2i, understanding, text and edit examples, images as PNG files."""
    rows = []
    for index in range(2):
        _image(10 + index).save(directory / f"r{index}.png")
        _image(20 + index).save(directory / f"p{index}.png")
        rows += [
            {
                "text": f"draw cube {index}",
                "response_image": f"r{index}.png",
                "category": "composition",
            },
            {
                "text": QUESTION,
                "image": f"p{index}.png",
                "response": ANSWER,
                "category": "attribute",
            },
        ]
    rows.append({"text": TEXT, "response": REPLY, "category": "deductive"})
    rows.append({"text": EDIT, "image": "p0.png", "response_image": "r1.png", "category": "edit"})
    rows.append({"text": "one two", "response": "three four", "category": "inductive"})
    path = directory / "set.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_probe_command_runs_on_a_tiny_pipeline_folder(folder, tmp_path):
    from unifyreg.cli import main

    out = tmp_path / "out"
    args = [
        "probe",
        "--config",
        str(ROOT / "configs" / "two_stage" / "probe.yaml"),
        f"model.path={folder}",
        f"probe_set={_manifest(tmp_path)}",
        "model.dtype=float32",
        f"output_dir={out}",
    ]
    assert main(args) == 0
    result = ProbeResult.load(out / "result.json")
    assert {q: len(r) for q, r in result.records.items()} == {
        "encoding/text": 4, "encoding/image": 3, "response/text": 4, "response/image": 3,
    }  # fmt: skip
    assert result.axes["response/image"] == QuantityAxis("denoiser", (0, 1, 2, 3, 4), 4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["axes"]["response/image"]["depth"] == 4 and summary["depth"] == 2
    assert set(summary["scores"]) == {"encoding_gap", "response_split", "final_gap"}
    assert (out / "response_trajectories.png").stat().st_size > 0


def test_finetune_command_runs_one_lora_epoch(folder, tmp_path):
    import csv

    from unifyreg.cli import main

    manifest = _manifest(tmp_path)
    run_dir = tmp_path / "run"
    args = [
        "finetune",
        "--config",
        str(ROOT / "configs" / "two_stage" / "finetune_lora.yaml"),
        f"model.path={folder}",
        f"data={manifest}",
        f"probe_set={manifest}",
        "model.dtype=float32",
        "precision=32-true",
        "accelerator=cpu",
        "max_epochs=1",
        "batch_size=7",
        "probe.batch_size=7",
        "loss.w_ctx=1.0",
        "loss.w_div=1.0",
        "loss.ctx_row_fraction=1.0",
        "loggers=[csv]",
        f"run_dir={run_dir}",
    ]
    assert main(args) == 0
    history = [
        json.loads(x) for x in (run_dir / "probe" / "probe_history.jsonl").read_text().splitlines()
    ]
    assert [entry["epoch"] for entry in history] == [0, 1]
    assert "probe/response/image/layer_04" in history[0]["metrics"]  # the denoiser's layers
    assert (run_dir / "lora" / "adapter_config.json").is_file()
    metrics = next((run_dir / "logs").glob("version_*/metrics.csv"))
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("tokens/image")]
    # 3 image rows x 4 latent tokens; both regularizer terms ran and were finite.
    assert rows and all(float(r["tokens/image"]) == 12 for r in rows)
    assert all(
        np.isfinite(float(r["loss/ctx"])) and np.isfinite(float(r["loss/div"])) for r in rows
    )
    assert all(float(r["loss/ctx_tokens"]) > 0 for r in rows)


def test_ddp_probe_equals_a_single_process(folder, tmp_path, monkeypatch):
    """Two CPU ranks (gloo, strategy=ddp, relaunched as real processes) shard a probe set
    of 7 examples unevenly (4 and 3): the gathered epoch-0 probe equals a single-process
    probe of the same folder (LoRA starts at zero) to float32 round-off (measured: 1.3e-7
    relative at worst; the activations of a float32 model differ at that level with batch
    shapes and thread counts), so the noise does not depend on the sharding; noise seeded
    otherwise moves the image responses by far more than the tolerance."""
    import subprocess
    import sys
    from pathlib import Path

    from unifyreg.callbacks import probe_metrics
    from unifyreg.manifest import read_manifest

    manifest = _manifest(tmp_path)
    unifyreg = str(Path(sys.executable).parent / "unifyreg")
    command = [
        unifyreg, "finetune", "model.adapter=two_stage", f"model.path={folder}",
        f"data={manifest}", f"probe_set={manifest}", "batch_size=7", "max_steps=1",
        "probe.batch_size=2", "accelerator=cpu", "devices=2", "loggers=[csv]",
        # A rank whose batch holds no image row leaves the denoiser's LoRA weights unused.
        "strategy=ddp_find_unused_parameters_true",
        f"run_dir={tmp_path / 'ddp'}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    entry = json.loads((tmp_path / "ddp/probe/probe_history.jsonl").read_text().splitlines()[0])
    assert entry["epoch"] == 0
    examples = read_manifest(manifest).examples
    single = probe_metrics(
        run_probe(TwoStageAdapter.load(folder), examples, ProbeConfig(batch_size=2))
    )
    assert entry["metrics"].keys() - {"probe/epoch", "probe/skipped_examples"} == single.keys()
    assert "probe/response/image/layer_04" in single
    for key, value in single.items():
        assert entry["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # The tolerance can tell: other noise (one seed for every example) moves them.
    import unifyreg.adapters.two_stage as two_stage

    monkeypatch.setattr(two_stage, "example_seed", lambda example: 0)
    other = probe_metrics(
        run_probe(TwoStageAdapter.load(folder), examples, ProbeConfig(batch_size=2))
    )
    key = "probe/response/image/layer_04"
    assert abs(other[key] - single[key]) > 1e-4 * abs(single[key])
