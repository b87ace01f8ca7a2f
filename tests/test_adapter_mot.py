"""Tests of the mixture-of-transformers adapter on tiny random checkpoints: a native folder
whose ``Cosmos3OmniTransformer`` is written by diffusers' own ``save_pretrained``
(:func:`save_tiny_mot`), and a folder in BAGEL's released layout (``llm_config.json``,
``vit_config.json``, ``ema.safetensors`` under BAGEL's key names; :func:`save_tiny_bagel`),
both read back through ``MoTAdapter.load(path)``, the path a user takes with real weights."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unifyreg.adapters import get_adapter_class
from unifyreg.adapters.continuous import example_seed
from unifyreg.adapters.mot import (
    CAUSAL,
    FULL,
    NOISE,
    MoTAdapter,
    mot_attention_mask,
    patchify,
    save_tiny_bagel,
    save_tiny_mot,
    tiny_bagel_state,
)
from unifyreg.config import LossConfig, ProbeConfig
from unifyreg.losses import ContextualPredictionLoss
from unifyreg.manifest import ManifestExample
from unifyreg.probing import ProbeResult, run_probe
from unifyreg.roles import Role

R = Role
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
T2I, QUESTION, ANSWER, TEXT, REPLY, EDIT = (
    "draw a red cube",
    "what is it?",
    "a cube",
    "two plus one",
    "three",
    "make it blue",
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_mot(tmp_path_factory.mktemp("mot") / "model")


@pytest.fixture(scope="module")
def bagel_folder(tmp_path_factory):
    return save_tiny_bagel(tmp_path_factory.mktemp("bagel") / "BAGEL")


@pytest.fixture
def adapter(folder):
    return MoTAdapter.load(folder)


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


# ---------------------------------------------------------------------- loading


def test_the_native_folder_is_diffusers_own_and_round_trips(adapter, folder, tmp_path):
    from diffusers import Cosmos3OmniTransformer

    assert get_adapter_class("mot") is MoTAdapter
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "Cosmos3OmniTransformer"
    own = Cosmos3OmniTransformer.from_pretrained(folder / "transformer", local_files_only=True)
    assert len(own.layers) == 2 and adapter.num_layers == 2 and adapter.layout == "native"
    assert adapter.parts.latent_pos_embed is None and adapter.parts.vit is not None
    batch = adapter.encode(_examples())
    with torch.no_grad():
        before = adapter.forward(batch, keep_logits=True)
    adapter.save(tmp_path / "again")
    reloaded = MoTAdapter.load(tmp_path / "again")
    assert reloaded.adapter_settings() == adapter.adapter_settings()
    with torch.no_grad():
        after = reloaded.forward(batch, keep_logits=True)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.image_loss, after.image_loss)
    for a, b in zip(before.hidden_layers, after.hidden_layers, strict=True):
        assert torch.equal(a, b)


def test_every_bagel_key_lands_where_it_belongs(bagel_folder, tmp_path):
    state = tiny_bagel_state()
    adapter = MoTAdapter.load(bagel_folder)
    assert adapter.layout == "bagel" and adapter.weights_file == "ema.safetensors"
    parts = adapter.parts
    own = parts.state_dict(keep_vars=True)
    # Written out by hand: where BAGEL's names go in Cosmos3, SigLIP and the connector.
    bl, cl = "language_model.model.layers.", "transformer.layers."
    spec = {
        f"{bl}1.self_attn.q_proj.bias": f"{cl}1.self_attn.to_q.bias",
        f"{bl}0.self_attn.o_proj.weight": f"{cl}0.self_attn.to_out.weight",
        f"{bl}0.self_attn.k_proj_moe_gen.weight": f"{cl}0.self_attn.add_k_proj.weight",
        f"{bl}1.self_attn.o_proj_moe_gen.weight": f"{cl}1.self_attn.to_add_out.weight",
        f"{bl}0.self_attn.q_norm_moe_gen.weight": f"{cl}0.self_attn.norm_added_q.weight",
        f"{bl}1.self_attn.k_norm.weight": f"{cl}1.self_attn.norm_k.weight",
        f"{bl}1.mlp_moe_gen.down_proj.weight": f"{cl}1.mlp_moe_gen.down_proj.weight",
        f"{bl}0.post_attention_layernorm_moe_gen.weight":
            f"{cl}0.post_attention_layernorm_moe_gen.weight",
        "language_model.model.norm_moe_gen.weight": "transformer.norm_moe_gen.weight",
        "language_model.lm_head.weight": "transformer.lm_head.weight",
        "time_embedder.mlp.2.weight": "transformer.time_embedder.linear_2.weight",
        "vae2llm.bias": "transformer.proj_in.bias",
        "llm2vae.weight": "transformer.proj_out.weight",
        "latent_pos_embed.pos_embed": "latent_pos_embed.pos_embed",
        "vit_pos_embed.pos_embed": "vit_pos_embed.pos_embed",
        "connector.fc1.weight": "connector.fc1.weight",
        "vit_model.vision_model.encoder.layers.0.self_attn.out_proj.weight":
            "vit.encoder.layers.0.self_attn.out_proj.weight",
        "vit_model.vision_model.post_layernorm.bias": "vit.post_layernorm.bias",
    }  # fmt: skip
    for key, target in spec.items():
        assert torch.equal(own[target], state[key]), key
    # The packed ViT's linear patch embedding over (p, q, c) is SigLIP's convolution.
    linear = state["vit_model.vision_model.embeddings.patch_embedding.weight"]
    conv = parts.vit.embeddings.patch_embedding
    pixels = torch.randn(1, 3, 8, 8)
    flat = pixels[0].permute(1, 2, 0).reshape(-1)  # (p, q, c), as BAGEL's patchify
    expected = linear @ flat + state["vit_model.vision_model.embeddings.patch_embedding.bias"]
    assert torch.allclose(conv(pixels).flatten(), expected, atol=1e-5)
    # Every tensor of the checkpoint is used, and only the two zero biases are extra.
    assert len(parts.vit.encoder.layers) == 1  # vit_config says 2: BAGEL drops the last
    loaded = sum(v.numel() for k, v in own.items() if not k.startswith("vae."))
    zero = [k for k in own if k.endswith(("to_out.bias", "to_add_out.bias"))]
    assert len(zero) == 4 and all(not own[k].any() and not own[k].requires_grad for k in zero)
    assert loaded == sum(v.numel() for v in state.values()) + sum(own[k].numel() for k in zero)
    # BAGEL's latents: one RoPE position for the whole image, and the frozen 2-D table added
    # at row * max_latent_size + col (8 x 8 here: ids 0, 1, 8, 9 for 2 x 2 tokens).
    example = ManifestExample("c", T2I, response_image=_image(1))
    batch = adapter.encode([example])
    latent = batch["roles"][0] == int(R.IMAGE_RESPONSE)
    assert set(batch["position_ids"][0][:, latent].flatten().tolist()) == {len(T2I) + 2}
    with torch.no_grad():
        layer0 = adapter.forward(batch, layers=[0]).hidden_layers[0][0][latent]
        noise = torch.randn(
            (4, 4, 4), generator=torch.Generator().manual_seed(example_seed(example))
        )
        transformer = parts.transformer
        noisy = 0.5 * batch["latents"] + 0.5 * noise
        time = transformer.time_embedder(transformer.time_proj(torch.tensor([0.5])))
        table = state["latent_pos_embed.pos_embed"][[0, 1, 8, 9]]
        expected = transformer.proj_in(patchify(noisy, 2))[0] + time + table
    assert torch.allclose(layer0, expected, atol=1e-6)
    # Saved natively (diffusers' transformer folder, SigLIP's, the tables): the same model,
    # the zero biases still frozen.
    adapter.save(tmp_path / "native")
    again = MoTAdapter.load(tmp_path / "native")
    assert again.layout == "native" and again.parts.latent_pos_embed is not None
    assert not again.transformer.layers[0].self_attn.to_out.bias.requires_grad
    batch = adapter.encode(_examples())
    with torch.no_grad():
        assert torch.equal(
            adapter.forward(batch, keep_logits=True).logits,
            again.forward(batch, keep_logits=True).logits,
        )


def test_missing_unexpected_and_misshapen_keys_are_errors_naming_them(tmp_path):
    state = tiny_bagel_state()
    gone = "language_model.model.layers.1.self_attn.k_proj_moe_gen.bias"
    broken = {k: v for k, v in state.items() if k != gone}
    save_tiny_bagel(tmp_path / "missing", state=broken)
    with pytest.raises(ValueError, match=f"missing key.*{gone}"):
        MoTAdapter.load(tmp_path / "missing")
    extra = "language_model.model.layers.0.self_attn.rotary.weight"
    save_tiny_bagel(tmp_path / "unexpected", state={**state, extra: torch.zeros(2)})
    with pytest.raises(ValueError, match=f"unexpected key.*{extra}"):
        MoTAdapter.load(tmp_path / "unexpected")
    # The ViT's last layer kept (BAGEL drops it): its keys have no place.
    save_tiny_bagel(tmp_path / "undropped", state=tiny_bagel_state(vit_layers=3), vit_layers=2)
    with pytest.raises(ValueError, match="unexpected key.*vit_model.vision_model.encoder.layers.1"):
        MoTAdapter.load(tmp_path / "undropped")
    wrong = {**state, "vae2llm.bias": torch.zeros(3)}
    save_tiny_bagel(tmp_path / "shape", state=wrong)
    with pytest.raises(ValueError, match=r"shape mismatch.*vae2llm.bias: \(3,\)"):
        MoTAdapter.load(tmp_path / "shape")
    with pytest.raises(FileNotFoundError, match="neither a mot folder"):
        (tmp_path / "plain").mkdir()
        MoTAdapter.load(tmp_path / "plain")


def test_recas_weights_file_takes_emas_place(tmp_path):
    folder = save_tiny_bagel(tmp_path / "BAGEL-RecA", seed=1, weights_file="model_bf16.safetensors")
    adapter = MoTAdapter.load(folder)
    assert adapter.weights_file == "model_bf16.safetensors"
    (folder / "other.safetensors").write_bytes((folder / "model_bf16.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="set weights_file"):
        MoTAdapter.load(folder)
    assert MoTAdapter.load(folder, weights_file="other.safetensors").weights_file == (
        "other.safetensors"
    )


def test_bagels_ae_safetensors_is_converted_by_diffusers(bagel_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_tiny_bagel(tmp_path / "BAGEL", vae_layout="ae")  # no vae/: ae.safetensors
    assert not (folder / "vae").exists()
    ae = load_file(folder / "ae.safetensors")
    assert "decoder.up.0.block.0.nin_shortcut.weight" not in ae  # tiny: equal widths
    assert (
        ae["encoder.mid.attn_1.q.weight"].dim() == 4 and "encoder.down.0.block.0.conv2.bias" in ae
    )
    converted = MoTAdapter.load(folder).parts.vae.state_dict()
    reference = MoTAdapter.load(bagel_folder).parts.vae.state_dict()  # the same VAE as vae/
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)
    del ae["decoder.up.3.block.1.conv1.weight"]
    save_file(ae, str(folder / "ae.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing \['decoder.up_blocks.0.resnets.1.conv1.weight'\]"
    ):
        MoTAdapter.load(folder)


# ---------------------------------------------------------------------- format and mask


def test_rows_follow_bagels_splits_position_by_position(adapter):
    tok = adapter.tokenizer
    batch = adapter.encode(_examples())
    S, TP, IP, TR, IR = R.SPECIAL, R.TEXT_PROMPT, R.IMAGE_PROMPT, R.TEXT_RESPONSE, R.IMAGE_RESPONSE

    def layout(*segments):
        return [int(role) for role, count in segments for _ in range(count)]

    words = {"t2i": T2I, "q": QUESTION, "a": ANSWER, "t": TEXT, "r": REPLY, "e": EDIT}
    n = {k: len(tok(v, add_special_tokens=False)["input_ids"]) for k, v in words.items()}
    expected = [
        layout((S, 1), (TP, n["t2i"]), (S, 2), (IR, 4), (S, 1)),
        layout((S, 1), (IP, 4), (S, 2), (TP, n["q"]), (S, 2), (TR, n["a"]), (S, 1)),
        layout((S, 1), (TP, n["t"]), (S, 2), (TR, n["r"]), (S, 1)),
        layout((S, 1), (IP, 4), (S, 2), (TP, n["e"]), (S, 2), (IR, 4), (S, 1)),
    ]
    for b, roles in enumerate(expected):
        row = batch["roles"][b].tolist()
        assert row[: len(roles)] == roles and set(row[len(roles) :]) <= {0}
    # Only the latents are the generation stream; text targets: the answer + <|im_end|>.
    assert torch.equal(batch["stream"] == 1, batch["roles"] == int(IR))
    assert batch["target_kind"].sum(dim=1).tolist() == [0, n["a"] + 1, n["r"] + 1, 0]
    # Splits and modes of the understanding row: image (full), prompt, answer (causal).
    q = batch["split_modes"][1, : len(expected[1])].tolist()
    assert q == [FULL] * 6 + [CAUSAL] * (len(expected[1]) - 6)
    assert batch["split_ids"][1, : len(expected[1])].tolist() == (
        [0] * 6 + [1] * (n["q"] + 2) + [2] * (n["a"] + 2)
    )
    # RoPE: one position per text token, one shared by an image split; the native folder
    # has no latent table, so latents get (p, p + row, p + col).
    positions = batch["position_ids"][1, 0, : len(expected[1])].tolist()
    assert positions == [0] * 6 + list(range(1, 1 + n["q"] + 2 + n["a"] + 2))
    start = n["t2i"] + 2
    assert batch["split_modes"][0, start : start + 6].tolist() == [NOISE] * 6
    image = batch["position_ids"][0, :, start : start + 6]
    p = start
    assert image.tolist() == [[p] * 6, [p, p, p, p + 1, p + 1, p], [p, p, p + 1, p, p + 1, p]]
    assert batch["has_image"].tolist() == [True, False, False, True]
    assert batch["vit_pixels"].shape == (4, 3, 16, 16) and batch["latents"].shape == (4, 4, 4, 4)


def test_the_mask_is_bagels_pattern():
    # Splits: text (causal), image (full), text (causal), noisy image, text (causal).
    modes = [CAUSAL] * 2 + [FULL] * 2 + [CAUSAL] * 2 + [NOISE] * 2 + [CAUSAL] * 2
    splits = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    valid = torch.ones(1, 10, dtype=torch.long)
    valid[0, -1] = 0
    mask = mot_attention_mask(torch.tensor([splits]), torch.tensor([modes]), valid)
    allowed = (mask[0, 0] == 0).int().tolist()
    expected = [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # the image sees itself both ways
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],  # noisy latents: bidirectional among themselves
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 1, 0],  # ...and hidden from later tokens; padding hidden
        [1, 1, 1, 1, 1, 1, 0, 0, 1, 0],
    ]
    assert allowed == expected
    assert mask.dtype == torch.float32 and float(mask.min()) == torch.finfo(torch.float32).min


# ---------------------------------------------------------------------- losses


def _native_pass(adapter, example, dummy_image=False):
    """The transformer's own ``forward`` (diffusers' Cosmos3AttnProcessor, its packing, time
    embedding and proj_out) on one encoded row: understanding tokens first (causal among
    themselves), the latents after (attending to everything). Returns (the understanding
    stream's final states, the velocity prediction [C, h, w] or None, the batch)."""
    from diffusers.models.transformers.transformer_cosmos3 import Cosmos3AttnProcessor

    batch = adapter.encode([example])
    transformer = adapter.transformer
    roles, ids = batch["roles"][0], batch["input_ids"][0]
    und = torch.nonzero(batch["stream"][0] == 0).flatten()
    gen = torch.nonzero(batch["stream"][0] == 1).flatten()
    positions = batch["position_ids"][0]
    x0 = batch["latents"][0:1] if "latents" in batch else torch.zeros(1, 4, 4, 4)
    noise = torch.randn(
        x0.shape[1:], generator=torch.Generator().manual_seed(example_seed(example))
    )
    noisy = 0.5 * x0 + 0.5 * noise[None]
    if dummy_image:  # a text row: one image behind it, which causal text never sees
        gen = torch.arange(len(roles), len(roles) + 4)
        positions = torch.cat([positions, positions[:, -1:].expand(-1, 4) + 1], dim=1)
    order = torch.cat([und, gen])
    captured = {}
    handle = transformer.norm.register_forward_hook(lambda m, a, out: captured.update(und=out))
    saved = [layer.self_attn.processor for layer in transformer.layers]
    try:
        for layer in transformer.layers:
            layer.self_attn.set_processor(Cosmos3AttnProcessor())
        with torch.no_grad():
            pred = transformer(
                input_ids=ids[und],
                text_indexes=torch.arange(len(und)),
                position_ids=positions[:, order],
                und_len=len(und),
                sequence_length=len(order),
                vision_tokens=[noisy[:, :, None]],
                vision_token_shapes=[(1, 2, 2)],
                vision_sequence_indexes=torch.arange(len(und), len(order)),
                vision_mse_loss_indexes=torch.arange(len(und), len(order)),
                vision_timesteps=torch.full((4,), 500.0),
                vision_noisy_frame_indexes=[torch.tensor([0])],
                return_dict=False,
            )[0][0]
    finally:
        handle.remove()
        for layer, processor in zip(transformer.layers, saved, strict=True):
            layer.self_attn.set_processor(processor)
    return captured["und"], pred[:, :, 0], noise, x0, batch


def test_losses_equal_diffusers_own_forward(adapter):
    text = ManifestExample("d", TEXT, response_text=REPLY)
    und, _, _, _, batch = _native_pass(adapter, text, dummy_image=True)
    logits = adapter.transformer.lm_head(und)
    targets = torch.nonzero(batch["target_kind"][0]).flatten()
    text_loss = F.cross_entropy(logits[targets - 1], batch["input_ids"][0, targets])
    with torch.no_grad():
        out = adapter.forward(batch, output_hidden_states=False)
    assert int(out.text_tokens) == len(targets) == len(REPLY) + 1
    assert torch.allclose(out.text_loss, text_loss, atol=1e-5)
    # Image: Cosmos3's own pattern (latents see all, understanding tokens never see latents)
    # as the batch's 4-D mask; the flow loss against eps - x0 at t = 0.5.
    t2i = ManifestExample("c", T2I, response_image=_image(1))
    _, velocity, noise, x0, batch = _native_pass(adapter, t2i)
    stream = batch["stream"][0]
    length = len(stream)
    causal = torch.ones(length, length).tril().bool()
    allowed = torch.where(stream[:, None] == 1, True, causal & (stream[None, :] == 0))
    batch["attention_mask_4d"] = torch.zeros(1, 1, length, length).masked_fill(
        ~allowed, torch.finfo(torch.float32).min
    )
    with torch.no_grad():
        out = adapter.forward(batch, output_hidden_states=False)
    image_loss = ((velocity - (noise - x0[0])) ** 2).mean()
    assert out.image_loss_kind == "mse" and int(out.image_tokens) == 4
    assert torch.allclose(out.image_loss, image_loss, atol=1e-5)
    assert torch.allclose(out.weighted_task_loss(0.5, 2.0), 0.5 * out.text_loss + 2 * image_loss)


def test_hidden_states_hold_both_streams_in_sequence_order(adapter):
    batch = adapter.encode(_examples())
    with torch.no_grad():
        out = adapter.forward(batch)
        normed = adapter.forward(batch, layers=[0, 2], final_norm=True)
    length = batch["roles"].shape[1]
    assert out.layers == (0, 1, 2) and out.depth == 2 and out.stack_name == "mot"
    assert [tuple(h.shape) for h in out.hidden_layers] == [(4, length, 64)] * 3
    transformer = adapter.transformer
    text = batch["roles"] == int(R.TEXT_PROMPT)
    latent = batch["roles"] == int(R.IMAGE_RESPONSE)
    layer0 = out.hidden_layers[0]
    assert torch.equal(layer0[text], transformer.embed_tokens(batch["input_ids"][text]))
    # Latent inputs: proj_in of the noisy patches plus the time embedding at t = 0.5.
    x0 = batch["latents"][0:1]
    noise = torch.randn(
        (4, 4, 4), generator=torch.Generator().manual_seed(batch["noise_seeds"][0].item())
    )
    with torch.no_grad():
        time = transformer.time_embedder(transformer.time_proj(torch.tensor([0.5])))
        expected = transformer.proj_in(patchify(0.5 * x0 + 0.5 * noise, 2))[0] + time
    assert torch.allclose(layer0[0][latent[0]], expected, atol=1e-6)
    # final_norm: norm at understanding positions, norm_moe_gen at the latents.
    last, final = out.hidden_layers[2], normed.hidden_layers[1]
    assert torch.allclose(final[text], transformer.norm(last[text]), atol=1e-6)
    assert torch.allclose(final[latent], transformer.norm_moe_gen(last[latent]), atol=1e-6)
    # The generation expert moves the latents only: the text before them stays.
    with torch.no_grad():
        transformer.layers[0].mlp_moe_gen.down_proj.weight.mul_(3.0)
        moved = adapter.forward(batch).hidden_layers[1]
    assert torch.equal(moved[text], out.hidden_layers[1][text])
    assert not torch.allclose(moved[latent], out.hidden_layers[1][latent])


def test_the_probe_is_deterministic_at_a_fixed_timestep(adapter):
    examples = _examples()
    first = run_probe(adapter, examples, ProbeConfig(batch_size=4))
    second = run_probe(adapter, examples, ProbeConfig(batch_size=4))
    for q in first.records:
        assert np.array_equal(first.records[q].values, second.records[q].values), q
    assert {q: len(r) for q, r in first.records.items()} == {
        "encoding/text": 2, "encoding/image": 2, "response/text": 2, "response/image": 2,
    }  # fmt: skip
    alone = run_probe(adapter, examples[::-1], ProbeConfig(batch_size=1))
    for q in first.records:
        order = np.argsort(alone.records[q].categories)
        expected = np.argsort(first.records[q].categories)
        assert np.allclose(
            alone.records[q].values[order], first.records[q].values[expected], atol=1e-9
        ), q
    later = run_probe(adapter, examples, ProbeConfig(batch_size=4, timestep=0.9))
    assert not np.allclose(
        later.records["response/image"].values, first.records["response/image"].values
    )
    # The other quantities do not read the latents (text and image prompts come before them,
    # causal): equal up to the float32 round-off of attention kernels whose masked keys
    # changed (measured: 2.4e-14 relative in the entropies at most).
    for q in ("encoding/text", "encoding/image", "response/text"):
        assert np.allclose(later.records[q].values, first.records[q].values, rtol=1e-9), q
    assert all(np.isfinite(v) for v in first.scores().values())


def test_training_draws_noise_levels_and_seeds(adapter):
    batch = adapter.encode(_examples())
    assert batch["noise_seeds"].tolist() == [example_seed(e) for e in _examples()]
    torch.manual_seed(0)
    drawn = adapter.training_batch(batch)
    assert drawn["timesteps"].shape == (4,) and "timesteps" not in batch
    assert 0 < float(drawn["timesteps"].min()) and float(drawn["timesteps"].max()) < 1
    assert adapter.schedule.sampling == "logit_normal"
    with torch.no_grad():
        noisy = adapter.forward(drawn, output_hidden_states=False).image_loss
        fixed = adapter.forward(batch, output_hidden_states=False).image_loss
    assert not torch.equal(noisy, fixed)


def test_both_loss_terms_reach_both_experts(adapter):
    batch = adapter.encode(_examples())
    term = ContextualPredictionLoss(
        LossConfig(w_ctx=1.0, w_div=1.0, ctx_mode="bidirectional", ctx_row_fraction=1.0),
        adapter.mask_width,
    )
    out = adapter.forward(adapter.training_batch(batch))
    total, logs = term(adapter, batch, out, step=0)
    assert torch.isfinite(total) and logs["loss/ctx_tokens"] > 0
    total.backward()
    attention = adapter.transformer.layers[0].self_attn
    assert attention.to_q.weight.grad.abs().sum() > 0
    assert attention.add_q_proj.weight.grad.abs().sum() > 0


def test_default_lora_targets_are_both_experts(adapter):
    import peft

    from unifyreg.config import LoraSettings
    from unifyreg.module import apply_lora

    targets = adapter.default_lora_targets
    assert len(targets) == 2 * 14
    assert {t.split(".", 3)[3] for t in targets} == {
        "self_attn.to_q", "self_attn.to_k", "self_attn.to_v", "self_attn.to_out",
        "self_attn.add_q_proj", "self_attn.add_k_proj", "self_attn.add_v_proj",
        "self_attn.to_add_out", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        "mlp_moe_gen.gate_proj", "mlp_moe_gen.up_proj", "mlp_moe_gen.down_proj",
    }  # fmt: skip
    apply_lora(adapter, LoraSettings(r=2, alpha=4))
    assert isinstance(adapter.model, peft.PeftModel)
    trainable = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        out = adapter.forward(adapter.encode(_examples()))
    assert len(out.hidden_layers) == 3


def test_generation(adapter):
    examples = _examples()
    answers = adapter.generate_text(examples[1:3], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    images = adapter.generate_images(examples[:1])
    again = adapter.generate_images(examples[:1])
    assert images[0].size == (32, 32) and images[0].mode == "RGB"
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))
    edited = adapter.generate_images(examples[3:])  # an image prompt: the ViT reads it
    assert edited[0].size == (32, 32)
    result = run_probe(adapter, examples, ProbeConfig(responses="generated", batch_size=4))
    assert len(result.records["response/image"]) == 2 and len(result.records["response/text"]) == 2


