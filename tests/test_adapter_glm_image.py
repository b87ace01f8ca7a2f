"""Tests of the GLM-Image adapter on a tiny random checkpoint written with save_pretrained.

The model's own pieces are the reference: the processor's prompt layout, the vision
tokenizer's ids (``get_image_features`` + ``get_image_tokens``) and ``get_rope_index``'s
3-D positions, continued by its cached decode positions for the response grids.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unifyreg.adapters import get_adapter_class
from unifyreg.adapters.glm_image import GlmImageAdapter, preview_grid, save_tiny_glm_image
from unifyreg.config import LossConfig, ProbeConfig
from unifyreg.images import ImageCodes
from unifyreg.losses import ContextualPredictionLoss
from unifyreg.manifest import ManifestExample
from unifyreg.probing import run_probe
from unifyreg.roles import Role

R = Role
ROOT = Path(__file__).resolve().parent.parent
T2I, EDIT, QUESTION = "draw a cat", "add a hat", "what is it?"
PREVIEW = 16 * 16  # the preview grid of a square image


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_glm_image(tmp_path_factory.mktemp("glm") / "ckpt")


@pytest.fixture
def adapter(checkpoint):
    return GlmImageAdapter.load(checkpoint)


def _image(seed, size=32):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB")


def _t2i():
    return ManifestExample("composition", T2I, response_image=_image(1))  # 4 x 4 tokens


def _edit():
    return ManifestExample("relation", EDIT, prompt_image=_image(2, 16), response_image=_image(3))


def _understanding():
    return ManifestExample("attribute", QUESTION, prompt_image=_image(4, 16), response_text="a cat")


def _layout(*segments):
    return [int(role) for role, count in segments for _ in range(count)]


def _stock_image_ids(adapter, image):
    """The source-image ids the model's own forward would scatter into its placeholders."""
    inputs = adapter.processor.image_processor(image, return_tensors="pt")
    model = adapter.base_model.model
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        return model.get_image_tokens(features.pooler_output).reshape(-1), inputs


# ---------------------------------------------------------------------- loading and layout


def test_registry_and_save_pretrained_round_trip(adapter, tmp_path):
    assert get_adapter_class("glm_image") is GlmImageAdapter
    assert (adapter.num_layers, adapter.hidden_size, adapter.generation_grid) == (2, 64, (2, 2))
    batch = adapter.encode([_t2i(), _edit()])
    with torch.no_grad():
        before = adapter.forward(batch, keep_logits=True)
    adapter.save(tmp_path / "again")
    reloaded = GlmImageAdapter.load(tmp_path / "again")
    with torch.no_grad():
        after = reloaded.forward(reloaded.encode([_t2i(), _edit()]), keep_logits=True)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.hidden_states, after.hidden_states)
    assert reloaded.generation_grid == (2, 2)


def test_t2i_prompt_is_the_processors_and_roles_are_exact(adapter):
    batch = adapter.encode([_t2i()])
    ids, roles = batch["input_ids"][0].tolist(), batch["roles"][0].tolist()
    # The image is 4 x 4 tokens: the processor's target of 128 x 128 pixels (factor 32).
    stock = adapter.processor(text=[T2I], target_h=128, target_w=128)["input_ids"][0]
    prompt = len(stock)
    assert ids[:prompt] == stock and ids[prompt - 1] == adapter.image_start_id
    shape = len(adapter.tokenizer("<sop>4 4<eop><sop>16 16<eop>")["input_ids"])
    assert roles == _layout(
        (R.TEXT_PROMPT, len(T2I)), (R.SPECIAL, shape + 1), (R.IMAGE_RESPONSE, PREVIEW + 16),
        (R.SPECIAL, 1),
    )  # fmt: skip
    assert ids[-1] == adapter.image_end_id
    # The image grid holds the vision tokenizer's ids of the image; the preview those of the
    # image resized to 16 x 16 patches.
    large = adapter.image_tokens(_t2i().response_image)
    assert ids[prompt + PREVIEW : prompt + PREVIEW + 16] == large.reshape(-1).tolist()
    assert adapter.image_tokens(_t2i().response_image, (16, 16)).shape == (16, 16)
    stock_ids, _ = _stock_image_ids(adapter, _t2i().response_image)
    assert large.reshape(-1).tolist() == stock_ids.tolist()
    assert max(ids[prompt:-1]) < adapter.num_codes
    kinds = batch["target_kind"][0]
    assert torch.equal(kinds == 2, batch["roles"][0] == R.IMAGE_RESPONSE)


def test_edit_prompt_is_the_processors_with_the_models_image_ids(adapter):
    example = _edit()
    batch = adapter.encode([example])
    ids, roles = batch["input_ids"][0].tolist(), batch["roles"][0].tolist()
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": EDIT}]}]]
    text = adapter.processor.apply_chat_template(messages, tokenize=False)
    stock = adapter.processor(
        text=text, images=[example.prompt_image], target_h=128, target_w=128, return_tensors="pt"
    )
    source_ids, _ = _stock_image_ids(adapter, example.prompt_image)
    expected = stock["input_ids"][0].clone()
    expected[expected == adapter.base_model.config.image_token_id] = source_ids
    prompt = len(expected)
    assert ids[:prompt] == expected.tolist()
    shape = len(adapter.tokenizer("<sop>4 4<eop>")["input_ids"])
    assert roles == _layout(
        (R.SPECIAL, 1), (R.IMAGE_PROMPT, 4), (R.SPECIAL, 1), (R.TEXT_PROMPT, len(EDIT)),
        (R.SPECIAL, shape + 1), (R.IMAGE_RESPONSE, 16), (R.SPECIAL, 1),
    )  # fmt: skip


def test_positions_are_get_rope_index_continued_by_its_decode_positions(adapter):
    model = adapter.base_model.model
    for example, grids in (
        (_t2i(), [[1, 4, 4], [1, 16, 16]]),
        (_edit(), [[1, 2, 2], [1, 4, 4]]),
    ):
        batch = adapter.encode([example])
        ids = batch["input_ids"]
        prompt = int(torch.nonzero(ids[0] == adapter.image_start_id).max()) + 1
        grid = torch.tensor(grids)
        positions, _ = model.get_rope_index(
            ids[:, :prompt], image_grid_thw=grid, images_per_sample=torch.tensor([2])
        )
        decode = model._cached_decode_position_ids.permute(1, 0, 2)
        expected = torch.cat([positions, decode[:, :, : ids.shape[1] - prompt]], dim=-1)
        assert torch.equal(adapter.position_ids(batch), expected)


def test_a_text_response_is_left_out_and_its_prompt_kept(adapter):
    with pytest.warns(UserWarning, match="leaves text responses out"):
        batch = adapter.encode([_understanding()])
    roles = batch["roles"][0].tolist()
    assert roles.count(R.IMAGE_PROMPT) == 4 and roles.count(R.TEXT_PROMPT) == len(QUESTION)
    assert R.TEXT_RESPONSE not in roles and not batch["target_kind"].any()
    with pytest.warns(UserWarning, match="leaves text responses out"):
        assert adapter.generate_text([_understanding()]) == [""]


def test_bad_inputs_give_clear_errors(adapter):
    codes = ImageCodes(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"needs its \(16, 16\) preview"):
        adapter.encode([ManifestExample("c", T2I, response_image=codes)])
    with pytest.raises(ValueError, match="holds image codes"):
        adapter.encode([ManifestExample("c", EDIT, prompt_image=codes, response_image=_image(0))])
    big = ImageCodes(np.full((2, 2), 60), preview=np.zeros((16, 16), dtype=np.int64))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 48\)"):
        adapter.encode([ManifestExample("c", T2I, response_image=big)])


# ---------------------------------------------------------------------- losses


def test_image_loss_equals_a_hand_computation(adapter):
    batch = adapter.encode([_t2i(), _edit()])
    with torch.no_grad():
        out = adapter.forward(batch, output_hidden_states=False)
        hidden = adapter.language_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=adapter.position_ids(batch),
        ).last_hidden_state
        logits = adapter.base_model.lm_head(hidden)
    assert logits.shape[-1] == 64  # the vision vocabulary only
    kinds = batch["target_kind"][:, 1:]
    b, t = torch.nonzero(kinds == 2, as_tuple=True)
    expected = F.cross_entropy(logits[:, :-1][b, t], batch["input_ids"][:, 1:][b, t])
    torch.testing.assert_close(out.image_loss, expected)
    assert int(out.image_tokens) == (PREVIEW + 16) + 16
    assert int(out.text_tokens) == 0 and float(out.text_loss) == 0.0
    # The stock loss reshapes vision-vocabulary logits with the full vocabulary and fails.
    with pytest.raises(RuntimeError, match="invalid for input of size"):
        adapter.model(input_ids=batch["input_ids"][:1, :20], labels=batch["input_ids"][:1, :20])


def test_both_loss_terms_compute(adapter):
    batch = adapter.encode([_t2i(), _edit()])
    term = ContextualPredictionLoss(LossConfig(w_ctx=1.0, w_div=1.0), adapter.hidden_size)
    out = adapter.forward(batch)
    total, logs = term(adapter, batch, out, step=0)
    # No text responses: only the encoding part of L_div has both modalities.
    assert torch.isfinite(total) and logs["loss/ctx_tokens"] > 0 and logs["loss/div_parts"] == 1
    (out.task_loss + total).backward()
    assert term.mask_embedding.grad.abs().sum() > 0
    assert adapter.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_default_lora_targets_are_the_language_models(adapter):
    targets = adapter.default_lora_targets
    assert len(targets) == 6 * adapter.num_layers
    assert all(t.startswith("model.language_model.layers.") for t in targets)
    batch = adapter.encode([_t2i()])
    with torch.no_grad():
        before = adapter.forward(batch, keep_logits=True).logits
    config = peft.LoraConfig(r=2, target_modules=list(targets))
    adapter.model = peft.get_peft_model(adapter.model, config)
    torch.testing.assert_close(adapter.forward(batch, keep_logits=True).logits, before)
    adapted = {n for n, m in adapter.model.named_modules() if hasattr(m, "lora_A")}
    assert not [n for n in adapted if ".visual." in n or "vqmodel" in n]