# ---------------------------------------------------------------------- the CLI


def _manifest(directory):
    rows = []
    for index in range(2):
        _image(10 + index).save(directory / f"r{index}.png")
        _image(20 + index).save(directory / f"p{index}.png")
        rows += [
            {"text": f"draw cube {index}", "response_image": f"r{index}.png",
             "category": "composition"},
            {"text": QUESTION, "image": f"p{index}.png", "response": ANSWER,
             "category": "attribute"},
        ]  # fmt: skip
    rows.append({"text": TEXT, "response": REPLY, "category": "deductive"})
    path = directory / "set.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("family", ["mot", "bagel"])
def test_probe_command(family, folder, bagel_folder, tmp_path):
    from unifyreg.cli import main

    out = tmp_path / "out"
    path = folder if family == "mot" else bagel_folder
    args = [
        "probe", "--config", str(ROOT / "configs" / family / "probe.yaml"), f"model.path={path}",
        f"probe_set={_manifest(tmp_path)}", "model.dtype=float32", f"output_dir={out}",
    ]  # fmt: skip
    assert main(args) == 0
    result = ProbeResult.load(out / "result.json")
    assert {q: len(r) for q, r in result.records.items()} == {
        "encoding/text": 3, "encoding/image": 2, "response/text": 3, "response/image": 2,
    }  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["depth"] == 2 and set(summary["scores"]) >= {"encoding_gap", "final_gap"}