# ---------------------------------------------------------------------- generation


def test_generation_is_greedy_at_the_decode_positions(adapter):
    examples = [_t2i(), _edit()]
    generated = adapter.generate_image_codes(examples, batch_size=2)
    t2i, edit = generated
    assert t2i.codes.shape == (2, 2) and t2i.preview.shape == preview_grid(2, 2)
    assert edit.codes.shape == (2, 2) and edit.preview is None
    assert all(int(g.codes.max()) < adapter.num_codes for g in generated)
    assert [g.codes.tolist() for g in generated] == [
        adapter.generate_image_codes([e])[0].codes.tolist() for e in examples
    ]
    # Teacher-forcing the generated tokens gives back each as the argmax of the position
    # before: the cached decoding used the same 3-D positions as the forward pass.
    for example, codes in zip(examples, generated, strict=True):
        batch = adapter.encode([dataclasses.replace(example, response_image=codes)])
        with torch.no_grad():
            logits = adapter.forward(batch, keep_logits=True).logits[0, :, : adapter.num_codes]
        targets = torch.nonzero(batch["target_kind"][0] == 2).flatten()
        assert torch.equal(logits[targets - 1].argmax(-1), batch["input_ids"][0, targets])


def test_probe_with_generated_responses(adapter):
    result = run_probe(adapter, [_t2i(), _edit()], ProbeConfig(responses="generated"))
    assert len(result.records["response/image"]) == 2
    assert all(np.isfinite(r.values).all() for r in result.records.values())


# ---------------------------------------------------------------------- the CLI


def _manifest(directory):
    _image(1).save(directory / "r1.png")
    _image(2, 16).save(directory / "p2.png")
    _image(3).save(directory / "r3.png")
    _image(4, 16).save(directory / "p4.png")
    rows = [
        {"text": T2I, "response_image": "r1.png", "category": "composition"},
        {"text": EDIT, "image": "p2.png", "response_image": "r3.png", "category": "relation"},
        {"text": QUESTION, "image": "p4.png", "response": "a cat", "category": "attribute"},
        {"text": "two plus one", "response": "three", "category": "deductive"},
    ]
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
        str(ROOT / "configs" / "glm_image" / "probe.yaml"),
        f"model.path={checkpoint}",
        f"probe_set={_manifest(tmp_path)}",
        "model.dtype=float32",
        f"output_dir={out}",
        "figures=false",
    ]
    with pytest.warns(UserWarning) as caught:
        assert main(args) == 0
    messages = " ".join(str(w.message) for w in caught)
    assert "leaves text responses out" in messages
    result = ProbeResult.load(out / "result.json")
    assert {q: len(r) for q, r in result.records.items()} == {
        "encoding/text": 2, "encoding/image": 2, "response/text": 0, "response/image": 2,
    }  # fmt: skip
    with pytest.warns(UserWarning):
        assert set(result.scores()) == {"encoding_gap"}  # the response scores are left out


def test_finetune_command_runs_one_lora_epoch(checkpoint, tmp_path):
    from unifyreg.cli import main

    manifest = _manifest(tmp_path)
    run_dir = tmp_path / "run"
    args = [
        "finetune",
        "--config",
        str(ROOT / "configs" / "glm_image" / "finetune_lora.yaml"),
        f"model.path={checkpoint}",
        f"data={manifest}",
        f"probe_set={manifest}",
        "model.dtype=float32",
        "precision=32-true",
        "accelerator=cpu",
        "max_epochs=1",
        "batch_size=4",
        "probe.batch_size=4",
        "loss.w_ctx=1.0",
        "loss.w_div=1.0",
        "loggers=[csv]",
        f"run_dir={run_dir}",
    ]
    with pytest.warns(UserWarning, match="leaves text responses out"):
        assert main(args) == 0
    history = (run_dir / "probe" / "probe_history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [0, 1]
    assert (run_dir / "lora" / "adapter_config.json").is_file()
    header = next((run_dir / "logs").glob("version_*/metrics.csv")).read_text().splitlines()[0]
    assert "loss/ctx" in header and "loss/div" in header and "unify/encoding_gap" in header


def test_ctx_through_the_shared_prefix_equals_the_full_second_pass(checkpoint):
    """L_ctx after the main pass's prompt, with GLM-Image's 3-D positions cut at the prefix
    (an edit row holds an image prompt before its response)."""
    from conftest import reuse_matches_full_pass

    main, second = reuse_matches_full_pass(
        lambda: GlmImageAdapter.load(checkpoint),
        [_t2i(), _edit(), _t2i()],
        "bidirectional",
        rtol=1e-4,
        atol=1e-6,
    )
    assert 0 < second < main  # the second pass skipped the shared prompt