@pytest.mark.parametrize("family", ["mot", "bagel"])
def test_finetune_command_runs_one_lora_epoch(family, folder, bagel_folder, tmp_path):
    import csv

    from unifyreg.cli import main

    manifest = _manifest(tmp_path)
    run_dir = tmp_path / "run"
    path = folder if family == "mot" else bagel_folder
    args = [
        "finetune", "--config", str(ROOT / "configs" / family / "finetune_lora.yaml"),
        f"model.path={path}", f"data={manifest}", f"probe_set={manifest}", "model.dtype=float32",
        "precision=32-true", "accelerator=cpu", "max_epochs=1", "batch_size=5",
        "probe.batch_size=5", "loss.w_ctx=1.0", "loss.ctx_row_fraction=1.0", "loggers=[csv]",
        f"run_dir={run_dir}",
    ]  # fmt: skip
    assert main(args) == 0
    history = [
        json.loads(x) for x in (run_dir / "probe" / "probe_history.jsonl").read_text().splitlines()
    ]
    assert [entry["epoch"] for entry in history] == [0, 1]
    assert (run_dir / "lora" / "adapter_config.json").is_file()
    metrics = next((run_dir / "logs").glob("version_*/metrics.csv"))
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("tokens/image")]
    assert rows and all(float(r["tokens/image"]) == 8 for r in rows)  # 2 images x 4 tokens
    assert all(float(r["loss/ctx_tokens"]) > 0 for r in rows)
